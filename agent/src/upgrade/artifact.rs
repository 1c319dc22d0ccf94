//! What an agent image is (README: Publishing and signing an agent): the media types of the OCI
//! image index `lichen push --agent` writes (one manifest per platform, each an artifact with a
//! small JSON config and exactly one layer, the raw ELF binary), the JSON of each part, and the
//! platform of a binary read from its ELF header.
//!
//! Pure: bytes in, bytes or typed values out. It does no I/O; the network is `registry.rs`'s.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The media type of the OCI image index naming one manifest per platform.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// The media type of each platform's OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The `artifactType` of the index and of each platform's manifest: a Lichen agent.
pub const AGENT_ARTIFACT_TYPE: &str = "application/vnd.lichen.agent.v1";
/// The media type of each manifest's config, an [`AgentBinaryConfig`] as JSON.
pub const AGENT_CONFIG: &str = "application/vnd.lichen.agent.config.v1+json";
/// The media type of each manifest's one layer: the agent's ELF executable, uncompressed.
pub const AGENT_BINARY: &str = "application/vnd.lichen.agent.binary.v1";
/// The OCI annotation naming the version of what a manifest or index holds.
pub const VERSION_ANNOTATION: &str = "org.opencontainers.image.version";
/// The OCI annotation naming a layer's file (what `oras pull` would write).
pub const TITLE_ANNOTATION: &str = "org.opencontainers.image.title";

/// The platforms Lichen publishes agents for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Platform {
    /// `linux/arm64`: 64-bit ARM boards (Raspberry Pi 3 and later on a 64-bit OS).
    Arm64,
    /// `linux/arm/v7`: 32-bit ARM boards, EABI5 hard-float (gnueabihf).
    ArmV7,
    /// `linux/amd64`: x86-64 machines (gateways, CI, build machines).
    Amd64,
}

impl Platform {
    /// Every platform, in the order an index lists them.
    pub const ALL: [Platform; 3] = [Platform::Arm64, Platform::ArmV7, Platform::Amd64];

    /// The platform this process was built for, if Lichen publishes for it.
    pub fn current() -> Option<Platform> {
        match std::env::consts::ARCH {
            "aarch64" => Some(Platform::Arm64),
            "arm" => Some(Platform::ArmV7),
            "x86_64" => Some(Platform::Amd64),
            _ => None,
        }
    }

