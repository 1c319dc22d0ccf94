//! The fake's certificate side: a real CA (rcgen on ring) that issues the server's certificate
//! (TLS mode) and the API server's kubelet client certificate, and signs approved CSRs; the CSR
//! approver of the controller-manager (`csrapproving`, with Kubernetes 1.20's exact-usages rule);
//! the `kubernetes.io/kubelet-serving` signer's checks; and client-certificate authentication as
//! the kube-apiserver does it (CN = user name, O = groups).

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
/// The signer of kubelet serving certificates (not auto-approved in 1.20).
pub(crate) const SERVING_SIGNER: &str = "kubernetes.io/kubelet-serving";
/// The usages 1.20's kubelet-serving signer requires, exactly (current releases also take the set
/// without key encipherment).
const KUBELET_SERVING_USAGES: [&str; 3] = ["digital signature", "key encipherment", "server auth"];

/// The cluster CA and the TLS server configuration built on it.
pub(crate) struct FakeCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// The CA certificate, PEM (what `--ca-cert` / `certificate-authority-data` carry).
    pub ca_pem: String,
    pub server_config: Arc<rustls::ServerConfig>,
    /// How the API server calls kubelets: presenting `CN=kube-apiserver-kubelet-client`,
    /// `O=system:masters` (signed by this CA), verifying no serving certificate.
    pub kubelet_client: Arc<rustls::ClientConfig>,
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

        // kubeadm's apiserver-kubelet-client: the API server's identity towards kubelets.
        let client_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("client key");
        let mut cp = rcgen::CertificateParams::new(vec![]).expect("client params");
        cp.distinguished_name.push(rcgen::DnType::CommonName, "kube-apiserver-kubelet-client");
        cp.distinguished_name.push(rcgen::DnType::OrganizationName, "system:masters");
        cp.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        cp.key_usages =
            vec![rcgen::KeyUsagePurpose::DigitalSignature, rcgen::KeyUsagePurpose::KeyEncipherment];
        let now = time::OffsetDateTime::now_utc();
        cp.not_before = now - time::Duration::minutes(5);
        cp.not_after = now + time::Duration::days(365);
        let client_cert = cp.signed_by(&client_key, &issuer).expect("kubelet client certificate");
        let client_key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(client_key.serialize_der().into());
        let mut kubelet_client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(super::kubelet::AnyServerCert(provider())))
            .with_client_auth_cert(vec![client_cert.der().clone()], client_key_der)
            .expect("kubelet client config");
        kubelet_client.alpn_protocols = vec![b"http/1.1".to_vec()];
        FakeCa {
            issuer,
            ca_pem,
            server_config: Arc::new(server_config),
            kubelet_client: Arc::new(kubelet_client),
        }
    }

    /// Signs a CSR (PEM) as a client certificate valid from a little while ago for `lifetime`.
    pub fn sign(&self, csr_pem: &str, lifetime: Duration) -> Result<String, String> {
        self.sign_as(csr_pem, lifetime, rcgen::ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// Signs a kubelet-serving CSR (PEM) as a server certificate: the CSR's subject and its DNS and
    /// IP SANs (the only kinds the signer takes), server auth, valid for `lifetime`.
    pub fn sign_serving(&self, csr_pem: &str, lifetime: Duration) -> Result<String, String> {
        self.sign_as(csr_pem, lifetime, rcgen::ExtendedKeyUsagePurpose::ServerAuth)
    }

    fn sign_as(
        &self,
        csr_pem: &str,
        lifetime: Duration,
        usage: rcgen::ExtendedKeyUsagePurpose,
    ) -> Result<String, String> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| e.to_string())?;
        let now = time::OffsetDateTime::now_utc();
        // Backdated like the real signer (5 minutes), so a clock a little behind still accepts it;
        // less for the short lives of rotation tests, whose point is the lifetime itself.
        let backdate = lifetime.min(Duration::from_secs(6000)) / 20;
        csr.params.not_before = now - time::Duration::milliseconds(backdate.as_millis() as i64);
        csr.params.not_after = now + time::Duration::milliseconds(lifetime.as_millis() as i64);
        csr.params.extended_key_usages = vec![usage];
        csr.params.key_usages =
            vec![rcgen::KeyUsagePurpose::DigitalSignature, rcgen::KeyUsagePurpose::KeyEncipherment];
        // The signer builds its own template: never a CA, whatever the request asks.
        csr.params.is_ca = rcgen::IsCa::NoCa;
        csr.params
            .subject_alt_names
            .retain(|s| matches!(s, rcgen::SanType::DnsName(_) | rcgen::SanType::IpAddress(_)));
        csr.signed_by(&self.issuer).map(|c| c.pem()).map_err(|e| e.to_string())
    }
}

