//! The pod subresources the API server serves by calling the node's kubelet API: `log`
//! (`/containerLogs/…`), `exec`, `attach` (`/exec/…`, `/attach/…`) and `portforward`
//! (`/portForward/…`), as `pkg/registry/core/pod` does it.
//!
//! [`plan`] runs under the store lock and does what the REST handlers do before dialling: parse and
//! validate the options, find the pod and its container, the node, the node's address (the
//! default `--kubelet-preferred-address-types` order) and its kubelet port, and build the kubelet
//! URL with the options re-encoded as the kubelet takes them. [`proxy`] then dials it over TLS,
//! presenting the API server's kubelet client certificate (`CN=kube-apiserver-kubelet-client`,
//! `O=system:masters`, signed by the fake's CA) and not verifying the kubelet's serving
//! certificate (a cluster without `--kubelet-certificate-authority`), and streams the answer back
//! as it arrives. Only loopback addresses are ever dialled: anything else is refused before a
//! packet is sent.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::Body;
use super::errors::{ApiError, FieldError, field_error};
use super::store::{self, Res, Store};

/// The subresources served through the kubelet.
pub(crate) const SUBRESOURCES: &[&str] = &["log", "exec", "attach", "portforward"];

/// `--kubelet-preferred-address-types`' default.
pub(crate) const PREFERRED_ADDRESS_TYPES: [&str; 5] =
    ["Hostname", "InternalDNS", "InternalIP", "ExternalDNS", "ExternalIP"];

/// `--kubelet-port`'s default, used when a node reports no kubelet endpoint port.
const DEFAULT_KUBELET_PORT: u16 = 10250;

/// How much of a kubelet's error body the API server reads into its `Status`.
const MAX_ERROR_BODY: usize = 50_000;

static POD_LOG_OPTIONS: Res = Res {
    group: "",
    version: "v1",
    plural: "pods",
    kind: "PodLogOptions",
    namespaced: true,
    status: false,
    fields: &[],
};

/// Where and how to call the kubelet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// `log`, `exec`, `attach` or `portforward`.
    pub sub: String,
    pub pod: String,
    /// The node address chosen, as the node reports it (an IP or a name to resolve).
    pub host: String,
    pub port: u16,
    /// Path and query on the kubelet.
    pub path: String,
}

fn param<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// A boolean query parameter as the apiserver's parameter codec reads it: present and anything but
/// `0` or `false` is true.
fn flag(q: &[(String, String)], key: &str) -> bool {
    param(q, key).is_some_and(|v| v != "0" && !v.eq_ignore_ascii_case("false"))
}

fn int(q: &[(String, String)], key: &str) -> Result<Option<i64>, ApiError> {
    match param(q, key).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("strconv.ParseInt: parsing {v:?}: invalid syntax"))),
    }
}

/// `url.Values.Encode`: keys sorted, values in order, query-escaped.
pub(crate) fn encode(params: &[(&str, String)]) -> String {
    fn escape(s: &str) -> String {
        let mut out = String::new();
        for b in s.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
                b' ' => out.push('+'),
                _ => out.push_str(&format!("%{b:02X}")),
            }
        }
        out
    }
    let mut sorted: Vec<&(&str, String)> = params.iter().collect();
    sorted.sort_by_key(|(k, _)| *k);
    sorted.iter().map(|(k, v)| format!("{}={}", escape(k), escape(v))).collect::<Vec<_>>().join("&")
}

