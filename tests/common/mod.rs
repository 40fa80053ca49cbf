//! Shared test harness: a real controller in-process on 127.0.0.1:0 with a real
//! sled store and generated PKI in a temporary directory, and a literal-XML
//! client over real TLS.
#![allow(dead_code)]

use base64::Engine as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use xmpp_grid::config::Config;
use xmpp_grid::server::{self, Grid, Running};
use xmpp_grid::store::Account;

pub const DOMAIN: &str = "grid.test";
pub const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A unique empty directory under the system temp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("xg-test-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub struct TestGrid {
    pub running: Option<Running>,
    pub grid: Arc<Grid>,
    pub dir: PathBuf,
    pub starttls: std::net::SocketAddr,
    pub direct: std::net::SocketAddr,
}

pub fn test_config(dir: &std::path::Path) -> Config {
    let mut cfg = Config { domain: DOMAIN.into(), data_dir: dir.join("data"), ..Config::default() };
    cfg.listen.starttls = "127.0.0.1:0".into();
    cfg.listen.direct_tls = "127.0.0.1:0".into();
    // Tests that want payload plugins turn them on (tests/payload_plugins.rs);
    // the others publish free-form payloads.
    cfg.plugins.dir = dir.join("plugins");
    cfg.plugins.builtin = false;
    cfg
}

/// Starts a controller; `tweak` adjusts the config first.
pub async fn start(name: &str, tweak: impl FnOnce(&mut Config)) -> TestGrid {
    let dir = temp_dir(name);
    let mut cfg = test_config(&dir);
    tweak(&mut cfg);
    start_with(cfg, dir).await
}

pub async fn start_with(cfg: Config, dir: PathBuf) -> TestGrid {
    let grid = tokio::task::spawn_blocking(move || Grid::open(cfg)).await.unwrap().unwrap();
    let running = server::start(grid.clone()).await.unwrap();
    TestGrid {
        starttls: running.starttls_addr.unwrap(),
        direct: running.direct_tls_addr.unwrap(),
        running: Some(running),
        grid,
        dir,
    }
}

impl TestGrid {
    /// Provisions a platform with a password (empty: certificate-only), with the
    /// shipped `publisher` and `subscriber` roles so that it may use the broker.
    pub fn add(&self, name: &str, password: &str) {
        self.add_with_roles(name, password, &["publisher", "subscriber"]);
    }

    /// Provisions a platform with exactly these roles; the policies learn it at once.
    pub fn add_with_roles(&self, name: &str, password: &str, roles: &[&str]) {
        let credentials = (!password.is_empty()).then(|| xmpp_grid::sasl::derive_credentials(password, 4096).unwrap());
        let acc = Account {
            credentials,
            roles: roles.iter().map(|r| r.to_string()).collect(),
            templates: vec![],
            read_only: false,
            revoked: false,
            cert_serials: vec![],
            created: 0,
        };
        self.grid.store.add_accounts(&[(name.to_string(), acc.clone())]).unwrap();
        self.grid.platforms_changed(std::iter::once((name, &acc)));
    }

    pub fn ca_path(&self) -> PathBuf {
        self.grid.cfg.tls_dir().join("ca.pem")
    }

