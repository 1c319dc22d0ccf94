//! Agent images on the network: publishing them (`lichen push --agent`, `lichen sign`), and on a
//! node resolving a pinned image to this platform's binary, checking its signature, and
//! downloading it, resumably, into a directory the caller names.
//!
//! Registries are reached exactly as for modules: a client from [`Fetcher`] (the same
//! `modules.insecure_registries` and `modules.registry_ca_files`), the same [`Credential`]s. Every
//! manifest and blob is checked against the digest that named it before it is believed; nothing
//! here runs, stages or switches a binary (that is the upgrader's).

use std::path::{Path, PathBuf};

use futures::StreamExt;
use oci_client::Reference;
use oci_client::client::{BlobResponse, SizedStream};
use oci_client::errors::{DigestError, OciDistributionError};
use oci_client::manifest::OciDescriptor;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::artifact::{
    self, AGENT_CONFIG, ArtifactError, Descriptor, OCI_INDEX, OCI_MANIFEST, Platform, PlatformArtifact,
    digest_hex, sha256_digest,
};
use super::signature::{self, KeyError, SignatureError, SigningKey, TrustedKeys};
use crate::config::ModulesConfig;
use crate::modules::fetch::{chain, registry_auth};
use crate::modules::{Credential, Fetcher, FetcherError};

/// Docker's manifest media type, which a `.sig` image written by older cosign may carry.
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// The largest config blob or signature payload read into memory.
const SMALL_BLOB_LIMIT: u64 = 256 << 10;
/// The most signature layers looked at (one per signer).
const MAX_SIGNATURES: usize = 32;
/// Free space kept beyond the binary, for the store and logs that share the disk.
pub const FREE_SPACE_MARGIN: u64 = 16 << 20;

/// Why an agent image could not be published, resolved, verified or downloaded.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeFetchError {
    /// The reference is not a valid OCI reference.
    #[error("{reference:?} is not an OCI reference (registry/repository[:tag][@sha256:digest]): {source}")]
    BadReference {
        /// What was given.
        reference: String,
        /// Why.
        #[source]
        source: oci_client::ParseError,
    },
    /// A node upgrade, or a signature, names an image by tag only.
    #[error("{0} is not pinned by digest: name the image as <registry>/<repo>@sha256:<digest>")]
    NotPinned(String),
    /// A push was given a reference with a digest.
    #[error("{0} names a digest; push to a tag (the digest is printed once pushed)")]
    PushToDigest(String),
    /// The registry could not be reached, or the connection broke (worth retrying).
    #[error("{what}: {detail}")]
    Network {
        /// What was being done.
        what: String,
        /// The error with its causes.
        detail: String,
        /// The client's error.
        #[source]
        source: OciDistributionError,
    },
    /// A download broke off mid-blob (worth retrying; the part kept resumes).
    #[error("{what}: download interrupted after {received} bytes: {source}")]
    Interrupted {
        /// What was being downloaded.
        what: String,
        /// Bytes in the part file.
        received: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The registry answered 5xx (worth retrying).
    #[error("{what}: the registry failed: {detail}")]
    Server {
        /// What was being done.
        what: String,
        /// The answer.
        detail: String,
        /// The client's error.
        #[source]
        source: OciDistributionError,
    },
    /// The registry has no such manifest, tag or blob.
    #[error("{what}: not found: {detail}")]
    NotFound {
        /// What was asked for.
        what: String,
        /// The registry's answer.
        detail: String,
        /// The client's error.
        #[source]
        source: OciDistributionError,
    },
    /// The registry refused the credentials (or their absence).
    #[error("{what}: unauthorized: {detail}; give --username and --password-stdin")]
    Unauthorized {
        /// What was being done.
        what: String,
        /// The registry's answer.
        detail: String,
        /// The client's error.
        #[source]
        source: OciDistributionError,
    },
    /// The registry refused the request otherwise.
    #[error("{what}: the registry refused: {detail}")]
    Registry {
        /// What was being done.
        what: String,
        /// The registry's answer.
        detail: String,
        /// The client's error.
        #[source]
        source: OciDistributionError,
    },
    /// The image is not an agent image, or not one for this node.
    #[error("{what}: {source}")]
    Artifact {
        /// The image or file.
        what: String,
        /// What is wrong.
        #[source]
        source: ArtifactError,
    },
    /// The signature check failed (unsigned, signed by another key, for another image).
    #[error("{what}: {source}")]
    Signature {
        /// The image.
        what: String,
        /// Why it is not trusted.
        #[source]
        source: SignatureError,
    },
    /// A key file cannot be used.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Content does not hash to the digest that named it.
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// What was checked.
        what: String,
        /// The digest that named it.
        expected: String,
        /// The digest of what came.
        actual: String,
    },
    /// The binary is bigger than the caller allows.
    #[error("{what} is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// What.
        what: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Not enough free space for the download.
    #[error("not enough free space in {}: the download needs {needed} bytes (with a {margin}-byte margin), {available} are free", dir.display())]
    NoSpace {
        /// The directory.
        dir: PathBuf,
        /// Bytes needed, margin included.
        needed: u64,
        /// The margin kept.
        margin: u64,
        /// Bytes free to unprivileged users.
        available: u64,
    },
    /// A local file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The registry settings cannot be used (an unreadable CA file).
    #[error(transparent)]
    Fetcher(#[from] FetcherError),
}

