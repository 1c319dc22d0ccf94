//! Signatures of agent images in the format of cosign's key-based signatures, so that a fleet
//! signing its images with `cosign sign --key` keeps its keys and tools (README: Publishing and
//! signing an agent).
//!
//! The signature of the index `repo@sha256:<hex>` is an OCI image tagged `sha256-<hex>.sig` in the
//! same repository. Each of its layers is a simple-signing payload
//! ([`simple_signing_payload`]) naming the signed digest, of media type [`SIMPLE_SIGNING`], with
//! the base64 of an ASN.1 DER ECDSA P-256 SHA-256 signature over the payload's bytes in the
//! annotation [`SIGNATURE_ANNOTATION`]. One layer per signer: a second signer appends.
//!
//! Supported: ECDSA P-256 keys (what `cosign generate-key-pair` and `openssl genpkey -algorithm EC
//! -pkeyopt ec_paramgen_curve:P-256` make), public keys as PEM `PUBLIC KEY` (SPKI, `cosign.pub`),
//! private keys as PEM PKCS#8 `PRIVATE KEY` or SEC1 `EC PRIVATE KEY`. Not supported: keyless
//! signing (Fulcio certificates, OIDC identities), Rekor transparency-log entries and bundles,
//! cosign's encrypted private key file (sign with `cosign sign --key` itself), KMS keys, other key
//! types (RSA, P-384, Ed25519), the OCI 1.1 referrers and sigstore bundle format.
//!
//! This file owns keys, payloads and the signature image's JSON; it does no network I/O (that is
//! `registry.rs`'s).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _, UnparsedPublicKey,
};
use rustls_pki_types::pem::{PemObject, SectionKind};
use serde::Deserialize;

use super::artifact::{Descriptor, Manifest, OCI_MANIFEST, digest_hex, sha256_digest};

/// The media type of a signature layer (a simple-signing payload).
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The layer annotation holding the signature, base64 of ASN.1 DER.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The config media type of the signature image, as cosign writes it.
pub const SIGNATURE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// The payload's `critical.type`.
const PAYLOAD_TYPE: &str = "cosign container image signature";

// DER of the object identifiers a key file may name.
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_P521: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x23];
const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file cannot be read.
    #[error("cannot read key file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid PEM.
    #[error("key file {} is not valid PEM: {source}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// No `PUBLIC KEY` block in a trusted-key file.
    #[error("key file {} holds no PEM \"PUBLIC KEY\" block (cosign.pub or `openssl ec -pubout` output)", .0.display())]
    NoPublicKey(PathBuf),
    /// No private key block in a signing-key file.
    #[error(
        "key file {} holds no PEM \"PRIVATE KEY\" or \"EC PRIVATE KEY\" block (`openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256` writes one)",
        .0.display()
    )]
    NoPrivateKey(PathBuf),
    /// An encrypted private key (cosign's own, or encrypted PKCS#8).
    #[error(
        "key file {} holds an encrypted private key (PEM \"{kind}\"), which lichen cannot read; sign with `cosign sign --key` instead, or use an unencrypted PKCS#8 P-256 key",
        path.display()
    )]
    Encrypted {
        /// The file.
        path: PathBuf,
        /// The PEM label.
        kind: String,
    },
    /// A key of another type than ECDSA P-256.
    #[error("key {index} in {} is {what}; only ECDSA P-256 keys are supported (cosign's default)", path.display())]
    NotP256 {
        /// The file.
        path: PathBuf,
        /// Which key in the file, from 1.
        index: usize,
        /// What it is instead.
        what: String,
    },
    /// A P-256 key whose encoding is broken.
    #[error("key {index} in {} is not a valid ECDSA P-256 key: {why}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Which key in the file, from 1.
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// The system's random source failed while signing.
    #[error("signing failed: the system random source failed")]
    Sign,
}

