//! A real OCI registry for the module pull tests: Debian's `docker-registry` (distribution 2.8.2)
//! on a loopback port with its storage in a tempdir, raw push helpers speaking plain HTTP/1.1 to
//! it, and a [`FaultProxy`] in front of it that truncates or stalls blob downloads.
//!
//! The registry is a real process, never a stand-in: a test that needs it and finds no
//! `docker-registry` fails, it does not skip. CI (`.ci/run`) installs it with
//! `apt-get install docker-registry apache2-utils` (the latter for `htpasswd`).
//!
//! Everything here is synchronous (std threads and sockets), so it works the same from plain and
//! `#[tokio::test]` tests, and the proxy keeps serving while a test's runtime is busy elsewhere.
//!
//! # What distribution 2.8.2 accepts and refuses
//!
//! Checked against the real binary (the unit tests below pin the important ones):
//!
//! - Both wasm layouts are accepted as OCI image manifests ([`OCI_MANIFEST`]): config
//!   [`WASM_CONFIG_V0`] with a [`WASM_LAYER`] layer, and the older wasm-to-oci layout, config
//!   [`WASM_TO_OCI_CONFIG`] with a [`WASM_TO_OCI_LAYER`] layer. The registry does not look at
//!   config or layer media types at all (only layers with `urls` are checked). An OCI 1.1
//!   `artifactType` is accepted and served back byte for byte, but 2.8 has no referrers API.
//! - **An OCI manifest is served only to a client whose `Accept` names
//!   `application/vnd.oci.image.manifest.v1+json`**, by tag and by digest alike; otherwise the
//!   answer is `404 MANIFEST_UNKNOWN` "OCI manifest found, but accept header does not support OCI
//!   manifests". `Accept: */*` is not enough. A comma-separated list or repeated `Accept`
//!   headers both work.
//! - Every blob a manifest names, the config included, must already be in the repository:
//!   otherwise `400 MANIFEST_BLOB_UNKNOWN` (so even the OCI 1.1 empty config `{}` must be pushed).
//! - Descriptor sizes are **not** checked: a manifest claiming a wrong size for a layer is
//!   accepted, and the blob is then served with its real length. Tests of client-side size checks
//!   can push such manifests.
//! - A manifest `PUT` must carry its media type as `Content-Type` (`400 MANIFEST_INVALID` for
//!   `application/json`); the top-level `mediaType` field is optional.
//! - A blob upload's `PUT` must not be sent as `application/x-www-form-urlencoded` (curl's
//!   default for `--data-binary`): Go then parses the body as a form and the upload fails with
//!   `400 DIGEST_INVALID`. The helpers here send `application/octet-stream`.
//! - `DELETE /v2/<repo>/blobs/<digest>` (with `storage.delete.enabled`) unlinks the blob from the
//!   repository: its `GET` is then a `404 BLOB_UNKNOWN`, while manifests naming it are still
//!   served, which is how a test makes a manifest point at a missing blob ([`Registry::delete_blob`]).
//! - Blob `GET`s carry `Content-Length` and `Docker-Content-Digest`, and honour `Range`
//!   (`206 Partial Content` with `Content-Range`).
//! - htpasswd (basic) auth works over plain HTTP; entries must be bcrypt (`htpasswd -B`). A
//!   refusal is `401 UNAUTHORIZED` with `WWW-Authenticate: Basic realm="lichen-test"`, for a
//!   missing and a wrong password alike; `GET /v2/` is refused too.
//! - The upload `Location` is an absolute URL built from the request's `Host`, so uploads through
//!   the [`FaultProxy`] come back to the proxy.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The media type of an OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The config media type of a wasm artifact (the CNCF TAG Runtime wasm OCI artifact layout).
pub const WASM_CONFIG_V0: &str = "application/vnd.wasm.config.v0+json";
/// The layer media type of a wasm module in the current layout.
pub const WASM_LAYER: &str = "application/wasm";
/// The config media type of the older wasm-to-oci layout.
pub const WASM_TO_OCI_CONFIG: &str = "application/vnd.wasm.config.v1+json";
/// The layer media type of the older wasm-to-oci layout.
pub const WASM_TO_OCI_LAYER: &str = "application/vnd.wasm.content.layer.v1+wasm";

const REGISTRY_BIN: &str = "docker-registry";
const INSTALL_HINT: &str =
    "CI installs it in .ci/run; on Debian: `apt-get install docker-registry apache2-utils`";