impl UpgradeFetchError {
    /// Whether trying again later may succeed (the network, the registry's 5xx); otherwise the
    /// image itself, the keys or this node are wrong, and retrying the same digest is pointless.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            UpgradeFetchError::Network { .. }
                | UpgradeFetchError::Interrupted { .. }
                | UpgradeFetchError::Server { .. }
        )
    }
}

/// What `lichen push --agent` published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedAgent {
    /// The index's digest, `sha256:<hex>`.
    pub index_digest: String,
    /// `<registry>/<repo>@sha256:<hex>`: the value for the Node annotation.
    pub pinned: String,
    /// Each platform's version and binary digest.
    pub platforms: Vec<(Platform, String, String)>,
}

/// An agent image resolved for one platform: what a node downloads and runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The image, pinned by its index digest.
    pub reference: Reference,
    /// The platform.
    pub platform: Platform,
    /// The index's digest.
    pub index_digest: String,
    /// This platform's manifest digest.
    pub manifest_digest: String,
    /// The agent's version, from the manifest's config.
    pub version: String,
    /// The binary's digest, `sha256:<hex>`.
    pub binary_digest: String,
    /// The binary's size in bytes.
    pub binary_size: u64,
}

/// Parses an image reference (`registry/repo:tag`, `registry/repo@sha256:<hex>`).
pub fn parse_reference(text: &str) -> Result<Reference, UpgradeFetchError> {
    text.trim()
        .parse()
        .map_err(|source| UpgradeFetchError::BadReference { reference: text.to_owned(), source })
}

/// The digest of a reference pinned by digest, or why it is not.
fn pinned_digest(reference: &Reference) -> Result<&str, UpgradeFetchError> {
    reference
        .digest()
        .filter(|d| digest_hex(d).is_some())
        .ok_or_else(|| UpgradeFetchError::NotPinned(reference.whole()))
}

/// `registry/repo`, as signatures name an image (cosign's docker-reference).
fn repository_name(reference: &Reference) -> String {
    format!("{}/{}", reference.registry(), reference.repository())
}

/// Agent images in registries.
#[derive(Clone)]
pub struct AgentRegistry {
    fetcher: Fetcher,
}

impl AgentRegistry {
    /// Reaches registries as modules do (`modules.insecure_registries`, `modules.registry_ca_files`).
    pub fn new(config: &ModulesConfig) -> Result<Self, UpgradeFetchError> {
        Ok(AgentRegistry { fetcher: Fetcher::new(config)? })
    }

    async fn client(&self, reference: &Reference, credential: Option<&Credential>) -> oci_client::Client {
        let client = self.fetcher.client();
        client.store_auth_if_needed(reference.resolve_registry(), &registry_auth(credential)).await;
        client
    }