/// Why an image's signatures do not make it trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// There is no signature at all.
    #[error("unsigned: no {SIMPLE_SIGNING} layer in the signature image {tag}")]
    Unsigned {
        /// The signature tag looked at.
        tag: String,
    },
    /// Signatures exist, but for another digest than the one being verified.
    #[error("signature is for another image: it names {signed}, not {wanted}")]
    OtherImage {
        /// The digest the payload names.
        signed: String,
        /// The digest being verified.
        wanted: String,
    },
    /// A payload's bytes do not hash to its layer's digest.
    #[error("signature payload does not match its layer digest {0}")]
    PayloadDigest(String),
    /// A layer's payload or signature annotation is malformed.
    #[error("malformed signature layer: {0}")]
    Malformed(String),
    /// Signatures for this digest exist, but none verifies with a trusted key.
    #[error(
        "bad signature: none of the {count} signature(s) for {wanted} verifies with the {keys} trusted key(s)"
    )]
    NotTrusted {
        /// Signatures for the digest.
        count: usize,
        /// The digest.
        wanted: String,
        /// Trusted keys tried.
        keys: usize,
    },
}

/// The ECDSA P-256 public keys an upgrade may be signed by (`upgrade.trusted_keys`).
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<TrustedKey>,
}

#[derive(Debug, Clone)]
struct TrustedKey {
    /// The uncompressed point, `04 || X || Y`.
    point: Vec<u8>,
}

impl TrustedKeys {
    /// Reads every `PUBLIC KEY` block of every file; refuses a file without one, and any key that
    /// is not ECDSA P-256, naming the file.
    pub fn load(paths: &[PathBuf]) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        for path in paths {
            let pem = std::fs::read(path).map_err(|source| KeyError::Read { path: path.clone(), source })?;
            keys.extend(TrustedKeys::from_pem(&pem, path)?.keys);
        }
        Ok(TrustedKeys { keys })
    }

    /// The keys of one PEM file's contents; `path` names it in errors.
    pub fn from_pem(pem: &[u8], path: &Path) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        for (i, section) in sections(pem, path)?.into_iter().enumerate() {
            if section.kind != SectionKind::PublicKey {
                continue;
            }
            let point = p256_point(&section.der).map_err(|e| e.into_key_error(path, i + 1))?;
            keys.push(TrustedKey { point });
        }
        if keys.is_empty() {
            return Err(KeyError::NoPublicKey(path.to_owned()));
        }
        Ok(TrustedKeys { keys })
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether `signature` (ASN.1 DER) over `payload` verifies with any of the keys.
    pub fn verify(&self, payload: &[u8], signature: &[u8]) -> bool {
        self.keys.iter().any(|k| {
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &k.point).verify(payload, signature).is_ok()
        })
    }
}

/// An ECDSA P-256 private key to sign agent images with.
pub struct SigningKey {
    pair: EcdsaKeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(P-256, <hidden>)")
    }
}

impl SigningKey {
    /// Reads the first private key of a PEM file: PKCS#8 `PRIVATE KEY` or SEC1 `EC PRIVATE KEY`.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let pem = std::fs::read(path).map_err(|source| KeyError::Read { path: path.to_owned(), source })?;
        SigningKey::from_pem(&pem, path)
    }

    /// The key in one PEM file's contents; `path` names it in errors.
    pub fn from_pem(pem: &[u8], path: &Path) -> Result<Self, KeyError> {
        let text = String::from_utf8_lossy(pem);
        if let Some(label) = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("-----BEGIN ")?.strip_suffix("-----"))
            .find(|l| l.starts_with("ENCRYPTED"))
        {
            return Err(KeyError::Encrypted { path: path.to_owned(), kind: label.to_owned() });
        }
        for (i, section) in sections(pem, path)?.into_iter().enumerate() {
            let pkcs8 = match section.kind {
                SectionKind::PrivateKey => section.der,
                SectionKind::EcPrivateKey => sec1_to_pkcs8(&section.der),
                SectionKind::RsaPrivateKey => {
                    return Err(KeyError::NotP256 {
                        path: path.to_owned(),
                        index: i + 1,
                        what: "an RSA key".into(),
                    });
                }
                _ => continue,
            };
            pkcs8_algorithm(&pkcs8).map_err(|e| e.into_key_error(path, i + 1))?;
            let rng = ring::rand::SystemRandom::new();
            let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &pkcs8, &rng)
                .map_err(|e| KeyError::Invalid { path: path.to_owned(), index: i + 1, why: e.to_string() })?;
            return Ok(SigningKey { pair });
        }
        Err(KeyError::NoPrivateKey(path.to_owned()))
    }

    /// An ASN.1 DER ECDSA P-256 SHA-256 signature over `payload`.
    pub fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, KeyError> {
        let rng = ring::rand::SystemRandom::new();
        let sig = self.pair.sign(&rng, payload).map_err(|_| KeyError::Sign)?;
        Ok(sig.as_ref().to_vec())
    }

    /// The public key as a PEM `PUBLIC KEY` block (what `cosign.pub` holds).
    pub fn public_key_pem(&self) -> String {
        let point = self.pair.public_key().as_ref();
        let mut bits = vec![0u8];
        bits.extend_from_slice(point);
        let alg = der(0x30, &[der(0x06, OID_EC_PUBLIC_KEY), der(0x06, OID_P256)].concat());
        let spki = der(0x30, &[alg, der(0x03, &bits)].concat());
        let b64 = base64::engine::general_purpose::STANDARD.encode(spki);
        let mut out = String::from("-----BEGIN PUBLIC KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END PUBLIC KEY-----\n");
        out
    }
}

