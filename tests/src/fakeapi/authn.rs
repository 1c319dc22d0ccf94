//! Bearer tokens, as the kube-apiserver's token authenticators see them: tokens the fake handed
//! out (nodes, the admin, bootstrap tokens), tokens a test registered, and the service account
//! tokens its TokenRequest endpoint issued, which are checked against their claims on every use
//! (expiry, audiences, the bound pod still being there with its UID). The same answer serves a
//! request's `Authorization` header and a TokenReview.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

use super::authz::User;
use super::store::Store;

/// The API server's audience (`--api-audiences`, defaulting to the service account issuer): what a
/// token must be meant for to authenticate a request, and what a TokenReview asks for by default.
pub(crate) const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// The claims of a service account token the fake issued.
#[derive(Debug, Clone)]
pub(crate) struct SaToken {
    pub namespace: String,
    pub name: String,
    /// The pod it is bound to: name and UID.
    pub pod: Option<(String, String)>,
    pub audiences: Vec<String>,
    /// `exp`, Unix seconds.
    pub expires: i64,
}

/// Every token the fake knows.
#[derive(Default)]
pub(crate) struct Tokens {
    users: HashMap<String, User>,
    service_accounts: HashMap<String, SaToken>,
}

/// What a token is, before its claims are checked.
pub(crate) enum Found {
    /// A static token (node, admin, bootstrap, a test's): audience-agnostic.
    User(User),
    ServiceAccount(SaToken),
    Unknown,
}

/// Who a token authenticates as.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub user: User,
    pub uid: Option<String>,
    pub extra: BTreeMap<String, Vec<String>>,
    /// The audiences it was accepted for (the asked ones it is meant for).
    pub audiences: Vec<String>,
}

impl Tokens {
    pub fn insert(&mut self, token: String, user: User) {
        self.users.insert(token, user);
    }

    pub fn insert_service_account(&mut self, token: String, claims: SaToken) {
        self.service_accounts.insert(token, claims);
    }

    /// Looks a token up; its claims are checked by [`authenticate`], against the store.
    pub fn find(&self, token: &str) -> Found {
        let token = token.trim();
        if let Some(u) = self.users.get(token) {
            return Found::User(u.clone());
        }
        match self.service_accounts.get(token) {
            Some(sa) => Found::ServiceAccount(sa.clone()),
            None => Found::Unknown,
        }
    }
}

/// Go's `%q` of a `[]string`: `["a" "b"]`.
fn go_quoted(list: &[String]) -> String {
    let items: Vec<String> = list.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", items.join(" "))
}

/// The authenticator chain's verdict on a token for the audiences `wanted`: `Ok(None)` for a
/// token nobody recognises (or a static token asked for an audience other than the API
/// server's), `Err` with the authenticator's message for a token that is recognised but not
/// valid (expired, for another audience, its pod gone).
pub(crate) fn authenticate(
    found: Found,
    store: &Store,
    wanted: &[String],
) -> Result<Option<Identity>, String> {
    match found {
        Found::Unknown => Ok(None),
        Found::User(user) => {
            // Audience-agnostic authenticators accept only the API server's own audience.
            let audiences: Vec<String> = wanted.iter().filter(|a| *a == API_AUDIENCE).cloned().collect();
            if audiences.is_empty() {
                return Ok(None);
            }
            Ok(Some(Identity { user, uid: None, extra: BTreeMap::new(), audiences }))
        }
        Found::ServiceAccount(sa) => {
            let audiences: Vec<String> =
                sa.audiences.iter().filter(|a| wanted.contains(a)).cloned().collect();
            if audiences.is_empty() {
                return Err(format!(
                    "token audiences {} is invalid for the target audiences {}",
                    go_quoted(&sa.audiences),
                    go_quoted(wanted)
                ));
            }
            if jiff::Timestamp::now().as_second() >= sa.expires {
                return Err("Token has expired.".into());
            }
            let mut extra = BTreeMap::new();
            if let Some((pod_name, pod_uid)) = &sa.pod {
                let pods = super::store::resource("", "pods").ok_or("no pods resource")?;
                let Some(pod) = store.get(pods, &sa.namespace, pod_name) else {
                    return Err("Token has been invalidated".into());
                };
                let uid = pod.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or_default();
                if uid != pod_uid {
                    return Err(format!("Pod UID ({uid}) does not match claim ({pod_uid})"));
                }
                extra.insert("authentication.kubernetes.io/pod-name".to_owned(), vec![pod_name.clone()]);
                extra.insert("authentication.kubernetes.io/pod-uid".to_owned(), vec![pod_uid.clone()]);
            }
            let uid = super::store::resource("", "serviceaccounts")
                .and_then(|r| store.get(r, &sa.namespace, &sa.name))
                .and_then(|o| o.pointer("/metadata/uid"))
                .and_then(Value::as_str)
                .map(str::to_owned);
            let user = User::Other {
                name: format!("system:serviceaccount:{}:{}", sa.namespace, sa.name),
                groups: vec![
                    "system:serviceaccounts".to_owned(),
                    format!("system:serviceaccounts:{}", sa.namespace),
                    "system:authenticated".to_owned(),
                ],
            };
            Ok(Some(Identity { user, uid, extra, audiences }))
        }
    }
}