const REALM: &str = "lichen-test";
/// The response header carrying this registry's identity (see [`Registry::spawn`]).
const ID_HEADER: &str = "X-Lichen-Registry";
const START_TIMEOUT: Duration = Duration::from_secs(30);
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A `docker-registry serve` child process on `127.0.0.1:<port>`, storing into a tempdir.
///
/// Dropping it kills the process (SIGKILL) and removes the storage.
pub struct Registry {
    dir: tempfile::TempDir,
    port: u16,
    id: String,
    auth: Option<(String, String)>,
    tls: bool,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Registry {
    /// Starts an anonymous registry (anyone may push and pull) and waits until it answers.
    pub fn start() -> Registry {
        Registry::launch(None)
    }

    /// Starts a registry requiring HTTP basic auth as `user`/`password` (an htpasswd file made
    /// with `htpasswd -Bbn`) for every request; the push helpers send the credentials.
    pub fn start_with_auth(user: &str, password: &str) -> Registry {
        Registry::launch(Some((user.to_owned(), password.to_owned())))
    }

    /// Starts an anonymous registry serving HTTPS only, with a certificate for `127.0.0.1` signed by
    /// a CA made for it (with the `openssl` command). [`Registry::ca_file`] names the CA; the raw
    /// helpers ([`Registry::request`], the push helpers) speak plain HTTP and do not work on it.
    pub fn start_tls() -> Registry {
        let mut reg = Registry::prepare(None);
        reg.tls = true;
        crate::openssl_pki(
            reg.dir.path(),
            "/CN=lichen test CA",
            &[("tls", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth")],
        );
        reg.bind();
        reg
    }

    /// The CA certificate (PEM) of a [`Registry::start_tls`] registry.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn launch(auth: Option<(String, String)>) -> Registry {
        let mut reg = Registry::prepare(auth);
        reg.bind();
        reg
    }

    fn prepare(auth: Option<(String, String)>) -> Registry {
        let dir = tempfile::Builder::new().prefix("lichen-registry-").tempdir().expect("registry tempdir");
        if let Some((user, password)) = &auth {
            let out = Command::new("htpasswd").args(["-Bbn", user, password]).output().unwrap_or_else(|e| {
                panic!(
                    "running `htpasswd` (apache2-utils) failed: {e}; the registry tests need it. \
                        {INSTALL_HINT}"
                )
            });
            assert!(
                out.status.success(),
                "htpasswd -Bbn failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            std::fs::write(dir.path().join("htpasswd"), &out.stdout).expect("write htpasswd");
        }
        let id = format!("{:016x}", fastrand::u64(..));
        Registry { dir, port: 0, id, auth, tls: false, child: None, log: Arc::default() }
    }

    fn bind(&mut self) {
        let reg = self;
        let mut last = String::new();
        for _ in 0..5 {
            reg.port = crate::free_port();
            reg.write_config();
            match reg.spawn() {
                Ok(()) => return,
                // Someone took the port between our probe and the registry's bind: try another.
                Err(e) if e.contains("address already in use") => last = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("docker-registry found no free loopback port in 5 tries; the last attempt:\n{last}");
    }

    /// `127.0.0.1:PORT`, the registry's host in image references (`127.0.0.1:PORT/repo:tag`).
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The basic-auth credentials it was started with, if any.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.auth.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// Everything the registry wrote to stdout and stderr so far (warnings, errors and the access
    /// log), across restarts.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().expect("registry log lock").clone()
    }

    /// Kills the registry with SIGKILL (a registry dying mid-pull) and reaps it; a no-op if it is
    /// not running. The storage stays for [`Registry::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the registry if it runs, then starts it again on the same port with the same storage
    /// and credentials, and waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        self.log.lock().expect("registry log lock").push("--- lichen test harness: restart ---".into());
        if let Err(e) = self.spawn() {
            panic!("restarting docker-registry on {}: {e}", self.host());
        }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yml")
    }

    /// Writes `config.yml`: filesystem storage in the tempdir, deletes enabled, no cache, a fixed
    /// upload secret (so an upload's state survives a restart) and a header naming this registry.
    fn write_config(&self) {
        let q = |p: PathBuf| serde_json::to_string(&p.display().to_string()).expect("quote path");
        let mut text = format!(
            "version: 0.1\n\
             log:\n  level: warn\n  formatter: text\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {}\n  secret: lichen-test-upload-secret\n  headers:\n    {ID_HEADER}: [\"{}\"]\n",
            q(self.dir.path().join("storage")),
            self.host(),
            self.id
        );
        if self.tls {
            text.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                q(self.dir.path().join("tls.pem")),
                q(self.dir.path().join("tls.key"))
            ));
        }
        if self.auth.is_some() {
            text.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: {REALM}\n    path: {}\n",
                q(self.dir.path().join("htpasswd"))
            ));
        }
        std::fs::write(self.config_path(), text).expect("write registry config.yml");
    }

    /// Spawns `docker-registry serve config.yml` and waits until `GET /v2/` answers with this
    /// registry's id header (200, or 401 with auth on): another process that grabbed the port in
    /// the meantime is not mistaken for ours.
    fn spawn(&mut self) -> Result<(), String> {
        let mut child = match Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => panic!(
                "`{REGISTRY_BIN}` is not installed ({e}): the OCI pull tests run a real registry \
                 (distribution 2.8). {INSTALL_HINT}"
            ),
            Err(e) => panic!("spawning {REGISTRY_BIN}: {e}"),
        };
        crate::capture_lines(child.stdout.take(), self.log.clone(), "registry");
        crate::capture_lines(child.stderr.take(), self.log.clone(), "registry");
        let start = Instant::now();
        let fail = |child: &mut Child, log: &Arc<Mutex<Vec<String>>>, why: String| {
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(50)); // let the readers drain the pipes
            Err(format!("{why}; its log:\n{}", log.lock().expect("registry log lock").join("\n")))
        };
        loop {
            if let Some(status) = child.try_wait().expect("try_wait docker-registry") {
                let why = format!("docker-registry exited with {status} before answering on {}", self.host());
                return fail(&mut child, &self.log, why);
            }
            // A TLS registry cannot be asked over plain HTTP: it is up once it accepts connections
            // (a port taken by another process makes ours fail to bind and exit, seen above).
            if self.tls {
                if std::net::TcpStream::connect(self.host()).is_ok() {
                    self.child = Some(child);
                    return Ok(());
                }
            } else if let Ok(resp) = http(&self.host(), "GET", "/v2/", &[], &[]) {
                let ours = resp.header(ID_HEADER) == Some(self.id.as_str());
                let up = resp.status == 200 || (resp.status == 401 && self.auth.is_some());
                if ours && up {
                    self.child = Some(child);
                    return Ok(());
                }
                if ours {
                    let why = format!("GET /v2/ on {} answered {}", self.host(), resp.status);
                    return fail(&mut child, &self.log, why);
                }
                // Another process answers on the port: ours will fail to bind and exit.
            }
            if start.elapsed() > START_TIMEOUT {
                let why =
                    format!("docker-registry did not answer on {} within {START_TIMEOUT:?}", self.host());
                return fail(&mut child, &self.log, why);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends one request (on a fresh connection, with the registry's credentials if it has any)
    /// and returns the whole response; panics with the registry's log if the exchange fails.
    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
        let auth = self.auth.as_ref().map(|(u, p)| basic_auth(u, p));
        let mut all = headers.to_vec();
        if let Some(a) = &auth {
            all.push(("Authorization", a));
        }
        http(&self.host(), method, path, &all, body).unwrap_or_else(|e| {
            panic!(
                "{method} {path} on the registry at {}: {e}\nregistry log:\n{}",
                self.host(),
                self.log().join("\n")
            )
        })
    }

    /// Panics with the response and the registry's log unless `resp.status == want`.
    fn expect_status(&self, what: &str, resp: &HttpResponse, want: u16) {
        if resp.status != want {
            panic!(
                "{what}: the registry answered {} (wanted {want}): {}\nregistry log:\n{}",
                resp.status,
                String::from_utf8_lossy(&resp.body),
                self.log().join("\n")
            );
        }
    }

    /// Uploads `bytes` to `repo` as one blob (a monolithic upload: `POST /v2/<repo>/blobs/uploads/`
    /// then `PUT <location>&digest=…`) and returns its digest, `sha256:<hex>`.
    pub fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = sha256_digest(bytes);
        let resp = self.request("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], &[]);
        self.expect_status(&format!("starting a blob upload to {repo}"), &resp, 202);
        let location = resp.header("Location").expect("upload Location header");
        let mut target = path_of(location).to_owned();
        target.push(if target.contains('?') { '&' } else { '?' });
        target.push_str("digest=");
        target.push_str(&digest);
        let resp = self.request("PUT", &target, &[("Content-Type", "application/octet-stream")], bytes);
        self.expect_status(&format!("uploading blob {digest} to {repo}"), &resp, 201);
        assert_eq!(resp.header("Docker-Content-Digest"), Some(digest.as_str()), "the registry's blob digest");
        digest
    }

    /// Pushes a manifest `body` of `media_type` as `repo:reference` (a tag or a digest) and
    /// returns its digest from `Docker-Content-Digest`.
    pub fn push_manifest(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) -> String {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let resp = self.request("PUT", &path, &[("Content-Type", media_type)], body);
        self.expect_status(&format!("pushing manifest {repo}:{reference}"), &resp, 201);
        resp.header("Docker-Content-Digest").expect("Docker-Content-Digest on a manifest push").to_owned()
    }

    /// Pushes the config and each layer as blobs, then an OCI image manifest naming them as
    /// `repo:tag`; returns the manifest's digest. `layers` are `(media type, bytes)`.
    pub fn push_artifact(
        &self,
        repo: &str,
        tag: &str,
        config_media_type: &str,
        config: &[u8],
        layers: &[(&str, &[u8])],
    ) -> String {
        self.push_blob(repo, config);
        for (_, bytes) in layers {
            self.push_blob(repo, bytes);
        }
        self.push_manifest(repo, tag, OCI_MANIFEST, &oci_manifest(config_media_type, config, layers))
    }

    /// Deletes blob `digest` from `repo` (`202`), so that manifests naming it point at nothing.
    pub fn delete_blob(&self, repo: &str, digest: &str) {
        let resp = self.request("DELETE", &format!("/v2/{repo}/blobs/{digest}"), &[], &[]);
        self.expect_status(&format!("deleting blob {digest} from {repo}"), &resp, 202);
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The path and query of `location`, an absolute URL or already a path.
fn path_of(location: &str) -> &str {
    match location.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => location,
    }
}

/// `sha256:<hex>` of `bytes`, an OCI digest.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in hash {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// An OCI image manifest (schema version 2, [`OCI_MANIFEST`]) with a config and layers given as
/// `(media type, bytes)`: each descriptor has the media type, digest and size.
pub fn oci_manifest(config_media_type: &str, config: &[u8], layers: &[(&str, &[u8])]) -> Vec<u8> {
    let desc = |media_type: &str, bytes: &[u8]| {
        let (digest, size) = (sha256_digest(bytes), bytes.len());
        serde_json::json!({ "mediaType": media_type, "digest": digest, "size": size })
    };
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": desc(config_media_type, config),
        "layers": layers.iter().map(|(t, b)| desc(t, b)).collect::<Vec<_>>(),
    });
    serde_json::to_vec(&manifest).expect("serialize manifest")
}

