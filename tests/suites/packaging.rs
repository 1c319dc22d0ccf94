//! Shipping to boards, built and inspected for real: the `.deb` from `cross/deb.sh` (control fields,
//! every path with its mode and owner, the conffile, the maintainer scripts, lintian, the packaged
//! config read by the agent and the units read by systemd); `images/bake.sh` on synthetic disk
//! images laid out like Raspberry Pi OS, read back with debugfs, e2fsck, mtools and dpkg-query;
//! and the first-boot script on a fake root.
//!
//! The package is built for this machine's architecture from the `lichen` beside the tests, so the
//! synthetic "board" images are of this architecture too. Every tool is required: a missing one
//! fails the test and names the Debian package to install.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use lichen::config::AgentConfig;
use lichen_tests::{is_root, lichen_bin};

/// 2025-11-24T16:00:00Z: every file in the test packages carries this time.
const SDE: &str = "1764000000";
const SDE_UTC: &str = "2025-11-24 16:00:00";

const MIB: u64 = 1 << 20;
/// The synthetic images: an MBR, the FAT boot partition at 4 MiB (64 MiB, type c), the ext4 root
/// after it to the end, as Raspberry Pi OS lays them out.
const IMAGE_SIZE: u64 = 256 * MIB;
const BOOT_START: u64 = 4 * MIB;
const BOOT_SIZE: u64 = 64 * MIB;
const ROOT_START: u64 = BOOT_START + BOOT_SIZE;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace holds tests/").to_owned()
}

