//! A tower layer for the kube client that counts every API request into the process-wide
//! counters.

use std::time::Instant;

use hyper::{Request, Response};

use super::global;

/// Whether a request to the API server is a watch (`?watch=true`): a long poll, not timed.
pub fn is_watch(uri: &hyper::Uri) -> bool {
    uri.query().is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"))
}

/// A tower layer for the kube client that counts every API request by verb and status code and
/// times those that are not watches (a watch is a long poll whose duration says nothing).
#[derive(Clone, Copy, Default)]
pub struct ApiMetricsLayer;

impl<S> tower::Layer<S> for ApiMetricsLayer {
    type Service = ApiMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ApiMetricsService { inner }
    }
}

/// The service [`ApiMetricsLayer`] wraps around the client's.
#[derive(Clone)]
pub struct ApiMetricsService<S> {
    inner: S,
}

impl<S, B, R> tower::Service<Request<B>> for ApiMetricsService<S>
where
    S: tower::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let watch = is_watch(req.uri());
        let verb = if watch { "WATCH".to_owned() } else { req.method().as_str().to_owned() };
        let started = Instant::now();
        let future = self.inner.call(req);
        Box::pin(async move {
            let result = future.await;
            let elapsed = (!watch).then(|| started.elapsed());
            match &result {
                Ok(resp) => global().api_request(&verb, resp.status().as_u16(), elapsed),
                Err(_) => global().api_request(&verb, 0, elapsed),
            }
            result
        })
    }
}