    /// Publishes `binaries` (Lichen executables, one per platform) as one agent image at
    /// `reference` (a tag): a manifest per binary, then the index naming them.
    pub async fn push_agent(
        &self,
        reference: &Reference,
        binaries: &[PathBuf],
        credential: Option<&Credential>,
    ) -> Result<PushedAgent, UpgradeFetchError> {
        if reference.digest().is_some() {
            return Err(UpgradeFetchError::PushToDigest(reference.whole()));
        }
        let mut artifacts = Vec::new();
        let mut bytes = Vec::new();
        for path in binaries {
            let binary = tokio::fs::read(path)
                .await
                .map_err(|source| UpgradeFetchError::Io { path: path.clone(), source })?;
            let a = PlatformArtifact::new(&binary)
                .map_err(|source| UpgradeFetchError::Artifact { what: path.display().to_string(), source })?;
            if let Some(other) = artifacts.iter().position(|o: &PlatformArtifact| o.platform == a.platform) {
                return Err(UpgradeFetchError::Artifact {
                    what: format!("{} and {}", binaries[other].display(), path.display()),
                    source: ArtifactError::DuplicatePlatform(a.platform),
                });
            }
            artifacts.push(a);
            bytes.push(binary);
        }
        let index = artifact::agent_index(&artifacts)
            .map_err(|source| UpgradeFetchError::Artifact { what: reference.whole(), source })?;
        let client = self.client(reference, credential).await;
        for (a, binary) in artifacts.iter().zip(bytes) {
            let what = format!("pushing the {} binary to {}", a.platform, reference.whole());
            push_blob(&client, reference, binary, &a.binary.digest, &what).await?;
            push_blob(&client, reference, a.config.clone(), &sha256_digest(&a.config), &what).await?;
            let at = reference.clone_with_digest(sha256_digest(&a.manifest));
            push_manifest(&client, &at, a.manifest.clone(), OCI_MANIFEST, &what).await?;
        }
        let index_digest = sha256_digest(&index);
        push_manifest(
            &client,
            reference,
            index,
            OCI_INDEX,
            &format!("pushing the index to {}", reference.whole()),
        )
        .await?;
        Ok(PushedAgent {
            pinned: format!("{}@{index_digest}", repository_name(reference)),
            index_digest,
            platforms: artifacts.into_iter().map(|a| (a.platform, a.version, a.binary.digest)).collect(),
        })
    }