    pub async fn shutdown(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A rustls client config trusting the grid CA, optionally with a client certificate.
pub fn client_config(ca: &std::path::Path, client: Option<(&str, &str)>, versions: &[&'static rustls::SupportedProtocolVersion]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_protocol_versions(versions).with_root_certificates(roots);
    let cfg = match client {
        None => b.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            let certs = rustls_pemfile::certs(&mut cert_pem.as_bytes()).map(|c| c.unwrap()).collect();
            let key = rustls_pemfile::private_key(&mut key_pem.as_bytes()).unwrap().unwrap();
            b.with_client_auth_cert(certs, key).unwrap()
        }
    };
    Arc::new(cfg)
}

/// A byte stream we read XML text from, literally.
pub struct Raw<S> {
    pub io: S,
    pub buf: String,
}

pub const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='grid.test' version='1.0'>";

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Raw<S> {
    pub fn new(io: S) -> Self {
        Raw { io, buf: String::new() }
    }

    pub async fn send(&mut self, s: &str) {
        self.io.write_all(s.as_bytes()).await.unwrap();
        self.io.flush().await.unwrap();
    }

    /// Reads until `pat` appears; returns the text up to and including it.
    pub async fn read_until(&mut self, pat: &str) -> String {
        self.try_read_until(pat, Duration::from_secs(10))
            .await
            .unwrap_or_else(|got| panic!("waiting for {pat:?}, got {got:?}"))
    }

    /// Like read_until, but Err(what arrived) on timeout or EOF.
    pub async fn try_read_until(&mut self, pat: &str, within: Duration) -> Result<String, String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(i) = self.buf.find(pat) {
                let rest = self.buf.split_off(i + pat.len());
                return Ok(std::mem::replace(&mut self.buf, rest));
            }
            let mut b = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.io.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Err(std::mem::take(&mut self.buf)),
                Ok(Ok(n)) => self.buf.push_str(&String::from_utf8_lossy(&b[..n])),
            }
        }
    }

    /// Reads until the peer closes; returns everything received.
    pub async fn read_to_close(&mut self) -> String {
        let mut b = [0u8; 8192];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.io.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return std::mem::take(&mut self.buf),
                Ok(Ok(n)) => self.buf.push_str(&String::from_utf8_lossy(&b[..n])),
                Err(_) => panic!("connection not closed; got {:?}", self.buf),
            }
        }
    }
}

pub type Tls = Raw<TlsStream<TcpStream>>;

/// Plain TCP to the STARTTLS port, stream opened, features read.
pub async fn plain(addr: std::net::SocketAddr) -> (Raw<TcpStream>, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut c = Raw::new(tcp);
    c.send(HEADER).await;
    let f = c.read_until("</stream:features>").await;
    (c, f)
}

/// STARTTLS negotiated; returns the client and the post-TLS features.
pub async fn starttls_with(g: &TestGrid, cfg: Arc<rustls::ClientConfig>) -> (Tls, String) {
    let (mut c, _) = plain(g.starttls).await;
    c.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>").await;
    c.read_until("<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>").await;
    let name = rustls::pki_types::ServerName::try_from(DOMAIN).unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, c.io).await.unwrap();
    let mut t = Raw::new(tls);
    t.send(HEADER).await;
    let f = t.read_until("</stream:features>").await;
    (t, f)
}

pub async fn starttls(g: &TestGrid) -> (Tls, String) {
    starttls_with(g, client_config(&g.ca_path(), None, rustls::DEFAULT_VERSIONS)).await
}

