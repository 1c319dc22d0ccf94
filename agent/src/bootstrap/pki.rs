//! The node's key material on disk, and the little X.509 reading Lichen needs.
//!
//! Keys are ECDSA P-256 (what kubelets use), generated here with rcgen on ring; the private key is
//! written once, mode 0600, and never leaves the board. PEM is read with rustls-pki-types. A
//! certificate's validity is read with a few lines of DER walking rather than a full X.509 parser:
//! the agent only needs `notBefore`/`notAfter` of a certificate its own API server issued.
//!
//! This module touches files only; it never talks to the API server.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::BootstrapError;

/// The signer every kubelet client certificate is requested from.
pub const KUBELET_CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";

/// The usages a node client CSR asks for: the exact set that Kubernetes 1.20's CSR approver
/// requires (with fewer it leaves the CSR pending forever) and that current releases accept.
pub const KUBELET_CLIENT_USAGES: [&str; 3] = ["digital signature", "key encipherment", "client auth"];

/// Where the joined node's credentials live under `state_dir`.
#[derive(Debug, Clone)]
pub struct NodePki {
    /// `<state_dir>/pki` (0700): `node-<serial>.key` (0600) and `node-<serial>.crt` pairs.
    pub dir: PathBuf,
    /// `<state_dir>/node.kubeconfig` (0600): the server, the CA and paths to the current pair.
    /// Replacing it (by rename) is what switches to a new certificate.
    pub kubeconfig: PathBuf,
}

/// A fresh key and the CSR for it, before the API server has signed anything.
pub struct KeyAndRequest {
    /// PKCS#8 PEM of the private key.
    pub key_pem: String,
    /// PEM of the PKCS#10 request.
    pub csr_pem: String,
}

impl std::fmt::Debug for KeyAndRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAndRequest").field("csr_pem", &self.csr_pem).finish_non_exhaustive()
    }
}

/// Generates a P-256 key and a CSR for `system:node:<node>` in group `system:nodes`.
pub fn new_node_request(node: &str) -> Result<KeyAndRequest, BootstrapError> {
    let err = BootstrapError::Crypto;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::OrganizationName, "system:nodes");
    dn.push(rcgen::DnType::CommonName, format!("system:node:{node}"));
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).map_err(err)?;
    Ok(KeyAndRequest { key_pem: key.serialize_pem(), csr_pem: csr.pem().map_err(err)? })
}

/// The signer of kubelet serving certificates (the kubelet API's TLS certificate).
pub const KUBELET_SERVING_SIGNER: &str = "kubernetes.io/kubelet-serving";
/// The usages a kubelet serving CSR asks for (what Kubernetes' serving approvers expect).
pub const KUBELET_SERVING_USAGES: [&str; 3] = ["digital signature", "key encipherment", "server auth"];

/// Generates a P-256 key and a serving CSR for `system:node:<node>` with the node's addresses as
/// subject alternative names (IP addresses as IP SANs, the rest as DNS names).
pub fn new_serving_request(node: &str, addresses: &[String]) -> Result<KeyAndRequest, BootstrapError> {
    let err = BootstrapError::Crypto;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut params = serving_params(node, addresses).map_err(err)?;
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "system:nodes");
    let csr = params.serialize_request(&key).map_err(err)?;
    Ok(KeyAndRequest { key_pem: key.serialize_pem(), csr_pem: csr.pem().map_err(err)? })
}