    /// Signs the image `reference` (pinned by digest) with `key`, cosign-style: adds a layer to
    /// the `sha256-<hex>.sig` image in the same repository (made if missing, so several signers
    /// may sign). Returns the signature image's reference.
    pub async fn push_signature(
        &self,
        reference: &Reference,
        key: &SigningKey,
        credential: Option<&Credential>,
    ) -> Result<String, UpgradeFetchError> {
        let digest = pinned_digest(reference)?.to_owned();
        let client = self.client(reference, credential).await;
        let what = format!("signing {}", reference.whole());
        // The signed image must exist (signing a typo would leave a signature for nothing).
        let (body, _) = pull_manifest(&client, reference, &[OCI_INDEX, OCI_MANIFEST], &what).await?;
        check_digest(&body, &digest, &what)?;
        let tag = signature::signature_tag(&digest)
            .ok_or_else(|| UpgradeFetchError::NotPinned(reference.whole()))?;
        let sig_ref = Reference::with_tag(reference.registry().into(), reference.repository().into(), tag);
        let existing = match pull_manifest(&client, &sig_ref, &[OCI_MANIFEST, DOCKER_MANIFEST], &what).await {
            Ok((body, _)) => Some(body),
            Err(UpgradeFetchError::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        let payload = signature::simple_signing_payload(&repository_name(reference), &digest);
        let layer = signature::signature_layer(&payload, &key.sign(&payload)?);
        let (config, manifest) = signature::signature_image(existing.as_deref(), layer)
            .map_err(|source| UpgradeFetchError::Signature { what: sig_ref.whole(), source })?;
        let payload_digest = sha256_digest(&payload);
        push_blob(&client, &sig_ref, payload, &payload_digest, &what).await?;
        push_blob(&client, &sig_ref, config.clone(), &sha256_digest(&config), &what).await?;
        push_manifest(&client, &sig_ref, manifest, OCI_MANIFEST, &what).await?;
        Ok(sig_ref.whole())
    }

    /// Resolves `reference` (pinned by its index digest) to `platform`'s binary: fetches the index
    /// and checks it hashes to the pinned digest, picks the platform's manifest, fetches it and its
    /// config, and checks their media types and digests.
    pub async fn resolve(
        &self,
        reference: &Reference,
        platform: Platform,
        credential: Option<&Credential>,
    ) -> Result<Resolved, UpgradeFetchError> {
        let index_digest = pinned_digest(reference)?.to_owned();
        let client = self.client(reference, credential).await;
        let what = reference.whole();
        let artifact_err = |source| UpgradeFetchError::Artifact { what: what.clone(), source };
        // Single manifests are accepted too, to be refused by name rather than by a registry's
        // "not found" for an Accept header that does not fit.
        let (index, _) =
            pull_manifest(&client, reference, &[OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST], &what).await?;
        check_digest(&index, &index_digest, &format!("the index of {what}"))?;
        let entry = artifact::select_platform(&index, platform).map_err(artifact_err)?;
        let at = reference.clone_with_digest(entry.digest.clone());
        let (manifest, _) = pull_manifest(&client, &at, &[OCI_MANIFEST], &what).await?;
        check_digest(&manifest, &entry.digest, &format!("the {platform} manifest of {what}"))?;
        let (config_desc, layer) = artifact::manifest_parts(&manifest).map_err(artifact_err)?;
        let config =
            small_blob(&client, reference, &config_desc, &format!("the {AGENT_CONFIG} of {what}")).await?;
        let config = artifact::parse_config(&config, &layer, platform).map_err(artifact_err)?;
        Ok(Resolved {
            reference: reference.clone(),
            platform,
            index_digest,
            manifest_digest: entry.digest,
            version: config.version,
            binary_digest: layer.digest,
            binary_size: layer.size,
        })
    }

    /// Checks that `reference` (pinned by digest) is signed by one of `keys`: fetches the
    /// `sha256-<hex>.sig` image and its payloads and verifies them (a missing one is "unsigned").
    pub async fn verify_signature(
        &self,
        reference: &Reference,
        keys: &TrustedKeys,
        credential: Option<&Credential>,
    ) -> Result<(), UpgradeFetchError> {
        let digest = pinned_digest(reference)?.to_owned();
        let client = self.client(reference, credential).await;
        let what = reference.whole();
        let tag =
            signature::signature_tag(&digest).ok_or_else(|| UpgradeFetchError::NotPinned(what.clone()))?;
        let sig_ref =
            Reference::with_tag(reference.registry().into(), reference.repository().into(), tag.clone());
        let manifest = match pull_manifest(&client, &sig_ref, &[OCI_MANIFEST, DOCKER_MANIFEST], &what).await {
            Ok((body, _)) => body,
            Err(UpgradeFetchError::NotFound { .. }) => {
                return Err(UpgradeFetchError::Signature { what, source: SignatureError::Unsigned { tag } });
            }
            Err(e) => return Err(e),
        };
        let sig_err = |source| UpgradeFetchError::Signature { what: what.clone(), source };
        let layers = signature::signature_layers(&manifest).map_err(sig_err)?;
        let mut fetched = Vec::new();
        for layer in layers.into_iter().take(MAX_SIGNATURES) {
            let payload =
                small_blob(&client, &sig_ref, &layer, &format!("a signature payload of {what}")).await;
            match payload {
                Ok(p) => fetched.push((layer, p)),
                // A payload that does not match its layer is no signature.
                Err(UpgradeFetchError::DigestMismatch { .. }) => {
                    return Err(sig_err(SignatureError::PayloadDigest(layer.digest)));
                }
                Err(e) => return Err(e),
            }
        }
        signature::verify_layers(&digest, &tag, &fetched, keys).map_err(sig_err)
    }

    /// Downloads the binary of `resolved` into `dir` as `<hex>` (its digest), through
    /// `<hex>.part`: a part left by an earlier attempt is resumed with an HTTP range request
    /// (started over if the registry ignores ranges); the whole file is synced and checked against
    /// the digest before it is renamed. A part that does not check out is removed, so the next
    /// attempt starts from zero. Refuses a binary over `max_size`, or one the free space of `dir`
    /// (less [`FREE_SPACE_MARGIN`]) cannot hold. `dir` is made if missing; one download at a time
    /// may use it.
    pub async fn download(
        &self,
        resolved: &Resolved,
        dir: &Path,
        max_size: u64,
        credential: Option<&Credential>,
    ) -> Result<PathBuf, UpgradeFetchError> {
        let what = format!("the {} binary of {}", resolved.platform, resolved.reference.whole());
        let size = resolved.binary_size;
        if size > max_size {
            return Err(UpgradeFetchError::TooLarge { what, size, limit: max_size });
        }
        let hex = digest_hex(&resolved.binary_digest).ok_or_else(|| UpgradeFetchError::Artifact {
            what: what.clone(),
            source: ArtifactError::NotAgent(format!(
                "binary digest {:?} is not sha256",
                resolved.binary_digest
            )),
        })?;
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|source| UpgradeFetchError::Io { path: dir.to_owned(), source })?;
        let done = dir.join(hex);
        let part = dir.join(format!("{hex}.part"));
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| UpgradeFetchError::Io { path, source }
        };
        if tokio::fs::try_exists(&done).await.map_err(io(&done))? {
            if file_digest(&done).await.map_err(io(&done))? == resolved.binary_digest {
                return Ok(done);
            }
            tokio::fs::remove_file(&done).await.map_err(io(&done))?;
        }
        let mut have = match tokio::fs::metadata(&part).await {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io(&part)(e)),
        };
        if have > size {
            tokio::fs::remove_file(&part).await.map_err(io(&part))?;
            have = 0;
        }
        check_free_space(dir, size - have)?;

