//! The fake end to end, over HTTPS: pod logs and exec through a stand-in kubelet, the review APIs
//! with the tokens the fake issues and the ones a test registers, kubelet-serving CSRs.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{AsyncBufReadExt, StreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, LogParams, PostParams};
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};

use super::FakeApi;

/// What the stand-in kubelet saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    cn: String,
    orgs: Vec<String>,
}

/// A kubelet API on 127.0.0.1: a self-signed serving certificate (which the API server must not
/// verify), client certificates required and verified against the cluster CA, as a kubelet with
/// `authentication.x509.clientCAFile` does.
struct StandIn {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Lets the followed log write its second line.
    release: Arc<tokio::sync::Notify>,
}

type TestBody = UnsyncBoxBody<Bytes, Infallible>;

fn text(code: u16, body: &'static str) -> Response<TestBody> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed_unsync());
    *r.status_mut() = hyper::StatusCode::from_u16(code).expect("status");
    r
}

/// A certificate's subject CN and Os.
fn subject_of(der: &[u8]) -> (String, Vec<String>) {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return Default::default() };
    let cn = cert.subject().iter_common_name().next().and_then(|a| a.as_str().ok()).unwrap_or_default();
    let orgs =
        cert.subject().iter_organization().filter_map(|a| a.as_str().ok()).map(str::to_owned).collect();
    (cn.to_owned(), orgs)
}

async fn stand_in_kubelet(ca_pem: &str) -> StandIn {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("self-signed");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("CA"))
        .expect("root");
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .expect("verifier");
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let release = Arc::new(tokio::sync::Notify::new());
    let (s, r) = (seen.clone(), release.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(tls) = acceptor.accept(tcp).await else { continue };
            let (cn, orgs) = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| subject_of(c.as_ref()))
                .unwrap_or_default();
            let (s, r) = (s.clone(), r.clone());
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
                s.lock().expect("seen").push(Seen {
                    method: req.method().to_string(),
                    path: path.clone(),
                    cn: cn.clone(),
                    orgs: orgs.clone(),
                });
                let r = r.clone();
                async move {
                    let p = path.split('?').next().unwrap_or_default();
                    Ok::<_, Infallible>(match p {
                        "/containerLogs/default/p/c" => {
                            let lines = futures::stream::unfold(0, move |step| {
                                let r = r.clone();
                                async move {
                                    let line = match step {
                                        0 => "first line\n",
                                        1 => {
                                            r.notified().await;
                                            "second line\n"
                                        }
                                        _ => return None,
                                    };
                                    Some((
                                        Ok::<_, Infallible>(Frame::data(Bytes::from_static(line.as_bytes()))),
                                        step + 1,
                                    ))
                                }
                            });
                            let mut resp = Response::new(StreamBody::new(lines).boxed_unsync());
                            resp.headers_mut().insert("content-type", "text/plain".parse().expect("header"));
                            resp
                        }
                        "/containerLogs/default/p/gone" => text(404, "container \"gone\" not found"),
                        p if p.starts_with("/exec/") => {
                            text(400, "this kubelet does not serve exec: upgrade required")
                        }
                        _ => text(404, "404 page not found"),
                    })
                }
            });
            tokio::spawn(async move {
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
            });
        }
    });
    StandIn { port, seen, release }
}