fn names(pod: &Value, list: &str) -> Vec<String> {
    pod.pointer(&format!("/spec/{list}"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("name").and_then(Value::as_str))
        .map(str::to_owned)
        .collect()
}

/// The container a request means (`validateContainer`, 1.20): the one named, which must exist
/// (init and ephemeral containers count), or the pod's only container.
pub(crate) fn container(pod: &Value, asked: Option<&str>) -> Result<String, ApiError> {
    let pod_name = pod.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
    let containers = names(pod, "containers");
    match asked.filter(|c| !c.is_empty()) {
        Some(c) => {
            let all = [names(pod, "initContainers"), names(pod, "ephemeralContainers")];
            if containers.iter().chain(all.iter().flatten()).any(|n| n == c) {
                Ok(c.to_owned())
            } else {
                Err(ApiError::bad_request(format!("container {c} is not valid for pod {pod_name}")))
            }
        }
        None => match containers.as_slice() {
            [one] => Ok(one.clone()),
            [] => {
                Err(ApiError::bad_request(format!("a container name must be specified for pod {pod_name}")))
            }
            many => {
                let mut msg = format!(
                    "a container name must be specified for pod {pod_name}, choose one of: [{}]",
                    many.join(" ")
                );
                let inits = names(pod, "initContainers");
                if !inits.is_empty() {
                    msg.push_str(&format!(" or one of the init containers: [{}]", inits.join(" ")));
                }
                Err(ApiError::bad_request(msg))
            }
        },
    }
}

/// The node address the API server dials (`GetPreferredNodeAddress`): the first address of the
/// first type in [`PREFERRED_ADDRESS_TYPES`] the node reports.
pub(crate) fn preferred_address(node: &Value) -> Result<String, ApiError> {
    let addresses: Vec<(&str, &str)> = node
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|a| {
            (
                a.get("type").and_then(Value::as_str).unwrap_or_default(),
                a.get("address").and_then(Value::as_str).unwrap_or_default(),
            )
        })
        .collect();
    for want in PREFERRED_ADDRESS_TYPES {
        if let Some((_, address)) = addresses.iter().find(|(t, _)| *t == want) {
            return Ok((*address).to_owned());
        }
    }
    let known: Vec<String> = addresses.iter().map(|(t, a)| format!("{{{t} {a}}}")).collect();
    Err(ApiError::unknown(
        500,
        format!("no preferred addresses found; known addresses: [{}]", known.join(" ")),
    ))
}

/// `GetConnectionInfo`: the node's preferred address and its kubelet port (the default port if it
/// reports none).
fn connection(store: &Store, node_name: &str) -> Result<(String, u16), ApiError> {
    let nodes = store::resource("", "nodes").ok_or_else(ApiError::no_route)?;
    let node = store.get(nodes, "", node_name).ok_or_else(|| ApiError::not_found(nodes, node_name))?;
    let host = preferred_address(node)?;
    let port =
        node.pointer("/status/daemonEndpoints/kubeletEndpoint/Port").and_then(Value::as_i64).unwrap_or(0);
    let port = match port {
        p if p <= 0 => DEFAULT_KUBELET_PORT,
        p => u16::try_from(p)
            .map_err(|_| ApiError::unknown(500, format!("dial tcp: address {p}: invalid port")))?,
    };
    Ok((host, port))
}

/// The PodLogOptions of a query, validated (`ValidatePodLogOptions`), as the kubelet's query.
fn log_query(q: &[(String, String)], pod: &str) -> Result<String, ApiError> {
    let (tail, since, limit) = (int(q, "tailLines")?, int(q, "sinceSeconds")?, int(q, "limitBytes")?);
    let since_time = match param(q, "sinceTime").filter(|v| !v.is_empty()) {
        None => None,
        Some(t) => Some(t.parse::<jiff::Timestamp>().map_err(|_| {
            ApiError::bad_request(format!(
                "parsing time {t:?} as \"2006-01-02T15:04:05Z07:00\": cannot parse {t:?} as \"2006\""
            ))
        })?),
    };
    let mut errs: Vec<FieldError> = vec![];
    if let Some(t) = tail.filter(|t| *t < 0) {
        errs.push(field_error(
            "tailLines",
            "FieldValueInvalid",
            format!("Invalid value: {t}: must be greater than or equal to 0"),
        ));
    }
    if let Some(l) = limit.filter(|l| *l < 1) {
        errs.push(field_error(
            "limitBytes",
            "FieldValueInvalid",
            format!("Invalid value: {l}: must be greater than 0"),
        ));
    }
    match (since, since_time) {
        (Some(_), Some(_)) => errs.push(field_error(
            "",
            "FieldValueForbidden",
            "Forbidden: at most one of `sinceTime` or `sinceSeconds` may be specified",
        )),
        (Some(s), None) if s < 1 => {
            errs.push(field_error(
                "sinceSeconds",
                "FieldValueInvalid",
                format!("Invalid value: {s}: must be greater than 0"),
            ));
        }
        _ => {}
    }
    if !errs.is_empty() {
        return Err(ApiError::invalid(&POD_LOG_OPTIONS, pod, &errs));
    }
    let mut params: Vec<(&str, String)> = vec![];
    for key in ["follow", "previous", "timestamps"] {
        if flag(q, key) {
            params.push((key, "true".into()));
        }
    }
    if let Some(s) = since {
        params.push(("sinceSeconds", s.to_string()));
    }
    if let Some(t) = since_time {
        params.push(("sinceTime", t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()));
    }
    if let Some(t) = tail {
        params.push(("tailLines", t.to_string()));
    }
    if let Some(l) = limit {
        params.push(("limitBytes", l.to_string()));
    }
    Ok(encode(&params))
}

