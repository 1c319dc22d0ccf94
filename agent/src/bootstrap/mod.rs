//! Zero-touch join and certificate rotation: a bootstrap token buys the node a client certificate
//! through a CertificateSigningRequest, and the node renews that certificate itself before it
//! expires, as the kubelet's TLS bootstrapping does.
//!
//! It owns `<state_dir>/pki/` and `<state_dir>/node.kubeconfig` ([`NodePki`]). It creates only
//! CertificateSigningRequests and reads only those it created; it never touches pods or the Node.
//! The bootstrap token is held in memory only for the join, never logged, and its file is deleted
//! after success when Lichen owns it.

pub mod pki;
pub mod rotation;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio_util::sync::CancellationToken;

pub use pki::NodePki;

use crate::config::AgentConfig;
pub use crate::token::BootstrapToken;

/// Why joining or renewing failed. Each message says what the operator can do about it.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The cluster CA file holds no certificate.
    #[error("{path}: holds no PEM certificate; give the cluster CA (ca.crt)")]
    NoCaCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A PEM file cannot be parsed.
    #[error("{path}: unreadable PEM: {source}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the PEM reader said.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A kubeconfig cannot be read or parsed.
    #[error("{path}: {source}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// The node kubeconfig lacks a part Lichen wrote into it.
    #[error("{path}: {missing}")]
    KubeconfigIncomplete {
        /// The file.
        path: PathBuf,
        /// What is missing (`no server`, …).
        missing: &'static str,
    },
    /// A base64 field of a kubeconfig does not decode.
    #[error("{path}: {field}: {source}")]
    Base64 {
        /// The file.
        path: PathBuf,
        /// The field, and what it should be.
        field: &'static str,
        /// The decoder's complaint.
        #[source]
        source: base64::DecodeError,
    },
    /// The certificate expired while the node was offline and no bootstrap token is at hand.
    #[error(
        "{path}: the node's client certificate expired while the node could not renew it (offline). \
         To let it join again, put a new bootstrap token (`kubeadm token create`) in {} \
         with join.server and join.ca_cert configured; Lichen retries on its own",
        token_file.display()
    )]
    ExpiredOffline {
        /// The node kubeconfig.
        path: PathBuf,
        /// Where a new token would be read from.
        token_file: PathBuf,
    },
    /// The renewed kubeconfig does not give a client.
    #[error("{path}: {source}")]
    Connect {
        /// The node kubeconfig.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::cluster::client::ClientError,
    },
    /// Key or CSR generation failed (a bug or a broken random source).
    #[error("cannot generate the node key or CSR: {0}")]
    Crypto(#[source] rcgen::Error),
    /// No bootstrap token is available.
    #[error(
        "no bootstrap token: set LICHEN_JOIN_TOKEN, put it in {token_file} (mode 0600), or run \
         `lichen join --token-file FILE`; create one on the control plane with `kubeadm token create`"
    )]
    NoToken {
        /// Where Lichen looked for it.
        token_file: PathBuf,
    },
    /// The bootstrap token file holds a malformed token.
    #[error("bootstrap token: {}: {source}", path.display())]
    BadTokenFile {
        /// The token file.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::token::BadToken,
    },
    /// The API server could not be reached or refused a request.
    #[error("{what}: {}", crate::api_error::brief(.source))]
    Api {
        /// The request.
        what: String,
        /// The error.
        #[source]
        source: kube::Error,
    },
    /// The bootstrap kubeconfig Lichen writes in memory does not parse (a bug, or a server URL
    /// YAML cannot hold).
    #[error("cannot build a client for {server}: {source}")]
    ClientConfig {
        /// The API server.
        server: String,
        /// Why.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// The client could not be built.
    #[error("cannot build a client for {server}: {source}")]
    Client {
        /// The API server.
        server: String,
        /// Why.
        #[source]
        source: crate::cluster::client::ClientError,
    },
    /// Nobody approved (or the signer did not sign) in time.
    #[error(
        "certificate signing request {name} was not approved and signed within {waited_secs}s; approve it with \
         `kubectl certificate approve {name}`, or make the controller-manager auto-approve node client CSRs \
         (bind the ClusterRole system:certificates.k8s.io:certificatesigningrequests:nodeclient to the group \
         system:bootstrappers, and selfnodeclient to system:nodes for renewals)"
    )]
    NotApproved {
        /// The CSR's name.
        name: String,
        /// How long Lichen waited.
        waited_secs: u64,
    },
    /// The CSR was denied or failed.
    #[error("certificate signing request {name} was {verdict}: {reason} {message}")]
    Denied {
        /// The CSR's name.
        name: String,
        /// `Denied` or `Failed`.
        verdict: String,
        /// The condition's reason.
        reason: String,
        /// The condition's message.
        message: String,
    },
    /// The signer returned something that is not a usable certificate.
    #[error("certificate signing request {name} returned an unusable certificate: {source}")]
    BadCertificate {
        /// The CSR's name.
        name: String,
        /// Why.
        #[source]
        source: pki::CertificateError,
    },
    /// The shutdown token fired.
    #[error("cancelled")]
    Cancelled,
}

fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> BootstrapError {
    let what = what.into();
    move |source| BootstrapError::Api { what, source }
}

/// Where a bootstrap token came from, so success can clean it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `join.token`, `LICHEN_JOIN_TOKEN` or `lichen join --token`.
    Value,
    /// A file.
    File(PathBuf),
}

/// Finds the bootstrap token: the value if given, else the token file.
pub fn find_token(
    value: Option<&BootstrapToken>,
    file: &Path,
) -> Result<(BootstrapToken, TokenSource), BootstrapError> {
    if let Some(token) = value {
        return Ok((token.clone(), TokenSource::Value));
    }
    match std::fs::read_to_string(file) {
        Ok(text) => {
            let t = BootstrapToken::parse(&text)
                .map_err(|source| BootstrapError::BadTokenFile { path: file.to_owned(), source })?;
            Ok((t, TokenSource::File(file.to_owned())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(BootstrapError::NoToken { token_file: file.to_owned() })
        }
        Err(source) => Err(BootstrapError::File { path: file.to_owned(), source }),
    }
}

/// What joining needs.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    /// The node's name.
    pub node_name: String,
    /// `https://…` of the API server.
    pub server: String,
    /// The cluster CA file.
    pub ca_cert: PathBuf,
    /// The token.
    pub token: BootstrapToken,
    /// Where it came from.
    pub token_source: TokenSource,
    /// How long to wait for approval and signing.
    pub approval_timeout: Duration,
    /// The state directory.
    pub state_dir: PathBuf,
}

/// Builds a client from kubeconfig text held in memory (the bootstrap token never touches disk).
async fn client_from_text(server: &str, text: &str) -> Result<Client, BootstrapError> {
    let kc = kube::config::Kubeconfig::from_yaml(text)
        .map_err(|source| BootstrapError::ClientConfig { server: server.to_owned(), source })?;
    crate::cluster::client::client_for(kc)
        .await
        .map_err(|source| BootstrapError::Client { server: server.to_owned(), source })
}

/// Joins: asks for a node client certificate with the bootstrap token, waits for it, installs it
/// in `<state_dir>/pki/` with `<state_dir>/node.kubeconfig`, and deletes a token file under
/// `state_dir`. Returns the node kubeconfig's path.
pub async fn join(req: &JoinRequest, cancel: &CancellationToken) -> Result<PathBuf, BootstrapError> {
    let ca_pem = std::fs::read(&req.ca_cert)
        .map_err(|source| BootstrapError::File { path: req.ca_cert.clone(), source })?;
    pki::check_ca_pem(&req.ca_cert, &ca_pem)?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&ca_pem);
    let q = |s: &str| serde_json::Value::from(s).to_string();
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority-data: {b64}\n\
         users:\n- name: bootstrap\n  user:\n    token: {}\n\
         contexts:\n- name: c\n  context: {{cluster: c, user: bootstrap}}\ncurrent-context: c\n",
        q(&req.server),
        q(&req.token.bearer()),
    );
    let client = client_from_text(&req.server, &text).await?;
    tracing::info!(
        node = %req.node_name,
        server = %req.server,
        token_id = req.token.id(),
        "joining with a bootstrap token: requesting a node client certificate"
    );
    let (key_pem, cert_pem) =
        request_certificate(&client, &req.node_name, req.approval_timeout, cancel).await?;
    let pki = NodePki::new(&crate::layout::StateLayout::new(&req.state_dir));
    let kubeconfig = pki.install(&req.node_name, &req.server, &ca_pem, &key_pem, &cert_pem)?;
    tracing::info!(kubeconfig = %kubeconfig.display(), "joined: node client certificate installed");
    forget_token(&req.token_source, &req.state_dir);
    Ok(kubeconfig)
}