/// Fails, naming the package, if `tool` is not on PATH.
fn need(tool: &str, package: &str) {
    let found =
        std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
    assert!(found, "{tool} is not on PATH: `apt-get install {package}` (the packaging tests need it)");
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs `cmd`, fails with its output unless it succeeds, returns its stdout.
fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd`, fails unless it fails with `needle` in its stderr, returns stdout and stderr.
fn refused(cmd: &mut Command, needle: &str) -> String {
    let out = run(cmd);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{cmd:?} succeeded, but should have refused with {needle:?}:\n{text}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(needle),
        "{cmd:?} failed without saying {needle:?}:\n{text}"
    );
    text
}

/// This machine's Debian architecture, the one the test package and images are built for.
fn host_arch() -> &'static str {
    static ARCH: OnceLock<String> = OnceLock::new();
    ARCH.get_or_init(|| {
        need("dpkg", "dpkg");
        ok(Command::new("dpkg").arg("--print-architecture")).trim().to_owned()
    })
}

/// An architecture a board image can have that is not this machine's.
fn foreign_arch() -> &'static str {
    if host_arch() == "arm64" { "amd64" } else { "arm64" }
}

fn deb_sh(out: &Path, compress: &str) -> Command {
    need("dpkg-deb", "dpkg");
    need("readelf", "binutils");
    need("strip", "binutils");
    let mut cmd = Command::new(repo().join("cross/deb.sh"));
    cmd.args(["--arch", host_arch(), "--binary"])
        .arg(lichen_bin())
        .arg("--out")
        .arg(out)
        .args(["--compress", compress])
        .env("SOURCE_DATE_EPOCH", SDE);
    cmd
}

/// The package all tests share, built once per run into cargo's test scratch directory.
fn deb() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("packaging-deb");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the package directory");
        let deb = PathBuf::from(ok(&mut deb_sh(&dir, "gzip")).trim());
        let name = format!("lichen_{}-1_{}.deb", env!("CARGO_PKG_VERSION"), host_arch());
        assert_eq!(deb.file_name().and_then(|n| n.to_str()), Some(name.as_str()), "package file name");
        deb
    })
}

/// The package's files, extracted into `dir` (with its control files in `dir/DEBIAN`).
fn extract(dir: &Path) {
    ok(Command::new("dpkg-deb").arg("-x").arg(deb()).arg(dir));
    ok(Command::new("dpkg-deb").arg("-e").arg(deb()).arg(dir.join("DEBIAN")));
}

fn control_fields(deb: &Path) -> BTreeMap<String, String> {
    let text = ok(Command::new("dpkg-deb").arg("--field").arg(deb));
    let mut fields = BTreeMap::new();
    let mut last = String::new();
    for line in text.lines() {
        if let Some(cont) = line.strip_prefix(' ') {
            fields.entry(last.clone()).and_modify(|v: &mut String| {
                v.push('\n');
                v.push_str(cont)
            });
        } else if let Some((k, v)) = line.split_once(": ") {
            last = k.to_owned();
            fields.insert(k.to_owned(), v.to_owned());
        }
    }
    fields
}

/// The newest `GLIBC_x.y` symbol version a binary references.
fn newest_glibc(bin: &Path) -> String {
    let text = ok(Command::new("readelf").arg("-VW").arg(bin));
    let mut versions: Vec<Vec<u32>> = text
        .split(|c: char| c.is_whitespace())
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .filter_map(|v| v.split('.').map(|n| n.parse().ok()).collect())
        .collect();
    versions.sort();
    let newest = versions.last().expect("a glibc build references GLIBC_ versions");
    newest.iter().map(u32::to_string).collect::<Vec<_>>().join(".")
}

#[test]
fn deb_control_fields() {
    let f = control_fields(deb());
    assert_eq!(f["Package"], "lichen");
    assert_eq!(f["Version"], format!("{}-1", env!("CARGO_PKG_VERSION")), "the workspace's version");
    assert_eq!(f["Architecture"], host_arch());
    let glibc = newest_glibc(&lichen_bin());
    assert_eq!(f["Depends"], format!("libc6 (>= {glibc}), libgcc-s1, adduser"), "computed from the binary");
    assert_eq!(f["Recommends"], "mosquitto");
    assert_eq!(f["Section"], "net");
    assert_eq!(f["Priority"], "optional");
    assert!(
        f["Maintainer"].contains('<') && f["Maintainer"].ends_with('>'),
        "Maintainer: {}",
        f["Maintainer"]
    );
    assert_eq!(f["Homepage"], "https://github.com/lichen-edge/lichen");
    assert!(f["Description"].lines().count() > 3, "a synopsis and a long description: {}", f["Description"]);
    let size: u64 = f["Installed-Size"].parse().expect("Installed-Size is a number");
    let bin = std::fs::metadata(lichen_bin()).expect("lichen binary").len();
    assert!(size > 1000 && size * 1024 < bin, "Installed-Size {size} KiB for a stripped {bin}-byte binary");
}

#[test]
fn deb_contents_modes_owners_and_conffile() {
    let listing = ok(Command::new("dpkg-deb").arg("--contents").arg(deb()));
    let mut seen = BTreeMap::new();
    for line in listing.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols.len(), 6, "unexpected listing line {line:?}");
        assert_eq!(cols[1], "root/root", "{} must be owned by root", cols[5]);
        seen.insert(cols[5].to_owned(), cols[0].to_owned());
    }
    let dir = "drwxr-xr-x";
    let (exe, file) = ("-rwxr-xr-x", "-rw-r--r--");
    let want: BTreeMap<String, String> = [
        ("./", dir),
        ("./etc/", dir),
        ("./etc/lichen/", dir),
        ("./etc/lichen/config.toml", file),
        ("./etc/lichen/pods/", dir),
        ("./usr/", dir),
        ("./usr/bin/", dir),
        ("./usr/bin/lichen", exe),
        ("./usr/lib/", dir),
        ("./usr/lib/lichen/", dir),
        ("./usr/lib/lichen/firstboot", exe),
        ("./usr/lib/systemd/", dir),
        ("./usr/lib/systemd/system/", dir),
        ("./usr/lib/systemd/system/lichen-firstboot.service", file),
        ("./usr/lib/systemd/system/lichen.service", file),
        ("./usr/lib/sysusers.d/", dir),
        ("./usr/lib/sysusers.d/lichen.conf", file),
        ("./usr/share/", dir),
        ("./usr/share/doc/", dir),
        ("./usr/share/doc/lichen/", dir),
        ("./usr/share/doc/lichen/changelog.Debian.gz", file),
        ("./usr/share/doc/lichen/copyright", file),
        ("./usr/share/lintian/", dir),
        ("./usr/share/lintian/overrides/", dir),
        ("./usr/share/lintian/overrides/lichen", file),
    ]
    .into_iter()
    .map(|(p, m)| (p.to_owned(), m.to_owned()))
    .collect();
    assert_eq!(seen, want, "the package's paths and modes");

    let x = tempfile::tempdir().expect("tempdir");
    extract(x.path());
    let ctrl = x.path().join("DEBIAN");
    assert_eq!(
        std::fs::read_to_string(ctrl.join("conffiles")).expect("conffiles"),
        "/etc/lichen/config.toml\n"
    );
    // md5sums covers every file but the conffile, and matches.
    let sums = std::fs::read_to_string(ctrl.join("md5sums")).expect("md5sums");
    let listed: BTreeSet<&str> = sums.lines().filter_map(|l| l.split_whitespace().nth(1)).collect();
    let files: BTreeSet<&str> = want
        .iter()
        .filter(|(p, m)| !m.starts_with('d') && p.starts_with("./usr/"))
        .map(|(p, _)| p.trim_start_matches("./"))
        .collect();
    assert_eq!(listed, files, "md5sums lists every file under /usr");
    ok(Command::new("md5sum").arg("--check").arg("--quiet").arg(ctrl.join("md5sums")).current_dir(x.path()));
    // The debug binary was stripped as dh_strip would; a release binary arrives stripped.
    let sections = ok(Command::new("readelf").arg("-SW").arg(x.path().join("usr/bin/lichen")));
    assert!(!sections.contains(".symtab"), "/usr/bin/lichen still has a symbol table");
    let sysusers =
        std::fs::read_to_string(x.path().join("usr/lib/sysusers.d/lichen.conf")).expect("sysusers");
    assert!(sysusers.lines().any(|l| l.starts_with("u lichen - ") && l.contains(" /var/lib/lichen ")));
    let copyright =
        std::fs::read_to_string(x.path().join("usr/share/doc/lichen/copyright")).expect("copyright");
    assert!(copyright.contains("/usr/share/common-licenses/Apache-2.0"));
}

/// The maintainer scripts and every shell script of the packaging: `sh -n`, `set -e`, shellcheck.
#[test]
fn maintainer_and_packaging_scripts_are_clean() {
    need("shellcheck", "shellcheck");
    let x = tempfile::tempdir().expect("tempdir");
    extract(x.path());
    let ctrl = x.path().join("DEBIAN");
    let mut posix = Vec::new();
    for script in ["postinst", "prerm", "postrm"] {
        let path = ctrl.join(script);
        let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("the package has no {script}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o777, 0o755, "{script} mode");
        let text = std::fs::read_to_string(&path).expect("script text");
        assert!(text.starts_with("#!/bin/sh\n"), "{script} must be a POSIX sh script");
        assert!(text.lines().any(|l| l == "set -e"), "{script} must `set -e`");
        posix.push(path);
    }
    posix.push(x.path().join("usr/lib/lichen/firstboot"));
    for path in &posix {
        ok(Command::new("sh").arg("-n").arg(path));
        ok(Command::new("shellcheck").args(["--shell=sh", "--severity=style"]).arg(path));
    }
    let bash = [repo().join("cross/deb.sh"), repo().join("images/bake.sh")];
    for path in &bash {
        ok(Command::new("bash").arg("-n").arg(path));
        ok(Command::new("shellcheck").arg("--severity=style").arg(path));
    }
}

#[test]
fn lintian_finds_no_errors_or_unexplained_warnings() {
    need("lintian", "lintian");
    let cwd = tempfile::tempdir().expect("tempdir");
    let out = run(Command::new("lintian")
        .args(["--fail-on", "error,warning", "--info", "--display-info"])
        .arg(deb())
        .current_dir(cwd.path()));
    let text = String::from_utf8_lossy(&out.stdout);
    let bad: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("E:") || l.starts_with("W:") || l.contains("unused-override"))
        .collect();
    assert!(
        out.status.success() && bad.is_empty(),
        "lintian ({}) flags the package; fix it or override the tag with a reason in \
         cross/debian/lintian-overrides:\n{}\n{}",
        out.status,
        bad.join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The package's data archive as a file, for tar.
fn x_tar(deb: &Path) -> PathBuf {
    let data = deb.with_extension("data.tar");
    let file = std::fs::File::create(&data).expect("create the data archive");
    ok(Command::new("dpkg-deb").arg("--fsys-tarfile").arg(deb).stdout(file));
    data
}

#[test]
fn deb_is_reproducible() {
    need("tar", "tar");
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    // Different scratch directories: nothing of the build machine's paths or inode order leaks in.
    let deb_a = PathBuf::from(ok(deb_sh(a.path(), "none").env("TMPDIR", a.path())).trim());
    let deb_b = PathBuf::from(ok(deb_sh(b.path(), "none").env("TMPDIR", b.path())).trim());
    let (bytes_a, bytes_b) = (std::fs::read(&deb_a).expect("read"), std::fs::read(&deb_b).expect("read"));
    assert!(
        bytes_a == bytes_b,
        "two builds of the same binary differ: {} and {}",
        deb_a.display(),
        deb_b.display()
    );
    let data = x_tar(&deb_a);
    let listing = ok(Command::new("tar")
        .args(["--list", "--verbose", "--numeric-owner", "--full-time", "--utc", "--file"])
        .arg(&data));
    assert!(listing.lines().count() > 20, "the data archive lists every path:\n{listing}");
    for line in listing.lines() {
        assert!(line.contains(" 0/0 ") && line.contains(SDE_UTC), "owner 0/0 and SOURCE_DATE_EPOCH: {line}");
    }
}

#[test]
fn deb_sh_refuses_a_binary_of_another_architecture() {
    let out = tempfile::tempdir().expect("tempdir");
    let mut cmd = deb_sh(out.path(), "none");
    cmd.args(["--arch", foreign_arch()]);
    refused(&mut cmd, "is built for");
    let mut cmd = deb_sh(out.path(), "none");
    cmd.args(["--binary", "/nonexistent/lichen"]);
    refused(&mut cmd, "/nonexistent/lichen does not exist");
}

/// `(table, key)` for every setting in a rendered config; a table without keys (`[node_labels]`)
/// is a top-level key whose value is a table.
fn settings(rendered: &str) -> BTreeSet<(String, String)> {
    let mut table = String::new();
    let mut keys = BTreeSet::new();
    let mut empty_tables = BTreeSet::new();
    for line in rendered.lines() {
        if let Some(t) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            table = t.to_owned();
            empty_tables.insert(t.to_owned());
        } else if let Some((k, _)) = line.split_once(" = ") {
            empty_tables.remove(&table);
            keys.insert((table.clone(), k.to_owned()));
        }
    }
    keys.extend(empty_tables.into_iter().map(|t| (String::new(), t)));
    keys
}

#[test]
fn packaged_config_lists_every_setting_with_its_default() {
    let x = tempfile::tempdir().expect("tempdir");
    extract(x.path());
    let path = x.path().join("etc/lichen/config.toml");
    let shipped = std::fs::read_to_string(&path).expect("packaged config");
    let default = AgentConfig::default().to_toml();

    let as_shipped = AgentConfig::from_toml(&shipped, &path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(as_shipped.to_toml(), default, "the shipped file, all commented, is the defaults");

    // Uncommenting every setting changes nothing: the values shown are the real defaults.
    let mut table = String::new();
    let mut shown = BTreeSet::new();
    let uncommented: String = shipped
        .lines()
        .map(|l| {
            if let Some(t) = l.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                table = t.to_owned();
            }
            match l.strip_prefix('#') {
                Some(setting)
                    if setting
                        .split_once(" = ")
                        .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_')) =>
                {
                    shown.insert((
                        table.clone(),
                        setting.split_once(" = ").map(|(k, _)| k.to_owned()).unwrap_or_default(),
                    ));
                    format!("{setting}\n")
                }
                _ => format!("{l}\n"),
            }
        })
        .collect();
    let all = AgentConfig::from_toml(&uncommented, &path)
        .unwrap_or_else(|e| panic!("uncommented: {e}\n{uncommented}"));
    assert_eq!(all.to_toml(), default, "a commented value in systemd/config.toml is not the default");
    let all_settings = settings(&default);
    let missing: Vec<_> = all_settings.difference(&shown).collect();
    let unknown: Vec<_> = shown.difference(&all_settings).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "systemd/config.toml must show every setting in its table; missing (table, key): {missing:?}, \
         not settings: {unknown:?}"
    );

    // And the agent itself accepts both, as `lichen check` on the board will.
    for (name, text) in [("shipped.toml", shipped.as_str()), ("uncommented.toml", uncommented.as_str())] {
        let file = x.path().join(name);
        std::fs::write(&file, text).expect("write config");
        let out = ok(Command::new(lichen_bin())
            .args(["check", "--config"])
            .arg(&file)
            .arg("--state-dir")
            .arg(x.path().join("state"))
            .arg("--static-pod-dir")
            .arg(x.path().join("pods"))
            .env_remove("LICHEN_CONFIG"));
        assert!(out.contains("no problems found"), "lichen check on {name}:\n{out}");
    }
}

#[test]
fn units_pass_systemd_analyze_verify() {
    need("systemd-analyze", "systemd");
    let x = tempfile::tempdir().expect("tempdir");
    extract(x.path());
    let units = x.path().join("units");
    std::fs::create_dir(&units).expect("units dir");
    // verify insists that ExecStart's program exists: point it at the extracted files.
    let lichen =
        std::fs::read_to_string(x.path().join("usr/lib/systemd/system/lichen.service")).expect("unit");
    let firstboot = std::fs::read_to_string(x.path().join("usr/lib/systemd/system/lichen-firstboot.service"))
        .expect("unit");
    assert!(lichen.contains("ExecStart=/usr/bin/lichen run --config /etc/lichen/config.toml"));
    assert!(
        lichen.contains("After=") && lichen.contains("lichen-firstboot.service"),
        "lichen waits for first boot"
    );
    assert!(firstboot.contains("\nBefore=lichen.service\n") && firstboot.contains("\nType=oneshot\n"));
    for cond in ["ConditionPathExists=|/boot/firmware/lichen.toml", "ConditionPathExists=|/boot/lichen.toml"]
    {
        assert!(firstboot.contains(cond), "lichen-firstboot.service lacks {cond}");
    }
    let bin = x.path().join("usr/bin/lichen").display().to_string();
    let script = x.path().join("usr/lib/lichen/firstboot").display().to_string();
    std::fs::write(units.join("lichen.service"), lichen.replace("/usr/bin/lichen", &bin)).expect("write");
    std::fs::write(
        units.join("lichen-firstboot.service"),
        firstboot.replace("/usr/lib/lichen/firstboot", &script),
    )
    .expect("write");
    let out = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(units.join("lichen.service"))
        .arg(units.join("lichen-firstboot.service")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on unknown keys, so its messages about our units count too.
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("lichen")).collect();
    assert!(out.status.success() && ours.is_empty(), "systemd-analyze verify ({}):\n{stderr}", out.status);
}

/// `dpkg` on a fake root: `--force-script-chrootless` runs the maintainer scripts here with
/// DPKG_ROOT set, which every path in them goes through, so the whole life of the package is seen.
fn dpkg_in(root: &Path, args: &[&str]) -> String {
    let out = run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--force-script-chrootless", "--force-depends", "--force-not-root"])
        .args(args));
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "dpkg {args:?} on {} failed:\n{text}", root.display());
    text
}

#[test]
fn dpkg_installs_upgrades_removes_and_purges() {
    need("systemd-sysusers", "systemd");
    need("deb-systemd-helper", "init-system-helpers");
    assert!(
        is_root(),
        "the maintainer scripts chown files to the lichen user: run the tests as root (CI does)"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let r = dir.path();
    for d in ["etc", "var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers"] {
        std::fs::create_dir_all(r.join(d)).expect("fake root");
    }
    std::fs::write(r.join("var/lib/dpkg/status"), "").expect("status");
    let deb = deb().display().to_string();
    let hint = "lichen: edit /etc/lichen/config.toml, then run: systemctl start lichen";
    let wants = r.join("etc/systemd/system/multi-user.target.wants");

    let said = dpkg_in(r, &["--install", &deb]);
    assert_eq!(said.matches(hint).count(), 1, "a first installation tells the operator what to do:\n{said}");
    let (uid, gid) = (id_in(r, "passwd", "lichen"), id_in(r, "group", "lichen"));
    assert_eq!(mode_owner(&r.join("var/lib/lichen")), (0o700, uid, gid), "/var/lib/lichen");
    assert_eq!(mode_owner(&r.join("etc/lichen")), (0o750, 0, gid), "/etc/lichen, read by the agent's group");
    assert_eq!(mode_owner(&r.join("etc/lichen/config.toml")), (0o644, 0, 0), "the conffile");
    for unit in ["lichen.service", "lichen-firstboot.service"] {
        let target =
            std::fs::read_link(wants.join(unit)).unwrap_or_else(|e| panic!("{unit} not enabled: {e}"));
        assert_eq!(target, Path::new("/usr/lib/systemd/system").join(unit));
    }

    // An upgrade (the same version again) repeats every step quietly and keeps the user.
    let said = dpkg_in(r, &["--install", &deb]);
    assert!(!said.contains(hint), "only a first installation prints the hint:\n{said}");
    assert_eq!((id_in(r, "passwd", "lichen"), id_in(r, "group", "lichen")), (uid, gid));
    // An administrator's `disable` survives upgrades.
    ok(Command::new("systemctl").arg(format!("--root={}", r.display())).args(["disable", "lichen.service"]));
    let present = |p: PathBuf| p.symlink_metadata().is_ok();
    assert!(!present(wants.join("lichen.service")));
    dpkg_in(r, &["--install", &deb]);
    assert!(!present(wants.join("lichen.service")), "the upgrade enabled a unit the administrator disabled");
    assert!(present(wants.join("lichen-firstboot.service")));

    // Removal keeps the config and the state; purge deletes them, but never the user.
    std::fs::write(r.join("var/lib/lichen/store"), "state").expect("state");
    std::fs::write(r.join("etc/lichen/kubeconfig"), KUBECONFIG).expect("kubeconfig");
    dpkg_in(r, &["--remove", "lichen"]);
    assert!(!r.join("usr/bin/lichen").exists());
    assert!(r.join("var/lib/lichen/store").exists() && r.join("etc/lichen/config.toml").exists());
    dpkg_in(r, &["--purge", "lichen"]);
    for gone in [
        "var/lib/lichen",
        "etc/lichen",
        "etc/systemd/system/multi-user.target.wants/lichen-firstboot.service",
    ] {
        assert!(!present(r.join(gone)), "purge left /{gone}");
    }
    assert_eq!(id_in(r, "passwd", "lichen"), uid, "Debian policy: purge keeps the system user");
}

// ---- images/bake.sh --------------------------------------------------------------------------------

/// What a synthetic board image holds.
struct Board {
    /// dpkg's architecture in /var/lib/dpkg/status; None: no dpkg status at all.
    arch: Option<&'static str>,
    libc: &'static str,
    /// The vfat mount point in /etc/fstab; None: no vfat line.
    boot_dir: Option<&'static str>,
    systemd: bool,
    fat: bool,
    /// An ELF header with this e_machine as /usr/bin/dash.
    dash_machine: Option<u16>,
    /// /etc/lichen/config.toml already in the image.
    own_config: Option<&'static str>,
}

impl Default for Board {
    fn default() -> Self {
        Board {
            arch: Some(host_arch()),
            libc: "2.36-9+rpt2+deb12u4",
            boot_dir: Some("/boot/firmware"),
            systemd: true,
            fat: true,
            dash_machine: None,
            own_config: None,
        }
    }
}

fn image_tools() {
    need("sfdisk", "fdisk");
    need("mkfs.vfat", "dosfstools");
    need("mke2fs", "e2fsprogs");
    need("debugfs", "e2fsprogs");
    need("e2fsck", "e2fsprogs");
    need("mdir", "mtools");
    need("jq", "jq");
}

/// Builds `<dir>/<name>.img` as `b` says, without mounting: sfdisk, mkfs.vfat on a separate file
/// copied into place, mke2fs -d from a staging directory at the root partition's offset.
fn make_image(dir: &Path, name: &str, b: &Board) -> PathBuf {
    image_tools();
    let root = dir.join(format!("{name}.root"));
    let mkdir = |p: &str| std::fs::create_dir_all(root.join(p)).expect("staging dir");
    let write = |p: &str, text: &[u8]| std::fs::write(root.join(p), text).expect("staging file");
    for d in ["etc", "usr/bin", "usr/lib/systemd/system", "var/lib/dpkg/info", "boot/firmware"] {
        mkdir(d);
    }
    if b.systemd {
        mkdir("etc/systemd/system/multi-user.target.wants");
    }
    let mut fstab = String::from("proc  /proc  proc  defaults  0  0\n");
    if let Some(boot) = b.boot_dir {
        fstab.push_str(&format!("PARTUUID=4c5e8fa2-01  {boot}  vfat  defaults  0  2\n"));
    }
    fstab.push_str("PARTUUID=4c5e8fa2-02  /  ext4  defaults,noatime  0  1\n");
    write("etc/fstab", fstab.as_bytes());
    write("etc/os-release", b"PRETTY_NAME=\"Lichen test board\"\nID=debian\nVERSION_CODENAME=bookworm\n");
    if let Some(arch) = b.arch {
        let status = format!(
            "Package: dpkg\nStatus: install ok installed\nPriority: required\nMaintainer: Dpkg Developers \
             <debian-dpkg@lists.debian.org>\nArchitecture: {arch}\nVersion: 1.21.22\nDescription: Debian package \
             management system\n\nPackage: libc6\nStatus: install ok installed\nPriority: optional\nMaintainer: \
             GNU Libc Maintainers <debian-glibc@lists.debian.org>\nArchitecture: {arch}\nMulti-Arch: same\n\
             Version: {}\nDescription: GNU C Library: Shared libraries\n\n",
            b.libc
        );
        write("var/lib/dpkg/status", status.as_bytes());
    }
    if let Some(machine) = b.dash_machine {
        // Enough of an ELF header for readelf -h: 64-bit, little-endian, an executable for `machine`.
        let mut h = vec![0u8; 64];
        h[..7].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1]);
        h[16] = 2;
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h[20] = 1;
        h[52] = 64;
        write("usr/bin/dash", &h);
    }
    if let Some(text) = b.own_config {
        mkdir("etc/lichen");
        write("etc/lichen/config.toml", text.as_bytes());
    }

    let img = dir.join(format!("{name}.img"));
    std::fs::File::create(&img).and_then(|f| f.set_len(IMAGE_SIZE)).expect("create the image");
    let (s, boot_sectors) = (BOOT_START / 512, BOOT_SIZE / 512);
    let table = if b.fat {
        format!(
            "label: dos\nlabel-id: 0x4c5e8fa2\nunit: sectors\n{s},{boot_sectors},c\n{},,83\n",
            ROOT_START / 512
        )
    } else {
        format!("label: dos\nlabel-id: 0x4c5e8fa2\nunit: sectors\n{},,83\n", ROOT_START / 512)
    };
    let mut sfdisk =
        Command::new("sfdisk").arg("--quiet").arg(&img).stdin(Stdio::piped()).spawn().expect("spawn sfdisk");
    sfdisk.stdin.take().expect("stdin").write_all(table.as_bytes()).expect("partition script");
    assert!(sfdisk.wait().expect("sfdisk").success(), "sfdisk could not partition {}", img.display());
    if b.fat {
        let fat = dir.join(format!("{name}.fat"));
        ok(Command::new("mkfs.vfat")
            .args(["-F", "32", "-n", "bootfs", "-C"])
            .arg(&fat)
            .arg((BOOT_SIZE / 1024).to_string()));
        let bytes = std::fs::read(&fat).expect("read the FAT file system");
        let mut f = std::fs::OpenOptions::new().write(true).open(&img).expect("open the image");
        f.seek(SeekFrom::Start(BOOT_START)).expect("seek");
        f.write_all(&bytes).expect("write the FAT partition");
        std::fs::remove_file(&fat).expect("remove the FAT file");
    }
    ok(Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-d"])
        .arg(&root)
        .arg("-E")
        .arg(format!("offset={ROOT_START}"))
        .arg(&img)
        .arg(format!("{}k", (IMAGE_SIZE - ROOT_START) / 1024)));
    img
}

fn bake(image: &Path, config: &Path) -> Command {
    let mut cmd = Command::new(repo().join("images/bake.sh"));
    cmd.arg("--image").arg(image).arg("--deb").arg(deb()).arg("--config").arg(config);
    cmd
}

/// One inode of a baked root file system, as debugfs shows it.
#[derive(Debug, PartialEq)]
struct Inode {
    kind: String,
    mode: u32,
    uid: u32,
    gid: u32,
    link: Option<String>,
}

/// Reads a baked image back without mounting it.
struct Baked {
    img: PathBuf,
}

impl Baked {
    fn fs(&self) -> String {
        format!("{}?offset={ROOT_START}", self.img.display())
    }

    fn debugfs(&self, request: &str) -> String {
        ok(Command::new("debugfs").arg("-R").arg(request).arg(self.fs()))
    }

    fn stat(&self, path: &str) -> Option<Inode> {
        let text = self.debugfs(&format!("stat {path}"));
        let first = text.lines().next()?;
        let word_after = |line: &str, key: &str| {
            line.split_once(key).and_then(|(_, rest)| rest.split_whitespace().next()).map(str::to_owned)
        };
        let user_line = text.lines().find(|l| l.starts_with("User:"))?;
        Some(Inode {
            kind: word_after(first, "Type:")?,
            mode: u32::from_str_radix(&word_after(first, "Mode:")?, 8).ok()?,
            uid: word_after(user_line, "User:")?.parse().ok()?,
            gid: word_after(user_line, "Group:")?.parse().ok()?,
            link: text
                .lines()
                .find_map(|l| l.strip_prefix("Fast link dest: "))
                .map(|t| t.trim_matches('"').to_owned()),
        })
    }

    fn cat(&self, path: &str) -> Vec<u8> {
        let to = self.img.with_extension(format!("dump{}", path.replace('/', "_")));
        self.debugfs(&format!("dump {path} {}", to.display()));
        let bytes =
            std::fs::read(&to).unwrap_or_else(|e| panic!("{path} not in {}: {e}", self.img.display()));
        let _ = std::fs::remove_file(&to);
        bytes
    }

    fn text(&self, path: &str) -> String {
        String::from_utf8(self.cat(path)).expect("utf-8")
    }

    fn fat(&self) -> String {
        format!("{}@@{BOOT_START}", self.img.display())
    }

    fn boot_files(&self) -> BTreeSet<String> {
        ok(Command::new("mdir").args(["-b", "-i"]).arg(self.fat()).arg("::/").env("MTOOLS_SKIP_CHECK", "1"))
            .lines()
            .map(|l| l.trim_start_matches("::/").to_owned())
            .collect()
    }

    fn boot_text(&self, name: &str) -> String {
        ok(Command::new("mtype")
            .arg("-i")
            .arg(self.fat())
            .arg(format!("::/{name}"))
            .env("MTOOLS_SKIP_CHECK", "1"))
    }

    fn fsck(&self) {
        ok(Command::new("e2fsck").arg("-fn").arg(self.fs()));
    }

    /// dpkg's database from the image, for dpkg-query --admindir.
    fn dpkg_admindir(&self, to: &Path) {
        std::fs::create_dir_all(to.join("info")).expect("admindir");
        std::fs::write(to.join("status"), self.cat("/var/lib/dpkg/status")).expect("status");
        std::fs::write(to.join("available"), "").expect("available");
        for ext in ["list", "md5sums", "conffiles", "postinst", "prerm", "postrm"] {
            let name = format!("info/lichen.{ext}");
            std::fs::write(to.join(&name), self.cat(&format!("/var/lib/dpkg/{name}"))).expect("info file");
        }
    }
}

/// The example in the README's "Installing on a board".
const BOARD_CONFIG: &str = "node_name = \"barn-3\"\nkubeconfig = \"/etc/lichen/kubeconfig\"\nnode_labels = { \"example.com/site\" = \"barn\" }\n";
const KUBECONFIG: &str = "apiVersion: v1\nkind: Config\nclusters: []\n";

#[test]
fn bake_installs_the_package_units_and_boot_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = make_image(dir.path(), "pios", &Board::default());
    let config = dir.path().join("lichen.toml");
    let kubeconfig = dir.path().join("kubeconfig.yaml");
    std::fs::write(&config, BOARD_CONFIG).expect("config");
    std::fs::write(&kubeconfig, KUBECONFIG).expect("kubeconfig");
    let out_img = dir.path().join("baked.img");
    let said = ok(bake(&image, &config).arg("--kubeconfig").arg(&kubeconfig).arg("--out").arg(&out_img));
    assert!(
        said.contains("passed `lichen check`"),
        "bake validated the config with the package's lichen:\n{said}"
    );
    assert!(!said.contains("WARNING"), "{said}");
    let baked = Baked { img: out_img };
    baked.fsck();
    assert_eq!(Baked { img: image }.stat("/usr/bin/lichen"), None, "the input image must stay untouched");

    // Every file of the package, root-owned, with its mode and its bytes.
    let x = tempfile::tempdir().expect("tempdir");
    extract(x.path());
    let listing = ok(Command::new("dpkg-deb").arg("--contents").arg(deb()));
    for line in listing.lines() {
        let path = line
            .split_whitespace()
            .nth(5)
            .expect("path column")
            .trim_start_matches('.')
            .trim_end_matches('/');
        if path.is_empty() {
            continue;
        }
        let local = x.path().join(path.trim_start_matches('/'));
        let meta = std::fs::symlink_metadata(&local).expect("extracted file");
        let inode = baked.stat(path).unwrap_or_else(|| panic!("{path} is not in the baked image"));
        assert_eq!((inode.uid, inode.gid), (0, 0), "{path} owner");
        if meta.is_dir() {
            assert_eq!(inode.kind, "directory", "{path}");
            continue;
        }
        assert_eq!(inode.kind, "regular", "{path}");
        let want = meta.permissions().mode() & 0o7777;
        assert!(inode.mode == want, "{path} has mode {:o} in the image, {want:o} in the package", inode.mode);
        assert!(
            baked.cat(path) == std::fs::read(&local).expect("read"),
            "{path} content differs from the package"
        );
    }
    assert_eq!(baked.stat("/usr/bin/lichen").map(|i| i.mode), Some(0o755));

    for unit in ["lichen.service", "lichen-firstboot.service"] {
        let link =
            baked.stat(&format!("/etc/systemd/system/multi-user.target.wants/{unit}")).expect("enabled");
        assert_eq!(link.kind, "symlink");
        assert_eq!(link.link.as_deref(), Some(format!("/usr/lib/systemd/system/{unit}").as_str()));
    }
    let dropin = baked.text("/etc/systemd/system/lichen-firstboot.service.d/boot-partition.conf");
    assert!(dropin.contains("Environment=LICHEN_BOOT_DIR=/boot/firmware\n"), "{dropin}");
    assert!(dropin.contains("ConditionPathExists=|/boot/firmware/lichen.toml\n"), "{dropin}");

    let boot = baked.boot_files();
    assert!(
        boot.contains("lichen.toml") && boot.contains("lichen-kubeconfig.yaml"),
        "boot partition: {boot:?}"
    );
    assert_eq!(baked.boot_text("lichen.toml"), BOARD_CONFIG);
    assert_eq!(baked.boot_text("lichen-kubeconfig.yaml"), KUBECONFIG);

    // dpkg on the board knows the package: upgrades and removal work as for an `apt install`.
    need("dpkg-query", "dpkg");
    let admin = dir.path().join("admin");
    baked.dpkg_admindir(&admin);
    let q = ok(Command::new("dpkg-query")
        .arg(format!("--admindir={}", admin.display()))
        .args(["-W", "-f", "${Package} ${Version} ${Architecture} ${Status}\n${Conffiles}\n"])
        .args(["lichen", "libc6", "dpkg"]));
    let md5 = ok(Command::new("md5sum").arg(x.path().join("etc/lichen/config.toml")));
    let md5 = md5.split_whitespace().next().expect("md5");
    let arch = host_arch();
    assert!(
        q.contains(&format!(
            "lichen {}-1 {arch} install ok installed\n /etc/lichen/config.toml {md5}",
            env!("CARGO_PKG_VERSION")
        )),
        "dpkg-query on the baked image:\n{q}"
    );
    assert!(
        q.contains(&format!("libc6 2.36-9+rpt2+deb12u4 {arch} install ok installed")),
        "the image's packages stay:\n{q}"
    );
    let files =
        ok(Command::new("dpkg-query").arg(format!("--admindir={}", admin.display())).args(["-L", "lichen"]));
    assert!(
        files.lines().any(|l| l == "/usr/bin/lichen") && files.lines().any(|l| l == "/etc/lichen/pods"),
        "{files}"
    );
}

#[test]
fn bake_in_place_again_keeps_the_images_config_and_follows_fstab() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Raspberry Pi OS before bookworm mounted the boot partition at /boot.
    let own = "# this image's own settings\nnode_name = \"kept\"\n";
    let board = Board { boot_dir: Some("/boot"), own_config: Some(own), ..Board::default() };
    let image = make_image(dir.path(), "bullseye-layout", &board);
    let config = dir.path().join("lichen.toml");
    let kubeconfig = dir.path().join("kubeconfig.yaml");
    std::fs::write(&config, "node_name = \"board-2\"\n").expect("config");
    std::fs::write(&kubeconfig, KUBECONFIG).expect("kubeconfig");
    for round in 0..2 {
        let said = ok(bake(&image, &config)
            .arg("--in-place")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--lichen-host")
            .arg(lichen_bin()));
        assert!(said.contains("(--lichen-host)"), "round {round}: {said}");
        // A kubeconfig the config does not name is installed but unused: bake says so.
        assert!(
            said.contains("WARNING: --kubeconfig is installed as /etc/lichen/kubeconfig"),
            "round {round}: {said}"
        );
        assert!(said.contains("kept the image's own /etc/lichen/config.toml"), "round {round}: {said}");
        assert!(said.contains("mounted at /boot\n"), "round {round}: {said}");
    }
    let baked = Baked { img: image };
    baked.fsck();
    assert_eq!(
        baked.text("/etc/lichen/config.toml"),
        own,
        "dpkg keeps an administrator's conffile; so does bake"
    );
    assert_eq!(baked.stat("/usr/bin/lichen").map(|i| (i.kind, i.mode)), Some(("regular".into(), 0o755)));
    let dropin = baked.text("/etc/systemd/system/lichen-firstboot.service.d/boot-partition.conf");
    assert!(dropin.contains("Environment=LICHEN_BOOT_DIR=/boot\n"), "{dropin}");
    let status = baked.text("/var/lib/dpkg/status");
    assert_eq!(status.matches("Package: lichen\n").count(), 1, "one lichen entry after two bakes:\n{status}");
    assert_eq!(baked.boot_text("lichen.toml"), "node_name = \"board-2\"\n");
}

#[test]
fn bake_refuses_what_it_cannot_bake() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let config = d.join("lichen.toml");
    std::fs::write(&config, BOARD_CONFIG).expect("config");
    let good = make_image(d, "good", &Board::default());
    let out = d.join("out.img");
    let refuse = |image: &Path, config: &Path, needle: &str| {
        refused(bake(image, config).arg("--out").arg(&out), needle);
        assert!(!out.exists(), "a refused bake left {} behind", out.display());
    };

    refuse(&d.join("missing.img"), &config, "missing.img: no such image file");
    let blank = d.join("blank.img");
    std::fs::File::create(&blank).and_then(|f| f.set_len(8 * MIB)).expect("blank image");
    refuse(&blank, &config, "has no partition table");
    let xz = d.join("compressed.img");
    std::fs::write(&xz, [0xfd, b'7', b'z', b'X', b'Z', 0, 0, 0]).expect("xz image");
    refuse(&xz, &config, "is xz-compressed: run `unxz -k");

    let foreign = foreign_arch();
    let other = make_image(d, "other", &Board { arch: Some(foreign), ..Board::default() });
    refuse(&other, &config, &format!("is for {} but {} is {foreign}", host_arch(), other.display()));
    // Without a dpkg status, the ELF header of the image's shell tells (0xB7: AArch64, 0x3E: x86-64).
    let machine = if foreign == "arm64" { 0xB7 } else { 0x3E };
    let elf = make_image(d, "elf", &Board { arch: None, dash_machine: Some(machine), ..Board::default() });
    refuse(&elf, &config, &format!("is {foreign}: build the package with cross/deb.sh --arch {foreign}"));
    let old = make_image(d, "bullseye", &Board { libc: "2.31-13+rpt2+rpi1+deb11u5", ..Board::default() });
    refuse(&old, &config, "has 2.31-13+rpt2+rpi1+deb11u5: use a newer image");
    let no_systemd = make_image(d, "nosystemd", &Board { systemd: false, ..Board::default() });
    refuse(&no_systemd, &config, "has no /etc/systemd");
    let no_fat = make_image(d, "nofat", &Board { fat: false, ..Board::default() });
    refuse(&no_fat, &config, "has no FAT partition");
    let no_vfat_line = make_image(d, "nofstab", &Board { boot_dir: None, ..Board::default() });
    refuse(&no_vfat_line, &config, "/etc/fstab mounts no vfat partition");

    let bad = d.join("bad.toml");
    std::fs::write(&bad, "bogus = 1\n").expect("bad config");
    let text = refused(bake(&good, &bad).arg("--out").arg(&out), "is rejected by `lichen check`");
    assert!(text.contains("unknown field `bogus`"), "the agent's own reason is shown:\n{text}");
    assert!(!out.exists());
    refuse(&good, &d.join("nope.toml"), "nope.toml: no such config file");
}

