//! Network fetches of modules: Wasm OCI artifacts from registries (CNCF layout and the older
//! wasm-to-oci one) through `oci-client`, and digest-pinned URLs through `reqwest`; and pushes of
//! modules as CNCF Wasm artifacts. Every download is bounded by `modules.max_module_size` and
//! verified against its digest before anyone sees it.

use std::time::Duration;

use futures::StreamExt;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{ImageIndexEntry, OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

use super::PullError;
use super::auth::Credential;
use crate::config::ModulesConfig;
use crate::store::ModuleDigest;

/// The CNCF Wasm OCI artifact's config media type.
pub const WASM_CONFIG_V0: &str = "application/vnd.wasm.config.v0+json";
/// The CNCF Wasm OCI artifact's layer media type.
pub const WASM_LAYER: &str = "application/wasm";
/// The older wasm-to-oci config media type.
pub const WASM_TO_OCI_CONFIG: &str = "application/vnd.wasm.config.v1+json";
/// The older wasm-to-oci layer media type.
pub const WASM_TO_OCI_LAYER: &str = "application/vnd.wasm.content.layer.v1+wasm";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A registry that stops sending for this long mid-blob is treated as gone.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
const USER_AGENT: &str = concat!("lichen/", env!("CARGO_PKG_VERSION"));

/// Why a [`Fetcher`] cannot be set up: an extra CA file named in `modules.registry_ca_files`.
#[derive(Debug, thiserror::Error)]
pub enum FetcherError {
    /// The CA file cannot be read.
    #[error("cannot read CA file {}: {source}", path.display())]
    ReadCa {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The CA file holds no PEM block.
    #[error("{} holds no PEM certificate", .0.display())]
    NotPem(std::path::PathBuf),
}

/// Fetches modules over the network; cheap to clone.
#[derive(Clone)]
pub struct Fetcher {
    insecure: Vec<String>,
    roots: Vec<Vec<u8>>,
    max_size: u64,
}

impl Fetcher {
    /// A fetcher for `config`; reads the extra CA files now so a bad path is reported at start-up.
    pub fn new(config: &ModulesConfig) -> Result<Self, FetcherError> {
        install_crypto_provider();
        let mut roots = Vec::new();
        for path in &config.registry_ca_files {
            let pem =
                std::fs::read(path).map_err(|source| FetcherError::ReadCa { path: path.clone(), source })?;
            if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
                return Err(FetcherError::NotPem(path.clone()));
            }
            roots.push(pem);
        }
        Ok(Fetcher {
            insecure: config.insecure_registries.clone(),
            roots,
            max_size: config.max_module_size.0,
        })
    }

    /// A client per pull: `oci-client` caches tokens per registry, and credentials from one pod's
    /// pull secret must never serve another pod's pull. Agent upgrades (`upgrade::registry`) use
    /// the same, so the same registries, CAs and insecure hosts serve both.
    pub(crate) fn client(&self) -> Client {
        Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(self.insecure.clone()),
            extra_root_certificates: self
                .roots
                .iter()
                .map(|pem| Certificate { encoding: CertificateEncoding::Pem, data: pem.clone() })
                .collect(),
            platform_resolver: Some(Box::new(wasm_platform)),
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            user_agent: USER_AGENT,
            max_concurrent_download: 1,
            ..ClientConfig::default()
        })
    }

    /// Pulls the module a Wasm OCI artifact holds.
    pub async fn pull_oci(
        &self,
        reference: &Reference,
        credential: Option<&Credential>,
    ) -> Result<(Vec<u8>, ModuleDigest), PullError> {
        let client = self.client();
        let auth = registry_auth(credential);
        let (manifest, _digest) =
            client.pull_image_manifest(reference, &auth).await.map_err(|e| oci_error(reference, e))?;
        let layer = wasm_layer(&manifest)?;
        let expected =
            layer.digest.strip_prefix("sha256:").and_then(ModuleDigest::parse).ok_or_else(|| {
                PullError::NotWasm(format!("layer digest {:?} is not a sha256 digest", layer.digest))
            })?;
        if layer.size < 0 || layer.size as u64 > self.max_size {
            return Err(PullError::TooLarge { size: layer.size.max(0) as u64, limit: self.max_size });
        }
        let stream = client.pull_blob_stream(reference, layer).await.map_err(|e| oci_error(reference, e))?;
        if let Some(len) = stream.content_length
            && len > self.max_size
        {
            return Err(PullError::TooLarge { size: len, limit: self.max_size });
        }
        let bytes = self.collect(stream.stream).await?;
        verify(&bytes, expected)?;
        Ok((bytes, expected))
    }

    /// Downloads a digest-pinned module URL.
    pub async fn pull_url(&self, url: &str, digest: ModuleDigest) -> Result<Vec<u8>, PullError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .user_agent(USER_AGENT);
        for pem in &self.roots {
            let cert = reqwest::Certificate::from_pem(pem)
                .map_err(|e| PullError::Network(format!("CA file: {e}")))?;
            builder = builder.add_root_certificate(cert);
        }
        let client = builder.build().map_err(|e| PullError::Network(format!("HTTP client: {e}")))?;
        let resp =
            client.get(url).send().await.map_err(|e| PullError::Network(format!("{url}: {}", chain(&e))))?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(PullError::NotFound(format!("{url} answered 404 Not Found")));
        }
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(PullError::Unauthorized(format!("{url} answered {status}")));
        }
        if !status.is_success() {
            let e = format!("{url} answered {status}");
            return Err(if status.is_server_error() {
                PullError::Network(e)
            } else {
                PullError::Registry(e)
            });
        }
        if let Some(len) = resp.content_length()
            && len > self.max_size
        {
            return Err(PullError::TooLarge { size: len, limit: self.max_size });
        }
        let bytes = self.collect(resp.bytes_stream()).await?;
        verify(&bytes, digest)?;
        Ok(bytes)
    }

    async fn collect<B: AsRef<[u8]>, E: std::error::Error>(
        &self,
        mut stream: impl futures::Stream<Item = Result<B, E>> + Unpin,
    ) -> Result<Vec<u8>, PullError> {
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| PullError::Network(format!("download interrupted: {}", chain(&e))))?;
            let chunk = chunk.as_ref();
            if (out.len() + chunk.len()) as u64 > self.max_size {
                return Err(PullError::TooLarge {
                    size: (out.len() + chunk.len()) as u64,
                    limit: self.max_size,
                });
            }
            out.extend_from_slice(chunk);
        }
        Ok(out)
    }

    /// Pushes `wasm` as a CNCF Wasm artifact; returns the manifest's digest.
    pub async fn push_oci(
        &self,
        reference: &Reference,
        wasm: Vec<u8>,
        credential: Option<&Credential>,
    ) -> Result<String, PullError> {
        let digest = ModuleDigest::of(&wasm);
        let config = serde_json::json!({
            "created": jiff::Timestamp::now().to_string(),
            "architecture": "wasm",
            "os": "wasip1",
            "layerDigests": [digest.to_string()],
        });
        let config = oci_client::client::Config::new(
            serde_json::to_vec(&config).unwrap_or_default(),
            WASM_CONFIG_V0.to_owned(),
            None,
        );
        let layers = [oci_client::client::ImageLayer::new(wasm, WASM_LAYER.to_owned(), None)];
        let mut manifest = OciImageManifest::build(&layers, &config, None);
        manifest.artifact_type = Some(WASM_CONFIG_V0.to_owned());
        let client = self.client();
        let auth = registry_auth(credential);
        client
            .push(reference, &layers, config, &auth, Some(manifest.clone()))
            .await
            .map_err(|e| oci_error(reference, e))?;
        let body = serde_json::to_vec(&manifest).map_err(|e| PullError::Registry(e.to_string()))?;
        // The registry stores the manifest exactly as sent, so its digest is that of these bytes.
        Ok(format!("sha256:{}", ModuleDigest(Sha256::digest(&body).into()).hex()))
    }
}