        if have < size {
            let client = self.client(&resolved.reference, credential).await;
            let desc = OciDescriptor {
                media_type: artifact::AGENT_BINARY.into(),
                digest: resolved.binary_digest.clone(),
                size: size as i64,
                ..OciDescriptor::default()
            };
            let mut file = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&part)
                .await
                .map_err(io(&part))?;
            let stream = if have > 0 {
                match client
                    .pull_blob_stream_partial(&resolved.reference, &desc, have, None)
                    .await
                    .map_err(|e| oci_error(&what, e))?
                {
                    BlobResponse::Partial(s) => s,
                    // The registry ignored the range: the answer is the whole blob.
                    BlobResponse::Full(s) => {
                        file.set_len(0).await.map_err(io(&part))?;
                        have = 0;
                        s
                    }
                }
            } else {
                client.pull_blob_stream(&resolved.reference, &desc).await.map_err(|e| oci_error(&what, e))?
            };
            have = write_stream(stream, &mut file, have, size, &what, &part).await?;
            file.sync_all().await.map_err(io(&part))?;
            drop(file);
        }
        let actual = file_digest(&part).await.map_err(io(&part))?;
        if have != size || actual != resolved.binary_digest {
            tokio::fs::remove_file(&part).await.map_err(io(&part))?;
            return Err(UpgradeFetchError::DigestMismatch {
                what,
                expected: resolved.binary_digest.clone(),
                actual,
            });
        }
        tokio::fs::rename(&part, &done).await.map_err(io(&done))?;
        // The rename is durable once the directory is synced.
        if let Ok(d) = tokio::fs::File::open(dir).await {
            let _ = d.sync_all().await;
        }
        Ok(done)
    }
}

/// Appends `stream` to `file` (which holds `have` bytes); returns the bytes it then holds. Stops
/// at `size` plus one byte (a registry sending more is caught by the digest check), and on the
/// client's own digest check failing (the caller's check over the whole file reports it).
async fn write_stream(
    mut stream: SizedStream,
    file: &mut tokio::fs::File,
    mut have: u64,
    size: u64,
    what: &str,
    part: &Path,
) -> Result<u64, UpgradeFetchError> {
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) if e.get_ref().is_some_and(|i| i.is::<DigestError>()) => break,
            Err(source) => {
                let _ = file.flush().await;
                return Err(UpgradeFetchError::Interrupted { what: what.to_owned(), received: have, source });
            }
        };
        file.write_all(&chunk)
            .await
            .map_err(|source| UpgradeFetchError::Io { path: part.to_owned(), source })?;
        have += chunk.len() as u64;
        if have > size {
            break;
        }
    }
    file.flush().await.map_err(|source| UpgradeFetchError::Io { path: part.to_owned(), source })?;
    Ok(have)
}

