//! Failures as the API server reports them: a `metav1.Status` with the real reason, code, details
//! and message wording, so a client that branches on any of them sees what a real cluster sends.

use serde_json::{Value, json};

use super::store::Res;

/// One field error of a `422 Invalid`: field path, machine reason (`FieldValueRequired`), message.
pub(crate) type FieldError = (String, &'static str, String);

/// A [`FieldError`].
pub(crate) fn field_error(
    field: impl Into<String>,
    reason: &'static str,
    message: impl Into<String>,
) -> FieldError {
    (field.into(), reason, message.into())
}

/// An API error; [`ApiError::status`] is its JSON body.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: String, details: Option<Value>) -> ApiError {
        ApiError { code, reason, message, details }
    }

    /// `details` as the apiserver fills them for an object error: the resource, not the kind.
    fn object_details(res: &Res, name: &str) -> Value {
        let mut d = json!({ "name": name, "kind": res.plural });
        if !res.group.is_empty() {
            d["group"] = json!(res.group);
        }
        d
    }

    /// `pods "x" not found`.
    pub fn not_found(res: &Res, name: &str) -> ApiError {
        let msg = format!("{} \"{name}\" not found", res.qualified());
        ApiError::new(404, "NotFound", msg, Some(Self::object_details(res, name)))
    }

    /// `pods "x" already exists`.
    pub fn already_exists(res: &Res, name: &str) -> ApiError {
        let msg = format!("{} \"{name}\" already exists", res.qualified());
        ApiError::new(409, "AlreadyExists", msg, Some(Self::object_details(res, name)))
    }

    /// `Operation cannot be fulfilled on pods "x": <why>`.
    pub fn conflict(res: &Res, name: &str, why: &str) -> ApiError {
        let msg = format!("Operation cannot be fulfilled on {} \"{name}\": {why}", res.qualified());
        ApiError::new(409, "Conflict", msg, Some(Self::object_details(res, name)))
    }

    /// The optimistic-concurrency conflict of an update carrying a stale resourceVersion.
    pub fn stale(res: &Res, name: &str) -> ApiError {
        Self::conflict(
            res,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// A UID precondition (delete options, or `metadata.uid` in an update) that names another object.
    pub fn uid_mismatch(res: &Res, name: &str, wanted: &str, actual: &str) -> ApiError {
        Self::conflict(
            res,
            name,
            &format!(
                "the UID in the precondition ({wanted}) does not match the UID in record ({actual}). \
                 The object might have been deleted and then recreated"
            ),
        )
    }

    /// A resourceVersion precondition of a delete that is not the current one.
    pub fn rv_mismatch(res: &Res, name: &str, wanted: &str, actual: &str) -> ApiError {
        Self::conflict(
            res,
            name,
            &format!(
                "the ResourceVersion in the precondition ({wanted}) does not match the ResourceVersion \
                 in record ({actual}). The object might have been modified"
            ),
        )
    }

    /// `Pod "x" is invalid: field: detail`, with one cause per field error. `reason` is the cause's
    /// machine reason, e.g. `FieldValueRequired`.
    pub fn invalid(res: &Res, name: &str, errors: &[FieldError]) -> ApiError {
        let text: Vec<String> = errors.iter().map(|(field, _, msg)| format!("{field}: {msg}")).collect();
        let joined = if text.len() == 1 { text[0].clone() } else { format!("[{}]", text.join(", ")) };
        let kind =
            if res.group.is_empty() { res.kind.to_owned() } else { format!("{}.{}", res.kind, res.group) };
        let msg = format!("{kind} \"{name}\" is invalid: {joined}");
        let causes: Vec<Value> = errors
            .iter()
            .map(|(field, reason, msg)| json!({ "reason": reason, "message": msg, "field": field }))
            .collect();
        let mut d = json!({ "name": name, "kind": res.kind, "causes": causes });
        if !res.group.is_empty() {
            d["group"] = json!(res.group);
        }
        ApiError::new(422, "Invalid", msg, Some(d))
    }

    /// `pods "x" is forbidden: <why>` (`pods is forbidden: …` without a name).
    pub fn forbidden(res: &Res, name: &str, why: &str) -> ApiError {
        let msg = if name.is_empty() {
            format!("{} is forbidden: {why}", res.qualified())
        } else {
            format!("{} \"{name}\" is forbidden: {why}", res.qualified())
        };
        ApiError::new(403, "Forbidden", msg, Some(Self::object_details(res, name)))
    }

    /// The Node authorizer's refusal while its graph lacks the edge from a pod just bound to
    /// `node` to the object at `path` (`/api/v1/namespaces/<ns>/<resource>/<name>`).
    pub fn node_graph_lag(node: &str, path: &str) -> ApiError {
        let path = path.split('?').next().unwrap_or(path);
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (ns, resource, name) = match parts.as_slice() {
            ["api", "v1", "namespaces", ns, resource, name, ..] => (*ns, *resource, *name),
            _ => ("", "", ""),
        };
        let msg = format!(
            "{resource} \"{name}\" is forbidden: User \"system:node:{node}\" cannot get resource \"{resource}\" \
             in API group \"\" in the namespace \"{ns}\": no relationship found between node '{node}' and this object"
        );
        ApiError::new(403, "Forbidden", msg, Some(json!({ "name": name, "kind": resource })))
    }

    /// `410 Gone` with reason `Expired`, as a watch from a compacted resourceVersion reports it.
    pub fn expired(message: String) -> ApiError {
        ApiError::new(410, "Expired", message, None)
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message.into(), None)
    }

    /// 401.
    pub fn unauthorized() -> ApiError {
        ApiError::new(401, "Unauthorized", "Unauthorized".into(), None)
    }

    /// 404 for a path that names no resource.
    pub fn no_route() -> ApiError {
        ApiError::new(404, "NotFound", "the server could not find the requested resource".into(), None)
    }

    /// 405.
    pub fn method_not_allowed(method: &str) -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
            None,
        )
    }

    /// 413.
    pub fn too_large() -> ApiError {
        ApiError::new(413, "RequestEntityTooLarge", "Request entity too large: limit is 3145728".into(), None)
    }

    /// 415 for a patch type the fake does not implement.
    pub fn unsupported_media(content_type: &str) -> ApiError {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({content_type}) - accepted media types \
                 include: application/merge-patch+json, application/strategic-merge-patch+json"
            ),
            None,
        )
    }

    /// An error that is not a `metav1.Status` inside the apiserver (a dial failure, a plain Go
    /// error): `code` with an empty reason (`StatusReasonUnknown`) and the error's text.
    pub fn unknown(code: u16, message: impl Into<String>) -> ApiError {
        ApiError::new(code, "", message.into(), None)
    }

    /// Any status, for errors relayed from elsewhere (a kubelet's answer).
    pub fn other(code: u16, reason: &'static str, message: String, details: Option<Value>) -> ApiError {
        ApiError::new(code, reason, message, details)
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, "InternalError", message.into(), None)
    }

    /// An error with `code` and the reason the apiserver pairs with it; used by fault injection.
    pub fn injected(code: u16) -> ApiError {
        let reason = match code {
            400 => "BadRequest",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "NotFound",
            405 => "MethodNotAllowed",
            409 => "Conflict",
            410 => "Gone",
            422 => "Invalid",
            429 => "TooManyRequests",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "InternalError",
        };
        ApiError::new(code, reason, format!("injected fault ({code} {reason})"), None)
    }

    /// The `metav1.Status` body.
    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "code": self.code,
        });
        // `reason` is omitted when empty, as `omitempty` does.
        if !self.reason.is_empty() {
            s["reason"] = json!(self.reason);
        }
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}