pub(crate) fn registry_auth(credential: Option<&Credential>) -> RegistryAuth {
    match credential {
        None => RegistryAuth::Anonymous,
        Some(Credential::Basic { username, password }) => {
            RegistryAuth::Basic(username.clone(), password.clone())
        }
        Some(Credential::Bearer(token)) => RegistryAuth::Bearer(token.clone()),
    }
}

/// The one wasm layer of a Wasm artifact manifest, or why the artifact is not one.
fn wasm_layer(manifest: &OciImageManifest) -> Result<&OciDescriptor, PullError> {
    let config = manifest.config.media_type.as_str();
    if config.starts_with("application/vnd.oci.image.config") || config.starts_with("application/vnd.docker.")
    {
        return Err(PullError::NotWasm(format!(
            "the reference is a container image (config {config}), not a Wasm OCI artifact; push the \
             .wasm with `lichen push` (or any tool writing {WASM_LAYER} layers)"
        )));
    }
    let wasm: Vec<&OciDescriptor> = manifest
        .layers
        .iter()
        .filter(|l| l.media_type == WASM_LAYER || l.media_type == WASM_TO_OCI_LAYER)
        .collect();
    match (wasm.as_slice(), manifest.layers.len()) {
        ([one], 1) => Ok(one),
        ([], _) => Err(PullError::NotWasm(format!(
            "the artifact has no WebAssembly layer (layers: {}); expected one {WASM_LAYER} or {WASM_TO_OCI_LAYER} layer",
            describe_layers(&manifest.layers)
        ))),
        _ => Err(PullError::NotWasm(format!(
            "the artifact has {} layers ({}); a Wasm module artifact has exactly one",
            manifest.layers.len(),
            describe_layers(&manifest.layers)
        ))),
    }
}