/// The tag of the signature image of `digest` (`sha256:<hex>`): `sha256-<hex>.sig`.
pub fn signature_tag(digest: &str) -> Option<String> {
    digest_hex(digest).map(|hex| format!("sha256-{hex}.sig"))
}

/// The simple-signing payload cosign signs for `docker_reference` (`registry/repo`) at
/// `manifest_digest`, byte for byte as cosign writes it.
pub fn simple_signing_payload(docker_reference: &str, manifest_digest: &str) -> Vec<u8> {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    format!(
        r#"{{"critical":{{"identity":{{"docker-reference":{}}},"image":{{"docker-manifest-digest":{}}},"type":"{PAYLOAD_TYPE}"}},"optional":null}}"#,
        q(docker_reference),
        q(manifest_digest)
    )
    .into_bytes()
}

#[derive(Deserialize)]
struct Payload {
    critical: Critical,
}

#[derive(Deserialize)]
struct Critical {
    image: PayloadImage,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct PayloadImage {
    #[serde(rename = "docker-manifest-digest")]
    digest: String,
}

/// A signature layer's descriptor: the payload's digest and size, and the signature.
pub fn signature_layer(payload: &[u8], signature: &[u8]) -> Descriptor {
    let mut d = Descriptor::of(SIMPLE_SIGNING, payload);
    d.annotations
        .insert(SIGNATURE_ANNOTATION.into(), base64::engine::general_purpose::STANDARD.encode(signature));
    d
}

/// The signature image with `layer` added to the layers of `existing` (the manifest already under
/// the `.sig` tag, if any), as cosign appends: returns its config blob and manifest bytes. A layer
/// already there (the same payload and signature) is not added twice.
pub fn signature_image(
    existing: Option<&[u8]>,
    layer: Descriptor,
) -> Result<(Vec<u8>, Vec<u8>), SignatureError> {
    let mut layers = match existing {
        Some(bytes) => {
            let m: Manifest = serde_json::from_slice(bytes).map_err(|e| {
                SignatureError::Malformed(format!("the existing signature manifest is not valid JSON: {e}"))
            })?;
            m.layers
        }
        None => Vec::new(),
    };
    if !layers.contains(&layer) {
        layers.push(layer);
    }
    // The config as go-containerregistry writes it for cosign's image of signature layers.
    let zero = "0001-01-01T00:00:00Z";
    let config = serde_json::json!({
        "architecture": "",
        "created": zero,
        "history": layers.iter().map(|_| serde_json::json!({"created": zero})).collect::<Vec<_>>(),
        "os": "",
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>()},
        "config": {},
    });
    let config = serde_json::to_vec(&config).unwrap_or_default();
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.into()),
        artifact_type: None,
        config: Some(Descriptor::of(SIGNATURE_CONFIG, &config)),
        layers,
        manifests: Vec::new(),
        annotations: BTreeMap::new(),
    };
    Ok((config, manifest.to_bytes()))
}

/// The signature layers of a signature manifest (those of media type [`SIMPLE_SIGNING`]).
pub fn signature_layers(manifest: &[u8]) -> Result<Vec<Descriptor>, SignatureError> {
    let m: Manifest = serde_json::from_slice(manifest)
        .map_err(|e| SignatureError::Malformed(format!("the signature manifest is not valid JSON: {e}")))?;
    Ok(m.layers.into_iter().filter(|l| l.media_type == SIMPLE_SIGNING).collect())
}