/// A TLS fake with a stand-in kubelet for node `n1` (reporting an unreachable InternalIP and the
/// hostname `localhost`, which the preferred order picks), pod `p` on it (containers `c` and
/// `gone`), and node `far` (an ExternalIP only) with pod `q`.
async fn cluster() -> (FakeApi, StandIn) {
    let api = FakeApi::start_tls().await;
    let kubelet = stand_in_kubelet(&api.ca_pem()).await;
    let nodes: Api<Node> = Api::all(api.client());
    let node = |name: &str, addresses: Value, port: u16| -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "status": {"addresses": addresses, "daemonEndpoints": {"kubeletEndpoint": {"Port": port}}},
        }))
        .expect("node")
    };
    let n1 = node(
        "n1",
        json!([{"type": "InternalIP", "address": "192.0.2.7"}, {"type": "Hostname", "address": "localhost"}]),
        kubelet.port,
    );
    nodes.create(&PostParams::default(), &n1).await.expect("create n1");
    let far = node("far", json!([{"type": "ExternalIP", "address": "192.0.2.1"}]), kubelet.port);
    nodes.create(&PostParams::default(), &far).await.expect("create far");
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    for (name, node, containers) in [("p", "n1", vec!["c", "gone"]), ("q", "far", vec!["c"])] {
        let cs: Vec<Value> = containers.iter().map(|c| json!({"name": c, "image": "i"})).collect();
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name}, "spec": {"nodeName": node, "containers": cs},
        }))
        .expect("pod");
        pods.create(&PostParams::default(), &pod).await.expect("create pod");
    }
    (api, kubelet)
}

#[tokio::test]
async fn logs_stream_through_the_kubelet_with_the_apiserver_client_certificate() {
    let (api, kubelet) = cluster().await;
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    let lp = LogParams {
        container: Some("c".into()),
        follow: true,
        tail_lines: Some(5),
        since_seconds: Some(60),
        timestamps: true,
        ..LogParams::default()
    };
    let mut lines = pods.log_stream("p", &lp).await.expect("log stream").lines();
    let first =
        tokio::time::timeout(Duration::from_secs(10), lines.next()).await.expect("first line in time");
    assert_eq!(first.expect("a line").expect("readable"), "first line");
    // The kubelet has not sent the second line yet: the first came through as it was written.
    kubelet.release.notify_one();
    let second =
        tokio::time::timeout(Duration::from_secs(10), lines.next()).await.expect("second line in time");
    assert_eq!(second.expect("a line").expect("readable"), "second line");
    assert!(
        tokio::time::timeout(Duration::from_secs(10), lines.next()).await.expect("end in time").is_none()
    );

    let seen = kubelet.seen.lock().expect("seen").clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].method, "GET");
    assert_eq!(
        seen[0].path,
        "/containerLogs/default/p/c?follow=true&sinceSeconds=60&tailLines=5&timestamps=true"
    );
    assert_eq!(
        (seen[0].cn.as_str(), seen[0].orgs.as_slice()),
        ("kube-apiserver-kubelet-client", &["system:masters".to_owned()][..])
    );

    let record = api
        .requests()
        .into_iter()
        .find(|r| r.path_only() == "/api/v1/namespaces/default/pods/p/log")
        .expect("recorded");
    assert_eq!((record.code, record.user.as_str()), (200, "kubernetes-admin"));
    assert_eq!(record.query("follow").as_deref(), Some("true"));
}