/// A self-signed serving certificate and key (PEM), what the kubelet serves until a CSR is signed.
pub fn self_signed_serving(node: &str, addresses: &[String]) -> Result<(String, String), BootstrapError> {
    let err = BootstrapError::Crypto;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut params = serving_params(node, addresses).map_err(err)?;
    // rcgen's default validity (1975 to 4096) on purpose: a board without a real-time clock boots
    // in 1970 or in the past, and nobody verifies this certificate's dates anyway.
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.self_signed(&key).map_err(err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn serving_params(node: &str, addresses: &[String]) -> Result<rcgen::CertificateParams, rcgen::Error> {
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, format!("system:node:{node}"));
    params.distinguished_name = dn;
    let mut seen = std::collections::BTreeSet::new();
    for a in addresses.iter().filter(|a| !a.is_empty() && seen.insert(a.as_str())) {
        params.subject_alt_names.push(match a.parse::<std::net::IpAddr>() {
            Ok(ip) => rcgen::SanType::IpAddress(ip),
            Err(_) => rcgen::SanType::DnsName(a.as_str().try_into()?),
        });
    }
    Ok(params)
}

/// Why bytes are not a certificate Lichen can read.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// The DER does not have a certificate's shape.
    #[error("not an X.509 certificate")]
    NotX509,
    /// The PEM data holds no certificate.
    #[error("no certificate in the PEM data")]
    NoPem,
    /// The PEM data cannot be parsed.
    #[error("unreadable PEM: {0}")]
    Pem(#[source] rustls_pki_types::pem::Error),
    /// A validity time that is not text.
    #[error("certificate time is not text")]
    TimeNotText,
    /// A validity time not in UTCTime or GeneralizedTime form.
    #[error("certificate time {0:?} is not in RFC 5280 form")]
    TimeForm(String),
}

/// The subject's common name and organizations of a DER certificate: the user name and groups
/// Kubernetes reads from a client certificate.
pub fn subject_of_der(der: &[u8]) -> Result<(String, Vec<String>), CertificateError> {
    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    const O: &[u8] = &[0x55, 0x04, 0x0a];
    let bad = || CertificateError::NotX509;
    let (_, cert, _) = tlv(der).filter(|t| t.0 == SEQUENCE).ok_or_else(bad)?;
    let (_, tbs, _) = tlv(cert).filter(|t| t.0 == SEQUENCE).ok_or_else(bad)?;
    let mut rest = tbs;
    let (tag, _, r) = tlv(rest).ok_or_else(bad)?;
    if tag == 0xa0 {
        rest = r;
    }
    // serialNumber, signature, issuer, validity, then subject.
    for _ in 0..4 {
        rest = tlv(rest).ok_or_else(bad)?.2;
    }
    let (_, mut name, _) = tlv(rest).filter(|t| t.0 == SEQUENCE).ok_or_else(bad)?;
    let (mut cn, mut orgs) = (String::new(), Vec::new());
    while !name.is_empty() {
        let (_, mut set, r) = tlv(name).filter(|t| t.0 == SET).ok_or_else(bad)?;
        name = r;
        while !set.is_empty() {
            let (_, atv, r) = tlv(set).filter(|t| t.0 == SEQUENCE).ok_or_else(bad)?;
            set = r;
            let (_, oid, r) = tlv(atv).filter(|t| t.0 == 0x06).ok_or_else(bad)?;
            let (_, value, _) = tlv(r).ok_or_else(bad)?;
            let value = String::from_utf8_lossy(value).into_owned();
            if oid == CN {
                cn = value;
            } else if oid == O {
                orgs.push(value);
            }
        }
    }
    Ok((cn, orgs))
}

/// The validity window of a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// `notBefore`.
    pub not_before: jiff::Timestamp,
    /// `notAfter`.
    pub not_after: jiff::Timestamp,
}

impl Validity {
    /// Whether the certificate has expired at `now`.
    pub fn expired(&self, now: jiff::Timestamp) -> bool {
        now >= self.not_after
    }

    /// When to renew: a point drawn uniformly between 70% and 90% of the lifetime (`jitter` in
    /// 0..1), as the kubelet does, so a fleet flashed on one day does not renew in one burst.
    pub fn renew_at(&self, jitter: f64) -> jiff::Timestamp {
        let life = self.not_after.as_millisecond() - self.not_before.as_millisecond();
        let fraction = 0.7 + 0.2 * jitter.clamp(0.0, 1.0);
        let at = self.not_before.as_millisecond() + (life.max(0) as f64 * fraction) as i64;
        jiff::Timestamp::from_millisecond(at).unwrap_or(self.not_after)
    }
}

/// The validity of the first certificate in `pem`.
pub fn validity_of_pem(pem: &[u8]) -> Result<Validity, CertificateError> {
    let cert = CertificateDer::pem_slice_iter(pem)
        .next()
        .ok_or(CertificateError::NoPem)?
        .map_err(CertificateError::Pem)?;
    validity_of_der(cert.as_ref())
}

/// Reads `tbsCertificate.validity` from a DER certificate.
pub fn validity_of_der(der: &[u8]) -> Result<Validity, CertificateError> {
    const SEQUENCE: u8 = 0x30;
    let bad = || CertificateError::NotX509;
    let (tag, cert, _) = tlv(der).ok_or_else(bad)?;
    if tag != SEQUENCE {
        return Err(bad());
    }
    let (tag, tbs, _) = tlv(cert).ok_or_else(bad)?;
    if tag != SEQUENCE {
        return Err(bad());
    }
    let mut rest = tbs;
    // [0] version (optional), serialNumber, signature, issuer, then validity.
    let (tag, _, r) = tlv(rest).ok_or_else(bad)?;
    if tag == 0xa0 {
        rest = r;
    }
    for _ in 0..3 {
        rest = tlv(rest).ok_or_else(bad)?.2;
    }
    let (tag, validity, _) = tlv(rest).ok_or_else(bad)?;
    if tag != SEQUENCE {
        return Err(bad());
    }
    let (t1, nb, r) = tlv(validity).ok_or_else(bad)?;
    let (t2, na, _) = tlv(r).ok_or_else(bad)?;
    Ok(Validity { not_before: asn1_time(t1, nb)?, not_after: asn1_time(t2, na)? })
}