/// The zero-touch config of the README's "Installing on a board": no kubeconfig, a `[join]` table.
const JOIN_CONFIG: &str = "node_name = \"barn-3\"\nnode_labels = { \"example.com/site\" = \"barn\" }\n\n\
                           [join]\nserver = \"https://10.0.0.1:6443\"\nca_cert = \"/etc/lichen/ca.crt\"\n";

/// A cluster CA certificate (PEM) as `kubeadm init` makes one, and its private key (PEM).
fn cluster_ca() -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("CA key");
    let mut params = rcgen::CertificateParams::new(vec![]).expect("CA params");
    params.distinguished_name.push(rcgen::DnType::CommonName, "kubernetes");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    (params.self_signed(&key).expect("CA certificate").pem(), key.serialize_pem())
}

/// A fresh bootstrap token `<6>.<16>` of a-z0-9, so that finding it anywhere means it leaked.
fn a_token() -> String {
    let mut rng = fastrand::Rng::new();
    let mut part = |n: usize| -> String {
        (0..n)
            .map(|_| {
                let c = rng.u8(0..36);
                char::from(if c < 10 { b'0' + c } else { b'a' + c - 10 })
            })
            .collect()
    };
    let id = part(6);
    format!("{id}.{}", part(16))
}

#[test]
fn bake_puts_the_join_credentials_on_the_boot_partition() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let image = make_image(d, "zero-touch", &Board::default());
    let (config, ca, token_file) = (d.join("lichen.toml"), d.join("ca.crt"), d.join("token"));
    let (ca_pem, _) = cluster_ca();
    let token = a_token();
    std::fs::write(&config, JOIN_CONFIG).expect("config");
    std::fs::write(&ca, &ca_pem).expect("ca");
    // As an editor on Windows saves it: surrounding blanks and a CRLF are not part of the token.
    std::fs::write(&token_file, format!(" {token} \r\n")).expect("token");
    let out_img = d.join("baked.img");
    let said = ok(bake(&image, &config)
        .arg("--ca-cert")
        .arg(&ca)
        .arg("--bootstrap-token-file")
        .arg(&token_file)
        .arg("--out")
        .arg(&out_img));
    assert!(said.contains("passed `lichen check`"), "{said}");
    assert!(!said.contains("WARNING"), "the README's zero-touch config draws no warning:\n{said}");
    assert!(!said.contains(&token), "bake printed the token:\n{said}");
    assert!(
        said.contains(
            "/boot/firmware/lichen.toml, /boot/firmware/lichen-ca.crt, /boot/firmware/lichen-bootstrap-token \
             on the boot partition; the first boot moves them to /etc/lichen and /var/lib/lichen"
        ),
        "{said}"
    );
    let baked = Baked { img: out_img };
    baked.fsck();
    let boot = baked.boot_files();
    let want: BTreeSet<String> =
        ["lichen.toml", "lichen-ca.crt", "lichen-bootstrap-token"].into_iter().map(String::from).collect();
    assert_eq!(boot, want, "the boot partition");
    assert_eq!(baked.boot_text("lichen.toml"), JOIN_CONFIG);
    assert_eq!(baked.boot_text("lichen-ca.crt"), ca_pem, "the CA as given");
    assert_eq!(baked.boot_text("lichen-bootstrap-token"), format!("{token}\n"), "the token, one clean line");
}

