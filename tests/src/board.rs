//! The board tier's harness: a Debian bookworm image built by `images/mkimage.sh` (a test image,
//! with the test console), Lichen's `.deb` baked into it by `images/bake.sh` as a user bakes a
//! Raspberry Pi OS image, booted by `images/boot.sh` under QEMU full-system emulation with
//! restricted user networking, and driven by `images/guest.sh` (power button, network cable,
//! power cut, commands as root through the test console).
//!
//! Everything a test asserts comes from the guest (a command's output, the serial console) or from
//! the API server; nothing here looks inside the image by other means.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The project's root (the `images/` scripts live there).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the repository").to_owned()
}

fn script(name: &str) -> PathBuf {
    repo_root().join("images").join(name)
}

/// Runs a command to the end, panicking with its output when it fails.
fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({}):\n{text}", out.status);
    text
}

/// What goes onto the boot partition for the first boot.
pub struct BakeInputs<'a> {
    /// The `.deb` for the image's architecture.
    pub deb: &'a Path,
    /// `lichen.toml`.
    pub config: &'a str,
    /// The cluster CA (PEM).
    pub ca: &'a [u8],
    /// The bootstrap token.
    pub token: &'a str,
    /// The public keys agent upgrades must be signed by (PEM), baked with `--upgrade-keys`.
    pub upgrade_keys: Option<&'a [u8]>,
}

/// One emulated board: its image and, while it runs, its QEMU.
pub struct Board {
    /// `arm64` or `armhf`.
    pub arch: &'static str,
    /// The baked image (the guest's disk: what it writes stays there).
    pub image: PathBuf,
    dir: tempfile::TempDir,
    boot: Option<Child>,
    boots: u32,
}

impl Board {
    /// Builds the test image for `arch` (the root file system is cached between runs by
    /// `mkimage.sh`) and bakes `inputs` into it with `bake.sh`, as a user would.
    pub fn bake(arch: &'static str, inputs: &BakeInputs<'_>) -> Board {
        // Images are 2 GiB sparse files: /var/tmp, not a tmpfs /tmp.
        let dir =
            tempfile::Builder::new().prefix("lichen-board.").tempdir_in("/var/tmp").expect("scratch dir");
        let base = dir.path().join("base.img");
        let started = Instant::now();
        run(
            Command::new("bash")
                .arg(script("mkimage.sh"))
                .args(["--arch", arch, "--test-console", "--out"])
                .arg(&base),
            "images/mkimage.sh",
        );
        eprintln!("FIGURE {arch}: test image built in {:.0} s", started.elapsed().as_secs_f64());
        let files = dir.path();
        std::fs::write(files.join("lichen.toml"), inputs.config).expect("config");
        std::fs::write(files.join("ca.crt"), inputs.ca).expect("ca");
        std::fs::write(files.join("token"), format!("{}\n", inputs.token)).expect("token");
        let image = dir.path().join("board.img");
        let mut bake = Command::new("bash");
        bake.arg(script("bake.sh"))
            .arg("--image")
            .arg(&base)
            .arg("--deb")
            .arg(inputs.deb)
            .arg("--config")
            .arg(files.join("lichen.toml"))
            .arg("--ca-cert")
            .arg(files.join("ca.crt"))
            .arg("--bootstrap-token-file")
            .arg(files.join("token"))
            .arg("--out")
            .arg(&image);
        if let Some(keys) = inputs.upgrade_keys {
            std::fs::write(files.join("upgrade-keys.pub"), keys).expect("upgrade keys");
            bake.arg("--upgrade-keys").arg(files.join("upgrade-keys.pub"));
        }
        run(&mut bake, "images/bake.sh");
        let _ = std::fs::remove_file(&base);
        Board { arch, image, dir, boot: None, boots: 0 }
    }