/// One DER tag-length-value: (tag, contents, what follows).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
        rest = &rest[n..];
        len
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`), as RFC 5280 profiles them.
fn asn1_time(tag: u8, bytes: &[u8]) -> Result<jiff::Timestamp, CertificateError> {
    let text = std::str::from_utf8(bytes).map_err(|_| CertificateError::TimeNotText)?;
    let bad = || CertificateError::TimeForm(text.to_owned());
    let digits = text.strip_suffix('Z').ok_or_else(bad)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let (year, rest) = match (tag, digits.len()) {
        (0x17, 12) => {
            let yy: i16 = digits[..2].parse().map_err(|_| bad())?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        (0x18, 14) => (digits[..4].parse().map_err(|_| bad())?, &digits[4..]),
        _ => return Err(bad()),
    };
    let n = |i: usize| rest[i..i + 2].parse::<i8>().map_err(|_| bad());
    jiff::civil::DateTime::new(year, n(0)?, n(2)?, n(4)?, n(6)?, n(8)?, 0)
        .and_then(|dt| dt.to_zoned(jiff::tz::TimeZone::UTC))
        .map(|z| z.timestamp())
        .map_err(|_| bad())
}

/// Checks that `pem` holds at least one certificate (a CA bundle), naming the file otherwise.
pub fn check_ca_pem(path: &Path, pem: &[u8]) -> Result<(), BootstrapError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    match certs {
        Ok(c) if !c.is_empty() => Ok(()),
        Ok(_) => Err(BootstrapError::NoCaCertificate { path: path.to_owned() }),
        Err(source) => Err(BootstrapError::Pem { path: path.to_owned(), source }),
    }
}

/// Writes `data` to `path` atomically (a temporary file, fsync, rename) with `mode`, so a power
/// cut leaves either the old file or the new one, and the file is never readable by others.
pub fn write_private(path: &Path, data: &[u8], mode: u32) -> Result<(), BootstrapError> {
    let io = |source: std::io::Error| BootstrapError::File { path: path.to_owned(), source };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(io)?;
    // The umask may have narrowed the mode; it can only have narrowed it, but say exactly.
    f.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(io)?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

impl NodePki {
    /// The node's credentials in `layout`.
    pub fn new(layout: &crate::layout::StateLayout) -> Self {
        NodePki { dir: layout.pki(), kubeconfig: layout.node_kubeconfig() }
    }

    /// Stores a signed certificate with its key and points the node kubeconfig at them, then
    /// removes the pairs it replaced. Returns the kubeconfig's path.
    pub fn install(
        &self,
        node: &str,
        server: &str,
        ca_pem: &[u8],
        key_pem: &str,
        cert_pem: &[u8],
    ) -> Result<PathBuf, BootstrapError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source: std::io::Error| BootstrapError::File { path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700)).map_err(io(&self.dir))?;
        let stamp = jiff::Timestamp::now().as_millisecond();
        let (key, crt) =
            (self.dir.join(format!("node-{stamp}.key")), self.dir.join(format!("node-{stamp}.crt")));
        write_private(&key, key_pem.as_bytes(), 0o600)?;
        write_private(&crt, cert_pem, 0o644)?;
        let b64 = base64::engine::general_purpose::STANDARD.encode(ca_pem);
        let q = |s: &str| serde_json::Value::from(s).to_string();
        let user = format!("system:node:{node}");
        let text = format!(
            "# Written by lichen: the node's credentials from bootstrap-token join. Lichen replaces it\n\
             # when it renews the certificate; do not edit.\n\
             apiVersion: v1\nkind: Config\nclusters:\n- name: default\n  cluster:\n    server: {}\n    certificate-authority-data: {b64}\n\
             users:\n- name: {}\n  user:\n    client-certificate: {}\n    client-key: {}\n\
             contexts:\n- name: default\n  context:\n    cluster: default\n    user: {}\ncurrent-context: default\n",
            q(server),
            q(&user),
            q(&crt.to_string_lossy()),
            q(&key.to_string_lossy()),
            q(&user),
        );
        // The commit point: until this rename the old pair stays in use.
        write_private(&self.kubeconfig, text.as_bytes(), 0o600)?;
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let p = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("node-") && p != key && p != crt {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
        Ok(self.kubeconfig.clone())
    }
}

/// The client certificate a kubeconfig authenticates with (PEM), if it uses one.
pub fn kubeconfig_client_cert(path: &Path) -> Result<Option<Vec<u8>>, BootstrapError> {
    let kc = kube::config::Kubeconfig::read_from(path)
        .map_err(|source| BootstrapError::Kubeconfig { path: path.to_owned(), source })?;
    let user = kc
        .current_context
        .as_deref()
        .and_then(|name| kc.contexts.iter().find(|c| c.name == name))
        .and_then(|c| c.context.as_ref())
        .map(|c| c.user.clone());
    let info = kc
        .auth_infos
        .iter()
        .find(|a| user.as_ref().is_none_or(|u| Some(&a.name) == u.as_ref()))
        .and_then(|a| a.auth_info.as_ref());
    let Some(info) = info else { return Ok(None) };
    if let Some(data) = &info.client_certificate_data {
        let pem = base64::engine::general_purpose::STANDARD.decode(data.trim()).map_err(|source| {
            BootstrapError::Base64 {
                path: path.to_owned(),
                field: "client-certificate-data is not base64",
                source,
            }
        })?;
        return Ok(Some(pem));
    }
    match &info.client_certificate {
        Some(file) => {
            let file = path.parent().unwrap_or(Path::new("/")).join(file);
            std::fs::read(&file).map(Some).map_err(|source| BootstrapError::File { path: file, source })
        }
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_request_names_the_node_and_reads_back_its_validity() {
        let req = new_node_request("pi-07").expect("request");
        assert!(req.csr_pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"), "{}", req.csr_pem);
        assert!(req.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(!format!("{req:?}").contains("PRIVATE"), "Debug never shows the key");
        // A certificate with a known window, self-signed for the test.
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = rcgen::CertificateParams::new(vec![]).expect("params");
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2054, 1, 1);
        let cert = params.self_signed(&key).expect("cert");
        let v = validity_of_pem(cert.pem().as_bytes()).expect("validity");
        assert_eq!(v.not_before.to_string(), "2024-01-01T00:00:00Z");
        assert_eq!(v.not_after.to_string(), "2054-01-01T00:00:00Z", "GeneralizedTime after 2049");
        assert!(!v.expired("2030-01-01T00:00:00Z".parse().expect("ts")));
        let (early, late) = (v.renew_at(0.0), v.renew_at(1.0));
        let life = v.not_after.as_second() - v.not_before.as_second();
        assert_eq!(early.as_second() - v.not_before.as_second(), life * 7 / 10, "70% of the lifetime");
        assert!(late > early && late < v.not_after);
        assert!(validity_of_der(b"\x30\x03\x02\x01\x01").is_err());
        assert!(validity_of_pem(b"garbage").is_err());
    }

    #[test]
    fn installed_credentials_are_private_and_replace_the_old_pair() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = NodePki::new(&crate::layout::StateLayout::new(dir.path()));
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let cert = rcgen::CertificateParams::new(vec![]).expect("p").self_signed(&key).expect("cert");
        let pem = cert.pem();
        let kc = pki.install(
            "pi-07",
            "https://10.0.0.1:6443",
            pem.as_bytes(),
            &key.serialize_pem(),
            pem.as_bytes(),
        );
        let kc = kc.expect("install");
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&kc), 0o600);
        assert_eq!(mode(&pki.dir), 0o700);
        std::thread::sleep(std::time::Duration::from_millis(5));
        pki.install("pi-07", "https://10.0.0.1:6443", pem.as_bytes(), &key.serialize_pem(), pem.as_bytes())
            .expect("again");
        let files: Vec<_> = std::fs::read_dir(&pki.dir).expect("dir").flatten().map(|e| e.path()).collect();
        assert_eq!(files.len(), 2, "one key and one certificate remain: {files:?}");
        for f in files.iter().filter(|f| f.extension().is_some_and(|e| e == "key")) {
            assert_eq!(mode(f), 0o600);
        }
        assert_eq!(kubeconfig_client_cert(&kc).expect("read").as_deref(), Some(pem.as_bytes()));
        let text = std::fs::read_to_string(&kc).expect("kubeconfig");
        assert!(text.contains("system:node:pi-07") && text.contains("https://10.0.0.1:6443"), "{text}");
    }
}
