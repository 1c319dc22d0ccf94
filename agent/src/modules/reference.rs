//! What a container's `image:` names: an OCI artifact in a registry, a module over HTTPS pinned by
//! digest, or a file on this machine. Parsing is pure; nothing here touches the network or the disk.

use std::path::{Component, Path, PathBuf};

use oci_client::Reference;

use crate::config::ModulesConfig;
use crate::store::ModuleDigest;

/// Where a container's module comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleSource {
    /// A `.wasm` or `.wat` file on this machine.
    File(PathBuf),
    /// A Wasm OCI artifact: `registry/repo:tag` or `registry/repo@sha256:…`.
    Oci(Box<Reference>),
    /// A module served over HTTPS (or plain HTTP from an insecure host), pinned by its sha256.
    Url {
        /// The URL without the digest suffix.
        url: String,
        /// The sha256 the bytes must have.
        digest: ModuleDigest,
    },
}

impl ModuleSource {
    /// A stable description for logs and the module cache.
    pub fn describe(&self) -> String {
        match self {
            ModuleSource::File(p) => format!("file://{}", p.display()),
            ModuleSource::Oci(r) => r.whole(),
            ModuleSource::Url { url, digest } => format!("{url}@{digest}"),
        }
    }

    /// Whether the reference names its content by digest: then it can never change, and a cached
    /// copy is always the right one, whatever the pull policy.
    pub fn is_pinned(&self) -> bool {
        match self {
            ModuleSource::File(_) => false,
            ModuleSource::Oci(r) => r.digest().is_some(),
            ModuleSource::Url { .. } => true,
        }
    }

    /// The key under which the cache remembers which module this reference resolved to.
    pub fn cache_key(&self) -> String {
        self.describe()
    }
}

/// Why an `image:` cannot be used here. Each message names the image and says what would do.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// The image is empty.
    #[error("is required")]
    Required,
    /// A `file://` image with a relative path.
    #[error("{image:?}: a file:// image needs an absolute path (file:///opt/modules/app.wasm)")]
    FileNotAbsolute {
        /// The image as written.
        image: String,
    },
    /// A scheme other than `file`, `https` or `http`.
    #[error("{image:?}: unsupported scheme; use an OCI reference, https:// or file://")]
    UnsupportedScheme {
        /// The image as written.
        image: String,
    },
    /// A relative path in a pod from the cluster.
    #[error(
        "{image:?} is a relative path, which only static pods can use; use an OCI reference \
         (registry/repo:tag) or file:///absolute/path"
    )]
    RelativePath {
        /// The image as written.
        image: String,
    },
    /// Not an OCI reference.
    #[error("{image:?} is not a valid OCI reference: {source}")]
    InvalidOci {
        /// The image as written.
        image: String,
        /// What the reference grammar refused.
        #[source]
        source: oci_client::ParseError,
    },
    /// A digest with another algorithm than sha256.
    #[error("{image:?}: only sha256 digests are supported")]
    DigestAlgorithm {
        /// The image as written.
        image: String,
    },
    /// A `.cwasm` file.
    #[error(
        "{image:?}: precompiled artifacts are loaded only from Lichen's own cache; name the .wasm \
         (`lichen modules import` adds a precompiled artifact to the cache)"
    )]
    Precompiled {
        /// The image as written.
        image: String,
    },
    /// `..` in a cluster pod's file path.
    #[error("{image:?}: `..` is not allowed in a file:// image")]
    ParentDir {
        /// The image as written.
        image: String,
    },
    /// A cluster pod names a local file and the node allows no directory.
    #[error(
        "{image:?}: pods from the cluster may not load local files unless the node allows a \
         directory in `modules.file_dirs`; use an OCI reference"
    )]
    FilesNotAllowed {
        /// The image as written.
        image: String,
    },
    /// A cluster pod names a local file outside `modules.file_dirs`.
    #[error("{image:?} is outside the directories this node allows for file:// images ({allowed})")]
    OutsideFileDirs {
        /// The image as written.
        image: String,
        /// The allowed directories, comma-separated.
        allowed: String,
    },
    /// A URL without a digest.
    #[error("{image:?}: a URL image must pin its content with a digest: append @sha256:<hex of the module>")]
    UrlNotPinned {
        /// The image as written.
        image: String,
    },
    /// A URL whose digest is malformed.
    #[error("{image:?}: the digest must be sha256 followed by 64 hex digits")]
    UrlDigest {
        /// The image as written.
        image: String,
    },
    /// A URL without a host.
    #[error("{image:?}: the URL has no host")]
    UrlNoHost {
        /// The image as written.
        image: String,
    },
    /// Plain HTTP from a host not listed as insecure.
    #[error(
        "{image:?}: plain HTTP is allowed only for hosts listed in `modules.insecure_registries` \
         (add {host:?} there, or serve it over https)"
    )]
    PlainHttp {
        /// The image as written.
        image: String,
        /// The URL's host.
        host: String,
    },
}