    /// Boots the board in the background: `forwards` are host loopback ports the guest reaches at
    /// 10.0.2.100, `exposes` are (guest port, host port) pairs.
    pub fn boot(&mut self, forwards: &[u16], exposes: &[(u16, u16)]) {
        assert!(self.boot.is_none(), "the board is already running");
        self.boots += 1;
        let log = std::fs::File::create(self.dir.path().join(format!("boot-{}.log", self.boots)))
            .expect("boot log");
        // A socket left by the previous QEMU (killed) must not pass for this one's.
        let socket = PathBuf::from(format!("{}.cmd", self.image.display()));
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new("bash");
        cmd.arg(script("boot.sh")).arg("--image").arg(&self.image).args(["--timeout", "3000"]);
        for p in forwards {
            cmd.args(["--forward", &p.to_string()]);
        }
        for (g, h) in exposes {
            cmd.args(["--expose", &format!("{g}:{h}")]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("images/boot.sh starts");
        self.boot = Some(child);
        // QEMU creates the test console's socket as it starts; guest.sh needs it.
        let start = Instant::now();
        while !socket.exists() {
            if let Some(rc) = self.exited() {
                let log = std::fs::read_to_string(self.dir.path().join(format!("boot-{}.log", self.boots)));
                panic!("images/boot.sh ended ({rc:?}) before QEMU started:\n{}", log.unwrap_or_default());
            }
            assert!(start.elapsed() < Duration::from_secs(120), "QEMU made no test console socket in 120 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The serial console so far (this boot; a guest reboot keeps appending to it).
    pub fn console(&self) -> String {
        let mut text = Vec::new();
        if let Ok(mut f) = std::fs::File::open(console_path(&self.image)) {
            let _ = f.read_to_end(&mut text);
        }
        strip_escapes(&String::from_utf8_lossy(&text))
    }

    /// Waits until systemd has finished booting the guest (`guest.sh wait-boot`, through the test
    /// console: the serial console stops showing systemd's progress once the getty holds it) and
    /// panics unless the state is `running`, i.e. no unit failed, or the only failed units are
    /// those named in `may_fail` (with the cable pulled, `systemd-networkd-wait-online` fails).
    pub fn wait_boot(&mut self, timeout: Duration, may_fail: &[&str]) {
        let out = Command::new("bash")
            .arg(script("guest.sh"))
            .arg("--image")
            .arg(&self.image)
            .args(["wait-boot", &timeout.as_secs().to_string()])
            .output()
            .expect("images/guest.sh runs");
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let failed: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim_start_matches(['●', '*', ' ']).split_whitespace().next())
            .filter(|u| u.ends_with(".service") || u.ends_with(".mount") || u.ends_with(".socket"))
            .collect();
        let allowed =
            text.contains("degraded") && !failed.is_empty() && failed.iter().all(|u| may_fail.contains(u));
        if !out.status.success() && !allowed {
            let console = self.console();
            panic!(
                "the guest did not finish booting ({}):\n{text}\nconsole:\n{}",
                out.status,
                tail(&console, 4000)
            );
        }
    }

    /// This boot's id (`/proc/sys/kernel/random/boot_id`): a reboot changes it.
    pub fn boot_id(&self) -> String {
        self.sh("cat /proc/sys/kernel/random/boot_id").trim().to_owned()
    }

    /// Runs one shell line as root in the guest (the test console); returns its exit status and
    /// output (stdout and stderr together).
    pub fn exec(&self, line: &str, timeout: Duration) -> (i32, String) {
        let out = Command::new("bash")
            .arg(script("guest.sh"))
            .arg("--image")
            .arg(&self.image)
            .args(["exec", "--timeout", &timeout.as_secs().max(1).to_string(), line])
            .output()
            .expect("images/guest.sh runs");
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text)
    }

    /// [`Board::exec`] that must succeed; returns its output.
    pub fn sh(&self, line: &str) -> String {
        let (rc, out) = self.exec(line, Duration::from_secs(120));
        assert_eq!(rc, 0, "`{line}` in the guest exited {rc}:\n{out}");
        out
    }

    /// Polls `line` in the guest until `f` accepts its output.
    pub fn wait_exec<T>(
        &self,
        line: &str,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut(i32, &str) -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            let (rc, out) = self.exec(line, Duration::from_secs(60));
            if let Some(v) = f(rc, &out) {
                return v;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}; `{line}` said:\n{out}"
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// `guest.sh ACTION`: `powerdown`, `link-down`, `link-up` or `kill`.
    pub fn guest(&self, action: &str) {
        run(
            Command::new("bash").arg(script("guest.sh")).arg("--image").arg(&self.image).arg(action),
            &format!("images/guest.sh {action}"),
        );
    }

    /// QEMU's exit status once it ended.
    pub fn exited(&mut self) -> Option<Option<i32>> {
        let child = self.boot.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.boot = None;
                Some(status.code())
            }
            _ => None,
        }
    }

    /// Waits for QEMU to end (after `powerdown` or `kill`); returns boot.sh's exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            self.boot.as_ref()?;
            if let Some(rc) = self.exited() {
                return rc;
            }
            assert!(start.elapsed() < timeout, "QEMU still runs after {timeout:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Board {
    fn drop(&mut self) {
        if self.boot.is_some() {
            let _ = Command::new("bash")
                .arg(script("guest.sh"))
                .arg("--image")
                .arg(&self.image)
                .arg("kill")
                .status();
            if let Some(mut child) = self.boot.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            // Keep what explains the failure: the console and boot logs, not the 2 GiB image.
            let keep = PathBuf::from(format!("/var/tmp/lichen-board-{}-failed", self.arch));
            let _ = std::fs::remove_dir_all(&keep);
            if std::fs::create_dir_all(&keep).is_ok() {
                let _ = std::fs::copy(console_path(&self.image), keep.join("console.log"));
                for n in 1..=self.boots {
                    let log = format!("boot-{n}.log");
                    let _ = std::fs::copy(self.dir.path().join(&log), keep.join(&log));
                }
                eprintln!("board logs kept in {}", keep.display());
            }
        }
    }
}

/// The console without its colour escapes (`ESC [ ... letter`), so that systemd's highlighted unit
/// names read as plain text.
fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else if c != '\r' {
            out.push(c);
        }
    }
    out
}

/// Where boot.sh writes the serial console of `image` by default.
fn console_path(image: &Path) -> PathBuf {
    PathBuf::from(format!("{}.console.log", image.display()))
}

fn tail(text: &str, bytes: usize) -> &str {
    let mut start = text.len().saturating_sub(bytes);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}