    /// The OCI `os`: always `linux`.
    pub fn os(self) -> &'static str {
        "linux"
    }

    /// The OCI `architecture` (Go's GOARCH names).
    pub fn architecture(self) -> &'static str {
        match self {
            Platform::Arm64 => "arm64",
            Platform::ArmV7 => "arm",
            Platform::Amd64 => "amd64",
        }
    }

    /// The OCI `variant`, for 32-bit ARM only.
    pub fn variant(self) -> Option<&'static str> {
        match self {
            Platform::ArmV7 => Some("v7"),
            Platform::Arm64 | Platform::Amd64 => None,
        }
    }

    /// The platform an OCI platform object names; `variant` `v8` on arm64 is accepted as docker
    /// writes it.
    pub fn from_oci(os: &str, architecture: &str, variant: Option<&str>) -> Option<Platform> {
        if os != "linux" {
            return None;
        }
        match (architecture, variant.filter(|v| !v.is_empty())) {
            ("arm64", None | Some("v8")) => Some(Platform::Arm64),
            ("arm", Some("v7")) => Some(Platform::ArmV7),
            ("amd64", None) => Some(Platform::Amd64),
            _ => None,
        }
    }

    /// The platform an ELF executable was built for, from its header; or why it is not an agent
    /// binary Lichen can publish or run.
    pub fn of_elf(binary: &[u8]) -> Result<Platform, ArtifactError> {
        const EM_ARM: u16 = 40;
        const EM_X86_64: u16 = 62;
        const EM_AARCH64: u16 = 183;
        const ET_EXEC: u16 = 2;
        const ET_DYN: u16 = 3;
        const EF_ARM_EABIMASK: u32 = 0xff00_0000;
        const EF_ARM_EABI_VER5: u32 = 0x0500_0000;
        const EF_ARM_ABI_FLOAT_HARD: u32 = 0x0400;

        if binary.len() < 4 || &binary[..4] != b"\x7fELF" {
            return Err(ArtifactError::NotElf);
        }
        let class = binary.get(4).copied();
        let header_len = match class {
            Some(1) => 52,
            Some(2) => 64,
            other => return Err(ArtifactError::BadElf(format!("unknown ELF class {other:?}"))),
        };
        if binary.len() < header_len {
            return Err(ArtifactError::Truncated { len: binary.len() as u64, need: header_len as u64 });
        }
        if binary[5] != 1 {
            return Err(ArtifactError::BadElf(
                "big-endian ELF; Lichen publishes little-endian Linux binaries only".into(),
            ));
        }
        let u16_at = |at: usize| u16::from_le_bytes([binary[at], binary[at + 1]]);
        let u32_at =
            |at: usize| u32::from_le_bytes([binary[at], binary[at + 1], binary[at + 2], binary[at + 3]]);
        let kind = u16_at(16);
        if kind != ET_EXEC && kind != ET_DYN {
            return Err(ArtifactError::BadElf(format!(
                "ELF type {kind} is not an executable (a relocatable object or a core dump?)"
            )));
        }
        let machine = u16_at(18);
        let bits = if class == Some(1) { 32 } else { 64 };
        match (machine, bits) {
            (EM_AARCH64, 64) => Ok(Platform::Arm64),
            (EM_X86_64, 64) => Ok(Platform::Amd64),
            (EM_ARM, 32) => {
                let flags = u32_at(36);
                if flags & EF_ARM_EABIMASK != EF_ARM_EABI_VER5 || flags & EF_ARM_ABI_FLOAT_HARD == 0 {
                    return Err(ArtifactError::ArmNotHardFloat { flags });
                }
                Ok(Platform::ArmV7)
            }
            _ => Err(ArtifactError::UnsupportedMachine { machine: machine_name(machine), bits }),
        }
    }

    /// Checks that `binary` is an ELF executable for this platform.
    pub fn check_binary(self, binary: &[u8]) -> Result<(), ArtifactError> {
        let built = Platform::of_elf(binary)?;
        if built != self {
            return Err(ArtifactError::WrongPlatform { built, this: self });
        }
        Ok(())
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os(), self.architecture())?;
        if let Some(v) = self.variant() {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Platform {
    type Err = ArtifactError;

    /// `linux/arm64`, `linux/arm/v7` or `linux/amd64`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.trim().splitn(3, '/');
        let (os, arch, variant) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next());
        Platform::from_oci(os, arch, variant).ok_or_else(|| ArtifactError::UnknownPlatform(s.to_owned()))
    }
}

fn machine_name(machine: u16) -> String {
    let name = match machine {
        3 => "x86 (i386)",
        8 => "MIPS",
        20 => "PowerPC",
        21 => "PowerPC 64",
        40 => "32-bit ARM",
        62 => "x86-64",
        183 => "AArch64",
        243 => "RISC-V",
        _ => return format!("machine {machine}"),
    };
    format!("{name} (e_machine {machine})")
}