/// After a successful join the token has no further use on this board: delete its file when
/// Lichen owns it, and otherwise say where it still is.
fn forget_token(source: &TokenSource, state_dir: &Path) {
    match source {
        TokenSource::File(f) if f.starts_with(state_dir) => match std::fs::remove_file(f) {
            Ok(()) => {
                tracing::info!(file = %f.display(), "deleted the bootstrap token: it is no longer needed")
            }
            Err(e) => {
                tracing::warn!(file = %f.display(), error = %e, "cannot delete the bootstrap token file; delete it by hand")
            }
        },
        TokenSource::File(f) => tracing::warn!(
            file = %f.display(),
            "the bootstrap token is no longer needed; delete this file (Lichen only deletes token files under its state_dir)"
        ),
        TokenSource::Value => tracing::warn!(
            "the bootstrap token is no longer needed; remove join.token from the config file or LICHEN_JOIN_TOKEN from the environment"
        ),
    }
}

/// Creates a CSR for a new key as `system:node:<node>` and waits until it is signed. Returns the
/// key (PEM) and the certificate (PEM).
pub async fn request_certificate(
    client: &Client,
    node: &str,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<(String, Vec<u8>), BootstrapError> {
    let request = pki::new_node_request(node)?;
    let kind = CsrKind {
        prefix: format!("node-csr-{node}-"),
        signer: pki::KUBELET_CLIENT_SIGNER,
        usages: &pki::KUBELET_CLIENT_USAGES,
        poll_every: Duration::from_millis(500),
    };
    request_signed(client, request, kind, timeout, cancel).await
}

/// What kind of certificate a CSR asks for.
pub struct CsrKind {
    /// `metadata.generateName`.
    pub prefix: String,
    /// `spec.signerName`.
    pub signer: &'static str,
    /// `spec.usages`.
    pub usages: &'static [&'static str],
    /// How often to look for the verdict: briefly for a join, which approvers answer in seconds;
    /// seldom for requests a person approves, so hundreds of waiting boards stay cheap.
    pub poll_every: Duration,
}