/// Checks that at least one of `layers` (each a descriptor with its payload's bytes) is a
/// signature of `wanted` (the index digest) by one of `keys`.
pub fn verify_layers(
    wanted: &str,
    tag: &str,
    layers: &[(Descriptor, Vec<u8>)],
    keys: &TrustedKeys,
) -> Result<(), SignatureError> {
    if layers.is_empty() {
        return Err(SignatureError::Unsigned { tag: tag.to_owned() });
    }
    let (mut for_this, mut other, mut first_error) = (0usize, None, None);
    for (desc, payload) in layers {
        let checked = check_layer(wanted, desc, payload);
        match checked {
            Ok(signature) => {
                for_this += 1;
                if keys.verify(payload, &signature) {
                    return Ok(());
                }
            }
            Err(e @ SignatureError::OtherImage { .. }) => other = Some(e),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if for_this > 0 {
        return Err(SignatureError::NotTrusted {
            count: for_this,
            wanted: wanted.to_owned(),
            keys: keys.len(),
        });
    }
    Err(other.or(first_error).unwrap_or(SignatureError::Unsigned { tag: tag.to_owned() }))
}

/// The signature of one layer, once its payload is shown to be the layer's and to name `wanted`.
fn check_layer(wanted: &str, desc: &Descriptor, payload: &[u8]) -> Result<Vec<u8>, SignatureError> {
    if sha256_digest(payload) != desc.digest {
        return Err(SignatureError::PayloadDigest(desc.digest.clone()));
    }
    let p: Payload = serde_json::from_slice(payload).map_err(|e| {
        SignatureError::Malformed(format!("the payload is not a simple-signing payload: {e}"))
    })?;
    if p.critical.kind != PAYLOAD_TYPE {
        return Err(SignatureError::Malformed(format!(
            "payload type {:?}, not {PAYLOAD_TYPE:?}",
            p.critical.kind
        )));
    }
    if p.critical.image.digest != wanted {
        return Err(SignatureError::OtherImage {
            signed: p.critical.image.digest,
            wanted: wanted.to_owned(),
        });
    }
    let b64 = desc
        .annotations
        .get(SIGNATURE_ANNOTATION)
        .ok_or_else(|| SignatureError::Malformed(format!("no {SIGNATURE_ANNOTATION} annotation")))?;
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| SignatureError::Malformed(format!("the signature is not base64: {e}")))
}

/// One PEM block, of any kind the PEM reader knows.
struct Section {
    kind: SectionKind,
    der: Vec<u8>,
}

impl PemObject for Section {
    fn from_pem(kind: SectionKind, der: Vec<u8>) -> Option<Self> {
        Some(Section { kind, der })
    }
}

fn sections(pem: &[u8], path: &Path) -> Result<Vec<Section>, KeyError> {
    Section::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| KeyError::Pem { path: path.to_owned(), source })
}

/// What is wrong with a key's DER, before the file is known.
enum DerProblem {
    NotP256(String),
    Invalid(String),
}

impl DerProblem {
    fn into_key_error(self, path: &Path, index: usize) -> KeyError {
        match self {
            DerProblem::NotP256(what) => KeyError::NotP256 { path: path.to_owned(), index, what },
            DerProblem::Invalid(why) => KeyError::Invalid { path: path.to_owned(), index, why },
        }
    }
}

/// A minimal DER reader: tag, length, value.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    fn read(&mut self, tag: u8) -> Result<&'a [u8], DerProblem> {
        let bad = |why: &str| DerProblem::Invalid(format!("bad DER: {why}"));
        let (&t, rest) = self.0.split_first().ok_or_else(|| bad("unexpected end"))?;
        if t != tag {
            return Err(bad(&format!("expected tag {tag:#04x}, found {t:#04x}")));
        }
        let (&first, mut rest) = rest.split_first().ok_or_else(|| bad("no length"))?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 3 || rest.len() < n {
                return Err(bad("unsupported length"));
            }
            let len = rest[..n].iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            rest = &rest[n..];
            len
        };
        if rest.len() < len {
            return Err(bad("truncated value"));
        }
        let (value, after) = rest.split_at(len);
        self.0 = after;
        Ok(value)
    }
}