/// Why bytes are not an agent artifact, or not one for this node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArtifactError {
    /// No ELF magic.
    #[error("not an ELF executable (no \\x7fELF header)")]
    NotElf,
    /// Shorter than its own header.
    #[error("truncated: {len} bytes, an ELF header needs {need}")]
    Truncated {
        /// Bytes there are.
        len: u64,
        /// Bytes the header needs.
        need: u64,
    },
    /// An ELF file, but not a little-endian executable.
    #[error("not a usable ELF executable: {0}")]
    BadElf(String),
    /// An executable for an architecture Lichen does not publish.
    #[error("built for {machine}, {bits}-bit; Lichen publishes linux/arm64, linux/arm/v7 and linux/amd64")]
    UnsupportedMachine {
        /// The machine's name and number.
        machine: String,
        /// 32 or 64.
        bits: u8,
    },
    /// 32-bit ARM, but not EABI5 hard-float (what `linux/arm/v7` boards run).
    #[error(
        "32-bit ARM executable is not EABI5 hard-float (e_flags {flags:#010x}); linux/arm/v7 needs an armv7-unknown-linux-gnueabihf build"
    )]
    ArmNotHardFloat {
        /// The header's `e_flags`.
        flags: u32,
    },
    /// An executable for another platform than this node's.
    #[error("built for {built}, this node is {this}")]
    WrongPlatform {
        /// What the binary was built for.
        built: Platform,
        /// This node.
        this: Platform,
    },
    /// A platform name that is not one of Lichen's.
    #[error("unknown platform {0:?}; expected linux/arm64, linux/arm/v7 or linux/amd64")]
    UnknownPlatform(String),
    /// An executable without Lichen's version field.
    #[error("not a Lichen agent binary (no version field; was it built from this repository?)")]
    NotLichen,
    /// Two binaries for the same platform given to one push.
    #[error("two binaries for {0}; an agent image holds one per platform")]
    DuplicatePlatform(Platform),
    /// The index has no entry for this node's platform.
    #[error("the agent image has no {wanted} binary (it has: {present})")]
    MissingPlatform {
        /// This node.
        wanted: Platform,
        /// What the index offers, as `os/arch[/variant]`, comma-separated.
        present: String,
    },
    /// A manifest, index or config that is not what `lichen push --agent` writes.
    #[error("not a Lichen agent image: {0}")]
    NotAgent(String),
}

/// `sha256:<hex>` of `bytes`: an OCI digest.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The hex of a `sha256:<64 hex>` digest, if it is one.
pub fn digest_hex(digest: &str) -> Option<&str> {
    digest.strip_prefix("sha256:").filter(|h| is_sha256_hex(h))
}

/// Whether `hex` is a sha256 as OCI digests write it: 64 lower-case hex digits.
pub fn is_sha256_hex(hex: &str) -> bool {
    hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The config of one platform's manifest ([`AGENT_CONFIG`]): what a node checks before it
/// downloads the binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentBinaryConfig {
    /// The agent's version as `lichen version` prints it.
    pub version: String,
    /// `linux`.
    pub os: String,
    /// OCI architecture: `arm64`, `arm` or `amd64`.
    pub architecture: String,
    /// `v7` for 32-bit ARM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// The binary's size in bytes.
    pub size: u64,
    /// The binary's sha256, hex.
    pub sha256: String,
}

impl AgentBinaryConfig {
    /// The config describing `binary`, built for `platform`, of version `version`.
    pub fn new(platform: Platform, version: &str, binary: &[u8]) -> Self {
        AgentBinaryConfig {
            version: version.to_owned(),
            os: platform.os().to_owned(),
            architecture: platform.architecture().to_owned(),
            variant: platform.variant().map(str::to_owned),
            size: binary.len() as u64,
            sha256: hex(&Sha256::digest(binary)),
        }
    }

    /// The platform it names, if one of Lichen's.
    pub fn platform(&self) -> Option<Platform> {
        Platform::from_oci(&self.os, &self.architecture, self.variant.as_deref())
    }
}

/// A content descriptor, as in OCI manifests and indexes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// What the content is.
    pub media_type: String,
    /// `sha256:<hex>` of the content.
    pub digest: String,
    /// Bytes.
    pub size: u64,
    /// For an index entry: the artifact type of the manifest it names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// For an index entry: the platform.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<OciPlatform>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    /// A descriptor of `bytes` as `media_type`.
    pub fn of(media_type: &str, bytes: &[u8]) -> Self {
        Descriptor {
            media_type: media_type.to_owned(),
            digest: sha256_digest(bytes),
            size: bytes.len() as u64,
            artifact_type: None,
            platform: None,
            annotations: BTreeMap::new(),
        }
    }
}

