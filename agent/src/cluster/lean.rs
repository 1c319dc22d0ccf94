//! Writes whose answer the agent does not need: the Lease renewal every 10 s, node status, pod
//! status. kube's typed `patch` asks for JSON and decodes the whole object the server sends back
//! (a Lease with its managed fields is about 550 bytes, a Node several KB). Here:
//! - the write goes on the lean connection ([`super::client::LeanWrite`]), whose HTTP/2 streams have
//!   no receive window: the server sends the response head, and its body waits for a window that
//!   never opens; a success is known from the status code, and the stream is then cancelled, so
//!   the object never crosses the link;
//! - a failure's `Status` is held back the same way, so a write refused with a 4xx is sent once
//!   more on the full connection, whose answer carries it; the caller gets the same
//!   `kube::Error::Api` a typed call returns (code, reason, message) and handles errors exactly as
//!   before. Such refusals are rare (a Lease deleted by hand, a pod gone), and repeating a merge
//!   patch that was refused is safe. A 429 or a 5xx is not repeated (an overloaded server is not
//!   asked twice; the caller's back-off retries): its error has the code and its reason only;
//! - the answer is asked for in the API server's protobuf encoding (about half the size of JSON),
//!   for a server that speaks only HTTP/1.1, where the body is read (the connection is reused only
//!   once it has been).

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::header::{ACCEPT, CONTENT_TYPE};
use kube::core::Status;

use super::client::LeanWrite;

/// Protobuf first; JSON for a server or resource that has no protobuf encoding (custom resources).
const ACCEPT_LEAN: &str = "application/vnd.kubernetes.protobuf, application/json";

/// A JSON merge patch of `path` (an API path, e.g. `/api/v1/nodes/<name>/status`), its answer
/// discarded.
pub async fn merge_patch(
    client: &kube::Client,
    path: &str,
    patch: &serde_json::Value,
) -> Result<(), kube::Error> {
    let body = serde_json::to_vec(patch).map_err(kube::Error::SerdeError)?;
    let request = |lean: bool| {
        let mut request = hyper::Request::patch(path)
            .header(CONTENT_TYPE, "application/merge-patch+json")
            .header(ACCEPT, ACCEPT_LEAN)
            .body(kube::client::Body::from(body.clone()))
            .map_err(kube::Error::HttpError)?;
        if lean {
            request.extensions_mut().insert(LeanWrite);
        }
        Ok::<_, kube::Error>(request)
    };
    let response = client.send(request(true)?).await?;
    let windowless = response.version() == hyper::Version::HTTP_2;
    if !windowless {
        return finish(response).await;
    }
    // Dropping the body cancels the stream (RST_STREAM): the server discards what it held back.
    let code = response.status();
    drop(response);
    if code.is_success() {
        return Ok(());
    }
    if code == hyper::StatusCode::TOO_MANY_REQUESTS || code.is_server_error() {
        // An overloaded or failing server is not asked twice: the caller retries with its own
        // back-off, and the code says what happened.
        return Err(held_back(code));
    }
    finish(client.send(request(false)?).await?).await
}

/// The error for a refusal whose `Status` stayed on the server: its code and the code's reason.
fn held_back(code: hyper::StatusCode) -> kube::Error {
    let reason = code.canonical_reason().unwrap_or("Failure").replace(' ', "");
    let message =
        format!("the API server answered {code} (its message is not downloaded on the write connection)");
    kube::Error::Api(Status::failure(&message, &reason).with_code(code.as_u16()).boxed())
}

/// `Ok` for a success, else the `Status` the body holds as `kube::Error::Api`; the body is read to
/// the end either way (an HTTP/1.1 connection is reused only then, an HTTP/2 stream's window is
/// returned only then).
async fn finish(response: hyper::Response<kube::client::Body>) -> Result<(), kube::Error> {
    let code = response.status();
    let is_protobuf = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/vnd.kubernetes.protobuf"));
    let body = response.into_body().collect().await?.to_bytes();
    if code.is_success() {
        return Ok(());
    }
    let status =
        if is_protobuf { decode_status(&body) } else { serde_json::from_slice::<Status>(&body).ok() };
    let status = status.unwrap_or_else(|| {
        Status::failure(String::from_utf8_lossy(&body).trim(), "Failed to parse error data")
    });
    Err(kube::Error::Api(status.with_code(code.as_u16()).boxed()))
}