impl Identity {
    /// `status.user` of a TokenReview.
    pub fn user_info(&self) -> Value {
        let mut u = json!({"username": self.user.name(), "groups": self.user.groups()});
        if let Some(uid) = &self.uid {
            u["uid"] = json!(uid);
        }
        if !self.extra.is_empty() {
            u["extra"] = json!(self.extra);
        }
        u
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn static_tokens_are_for_the_api_server_audience_only() {
        let mut t = Tokens::default();
        t.insert("n".into(), User::Node("n1".into()));
        let store = Store::default();
        let id = authenticate(t.find("n"), &store, &wanted(&[API_AUDIENCE])).expect("valid").expect("known");
        assert_eq!(id.user.name(), "system:node:n1");
        assert_eq!(id.audiences, [API_AUDIENCE]);
        assert!(authenticate(t.find("n"), &store, &wanted(&["vault"])).expect("no error").is_none());
        assert!(authenticate(t.find("nope"), &store, &wanted(&[API_AUDIENCE])).expect("no error").is_none());
    }

    #[test]
    fn service_account_tokens_check_their_claims() {
        let mut store = Store::default();
        let pods = super::super::store::resource("", "pods").expect("pods");
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}});
        let pod = store.create(pods, "ns", pod).expect("create");
        let uid = pod["metadata"]["uid"].as_str().expect("uid").to_owned();
        let claims = |pod_uid: &str, expires: i64| SaToken {
            namespace: "ns".into(),
            name: "default".into(),
            pod: Some(("p".into(), pod_uid.into())),
            audiences: vec![API_AUDIENCE.into()],
            expires,
        };
        let later = jiff::Timestamp::now().as_second() + 600;
        let mut t = Tokens::default();
        t.insert_service_account("good".into(), claims(&uid, later));
        t.insert_service_account("old".into(), claims(&uid, 1));
        t.insert_service_account("other-pod".into(), claims("0000", later));
        let api = wanted(&[API_AUDIENCE]);
        let id = authenticate(t.find("good"), &store, &api).expect("valid").expect("known");
        assert_eq!(id.user.name(), "system:serviceaccount:ns:default");
        assert_eq!(
            id.user.groups(),
            ["system:serviceaccounts", "system:serviceaccounts:ns", "system:authenticated"]
        );
        assert_eq!(id.extra["authentication.kubernetes.io/pod-uid"], [uid.as_str()]);
        assert_eq!(authenticate(t.find("old"), &store, &api).unwrap_err(), "Token has expired.");
        assert!(authenticate(t.find("other-pod"), &store, &api).unwrap_err().starts_with("Pod UID ("));
        let e = authenticate(t.find("good"), &store, &wanted(&["vault"])).unwrap_err();
        assert_eq!(
            e,
            format!("token audiences [{API_AUDIENCE:?}] is invalid for the target audiences [\"vault\"]")
        );
        store.delete(pods, "ns", "p", &Default::default()).expect("delete");
        assert_eq!(authenticate(t.find("good"), &store, &api).unwrap_err(), "Token has been invalidated");
    }
}
