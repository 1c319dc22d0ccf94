//! Who may call the kubelet API, decided as the kubelet decides it: the caller is authenticated by
//! a client certificate that chains to the cluster CA or by a bearer token the API server vouches
//! for (TokenReview), then authorized by the API server (SubjectAccessReview) on the node's
//! `nodes/<subresource>` attributes. Anonymous callers are refused.
//!
//! Answers are cached (tokens for 2 minutes, allowed for 5, denied for 30 seconds: the kubelet's
//! defaults), so `kubectl logs -f` reconnects do not each cost two API round trips.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::Api;
use kube::api::PostParams;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::cluster::ClusterClient;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The user name.
    pub user: String,
    /// The groups.
    pub groups: Vec<String>,
}

/// The request attributes authorized, as the kubelet derives them from the path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attributes {
    /// `get`, `create`, …, from the HTTP method.
    pub verb: &'static str,
    /// `proxy`, `log`, `metrics`, `stats`, `spec`.
    pub subresource: &'static str,
}

impl Attributes {
    /// The kubelet's mapping of an HTTP method and path to `nodes/<subresource>` attributes.
    pub fn of(method: &hyper::Method, path: &str) -> Attributes {
        let verb = match *method {
            hyper::Method::POST => "create",
            hyper::Method::PUT => "update",
            hyper::Method::PATCH => "patch",
            hyper::Method::DELETE => "delete",
            _ => "get",
        };
        let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
        let subresource = match first {
            "stats" => "stats",
            "metrics" => "metrics",
            "logs" => "log",
            "spec" => "spec",
            _ => "proxy",
        };
        Attributes { verb, subresource }
    }
}

/// Why a caller could not be checked (not why it was refused).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No API server to ask yet.
    #[error("the node is not connected to its API server yet; cannot check the caller")]
    NoClient,
    /// The API server did not answer.
    #[error("the API server could not check the caller: {}", crate::api_error::brief(.0))]
    Api(#[source] kube::Error),
}

/// A cached decision.
struct Cached<T> {
    value: T,
    until: Instant,
}

/// Cache bound: a flood of distinct tokens must not grow memory without limit.
const MAX_CACHED: usize = 1024;
const TOKEN_TTL: Duration = Duration::from_secs(120);
const ALLOWED_TTL: Duration = Duration::from_secs(300);
const DENIED_TTL: Duration = Duration::from_secs(30);

fn put<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, Cached<V>>, key: K, value: V, ttl: Duration) {
    if map.len() >= MAX_CACHED {
        let now = Instant::now();
        map.retain(|_, c| c.until > now);
        if map.len() >= MAX_CACHED {
            map.clear();
        }
    }
    map.insert(key, Cached { value, until: Instant::now() + ttl });
}

fn get<K: std::hash::Hash + Eq, V: Clone>(map: &HashMap<K, Cached<V>>, key: &K) -> Option<V> {
    map.get(key).filter(|c| c.until > Instant::now()).map(|c| c.value.clone())
}

/// Authenticates tokens and authorizes requests through the API server.
pub struct Authorizer {
    node_name: String,
    client: watch::Receiver<Option<ClusterClient>>,
    tokens: Mutex<HashMap<[u8; 32], Cached<Option<Identity>>>>,
    decisions: Mutex<Decisions>,
}

/// Cached authorization answers: allowed, and the API server's reason.
type Decisions = HashMap<(Identity, Attributes), Cached<(bool, String)>>;

impl Authorizer {
    /// An authorizer for `node_name`, asking through whatever client `client` holds.
    pub fn new(node_name: String, client: watch::Receiver<Option<ClusterClient>>) -> Self {
        Authorizer { node_name, client, tokens: Mutex::default(), decisions: Mutex::default() }
    }

    fn client(&self) -> Result<kube::Client, AuthError> {
        self.client.borrow().as_ref().map(|c| c.current()).ok_or(AuthError::NoClient)
    }

    /// The identity behind a bearer token, `None` if the API server does not know it.
    pub async fn authenticate_token(&self, token: &str) -> Result<Option<Identity>, AuthError> {
        // Keyed by a hash: the cache never holds a usable token.
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(v) = self.tokens.lock().ok().and_then(|t| get(&t, &key)) {
            return Ok(v);
        }
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_owned()), ..Default::default() },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client()?);
        let answer = api.create(&PostParams::default(), &review).await.map_err(AuthError::Api)?;
        let status = answer.status.unwrap_or_default();
        let identity = match (status.authenticated, status.user) {
            (Some(true), Some(u)) => {
                Some(Identity { user: u.username.unwrap_or_default(), groups: u.groups.unwrap_or_default() })
            }
            _ => None,
        };
        if let Ok(mut t) = self.tokens.lock() {
            put(&mut t, key, identity.clone(), TOKEN_TTL);
        }
        Ok(identity)
    }

    /// Whether `who` may do `attrs` on this node; with the API server's reason when not.
    pub async fn authorize(&self, who: &Identity, attrs: &Attributes) -> Result<(bool, String), AuthError> {
        let key = (who.clone(), attrs.clone());
        if let Some(v) = self.decisions.lock().ok().and_then(|d| get(&d, &key)) {
            return Ok(v);
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(who.user.clone()),
                groups: Some(who.groups.clone()),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(attrs.verb.to_owned()),
                    version: Some("v1".to_owned()),
                    resource: Some("nodes".to_owned()),
                    subresource: Some(attrs.subresource.to_owned()),
                    name: Some(self.node_name.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(self.client()?);
        let answer = api.create(&PostParams::default(), &review).await.map_err(AuthError::Api)?;
        let status = answer.status.unwrap_or_default();
        let decision = (status.allowed, status.reason.unwrap_or_default());
        let ttl = if decision.0 { ALLOWED_TTL } else { DENIED_TTL };
        if let Ok(mut d) = self.decisions.lock() {
            put(&mut d, key, decision.clone(), ttl);
        }
        Ok(decision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_the_kubelets_attributes() {
        let get = |p| Attributes::of(&hyper::Method::GET, p);
        assert_eq!(get("/containerLogs/ns/p/c"), Attributes { verb: "get", subresource: "proxy" });
        assert_eq!(get("/metrics/cadvisor").subresource, "metrics");
        assert_eq!(get("/stats/summary").subresource, "stats");
        assert_eq!(get("/metrics/resource").subresource, "metrics");
        assert_eq!(get("/statsfoo").subresource, "proxy", "a whole segment, as the kubelet's isSubpath");
        assert_eq!(get("/logs/").subresource, "log");
        assert_eq!(Attributes::of(&hyper::Method::POST, "/exec/ns/p/c").verb, "create");
    }

    #[test]
    fn the_cache_is_bounded_and_expires() {
        let mut m = HashMap::new();
        for i in 0..(MAX_CACHED + 10) {
            put(&mut m, i, i, Duration::from_secs(60));
        }
        assert!(m.len() <= MAX_CACHED, "{}", m.len());
        put(&mut m, 99_999, 1, Duration::ZERO);
        assert_eq!(get(&m, &99_999), None, "an expired answer is not used");
    }
}