/// Where a pod came from decides which local files it may name.
#[derive(Debug, Clone, Copy)]
pub enum ImageOrigin<'a> {
    /// A static pod: written by the board's administrator, so any local path is allowed, and
    /// relative paths are taken relative to the static pod directory.
    Static(&'a Path),
    /// A pod from the API server: `file://` only under `modules.file_dirs`.
    Cluster,
}

/// Resolves `image` to a module source, or says why it cannot be used here.
pub fn parse_image(
    image: &str,
    origin: ImageOrigin<'_>,
    config: &ModulesConfig,
) -> Result<ModuleSource, ReferenceError> {
    let image = image.trim();
    if image.is_empty() {
        return Err(ReferenceError::Required);
    }
    if let Some(p) = image.strip_prefix("file://") {
        let p = Path::new(p);
        if !p.is_absolute() {
            return Err(ReferenceError::FileNotAbsolute { image: image.to_owned() });
        }
        return local_file(image, p.to_owned(), origin, config);
    }
    if let Some(rest) = image.strip_prefix("https://").or_else(|| image.strip_prefix("http://")) {
        return url_source(image, rest, config);
    }
    if image.contains("://") {
        return Err(ReferenceError::UnsupportedScheme { image: image.to_owned() });
    }
    let looks_like_file = image.starts_with('/')
        || image.starts_with("./")
        || image.starts_with("../")
        || [".wasm", ".wat", ".cwasm"].iter().any(|ext| image.ends_with(ext));
    if looks_like_file {
        let p = Path::new(image);
        if p.is_absolute() {
            return local_file(image, p.to_owned(), origin, config);
        }
        return match origin {
            ImageOrigin::Static(base) => local_file(image, base.join(p), origin, config),
            ImageOrigin::Cluster => Err(ReferenceError::RelativePath { image: image.to_owned() }),
        };
    }
    let reference: Reference =
        image.parse().map_err(|source| ReferenceError::InvalidOci { image: image.to_owned(), source })?;
    if let Some(d) = reference.digest()
        && d.strip_prefix("sha256:").is_none_or(|hex| ModuleDigest::parse(hex).is_none())
    {
        return Err(ReferenceError::DigestAlgorithm { image: image.to_owned() });
    }
    Ok(ModuleSource::Oci(Box::new(reference)))
}

fn local_file(
    image: &str,
    path: PathBuf,
    origin: ImageOrigin<'_>,
    config: &ModulesConfig,
) -> Result<ModuleSource, ReferenceError> {
    if path.extension().is_some_and(|e| e == "cwasm") {
        return Err(ReferenceError::Precompiled { image: image.to_owned() });
    }
    if path.components().any(|c| c == Component::ParentDir) && matches!(origin, ImageOrigin::Cluster) {
        return Err(ReferenceError::ParentDir { image: image.to_owned() });
    }
    if let ImageOrigin::Cluster = origin
        && !config.file_dirs.iter().any(|d| path.starts_with(d))
    {
        let image = image.to_owned();
        return Err(if config.file_dirs.is_empty() {
            ReferenceError::FilesNotAllowed { image }
        } else {
            let dirs: Vec<String> = config.file_dirs.iter().map(|d| d.display().to_string()).collect();
            ReferenceError::OutsideFileDirs { image, allowed: dirs.join(", ") }
        });
    }
    Ok(ModuleSource::File(path))
}