/// An index entry's platform object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OciPlatform {
    /// OCI architecture.
    pub architecture: String,
    /// OCI os.
    pub os: String,
    /// OCI variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl OciPlatform {
    fn name(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{v}", self.os, self.architecture),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }
}

/// An OCI image manifest or index, the fields Lichen writes and reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u8,
    /// [`OCI_MANIFEST`] or [`OCI_INDEX`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The artifact type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// A manifest's config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Descriptor>,
    /// A manifest's layers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<Descriptor>,
    /// An index's manifests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub manifests: Vec<Descriptor>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Manifest {
    /// The exact bytes to push (the registry keeps them, and digests are of them).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing these plain structs cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// One platform's binary, ready to push: the config blob, the manifest, and its index entry.
#[derive(Debug, Clone)]
pub struct PlatformArtifact {
    /// The platform.
    pub platform: Platform,
    /// The agent's version.
    pub version: String,
    /// The config blob ([`AGENT_CONFIG`]).
    pub config: Vec<u8>,
    /// The manifest's bytes ([`OCI_MANIFEST`]).
    pub manifest: Vec<u8>,
    /// The binary's descriptor (the one layer).
    pub binary: Descriptor,
}

impl PlatformArtifact {
    /// Checks `binary` (an ELF executable of a Lichen build) and describes it; the platform comes
    /// from the ELF header, the version from [`crate::version::read_version`].
    pub fn new(binary: &[u8]) -> Result<Self, ArtifactError> {
        let platform = Platform::of_elf(binary)?;
        let version = crate::version::read_version(binary).ok_or(ArtifactError::NotLichen)?;
        let config =
            serde_json::to_vec(&AgentBinaryConfig::new(platform, &version, binary)).unwrap_or_default();
        let mut layer = Descriptor::of(AGENT_BINARY, binary);
        layer.annotations.insert(TITLE_ANNOTATION.into(), "lichen".into());
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(OCI_MANIFEST.into()),
            artifact_type: Some(AGENT_ARTIFACT_TYPE.into()),
            config: Some(Descriptor::of(AGENT_CONFIG, &config)),
            layers: vec![layer.clone()],
            manifests: Vec::new(),
            annotations: BTreeMap::from([(VERSION_ANNOTATION.to_owned(), version.clone())]),
        };
        Ok(PlatformArtifact { platform, version, config, manifest: manifest.to_bytes(), binary: layer })
    }

    /// Its entry in the index.
    pub fn index_entry(&self) -> Descriptor {
        let mut d = Descriptor::of(OCI_MANIFEST, &self.manifest);
        d.artifact_type = Some(AGENT_ARTIFACT_TYPE.into());
        d.platform = Some(OciPlatform {
            architecture: self.platform.architecture().into(),
            os: self.platform.os().into(),
            variant: self.platform.variant().map(str::to_owned),
        });
        d.annotations.insert(VERSION_ANNOTATION.into(), self.version.clone());
        d
    }
}

/// The index's bytes for `artifacts` (one per platform, listed in [`Platform::ALL`] order), or
/// why they do not make one agent image.
pub fn agent_index(artifacts: &[PlatformArtifact]) -> Result<Vec<u8>, ArtifactError> {
    let mut sorted: Vec<&PlatformArtifact> = artifacts.iter().collect();
    sorted.sort_by_key(|a| a.platform);
    if let Some(w) = sorted.windows(2).find(|w| w[0].platform == w[1].platform) {
        return Err(ArtifactError::DuplicatePlatform(w[0].platform));
    }
    if sorted.is_empty() {
        return Err(ArtifactError::NotAgent("no binaries to publish".into()));
    }
    // The index names a version only when every platform has the same one.
    let mut annotations = BTreeMap::new();
    if sorted.iter().all(|a| a.version == sorted[0].version) {
        annotations.insert(VERSION_ANNOTATION.to_owned(), sorted[0].version.clone());
    }
    Ok(Manifest {
        schema_version: 2,
        media_type: Some(OCI_INDEX.into()),
        artifact_type: Some(AGENT_ARTIFACT_TYPE.into()),
        config: None,
        layers: Vec::new(),
        manifests: sorted.iter().map(|a| a.index_entry()).collect(),
        annotations,
    }
    .to_bytes())
}