/// `streamParams`: exec and attach flags as the kubelet reads them (`input`, `output`, `error`,
/// `tty` = `1`, and the command), port-forward ports as one `port` list.
fn stream_query(q: &[(String, String)], sub: &str) -> Result<String, ApiError> {
    let mut params: Vec<(&str, String)> = vec![];
    if sub == "portforward" {
        let mut ports = vec![];
        for (_, v) in q.iter().filter(|(k, _)| k == "ports") {
            for p in v.split(',') {
                let port: u16 = p.parse().map_err(|_| {
                    ApiError::bad_request(format!(
                        "cannot convert to []int32: strconv.ParseUint: parsing {p:?}: invalid syntax"
                    ))
                })?;
                ports.push(port.to_string());
            }
        }
        if !ports.is_empty() {
            params.push(("port", ports.join(",")));
        }
        return Ok(encode(&params));
    }
    for (ours, kubelet) in [("stdin", "input"), ("stdout", "output"), ("stderr", "error"), ("tty", "tty")] {
        if flag(q, ours) {
            params.push((kubelet, "1".into()));
        }
    }
    if sub == "exec" {
        params.extend(q.iter().filter(|(k, _)| k == "command").map(|(_, v)| ("command", v.clone())));
    }
    Ok(encode(&params))
}

/// What the REST handler of `pods/<sub>` does before it dials, under the store lock. `Ok(None)` is
/// a log request for a pod not yet bound to a node: the real server answers it `204 No Content`.
pub(crate) fn plan(
    store: &Store,
    ns: &str,
    name: &str,
    sub: &str,
    q: &[(String, String)],
) -> Result<Option<Plan>, ApiError> {
    let query = match sub {
        "log" => log_query(q, name)?,
        _ => stream_query(q, sub)?,
    };
    let pods = store::resource("", "pods").ok_or_else(ApiError::no_route)?;
    let pod = store.get(pods, ns, name).ok_or_else(|| ApiError::not_found(pods, name))?;
    let container = match sub {
        "portforward" => None,
        _ => Some(container(pod, param(q, "container"))?),
    };
    let node = pod.pointer("/spec/nodeName").and_then(Value::as_str).unwrap_or_default();
    if node.is_empty() {
        if sub == "log" {
            return Ok(None);
        }
        return Err(ApiError::bad_request(format!("pod {name} does not have a host assigned")));
    }
    let (host, port) = connection(store, node)?;
    let mut path = match (sub, container) {
        ("log", Some(c)) => format!("/containerLogs/{ns}/{name}/{c}"),
        ("portforward", _) => format!("/portForward/{ns}/{name}"),
        (s, c) => format!("/{s}/{ns}/{name}/{}", c.unwrap_or_default()),
    };
    if !query.is_empty() {
        path.push('?');
        path.push_str(&query);
    }
    Ok(Some(Plan { sub: sub.to_owned(), pod: name.to_owned(), host, port, path }))
}

/// `host:port`, IPv6 in brackets.
fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

/// The addresses to dial for a node address: an IP as it is, a name through the system resolver.
/// Anything outside the loopback range is refused: the fake never sends a packet off the machine.
pub(crate) async fn dial_targets(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let resolved: Vec<SocketAddr> = match host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>()
    {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("dial tcp: lookup {host}: {e}"))?
            .collect(),
    };
    let loopback: Vec<SocketAddr> =
        resolved.iter().copied().filter(|a| a.ip().to_canonical().is_loopback()).collect();
    if loopback.is_empty() {
        let all: Vec<String> = resolved.iter().map(|a| a.ip().to_string()).collect();
        return Err(format!(
            "the fake API server dials only loopback addresses, and node address {host:?} is [{}]",
            all.join(" ")
        ));
    }
    Ok(loopback)
}