/// Creates a CSR for `request` and waits until it is signed (or denied, or `timeout`). Returns the
/// key (PEM) and the certificate (PEM).
pub async fn request_signed(
    client: &Client,
    request: pki::KeyAndRequest,
    kind: CsrKind,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<(String, Vec<u8>), BootstrapError> {
    let poll_every = kind.poll_every;
    let csrs: Api<CertificateSigningRequest> = Api::all(client.clone());
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta { generate_name: Some(kind.prefix), ..Default::default() },
        spec: CertificateSigningRequestSpec {
            request: ByteString(request.csr_pem.clone().into_bytes()),
            signer_name: kind.signer.into(),
            usages: Some(kind.usages.iter().map(|u| (*u).to_owned()).collect()),
            ..Default::default()
        },
        status: None,
    };
    let created = csrs
        .create(&PostParams::default(), &csr)
        .await
        .map_err(api("creating the certificate signing request"))?;
    let name = created.metadata.name.unwrap_or_default();
    tracing::info!(csr = %name, "certificate signing request created; waiting for approval and signing");
    let started = tokio::time::Instant::now();
    let mut logged_wait = false;
    loop {
        match csrs.get(&name).await {
            Ok(csr) => {
                let status = csr.status.unwrap_or_default();
                for c in status.conditions.iter().flatten() {
                    if matches!(c.type_.as_str(), "Denied" | "Failed") && c.status == "True" {
                        return Err(BootstrapError::Denied {
                            name,
                            verdict: c.type_.to_lowercase(),
                            reason: c.reason.clone().unwrap_or_default(),
                            message: c.message.clone().unwrap_or_default(),
                        });
                    }
                }
                if let Some(cert) = status.certificate.filter(|c| !c.0.is_empty()) {
                    let validity = pki::validity_of_pem(&cert.0)
                        .map_err(|source| BootstrapError::BadCertificate { name: name.clone(), source })?;
                    tracing::info!(csr = %name, not_after = %validity.not_after, "certificate issued");
                    return Ok((request.key_pem, cert.0));
                }
            }
            Err(e) => {
                let resource = format!("certificatesigningrequests {name}");
                tracing::debug!(error = %crate::api_error::failed("get", &resource, &e), "cannot read the CSR yet; retrying")
            }
        }
        if started.elapsed() >= timeout {
            return Err(BootstrapError::NotApproved { name, waited_secs: timeout.as_secs() });
        }
        if !logged_wait && started.elapsed() >= Duration::from_secs(30) {
            logged_wait = true;
            tracing::warn!(
                csr = %name,
                "the CSR is still not approved; if the cluster does not auto-approve node CSRs, run `kubectl certificate approve {name}`"
            );
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(BootstrapError::Cancelled),
            _ = tokio::time::sleep(poll_every) => {}
        }
    }
}

/// The credentials to start with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// A kubeconfig the operator gave and Lichen does not manage.
    Given(PathBuf),
    /// Lichen's own `node.kubeconfig`, which it renews.
    Managed(PathBuf),
}

impl Credentials {
    /// The kubeconfig file.
    pub fn path(&self) -> &Path {
        match self {
            Credentials::Given(p) | Credentials::Managed(p) => p,
        }
    }
}

