//! systemd's service notification protocol (`sd_notify(3)`): `READY=1`, `STATUS=`, `WATCHDOG=1` and
//! `STOPPING=1` sent as datagrams to `$NOTIFY_SOCKET`.
//!
//! Written out rather than taken from a crate: the protocol is one datagram per message, and the
//! agent needs nothing else from libsystemd. Outside systemd (no `NOTIFY_SOCKET`) every call is a
//! no-op.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where the notifications go, if anywhere.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Self {
        Notifier { target: None, watchdog: None }
    }

    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` as systemd sets them for a
    /// `Type=notify` service. A socket that cannot be used is logged and ignored: the agent runs
    /// the same without it, and systemd will say the start timed out.
    pub fn from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        match socket {
            None => Notifier::disabled(),
            Some(path) => match connect(&path) {
                Ok(target) => Notifier {
                    target: Some(target),
                    watchdog: watchdog_interval(usec.as_deref(), pid.as_deref(), std::process::id()),
                },
                Err(e) => {
                    tracing::warn!(socket = ?path, error = %e, "cannot use NOTIFY_SOCKET; systemd will not hear from the agent");
                    Notifier::disabled()
                }
            },
        }
    }

    /// How often the watchdog must be fed (half of systemd's `WatchdogSec`), if it is on.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Startup is complete; `status` is shown by `systemctl status`.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// A one-line description of what the agent is doing.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)));
    }

    /// Proof of life for `WatchdogSec`.
    pub fn watchdog(&self) {
        if self.watchdog.is_some() {
            self.send("WATCHDOG=1");
        }
    }

    /// Shutdown has begun.
    pub fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
    }

    fn send(&self, message: &str) {
        if let Some((socket, addr)) = &self.target
            && let Err(e) = socket.send_to_addr(message.as_bytes(), addr)
        {
            // A full socket buffer means systemd is behind; the next message carries the news.
            tracing::debug!(error = %e, "sd_notify send failed");
        }
    }
}

/// `@name` is an abstract socket, anything else a path (what systemd hands out).
fn connect(path: &std::ffi::OsStr) -> std::io::Result<(UnixDatagram, std::os::unix::net::SocketAddr)> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)?
        }
        None => std::os::unix::net::SocketAddr::from_pathname(path)?,
    };
    let socket = UnixDatagram::unbound()?;
    // The main loop sends; it must never wait on systemd.
    socket.set_nonblocking(true)?;
    Ok((socket, addr))
}

/// Half the watchdog period, as `sd_watchdog_enabled(3)` advises, when the watchdog is meant for
/// this process.
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own_pid)
    {
        return None;
    }
    Some(Duration::from_micros(usec / 2))
}

/// systemd reads one assignment per line.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_is_half_the_period_and_only_for_this_process() {
        assert_eq!(watchdog_interval(Some("90000000"), None, 7), Some(Duration::from_secs(45)));
        assert_eq!(watchdog_interval(Some("90000000"), Some("7"), 7), Some(Duration::from_secs(45)));
        assert_eq!(watchdog_interval(Some("90000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval(None, Some("7"), 7), None);
    }

    #[test]
    fn messages_reach_a_path_socket() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path)?;
        let (socket, addr) = connect(path.as_os_str())?;
        let n = Notifier { target: Some((socket, addr)), watchdog: Some(Duration::from_secs(1)) };
        n.ready("running 2 pods\nsecond line");
        n.watchdog();
        let mut buf = [0u8; 256];
        let len = server.recv(&mut buf)?;
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=running 2 pods second line");
        let len = server.recv(&mut buf)?;
        assert_eq!(&buf[..len], b"WATCHDOG=1");
        Ok(())
    }

    #[test]
    fn messages_reach_an_abstract_socket() -> std::io::Result<()> {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("lichen-notify-test-{}", std::process::id());
        let server = UnixDatagram::bind_addr(&std::os::unix::net::SocketAddr::from_abstract_name(&name)?)?;
        let (socket, addr) = connect(std::ffi::OsStr::new(&format!("@{name}")))?;
        Notifier { target: Some((socket, addr)), watchdog: None }.stopping("stopping pods");
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf)?;
        assert_eq!(&buf[..len], b"STOPPING=1\nSTATUS=stopping pods");
        Ok(())
    }
}
