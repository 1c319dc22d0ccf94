//! The review APIs a kubelet delegates its own API's security to (`authentication.webhook` and
//! `authorization.mode: Webhook`): a TokenReview asks who a bearer token is, a SubjectAccessReview
//! whether someone may do something. Neither is stored; both answer `201 Created` with the review
//! and its status, as the real registry does.

use serde_json::{Value, json};

use super::authn::{self, API_AUDIENCE};
use super::authz::{self, Attrs, Check, User};
use super::errors::{ApiError, field_error};
use super::handler::{Outcome, Req, parse_body};
use super::select::FieldSelector;
use super::store::{Res, Store};

pub(crate) static TOKEN_REVIEWS: Res = Res {
    group: "authentication.k8s.io",
    version: "v1",
    plural: "tokenreviews",
    kind: "TokenReview",
    namespaced: false,
    status: false,
    fields: &[],
};

pub(crate) static SUBJECT_ACCESS_REVIEWS: Res = Res {
    group: "authorization.k8s.io",
    version: "v1",
    plural: "subjectaccessreviews",
    kind: "SubjectAccessReview",
    namespaced: false,
    status: false,
    fields: &[],
};

/// Which review a request creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Token,
    SubjectAccess,
}

/// `POST` of a TokenReview or a SubjectAccessReview.
pub(crate) fn create(store: &Store, req: &Req, kind: Kind) -> Result<Outcome, ApiError> {
    let res = match kind {
        Kind::Token => &TOKEN_REVIEWS,
        Kind::SubjectAccess => &SUBJECT_ACCESS_REVIEWS,
    };
    if req.method != "POST" {
        return Err(ApiError::method_not_allowed(req.method));
    }
    let fields = FieldSelector::default();
    let attrs = Attrs { verb: "create", res, sub: None, namespace: "", name: "", fields: &fields };
    authz::authorize(req.user, &attrs, store, req.grants)?;
    let mut review = parse_body(req.body)?;
    if !review.is_object() {
        return Err(ApiError::bad_request(format!("the body of the request is not a {} object", res.kind)));
    }
    if let Some(k) = review.get("kind").and_then(Value::as_str).filter(|k| !k.is_empty() && *k != res.kind) {
        return Err(ApiError::bad_request(format!(
            "{k} in version \"v1\" cannot be handled as a {}: the kind does not match",
            res.kind
        )));
    }
    let status = match kind {
        Kind::Token => token_status(store, req, &review)?,
        Kind::SubjectAccess => access_status(store, req, &review)?,
    };
    review["kind"] = json!(res.kind);
    review["apiVersion"] = json!(res.api_version());
    if !review.get("metadata").is_some_and(Value::is_object) {
        review["metadata"] = json!({});
    }
    review["metadata"]["creationTimestamp"] = Value::Null;
    review["status"] = status;
    Ok(Outcome::Json(201, review))
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).map(str::to_owned).collect()
}

/// What the authenticator chain says of `spec.token`, for `spec.audiences` (the API server's own
/// by default). Unknown tokens are simply not authenticated (`authenticated` is then omitted, as
/// the real JSON omits a false one); recognised but invalid ones also carry `error`.
fn token_status(store: &Store, req: &Req, review: &Value) -> Result<Value, ApiError> {
    let token = review.pointer("/spec/token").and_then(Value::as_str).unwrap_or_default();
    if token.is_empty() {
        return Err(ApiError::bad_request("token is required for TokenReview in authentication"));
    }
    let mut audiences = strings(review.pointer("/spec/audiences"));
    if audiences.is_empty() {
        audiences = vec![API_AUDIENCE.to_owned()];
    }
    let found = super::lock(req.tokens).find(token);
    Ok(match authn::authenticate(found, store, &audiences) {
        Ok(Some(id)) => json!({"authenticated": true, "user": id.user_info(), "audiences": id.audiences}),
        Ok(None) => json!({"user": {}}),
        Err(e) => json!({"user": {}, "error": e}),
    })
}