/// The value of an `Authorization` header for HTTP basic auth.
pub fn basic_auth(user: &str, password: &str) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let input = format!("{user}:{password}");
    let mut out = String::from("Basic ");
    for chunk in input.as_bytes().chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A whole HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The headers in order, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

/// Sends one HTTP/1.1 request to `host` on a fresh connection (`Connection: close`) and reads the
/// whole response. `headers` come after `Host`, `Connection` and (for a body or a POST, PUT or
/// PATCH) `Content-Length`. Errors are the connection's: refused, reset, cut short, timed out
/// (30 s).
pub fn http(
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<HttpResponse> {
    let addr = host
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no address for {host}")))?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    read_response(&mut BufReader::new(stream), method == "HEAD")
}

/// Reads one response: the head, then the body as framed (`Content-Length`, chunked, or up to
/// EOF). A body cut short is an `UnexpectedEof` error.
pub fn read_response(r: &mut impl BufRead, head_request: bool) -> io::Result<HttpResponse> {
    let head = read_head(r)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before a response"))?;
    let (status, headers) = parse_status(&head)?;
    let mut body = Vec::new();
    copy_body(r, &mut body, response_framing(status, head_request, &headers)?, false)?;
    Ok(HttpResponse { status, headers, body })
}

// --- HTTP/1.1 framing, shared by the client above and the proxy below ---

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// The head's lines without their CRLF, up to the empty line; `None` on EOF before any byte.
fn read_head(r: &mut impl BufRead) -> io::Result<Option<Vec<String>>> {
    let mut lines = Vec::new();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if r.read_until(b'\n', &mut buf)? == 0 {
            if lines.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a head"));
        }
        let line = String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']).to_owned();
        if line.is_empty() {
            if lines.is_empty() {
                continue; // a stray CRLF between messages
            }
            return Ok(Some(lines));
        }
        lines.push(line);
    }
}

