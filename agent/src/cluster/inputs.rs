//! Fetches what pods refer to: ConfigMaps and Secrets with a GET each (the Node authorizer lets a
//! node read exactly those its pods name, nothing else), and projected service account tokens
//! through the TokenRequest API, bound to the pod so they die with it.
//!
//! Results are cached per pod and refreshed: objects every [`REFRESH`], missing ones and failed
//! fetches on every pass, tokens at 80% of their life. A failed fetch keeps the last good value,
//! so an outage never empties a running pod's volume.
//!
//! Right after a pod is bound the Node authorizer may refuse these reads (`403 … no relationship
//! found between node … and this object`) until its graph has the pod; such a refusal is retried
//! at once, a few times over about three seconds ([`GRAPH_LAG_RETRIES`]), quietly, as the kubelet
//! does, instead of leaving the pod waiting for the next pass.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use kube::api::{Api, PostParams};

use crate::pod::inputs::{self, IssuedToken, ObjectData, ObjectKind, PodInputs, TokenRef};

/// How often ConfigMaps and Secrets that were found are fetched again.
pub const REFRESH: Duration = Duration::from_secs(60);
/// How soon a missing object, a failed fetch or a due token is tried again.
pub const RETRY: Duration = Duration::from_secs(5);
/// The waits between quick retries of a read the Node authorizer refused because its graph has
/// not caught up with a binding (milliseconds in practice); about 3 s in all, well under [`RETRY`].
pub const GRAPH_LAG_RETRIES: [Duration; 6] = [
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(400),
    Duration::from_millis(800),
    Duration::from_millis(1600),
];

struct Cached {
    inputs: PodInputs,
    fetched: Instant,
}

/// Why a service account token could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum TokenRequestError {
    /// The API server refused or could not be reached.
    #[error("TokenRequest for service account {account}: {}", crate::api_error::brief(.source))]
    Api {
        /// `namespace/name` of the service account.
        account: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The answer carried no token.
    #[error("the API server answered a TokenRequest without a token")]
    NoToken,
}

/// Per-pod cache of fetched inputs.
pub struct InputResolver {
    client: super::ClusterClient,
    cache: HashMap<String, Cached>,
}

impl InputResolver {
    /// A resolver with an empty cache.
    pub fn new(client: super::ClusterClient) -> Self {
        InputResolver { client, cache: HashMap::new() }
    }

    /// The inputs of `pod`, fetched if the cache is stale, incomplete or has a token due.
    pub async fn inputs(&mut self, pod: &Pod) -> PodInputs {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let refs = inputs::references(pod);
        if refs.is_empty() {
            return PodInputs::default();
        }
        let now = Timestamp::now();
        if let Some(c) = self.cache.get(&uid) {
            let complete = c.inputs.errors.is_empty()
                && refs.config_maps.iter().all(|n| c.inputs.config_maps.get(n).is_some_and(Option::is_some))
                && refs.secrets.iter().all(|n| c.inputs.secrets.get(n).is_some_and(Option::is_some))
                && refs.tokens.iter().all(|t| c.inputs.tokens.get(&t.key()).is_some_and(|t| !t.due(now)));
            // Incomplete inputs are retried, but not on every watch event: the agent's own status
            // patches produce one per pod change.
            let fresh = if complete { REFRESH } else { RETRY };
            if c.fetched.elapsed() < fresh {
                return c.inputs.clone();
            }
        }
        let previous = self.cache.remove(&uid).map(|c| c.inputs).unwrap_or_default();
        let fetched = self.fetch(pod, &refs, &previous).await;
        self.cache.insert(uid, Cached { inputs: fetched.clone(), fetched: Instant::now() });
        fetched
    }

    /// Drops the cache of pods not in `uids`.
    pub fn retain(&mut self, uids: &std::collections::HashSet<String>) {
        self.cache.retain(|uid, _| uids.contains(uid));
    }