/// The authorizer's decision on `spec`: its user and groups, and its resource or non-resource
/// attributes. `denied` stays unset: under `Node,RBAC` no authorizer denies outright, they only
/// fail to allow, so the real server never sets it either.
fn access_status(store: &Store, req: &Req, review: &Value) -> Result<Value, ApiError> {
    let spec = review.get("spec").cloned().unwrap_or(Value::Null);
    let resource = spec.get("resourceAttributes").filter(|v| !v.is_null());
    let non_resource = spec.get("nonResourceAttributes").filter(|v| !v.is_null());
    let user = spec.get("user").and_then(Value::as_str).unwrap_or_default();
    let groups = strings(spec.get("groups"));
    let mut errors = vec![];
    match (resource, non_resource) {
        (Some(_), Some(_)) => errors.push(field_error(
            "spec.nonResourceAttributes",
            "FieldValueInvalid",
            "Invalid value: \"null\": cannot be specified in combination with resourceAttributes",
        )),
        (None, None) => errors.push(field_error(
            "spec.resourceAttributes",
            "FieldValueInvalid",
            "Invalid value: \"null\": exactly one of nonResourceAttributes or resourceAttributes must be specified",
        )),
        _ => {}
    }
    if user.is_empty() && groups.is_empty() {
        errors.push(field_error(
            "spec.user",
            "FieldValueInvalid",
            "Invalid value: \"\": at least one of user or group must be specified",
        ));
    }
    if !errors.is_empty() {
        return Err(ApiError::invalid(&SUBJECT_ACCESS_REVIEWS, "", &errors));
    }
    let s = |v: Option<&Value>, key: &str| -> String {
        v.and_then(|o| o.get(key)).and_then(Value::as_str).unwrap_or_default().to_owned()
    };
    let (verb, group, res, sub, ns, name, path) = match resource {
        Some(r) => (
            s(Some(r), "verb"),
            s(Some(r), "group"),
            s(Some(r), "resource"),
            s(Some(r), "subresource"),
            s(Some(r), "namespace"),
            s(Some(r), "name"),
            None,
        ),
        None => (
            s(non_resource, "verb"),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            Some(s(non_resource, "path")),
        ),
    };
    let fields = FieldSelector::default();
    let check = Check {
        verb: &verb,
        group: &group,
        resource: &res,
        sub: (!sub.is_empty()).then_some(sub.as_str()),
        namespace: &ns,
        name: &name,
        fields: &fields,
        path: path.as_deref(),
    };
    let subject = User::from_info(user, &groups);
    let d = authz::decide(&subject, &check, store, req.grants);
    let mut status = json!({"allowed": d.allowed});
    let reason = if d.allowed || !d.reason.is_empty() {
        d.reason
    } else {
        // The real RBAC authorizer gives no reason for a request no rule allows; a test reading
        // the review is better served by one.
        format!(
            "no RBAC policy matched: no rule of the fake API server allows user {user:?} (groups {groups:?}) this"
        )
    };
    if !reason.is_empty() {
        status["reason"] = json!(reason);
    }
    Ok(status)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use super::super::authn::Tokens;
    use super::super::authz::Grant;
    use super::super::handler::dispatch;
    use super::*;

    /// Serves one request as `user` against `store`, as the server would.
    pub(crate) fn call(
        store: &mut Store,
        tokens: &Mutex<Tokens>,
        grants: &[Grant],
        user: &User,
        method: &str,
        path_and_query: &str,
        body: &Value,
    ) -> Result<Outcome, ApiError> {
        let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
        let body = if body.is_null() { vec![] } else { body.to_string().into_bytes() };
        let req = Req {
            method,
            path,
            query,
            content_type: "application/json",
            body: &body,
            user,
            server: "127.0.0.1:1",
            tokens,
            grants,
        };
        dispatch(store, &req)
    }

    fn json_of(r: Result<Outcome, ApiError>) -> (u16, Value) {
        match r {
            Ok(Outcome::Json(code, v)) => (code, v),
            Ok(_) => panic!("not a JSON answer"),
            Err(e) => (e.code, e.status()),
        }
    }

    fn tokens() -> Mutex<Tokens> {
        let mut t = Tokens::default();
        t.insert("node-token".into(), User::Node("n1".into()));
        t.insert(
            "alice-token".into(),
            User::from_info("alice", &["dev".into(), "system:authenticated".into()]),
        );
        Mutex::new(t)
    }

    const TR: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
    const SAR: &str = "/apis/authorization.k8s.io/v1/subjectaccessreviews";

    #[test]
    fn a_node_may_review_tokens_and_others_may_not() {
        let (mut store, tokens) = (Store::default(), tokens());
        let node = User::Node("n1".into());
        let review = |token: &str| json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}});
        let (code, v) = json_of(call(&mut store, &tokens, &[], &node, "POST", TR, &review("alice-token")));
        assert_eq!(code, 201, "{v}");
        assert_eq!(v["status"]["authenticated"], true);
        assert_eq!(
            v["status"]["user"],
            json!({"username": "alice", "groups": ["dev", "system:authenticated"]})
        );
        assert_eq!(v["status"]["audiences"], json!([API_AUDIENCE]));
        assert_eq!(v["spec"]["token"], "alice-token");
        let (code, v) = json_of(call(&mut store, &tokens, &[], &node, "POST", TR, &review("node-token")));
        assert_eq!((code, &v["status"]["user"]["username"]), (201, &json!("system:node:n1")));
        // Unknown: not authenticated (the real JSON omits a false `authenticated`), no error.
        let (code, v) = json_of(call(&mut store, &tokens, &[], &node, "POST", TR, &review("who-knows")));
        assert_eq!((code, &v["status"]), (201, &json!({"user": {}})));
        // A static token is not for another audience.
        let mut other_aud = review("alice-token");
        other_aud["spec"]["audiences"] = json!(["vault"]);
        let (_, v) = json_of(call(&mut store, &tokens, &[], &node, "POST", TR, &other_aud));
        assert!(v["status"].get("authenticated").is_none());
        let (code, v) = json_of(call(&mut store, &tokens, &[], &node, "POST", TR, &review("")));
        assert_eq!(
            (code, &v["message"]),
            (400, &json!("token is required for TokenReview in authentication"))
        );
        // Only masters, nodes and grantees may create them.
        let alice = User::from_info("alice", &["dev".into(), "system:authenticated".into()]);
        let (code, v) = json_of(call(&mut store, &tokens, &[], &alice, "POST", TR, &review("node-token")));
        assert_eq!(code, 403);
        assert_eq!(
            v["message"],
            "tokenreviews.authentication.k8s.io is forbidden: User \"alice\" cannot create resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope"
        );
        let grants = [Grant::new("dev", "create", "tokenreviews", None)];
        assert_eq!(
            json_of(call(&mut store, &tokens, &grants, &alice, "POST", TR, &review("node-token"))).0,
            201
        );
        assert_eq!(
            json_of(call(&mut store, &tokens, &[], &User::Admin, "POST", TR, &review("node-token"))).0,
            201
        );
        assert_eq!(json_of(call(&mut store, &tokens, &[], &User::Admin, "GET", TR, &Value::Null)).0, 405);
    }

    #[test]
    fn subject_access_reviews_answer_for_masters_grantees_and_the_rest() {
        let (mut store, tokens) = (Store::default(), tokens());
        let node = User::Node("n1".into());
        let sar = |user: &str, groups: &[&str], verb: &str, resource: &str, sub: &str| {
            json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {
                "user": user, "groups": groups,
                "resourceAttributes": {"verb": verb, "resource": resource, "subresource": sub, "namespace": "default", "name": "p"}}})
        };
        let grants = [Grant::new("alice", "get", "nodes", Some("proxy"))];
        let ask = |store: &mut Store, body: &Value| {
            json_of(call(store, &tokens, &grants, &node, "POST", SAR, body))
        };
        let (code, v) = ask(
            &mut store,
            &sar("kubernetes-admin", &["system:masters", "system:authenticated"], "get", "nodes", "proxy"),
        );
        assert_eq!((code, &v["status"]["allowed"]), (201, &json!(true)), "{v}");
        let (_, v) = ask(&mut store, &sar("alice", &["system:authenticated"], "get", "nodes", "proxy"));
        assert_eq!(v["status"]["allowed"], true, "{v}");
        let (_, v) = ask(&mut store, &sar("alice", &["system:authenticated"], "get", "nodes", "log"));
        assert_eq!(v["status"]["allowed"], false);
        assert!(v["status"].get("denied").is_none(), "no authorizer of Node,RBAC denies outright");
        assert!(v["status"]["reason"].as_str().is_some_and(|r| !r.is_empty()), "{v}");
        // A node subject gets the Node authorizer's rules and reasons.
        let (_, v) = ask(
            &mut store,
            &sar("system:node:n1", &["system:nodes", "system:authenticated"], "get", "secrets", ""),
        );
        assert_eq!(
            v["status"],
            json!({"allowed": false, "reason": "no relationship found between node 'n1' and this object"})
        );
        let (_, v) = ask(&mut store, &sar("system:node:n1", &["system:nodes"], "create", "tokenreviews", ""));
        // Resource attributes without a group mean the core group: tokenreviews is not there.
        assert_eq!(v["status"]["allowed"], false);
        let mut tr = sar("system:node:n1", &["system:nodes"], "create", "tokenreviews", "");
        tr["spec"]["resourceAttributes"]["group"] = json!("authentication.k8s.io");
        assert_eq!(ask(&mut store, &tr).1["status"]["allowed"], true);
        // Non-resource attributes.
        let nr = json!({"spec": {"user": "alice", "groups": ["system:authenticated"], "nonResourceAttributes": {"path": "/healthz", "verb": "get"}}});
        assert_eq!(ask(&mut store, &nr).1["status"]["allowed"], true);
        // Validation, as the registry does it.
        let (code, v) = ask(&mut store, &json!({"spec": {"user": "alice"}}));
        assert_eq!(code, 422, "{v}");
        let (code, v) = ask(&mut store, &json!({"spec": {"resourceAttributes": {"verb": "get"}}}));
        assert_eq!(code, 422);
        assert!(
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("at least one of user or group must be specified")),
            "{v}"
        );
        // Who may ask: not a bootstrapper.
        let boot = User::Bootstrap("abcdef".into());
        let body = sar("alice", &[], "get", "pods", "");
        assert_eq!(json_of(call(&mut store, &tokens, &[], &boot, "POST", SAR, &body)).0, 403);
    }
}