/// Checks an AlgorithmIdentifier's contents names ECDSA on P-256.
fn check_algorithm(alg: &[u8]) -> Result<(), DerProblem> {
    let mut r = Der(alg);
    let oid = r.read(0x06)?;
    if oid == OID_RSA {
        return Err(DerProblem::NotP256("an RSA key".into()));
    }
    if oid == OID_ED25519 {
        return Err(DerProblem::NotP256("an Ed25519 key".into()));
    }
    if oid != OID_EC_PUBLIC_KEY {
        return Err(DerProblem::NotP256(format!("a key of algorithm OID {}", super::artifact::hex(oid))));
    }
    let curve = r.read(0x06).map_err(|_| DerProblem::NotP256("an EC key without a named curve".into()))?;
    match curve {
        OID_P256 => Ok(()),
        OID_P384 => Err(DerProblem::NotP256("an ECDSA P-384 key".into())),
        OID_P521 => Err(DerProblem::NotP256("an ECDSA P-521 key".into())),
        other => Err(DerProblem::NotP256(format!("an EC key on curve OID {}", super::artifact::hex(other)))),
    }
}

/// The uncompressed point of a P-256 SubjectPublicKeyInfo.
fn p256_point(spki: &[u8]) -> Result<Vec<u8>, DerProblem> {
    let mut outer = Der(spki);
    let mut spki = Der(outer.read(0x30)?);
    check_algorithm(spki.read(0x30)?)?;
    let bits = spki.read(0x03)?;
    match bits {
        [0, point @ ..] if point.len() == 65 && point[0] == 4 => Ok(point.to_vec()),
        [0, point @ ..] if point.len() == 33 => Err(DerProblem::Invalid(
            "a compressed point; write the key uncompressed (openssl ec -pubout)".into(),
        )),
        _ => Err(DerProblem::Invalid("the public key is not an uncompressed P-256 point".into())),
    }
}

/// Checks a PKCS#8 PrivateKeyInfo names ECDSA P-256.
fn pkcs8_algorithm(pkcs8: &[u8]) -> Result<(), DerProblem> {
    let mut outer = Der(pkcs8);
    let mut info = Der(outer.read(0x30)?);
    info.read(0x02)?;
    check_algorithm(info.read(0x30)?)
}