/// The subject of a PKCS#10 request or a certificate: (CN, `[O]`).
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
    let (pem, der) = request(csr)?;
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

/// A CSR object's `spec.request`: the PEM text and its DER.
fn request(csr: &Value) -> Result<(String, Vec<u8>), String> {
    let pem = csr["spec"]["request"]
        .as_str()
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or("spec.request is not base64 PEM")?;
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
        .map(|d: rustls_pki_types::CertificateSigningRequestDer| d.as_ref().to_vec())
        .map_err(|e| format!("spec.request: {e}"))?;
    Ok((pem, der))
}

/// The subject CN of a CSR object's request, if it parses.
pub(crate) fn request_cn(csr: &Value) -> Option<String> {
    let (_, der) = request(csr).ok()?;
    let (_, req) = x509_parser::certification_request::X509CertificationRequest::from_der(&der).ok()?;
    Some(subject(&req.certification_request_info.subject).0)
}

/// The kubelet-serving signer's check of an approved CSR (1.20's `ValidateKubeletServingCSR`, in
/// its order): `Ok(pem)` to sign, `Err(message)` for the `Failed` condition it sets instead.
pub(crate) fn validate_serving(csr: &Value) -> Result<String, String> {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    let (pem, der) = request(csr)?;
    let (_, req) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|e| format!("spec.request: {e}"))?;
    let (cn, orgs) = subject(&req.certification_request_info.subject);
    if orgs != ["system:nodes"] {
        return Err("subject organization is not system:nodes".into());
    }
    let (mut dns_or_ip, mut email, mut uri) = (false, false, false);
    for ext in req.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            for name in &san.general_names {
                match name {
                    GeneralName::DNSName(_) | GeneralName::IPAddress(_) => dns_or_ip = true,
                    GeneralName::RFC822Name(_) => email = true,
                    GeneralName::URI(_) => uri = true,
                    // Go's parser keeps no other kinds, and the signer copies none.
                    _ => {}
                }
            }
        }
    }
    if !dns_or_ip {
        return Err("DNS or IP subjectAltName is required".into());
    }
    if email {
        return Err("Email subjectAltNames are not allowed".into());
    }
    if uri {
        return Err("URI subjectAltNames are not allowed".into());
    }
    let mut usages: Vec<&str> =
        csr["spec"]["usages"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    usages.sort_unstable();
    usages.dedup();
    if usages != KUBELET_SERVING_USAGES {
        return Err(format!("usages did not match [{}]", KUBELET_SERVING_USAGES.join(" ")));
    }
    if !cn.starts_with("system:node:") {
        return Err("subject common name does not begin with system:node:".into());
    }
    Ok(pem)
}

/// The `Approved` condition `kubectl certificate approve` adds.
pub(crate) fn kubectl_approved_condition() -> Value {
    let now = super::store::timestamp(jiff::Timestamp::now());
    json!({
        "type": "Approved", "status": "True", "reason": "KubectlApprove",
        "message": "This CSR was approved by kubectl certificate approve.",
        "lastUpdateTime": now, "lastTransitionTime": now,
    })
}