fn describe_layers(layers: &[OciDescriptor]) -> String {
    if layers.is_empty() {
        return "none".into();
    }
    layers.iter().map(|l| l.media_type.as_str()).collect::<Vec<_>>().join(", ")
}

/// From an image index, the entry for WebAssembly (`wasip1`/`wasi` on `wasm`), else the only entry.
fn wasm_platform(entries: &[ImageIndexEntry]) -> Option<String> {
    let wasm = entries.iter().find(|e| {
        e.platform
            .as_ref()
            .is_some_and(|p| p.architecture.to_string() == "wasm" || p.os.to_string().starts_with("wasi"))
    });
    match (wasm, entries) {
        (Some(e), _) => Some(e.digest.clone()),
        (None, [only]) => Some(only.digest.clone()),
        _ => None,
    }
}

fn verify(bytes: &[u8], expected: ModuleDigest) -> Result<(), PullError> {
    let actual = ModuleDigest::of(bytes);
    if actual != expected {
        return Err(PullError::DigestMismatch { expected, actual });
    }
    Ok(())
}

/// Sorts `oci-client`'s errors into what the user can act on, and what is worth retrying.
fn oci_error(reference: &Reference, e: OciDistributionError) -> PullError {
    use OciDistributionError as E;
    let registry = reference.resolve_registry();
    match e {
        E::AuthenticationFailure(m) | E::UnauthorizedError { url: m } => PullError::Unauthorized(format!(
            "{registry} refused the credentials ({m}); check the pod's imagePullSecrets"
        )),
        E::ImageManifestNotFoundError(m) => PullError::NotFound(format!("{}: {m}", reference.whole())),
        E::RegistryError { envelope, url } => {
            let codes: Vec<String> =
                envelope.errors.iter().map(|e| format!("{:?}: {}", e.code, e.message)).collect();
            let text = format!("{url}: {}", codes.join("; "));
            if text.contains("NotFound") || text.contains("Unknown") {
                PullError::NotFound(format!("{} not found in {registry} ({text})", reference.whole()))
            } else if text.contains("Unauthorized") || text.contains("Denied") {
                PullError::Unauthorized(format!("{registry}: {text}; check the pod's imagePullSecrets"))
            } else {
                PullError::Registry(text)
            }
        }
        E::ServerError { code, url, message } if (500..600).contains(&code) => {
            PullError::Network(format!("{url} answered {code}: {message}"))
        }
        E::ServerError { code: 404, url, message } => PullError::NotFound(format!("{url}: {message}")),
        E::ServerError { code, url, message } if code == 401 || code == 403 => PullError::Unauthorized(
            format!("{url} answered {code}: {message}; check the pod's imagePullSecrets"),
        ),
        E::RequestError(e) => PullError::Network(format!("{registry}: {}", chain(&e))),
        E::IoError(e) => PullError::Network(format!("{registry}: {e}")),
        E::DigestError(e) => PullError::Registry(format!("{registry}: {e}")),
        E::UnsupportedMediaTypeError(m) => {
            PullError::NotWasm(format!("{} has an unsupported manifest media type {m}", reference.whole()))
        }
        other => PullError::Registry(format!("{registry}: {other}")),
    }
}

/// An error with its sources, which is where reqwest keeps the reason ("connection refused").
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// rustls needs one process-wide crypto provider; Lichen uses ring everywhere (no C toolchain
/// beyond a cross gcc is needed to build it for ARM).
fn install_crypto_provider() {
    // Err means one is installed already, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(media_type: &str) -> OciDescriptor {
        OciDescriptor {
            media_type: media_type.into(),
            digest: format!("sha256:{}", "0".repeat(64)),
            size: 10,
            ..OciDescriptor::default()
        }
    }

    fn manifest(config: &str, layers: &[&str]) -> OciImageManifest {
        OciImageManifest {
            config: desc(config),
            layers: layers.iter().map(|m| desc(m)).collect(),
            ..OciImageManifest::default()
        }
    }

    #[test]
    fn both_wasm_layouts_are_accepted() {
        assert!(wasm_layer(&manifest(WASM_CONFIG_V0, &[WASM_LAYER])).is_ok());
        assert!(wasm_layer(&manifest(WASM_TO_OCI_CONFIG, &[WASM_TO_OCI_LAYER])).is_ok());
    }

    #[test]
    fn other_artifacts_are_refused_with_the_media_types() {
        let e = wasm_layer(&manifest("application/vnd.oci.image.config.v1+json", &["x"])).unwrap_err();
        assert!(e.to_string().contains("container image"), "{e}");
        let e = wasm_layer(&manifest(WASM_CONFIG_V0, &["application/vnd.oci.image.layer.v1.tar+gzip"]))
            .unwrap_err();
        assert!(e.to_string().contains("tar+gzip"), "{e}");
        let e = wasm_layer(&manifest(WASM_CONFIG_V0, &[WASM_LAYER, WASM_LAYER])).unwrap_err();
        assert!(e.to_string().contains("exactly one"), "{e}");
    }
}
