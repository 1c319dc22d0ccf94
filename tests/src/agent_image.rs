//! What the agent-image tests share: signing keys made with openssl as an operator makes them,
//! version-stamped copies of the agent under test (another build of it), and reading the lines
//! `lichen push --agent` prints.

use std::path::{Path, PathBuf};
use std::process::Command;

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Makes an ECDSA P-256 key pair with openssl: `<name>.pem` (PKCS#8) and `<name>.pub` (SPKI).
pub fn p256_key(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (key, public) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.pub")));
    for args in [
        vec!["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path(&key)],
        vec!["ec", "-in", path(&key), "-pubout", "-out", path(&public)],
    ] {
        let out = Command::new("openssl").args(&args).output().expect("openssl (tests/run.sh installs it)");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    (key, public)
}

/// The value after `<label>: ` on a line of `out`.
pub fn field<'a>(out: &'a str, label: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(label).and_then(|r| r.strip_prefix(": ")))
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{out}"))
}

/// A copy of the agent binary `elf` stamped with build id `id`, written into `dir`: another build
/// of the same agent. Returns its path and the version it reports.
pub fn stamped_copy(elf: &Path, dir: &Path, id: &str) -> (PathBuf, String) {
    let mut bytes = std::fs::read(elf).expect("read the lichen binary");
    lichen::version::stamp(&mut bytes, id).expect("stamp");
    let copy = dir.join(format!("lichen-{id}"));
    std::fs::write(&copy, &bytes).expect("write the stamped binary");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    (copy, lichen::version::read_version(&bytes).expect("its version"))
}
