//! The agent's link to the API server as a metered board pays for it: writes whose answer the agent
//! does not need (the Lease renewal, node and pod status) never bring that answer down, and share
//! one long-lived connection. An HTTP/2 server over TLS (as the kube-apiserver speaks) counts the
//! bytes it sends and the connections it accepts; the agent's own client and lean write path are
//! driven against it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The object a successful write is answered with: far larger than everything else the exchange
/// sends, so a body that crossed the link cannot hide in the count.
const ANSWER: usize = 256 * 1024;

#[derive(Default)]
struct Counts {
    /// Bytes the server wrote to its sockets (TLS records included): what a board downloads.
    down: AtomicU64,
    connections: AtomicU64,
    /// PATCH requests received.
    patches: AtomicU64,
}

/// A server socket that counts what it writes.
struct Counted {
    inner: tokio::net::TcpStream,
    counts: Arc<Counts>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.counts.down.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A TLS server offering only `h2`: `/ok` answers 200 with [`ANSWER`] bytes of object; `/busy`
/// 503 and `/missing` 404, each with the JSON `Status` the kube-apiserver sends. Returns its port
/// and CA (PEM).
async fn h2_server(counts: Arc<Counts>) -> (u16, String) {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("CA key");
    let mut params = rcgen::CertificateParams::new(vec![]).expect("CA params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = params.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::new(params, ca_key);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counts.connections.fetch_add(1, Ordering::Relaxed);
            let (acceptor, counts) = (acceptor.clone(), counts.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(Counted { inner: tcp, counts: counts.clone() }).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let counts = counts.clone();
                    async move {
                        if req.method() == hyper::Method::PATCH {
                            counts.patches.fetch_add(1, Ordering::Relaxed);
                        }
                        let response = match req.uri().path() {
                            "/busy" => Response::builder()
                                .status(StatusCode::SERVICE_UNAVAILABLE)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from_static(
                                    br#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"the server is overloaded","reason":"ServiceUnavailable","code":503}"#,
                                ))),
                            "/ok" => Response::builder()
                                .header("content-type", "application/vnd.kubernetes.protobuf")
                                .body(Full::new(Bytes::from(vec![b'x'; ANSWER]))),
                            _ => Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from_static(
                                    br#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"leases.coordination.k8s.io \"board\" not found","reason":"NotFound","details":{"name":"board","kind":"leases"},"code":404}"#,
                                ))),
                        };
                        Ok::<_, std::convert::Infallible>(response.expect("response"))
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (port, ca_cert.pem())
}

async fn client(port: u16, ca_pem: &str) -> kube::Client {
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "board",
        "clusters": [{"name": "c", "cluster": {
            "server": format!("https://127.0.0.1:{port}"),
            "certificate-authority-data": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, ca_pem),
        }}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "board", "context": {"cluster": "c", "user": "u"}}],
    });
    let kc: kube::config::Kubeconfig = serde_json::from_value(kubeconfig).expect("kubeconfig");
    lichen::cluster::client::client_for(kc).await.expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lean_writes_never_download_their_answer_and_share_one_connection() {
    let counts = Arc::new(Counts::default());
    let (port, ca) = h2_server(counts.clone()).await;
    let client = client(port, &ca).await;
    let patch = serde_json::json!({"spec": {"renewTime": "2026-12-06T00:00:00.000000Z"}});

    const WRITES: u64 = 20;
    for _ in 0..WRITES {
        lichen::cluster::lean::merge_patch(&client, "/ok", &patch).await.expect("a successful write");
    }
    let down = counts.down.load(Ordering::Relaxed);
    println!("{WRITES} lean writes answered with {ANSWER} B each: {down} B down in all");
    assert!(
        down < ANSWER as u64 / 4,
        "{down} B came down for {WRITES} writes: an answer's body crossed the link"
    );
    assert_eq!(counts.connections.load(Ordering::Relaxed), 1, "every write on one connection");

    // A full read still gets its body, on the other connection.
    let body = client
        .send(Request::get("/ok").body(kube::client::Body::empty()).expect("request"))
        .await
        .expect("a read");
    let bytes = http_body_util::BodyExt::collect(body.into_body()).await.expect("body").to_bytes();
    assert_eq!(bytes.len(), ANSWER, "a read's answer arrives whole");
    assert_eq!(counts.connections.load(Ordering::Relaxed), 2, "reads and writes each keep one connection");

    // A refused write carries the server's reason and message, as a typed call's error does.
    let before = counts.patches.load(Ordering::Relaxed);
    match lichen::cluster::lean::merge_patch(&client, "/missing", &patch).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (404, "NotFound"), "{s:?}");
            assert_eq!(s.message, r#"leases.coordination.k8s.io "board" not found"#);
        }
        other => panic!("a 404 must come back as the API's Status, got {other:?}"),
    }
    assert_eq!(
        counts.patches.load(Ordering::Relaxed),
        before + 2,
        "the lean try, then once more on the full connection"
    );

    // An overloaded server is not asked twice: the caller's back-off retries.
    let before = counts.patches.load(Ordering::Relaxed);
    match lichen::cluster::lean::merge_patch(&client, "/busy", &patch).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (503, "ServiceUnavailable"), "{s:?}")
        }
        other => panic!("a 503 must come back as an API error, got {other:?}"),
    }
    assert_eq!(counts.patches.load(Ordering::Relaxed), before + 1, "a 503 is not repeated");
    assert_eq!(counts.connections.load(Ordering::Relaxed), 2, "no new connection for an error");
}

/// Requests racing on a new client (as at start: the registration, the pod watch, the Lease and
/// the first status writes) share one connection per pool instead of each opening its own before
/// ALPN has said the server speaks HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_racing_at_start_open_one_connection_per_pool() {
    let counts = Arc::new(Counts::default());
    let (port, ca) = h2_server(counts.clone()).await;
    let client = client(port, &ca).await;
    let patch = serde_json::json!({"spec": {"renewTime": "2026-12-06T00:00:00.000000Z"}});

    const EACH: usize = 8;
    let reads = (0..EACH).map(|_| {
        let client = client.clone();
        tokio::spawn(async move {
            let response = client
                .send(Request::get("/ok").body(kube::client::Body::empty()).expect("request"))
                .await
                .expect("a read");
            http_body_util::BodyExt::collect(response.into_body()).await.expect("body").to_bytes().len()
        })
    });
    let writes = (0..EACH).map(|_| {
        let (client, patch) = (client.clone(), patch.clone());
        tokio::spawn(async move { lichen::cluster::lean::merge_patch(&client, "/ok", &patch).await.is_ok() })
    });
    let (reads, writes): (Vec<_>, Vec<_>) = (reads.collect(), writes.collect());
    for read in reads {
        assert_eq!(read.await.expect("read task"), ANSWER, "a read's answer arrives whole");
    }
    for write in writes {
        assert!(write.await.expect("write task"), "a successful write");
    }
    let connections = counts.connections.load(Ordering::Relaxed);
    println!("{EACH} reads and {EACH} lean writes at once on a new client: {connections} connections");
    assert_eq!(connections, 2, "one connection for the reads, one for the lean writes");
}