fn parse_headers(lines: &[String]) -> Vec<(String, String)> {
    lines
        .iter()
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// Whether a comma-separated header (`Connection`, `Transfer-Encoding`) lists `token`.
fn has_token(headers: &[(String, String)], name: &str, token: &str) -> bool {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

fn parse_status(head: &[String]) -> io::Result<(u16, Vec<(String, String)>)> {
    let status = head[0]
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("bad status line {:?}", head[0])))?;
    Ok((status, parse_headers(&head[1..])))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    ToEof,
}

fn length(headers: &[(String, String)]) -> io::Result<Option<u64>> {
    header(headers, "Content-Length")
        .map(|v| v.parse().map_err(|_| invalid(format!("bad Content-Length {v:?}"))))
        .transpose()
}

fn request_framing(headers: &[(String, String)]) -> io::Result<Framing> {
    Ok(if has_token(headers, "Transfer-Encoding", "chunked") {
        Framing::Chunked
    } else {
        length(headers)?.map_or(Framing::Empty, Framing::Length)
    })
}

fn response_framing(status: u16, head_request: bool, headers: &[(String, String)]) -> io::Result<Framing> {
    Ok(if head_request || status < 200 || status == 204 || status == 304 {
        Framing::Empty
    } else if has_token(headers, "Transfer-Encoding", "chunked") {
        Framing::Chunked
    } else {
        length(headers)?.map_or(Framing::ToEof, Framing::Length)
    })
}

/// Copies one message body from `r` to `w`. `raw` keeps chunked framing as on the wire (the
/// proxy); otherwise chunked bodies are decoded.
fn copy_body(r: &mut impl BufRead, w: &mut impl Write, framing: Framing, raw: bool) -> io::Result<()> {
    let eof = || io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a body");
    let exact = |r: &mut dyn BufRead, w: &mut dyn Write, n: u64| -> io::Result<()> {
        if io::copy(&mut r.take(n), w)? < n { Err(eof()) } else { Ok(()) }
    };
    match framing {
        Framing::Empty => Ok(()),
        Framing::Length(n) => exact(r, w, n),
        Framing::ToEof => io::copy(r, w).map(drop),
        Framing::Chunked => {
            let mut line = Vec::new();
            loop {
                line.clear();
                if r.read_until(b'\n', &mut line)? == 0 {
                    return Err(eof());
                }
                if raw {
                    w.write_all(&line)?;
                }
                let text = String::from_utf8_lossy(&line);
                let size = text.split(';').next().unwrap_or_default().trim();
                let size =
                    u64::from_str_radix(size, 16).map_err(|_| invalid(format!("bad chunk size {text:?}")))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    loop {
                        line.clear();
                        if r.read_until(b'\n', &mut line)? == 0 {
                            return Err(eof());
                        }
                        if raw {
                            w.write_all(&line)?;
                        }
                        if line == b"\r\n" || line == b"\n" {
                            return Ok(());
                        }
                    }
                }
                exact(r, w, size)?;
                let mut crlf = [0u8; 2];
                r.read_exact(&mut crlf)?;
                if raw {
                    w.write_all(&crlf)?;
                }
            }
        }
    }
}