/// Logs in with PLAIN and binds `resource`; returns the bound client and its full JID.
pub async fn login(g: &TestGrid, user: &str, password: &str, resource: &str) -> (Tls, String) {
    let (mut c, _) = starttls(g).await;
    let creds = B64.encode(format!("\0{user}\0{password}"));
    c.send(&format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{creds}</auth>")).await;
    c.read_until("<success").await;
    c.read_until(">").await;
    bind(c, resource).await
}

/// After SASL success: restart the stream and bind.
pub async fn bind(mut c: Tls, resource: &str) -> (Tls, String) {
    c.send(HEADER).await;
    c.read_until("</stream:features>").await;
    c.send(&format!("<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>")).await;
    c.read_until("<jid>").await;
    let jid = c.read_until("</jid>").await.trim_end_matches("</jid>").to_string();
    c.read_until("</iq>").await;
    (c, jid)
}
pub mod scram;

// ---- Appended for the pubsub interop and crash tests ----

/// What a finished child process did.
pub struct ChildRun {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl ChildRun {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Display for ChildRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {:?}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

/// Runs `cmd` with stdin closed; kills it (kill_on_drop) and panics after `deadline`.
pub async fn run_child(mut cmd: tokio::process::Command, deadline: Duration) -> ChildRun {
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let shown = format!("{cmd:?}");
    let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
    match tokio::time::timeout(deadline, child.wait_with_output()).await {
        Ok(out) => {
            let out = out.unwrap();
            ChildRun {
                code: out.status.code(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        }
        Err(_) => panic!("{shown} still running after {deadline:?}"),
    }
}

/// `/usr/bin/python3 tests/interop/<name> --port <port> --ca <ca>` plus `args`.
pub fn interop_python(name: &str, port: u16, ca: &std::path::Path, args: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("/usr/bin/python3");
    // No __pycache__ in the source tree from importing the helper modules.
    c.env("PYTHONDONTWRITEBYTECODE", "1");
    c.arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop").join(name));
    c.arg("--port").arg(port.to_string()).arg("--ca").arg(ca).args(args);
    c
}

/// Like [`login`], for a server that is not a [`TestGrid`] (e.g. the real binary):
/// STARTTLS to `addr` trusting `ca`, PLAIN, bind. Every step within 10 s.
pub async fn login_at(addr: std::net::SocketAddr, ca: &std::path::Path, user: &str, password: &str, resource: &str) -> (Tls, String) {
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr)).await.expect("connect timeout").unwrap();
    let mut c = Raw::new(tcp);
    c.send(HEADER).await;
    c.read_until("</stream:features>").await;
    c.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>").await;
    c.read_until("<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>").await;
    let name = rustls::pki_types::ServerName::try_from(DOMAIN).unwrap();
    let cfg = client_config(ca, None, rustls::DEFAULT_VERSIONS);
    let tls = tokio::time::timeout(Duration::from_secs(10), tokio_rustls::TlsConnector::from(cfg).connect(name, c.io))
        .await
        .expect("TLS handshake timeout")
        .unwrap();
    let mut t = Raw::new(tls);
    t.send(HEADER).await;
    t.read_until("</stream:features>").await;
    let creds = B64.encode(format!("\0{user}\0{password}"));
    t.send(&format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{creds}</auth>")).await;
    t.read_until("<success").await;
    t.read_until(">").await;
    bind(t, resource).await
}

/// `start_with` on the directory of a controller that was just shut down and
/// dropped: its broker task lets go of the database only once it notices the
/// last handle is gone, so wait (bounded) until sled can open it, then start.
pub async fn start_again(cfg: Config, dir: PathBuf) -> TestGrid {
    let db = cfg.db_dir();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let path = db.clone();
        match tokio::task::spawn_blocking(move || sled::open(&path).map(drop)).await.unwrap() {
            Ok(()) => return start_with(cfg, dir).await,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the previous controller still holds {}: {e}", db.display()),
        }
    }
}

/// Runs the real `xmpp-grid` binary with `--config`; returns (success, stdout, stderr).
pub fn run_cli(config: &std::path::Path, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_xmpp-grid"))
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Builds crate `krate` of the guest workspace `workspace` (a directory with a
/// Cargo.toml, relative to the repository) for wasm32-unknown-unknown and
/// returns its module. Concurrent test processes serialize on cargo's lock.
pub fn wasm_module(workspace: &str, krate: &str) -> PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("wasm-{}", workspace.replace('/', "-")));
    let mut cmd = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "--quiet", "--release", "--locked", "--target", "wasm32-unknown-unknown", "--manifest-path"])
        .arg(root.join(workspace).join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target);
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET"] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("run cargo");
    assert!(status.success(), "building {workspace}/{krate} for wasm32-unknown-unknown failed (rustup target add wasm32-unknown-unknown?)");
    let module = target.join("wasm32-unknown-unknown/release").join(format!("{}.wasm", krate.replace('-', "_")));
    assert!(module.exists(), "{} missing", module.display());
    module
}
