//! `lichen push --agent` and `lichen sign`: the build machine's side of fleet upgrades, publishing
//! agent binaries as one agent image and signing it cosign-style (README: Publishing and signing
//! an agent). Registries, credentials and CAs are those of modules (`modules.*`, `--username`,
//! `--password-stdin`).

use std::path::{Path, PathBuf};

use super::CliError;
use crate::config::AgentConfig;
use crate::upgrade::IMAGE_ANNOTATION;
use crate::upgrade::registry::{AgentRegistry, UpgradeFetchError, parse_reference};
use crate::upgrade::signature::SigningKey;

/// `lichen push --agent BINARY... REF [--sign-key KEY]`: prints each platform's version and binary
/// digest, the index digest, and the pinned reference to annotate nodes with.
pub async fn push_agent(
    config: &AgentConfig,
    binaries: &[PathBuf],
    reference: &str,
    sign_key: Option<&Path>,
    login: Option<(String, String)>,
) -> Result<String, CliError> {
    // A bad key is reported before anything is pushed.
    let key = sign_key.map(SigningKey::load).transpose().map_err(UpgradeFetchError::from)?;
    let reference = parse_reference(reference)?;
    let credential = super::modules::credential(login);
    let registry = AgentRegistry::new(&config.modules)?;
    let pushed = registry.push_agent(&reference, binaries, credential.as_ref()).await?;
    let mut out = String::new();
    for (platform, version, digest) in &pushed.platforms {
        out.push_str(&format!("{:<13} lichen {version}  binary {digest}\n", platform.to_string()));
    }
    out.push_str(&format!("pushed {} (index {})\n", reference.whole(), pushed.index_digest));
    if let Some(key) = &key {
        let pinned = parse_reference(&pushed.pinned)?;
        let sig = registry.push_signature(&pinned, key, credential.as_ref()).await?;
        out.push_str(&format!("signed: {sig}\n"));
    }
    out.push_str(&format!("image: {}\n", pushed.pinned));
    out.push_str(&format!("  kubectl annotate node NODE {IMAGE_ANNOTATION}={}\n", pushed.pinned));
    Ok(out)
}

/// `lichen sign --key KEY REF@sha256:DIGEST`.
pub async fn sign(
    config: &AgentConfig,
    key: &Path,
    reference: &str,
    login: Option<(String, String)>,
) -> Result<String, CliError> {
    let key = SigningKey::load(key).map_err(UpgradeFetchError::from)?;
    let reference = parse_reference(reference)?;
    let credential = super::modules::credential(login);
    let registry = AgentRegistry::new(&config.modules)?;
    let sig = registry.push_signature(&reference, &key, credential.as_ref()).await?;
    Ok(format!("signed {}: {sig}\n", reference.whole()))
}
