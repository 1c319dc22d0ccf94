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
    let id = &field[MARKER.len()..];
    let end = id.iter().position(|&b| b == 0).unwrap_or(id.len());
    let id = std::str::from_utf8(&id[..end]).ok()?;
    valid_id(id).then(|| id.to_owned())
}

/// This agent's version: `0.1.0`, or `0.1.0+<build id>`.
pub fn version() -> String {
    match build_id() {
        Some(id) => format!("{}+{id}", env!("CARGO_PKG_VERSION")),
        None => env!("CARGO_PKG_VERSION").to_owned(),
    }
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
        b
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