/// The `Failed` condition a signer adds to an approved request it will not sign.
pub(crate) fn failed_condition(message: &str) -> Value {
    let now = super::store::timestamp(jiff::Timestamp::now());
    json!({
        "type": "Failed", "status": "True", "reason": "SignerValidationFailure", "message": message,
        "lastUpdateTime": now, "lastTransitionTime": now,
    })
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

#[cfg(test)]
pub(crate) mod tests {
    use rustls_pki_types::pem::PemObject;

    use super::*;

    /// A CSR (PEM) for `cn`/`orgs` with these SANs (`rcgen`'s strings: IPs become IP SANs).
    pub(crate) fn csr_pem(cn: &str, orgs: &[&str], sans: &[&str]) -> String {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut p = rcgen::CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
            .expect("params");
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        for o in orgs {
            p.distinguished_name.push(rcgen::DnType::OrganizationName, *o);
        }
        p.serialize_request(&key).expect("csr").pem().expect("pem")
    }

    /// A CSR object as the API server stores it.
    pub(crate) fn csr_object(pem: &str, signer: &str, usages: &[&str], username: &str) -> Value {
        json!({"metadata": {"name": "x"}, "spec": {
            "request": base64::engine::general_purpose::STANDARD.encode(pem),
            "signerName": signer, "usages": usages, "username": username,
            "groups": ["system:nodes", "system:authenticated"]}})
    }

    const USAGES: [&str; 3] = ["digital signature", "key encipherment", "server auth"];

    #[test]
    fn kubelet_serving_requests_follow_the_signer_rules() {
        let ok = |cn: &str, orgs: &[&str], sans: &[&str], usages: &[&str]| {
            validate_serving(&csr_object(&csr_pem(cn, orgs, sans), SERVING_SIGNER, usages, cn))
        };
        assert!(ok("system:node:n1", &["system:nodes"], &["n1", "127.0.0.1"], &USAGES).is_ok());
        assert!(
            ok(
                "system:node:n1",
                &["system:nodes"],
                &["127.0.0.1"],
                &["server auth", "key encipherment", "digital signature"]
            )
            .is_ok()
        );
        let err =
            |cn: &str, orgs: &[&str], sans: &[&str], usages: &[&str]| ok(cn, orgs, sans, usages).unwrap_err();
        assert_eq!(
            err("system:node:n1", &["other"], &["n1"], &USAGES),
            "subject organization is not system:nodes"
        );
        assert_eq!(
            err("system:node:n1", &["system:nodes"], &[], &USAGES),
            "DNS or IP subjectAltName is required"
        );
        assert_eq!(
            err("n1", &["system:nodes"], &["n1"], &USAGES),
            "subject common name does not begin with system:node:"
        );
        for usages in [
            &["digital signature", "server auth"][..],
            &["digital signature", "key encipherment", "server auth", "client auth"],
        ] {
            assert_eq!(
                err("system:node:n1", &["system:nodes"], &["n1"], usages),
                "usages did not match [digital signature key encipherment server auth]"
            );
        }
        // Email and URI SANs.
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut p = rcgen::CertificateParams::new(vec!["n1".to_owned()]).expect("params");
        p.distinguished_name.push(rcgen::DnType::CommonName, "system:node:n1");
        p.distinguished_name.push(rcgen::DnType::OrganizationName, "system:nodes");
        p.subject_alt_names.push(rcgen::SanType::Rfc822Name("n1@example.com".try_into().expect("email")));
        let pem = p.serialize_request(&key).expect("csr").pem().expect("pem");
        let e = validate_serving(&csr_object(&pem, SERVING_SIGNER, &USAGES, "system:node:n1")).unwrap_err();
        assert_eq!(e, "Email subjectAltNames are not allowed");
    }

    #[test]
    fn serving_certificates_are_for_server_auth_with_the_requested_names() {
        let ca = FakeCa::new();
        let pem = ca
            .sign_serving(
                &csr_pem("system:node:n1", &["system:nodes"], &["n1", "127.0.0.1"]),
                Duration::from_secs(3600),
            )
            .expect("signed");
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem");
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).expect("certificate");
        let eku = cert.extended_key_usage().expect("eku").expect("present").value;
        assert!(eku.server_auth && !eku.client_auth);
        let sans = cert.subject_alternative_name().expect("san").expect("present").value;
        let names: Vec<String> = sans.general_names.iter().map(|n| n.to_string()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(subject(cert.subject()).0, "system:node:n1");
        assert!(!cert.is_ca());
        assert_eq!(subject(cert.issuer()).0, "fake-kubernetes-ca");
    }
}
