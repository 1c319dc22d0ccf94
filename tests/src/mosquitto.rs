//! A real MQTT broker for the telemetry tests: Debian's `mosquitto` (2.0) on a loopback port with
//! its persistence in a tempdir, optionally with a TLS listener whose certificates come from a CA
//! made with the `openssl` command; and [`Subscriber`], an MQTT client (rumqttc) that records
//! every message it receives.
//!
//! The broker is a real process, never a stand-in: a test that needs it and finds no `mosquitto`
//! fails, it does not skip. CI (`.ci/run`) installs it with `apt-get install mosquitto`.
//!
//! Broker settings that matter to the tests: `persistence true`, so a restart (SIGTERM, then start
//! again) keeps retained messages, persistent sessions and their queued messages; and
//! `max_queued_messages 0`, so a subscriber that falls behind a burst of 10,000 messages is not
//! cut off at mosquitto's default of 1000 queued.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

const START_TIMEOUT: Duration = Duration::from_secs(20);
const INSTALL_HINT: &str = "CI installs it in .ci/run; on Debian: `apt-get install mosquitto`";

/// A `mosquitto -c <conf>` child process. Dropping it kills the broker.
pub struct Mosquitto {
    dir: tempfile::TempDir,
    /// The plain listener's port.
    pub port: u16,
    /// The TLS listener's port, if it has one.
    pub tls_port: Option<u16>,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
    extra: String,
}

impl Mosquitto {
    /// Starts a broker with a plain listener and waits until it accepts connections.
    pub fn start() -> Mosquitto {
        Mosquitto::launch(false)
    }

    /// Starts a broker with a plain listener (for test clients) and a TLS listener that requires a
    /// client certificate signed by its test CA ([`Mosquitto::ca_file`], [`Mosquitto::client_cert`]).
    pub fn start_tls() -> Mosquitto {
        Mosquitto::launch(true)
    }

    /// A broker that is not running yet (the node starts while the broker is away):
    /// [`Mosquitto::restart`] starts it on its port.
    pub fn stopped() -> Mosquitto {
        let mut m = Mosquitto::prepare(false);
        m.port = crate::free_port();
        m.write_config();
        m
    }

    fn prepare(tls: bool) -> Mosquitto {
        let dir = tempfile::Builder::new().prefix("lichen-mosquitto-").tempdir().expect("mosquitto tempdir");
        if tls {
            make_certificates(dir.path());
        }
        Mosquitto {
            dir,
            port: 0,
            tls_port: tls.then_some(0),
            child: None,
            log: Arc::default(),
            extra: String::new(),
        }
    }

    /// Starts a broker with a plain listener and `extra` appended to its configuration (a bridge
    /// `connection` section, say).
    pub fn start_with(extra: &str) -> Mosquitto {
        Mosquitto::launch_with(false, extra)
    }

    fn launch(tls: bool) -> Mosquitto {
        Mosquitto::launch_with(tls, "")
    }

    fn launch_with(tls: bool, extra: &str) -> Mosquitto {
        let mut m = Mosquitto::prepare(tls);
        m.extra = extra.to_owned();
        let mut last = String::new();
        for _ in 0..5 {
            m.port = crate::free_port();
            if m.tls_port.is_some() {
                m.tls_port = Some(crate::free_port());
            }
            m.write_config();
            match m.spawn() {
                Ok(()) => return m,
                Err(e) if e.contains("Address already in use") => last = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("mosquitto found no free loopback port in 5 tries; the last attempt:\n{last}");
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// `mqtts://127.0.0.1:<tls port>`.
    pub fn tls_url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.tls_port.expect("a TLS broker"))
    }

    /// The test CA (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A client certificate the TLS listener accepts, and its key (PEM).
    pub fn client_cert(&self) -> (PathBuf, PathBuf) {
        (self.dir.path().join("client.pem"), self.dir.path().join("client.key"))
    }

    /// Everything the broker logged, across restarts.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().expect("mosquitto log lock").clone()
    }