/// Accepts any server certificate, as the API server does without `--kubelet-certificate-authority`
/// (the handshake's signatures are still checked, so the peer holds the certificate's key).
#[derive(Debug)]
pub(crate) struct AnyServerCert(pub Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A request as the proxy forwards it.
pub(crate) struct Forward<'a> {
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
    pub body: Bytes,
    /// The client connection's upgrade, for exec/attach/portforward over SPDY or WebSocket.
    pub upgrade: hyper::upgrade::OnUpgrade,
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

/// Hop-by-hop headers, which a proxy does not forward (except for an upgrade).
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// The kubelet's body, relayed frame by frame as it arrives (a `follow` stream included).
fn relay<K: Send + 'static>(body: Incoming, keep: K) -> Body {
    let frames = futures::stream::unfold((body, keep), |(mut body, keep)| async move {
        loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Some((Ok::<_, Infallible>(Frame::data(data)), (body, keep)));
                    }
                }
                // A kubelet that goes away mid-stream ends the response, as io.Copy would.
                _ => return None,
            }
        }
    });
    StreamBody::new(frames).boxed_unsync()
}

async fn read_limited(mut body: Incoming) -> String {
    let mut out = Vec::new();
    while out.len() < MAX_ERROR_BODY {
        match body.frame().await {
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    out.extend_from_slice(&d);
                }
            }
            _ => break,
        }
    }
    out.truncate(MAX_ERROR_BODY);
    String::from_utf8_lossy(&out).into_owned()
}

/// `GenericHttpResponseChecker` for `pods/log`: a kubelet error becomes a `Status` with the
/// kubelet's code.
pub(crate) fn kubelet_error(code: u16, body: &str, pod: &str) -> ApiError {
    match code {
        500 => return ApiError::internal(format!("Internal error occurred: {body}")),
        400 => return ApiError::bad_request(body),
        _ => {}
    }
    let (reason, message) = match code {
        409 => ("Conflict", "the server reported a conflict".to_owned()),
        404 => ("NotFound", "the server could not find the requested resource".to_owned()),
        401 => ("Unauthorized", "the server has asked for the client to provide credentials".to_owned()),
        403 => ("Forbidden", body.to_owned()),
        405 => ("MethodNotAllowed", "the server does not allow this method on the requested resource".to_owned()),
        406 => ("NotAcceptable", "the server was unable to respond with a content type that the client supports".to_owned()),
        415 => ("UnsupportedMediaType", "the server was unable to respond with a content type that the client supports".to_owned()),
        422 => ("Invalid", "the server rejected our request due to an error in our request".to_owned()),
        429 => ("TooManyRequests", "the server has received too many requests and has asked us to try again later".to_owned()),
        503 => ("ServiceUnavailable", "the server is currently unable to handle the request".to_owned()),
        504 => (
            "Timeout",
            "the server was unable to return a response in the time allotted, but may still be processing the request".to_owned(),
        ),
        c if c >= 500 => ("InternalError", format!("an error on the server ({body:?}) has prevented the request from succeeding")),
        c => ("", format!("the server responded with the status code {c} but did not return more information")),
    };
    ApiError::other(
        code,
        reason,
        format!("{message} ( pods/log {pod})"),
        Some(json!({"name": pod, "kind": "pods/log"})),
    )
}