// --- The fault-injecting proxy ---

/// What a [`FaultProxy`] does to blob downloads (`GET …/blobs/<digest>`; uploads, `HEAD`s and
/// manifests always pass untouched).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMode {
    /// Forward everything as is.
    Pass,
    /// Forward the response head and the first `n` bytes of the body (as on the wire), then close
    /// the client's connection: a truncated blob. A body of at most `n` bytes passes whole.
    CutAfter(usize),
    /// Accept the request and never answer it; the connection stays open until the client (or
    /// the proxy's drop) closes it.
    Stall,
}

/// A TCP proxy on a loopback port in front of a registry, injecting [`FaultMode`] faults into blob
/// downloads; the mode can change at any time and applies to requests that arrive afterwards.
///
/// It runs on its own threads (one per client connection) and speaks just enough HTTP/1.1: each
/// client request goes to a fresh upstream connection with `Connection: close`, and the response
/// comes back with its own framing, so clients keep their connections alive across requests as
/// with the registry itself. `Host` is forwarded as sent, so the registry's upload `Location`s
/// point back at the proxy. Dropping it closes every connection.
pub struct FaultProxy {
    port: u16,
    shared: Arc<ProxyShared>,
    accept: Option<JoinHandle<()>>,
}

struct ProxyShared {
    upstream: String,
    mode: Mutex<FaultMode>,
    stop: AtomicBool,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, TcpStream>>,
    requests: Mutex<Vec<String>>,
    faults: AtomicUsize,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` in [`FaultMode::Pass`]. It stays valid across
    /// [`Registry::restart`] (same port); while the registry is down, requests fail with the
    /// client's connection closed.
    pub fn start(upstream: &Registry) -> FaultProxy {
        FaultProxy::start_to(&upstream.host())
    }

    /// Starts a proxy to any `host:port`, in [`FaultMode::Pass`].
    pub fn start_to(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(ProxyShared {
            upstream: upstream.to_owned(),
            mode: Mutex::new(FaultMode::Pass),
            stop: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            conns: Mutex::default(),
            requests: Mutex::default(),
            faults: AtomicUsize::new(0),
        });
        let sh = shared.clone();
        let accept = std::thread::spawn(move || {
            for client in listener.incoming() {
                if sh.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Some(id) = sh.track(&client) else { continue };
                let sh = sh.clone();
                std::thread::spawn(move || {
                    let _ = serve_client(&sh, client);
                    sh.untrack(id);
                });
            }
        });
        FaultProxy { port, shared, accept: Some(accept) }
    }

    /// `127.0.0.1:PORT`, the host to pull from instead of the registry's.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Sets the mode for requests from now on.
    pub fn set_mode(&self, mode: FaultMode) {
        *self.shared.mode.lock().expect("proxy mode lock") = mode;
    }

    /// The current mode.
    pub fn mode(&self) -> FaultMode {
        *self.shared.mode.lock().expect("proxy mode lock")
    }

    /// Every request seen so far, as `METHOD target` (e.g. `GET /v2/demo/blobs/sha256:…`).
    pub fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().expect("proxy requests lock").clone()
    }

    /// How many blob downloads were cut short or stalled so far.
    pub fn faults(&self) -> usize {
        self.shared.faults.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.host()); // wakes the accept loop
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        for (_, conn) in self.shared.conns.lock().expect("proxy conns lock").drain() {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

impl ProxyShared {
    /// Registers a connection for shutdown on drop; `None` (and closed) if the proxy is stopping.
    fn track(&self, conn: &TcpStream) -> Option<u64> {
        let mut conns = self.conns.lock().expect("proxy conns lock");
        if self.stop.load(Ordering::SeqCst) {
            let _ = conn.shutdown(Shutdown::Both);
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        conns.insert(id, conn.try_clone().ok()?);
        Some(id)
    }

    fn untrack(&self, id: u64) {
        self.conns.lock().expect("proxy conns lock").remove(&id);
    }
}

/// Whether `target` is a blob (not an upload) under `/v2/`.
fn is_blob_path(target: &str) -> bool {
    let path = target.split('?').next().unwrap_or_default();
    path.starts_with("/v2/") && path.contains("/blobs/") && !path.contains("/blobs/uploads")
}

/// Hop-by-hop headers the proxy sets itself.
fn hop_by_hop(name: &str) -> bool {
    ["Connection", "Keep-Alive", "Proxy-Connection", "Expect"].iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// A writer that passes `left` bytes and then fails with [`CUT`].
struct CutWriter<'a, W: Write> {
    inner: &'a mut W,
    left: Option<usize>,
}

const CUT: &str = "lichen fault proxy: cut";

impl<W: Write> Write for CutWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = match self.left {
            None => buf.len(),
            Some(0) => return Err(io::Error::other(CUT)),
            Some(left) => left.min(buf.len()),
        };
        self.inner.write_all(&buf[..n])?;
        if let Some(left) = &mut self.left {
            *left -= n;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Serves one client connection, request by request, until it closes or a fault ends it.
fn serve_client(sh: &ProxyShared, client: TcpStream) -> io::Result<()> {
    let mut from_client = BufReader::new(client.try_clone()?);
    let mut to_client = client;
    while let Some(head) = read_head(&mut from_client)? {
        let mut words = head[0].split_whitespace();
        let (Some(method), Some(target)) = (words.next(), words.next()) else {
            return Err(invalid(format!("bad request line {:?}", head[0])));
        };
        let (method, target) = (method.to_owned(), target.to_owned());
        let headers = parse_headers(&head[1..]);
        sh.requests.lock().expect("proxy requests lock").push(format!("{method} {target}"));
        let blob_get = method == "GET" && is_blob_path(&target);
        let mode = *sh.mode.lock().expect("proxy mode lock");
        if blob_get && mode == FaultMode::Stall {
            sh.faults.fetch_add(1, Ordering::SeqCst);
            // Never answer: hold the connection until the client (or our drop) closes it.
            let _ = io::copy(&mut from_client, &mut io::sink());
            return Ok(());
        }
        let client_closes = has_token(&headers, "Connection", "close");

        let upstream = TcpStream::connect(&sh.upstream)?;
        let Some(up_id) = sh.track(&upstream) else { return Ok(()) };
        let result = (|| -> io::Result<bool> {
            let mut to_up = upstream.try_clone()?;
            let mut out = format!("{}\r\n", head[0]);
            for (name, value) in headers.iter().filter(|(n, _)| !hop_by_hop(n)) {
                out.push_str(&format!("{name}: {value}\r\n"));
            }
            out.push_str("Connection: close\r\n\r\n");
            to_up.write_all(out.as_bytes())?;
            if header(&headers, "Expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
                to_client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            }
            copy_body(&mut from_client, &mut to_up, request_framing(&headers)?, true)?;
            to_up.flush()?;

            let mut from_up = BufReader::new(upstream.try_clone()?);
            let resp_head = read_head(&mut from_up)?
                .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "upstream closed"))?;
            let (status, resp_headers) = parse_status(&resp_head)?;
            let framing = response_framing(status, method == "HEAD", &resp_headers)?;
            let close = client_closes || framing == Framing::ToEof;
            let mut out = format!("{}\r\n", resp_head[0]);
            for (name, value) in resp_headers.iter().filter(|(n, _)| !hop_by_hop(n)) {
                out.push_str(&format!("{name}: {value}\r\n"));
            }
            if close {
                out.push_str("Connection: close\r\n");
            }
            out.push_str("\r\n");
            to_client.write_all(out.as_bytes())?;
            let left = match mode {
                FaultMode::CutAfter(n) if blob_get => Some(n),
                _ => None,
            };
            let mut body = CutWriter { inner: &mut to_client, left };
            match copy_body(&mut from_up, &mut body, framing, true) {
                Err(e) if e.to_string() == CUT => {
                    sh.faults.fetch_add(1, Ordering::SeqCst);
                    Ok(true)
                }
                Err(e) => Err(e),
                Ok(()) => Ok(close),
            }
        })();
        let _ = upstream.shutdown(Shutdown::Both);
        sh.untrack(up_id);
        let end = result.inspect_err(|_| {
            let _ = to_client.shutdown(Shutdown::Both);
        })?;
        to_client.flush()?;
        if end {
            let _ = to_client.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &[u8] = br#"{"architecture":"wasm","os":"wasip1"}"#;
    const MODULE: &[u8] = b"\0asm\x01\0\0\0";

    fn get_manifest(reg: &Registry, repo: &str, reference: &str) -> HttpResponse {
        reg.request("GET", &format!("/v2/{repo}/manifests/{reference}"), &[("Accept", OCI_MANIFEST)], &[])
    }

    #[test]
    fn both_wasm_layouts_push_and_come_back() {
        let reg = Registry::start();
        for (repo, config_type, layer_type) in [
            ("wasm/current", WASM_CONFIG_V0, WASM_LAYER),
            ("wasm/wasm-to-oci", WASM_TO_OCI_CONFIG, WASM_TO_OCI_LAYER),
        ] {
            let digest = reg.push_artifact(repo, "v1", config_type, CONFIG, &[(layer_type, MODULE)]);
            let expected = oci_manifest(config_type, CONFIG, &[(layer_type, MODULE)]);
            assert_eq!(digest, sha256_digest(&expected));

            for reference in ["v1", digest.as_str()] {
                let resp = get_manifest(&reg, repo, reference);
                assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
                assert_eq!(resp.header("Content-Type"), Some(OCI_MANIFEST));
                assert_eq!(resp.header("Docker-Content-Digest"), Some(digest.as_str()));
                assert_eq!(sha256_digest(&resp.body), digest);
                let m: serde_json::Value = serde_json::from_slice(&resp.body).expect("manifest json");
                assert_eq!(m["config"]["mediaType"], config_type);
                assert_eq!(m["layers"][0]["mediaType"], layer_type);
                assert_eq!(m["layers"][0]["size"], MODULE.len());
            }
            let layer = reg.request("GET", &format!("/v2/{repo}/blobs/{}", sha256_digest(MODULE)), &[], &[]);
            assert_eq!((layer.status, layer.body.as_slice()), (200, MODULE));

            // 2.8 hides an OCI manifest from clients that do not ask for OCI.
            for accept in [&[][..], &[("Accept", "*/*")][..]] {
                let path = format!("/v2/{repo}/manifests/v1");
                let resp = reg.request("GET", &path, accept, &[]);
                assert_eq!(resp.status, 404, "Accept {accept:?}");
                assert!(String::from_utf8_lossy(&resp.body).contains("MANIFEST_UNKNOWN"));
            }
        }
    }

    #[test]
    fn manifest_rules_of_the_real_registry() {
        let reg = Registry::start();
        let repo = "rules/app";
        // A blob the registry has never seen: refused.
        let body = oci_manifest(WASM_CONFIG_V0, CONFIG, &[(WASM_LAYER, MODULE)]);
        let resp =
            reg.request("PUT", &format!("/v2/{repo}/manifests/v1"), &[("Content-Type", OCI_MANIFEST)], &body);
        assert_eq!(resp.status, 400);
        assert!(String::from_utf8_lossy(&resp.body).contains("MANIFEST_BLOB_UNKNOWN"));

        // A wrong layer size: accepted, the blob keeps its real length.
        reg.push_blob(repo, CONFIG);
        let layer = reg.push_blob(repo, MODULE);
        let mut m: serde_json::Value = serde_json::from_slice(&body).expect("json");
        m["layers"][0]["size"] = serde_json::json!(MODULE.len() + 100);
        let body = serde_json::to_vec(&m).expect("json");
        reg.push_manifest(repo, "wrong-size", OCI_MANIFEST, &body);
        let blob = reg.request("GET", &format!("/v2/{repo}/blobs/{layer}"), &[], &[]);
        assert_eq!(blob.body, MODULE);

        // Deleting a blob leaves the manifest naming it.
        reg.delete_blob(repo, &layer);
        let blob = reg.request("GET", &format!("/v2/{repo}/blobs/{layer}"), &[], &[]);
        assert_eq!(blob.status, 404);
        assert!(String::from_utf8_lossy(&blob.body).contains("BLOB_UNKNOWN"));
        assert_eq!(get_manifest(&reg, repo, "wrong-size").status, 200);
    }

    #[test]
    fn auth_refuses_a_wrong_password() {
        let reg = Registry::start_with_auth("puller", "s3cret pass");
        assert_eq!(reg.credentials(), Some(("puller", "s3cret pass")));
        let digest = reg.push_artifact("private/app", "v1", WASM_CONFIG_V0, CONFIG, &[(WASM_LAYER, MODULE)]);
        assert_eq!(get_manifest(&reg, "private/app", &digest).status, 200);

        let path = format!("/v2/private/app/manifests/{digest}");
        let wrong = basic_auth("puller", "wrong");
        for headers in [
            vec![("Accept", OCI_MANIFEST)],
            vec![("Accept", OCI_MANIFEST), ("Authorization", wrong.as_str())],
        ] {
            let resp = http(&reg.host(), "GET", &path, &headers, &[]).expect("request");
            assert_eq!(resp.status, 401, "{headers:?}");
            assert_eq!(resp.header("WWW-Authenticate"), Some("Basic realm=\"lichen-test\""));
        }
        let right = basic_auth("puller", "s3cret pass");
        let resp =
            http(&reg.host(), "GET", &path, &[("Accept", OCI_MANIFEST), ("Authorization", &right)], &[])
                .expect("request");
        assert_eq!(resp.status, 200);
    }

    #[test]
    fn restart_keeps_the_content() {
        let mut reg = Registry::start();
        let digest = reg.push_artifact("keep/app", "v1", WASM_CONFIG_V0, CONFIG, &[(WASM_LAYER, MODULE)]);
        let host = reg.host();
        reg.kill();
        assert!(http(&host, "GET", "/v2/", &[], &[]).is_err(), "a killed registry answered");
        reg.restart();
        assert_eq!(reg.host(), host);
        let resp = get_manifest(&reg, "keep/app", "v1");
        assert_eq!((resp.status, resp.header("Docker-Content-Digest")), (200, Some(digest.as_str())));
        let blob = reg.request("GET", &format!("/v2/keep/app/blobs/{}", sha256_digest(MODULE)), &[], &[]);
        assert_eq!(blob.body, MODULE);
    }

    #[test]
    fn basic_auth_encodes_like_base64() {
        assert_eq!(basic_auth("a", ""), "Basic YTo=");
        assert_eq!(basic_auth("ab", ""), "Basic YWI6");
        assert_eq!(basic_auth("Aladdin", "open sesame"), "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
    }

    /// Sends a keep-alive GET on `conn` and returns the reader.
    fn send_get(conn: &mut TcpStream, host: &str, path: &str) {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: {OCI_MANIFEST}\r\n\r\n");
        conn.write_all(req.as_bytes()).expect("send request");
    }

    #[test]
    fn fault_proxy_passes_cuts_and_stalls_blob_gets() {
        let reg = Registry::start();
        let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let digest = reg.push_artifact("slow/app", "v1", WASM_CONFIG_V0, CONFIG, &[(WASM_LAYER, &big)]);
        let blob = format!("/v2/slow/app/blobs/{}", sha256_digest(&big));
        let proxy = FaultProxy::start(&reg);
        let host = proxy.host();

        // Pass: two requests on one kept-alive connection, both whole.
        let mut conn = TcpStream::connect(&host).expect("connect proxy");
        conn.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut r = BufReader::new(conn.try_clone().expect("clone"));
        send_get(&mut conn, &host, "/v2/slow/app/manifests/v1");
        let m = read_response(&mut r, false).expect("manifest through the proxy");
        assert_eq!((m.status, m.header("Docker-Content-Digest")), (200, Some(digest.as_str())));
        assert_eq!(m.header("Connection"), None, "the proxy keeps the client's connection alive");
        send_get(&mut conn, &host, &blob);
        let b = read_response(&mut r, false).expect("blob through the proxy");
        assert_eq!((b.status, b.body.len()), (200, big.len()));
        assert!(b.body == big);

        // CutAfter: the head promises the whole blob, 1000 bytes come, then EOF.
        proxy.set_mode(FaultMode::CutAfter(1000));
        assert_eq!(proxy.mode(), FaultMode::CutAfter(1000));
        let m = http(&host, "GET", "/v2/slow/app/manifests/v1", &[("Accept", OCI_MANIFEST)], &[])
            .expect("manifest");
        assert_eq!(m.status, 200, "manifests are not cut");
        send_get(&mut conn, &host, &blob);
        let head = read_head(&mut r).expect("head").expect("a response");
        let (status, headers) = parse_status(&head).expect("status");
        assert_eq!((status, header(&headers, "Content-Length")), (200, Some("1000000")));
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).expect("read to the cut");
        assert_eq!(rest.len(), 1000);
        assert!(rest[..] == big[..1000]);
        let err = http(&host, "GET", &blob, &[], &[]).expect_err("a cut blob is an error");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        assert_eq!(proxy.faults(), 2);

        // Stall: no answer at all, while manifests still pass.
        proxy.set_mode(FaultMode::Stall);
        let mut conn = TcpStream::connect(&host).expect("connect proxy");
        conn.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
        send_get(&mut conn, &host, &blob);
        let mut byte = [0u8; 1];
        let err = conn.read(&mut byte).expect_err("a stalled blob GET gets no answer");
        assert!(matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut), "{err}");
        let m = http(&host, "GET", "/v2/slow/app/manifests/v1", &[("Accept", OCI_MANIFEST)], &[])
            .expect("manifest");
        assert_eq!(m.status, 200);
        assert_eq!(proxy.faults(), 3);

        // Back to Pass; the proxy saw every request.
        proxy.set_mode(FaultMode::Pass);
        let b = http(&host, "GET", &blob, &[], &[]).expect("blob after the faults");
        assert!(b.body == big);
        assert_eq!(proxy.requests().iter().filter(|r| r.ends_with(&blob)).count(), 5);

        // Uploads through the proxy work too (the registry's Location points back at it).
        let resp = http(&host, "POST", "/v2/slow/other/blobs/uploads/", &[], &[]).expect("post");
        assert_eq!(resp.status, 202);
        assert!(resp.header("Location").is_some_and(|l| l.contains(&host)), "{:?}", resp.header("Location"));
    }

    #[test]
    fn fault_proxy_survives_a_registry_restart() {
        let mut reg = Registry::start();
        reg.push_artifact("r/app", "v1", WASM_CONFIG_V0, CONFIG, &[(WASM_LAYER, MODULE)]);
        let proxy = FaultProxy::start(&reg);
        let path = "/v2/r/app/manifests/v1";
        reg.kill();
        assert!(http(&proxy.host(), "GET", path, &[("Accept", OCI_MANIFEST)], &[]).is_err());
        reg.restart();
        let m = http(&proxy.host(), "GET", path, &[("Accept", OCI_MANIFEST)], &[]).expect("after restart");
        assert_eq!(m.status, 200);
    }
}