    async fn fetch(&self, pod: &Pod, refs: &inputs::References, previous: &PodInputs) -> PodInputs {
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let mut out = PodInputs::default();
        let cms: Api<ConfigMap> = Api::namespaced(self.client.current(), ns);
        for name in &refs.config_maps {
            let got = past_graph_lag(|| cms.get_opt(name)).await.map(|o| o.map(config_map_data));
            record(&mut out, previous, ObjectKind::ConfigMap, ns, name, got);
        }
        let secrets: Api<Secret> = Api::namespaced(self.client.current(), ns);
        for name in &refs.secrets {
            let got =
                past_graph_lag(|| secrets.get_opt(name)).await.map(|o| o.map(|s| s.data.unwrap_or_default()));
            record(&mut out, previous, ObjectKind::Secret, ns, name, got);
        }
        let now = Timestamp::now();
        for t in &refs.tokens {
            let key = t.key();
            match previous.tokens.get(&key) {
                Some(tok) if !tok.due(now) => {
                    out.tokens.insert(key, tok.clone());
                }
                prev => match self.request_token(pod, t).await {
                    Ok(tok) => {
                        out.tokens.insert(key, tok);
                    }
                    Err(e) => {
                        tracing::warn!(pod = %pod_key(pod), error = %e, "cannot get a service account token");
                        match prev {
                            // Still valid, only due: keep serving it while the API is away.
                            Some(tok) if tok.expires > now => {
                                out.tokens.insert(key, tok.clone());
                            }
                            _ => {
                                out.errors.insert(format!("token/{key}"), e.to_string());
                            }
                        }
                    }
                },
            }
        }
        out
    }

    async fn request_token(&self, pod: &Pod, t: &TokenRef) -> Result<IssuedToken, TokenRequestError> {
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let sa = pod.spec.as_ref().and_then(|s| s.service_account_name.as_deref()).unwrap_or("default");
        let api: Api<ServiceAccount> = Api::namespaced(self.client.current(), ns);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: if t.audience.is_empty() { vec![] } else { vec![t.audience.clone()] },
                expiration_seconds: Some(t.expiration_seconds),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                }),
            },
            ..Default::default()
        };
        let issued = Timestamp::now();
        let params = PostParams::default();
        let resp = past_graph_lag(|| api.create_token_request(sa, &params, &request))
            .await
            .map_err(|source| TokenRequestError::Api { account: format!("{ns}/{sa}"), source })?;
        let status = resp.status.ok_or(TokenRequestError::NoToken)?;
        Ok(IssuedToken { token: status.token, issued, expires: status.expiration_timestamp.0 })
    }
}

/// `call`, again after a short wait while the Node authorizer refuses it for lack of a graph edge
/// ([`GRAPH_LAG_RETRIES`]); any other outcome, or the last refusal, is returned as it is.
async fn past_graph_lag<T, F, Fut>(mut call: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let mut waits = GRAPH_LAG_RETRIES.iter();
    loop {
        match call().await {
            Err(e) if crate::api_error::is_node_graph_lag(&e) => match waits.next() {
                Some(wait) => {
                    tracing::debug!(error = %crate::api_error::brief(&e), retry_in_ms = wait.as_millis() as u64, "the Node authorizer has not caught up with the binding yet");
                    tokio::time::sleep(*wait).await;
                }
                None => return Err(e),
            },
            got => return got,
        }
    }
}

/// Files a fetch result into `out`; a failed fetch keeps the previous value if there was one.
fn record(
    out: &mut PodInputs,
    previous: &PodInputs,
    kind: ObjectKind,
    namespace: &str,
    name: &str,
    got: Result<Option<ObjectData>, kube::Error>,
) {
    let (map, prev) = match kind {
        ObjectKind::ConfigMap => (&mut out.config_maps, previous.config_maps.get(name)),
        ObjectKind::Secret => (&mut out.secrets, previous.secrets.get(name)),
    };
    match got {
        Ok(data) => {
            map.insert(name.to_owned(), data);
        }
        Err(e) => {
            let resource = format!("{} {namespace}/{name}", kind.resource());
            tracing::warn!(error = %crate::api_error::failed("get", &resource, &e), "cannot fetch");
            match prev {
                Some(p) => {
                    map.insert(name.to_owned(), p.clone());
                }
                None => {
                    // The pod's status says which object; the API's answer completes it.
                    out.errors.insert(kind.error_key(name), crate::api_error::brief(&e).to_string());
                }
            }
        }
    }
}

fn config_map_data(cm: ConfigMap) -> ObjectData {
    let mut out: ObjectData =
        cm.data.unwrap_or_default().into_iter().map(|(k, v)| (k, ByteString(v.into_bytes()))).collect();
    out.extend(cm.binary_data.unwrap_or_default());
    out
}

fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}