/// Calls the kubelet for `plan`, presenting `tls`'s client certificate; returns the response to
/// send and its code. `pods/log` streams the body as `text/plain` and turns kubelet errors into a
/// `Status`; exec, attach and portforward pass the kubelet's status, headers and body through,
/// and an upgrade the kubelet accepts (`101`) is spliced to the client's connection.
pub(crate) async fn proxy(
    plan: Plan,
    tls: Arc<rustls::ClientConfig>,
    fwd: Forward<'_>,
    cancel: CancellationToken,
) -> Result<(u16, Response<Body>), ApiError> {
    let host_port = join_host_port(&plan.host, plan.port);
    let log = plan.sub == "log";
    let method = if log { Method::GET } else { fwd.method.clone() };
    let verb = {
        let m = method.as_str().to_ascii_lowercase();
        let mut c = m.chars();
        c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
    };
    let url = format!("https://{host_port}{}", plan.path);
    let fail = |e: String| ApiError::unknown(500, format!("{verb} {url:?}: {e}"));
    let targets = dial_targets(&plan.host, plan.port).await.map_err(fail)?;
    let mut last = String::new();
    let mut tcp = None;
    for addr in &targets {
        match tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                tcp = Some(s);
                break;
            }
            Ok(Err(e)) => last = format!("dial tcp {addr}: connect: {e}"),
            Err(_) => last = format!("dial tcp {addr}: i/o timeout"),
        }
    }
    let tcp = tcp.ok_or_else(|| fail(last))?;
    let bare = plan.host.trim_start_matches('[').trim_end_matches(']');
    let server_name = match bare.parse::<IpAddr>() {
        Ok(ip) => rustls_pki_types::ServerName::IpAddress(ip.into()),
        Err(_) => rustls_pki_types::ServerName::try_from(bare.to_owned()).map_err(|e| fail(e.to_string()))?,
    };
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(tls).connect(server_name, tcp),
    )
    .await
    .map_err(|_| fail("net/http: TLS handshake timeout".into()))?
    .map_err(|e| fail(format!("remote error: tls: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| fail(e.to_string()))?;
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = conn.with_upgrades() => {}
            _ = c.cancelled() => {}
        }
    });
    let upgrade = !log && is_upgrade(fwd.headers);
    let mut request = hyper::Request::builder().method(method).uri(&plan.path);
    if let Some(h) = request.headers_mut() {
        h.insert(header::HOST, HeaderValue::from_str(&host_port).map_err(|e| fail(e.to_string()))?);
        if !log {
            for (name, value) in fwd.headers {
                let skip = matches!(name.as_str(), "authorization" | "host" | "content-length")
                    || (hop_by_hop(name) && !(upgrade && matches!(name.as_str(), "connection" | "upgrade")));
                if !skip {
                    h.append(name.clone(), value.clone());
                }
            }
        }
    }
    let body = if log { Bytes::new() } else { fwd.body };
    let request = request.body(Full::new(body)).map_err(|e| fail(e.to_string()))?;
    let mut response = sender.send_request(request).await.map_err(|e| fail(e.to_string()))?;
    let code = response.status().as_u16();
    if log {
        if !(200..=206).contains(&code) {
            let text = read_limited(response.into_body()).await;
            return Err(kubelet_error(code, &text, &plan.pod));
        }
        let mut r = Response::new(relay(response.into_body(), sender));
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        return Ok((200, r));
    }
    if code == 101 && upgrade {
        let kubelet_side = hyper::upgrade::on(&mut response);
        let client_side = fwd.upgrade;
        let mut r = Response::new(Empty::new().boxed_unsync());
        *r.status_mut() = response.status();
        *r.headers_mut() = response.headers().clone();
        tokio::spawn(async move {
            let (a, b) = tokio::join!(client_side, kubelet_side);
            if let (Ok(a), Ok(b)) = (a, b) {
                let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                    _ = cancel.cancelled() => {}
                }
            }
        });
        return Ok((101, r));
    }
    let status = response.status();
    let headers = response.headers().clone();
    let mut r = Response::new(relay(response.into_body(), sender));
    *r.status_mut() = status;
    for (name, value) in &headers {
        if !hop_by_hop(name) && name != header::CONTENT_LENGTH {
            r.headers_mut().append(name.clone(), value.clone());
        }
    }
    Ok((code, r))
}

#[cfg(test)]
mod tests {
    use super::super::authz::User;
    use super::super::handler::Outcome;
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn pod(containers: &[&str], inits: &[&str]) -> Value {
        let list = |n: &[&str]| n.iter().map(|c| json!({"name": c, "image": "i"})).collect::<Vec<_>>();
        json!({"metadata": {"name": "p"}, "spec": {"containers": list(containers), "initContainers": list(inits)}})
    }