/// Why a kubeconfig cannot be used to run with.
#[derive(Debug, thiserror::Error)]
pub enum Unusable {
    /// There is no kubeconfig.
    #[error("{} does not exist", .0.display())]
    Missing(PathBuf),
    /// Its client certificate expired.
    #[error("the client certificate in {} expired at {not_after}", path.display())]
    Expired {
        /// The kubeconfig.
        path: PathBuf,
        /// When the certificate expired.
        not_after: jiff::Timestamp,
    },
    /// Its client certificate cannot be read as one.
    #[error("the client certificate in {}: {source}", path.display())]
    Certificate {
        /// The kubeconfig.
        path: PathBuf,
        /// Why.
        #[source]
        source: pki::CertificateError,
    },
    /// The kubeconfig authenticates otherwise (only where one is required).
    #[error("{} has no client certificate", .0.display())]
    NoClientCertificate(PathBuf),
    /// The kubeconfig or its certificate file cannot be read.
    #[error(transparent)]
    Unreadable(#[from] BootstrapError),
}

/// The validity of the client certificate a kubeconfig authenticates with; one is required.
pub fn client_certificate_validity(kubeconfig: &Path) -> Result<pki::Validity, Unusable> {
    let pem = pki::kubeconfig_client_cert(kubeconfig)?
        .ok_or_else(|| Unusable::NoClientCertificate(kubeconfig.to_owned()))?;
    pki::validity_of_pem(&pem).map_err(|source| Unusable::Certificate { path: kubeconfig.to_owned(), source })
}

/// Whether a kubeconfig exists and its client certificate (if it has one) is still valid.
pub fn usable(kubeconfig: &Path, now: jiff::Timestamp) -> Result<(), Unusable> {
    if !kubeconfig.exists() {
        return Err(Unusable::Missing(kubeconfig.to_owned()));
    }
    let path = kubeconfig.to_owned();
    match pki::kubeconfig_client_cert(kubeconfig)? {
        Some(pem) => match pki::validity_of_pem(&pem) {
            Ok(v) if v.expired(now) => Err(Unusable::Expired { path, not_after: v.not_after }),
            Ok(_) => Ok(()),
            Err(source) => Err(Unusable::Certificate { path, source }),
        },
        None => Ok(()),
    }
}

/// Decides which credentials to run with, joining first when needed: `kubeconfig` if it is set
/// and usable; else, with `[join]`, Lichen's own node kubeconfig if it is usable, or a fresh join
/// with the bootstrap token. Failures are logged with what to do, and retried with back-off until
/// `cancel` (static pods keep running meanwhile). Returns `None` on cancellation.
pub async fn credentials(config: &AgentConfig, cancel: &CancellationToken) -> Option<Credentials> {
    let managed = config.layout().node_kubeconfig();
    let given = (!config.kubeconfig.as_os_str().is_empty()).then(|| config.kubeconfig.clone());
    if !config.join.enabled() {
        // Without `[join]`, a node that joined earlier (`lichen join`) keeps its own credentials.
        return given
            .map(Credentials::Given)
            .or_else(|| managed.exists().then_some(Credentials::Managed(managed)));
    }
    let mut backoff = crate::retry::RetryBackoff::new(Duration::from_secs(5), Duration::from_secs(300));
    loop {
        let now = jiff::Timestamp::now();
        if let Some(g) = &given {
            match usable(g, now) {
                Ok(()) => return Some(Credentials::Given(g.clone())),
                Err(why) => {
                    tracing::warn!(reason = %why, "kubeconfig is not usable; joining with [join] instead")
                }
            }
        }
        match usable(&managed, now) {
            Ok(()) => return Some(Credentials::Managed(managed)),
            Err(why) if managed.exists() => {
                tracing::warn!(reason = %why, "the node's credentials are not usable; joining again with the bootstrap token")
            }
            Err(_) => {}
        }
        let result = match find_token(config.join.token(), &config.join.token_file) {
            Ok((token, token_source)) => {
                let req = JoinRequest {
                    node_name: config.node_name.clone(),
                    server: config.join.server.clone(),
                    ca_cert: config.join.ca_cert.clone(),
                    token,
                    token_source,
                    approval_timeout: Duration::from_secs(config.join.approval_timeout_secs),
                    state_dir: config.state_dir.clone(),
                };
                join(&req, cancel).await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(path) => return Some(Credentials::Managed(path)),
            Err(BootstrapError::Cancelled) => return None,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::error!(error = %e, retry_in_secs = delay.as_secs(), "cannot join the cluster; static pods keep running");
                tokio::select! {
                    _ = cancel.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tokens_say_where_to_put_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("bootstrap-token");
        let e = find_token(None, &file).expect_err("no token").to_string();
        assert!(e.contains("LICHEN_JOIN_TOKEN") && e.contains("kubeadm token create"), "{e}");
        std::fs::write(&file, "abcdef.0123456789abcdef\n").expect("write");
        assert_eq!(find_token(None, &file).expect("file").1, TokenSource::File(file.clone()));
        assert_eq!(
            find_token(Some(&BootstrapToken::parse("abcdef.0123456789abcdef").expect("token")), &file)
                .expect("value")
                .1,
            TokenSource::Value
        );
        forget_token(&TokenSource::File(file.clone()), dir.path());
        assert!(!file.exists(), "a token file under state_dir is deleted after the join");
    }
}