fn url_source(image: &str, rest: &str, config: &ModulesConfig) -> Result<ModuleSource, ReferenceError> {
    // The digest is a suffix, `@sha256:<hex>` (as in OCI references) or a `#sha256=<hex>` fragment
    // (as pip writes it); a URL without one could change under a running fleet, so it is refused.
    let (url, hex) = if let Some((url, d)) = image.rsplit_once("@sha256:") {
        (url, d)
    } else if let Some((url, d)) = image.rsplit_once("#sha256=") {
        (url, d)
    } else {
        return Err(ReferenceError::UrlNotPinned { image: image.to_owned() });
    };
    let digest =
        ModuleDigest::parse(hex).ok_or_else(|| ReferenceError::UrlDigest { image: image.to_owned() })?;
    let host = rest.split(['/', '?', '#', '@']).next().unwrap_or("");
    if host.is_empty() {
        return Err(ReferenceError::UrlNoHost { image: image.to_owned() });
    }
    if image.starts_with("http://") && !config.insecure_registries.iter().any(|h| h == host) {
        return Err(ReferenceError::PlainHttp { image: image.to_owned(), host: host.to_owned() });
    }
    Ok(ModuleSource::Url { url: url.to_owned(), digest })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ModulesConfig {
        ModulesConfig {
            file_dirs: vec![PathBuf::from("/opt/modules")],
            insecure_registries: vec!["127.0.0.1:5000".into()],
            ..ModulesConfig::default()
        }
    }

    #[test]
    fn static_pods_may_use_any_local_path() {
        let c = config();
        let base = ImageOrigin::Static(Path::new("/pods"));
        assert_eq!(parse_image("a.wat", base, &c), Ok(ModuleSource::File("/pods/a.wat".into())));
        assert_eq!(parse_image("/srv/x.wasm", base, &c), Ok(ModuleSource::File("/srv/x.wasm".into())));
        assert_eq!(parse_image("file:///srv/x.wasm", base, &c), Ok(ModuleSource::File("/srv/x.wasm".into())));
        assert!(parse_image("file://rel/a.wasm", base, &c).is_err());
    }

    #[test]
    fn cluster_pods_only_use_allowed_directories() {
        let c = config();
        let ok = parse_image("file:///opt/modules/app.wasm", ImageOrigin::Cluster, &c);
        assert_eq!(ok, Ok(ModuleSource::File("/opt/modules/app.wasm".into())));
        let e = parse_image("file:///etc/shadow.wasm", ImageOrigin::Cluster, &c).unwrap_err().to_string();
        assert!(e.contains("outside the directories"), "{e}");
        let e = parse_image("file:///opt/modules/../../etc/x.wasm", ImageOrigin::Cluster, &c)
            .unwrap_err()
            .to_string();
        assert!(e.contains(".."), "{e}");
        let e = parse_image("app.wasm", ImageOrigin::Cluster, &c).unwrap_err().to_string();
        assert!(e.contains("relative path"), "{e}");
        let none = ModulesConfig::default();
        let e =
            parse_image("file:///opt/modules/app.wasm", ImageOrigin::Cluster, &none).unwrap_err().to_string();
        assert!(e.contains("modules.file_dirs"), "{e}");
    }

    #[test]
    fn precompiled_files_are_refused() {
        let e = parse_image("/opt/modules/app.cwasm", ImageOrigin::Static(Path::new("/")), &config());
        assert!(e.unwrap_err().to_string().contains("own cache"));
    }

    #[test]
    fn oci_references() {
        let c = config();
        let Ok(ModuleSource::Oci(r)) =
            parse_image("registry.lan:5000/acme/app:1.0", ImageOrigin::Cluster, &c)
        else {
            panic!("not an OCI reference");
        };
        assert_eq!((r.registry(), r.repository(), r.tag()), ("registry.lan:5000", "acme/app", Some("1.0")));
        let hex = "ab".repeat(32);
        let src = parse_image(&format!("ghcr.io/acme/app@sha256:{hex}"), ImageOrigin::Cluster, &c).unwrap();
        assert!(src.is_pinned());
        assert!(!parse_image("ghcr.io/acme/app:1", ImageOrigin::Cluster, &c).unwrap().is_pinned());
        assert!(
            parse_image("Bad Ref!", ImageOrigin::Cluster, &c)
                .unwrap_err()
                .to_string()
                .contains("not a valid OCI")
        );
    }

    #[test]
    fn urls_need_a_digest_and_https_unless_insecure() {
        let c = config();
        let hex = "cd".repeat(32);
        let src =
            parse_image(&format!("https://example.com/app.wasm@sha256:{hex}"), ImageOrigin::Cluster, &c);
        assert_eq!(
            src,
            Ok(ModuleSource::Url {
                url: "https://example.com/app.wasm".into(),
                digest: ModuleDigest([0xcd; 32])
            })
        );
        let frag =
            parse_image(&format!("https://example.com/app.wasm#sha256={hex}"), ImageOrigin::Cluster, &c);
        assert_eq!(frag, src);
        let e =
            parse_image("https://example.com/app.wasm", ImageOrigin::Cluster, &c).unwrap_err().to_string();
        assert!(e.contains("digest"), "{e}");
        let e = parse_image(&format!("http://example.com/a.wasm@sha256:{hex}"), ImageOrigin::Cluster, &c);
        assert!(e.unwrap_err().to_string().contains("insecure_registries"));
        assert!(
            parse_image(&format!("http://127.0.0.1:5000/a.wasm@sha256:{hex}"), ImageOrigin::Cluster, &c)
                .is_ok()
        );
        assert!(
            parse_image("ftp://x/y.wasm", ImageOrigin::Cluster, &c)
                .unwrap_err()
                .to_string()
                .contains("scheme")
        );
    }
}