/// A DER TLV with a definite length.
fn der(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = value.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x100 {
        out.extend_from_slice(&[0x81, len as u8]);
    } else {
        out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(value);
    out
}

/// A SEC1 `ECPrivateKey` wrapped as PKCS#8 for P-256 (what ring reads). A SEC1 key of another
/// curve is caught by ring, which compares the curve inside with the one named here.
fn sec1_to_pkcs8(sec1: &[u8]) -> Vec<u8> {
    let alg = der(0x30, &[der(0x06, OID_EC_PUBLIC_KEY), der(0x06, OID_P256)].concat());
    der(0x30, &[der(0x02, &[0]), alg, der(0x04, sec1)].concat())
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    const DIGEST: &str = "sha256:a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0";

    fn openssl(dir: &Path, args: &[&str]) -> bool {
        match Command::new("openssl").args(args).current_dir(dir).output() {
            Ok(out) if out.status.success() => true,
            Ok(out) => panic!("openssl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr)),
            Err(_) => false,
        }
    }

    /// A P-256 key pair made by openssl in `dir` (`key.pem`, `pub.pem`); `false` without openssl.
    fn openssl_p256(dir: &Path) -> bool {
        openssl(
            dir,
            &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "key.pem"],
        ) && openssl(dir, &["ec", "-in", "key.pem", "-pubout", "-out", "pub.pem"])
    }

    #[test]
    fn the_payload_is_byte_for_byte_cosigns() {
        let p = simple_signing_payload("registry.example:5000/lichen/agent", DIGEST);
        assert_eq!(
            String::from_utf8(p).expect("utf-8"),
            format!(
                "{{\"critical\":{{\"identity\":{{\"docker-reference\":\"registry.example:5000/lichen/agent\"}},\"image\":{{\"docker-manifest-digest\":\"{DIGEST}\"}},\"type\":\"cosign container image signature\"}},\"optional\":null}}"
            )
        );
        assert_eq!(signature_tag(DIGEST).as_deref(), Some(&*format!("sha256-{}.sig", &DIGEST[7..])));
        assert_eq!(signature_tag("sha256:short"), None);
    }

    /// A fresh key, made by ring (no openssl needed).
    fn new_key() -> SigningKey {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).expect("generate");
        let b64 = base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref());
        let pem = format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n");
        SigningKey::from_pem(pem.as_bytes(), Path::new("new.pem")).expect("PKCS#8 key")
    }

    #[test]
    fn a_signature_verifies_with_its_key_and_not_with_another() {
        let (key, other) = (new_key(), new_key());
        let trusted =
            TrustedKeys::from_pem(key.public_key_pem().as_bytes(), Path::new("k.pub")).expect("trusted");
        assert_eq!(trusted.len(), 1);

        let payload = simple_signing_payload("r/agent", DIGEST);
        let sig = key.sign(&payload).expect("sign");
        assert!(trusted.verify(&payload, &sig));
        assert!(!trusted.verify(b"another payload", &sig));
        let wrong = other.sign(&payload).expect("sign");
        assert!(!trusted.verify(&payload, &wrong));

        // Two keys in one file: either verifies.
        let both = format!("{}{}", other.public_key_pem(), key.public_key_pem());
        let two = TrustedKeys::from_pem(both.as_bytes(), Path::new("both.pem")).expect("two keys");
        assert_eq!(two.len(), 2);
        assert!(two.verify(&payload, &sig) && two.verify(&payload, &wrong));

        // Through the layer checks, as the registry code runs them.
        let layer = signature_layer(&payload, &sig);
        assert_eq!(verify_layers(DIGEST, "t", &[(layer.clone(), payload.clone())], &trusted), Ok(()));
        let bad = signature_layer(&payload, &wrong);
        let e = verify_layers(DIGEST, "t", &[(bad.clone(), payload.clone())], &trusted).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "bad signature: none of the 1 signature(s) for {DIGEST} verifies with the 1 trusted key(s)"
            )
        );
        // A second signer's layer beside a good one.
        assert_eq!(verify_layers(DIGEST, "t", &[(bad, payload.clone()), (layer, payload)], &trusted), Ok(()));
    }

    #[test]
    fn an_openssl_signature_verifies_interop() {
        let dir = tempfile::tempdir().expect("tempdir");
        if !openssl_p256(dir.path()) {
            eprintln!("openssl not on PATH: skipped (tests/run.sh installs it)");
            return;
        }
        let payload = simple_signing_payload("127.0.0.1:5000/lichen/agent", DIGEST);
        std::fs::write(dir.path().join("payload.json"), &payload).expect("payload");
        assert!(openssl(
            dir.path(),
            &["dgst", "-sha256", "-sign", "key.pem", "-out", "sig.der", "payload.json"]
        ));
        let sig = std::fs::read(dir.path().join("sig.der")).expect("sig");
        let trusted = TrustedKeys::load(&[dir.path().join("pub.pem")]).expect("trusted");
        assert!(trusted.verify(&payload, &sig), "openssl's signature verifies with openssl's public key");

        // And ours verifies with openssl; our PEM rendering of the public key is openssl's.
        let key = SigningKey::load(&dir.path().join("key.pem")).expect("openssl's PKCS#8 key");
        assert_eq!(key.public_key_pem(), std::fs::read_to_string(dir.path().join("pub.pem")).expect("pub"));
        let ours = key.sign(&payload).expect("sign");
        std::fs::write(dir.path().join("ours.der"), ours).expect("write");
        assert!(openssl(
            dir.path(),
            &["dgst", "-sha256", "-verify", "pub.pem", "-signature", "ours.der", "payload.json"]
        ));

        // A SEC1 "EC PRIVATE KEY" (openssl ecparam -genkey) signs too.
        assert!(openssl(
            dir.path(),
            &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sec1.pem"]
        ));
        assert!(openssl(dir.path(), &["ec", "-in", "sec1.pem", "-pubout", "-out", "sec1.pub"]));
        let sec1 = SigningKey::load(&dir.path().join("sec1.pem")).expect("SEC1 key");
        let sig = sec1.sign(&payload).expect("sign");
        assert!(TrustedKeys::load(&[dir.path().join("sec1.pub")]).expect("pub").verify(&payload, &sig));
    }

    #[test]
    fn keys_that_are_not_p256_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let have_openssl = openssl(
            dir.path(),
            &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024", "-out", "rsa.pem"],
        );
        if have_openssl {
            assert!(openssl(dir.path(), &["pkey", "-in", "rsa.pem", "-pubout", "-out", "rsa.pub"]));
            assert!(openssl(
                dir.path(),
                &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384", "-out", "p384.pem"]
            ));
            assert!(openssl(dir.path(), &["pkey", "-in", "p384.pem", "-pubout", "-out", "p384.pub"]));
        } else {
            // Hand-built SPKI: an RSA one (algorithm only matters) and a P-384 one.
            let spki = |alg: Vec<u8>| {
                let b64 = base64::engine::general_purpose::STANDARD
                    .encode(der(0x30, &[der(0x30, &alg), der(0x03, &[0, 4, 1, 2])].concat()));
                format!("-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n")
            };
            let rsa = spki([der(0x06, OID_RSA), vec![0x05, 0]].concat());
            let p384 = spki([der(0x06, OID_EC_PUBLIC_KEY), der(0x06, OID_P384)].concat());
            std::fs::write(dir.path().join("rsa.pub"), rsa).expect("write");
            std::fs::write(dir.path().join("p384.pub"), p384).expect("write");
        }
        let rsa = dir.path().join("rsa.pub");
        let e = TrustedKeys::load(std::slice::from_ref(&rsa)).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "key 1 in {} is an RSA key; only ECDSA P-256 keys are supported (cosign's default)",
                rsa.display()
            )
        );
        let e = TrustedKeys::load(&[dir.path().join("p384.pub")]).unwrap_err().to_string();
        assert!(e.contains("p384.pub is an ECDSA P-384 key"), "{e}");
        if have_openssl {
            let e = SigningKey::load(&dir.path().join("p384.pem")).unwrap_err().to_string();
            assert!(e.contains("p384.pem is an ECDSA P-384 key"), "{e}");
            let e = SigningKey::load(&dir.path().join("rsa.pem")).unwrap_err().to_string();
            assert!(e.contains("is an RSA key"), "{e}");
        }
        // A private key given as a trusted key, and nonsense.
        std::fs::write(
            dir.path().join("cert.pem"),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let e = TrustedKeys::load(&[dir.path().join("cert.pem")]).unwrap_err().to_string();
        assert!(e.contains("holds no PEM \"PUBLIC KEY\" block"), "{e}");
        let e = TrustedKeys::load(&[dir.path().join("missing.pub")]).unwrap_err().to_string();
        assert!(e.starts_with("cannot read key file") && e.contains("missing.pub"), "{e}");
        let cosign_key = "-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\n";
        let e = SigningKey::from_pem(cosign_key.as_bytes(), Path::new("cosign.key")).unwrap_err().to_string();
        assert!(e.contains("encrypted private key (PEM \"ENCRYPTED SIGSTORE PRIVATE KEY\")"), "{e}");
        assert!(e.contains("cosign sign --key"), "{e}");
    }

    #[test]
    fn signatures_for_another_image_or_tampered_payloads_are_refused() {
        let keys = TrustedKeys::default();
        let other = "sha256:b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1";
        let payload = simple_signing_payload("r/agent", other);
        let layer = signature_layer(&payload, b"sig");
        let e = verify_layers(DIGEST, "t", &[(layer.clone(), payload)], &keys).unwrap_err();
        assert_eq!(e.to_string(), format!("signature is for another image: it names {other}, not {DIGEST}"));
        let tampered = simple_signing_payload("r/agent", DIGEST);
        let e = verify_layers(DIGEST, "t", &[(layer, tampered)], &keys).unwrap_err();
        assert!(matches!(e, SignatureError::PayloadDigest(_)), "{e}");
        assert_eq!(
            verify_layers(DIGEST, "sha256-x.sig", &[], &keys).unwrap_err().to_string(),
            format!("unsigned: no {SIMPLE_SIGNING} layer in the signature image sha256-x.sig")
        );
    }

    #[test]
    fn a_second_signer_appends_a_layer() {
        let p = simple_signing_payload("r/agent", DIGEST);
        let (config, first) = signature_image(None, signature_layer(&p, b"one")).expect("first");
        let (_, second) = signature_image(Some(&first), signature_layer(&p, b"two")).expect("second");
        let (_, again) = signature_image(Some(&second), signature_layer(&p, b"two")).expect("again");
        assert_eq!(signature_layers(&first).expect("layers").len(), 1);
        assert_eq!(signature_layers(&second).expect("layers").len(), 2);
        assert_eq!(again, second, "the same signature is not added twice");
        let m: Manifest = serde_json::from_slice(&first).expect("json");
        assert_eq!(m.config.expect("config").media_type, SIGNATURE_CONFIG);
        let c: serde_json::Value = serde_json::from_slice(&config).expect("config json");
        assert_eq!(c["rootfs"]["diff_ids"][0], sha256_digest(&p));
    }
}
