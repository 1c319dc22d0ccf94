//! The agent's version as every report names it (`lichen version`, the Node's
//! `lichen.dev/agent-version` and `nodeInfo.kubeletVersion`, the log): the crate version, plus a
//! build id when the binary carries one.
//!
//! A build id is written into a finished binary ([`stamp`]), not compiled in: a release pipeline
//! marks a build (a CI run number, a commit) without building again, and the tests make a second,
//! different agent from the one they built. The id lives in a fixed 64-byte field that starts with
//! a marker; an unstamped binary has zeros after it.

/// The field's marker.
const MARKER: &[u8; 16] = b"LICHEN-BUILD-ID:";
/// The field: the marker, then the id padded with zeros.
const FIELD_LEN: usize = 64;
/// The longest build id.
pub const MAX_BUILD_ID: usize = FIELD_LEN - MARKER.len();

static BUILD_ID: [u8; FIELD_LEN] = {
    let mut field = [0u8; FIELD_LEN];
    let mut i = 0;
    while i < MARKER.len() {
        field[i] = MARKER[i];
        i += 1;
    }
    field
};

/// The crate version in a field of its own, so that a tool reading a binary (`lichen push --agent`)
/// finds the version without running it (it may be built for another architecture).
const VERSION_MARKER: &[u8; 16] = b"LICHEN-VERSION::";
static VERSION_FIELD: [u8; FIELD_LEN] = {
    let mut field = [0u8; FIELD_LEN];
    let version = env!("CARGO_PKG_VERSION").as_bytes();
    let mut i = 0;
    while i < VERSION_MARKER.len() {
        field[i] = VERSION_MARKER[i];
        i += 1;
    }
    let mut j = 0;
    while j < version.len() && VERSION_MARKER.len() + j < FIELD_LEN {
        field[VERSION_MARKER.len() + j] = version[j];
        j += 1;
    }
    field
};

/// Why a binary cannot be stamped.
#[derive(Debug, thiserror::Error)]
pub enum StampError {
    /// The id is empty, too long, or has characters other than `[0-9A-Za-z.-]`.
    #[error("build id {0:?} must be 1 to {MAX_BUILD_ID} characters of [0-9A-Za-z.-]")]
    BadId(String),
    /// The binary has no unstamped field (not a Lichen binary, or stamped already).
    #[error("no unstamped build-id field in the binary (not a lichen binary, or stamped already)")]
    NoField,
    /// More than one field: the binary is not one Lichen build.
    #[error("{0} build-id fields in the binary; expected one")]
    Ambiguous(usize),
}

/// The build id stamped into this binary, if any.
#[allow(unsafe_code)]
pub fn build_id() -> Option<String> {
    // Read through a volatile pointer: the compiler must not fold the field to its initial value,
    // since the bytes are changed in the file after the build.
    // SAFETY: the pointer comes from a reference to a live, aligned, initialized static.
    let field: [u8; FIELD_LEN] = unsafe { std::ptr::read_volatile(&raw const BUILD_ID) };
    let value = &field[MARKER.len()..];
    // A full-length id has no zero after it.
    let id = match field_text(value) {
        Some(id) => id,
        None => std::str::from_utf8(value).ok()?,
    };
    valid_id(id).then(|| id.to_owned())
}

/// This agent's version: `0.1.0`, or `0.1.0+<build id>`.
#[allow(unsafe_code)]
pub fn version() -> String {
    // SAFETY: as in `build_id`. Read, not `env!` again, so the field stays in the binary for
    // [`read_version`].
    let field: [u8; FIELD_LEN] = unsafe { std::ptr::read_volatile(&raw const VERSION_FIELD) };
    let crate_version = field_text(&field[VERSION_MARKER.len()..]).unwrap_or(env!("CARGO_PKG_VERSION"));
    match build_id() {
        Some(id) => format!("{crate_version}+{id}"),
        None => crate_version.to_owned(),
    }
}

/// The version of the Lichen binary `binary` (its bytes), as it would print it, without running
/// it; `None` if it is not a Lichen binary.
pub fn read_version(binary: &[u8]) -> Option<String> {
    let field = |marker: &[u8; 16]| {
        binary.windows(FIELD_LEN).find_map(|w| {
            w.starts_with(marker).then(|| field_text(&w[marker.len()..])).flatten().filter(|t| valid_id(t))
        })
    };
    let crate_version = field(VERSION_MARKER)?;
    Some(match field(MARKER) {
        Some(id) => format!("{crate_version}+{id}"),
        None => crate_version.to_owned(),
    })
}

/// The text before the first zero of a field's value, if it is UTF-8 and zero-padded.
fn field_text(value: &[u8]) -> Option<&str> {
    let end = value.iter().position(|&b| b == 0)?;
    value[end..].iter().all(|&b| b == 0).then_some(())?;
    std::str::from_utf8(&value[..end]).ok()
}

fn valid_id(id: &str) -> bool {
    (1..=MAX_BUILD_ID).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

/// Writes build id `id` into `binary` (a Lichen executable's bytes), in place.
pub fn stamp(binary: &mut [u8], id: &str) -> Result<(), StampError> {
    if !valid_id(id) {
        return Err(StampError::BadId(id.to_owned()));
    }
    let at: Vec<usize> = binary
        .windows(FIELD_LEN)
        .enumerate()
        .filter(|(_, w)| w.starts_with(MARKER) && w[MARKER.len()..].iter().all(|&b| b == 0))
        .map(|(i, _)| i)
        .collect();
    match at.as_slice() {
        [] => Err(StampError::NoField),
        [i] => {
            let start = i + MARKER.len();
            binary[start..start + id.len()].copy_from_slice(id.as_bytes());
            Ok(())
        }
        more => Err(StampError::Ambiguous(more.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_binary() -> Vec<u8> {
        let mut b = vec![0x7f, b'E', b'L', b'F'];
        b.extend_from_slice(&[1u8; 100]);
        b.extend_from_slice(&BUILD_ID);
        b.extend_from_slice(&[2u8; 100]);
        b.extend_from_slice(&VERSION_FIELD);
        b.extend_from_slice(&[3u8; 10]);
        b
    }

    #[test]
    fn the_version_is_read_from_a_binary_without_running_it() {
        let mut b = fake_binary();
        assert_eq!(read_version(&b).as_deref(), Some(env!("CARGO_PKG_VERSION")));
        stamp(&mut b, "ci.7").expect("stamped");
        assert_eq!(read_version(&b), Some(format!("{}+ci.7", env!("CARGO_PKG_VERSION"))));
        assert_eq!(read_version(b"\x7fELF not lichen"), None);
    }

    #[test]
    fn an_unstamped_build_reports_the_crate_version() {
        assert_eq!(build_id(), None);
        assert_eq!(version(), env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn a_stamp_lands_in_the_field_once_and_only_once() {
        let mut b = fake_binary();
        stamp(&mut b, "ci.42-g1a2b3c").expect("stamped");
        let i = b.windows(MARKER.len()).position(|w| w == MARKER).expect("marker");
        assert_eq!(&b[i + 16..i + 29], b"ci.42-g1a2b3c");
        assert!(matches!(stamp(&mut b, "again"), Err(StampError::NoField)), "stamped already");
        let mut twice = fake_binary();
        twice.extend_from_slice(&BUILD_ID);
        assert!(matches!(stamp(&mut twice, "x"), Err(StampError::Ambiguous(2))));
        assert!(matches!(stamp(&mut fake_binary(), "a b"), Err(StampError::BadId(_))));
        assert!(matches!(stamp(&mut fake_binary(), &"x".repeat(49)), Err(StampError::BadId(_))));
    }
}