#[test]
fn bake_checks_the_join_credentials_and_warns_about_the_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let image = make_image(d, "checks", &Board::default());
    let (config, ca, token_file) = (d.join("lichen.toml"), d.join("ca.crt"), d.join("token"));
    let (ca_pem, key_pem) = cluster_ca();
    std::fs::write(&config, JOIN_CONFIG).expect("config");
    std::fs::write(&ca, &ca_pem).expect("ca");
    let token = a_token();
    std::fs::write(&token_file, format!("{token}\n")).expect("token");
    let out = d.join("out.img");
    let with = |config: &Path, ca: &Path, token: &Path| {
        let mut cmd = bake(&image, config);
        cmd.arg("--ca-cert").arg(ca).arg("--bootstrap-token-file").arg(token).arg("--out").arg(&out);
        cmd
    };

    // Refused before the image is touched.
    let not_pem = d.join("not-pem.crt");
    std::fs::write(&not_pem, "certificate-authority-data: LS0tLS1CRUdJTi\n").expect("not pem");
    refused(
        &mut with(&config, &not_pem, &token_file),
        "is not a cluster CA certificate: it holds no PEM certificate",
    );
    let with_key = d.join("ca-and-key.pem");
    std::fs::write(&with_key, format!("{ca_pem}{key_pem}")).expect("ca and key");
    refused(&mut with(&config, &with_key, &token_file), "it holds a private key");
    let secret = a_token();
    for (name, text) in [
        ("uppercase", secret.to_uppercase()),
        ("colon", secret.replace('.', ":")),
        ("two-lines", format!("{secret}\n{secret}\n")),
        ("short", secret[..22].to_owned()),
    ] {
        let bad = d.join(format!("token-{name}"));
        std::fs::write(&bad, &text).expect("bad token");
        let said = refused(&mut with(&config, &ca, &bad), "does not hold a bootstrap token");
        for shown in [text.as_str(), &secret[7..], &secret.to_uppercase()[7..], &secret[7..22]] {
            assert!(!said.contains(shown.trim()), "{name}: bake showed the token's content:\n{said}");
        }
    }
    assert!(!out.exists(), "a refused bake left {}", out.display());

    // Warnings come before the image is written: an existing --out stops the bake right after them.
    std::fs::write(&out, "").expect("existing out");
    let quiet = refused(&mut with(&config, &ca, &token_file), "exists: delete it");
    assert!(!quiet.contains("WARNING"), "{quiet}");
    let inline = a_token();
    let warned = d.join("warned.toml");
    std::fs::write(
        &warned,
        format!(
            "node_name = \"barn-3\"\nstate_dir = \"/srv/lichen\"\n[join]\nserver = \"https://10.0.0.1:6443\"\n\
             ca_cert = \"/etc/ssl/cluster.pem\"\ntoken = \"{inline}\"\n"
        ),
    )
    .expect("config");
    let said = refused(&mut with(&warned, &ca, &token_file), "exists: delete it");
    for warning in [
        "WARNING: --ca-cert is installed as /etc/lichen/ca.crt, but",
        "[join] says ca_cert = \"/etc/ssl/cluster.pem\"; add ca_cert = \"/etc/lichen/ca.crt\" to [join]",
        "sets [join] token inline: the token would stay in /etc/lichen/config.toml",
        "bake with --bootstrap-token-file FILE instead",
        "makes Lichen read the token from /srv/lichen/bootstrap-token",
    ] {
        assert!(said.contains(warning), "missing {warning:?}:\n{said}");
    }
    assert!(!said.contains(&inline) && !said.contains(&token), "bake showed a token:\n{said}");
    let elsewhere = d.join("elsewhere.toml");
    std::fs::write(&elsewhere, format!("{JOIN_CONFIG}token_file = \"/etc/lichen/token\"\n")).expect("config");
    let said = refused(&mut with(&elsewhere, &ca, &token_file), "exists: delete it");
    assert!(said.contains("makes Lichen read the token from /etc/lichen/token;"), "{said}");
    assert_eq!(said.matches("WARNING").count(), 1, "{said}");
    let standalone = d.join("standalone.toml");
    std::fs::write(&standalone, "node_name = \"barn-3\"\n").expect("config");
    let said = refused(&mut with(&standalone, &ca, &token_file), "exists: delete it");
    assert!(
        said.contains("--bootstrap-token-file is installed as /var/lib/lichen/bootstrap-token, but")
            && said.contains("has no [join] server, so the node never joins with it"),
        "{said}"
    );
}