    #[test]
    fn the_container_is_the_named_one_or_the_only_one() {
        assert_eq!(container(&pod(&["a"], &[]), None).expect("only one"), "a");
        assert_eq!(container(&pod(&["a", "b"], &["i"]), Some("i")).expect("init counts"), "i");
        let e = container(&pod(&["a", "b"], &[]), None).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (400, "a container name must be specified for pod p, choose one of: [a b]")
        );
        let e = container(&pod(&["a", "b"], &["i"]), Some("")).unwrap_err();
        assert_eq!(
            e.message,
            "a container name must be specified for pod p, choose one of: [a b] or one of the init containers: [i]"
        );
        let e = container(&pod(&["a"], &[]), Some("x")).unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (400, "container x is not valid for pod p"));
    }

    #[test]
    fn the_address_follows_the_preferred_types_order() {
        let node = |addrs: &[(&str, &str)]| {
            let a: Vec<Value> = addrs.iter().map(|(t, a)| json!({"type": t, "address": a})).collect();
            json!({"status": {"addresses": a}})
        };
        let pick = |addrs: &[(&str, &str)]| preferred_address(&node(addrs));
        let all = [
            ("ExternalIP", "192.0.2.1"),
            ("ExternalDNS", "ext.example"),
            ("InternalIP", "127.0.0.2"),
            ("InternalDNS", "int.example"),
            ("Hostname", "vm"),
        ];
        assert_eq!(pick(&all).expect("hostname"), "vm");
        assert_eq!(pick(&all[..4]).expect("internal dns"), "int.example");
        assert_eq!(pick(&all[..3]).expect("internal ip"), "127.0.0.2");
        assert_eq!(pick(&all[..2]).expect("external dns"), "ext.example");
        assert_eq!(pick(&all[..1]).expect("external ip"), "192.0.2.1");
        let e = pick(&[("Weird", "x")]).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (500, "no preferred addresses found; known addresses: [{Weird x}]")
        );
    }

    #[test]
    fn log_options_are_validated_and_re_encoded_for_the_kubelet() {
        let ok = |pairs: &[(&str, &str)]| log_query(&q(pairs), "p").expect("valid");
        assert_eq!(
            ok(&[
                ("container", "c"),
                ("timestamps", "true"),
                ("follow", "1"),
                ("tailLines", "10"),
                ("limitBytes", "5"),
                ("previous", "false")
            ]),
            "follow=true&limitBytes=5&tailLines=10&timestamps=true"
        );
        assert_eq!(ok(&[("sinceTime", "2024-01-02T03:04:05+01:00")]), "sinceTime=2024-01-02T02%3A04%3A05Z");
        assert_eq!(ok(&[("sinceSeconds", "30")]), "sinceSeconds=30");
        let bad = |pairs: &[(&str, &str)]| log_query(&q(pairs), "p").unwrap_err();
        let e = bad(&[("tailLines", "-1")]);
        assert_eq!(e.code, 422);
        assert_eq!(
            e.message,
            "PodLogOptions \"p\" is invalid: tailLines: Invalid value: -1: must be greater than or equal to 0"
        );
        assert_eq!(bad(&[("sinceSeconds", "1"), ("sinceTime", "2024-01-01T00:00:00Z")]).code, 422);
        assert_eq!(bad(&[("limitBytes", "0")]).code, 422);
        assert_eq!(bad(&[("tailLines", "ten")]).code, 400);
    }

    #[test]
    fn exec_and_port_forward_options_take_the_kubelet_names() {
        let exec = q(&[
            ("stdout", "true"),
            ("stderr", "1"),
            ("command", "sh"),
            ("command", "-c"),
            ("command", "echo a b"),
            ("container", "c"),
        ]);
        assert_eq!(
            stream_query(&exec, "exec").expect("exec"),
            "command=sh&command=-c&command=echo+a+b&error=1&output=1"
        );
        assert_eq!(stream_query(&exec, "attach").expect("attach"), "error=1&output=1");
        let pf = q(&[("ports", "8080,9090"), ("ports", "53")]);
        assert_eq!(stream_query(&pf, "portforward").expect("ports"), "port=8080%2C9090%2C53");
        assert_eq!(stream_query(&q(&[("ports", "http")]), "portforward").unwrap_err().code, 400);
    }

    #[test]
    fn kubelet_errors_keep_their_code() {
        let e = kubelet_error(404, "container not found", "p");
        assert_eq!((e.code, e.reason), (404, "NotFound"));
        assert_eq!(e.message, "the server could not find the requested resource ( pods/log p)");
        let e = kubelet_error(400, "container \"c\" in pod \"p\" is waiting to start", "p");
        assert_eq!((e.code, e.message.as_str()), (400, "container \"c\" in pod \"p\" is waiting to start"));
        assert_eq!(
            kubelet_error(403, "Forbidden (user=x, verb=get, resource=nodes, subresource=proxy)", "p").reason,
            "Forbidden"
        );
        assert_eq!(kubelet_error(500, "boom", "p").message, "Internal error occurred: boom");
        assert_eq!(kubelet_error(502, "bad gateway", "p").reason, "InternalError");
    }

    /// A store with node `n1` (kubelet on `port`, or none reported) and pods: `p` (one container,
    /// on n1), `two` (two containers, on n1), `pending` (no node), `lost` (on a node that is gone).
    fn cluster(port: Option<u16>) -> Store {
        let mut store = Store::default();
        let nodes = store::resource("", "nodes").expect("nodes");
        let pods = store::resource("", "pods").expect("pods");
        let mut node = json!({"metadata": {"name": "n1"}, "status": {"addresses": [
            {"type": "InternalIP", "address": "192.0.2.7"}, {"type": "Hostname", "address": "localhost"}]}});
        if let Some(p) = port {
            node["status"]["daemonEndpoints"] = json!({"kubeletEndpoint": {"Port": p}});
        }
        store.create(nodes, "", node).expect("node");
        let pod = |name: &str, node: Option<&str>, containers: &[&str]| {
            let cs: Vec<Value> = containers.iter().map(|c| json!({"name": c, "image": "i"})).collect();
            let mut p = json!({"metadata": {"name": name}, "spec": {"containers": cs}});
            if let Some(n) = node {
                p["spec"]["nodeName"] = json!(n);
            }
            p
        };
        for p in [
            pod("p", Some("n1"), &["c"]),
            pod("two", Some("n1"), &["a", "b"]),
            pod("pending", None, &["c"]),
            pod("lost", Some("gone"), &["c"]),
        ] {
            store.create(pods, "default", p).expect("pod");
        }
        store
    }

    fn get(store: &mut Store, user: &User, path: &str) -> Result<Outcome, ApiError> {
        let tokens = std::sync::Mutex::new(super::super::authn::Tokens::default());
        super::super::review::tests::call(store, &tokens, &[], user, "GET", path, &Value::Null)
    }

    fn planned(r: Result<Outcome, ApiError>) -> Plan {
        match r {
            Ok(Outcome::Proxy(p)) => *p,
            Ok(_) => panic!("not a kubelet call"),
            Err(e) => panic!("{}: {}", e.code, e.message),
        }
    }

    #[test]
    fn pod_logs_need_get_pods_log() {
        let mut store = cluster(Some(10255));
        let e = get(&mut store, &User::Node("n1".into()), "/api/v1/namespaces/default/pods/p/log")
            .err()
            .expect("403");
        assert_eq!(e.code, 403);
        assert_eq!(
            e.message,
            "pods \"p\" is forbidden: User \"system:node:n1\" cannot get resource \"pods/log\" in API group \"\" in the namespace \"default\""
        );
        let e = get(&mut store, &User::Node("n2".into()), "/api/v1/namespaces/default/pods/p/log")
            .err()
            .expect("403");
        assert_eq!(e.code, 403);
        // Authorization comes first: a missing pod is 403 too for whoever may not read logs.
        let e = get(&mut store, &User::Node("n1".into()), "/api/v1/namespaces/default/pods/nope/log")
            .err()
            .expect("403");
        assert_eq!(e.code, 403);
    }

    #[test]
    fn pod_logs_find_the_container_the_node_and_its_kubelet() {
        let mut store = cluster(Some(10255));
        let admin = User::Admin;
        let plan =
            planned(get(&mut store, &admin, "/api/v1/namespaces/default/pods/p/log?follow=true&tailLines=3"));
        assert_eq!(
            plan,
            Plan {
                sub: "log".into(),
                pod: "p".into(),
                host: "localhost".into(),
                port: 10255,
                path: "/containerLogs/default/p/c?follow=true&tailLines=3".into(),
            }
        );
        let plan = planned(get(&mut store, &admin, "/api/v1/namespaces/default/pods/two/log?container=b"));
        assert_eq!(plan.path, "/containerLogs/default/two/b");
        let e = get(&mut store, &admin, "/api/v1/namespaces/default/pods/two/log").err().expect("400");
        assert_eq!(
            (e.code, e.message.as_str()),
            (400, "a container name must be specified for pod two, choose one of: [a b]")
        );
        let e = get(&mut store, &admin, "/api/v1/namespaces/default/pods/nope/log").err().expect("404");
        assert_eq!((e.code, e.message.as_str()), (404, "pods \"nope\" not found"));
        let e = get(&mut store, &admin, "/api/v1/namespaces/default/pods/lost/log").err().expect("404");
        assert_eq!((e.code, e.message.as_str()), (404, "nodes \"gone\" not found"));
        // Not on a node yet: the real server's empty stream, 204.
        assert!(matches!(
            get(&mut store, &admin, "/api/v1/namespaces/default/pods/pending/log"),
            Ok(Outcome::Text(204, ""))
        ));
        // Validation comes before the pod.
        let e = get(&mut store, &admin, "/api/v1/namespaces/default/pods/nope/log?tailLines=-1")
            .err()
            .expect("422");
        assert_eq!(e.code, 422);
        // No port reported: the default kubelet port.
        let mut store = cluster(None);
        assert_eq!(planned(get(&mut store, &admin, "/api/v1/namespaces/default/pods/p/log")).port, 10250);
    }

    #[test]
    fn exec_attach_and_port_forward_plan_their_kubelet_paths() {
        let mut store = cluster(Some(10255));
        let tokens = std::sync::Mutex::new(super::super::authn::Tokens::default());
        let mut post = |user: &User, path: &str| {
            super::super::review::tests::call(&mut store, &tokens, &[], user, "POST", path, &Value::Null)
        };
        let plan =
            planned(post(&User::Admin, "/api/v1/namespaces/default/pods/p/exec?command=date&stdout=true"));
        assert_eq!(plan.path, "/exec/default/p/c?command=date&output=1");
        let plan =
            planned(post(&User::Admin, "/api/v1/namespaces/default/pods/two/attach?container=a&stdin=1"));
        assert_eq!(plan.path, "/attach/default/two/a?input=1");
        let plan = planned(post(&User::Admin, "/api/v1/namespaces/default/pods/two/portforward?ports=80"));
        assert_eq!(plan.path, "/portForward/default/two?port=80");
        let e = post(&User::Admin, "/api/v1/namespaces/default/pods/pending/exec?command=date")
            .err()
            .expect("400");
        assert_eq!((e.code, e.message.as_str()), (400, "pod pending does not have a host assigned"));
        let e = post(&User::Node("n1".into()), "/api/v1/namespaces/default/pods/p/exec?command=date")
            .err()
            .expect("403");
        assert!(e.message.contains("cannot create resource \"pods/exec\""), "{}", e.message);
        let e = post(&User::Admin, "/api/v1/namespaces/default/pods/p/log").err().expect("405");
        assert_eq!(e.code, 405);
    }

    #[tokio::test]
    async fn only_loopback_addresses_are_dialled() {
        assert_eq!(
            dial_targets("127.0.0.1", 1).await.expect("loopback"),
            [SocketAddr::from(([127, 0, 0, 1], 1))]
        );
        assert!(dial_targets("::1", 1).await.is_ok());
        assert!(dial_targets("localhost", 1).await.expect("localhost").iter().all(|a| a.ip().is_loopback()));
        for far in ["192.0.2.1", "10.0.0.1", "2001:db8::1"] {
            let e = dial_targets(far, 1).await.unwrap_err();
            assert!(e.contains("only loopback"), "{e}");
        }
    }
}