/// From an agent index's bytes, the entry of `platform`'s manifest.
pub fn select_platform(index: &[u8], platform: Platform) -> Result<Descriptor, ArtifactError> {
    let index: Manifest = serde_json::from_slice(index)
        .map_err(|e| ArtifactError::NotAgent(format!("the index is not valid JSON: {e}")))?;
    match index.media_type.as_deref() {
        Some(OCI_INDEX) | None if !index.manifests.is_empty() => {}
        other => {
            return Err(ArtifactError::NotAgent(format!(
                "expected an OCI image index ({OCI_INDEX}) listing one manifest per platform, found {}",
                other.unwrap_or(if index.layers.is_empty() { "an empty index" } else { "a single manifest" })
            )));
        }
    }
    if index.artifact_type.as_deref().is_some_and(|t| t != AGENT_ARTIFACT_TYPE) {
        return Err(ArtifactError::NotAgent(format!(
            "the index's artifactType is {:?}, not {AGENT_ARTIFACT_TYPE}",
            index.artifact_type.unwrap_or_default()
        )));
    }
    let of = |d: &Descriptor| {
        d.platform.as_ref().and_then(|p| Platform::from_oci(&p.os, &p.architecture, p.variant.as_deref()))
    };
    if let Some(entry) = index.manifests.iter().find(|d| of(d) == Some(platform)) {
        if entry.media_type != OCI_MANIFEST {
            return Err(ArtifactError::NotAgent(format!(
                "the {platform} entry is a {}, not an OCI image manifest",
                entry.media_type
            )));
        }
        if digest_hex(&entry.digest).is_none() {
            return Err(ArtifactError::NotAgent(format!(
                "the {platform} entry's digest {:?} is not sha256",
                entry.digest
            )));
        }
        return Ok(entry.clone());
    }
    let present: Vec<String> = index
        .manifests
        .iter()
        .map(|d| d.platform.as_ref().map_or_else(|| "(no platform)".to_owned(), OciPlatform::name))
        .collect();
    Err(ArtifactError::MissingPlatform { wanted: platform, present: present.join(", ") })
}

/// From a platform manifest's bytes, its config descriptor and its one binary layer.
pub fn manifest_parts(manifest: &[u8]) -> Result<(Descriptor, Descriptor), ArtifactError> {
    let m: Manifest = serde_json::from_slice(manifest)
        .map_err(|e| ArtifactError::NotAgent(format!("the platform manifest is not valid JSON: {e}")))?;
    if m.media_type.as_deref().is_some_and(|t| t != OCI_MANIFEST) {
        return Err(ArtifactError::NotAgent(format!(
            "the platform manifest's media type is {:?}, not {OCI_MANIFEST}",
            m.media_type.unwrap_or_default()
        )));
    }
    let config = m.config.filter(|c| c.media_type == AGENT_CONFIG).ok_or_else(|| {
        ArtifactError::NotAgent(format!("the platform manifest's config is not {AGENT_CONFIG}"))
    })?;
    let layer = match m.layers.as_slice() {
        [one] if one.media_type == AGENT_BINARY => one.clone(),
        layers => {
            let types: Vec<&str> = layers.iter().map(|l| l.media_type.as_str()).collect();
            return Err(ArtifactError::NotAgent(format!(
                "expected exactly one {AGENT_BINARY} layer, found [{}]",
                types.join(", ")
            )));
        }
    };
    for d in [&config, &layer] {
        if digest_hex(&d.digest).is_none() {
            return Err(ArtifactError::NotAgent(format!("digest {:?} is not sha256", d.digest)));
        }
    }
    Ok((config, layer))
}