// ---- the first boot ---------------------------------------------------------------------------------

/// A fake root holding the package's files, an /etc and both boot directories.
fn fake_root() -> tempfile::TempDir {
    need("systemd-sysusers", "systemd");
    assert!(
        is_root(),
        "the first-boot test chowns files to the lichen user: run the tests as root (CI does)"
    );
    let root = tempfile::tempdir().expect("tempdir");
    extract(root.path());
    for d in ["etc", "boot/firmware", "boot/efi"] {
        std::fs::create_dir_all(root.path().join(d)).expect("fake root dir");
    }
    root
}

fn firstboot(root: &Path, boot_dir: Option<&str>) -> Output {
    let mut cmd = Command::new(root.join("usr/lib/lichen/firstboot"));
    cmd.env("LICHEN_FIRSTBOOT_ROOT", root).env_remove("LICHEN_BOOT_DIR").env_remove("LICHEN_CONFIG");
    if let Some(d) = boot_dir {
        cmd.env("LICHEN_BOOT_DIR", d);
    }
    run(&mut cmd)
}

/// The uid or gid of `name` in the fake root's passwd or group file.
fn id_in(root: &Path, file: &str, name: &str) -> u32 {
    let text = std::fs::read_to_string(root.join("etc").join(file)).expect("passwd/group");
    text.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&name)).then(|| f.get(2).and_then(|id| id.parse().ok())).flatten()
        })
        .unwrap_or_else(|| panic!("no {name} in {file}:\n{text}"))
}