    /// Stops the broker with SIGTERM (it saves its persistence file) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let start = Instant::now();
            while child.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(10) {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Stops the broker if it runs, then starts it again on the same ports with the same
    /// persistence, and waits until it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        self.log.lock().expect("mosquitto log lock").push("--- lichen test harness: restart ---".into());
        // The old process's socket may linger for a moment.
        let start = Instant::now();
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if e.contains("Address already in use") && start.elapsed() < START_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => panic!("restarting mosquitto on port {}: {e}", self.port),
            }
        }
    }

    fn write_config(&self) {
        let d = self.dir.path();
        let mut text = format!(
            "user root\nper_listener_settings false\nallow_anonymous true\n\
             persistence true\npersistence_location {}/\nmax_queued_messages 0\n\
             log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n\
             listener {} 127.0.0.1\n",
            d.display(),
            self.port
        );
        if let Some(tls) = self.tls_port {
            text.push_str(&format!(
                "listener {tls} 127.0.0.1\ncafile {0}/ca.pem\ncertfile {0}/server.pem\nkeyfile {0}/server.key\n\
                 require_certificate true\n",
                d.display()
            ));
        }
        text.push_str(&self.extra);
        std::fs::write(d.join("mosquitto.conf"), text).expect("write mosquitto.conf");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let mut child = match Command::new("mosquitto")
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!("`mosquitto` is not installed ({e}): the MQTT tests run a real broker. {INSTALL_HINT}")
            }
            Err(e) => panic!("spawning mosquitto: {e}"),
        };
        crate::capture_lines(child.stdout.take(), self.log.clone(), "mosquitto");
        crate::capture_lines(child.stderr.take(), self.log.clone(), "mosquitto");
        let start = Instant::now();
        let ports: Vec<u16> = std::iter::once(self.port).chain(self.tls_port).collect();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait mosquitto") {
                std::thread::sleep(Duration::from_millis(50));
                return Err(format!("mosquitto exited with {status}; its log:\n{}", self.log().join("\n")));
            }
            if ports.iter().all(|p| TcpStream::connect(("127.0.0.1", *p)).is_ok()) {
                self.child = Some(child);
                return Ok(());
            }
            if start.elapsed() > START_TIMEOUT {
                let _ = child.kill();
                return Err(format!(
                    "mosquitto did not listen within {START_TIMEOUT:?}:\n{}",
                    self.log().join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with `openssl`.
fn make_certificates(d: &std::path::Path) {
    crate::openssl_pki(
        d,
        "/CN=lichen test MQTT CA",
        &[
            ("server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
            ("client", "/CN=test-node", "extendedKeyUsage=clientAuth"),
        ],
    );
}

/// Most unacknowledged publishes [`Subscriber::publish_paced`] allows: below rumqttc's packet-id
/// range (its in-flight limit, 100 by default).
pub const PACED_UNACKED: u64 = 50;

/// One received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Whether the broker flagged it retained.
    pub retain: bool,
    /// Whether the broker flagged it a redelivery (DUP: sent again after this subscriber's
    /// reconnection, as QoS 1 allows).
    pub dup: bool,
}

/// An MQTT client with a persistent session (QoS 1) on the broker's plain listener, recording
/// every message on `filter`. It reconnects (every 100 ms) while the broker is away and
/// subscribes again if the broker lost its session.
pub struct Subscriber {
    client: Client,
    received: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
    /// QoS 1 publishes handed to the client, and PUBACKs received (see [`Subscriber::publish_paced`]).
    published: AtomicU64,
    acked: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Subscriber {
    /// Connects as `id` to `127.0.0.1:port` and subscribes `filter`; returns once subscribed.
    pub fn connect(port: u16, id: &str, filter: &str) -> Subscriber {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut connection) = Client::new(o, 64);
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let acks = acked.clone();
        let (subscribed_tx, subscribed_rx) = std::sync::mpsc::channel();
        let (sink, flag, c, filter_owned) =
            (received.clone(), stop.clone(), client.clone(), filter.to_owned());
        let thread = std::thread::spawn(move || {
            for event in connection.iter() {
                if flag.load(Ordering::Relaxed) {
                    return;
                }
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) if !ack.session_present => {
                        let _ = c.try_subscribe(filter_owned.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acks.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        sink.lock().expect("received lock").push(Received {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                            dup: p.dup,
                        })
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        client.subscribe(filter, QoS::AtLeastOnce).expect("subscribe");
        subscribed_rx.recv_timeout(Duration::from_secs(20)).expect("SUBACK from the broker");
        Subscriber { client, received, stop, published: AtomicU64::new(0), acked, thread: Some(thread) }
    }

    /// Everything received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("received lock").clone()
    }

    /// The payloads received on `topic`, as text, in arrival order.
    pub fn texts(&self, topic: &str) -> Vec<String> {
        self.received()
            .into_iter()
            .filter(|r| r.topic == topic)
            .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
            .collect()
    }

    /// Publishes with QoS 1.
    pub fn publish(&self, topic: &str, payload: &[u8]) {
        self.published.fetch_add(1, Ordering::Relaxed);
        self.client.publish(topic, QoS::AtLeastOnce, false, payload.to_vec()).expect("publish");
    }

    /// Publishes with QoS 1, first waiting (up to a minute) until fewer than [`PACED_UNACKED`] of
    /// this client's publishes are unacknowledged, for a publisher whose broker restarts mid-stream.
    ///
    /// rumqttc 0.25 loses messages there otherwise: after a reconnect it sends everything pending
    /// (the unacknowledged publishes, then whatever waited in its request channel, up to 64) without
    /// its in-flight limit, and packet ids wrap at that limit (100). When the restarted broker is
    /// slow to acknowledge (QEMU), a queued publish lands on a packet id still in use, is parked as
    /// the one "collision" and the next such publish overwrites it: the parked message is never
    /// sent. Downstream that looks like a gap (`2401` arriving, `2400` never). With fewer than
    /// [`PACED_UNACKED`] outstanding in all, the pending burst never needs a packet id twice.
    pub fn publish_paced(&self, topic: &str, payload: &[u8]) {
        let start = Instant::now();
        while self.published.load(Ordering::Relaxed).saturating_sub(self.acked.load(Ordering::Relaxed))
            >= PACED_UNACKED
            && start.elapsed() < Duration::from_secs(60)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.publish(topic, payload);
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.client.try_disconnect();
        if let Some(t) = self.thread.take() {
            // The connection thread ends on the disconnect; do not hang a test on it.
            let deadline = Instant::now() + Duration::from_secs(2);
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Checks a stream of numbered messages: every number in `0..count` arrived, and the first
/// arrivals are in order (a resend may repeat numbers the broker already had). Returns the number
/// of duplicates.
pub fn check_in_order(payloads: &[String], count: u64) -> Result<usize, String> {
    let mut seen = vec![false; count as usize];
    let mut next_new = 0u64;
    let mut dups = 0;
    for (i, p) in payloads.iter().enumerate() {
        let n: u64 = p.trim().parse().map_err(|_| format!("message {i} is {p:?}, not a number"))?;
        let slot = seen.get_mut(n as usize).ok_or_else(|| format!("message {i} is {n}, beyond {count}"))?;
        if *slot {
            dups += 1;
            continue;
        }
        if n != next_new {
            return Err(format!(
                "message {i} is {n} arriving for the first time, but {next_new} had not arrived yet"
            ));
        }
        *slot = true;
        next_new += 1;
    }
    if next_new != count {
        return Err(format!("only 0..{next_new} of 0..{count} arrived"));
    }
    Ok(dups)
}