#[tokio::test]
async fn kubelet_errors_refusals_and_exec_reach_the_client() {
    let (api, kubelet) = cluster().await;
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    let status = |e: kube::Error| match e {
        kube::Error::Api(s) => (s.code, s.message),
        other => panic!("not an API error: {other}"),
    };
    // The kubelet's 404 keeps its code.
    let e = pods
        .logs("p", &LogParams { container: Some("gone".into()), ..LogParams::default() })
        .await
        .unwrap_err();
    assert_eq!(status(e), (404, "the server could not find the requested resource ( pods/log p)".to_owned()));
    // Two containers and none named.
    let e = pods.logs("p", &LogParams::default()).await.unwrap_err();
    assert_eq!(
        status(e),
        (400, "a container name must be specified for pod p, choose one of: [c gone]".to_owned())
    );
    // A node off the loopback range is never dialled.
    let e = pods.logs("q", &LogParams::default()).await.unwrap_err();
    let (code, message) = status(e);
    assert_eq!(code, 500);
    assert!(message.contains("only loopback") && message.contains("192.0.2.1"), "{message}");
    // A node may not read pod logs.
    let node_pods: Api<Pod> = Api::namespaced(api.node_client("n1").await, "default");
    let e = node_pods
        .logs("p", &LogParams { container: Some("c".into()), ..LogParams::default() })
        .await
        .unwrap_err();
    assert_eq!(status(e).0, 403);
    // exec: a plain request, the kubelet's refusal passed back as it is.
    let req = Request::post("/api/v1/namespaces/default/pods/p/exec?container=c&command=date&stdout=true")
        .body(kube::client::Body::from(Vec::new()))
        .expect("request");
    let resp = api.client().send(req).await.expect("sent");
    assert_eq!(resp.status().as_u16(), 400);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body.as_ref(), b"this kubelet does not serve exec: upgrade required");

    let seen = kubelet.seen.lock().expect("seen").clone();
    let paths: Vec<(&str, &str)> = seen.iter().map(|s| (s.method.as_str(), s.path.as_str())).collect();
    assert_eq!(
        paths,
        [("GET", "/containerLogs/default/p/gone"), ("POST", "/exec/default/p/c?command=date&output=1")]
    );
    let records: Vec<(String, u16)> = api
        .requests()
        .iter()
        .filter(|r| r.path_only().ends_with("/log") || r.path_only().ends_with("/exec"))
        .map(|r| (r.path_only().trim_start_matches("/api/v1/namespaces/default/pods/").to_owned(), r.code))
        .collect();
    let want = [("p/log", 404), ("p/log", 400), ("q/log", 500), ("p/log", 403), ("p/exec", 400)];
    assert_eq!(records, want.map(|(p, c)| (p.to_owned(), c)));
}

async fn post_json(client: &kube::Client, path: &str, body: Value) -> Value {
    let req = Request::post(path)
        .header("content-type", "application/json")
        .body(body.to_string().into_bytes())
        .expect("request");
    client.request::<Value>(req).await.expect("created")
}

#[tokio::test]
async fn reviews_know_the_fakes_tokens_and_the_tests() {
    let (api, _kubelet) = cluster().await;
    let node = api.node_client("n1").await;
    api.add_user_token("alice-token", "alice", &["dev"]);
    let review = |token: &str| json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}});
    let v = post_json(&node, "/apis/authentication.k8s.io/v1/tokenreviews", review("alice-token")).await;
    assert_eq!(v["status"]["user"], json!({"username": "alice", "groups": ["dev", "system:authenticated"]}));
    // A bound service account token, valid while its pod is there.
    let p: Api<Pod> = Api::namespaced(api.client(), "default");
    let uid = p.get("p").await.expect("pod").metadata.uid.expect("uid");
    let tr = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
        "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "p", "uid": uid}}});
    let issued =
        post_json(&api.client(), "/api/v1/namespaces/default/serviceaccounts/default/token", tr).await;
    let sa_token = issued["status"]["token"].as_str().expect("token").to_owned();
    let v = post_json(&node, "/apis/authentication.k8s.io/v1/tokenreviews", review(&sa_token)).await;
    assert_eq!(v["status"]["authenticated"], true, "{v}");
    assert_eq!(v["status"]["user"]["username"], "system:serviceaccount:default:default");
    assert_eq!(v["status"]["user"]["extra"]["authentication.kubernetes.io/pod-uid"], json!([uid]));
    // The registered user authenticates requests; what it may do is what it is granted.
    let kubeconfig = tempfile::tempdir().expect("dir");
    let path = api.admin_kubeconfig(kubeconfig.path());
    let text = std::fs::read_to_string(&path).expect("kubeconfig");
    let admin_token =
        text.lines().find_map(|l| l.trim().strip_prefix("token: ")).expect("token line").to_owned();
    let alice_config = text.replace(&admin_token, "alice-token");
    let kc = kube::config::Kubeconfig::from_yaml(&alice_config).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .expect("config");
    let alice = kube::Client::try_from(config).expect("client");
    let alice_pods: Api<Pod> = Api::namespaced(alice, "default");
    let lp = LogParams { container: Some("gone".into()), ..LogParams::default() };
    assert!(matches!(alice_pods.logs("p", &lp).await, Err(kube::Error::Api(s)) if s.code == 403));
    api.grant("dev", "get", "pods", Some("log"));
    assert!(
        matches!(alice_pods.logs("p", &lp).await, Err(kube::Error::Api(s)) if s.code == 404),
        "granted: the kubelet's 404"
    );
    // SubjectAccessReviews see the grant too.
    let sar = json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {
        "user": "alice", "groups": ["dev", "system:authenticated"],
        "resourceAttributes": {"verb": "get", "resource": "pods", "subresource": "log", "namespace": "default", "name": "p"}}});
    let v = post_json(&node, "/apis/authorization.k8s.io/v1/subjectaccessreviews", sar).await;
    assert_eq!(v["status"]["allowed"], true, "{v}");
    // The pod goes, its token with it.
    p.delete("p", &kube::api::DeleteParams { grace_period_seconds: Some(0), ..Default::default() })
        .await
        .expect("delete");
    let v = post_json(&node, "/apis/authentication.k8s.io/v1/tokenreviews", review(&sa_token)).await;
    assert_eq!(v["status"], json!({"user": {}, "error": "Token has been invalidated"}));
    assert!(api.requests().iter().any(|r| r.path_only() == "/apis/authentication.k8s.io/v1/tokenreviews"
        && r.code == 201
        && r.user == "system:node:n1"));
}