fn mode_owner(path: &Path) -> (u32, u32, u32) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.permissions().mode() & 0o7777, m.uid(), m.gid())
}

#[test]
fn firstboot_installs_settings_and_keeps_a_bad_config_on_the_boot_partition() {
    let root = fake_root();
    let r = root.path();
    let boot = r.join("boot/firmware");
    std::fs::write(boot.join("lichen.toml"), BOARD_CONFIG).expect("config");
    std::fs::write(boot.join("lichen-kubeconfig.yaml"), KUBECONFIG).expect("kubeconfig");
    let out = firstboot(r, None);
    let log = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "firstboot failed:\n{log}");

    let passwd = std::fs::read_to_string(r.join("etc/passwd")).expect("passwd");
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("lichen:x:") && l.ends_with(":/var/lib/lichen:/usr/sbin/nologin")),
        "systemd-sysusers made the system user from the package's sysusers.d file:\n{passwd}"
    );
    let (uid, gid) = (id_in(r, "passwd", "lichen"), id_in(r, "group", "lichen"));
    assert!(uid < 1000, "a system uid: {uid}");
    assert_eq!(mode_owner(&r.join("var/lib/lichen")), (0o700, uid, gid), "/var/lib/lichen");
    assert_eq!(mode_owner(&r.join("etc/lichen")), (0o750, 0, gid), "/etc/lichen");
    for (name, dest, text) in
        [("lichen.toml", "config.toml", BOARD_CONFIG), ("lichen-kubeconfig.yaml", "kubeconfig", KUBECONFIG)]
    {
        let installed = r.join("etc/lichen").join(dest);
        assert_eq!(std::fs::read_to_string(&installed).expect("installed"), text, "{dest}");
        assert_eq!(mode_owner(&installed), (0o640, 0, gid), "{dest} is 0640 root:lichen");
        assert!(!boot.join(name).exists(), "{name} must be gone from the boot partition");
        assert!(log.contains(&format!("installed {}", boot.join(name).display())), "logged:\n{log}");
    }

    // A config the agent rejects stays on the boot partition with the reason; the old one runs on.
    std::fs::write(boot.join("lichen.toml"), "bogus = 1\n").expect("bad config");
    let out = firstboot(r, None);
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "a rejected config must fail the unit (systemctl --failed shows it):\n{log}"
    );
    assert!(
        log.contains("rejected") && log.contains("unknown field `bogus`"),
        "the journal gets the reason:\n{log}"
    );
    assert!(!boot.join("lichen.toml").exists());
    assert_eq!(std::fs::read_to_string(boot.join("lichen.toml.invalid")).expect(".invalid"), "bogus = 1\n");
    let error = std::fs::read_to_string(boot.join("lichen.toml.error")).expect(".error");
    assert!(error.contains("unknown field `bogus`"), "{error}");
    let installed = r.join("etc/lichen/config.toml");
    assert_eq!(
        std::fs::read_to_string(&installed).expect("config"),
        BOARD_CONFIG,
        "the previous config stays"
    );
    assert_eq!(mode_owner(&installed), (0o640, 0, gid));

    // Fixed: installed, and the leftovers of the failed attempt are cleared.
    std::fs::write(boot.join("lichen.toml"), "node_name = \"board-3\"\n").expect("fixed config");
    let out = firstboot(r, None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(std::fs::read_to_string(&installed).expect("config"), "node_name = \"board-3\"\n");
    let left: Vec<_> = std::fs::read_dir(&boot).expect("boot").flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "the boot partition still holds {left:?}");
    assert_eq!(id_in(r, "passwd", "lichen"), uid, "running again keeps the same user");
}