/// Refuses a download of `bytes` more into `dir` when the free space cannot hold them and the
/// margin.
fn check_free_space(dir: &Path, bytes: u64) -> Result<(), UpgradeFetchError> {
    let stat = rustix::fs::statvfs(dir)
        .map_err(|e| UpgradeFetchError::Io { path: dir.to_owned(), source: e.into() })?;
    let available = stat.f_bavail.saturating_mul(stat.f_frsize);
    let needed = bytes.saturating_add(FREE_SPACE_MARGIN);
    if available < needed {
        return Err(UpgradeFetchError::NoSpace {
            dir: dir.to_owned(),
            needed,
            margin: FREE_SPACE_MARGIN,
            available,
        });
    }
    Ok(())
}

/// `sha256:<hex>` of a file's contents.
async fn file_digest(path: &Path) -> std::io::Result<String> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", artifact::hex(&hasher.finalize())))
}

fn check_digest(bytes: &[u8], expected: &str, what: &str) -> Result<(), UpgradeFetchError> {
    let actual = sha256_digest(bytes);
    if actual != expected {
        return Err(UpgradeFetchError::DigestMismatch {
            what: what.to_owned(),
            expected: expected.to_owned(),
            actual,
        });
    }
    Ok(())
}

/// A manifest's exact bytes (`accept`: the media types asked for).
async fn pull_manifest(
    client: &oci_client::Client,
    reference: &Reference,
    accept: &[&str],
    what: &str,
) -> Result<(Vec<u8>, String), UpgradeFetchError> {
    let auth = oci_client::secrets::RegistryAuth::Anonymous;
    // The credential was stored with the client; the anonymous one here does not replace it.
    let (body, digest) = client
        .pull_manifest_raw(reference, &auth, accept)
        .await
        .map_err(|e| oci_error(&format!("{what}: fetching {}", reference.whole()), e))?;
    Ok((body.to_vec(), digest))
}

/// A small blob (a config, a signature payload) read whole and checked against its digest.
async fn small_blob(
    client: &oci_client::Client,
    reference: &Reference,
    desc: &Descriptor,
    what: &str,
) -> Result<Vec<u8>, UpgradeFetchError> {
    if desc.size > SMALL_BLOB_LIMIT {
        return Err(UpgradeFetchError::TooLarge {
            what: what.to_owned(),
            size: desc.size,
            limit: SMALL_BLOB_LIMIT,
        });
    }
    let oci = OciDescriptor {
        media_type: desc.media_type.clone(),
        digest: desc.digest.clone(),
        size: desc.size as i64,
        ..OciDescriptor::default()
    };
    let mut stream = client.pull_blob_stream(reference, &oci).await.map_err(|e| oci_error(what, e))?;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => out.extend_from_slice(&c),
            Err(e) if e.get_ref().is_some_and(|i| i.is::<DigestError>()) => break,
            Err(source) => {
                return Err(UpgradeFetchError::Interrupted {
                    what: what.to_owned(),
                    received: out.len() as u64,
                    source,
                });
            }
        }
        if out.len() as u64 > SMALL_BLOB_LIMIT {
            return Err(UpgradeFetchError::TooLarge {
                what: what.to_owned(),
                size: out.len() as u64,
                limit: SMALL_BLOB_LIMIT,
            });
        }
    }
    check_digest(&out, &desc.digest, what)?;
    Ok(out)
}

async fn push_blob(
    client: &oci_client::Client,
    reference: &Reference,
    data: Vec<u8>,
    digest: &str,
    what: &str,
) -> Result<(), UpgradeFetchError> {
    // A blob the repository has (an unchanged binary pushed again) is not uploaded twice.
    if client.blob_exists(reference, digest).await.unwrap_or(false) {
        return Ok(());
    }
    client.push_blob(reference, data, digest).await.map_err(|e| oci_error(what, e))?;
    Ok(())
}

async fn push_manifest(
    client: &oci_client::Client,
    reference: &Reference,
    body: Vec<u8>,
    media_type: &'static str,
    what: &str,
) -> Result<(), UpgradeFetchError> {
    client
        .push_manifest_raw(reference, body, reqwest::header::HeaderValue::from_static(media_type))
        .await
        .map_err(|e| oci_error(what, e))?;
    Ok(())
}