/// A config blob's contents, checked against the layer it describes and the platform expected.
pub fn parse_config(
    config: &[u8],
    layer: &Descriptor,
    platform: Platform,
) -> Result<AgentBinaryConfig, ArtifactError> {
    let c: AgentBinaryConfig = serde_json::from_slice(config)
        .map_err(|e| ArtifactError::NotAgent(format!("the config is not an agent config: {e}")))?;
    match c.platform() {
        Some(p) if p == platform => {}
        Some(p) => return Err(ArtifactError::WrongPlatform { built: p, this: platform }),
        None => {
            return Err(ArtifactError::NotAgent(format!(
                "the config names platform {}/{}{}, not one of Lichen's",
                c.os,
                c.architecture,
                c.variant.as_deref().map(|v| format!("/{v}")).unwrap_or_default()
            )));
        }
    }
    if format!("sha256:{}", c.sha256) != layer.digest || c.size != layer.size {
        return Err(ArtifactError::NotAgent(format!(
            "the config describes a binary of {} bytes with sha256 {}, the layer is {} bytes with {}",
            c.size, c.sha256, layer.size, layer.digest
        )));
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF header: `class` 1 or 2, little-endian, executable, `machine`, `flags`.
    fn elf(class: u8, machine: u16, flags: u32) -> Vec<u8> {
        let len = if class == 1 { 52 } else { 64 };
        let mut h = vec![0u8; len];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = class;
        h[5] = 1;
        h[6] = 1;
        h[16..18].copy_from_slice(&3u16.to_le_bytes());
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        let at = if class == 1 { 36 } else { 48 };
        h[at..at + 4].copy_from_slice(&flags.to_le_bytes());
        h
    }

    #[test]
    fn this_test_binary_is_detected_as_this_platform() {
        let me = std::fs::read(std::env::current_exe().expect("current exe")).expect("read own binary");
        let platform = Platform::current().expect("a published platform");
        assert_eq!(Platform::of_elf(&me), Ok(platform));
        if platform == Platform::Amd64 {
            assert_eq!(platform.to_string(), "linux/amd64");
        }
        assert!(platform.check_binary(&me).is_ok());
    }

    #[test]
    fn synthetic_headers_name_their_platforms() {
        assert_eq!(Platform::of_elf(&elf(2, 183, 0)), Ok(Platform::Arm64));
        assert_eq!(Platform::of_elf(&elf(2, 62, 0)), Ok(Platform::Amd64));
        assert_eq!(Platform::of_elf(&elf(1, 40, 0x0500_0400)), Ok(Platform::ArmV7));
        assert_eq!(Platform::ArmV7.to_string(), "linux/arm/v7");
        assert_eq!(Platform::Arm64.to_string(), "linux/arm64");
        for p in Platform::ALL {
            assert_eq!(p.to_string().parse::<Platform>(), Ok(p));
        }
    }

    #[test]
    fn what_is_not_an_agent_binary_says_why() {
        let e = |b: &[u8]| Platform::of_elf(b).unwrap_err().to_string();
        assert_eq!(e(b"#!/bin/sh\necho hi\n"), "not an ELF executable (no \\x7fELF header)");
        assert_eq!(e(&elf(2, 183, 0)[..30]), "truncated: 30 bytes, an ELF header needs 64");
        // Soft-float and old-ABI 32-bit ARM.
        assert!(e(&elf(1, 40, 0x0500_0200)).contains("not EABI5 hard-float"));
        assert!(e(&elf(1, 40, 0x0400_0400)).contains("not EABI5 hard-float"));
        assert!(e(&elf(2, 243, 0)).contains("RISC-V"), "{}", e(&elf(2, 243, 0)));
        assert!(e(&elf(1, 3, 0)).contains("i386"));
        // AArch64 in a 32-bit container is not arm64.
        assert!(e(&elf(1, 183, 0)).contains("AArch64"));
        let mut be = elf(2, 183, 0);
        be[5] = 2;
        assert!(e(&be).contains("big-endian"));
        let mut object = elf(2, 183, 0);
        object[16] = 1;
        assert!(e(&object).contains("not an executable"));
        assert_eq!(
            Platform::Arm64.check_binary(&elf(2, 62, 0)).unwrap_err().to_string(),
            "built for linux/amd64, this node is linux/arm64"
        );
    }

    fn artifact(platform_machine: (u8, u16, u32), version_field: bool) -> Vec<u8> {
        let (class, machine, flags) = platform_machine;
        let mut b = elf(class, machine, flags);
        if version_field {
            // The version field as `version.rs` lays it out.
            let mut field = [0u8; 64];
            field[..16].copy_from_slice(b"LICHEN-VERSION::");
            field[16..21].copy_from_slice(b"9.9.9");
            b.extend_from_slice(&field);
        }
        b
    }

    #[test]
    fn an_index_lists_one_manifest_per_platform_and_each_names_its_binary() {
        let arm = PlatformArtifact::new(&artifact((2, 183, 0), true)).expect("arm64");
        let amd = PlatformArtifact::new(&artifact((2, 62, 0), true)).expect("amd64");
        assert_eq!((arm.platform, arm.version.as_str()), (Platform::Arm64, "9.9.9"));
        let index = agent_index(&[amd.clone(), arm.clone()]).expect("index");
        let parsed: Manifest = serde_json::from_slice(&index).expect("json");
        assert_eq!(parsed.media_type.as_deref(), Some(OCI_INDEX));
        assert_eq!(parsed.artifact_type.as_deref(), Some(AGENT_ARTIFACT_TYPE));
        assert_eq!(parsed.manifests.len(), 2);

        let entry = select_platform(&index, Platform::Amd64).expect("amd64 entry");
        assert_eq!(entry.digest, sha256_digest(&amd.manifest));
        assert_eq!(entry.size, amd.manifest.len() as u64);
        let (config, layer) = manifest_parts(&amd.manifest).expect("parts");
        assert_eq!(config.digest, sha256_digest(&amd.config));
        assert_eq!(layer, amd.binary);
        let c = parse_config(&amd.config, &layer, Platform::Amd64).expect("config");
        assert_eq!((c.version.as_str(), c.size), ("9.9.9", 64 + 64));
        assert_eq!(
            parse_config(&amd.config, &layer, Platform::Arm64).unwrap_err().to_string(),
            "built for linux/amd64, this node is linux/arm64"
        );
        assert_eq!(
            select_platform(&index, Platform::ArmV7).unwrap_err().to_string(),
            "the agent image has no linux/arm/v7 binary (it has: linux/arm64, linux/amd64)"
        );
    }

    #[test]
    fn a_push_refuses_what_is_not_one_lichen_per_platform() {
        assert_eq!(
            PlatformArtifact::new(&artifact((2, 62, 0), false)).unwrap_err(),
            ArtifactError::NotLichen
        );
        let a = PlatformArtifact::new(&artifact((2, 62, 0), true)).expect("amd64");
        assert_eq!(
            agent_index(&[a.clone(), a]).unwrap_err(),
            ArtifactError::DuplicatePlatform(Platform::Amd64)
        );
    }

    #[test]
    fn a_module_or_a_single_manifest_is_not_an_agent_image() {
        let amd = PlatformArtifact::new(&artifact((2, 62, 0), true)).expect("amd64");
        let e = select_platform(&amd.manifest, Platform::Amd64).unwrap_err().to_string();
        assert!(e.contains("expected an OCI image index"), "{e}");
        let module = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.wasm.config.v0+json","digest":"sha256:00","size":2},"layers":[{"mediaType":"application/wasm","digest":"sha256:00","size":2}]}"#;
        let e = manifest_parts(module).unwrap_err().to_string();
        assert!(e.contains(AGENT_CONFIG), "{e}");
    }
}