#[test]
fn firstboot_finds_the_boot_partition() {
    let root = fake_root();
    let r = root.path();
    // Nothing on the boot partition: only the user and directories (a baked image's first boot).
    let out = firstboot(r, None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(r.join("var/lib/lichen").is_dir() && !r.join("etc/lichen/kubeconfig").exists());

    // /boot, as Raspberry Pi OS mounted it before bookworm, when /boot/firmware has nothing.
    std::fs::write(r.join("boot/lichen-kubeconfig.yaml"), KUBECONFIG).expect("kubeconfig");
    assert!(firstboot(r, None).status.success());
    assert_eq!(std::fs::read_to_string(r.join("etc/lichen/kubeconfig")).expect("kubeconfig"), KUBECONFIG);
    assert!(!r.join("boot/lichen-kubeconfig.yaml").exists());

    // Any other mount point, as bake.sh's drop-in names it from the image's fstab.
    std::fs::write(r.join("boot/efi/lichen.toml"), "node_name = \"efi-board\"\n").expect("config");
    std::fs::write(r.join("boot/firmware/lichen.toml"), "node_name = \"not-this-one\"\n").expect("decoy");
    assert!(firstboot(r, Some("/boot/efi")).status.success());
    assert_eq!(
        std::fs::read_to_string(r.join("etc/lichen/config.toml")).expect("config"),
        "node_name = \"efi-board\"\n"
    );
    assert!(r.join("boot/firmware/lichen.toml").exists(), "LICHEN_BOOT_DIR is the only place looked at");
}

/// Every file under `dir` (following no links), for looking for a leaked secret.
fn all_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let t = e.file_type().expect("file type");
        if t.is_dir() {
            all_files(&e.path(), out);
        } else if t.is_file() {
            out.push(e.path());
        }
    }
}