#[tokio::test]
async fn kubelet_serving_csrs_wait_for_an_operator() {
    use base64::Engine;
    let api = FakeApi::start_tls().await;
    let csrs: Api<CertificateSigningRequest> = Api::all(api.node_client("n1").await);
    let usages = ["digital signature", "key encipherment", "server auth"];
    let create = |name: &'static str, cn: &'static str, usages: Vec<&'static str>| {
        let csrs = csrs.clone();
        async move {
            let pem = super::certs::tests::csr_pem(cn, &["system:nodes"], &["localhost", "127.0.0.1"]);
            let csr: CertificateSigningRequest = serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": {"request": base64::engine::general_purpose::STANDARD.encode(pem),
                         "signerName": "kubernetes.io/kubelet-serving", "usages": usages},
            }))
            .expect("csr");
            csrs.create(&PostParams::default(), &csr).await.expect("accepted")
        }
    };
    create("good", "system:node:n1", usages.to_vec()).await;
    create("client-usage", "system:node:n1", vec!["digital signature", "key encipherment", "client auth"])
        .await;
    create("other-node", "system:node:n2", usages.to_vec()).await;
    // The controller-manager's approver (every 100 ms here) leaves them alone.
    tokio::time::sleep(Duration::from_millis(400)).await;
    for name in ["good", "client-usage", "other-node"] {
        let c = csrs.get(name).await.expect("csr");
        assert!(
            c.status.is_none_or(|s| s.conditions.is_none_or(|c| c.is_empty()) && s.certificate.is_none()),
            "{name}"
        );
    }
    assert_eq!(api.approve_serving_csrs(), 1);
    assert_eq!(api.approve_serving_csrs(), 0);
    let good = csrs.get("good").await.expect("good").status.expect("status");
    assert_eq!(good.conditions.expect("conditions")[0].reason.as_deref(), Some("KubectlApprove"));
    let pem = good.certificate.expect("certificate").0;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem).expect("pem");
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).expect("x509");
    assert!(cert.extended_key_usage().expect("eku").expect("present").value.server_auth);
    assert_eq!(cert.subject_alternative_name().expect("san").expect("present").value.general_names.len(), 2);
    let failed =
        csrs.get("client-usage").await.expect("csr").status.expect("status").conditions.expect("conditions");
    let types: Vec<(&str, Option<&str>)> =
        failed.iter().map(|c| (c.type_.as_str(), c.reason.as_deref())).collect();
    assert_eq!(types, [("Approved", Some("KubectlApprove")), ("Failed", Some("SignerValidationFailure"))]);
    assert!(
        csrs.get("other-node")
            .await
            .expect("csr")
            .status
            .is_none_or(|s| s.conditions.is_none_or(|c| c.is_empty()))
    );
}