/// Sorts the client's errors into what can be retried and what cannot.
fn oci_error(what: &str, e: OciDistributionError) -> UpgradeFetchError {
    use OciDistributionError as E;
    let what = what.to_owned();
    let detail = chain(&e);
    match &e {
        E::RequestError(_) | E::IoError(_) => UpgradeFetchError::Network { what, detail, source: e },
        E::ServerError { code, .. } if (500..600).contains(code) => {
            UpgradeFetchError::Server { what, detail, source: e }
        }
        E::ServerError { code: 404, .. } | E::ImageManifestNotFoundError(_) => {
            UpgradeFetchError::NotFound { what, detail, source: e }
        }
        E::ServerError { code: 401 | 403, .. }
        | E::AuthenticationFailure(_)
        | E::UnauthorizedError { .. } => UpgradeFetchError::Unauthorized { what, detail, source: e },
        E::RegistryError { envelope, .. } => {
            use oci_client::errors::OciErrorCode as C;
            let codes: Vec<&C> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes
                .iter()
                .any(|c| matches!(c, C::ManifestUnknown | C::BlobUnknown | C::NameUnknown | C::NotFound))
            {
                UpgradeFetchError::NotFound { what, detail, source: e }
            } else if codes.iter().any(|c| matches!(c, C::Unauthorized | C::Denied)) {
                UpgradeFetchError::Unauthorized { what, detail, source: e }
            } else {
                UpgradeFetchError::Registry { what, detail, source: e }
            }
        }
        _ => UpgradeFetchError::Registry { what, detail, source: e },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_network_and_the_registrys_failures_are_retried() {
        let io = || std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let server = OciDistributionError::ServerError { code: 503, url: "u".into(), message: "busy".into() };
        assert!(oci_error("x", server).is_retryable());
        assert!(oci_error("x", OciDistributionError::IoError(io())).is_retryable());
        let missing = OciDistributionError::ServerError { code: 404, url: "u".into(), message: "".into() };
        let e = oci_error("x", missing);
        assert!(matches!(e, UpgradeFetchError::NotFound { .. }) && !e.is_retryable());
        let denied = OciDistributionError::ServerError { code: 403, url: "u".into(), message: "".into() };
        assert!(!oci_error("x", denied).is_retryable());
        assert!(
            UpgradeFetchError::Interrupted { what: "b".into(), received: 3, source: io() }.is_retryable()
        );
        for permanent in [
            UpgradeFetchError::Signature {
                what: "i".into(),
                source: SignatureError::Unsigned { tag: "t".into() },
            },
            UpgradeFetchError::DigestMismatch { what: "b".into(), expected: "e".into(), actual: "a".into() },
            UpgradeFetchError::Artifact { what: "i".into(), source: ArtifactError::NotElf },
            UpgradeFetchError::NoSpace { dir: "/d".into(), needed: 2, margin: 1, available: 1 },
            UpgradeFetchError::TooLarge { what: "b".into(), size: 2, limit: 1 },
        ] {
            assert!(!permanent.is_retryable(), "{permanent}");
        }
    }

    #[test]
    fn a_tag_is_not_pinned() {
        let r = parse_reference("127.0.0.1:5000/lichen/agent:1.0").expect("ref");
        assert!(matches!(pinned_digest(&r), Err(UpgradeFetchError::NotPinned(_))));
        let pinned = format!("127.0.0.1:5000/lichen/agent@sha256:{}", "ab".repeat(32));
        let r = parse_reference(&pinned).expect("ref");
        assert_eq!(pinned_digest(&r).expect("pinned"), &pinned[pinned.len() - 71..]);
        assert_eq!(repository_name(&r), "127.0.0.1:5000/lichen/agent");
    }

    #[test]
    fn free_space_is_checked_before_a_download() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(check_free_space(dir.path(), 1).is_ok());
        let e = check_free_space(dir.path(), u64::MAX / 2).unwrap_err();
        let UpgradeFetchError::NoSpace { needed, available, .. } = &e else { panic!("{e}") };
        assert!(needed > available);
        let text = e.to_string();
        assert!(text.contains(&needed.to_string()) && text.contains(&available.to_string()), "{text}");
    }
}