#[test]
fn firstboot_installs_the_join_credentials_and_refuses_bad_ones() {
    let root = fake_root();
    let r = root.path();
    let boot = r.join("boot/firmware");
    let (ca_pem, key_pem) = cluster_ca();
    let token = a_token();
    std::fs::write(boot.join("lichen.toml"), JOIN_CONFIG).expect("config");
    std::fs::write(boot.join("lichen-ca.crt"), &ca_pem).expect("ca");
    std::fs::write(boot.join("lichen-bootstrap-token"), format!("{token}\r\n")).expect("token");
    let out = firstboot(r, None);
    let log = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "firstboot failed:\n{log}");
    assert!(!log.contains(&token), "the journal got the token:\n{log}");
    let (uid, gid) = (id_in(r, "passwd", "lichen"), id_in(r, "group", "lichen"));
    let ca = r.join("etc/lichen/ca.crt");
    assert_eq!(std::fs::read_to_string(&ca).expect("ca.crt"), ca_pem);
    assert_eq!(mode_owner(&ca), (0o640, 0, gid), "ca.crt is 0640 root:lichen");
    lichen::bootstrap::pki::check_ca_pem(&ca, &std::fs::read(&ca).expect("ca.crt"))
        .unwrap_or_else(|e| panic!("the agent refuses the installed CA: {e}"));
    let installed = r.join("var/lib/lichen/bootstrap-token");
    assert_eq!(std::fs::read_to_string(&installed).expect("token"), format!("{token}\n"), "one clean line");
    assert_eq!(mode_owner(&installed), (0o600, uid, gid), "the token is 0600 lichen:lichen");
    lichen::token::BootstrapToken::parse(&std::fs::read_to_string(&installed).expect("token"))
        .unwrap_or_else(|e| panic!("the agent refuses the installed token: {e}"));
    assert_eq!(mode_owner(&r.join("etc/lichen/config.toml")), (0o640, 0, gid));
    for name in ["lichen-ca.crt", "lichen-bootstrap-token", "lichen.toml"] {
        assert!(log.contains(&format!("installed {}", boot.join(name).display())), "{name}:\n{log}");
    }
    let left: Vec<_> = std::fs::read_dir(&boot).expect("boot").flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "the boot partition still holds {left:?}");

    // Bad ones: refused, the unit fails, the installed files stay, and the token shows nowhere.
    let secret = a_token();
    for (what, token_text, ca_text, ca_reason) in [
        (
            "uppercase",
            secret.to_uppercase(),
            "certificate-authority-data: LS0tLS1\n".to_owned(),
            "no PEM certificate",
        ),
        ("two lines", format!("{secret}\n{secret}\n"), format!("{ca_pem}{key_pem}"), "holds a private key"),
        (
            "no dot",
            secret.replace('.', ""),
            "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".into(),
            "no PEM",
        ),
    ] {
        std::fs::write(boot.join("lichen-bootstrap-token"), &token_text).expect("bad token");
        std::fs::write(boot.join("lichen-ca.crt"), &ca_text).expect("bad ca");
        let out = firstboot(r, None);
        let log = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: a refused file must fail the unit:\n{log}");
        assert!(
            log.contains(&format!(
                "rejected {} and deleted it",
                boot.join("lichen-bootstrap-token").display()
            )),
            "{what}:\n{log}"
        );
        assert!(log.contains("rejected") && log.contains(ca_reason), "{what}:\n{log}");
        // A mistyped token is nearly a secret: deleted from the card, only the reason stays.
        assert!(!boot.join("lichen-bootstrap-token").exists(), "{what}");
        assert!(!boot.join("lichen-bootstrap-token.invalid").exists(), "{what}");
        let error = std::fs::read_to_string(boot.join("lichen-bootstrap-token.error")).expect("token .error");
        assert!(
            error.contains("is not of the form <id>.<secret>") || error.contains("more than one line"),
            "{error}"
        );
        let mut files = Vec::new();
        all_files(r, &mut files);
        let texts: Vec<(PathBuf, String)> = files
            .into_iter()
            .filter(|f| !f.ends_with("usr/bin/lichen"))
            .map(|f| {
                let text = String::from_utf8_lossy(&std::fs::read(&f).expect("read")).into_owned();
                (f, text)
            })
            .collect();
        let upper = secret.to_uppercase();
        for shown in [&secret[7..], &upper[7..], &secret[..6]] {
            assert!(
                !log.contains(shown),
                "{what}: the journal got the token's content:
{log}"
            );
            for (f, text) in &texts {
                assert!(!text.contains(shown), "{what}: {} holds the token's content", f.display());
            }
        }
        // A bad CA stays, as a bad lichen.toml does, with the reason beside it.
        assert!(!boot.join("lichen-ca.crt").exists(), "{what}");
        assert_eq!(std::fs::read_to_string(boot.join("lichen-ca.crt.invalid")).expect(".invalid"), ca_text);
        let error = std::fs::read_to_string(boot.join("lichen-ca.crt.error")).expect("ca .error");
        assert!(
            error.contains(ca_reason) && error.contains("/etc/lichen/ca.crt was left as it was"),
            "{error}"
        );
        assert_eq!(std::fs::read_to_string(&ca).expect("ca.crt"), ca_pem, "{what}: the installed CA stays");
        assert_eq!(std::fs::read_to_string(&installed).expect("token"), format!("{token}\n"), "{what}");
        std::fs::remove_file(boot.join("lichen-ca.crt.invalid")).expect("rm");
    }

    // A new token at a later boot (a certificate that expired while the board was off) replaces
    // the old one, and clears the reason the last attempt left.
    let again = a_token();
    std::fs::write(boot.join("lichen-bootstrap-token"), format!("{again}\n")).expect("token");
    let out = firstboot(r, None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(std::fs::read_to_string(&installed).expect("token"), format!("{again}\n"));
    assert_eq!(mode_owner(&installed), (0o600, uid, gid));
    let left: Vec<_> = std::fs::read_dir(&boot).expect("boot").flatten().map(|e| e.file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("lichen-ca.crt.error")], "only the CA's reason stays");
}

#[test]
fn firstboot_installs_the_upgrade_keys_and_refuses_a_private_key() {
    let root = fake_root();
    let r = root.path();
    let boot = r.join("boot/firmware");
    let keys = tempfile::tempdir().expect("tempdir");
    let (private, public) = lichen_tests::agent_image::p256_key(keys.path(), "fleet");
    let public_pem = std::fs::read_to_string(&public).expect("public key");
    std::fs::write(boot.join("lichen-upgrade-keys.pub"), &public_pem).expect("keys");
    let out = firstboot(r, None);
    let log = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "firstboot failed:\n{log}");
    let installed = r.join("etc/lichen/upgrade-keys.pub");
    assert_eq!(std::fs::read_to_string(&installed).expect("installed keys"), public_pem);
    let gid = id_in(r, "group", "lichen");
    assert_eq!(mode_owner(&installed), (0o640, 0, gid), "upgrade-keys.pub is 0640 root:lichen");
    let keys_read = lichen::upgrade::signature::TrustedKeys::load(std::slice::from_ref(&installed))
        .unwrap_or_else(|e| panic!("the agent refuses the installed keys: {e}"));
    assert_eq!(keys_read.len(), 1);
    assert!(!boot.join("lichen-upgrade-keys.pub").exists(), "deleted from the boot partition");

    // The signing key by mistake: refused, kept aside with the reason, the installed keys kept.
    let private_pem = std::fs::read_to_string(&private).expect("private key");
    std::fs::write(boot.join("lichen-upgrade-keys.pub"), format!("{public_pem}{private_pem}")).expect("bad");
    let out = firstboot(r, None);
    assert!(!out.status.success(), "a refused file must fail the unit");
    let error = std::fs::read_to_string(boot.join("lichen-upgrade-keys.pub.error")).expect(".error");
    assert!(error.contains("holds a private key"), "{error}");
    assert!(boot.join("lichen-upgrade-keys.pub.invalid").exists());
    assert_eq!(std::fs::read_to_string(&installed).expect("kept"), public_pem, "the installed keys stay");
}

#[test]
fn bake_puts_the_upgrade_keys_on_the_boot_partition_and_refuses_a_private_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let image = make_image(d, "upgrade-keys", &Board::default());
    let (private, public) = lichen_tests::agent_image::p256_key(d, "fleet");
    let public_pem = std::fs::read_to_string(&public).expect("public key");
    let config = d.join("lichen.toml");
    let with = |config: &Path, keys: &Path, out: &Path| {
        let mut cmd = bake(&image, config);
        cmd.arg("--upgrade-keys").arg(keys).arg("--out").arg(out);
        cmd
    };
    // A config that does not name them: baked, with a warning saying what to add.
    std::fs::write(&config, JOIN_CONFIG).expect("config");
    let said = ok(&mut with(&config, &public, &d.join("warned.img")));
    assert!(said.contains("WARNING: --upgrade-keys is installed as /etc/lichen/upgrade-keys.pub"), "{said}");
    // One that does: no warning, and the keys on the boot partition as given.
    std::fs::write(
        &config,
        format!("{JOIN_CONFIG}\n[upgrade]\ntrusted_keys = [\"/etc/lichen/upgrade-keys.pub\"]\n"),
    )
    .expect("config");
    let out_img = d.join("baked.img");
    let said = ok(&mut with(&config, &public, &out_img));
    assert!(!said.contains("WARNING"), "{said}");
    assert!(said.contains("/boot/firmware/lichen-upgrade-keys.pub"), "{said}");
    let baked = Baked { img: out_img };
    assert_eq!(baked.boot_text("lichen-upgrade-keys.pub"), public_pem);
    // The signing key is never baked.
    let both = d.join("both.pem");
    std::fs::write(&both, format!("{public_pem}{}", std::fs::read_to_string(&private).expect("key")))
        .expect("both");
    refused(&mut with(&config, &both, &d.join("refused.img")), "it holds a private key");
    assert!(!d.join("refused.img").exists(), "a refused bake left an image");
}
