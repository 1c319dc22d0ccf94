//! The fake's certificate side, for its TLS mode: a real CA (rcgen on ring) that issues the
//! server's certificate and signs approved CSRs, the CSR approver of the controller-manager
//! (`csrapproving`, with Kubernetes 1.20's exact-usages rule), and client-certificate
//! authentication as the kube-apiserver does it (CN = user name, O = groups).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use x509_parser::prelude::FromDer;

use super::authz::User;

/// The usages 1.20's approver requires, exactly (current releases also take the set without key
/// encipherment; the agent must send what both accept).
const KUBELET_CLIENT_USAGES: [&str; 3] = ["key encipherment", "digital signature", "client auth"];
const SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";

/// The cluster CA and the TLS server configuration built on it.
pub(crate) struct FakeCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// The CA certificate, PEM (what `--ca-cert` / `certificate-authority-data` carry).
    pub ca_pem: String,
    pub server_config: Arc<rustls::ServerConfig>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl FakeCa {
    /// A new CA, and a server certificate for 127.0.0.1 signed by it. Client certificates are
    /// optional (tokens still work) and, when sent, must chain to this CA and be valid now.
    pub fn new() -> FakeCa {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("CA key");
        let mut params = rcgen::CertificateParams::new(vec![]).expect("CA params");
        params.distinguished_name.push(rcgen::DnType::CommonName, "fake-kubernetes-ca");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let ca_cert = params.self_signed(&ca_key).expect("CA certificate");
        let ca_pem = ca_cert.pem();
        let issuer = rcgen::Issuer::new(params, ca_key);

        let server_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("server key");
        let mut sp = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("server params");
        sp.distinguished_name.push(rcgen::DnType::CommonName, "kube-apiserver");
        sp.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = sp.signed_by(&server_key, &issuer).expect("server certificate");

        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).expect("CA root");
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .allow_unauthenticated()
                .build()
                .expect("client verifier");
        let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into());
        let server_config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![server_cert.der().clone(), ca_cert.der().clone()], key_der)
            .expect("server config");
        let mut server_config = server_config;
        server_config.alpn_protocols = vec![b"http/1.1".to_vec()];
        FakeCa { issuer, ca_pem, server_config: Arc::new(server_config) }
    }

    /// Signs a CSR (PEM) as a client certificate valid from a minute ago for `lifetime`.
    pub fn sign(&self, csr_pem: &str, lifetime: Duration) -> Result<String, String> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| e.to_string())?;
        let now = time::OffsetDateTime::now_utc();
        // Backdated like the real signer (5 minutes), so a clock a little behind still accepts it;
        // less for the short lives of rotation tests, whose point is the lifetime itself.
        let backdate = lifetime.min(Duration::from_secs(6000)) / 20;
        csr.params.not_before = now - time::Duration::milliseconds(backdate.as_millis() as i64);
        csr.params.not_after = now + time::Duration::milliseconds(lifetime.as_millis() as i64);
        csr.params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        csr.params.key_usages =
            vec![rcgen::KeyUsagePurpose::DigitalSignature, rcgen::KeyUsagePurpose::KeyEncipherment];
        csr.signed_by(&self.issuer).map(|c| c.pem()).map_err(|e| e.to_string())
    }
}

/// The subject of a PKCS#10 request or a certificate: (CN, [O]).
fn subject(name: &x509_parser::x509::X509Name) -> (String, Vec<String>) {
    let cn = name.iter_common_name().next().and_then(|a| a.as_str().ok()).unwrap_or_default().to_owned();
    let orgs = name.iter_organization().filter_map(|a| a.as_str().ok()).map(str::to_owned).collect();
    (cn, orgs)
}

/// Who a verified client certificate authenticates as: nodes only (`O=system:nodes`,
/// `CN=system:node:<name>`); anything else is an unknown user.
/// Also returns the certificate's `notAfter` (Unix seconds): the real server checks it on every
/// request, not only at the handshake, so a connection opened before expiry stops working after.
pub(crate) fn user_of_cert(der: &[u8]) -> Option<(User, i64)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let (cn, orgs) = subject(cert.subject());
    let node = cn.strip_prefix("system:node:")?;
    let not_after = cert.validity().not_after.timestamp();
    orgs.iter().any(|o| o == "system:nodes").then(|| (User::Node(node.to_owned()), not_after))
}

/// The CSR approver's verdict on a CSR object: `Ok` to approve, `Err(why)` to leave it pending,
/// as the controller-manager does for requests it does not recognise.
pub(crate) fn recognise(csr: &Value) -> Result<String, String> {
    let spec = &csr["spec"];
    if spec["signerName"].as_str() != Some(SIGNER) {
        return Err(format!("signer {:?} is not {SIGNER}", spec["signerName"]));
    }
    let mut usages: Vec<&str> =
        spec["usages"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    usages.sort_unstable();
    let mut want = KUBELET_CLIENT_USAGES.to_vec();
    want.sort_unstable();
    if usages != want {
        return Err(format!("usages {usages:?} are not exactly {want:?} (Kubernetes 1.20)"));
    }
    let pem = spec["request"]
        .as_str()
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or("spec.request is not base64 PEM")?;
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
        .map(|d: rustls_pki_types::CertificateSigningRequestDer| d.as_ref().to_vec())
        .map_err(|e| format!("spec.request: {e}"))?;
    let (_, req) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|e| format!("spec.request: {e}"))?;
    let (cn, orgs) = subject(&req.certification_request_info.subject);
    if orgs != ["system:nodes"] || !cn.starts_with("system:node:") {
        return Err(format!("subject CN={cn} O={orgs:?} is not a node client"));
    }
    let username = spec["username"].as_str().unwrap_or_default();
    let groups: Vec<&str> =
        spec["groups"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    // nodeclient: a bootstrapper asks for any node; selfnodeclient: a node renews its own.
    let allowed =
        groups.contains(&"system:bootstrappers") || (username == cn && groups.contains(&"system:nodes"));
    if !allowed {
        return Err(format!("{username} may not request a certificate for {cn}"));
    }
    Ok(pem)
}

/// The `Approved` condition the approver adds.
pub(crate) fn approved_condition() -> Value {
    let now = super::store::timestamp(jiff::Timestamp::now());
    json!({
        "type": "Approved", "status": "True", "reason": "AutoApproved",
        "message": "Auto approving kubelet client certificate after SubjectAccessReview.",
        "lastUpdateTime": now, "lastTransitionTime": now,
    })
}