/// The `metav1.Status` in an API server's protobuf answer: the `k8s\0` envelope around a
/// `runtime.Unknown` whose `raw` field holds the Status message. Only the fields a caller reads
/// (status, message, reason, code) are taken; `None` if the bytes are not that shape.
pub fn decode_status(body: &Bytes) -> Option<Status> {
    let unknown = body.strip_prefix(b"k8s\0")?;
    let raw = Fields(unknown).find_map(|f| match f {
        Ok((2, Value::Bytes(raw))) => Some(Ok(raw)),
        Err(()) => Some(Err(())),
        _ => None,
    })?;
    let raw = raw.ok()?;
    let mut status = Status::default();
    for field in Fields(raw) {
        match field.ok()? {
            (2, Value::Bytes(s)) => {
                status.status = match s {
                    b"Success" => Some(kube::core::response::StatusSummary::Success),
                    b"Failure" => Some(kube::core::response::StatusSummary::Failure),
                    _ => None,
                }
            }
            (3, Value::Bytes(s)) => status.message = String::from_utf8_lossy(s).into_owned(),
            (4, Value::Bytes(s)) => status.reason = String::from_utf8_lossy(s).into_owned(),
            (6, Value::Varint(code)) => status.code = u16::try_from(code).unwrap_or(0),
            _ => {}
        }
    }
    Some(status)
}

/// A protobuf field's value, as far as this reader needs to tell them apart.
enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// The fields of one protobuf message: `(number, value)`, or `Err` once the bytes are malformed.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Result<u64, ()> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.0.split_first().ok_or(())?;
            self.0 = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ()> {
        if n > self.0.len() {
            return Err(());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn field(&mut self) -> Result<(u64, Value<'a>), ()> {
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => self.take(8).map(|_| Value::Fixed)?,
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| ())?;
                Value::Bytes(self.take(len)?)
            }
            5 => self.take(4).map(|_| Value::Fixed)?,
            _ => return Err(()),
        };
        Ok((key >> 3, value))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Value<'a>), ()>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let field = self.field();
        if field.is_err() {
            // Nothing after a malformed field can be trusted.
            self.0 = &[];
        }
        Some(field)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn len_field(number: u8, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![(number << 3) | 2, u8::try_from(bytes.len()).expect("short")];
        out.extend_from_slice(bytes);
        out
    }

    /// A Status as the API server encodes it (field numbers from k8s.io/apimachinery's
    /// generated.proto: Status 2 status, 3 message, 4 reason, 6 code; Unknown 1 typeMeta, 2 raw).
    fn encoded(message: &str, reason: &str, code: u64) -> Bytes {
        let mut status = len_field(1, &[]);
        status.extend(len_field(2, b"Failure"));
        status.extend(len_field(3, message.as_bytes()));
        status.extend(len_field(4, reason.as_bytes()));
        status.push(6 << 3);
        let mut v = code;
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                status.push(byte);
                break;
            }
            status.push(byte | 0x80);
        }
        let mut unknown = len_field(1, &[]);
        unknown.extend(len_field(2, &status));
        unknown.extend(len_field(3, b""));
        unknown.extend(len_field(4, b""));
        let mut body = b"k8s\0".to_vec();
        body.extend(unknown);
        Bytes::from(body)
    }

    #[test]
    fn decodes_a_protobuf_status() {
        let status = decode_status(&encoded("leases \"x\" not found", "NotFound", 404)).expect("a status");
        assert_eq!(status.message, "leases \"x\" not found");
        assert_eq!(status.reason, "NotFound");
        assert_eq!(status.code, 404);
        assert_eq!(status.status, Some(kube::core::response::StatusSummary::Failure));
    }

    /// What a real kube-apiserver (1.20) answered to a PATCH of a missing Lease with this module's
    /// Accept header, byte for byte.
    #[test]
    fn decodes_what_a_real_api_server_sends() {
        let body = Bytes::from_static(
            b"k8s\x00\n\x0c\n\x02v1\x12\x06Status\x12\x82\x01\n\x06\n\x00\x12\x00\x1a\x00\x12\x07Failure\x1a2leases.coordination.k8s.io \"nonexistent\" not found\"\x08NotFound*.\n\x0bnonexistent\x12\x13coordination.k8s.io\x1a\x06leases(\x002\x000\x94\x03\x1a\x00\"\x00",
        );
        let status = decode_status(&body).expect("a status");
        assert_eq!(status.message, "leases.coordination.k8s.io \"nonexistent\" not found");
        assert_eq!(status.reason, "NotFound");
        assert_eq!(status.code, 404);
    }

    #[test]
    fn malformed_bytes_are_none_not_a_panic() {
        assert!(decode_status(&Bytes::from_static(b"{\"kind\":\"Status\"}")).is_none());
        assert!(decode_status(&Bytes::from_static(b"k8s\0\x12\x7f")).is_none());
        let mut body = encoded("m", "r", 10).to_vec();
        body.truncate(body.len() - 5);
        assert!(decode_status(&Bytes::from(body)).is_none());
        for cut in 0..20 {
            let body = encoded("message", "Reason", 100);
            let _ = decode_status(&body.slice(..cut.min(body.len())));
        }
    }
}
