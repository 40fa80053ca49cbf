//! c2s benchmark: login rate and memory per idle session, for our controller and
//! the peer servers (Prosody, ejabberd) in `/work/shared/peers`.
//!
//! ```sh
//! cargo bench --bench c2s -- [--server ours|prosody|ejabberd|all] [--logins N] [--idle N]
//!     [--concurrency C] [--runs R] [--import N] [--kx x25519|default]
//! ```
//!
//! 1. Logins per second: each login is TCP connect, STARTTLS, a full TLS handshake
//!    (client resumption disabled), SASL SCRAM-SHA-256 (no channel binding, `n,,`)
//!    and resource bind, then `</stream:stream>` and close_notify. Closed loop with
//!    `--concurrency` logins in flight, `--logins` per run, median of `--runs` runs,
//!    after one warm-up run. The client caches SaltedPassword per (salt, iterations),
//!    as RFC 5802 §5.1 allows, so the load generator does no PBKDF2 in timed runs.
//!    Server CPU per login comes from `/proc/PID/stat`, the client's from getrusage.
//! 2. Memory per idle session: VmRSS of the server process before and after opening
//!    `--idle` sessions (STARTTLS, SCRAM-SHA-256, bind, initial presence), divided by
//!    their number. Measured first, on a freshly started server; the server is then
//!    restarted on the same data for the login runs.
//!
//! Servers: `ours` runs `target/release/xmpp-grid` (built first with `cargo build
//! --release --bin xmpp-grid` when missing or older than the sources) in a temporary
//! directory, provisioned with `xmpp-grid platform import` (timed). Peers are started
//! with their scripts (`PEER_AUTH=scram-sha-256`) on free ports with a private state
//! dir and stopped afterwards, also on error or Ctrl-C.
//!
//! Environment: `XG_BENCH_BIN` uses that server binary instead (no build);
//! `XG_BENCH_WRAP="env MALLOC_ARENA_MAX=2"` prefixes the server command (must exec).

mod common;
use common::*;

use aws_lc_rs::{digest, hmac, pbkdf2, rand};
use base64::Engine as _;
use std::collections::HashMap;
use std::io::Write as _;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const DOMAIN: &str = "grid.test";
const PASSWORD: &str = "secret";
const PREFIX: &str = "platform";
const PEERS: &str = "/work/shared/peers";
// ---------------------------------------------------------------- options

#[derive(Clone, Debug)]
struct Opts {
    servers: Vec<String>,
    logins: usize,
    runs: usize,
    concurrency: usize,
    idle: usize,
    idle_concurrency: usize,
    /// Accounts to provision (ours: `platform import`; peers: PEER_USERS).
    import: Option<usize>,
    kx: String,
    /// Overall bound per server, seconds.
    max_secs: u64,
}

fn parse_args() -> Result<Opts> {
    let mut o = Opts {
        servers: vec!["ours".into(), "prosody".into(), "ejabberd".into()],
        logins: 3000,
        runs: 3,
        concurrency: 32,
        idle: 10_000,
        idle_concurrency: 64,
        import: None,
        kx: "x25519".into(),
        max_secs: 900,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        let num = |s: String, name: &str| s.parse::<usize>().map_err(|e| format!("{name} {s:?}: {e}"));
        match a.as_str() {
            "--bench" => {} // passed by `cargo bench`
            "--server" => {
                let v = val("--server")?;
                o.servers = match v.as_str() {
                    "all" => vec!["ours".into(), "prosody".into(), "ejabberd".into()],
                    "ours" | "prosody" | "ejabberd" => vec![v],
                    _ => return Err(format!("--server {v}: ours, prosody, ejabberd or all")),
                }
            }
            "--logins" => o.logins = num(val(&a)?, &a)?,
            "--runs" => o.runs = num(val(&a)?, &a)?.max(1),
            "--concurrency" => o.concurrency = num(val(&a)?, &a)?.max(1),
            "--idle" => o.idle = num(val(&a)?, &a)?,
            "--idle-concurrency" => o.idle_concurrency = num(val(&a)?, &a)?.max(1),
            "--import" => o.import = Some(num(val(&a)?, &a)?),
            "--max-secs" => o.max_secs = num(val(&a)?, &a)? as u64,
            "--kx" => {
                o.kx = val(&a)?;
                if o.kx != "x25519" && o.kx != "default" {
                    return Err("--kx: x25519 or default".into());
                }
            }
            "-h" | "--help" => {
                println!(
                    "cargo bench --bench c2s -- [--server ours|prosody|ejabberd|all] [--logins N (3000)] \
                     [--runs R (3)] [--concurrency C (32)] [--idle N (10000, 0 skips)] [--idle-concurrency C (64)] \
                     [--import N (accounts; default max(idle, logins))] [--kx x25519|default] [--max-secs S (900 per server)]"
                );
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {a:?} (try --help)")),
        }
    }
    Ok(o)
}

impl Opts {
    fn accounts(&self) -> usize {
        self.import.unwrap_or(0).max(self.idle).max(self.logins.min(10_000)).max(1)
    }
    /// Accounts the login runs cycle through.
    fn login_pool(&self) -> usize {
        self.logins.min(self.accounts()).max(1)
    }
}

// ---------------------------------------------------------------- process helpers

/// CPU time (user + system) of our waited-for children, seconds.
fn children_cpu() -> f64 {
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut u);
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(u.ru_utime) + tv(u.ru_stime)
    }
}

// ---------------------------------------------------------------- servers

/// A server under test; dropping it stops it and removes its directories.
struct Server {
    name: String,
    port: u16,
    /// 0 while stopped.
    pid: u32,
    ca: PathBuf,
    /// What provisioning took, as text for the table.
    provision: String,
    kind: Kind,
}

enum Kind {
    Ours { child: Option<Child>, dir: PathBuf, cmd: Vec<std::ffi::OsString> },
    Peer { script_dir: PathBuf, state_dir: PathBuf, rundir: PathBuf, env: Vec<(String, String)> },
}

impl Server {
    /// Stops the process; keeps its data.
    fn stop(&mut self) {
        match &mut self.kind {
            Kind::Ours { child, .. } => {
                if let Some(mut child) = child.take() {
                    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                    let end = Instant::now() + Duration::from_secs(10);
                    loop {
                        match child.try_wait() {
                            Ok(Some(_)) => break,
                            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(50)),
                            _ => {
                                let _ = child.kill();
                                let _ = child.wait();
                                break;
                            }
                        }
                    }
                }
            }
            Kind::Peer { script_dir, state_dir, env, .. } => {
                if self.pid == 0 {
                    return;
                }
                let out = Command::new(script_dir.join("stop.sh"))
                    .envs(env.iter().map(|(k, v)| (k, v)))
                    .env("PEER_STATE_DIR", &*state_dir)
                    .stdin(Stdio::null())
                    .output();
                match out {
                    Ok(o) if o.status.success() => {}
                    Ok(o) => eprintln!("{}: stop.sh failed: {}", self.name, String::from_utf8_lossy(&o.stderr)),
                    Err(e) => eprintln!("{}: stop.sh: {e}", self.name),
                }
                // Belt and braces: the recorded PID must be gone.
                if Path::new(&format!("/proc/{}", self.pid)).exists() {
                    eprintln!("{}: pid {} still alive after stop.sh; SIGKILL", self.name, self.pid);
                    unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
                }
            }
        }
        if self.pid != 0 {
            eprintln!("[{}] stopped pid {}", self.name, self.pid);
        }
        self.pid = 0;
    }

    /// Starts the process (again) on the same data, port and certificates.
    fn start(&mut self) -> Result<()> {
        match &mut self.kind {
            Kind::Ours { child, dir, cmd } => {
                let log = std::fs::File::create(dir.join("serve.log")).map_err(|e| e.to_string())?;
                let c = Command::new(&cmd[0])
                    .args(&cmd[1..])
                    .env("RUST_LOG", "warn")
                    .stdin(Stdio::null())
                    .stdout(log.try_clone().map_err(|e| e.to_string())?)
                    .stderr(log)
                    .spawn()
                    .map_err(|e| format!("{:?}: {e}", cmd[0]))?;
                let pid = c.id();
                *child = Some(c);
                self.pid = pid;
                wait_port(self.port, Duration::from_secs(30), || Path::new(&format!("/proc/{pid}")).exists())
            }
            Kind::Peer { script_dir, state_dir, rundir, env } => {
                let out = Command::new(script_dir.join("start.sh"))
                    .arg(&*rundir)
                    .envs(env.iter().map(|(k, v)| (k, v)))
                    .env("PEER_USERS", "0") // the accounts are there already
                    .env("PEER_STATE_DIR", &*state_dir)
                    .stdin(Stdio::null())
                    .output()
                    .map_err(|e| format!("{} start.sh: {e}", self.name))?;
                let st = parse_state(&state_dir.join(format!("peer-{}.env", self.name))).unwrap_or_default();
                self.pid = st.get("PID").and_then(|p| p.parse().ok()).unwrap_or(0);
                if !out.status.success() || self.pid == 0 {
                    return Err(format!("{} start.sh {} failed: {}", self.name, rundir.display(), String::from_utf8_lossy(&out.stderr)));
                }
                Ok(())
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        match &self.kind {
            Kind::Ours { dir, .. } => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Kind::Peer { state_dir, rundir, .. } => {
                if !rundir.as_os_str().is_empty() {
                    let _ = std::fs::remove_dir_all(rundir);
                }
                let _ = std::fs::remove_dir_all(state_dir);
            }
        }
    }
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn newest_mtime(p: &Path) -> std::time::SystemTime {
    let mut t = std::time::SystemTime::UNIX_EPOCH;
    if let Ok(m) = std::fs::metadata(p) {
        if m.is_dir() {
            for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                t = t.max(newest_mtime(&e.path()));
            }
        } else if let Ok(mt) = m.modified() {
            t = mt;
        }
    }
    t
}

/// `target/release/xmpp-grid`, built first when missing or older than the sources.
fn ours_binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("XG_BENCH_BIN") {
        return Ok(PathBuf::from(p));
    }
    // The bench runs as target/release/deps/c2s-HASH.
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let release = exe.parent().and_then(Path::parent).ok_or("cannot locate target/release")?.to_path_buf();
    let bin = release.join("xmpp-grid");
    let m = manifest_dir();
    let src = newest_mtime(&m.join("src")).max(newest_mtime(&m.join("Cargo.toml"))).max(newest_mtime(&m.join("Cargo.lock")));
    let fresh = std::fs::metadata(&bin).and_then(|x| x.modified()).map(|t| t >= src).unwrap_or(false);
    if fresh {
        return Ok(bin);
    }
    eprintln!("[ours] building {} (cargo build --release --bin xmpp-grid)", bin.display());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = Command::new(cargo)
        .args(["build", "--release", "--bin", "xmpp-grid"])
        .current_dir(&m)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cargo build: {e}"))?;
    // Should the build directory be locked (cargo releases it before running a
    // bench, but another build may hold it), say so instead of waiting silently.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(std::result::Result::ok) {
            let _ = tx.send(line);
        }
    });
    let end = Instant::now() + Duration::from_secs(1800);
    loop {
        while let Ok(line) = rx.try_recv() {
            eprintln!("  {line}");
        }
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            while let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
                eprintln!("  {line}");
            }
            if !st.success() {
                return Err(format!("cargo build --release --bin xmpp-grid failed: {st}"));
            }
            return Ok(bin);
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            return Err("cargo build --release --bin xmpp-grid took over 30 minutes; run it first".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start_ours(opts: &Opts) -> Result<Server> {
    let bin = ours_binary()?;
    let dir = temp_dir("bench", "ours")?;
    let port = free_port()?;
    let cfg = dir.join("grid.toml");
    std::fs::write(
        &cfg,
        format!(
            "domain = \"{DOMAIN}\"\ndata_dir = \"data\"\n\n[listen]\nstarttls = \"127.0.0.1:{port}\"\ndirect_tls = \"\"\n\n\
             [limits]\nmax_connections_per_ip = 100000\nmax_connections = 100000\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let n = opts.accounts();
    let csv = dir.join("accounts.csv");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&csv).map_err(|e| e.to_string())?);
        writeln!(f, "name,password,roles,templates").map_err(|e| e.to_string())?;
        for i in 1..=n {
            writeln!(f, "{PREFIX}{i},{PASSWORD},,").map_err(|e| e.to_string())?;
        }
    }
    eprintln!("[ours] importing {n} accounts (xmpp-grid platform import)");
    let t = Instant::now();
    let cpu0 = children_cpu();
    let out = Command::new(&bin)
        .arg("--config")
        .arg(&cfg)
        .args(["platform", "import"])
        .arg(&csv)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let secs = t.elapsed().as_secs_f64();
    let cpu = children_cpu() - cpu0;
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(format!("platform import failed: {said} {}", String::from_utf8_lossy(&out.stderr)));
    }
    eprintln!("[ours] {said} (wall {secs:.1} s, CPU {cpu:.1} s)");
    // XG_BENCH_WRAP: a command that execs the server (e.g. `env MALLOC_ARENA_MAX=2`), for experiments.
    let mut cmd: Vec<std::ffi::OsString> = std::env::var("XG_BENCH_WRAP").unwrap_or_default().split_whitespace().map(Into::into).collect();
    cmd.extend([bin.into_os_string(), "--config".into(), cfg.into_os_string(), "serve".into()]);
    let mut srv = Server {
        name: "ours".into(),
        port,
        pid: 0,
        ca: dir.join("data/tls/ca.pem"),
        provision: format!("import {n}: {secs:.1} s wall, {cpu:.1} s CPU"),
        kind: Kind::Ours { child: None, dir, cmd },
    };
    srv.start()?;
    Ok(srv)
}

fn start_peer(name: &str, opts: &Opts) -> Result<Server> {
    let script_dir = Path::new(PEERS).join(name);
    let state_dir = temp_dir("bench", &format!("{name}-state"))?;
    let n = opts.accounts();
    let mut env = vec![
        ("PEER_AUTH".to_string(), "scram-sha-256".to_string()),
        ("PEER_USERS".to_string(), n.to_string()),
        ("PEER_PORT".to_string(), free_port()?.to_string()),
    ];
    if name == "ejabberd" {
        env.push(("PEER_DIST_PORT".into(), free_port()?.to_string()));
    }
    eprintln!("[{name}] start.sh with PEER_AUTH=scram-sha-256 PEER_USERS={n}");
    let t = Instant::now();
    let out = Command::new(script_dir.join("start.sh"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("PEER_STATE_DIR", &state_dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{name} start.sh: {e}"))?;
    let secs = t.elapsed().as_secs_f64();
    let state_file = state_dir.join(format!("peer-{name}.env"));
    let state = parse_state(&state_file);
    // Whatever happened, a recorded PID is ours to stop.
    let st = state.as_ref().ok();
    let get = |k: &str| st.and_then(|m| m.get(k)).cloned().unwrap_or_default();
    let srv = Server {
        name: name.into(),
        port: get("PORT").parse().unwrap_or(0),
        pid: get("PID").parse().unwrap_or(0),
        ca: PathBuf::from(get("CA")),
        provision: format!("start.sh incl. {n} accounts: {secs:.1} s"),
        kind: Kind::Peer { script_dir, state_dir: state_dir.clone(), rundir: PathBuf::from(get("RUNDIR")), env },
    };
    if !out.status.success() || state.is_err() || srv.pid == 0 {
        let msg = format!("{name} start.sh failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
        if srv.pid == 0 {
            std::mem::forget(srv); // nothing recorded to stop
            let _ = std::fs::remove_dir_all(&state_dir);
        }
        return Err(msg);
    }
    for l in String::from_utf8_lossy(&out.stderr).lines().filter(|l| l.contains("accounts") || l.contains("account(s)")) {
        eprintln!("  {l}");
    }
    eprintln!("[{name}] pid {} port {} ({})", srv.pid, srv.port, get("VERSION"));
    Ok(srv)
}

// ---------------------------------------------------------------- XMPP client

/// The text content of the first element named `name` in `s` (empty if self-closing).
fn element_text(s: &str, name: &str) -> String {
    let Some(i) = s.find(&format!("<{name}")) else { return String::new() };
    let rest = &s[i..];
    let Some(gt) = rest.find('>') else { return String::new() };
    if rest[..gt].ends_with('/') {
        return String::new();
    }
    let body = &rest[gt + 1..];
    body.find(&format!("</{name}>")).map(|e| body[..e].to_string()).unwrap_or_default()
}

/// Derived SCRAM client keys per (salt, iterations): ClientKey, StoredKey, ServerKey.
type KeyCache = Mutex<HashMap<(Vec<u8>, u32), Arc<([u8; 32], [u8; 32], [u8; 32])>>>;

struct Client {
    tls: tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
    keys: KeyCache,
    derivations: AtomicUsize,
}

fn client_config(ca: &Path, kx: &str) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if kx == "x25519" {
        provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every handshake is a full one.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

type TlsConn = Xml<tokio_rustls::client::TlsStream<TcpStream>>;

/// What the first login saw, for the report.
#[derive(Default, Clone)]
struct Seen {
    tls: String,
    mechanisms: String,
}

impl Client {
    fn scram_keys(&self, salt: &[u8], iters: u32) -> Arc<([u8; 32], [u8; 32], [u8; 32])> {
        if let Some(k) = self.keys.lock().unwrap().get(&(salt.to_vec(), iters)) {
            return k.clone();
        }
        self.derivations.fetch_add(1, Ordering::Relaxed);
        let mut salted = [0u8; 32];
        pbkdf2::derive(pbkdf2::PBKDF2_HMAC_SHA256, NonZeroU32::new(iters).unwrap(), salt, PASSWORD.as_bytes(), &mut salted);
        let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
        let mut ck = [0u8; 32];
        ck.copy_from_slice(hmac::sign(&key, b"Client Key").as_ref());
        let mut sk = [0u8; 32];
        sk.copy_from_slice(digest::digest(&digest::SHA256, &ck).as_ref());
        let mut svk = [0u8; 32];
        svk.copy_from_slice(hmac::sign(&key, b"Server Key").as_ref());
        let k = Arc::new((ck, sk, svk));
        self.keys.lock().unwrap().insert((salt.to_vec(), iters), k.clone());
        k
    }

    /// STARTTLS, TLS, SCRAM-SHA-256, bind. Returns the bound stream.
    async fn login(&self, user: &str, resource: &str, seen: Option<&Mutex<Seen>>) -> Result<TlsConn> {
        let tcp = tokio::time::timeout(STEP, TcpStream::connect(self.addr))
            .await
            .map_err(|_| "connect timeout".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let mut c = Xml { io: tcp, buf: Vec::new() };
        c.send(HEADER).await?;
        c.until("<stream:features", "</stream:features>").await?;
        c.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>").await?;
        c.until("<proceed", ">").await?;
        if !c.buf.is_empty() {
            return Err("data after <proceed/>".into());
        }
        let name = rustls::pki_types::ServerName::try_from(DOMAIN).unwrap();
        let tls = tokio::time::timeout(STEP, self.tls.connect(name, c.io))
            .await
            .map_err(|_| "TLS handshake timeout".to_string())?
            .map_err(|e| format!("TLS: {e}"))?;
        let mut t = Xml { io: tls, buf: Vec::new() };
        t.send(HEADER).await?;
        let features = t.until("<stream:features", "</stream:features>").await?;
        if let Some(seen) = seen {
            let conn = t.io.get_ref().1;
            let mut s = seen.lock().unwrap();
            if s.tls.is_empty() {
                s.tls = format!(
                    "{:?} {:?} {:?}",
                    conn.protocol_version().unwrap(),
                    conn.negotiated_cipher_suite().map(|c| c.suite()).unwrap(),
                    conn.negotiated_key_exchange_group().map(|g| g.name()).unwrap()
                );
                let mut m = Vec::new();
                let mut rest = features.as_str();
                while let Some(i) = rest.find("<mechanism>") {
                    let r = &rest[i + 11..];
                    let e = r.find("</mechanism>").unwrap_or(0);
                    m.push(r[..e].to_string());
                    rest = &r[e..];
                }
                s.mechanisms = m.join(" ");
            }
        }
        if !features.contains(">SCRAM-SHA-256<") {
            return Err(format!("SCRAM-SHA-256 not offered: {features}"));
        }

        // SCRAM-SHA-256 without channel binding (RFC 5802, RFC 7677).
        let mut nonce = [0u8; 18];
        rand::fill(&mut nonce).map_err(|_| "rand")?;
        let cnonce = B64.encode(nonce);
        let first_bare = format!("n={user},r={cnonce}");
        t.send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'>{}</auth>",
            B64.encode(format!("n,,{first_bare}"))
        ))
        .await?;
        let ch = t.until("<challenge", "</challenge>").await?;
        let server_first = String::from_utf8(B64.decode(element_text(&ch, "challenge").trim()).map_err(|e| format!("challenge: {e}"))?)
            .map_err(|e| e.to_string())?;
        let (mut snonce, mut salt, mut iters) = ("", Vec::new(), 0u32);
        for part in server_first.split(',') {
            if let Some(v) = part.strip_prefix("r=") {
                snonce = v;
            } else if let Some(v) = part.strip_prefix("s=") {
                salt = B64.decode(v).map_err(|e| format!("salt: {e}"))?;
            } else if let Some(v) = part.strip_prefix("i=") {
                iters = v.parse().map_err(|e| format!("i=: {e}"))?;
            }
        }
        if !snonce.starts_with(&cnonce) || iters == 0 {
            return Err(format!("bad server-first {server_first:?}"));
        }
        let keys = self.scram_keys(&salt, iters);
        let without_proof = format!("c=biws,r={snonce}");
        let auth_message = format!("{first_bare},{server_first},{without_proof}");
        let sig = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &keys.1), auth_message.as_bytes());
        let proof: Vec<u8> = keys.0.iter().zip(sig.as_ref()).map(|(a, b)| a ^ b).collect();
        t.send(&format!(
            "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>",
            B64.encode(format!("{without_proof},p={}", B64.encode(proof)))
        ))
        .await?;
        // <success ...>v=...</success> (or, rarely, self-closing with the data sent in a challenge).
        let ok = t.until("<success", ">").await?;
        let server_final = if ok.ends_with("/>") {
            String::new()
        } else {
            let rest = t.until("", "</success>").await?;
            rest.trim_end_matches("</success>").to_string()
        };
        let expect = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &keys.2), auth_message.as_bytes());
        let v = B64.decode(server_final.trim()).ok().and_then(|d| String::from_utf8(d).ok()).unwrap_or_default();
        if v.strip_prefix("v=").and_then(|x| B64.decode(x).ok()).as_deref() != Some(expect.as_ref()) {
            return Err(format!("server signature did not verify ({server_final:?})"));
        }

        t.send(HEADER).await?;
        t.until("<stream:features", "</stream:features>").await?;
        t.send(&format!(
            "<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>"
        ))
        .await?;
        let iq = t.until("<iq", "</iq>").await?;
        if !iq.contains("<jid") {
            return Err(format!("bind failed: {iq}"));
        }
        Ok(t)
    }
}

async fn close(mut t: TlsConn) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = t.io.write_all(b"</stream:stream>").await;
        let _ = t.io.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------- measurements

struct RunResult {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    server_cpu_ms: f64,
    client_cpu_ms: f64,
    errors: usize,
}

/// One closed-loop run of `n` logins with `conc` in flight.
async fn login_run(client: &Arc<Client>, pid: u32, n: usize, pool: usize, conc: usize, tag: &str, seen: &Arc<Mutex<Seen>>) -> Result<RunResult> {
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let first_err = Arc::new(Mutex::new(None::<String>));
    let cpu0 = (proc_cpu(pid).unwrap_or(0.0), self_cpu());
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..conc {
        let (client, next, errors, first_err, tag, seen) =
            (client.clone(), next.clone(), errors.clone(), first_err.clone(), tag.to_string(), seen.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let user = format!("{PREFIX}{}", i % pool + 1);
                let s = Instant::now();
                match client.login(&user, &format!("{tag}-{w}-{i}"), Some(&seen)).await {
                    Ok(t) => {
                        close(t).await;
                        lat.push(s.elapsed().as_secs_f64() * 1e3);
                    }
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) > n / 100 + 5 {
                            next.store(n, Ordering::Relaxed); // give up on this run
                        }
                        first_err.lock().unwrap().get_or_insert(format!("{user}: {e}"));
                    }
                }
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.map_err(|e| e.to_string())?);
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = (proc_cpu(pid).unwrap_or(0.0), self_cpu());
    let errs = errors.load(Ordering::Relaxed);
    if errs > 0 {
        eprintln!("  {errs} failed logins; first: {}", first_err.lock().unwrap().clone().unwrap_or_default());
    }
    if errs > n / 100 + 5 {
        return Err(format!("too many failed logins ({errs})"));
    }
    lat.sort_by(f64::total_cmp);
    let ok = lat.len().max(1);
    let pct = |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0.0);
    Ok(RunResult {
        rate: lat.len() as f64 / secs,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        server_cpu_ms: (cpu1.0 - cpu0.0) * 1e3 / ok as f64,
        client_cpu_ms: (cpu1.1 - cpu0.1) * 1e3 / ok as f64,
        errors: errs,
    })
}

struct IdleResult {
    n: usize,
    before_kib: u64,
    after_kib: u64,
    closed_kib: u64,
    open_secs: f64,
    server_cpu_ms: f64,
}

/// VmRSS once it changes by less than 0.1% over a second (at most 20 s).
async fn settled_rss(pid: u32) -> Result<u64> {
    let mut last = rss_kib(pid).ok_or("server gone")?;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = rss_kib(pid).ok_or("server gone")?;
        let stable = now.abs_diff(last) * 1000 < last;
        last = now;
        if stable {
            break;
        }
    }
    Ok(last)
}

/// Opens `n` idle sessions (with initial presence), measures RSS, closes them.
async fn idle_sessions(client: &Arc<Client>, pid: u32, n: usize, conc: usize, seen: &Arc<Mutex<Seen>>) -> Result<IdleResult> {
    let before_kib = settled_rss(pid).await?;
    let cpu0 = proc_cpu(pid).unwrap_or(0.0);
    let next = Arc::new(AtomicUsize::new(0));
    let held = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let failed = Arc::new(Mutex::new(None::<String>));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (client, next, held, failed, seen) = (client.clone(), next.clone(), held.clone(), failed.clone(), seen.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let user = format!("{PREFIX}{}", i + 1);
                match client.login(&user, "idle", Some(&seen)).await {
                    Ok(mut t) => {
                        if let Err(e) = t.send("<presence/>").await {
                            failed.lock().unwrap().get_or_insert(format!("{user}: presence: {e}"));
                            next.store(n, Ordering::Relaxed);
                        }
                        held.lock().unwrap().push(t);
                    }
                    Err(e) => {
                        failed.lock().unwrap().get_or_insert(format!("{user}: {e}"));
                        next.store(n, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let mut last_report = Instant::now();
    for t in tasks {
        while !t.is_finished() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if last_report.elapsed() > Duration::from_secs(5) {
                last_report = Instant::now();
                eprintln!("  {} sessions open, server RSS {} KiB", held.lock().unwrap().len(), rss_kib(pid).unwrap_or(0));
            }
        }
        t.await.map_err(|e| e.to_string())?;
    }
    let open_secs = t0.elapsed().as_secs_f64();
    let opened = held.lock().unwrap().len();
    if let Some(e) = failed.lock().unwrap().clone() {
        drop(std::mem::take(&mut *held.lock().unwrap()));
        return Err(format!("idle sessions: {opened} of {n} opened; {e}"));
    }
    // Let presence processing and any deferred work settle.
    let after_kib = settled_rss(pid).await?;
    let server_cpu_ms = (proc_cpu(pid).unwrap_or(0.0) - cpu0) * 1e3 / n.max(1) as f64;
    let conns = std::mem::take(&mut *held.lock().unwrap());
    eprintln!("  {} sessions open for {open_secs:.1} s, server RSS {after_kib} KiB; closing them", conns.len());
    let closers: Vec<_> = conns.into_iter().map(|t| tokio::spawn(close(t))).collect();
    for c in closers {
        let _ = c.await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let closed_kib = rss_kib(pid).unwrap_or(0);
    Ok(IdleResult { n: opened, before_kib, after_kib, closed_kib, open_secs, server_cpu_ms })
}

// ---------------------------------------------------------------- driver

struct Report {
    name: String,
    provision: String,
    seen: Seen,
    runs: Vec<RunResult>,
    idle: Option<IdleResult>,
    note: String,
}

async fn bench_server(srv: &mut Server, opts: &Opts) -> Result<Report> {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", srv.port).parse().unwrap();
    let client = Arc::new(Client {
        tls: tokio_rustls::TlsConnector::from(client_config(&srv.ca, &opts.kx)?),
        addr,
        keys: Mutex::new(HashMap::new()),
        derivations: AtomicUsize::new(0),
    });
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut rep = Report { name: srv.name.clone(), provision: srv.provision.clone(), seen: Seen::default(), runs: Vec::new(), idle: None, note: String::new() };
    // One login first: a clear error if the setup is wrong.
    let t = client.login(&format!("{PREFIX}1"), "probe", Some(&seen)).await.map_err(|e| format!("first login: {e}"))?;
    close(t).await;
    let s = seen.lock().unwrap().clone();
    eprintln!("[{}] first login ok: {} / SASL: {}", srv.name, s.tls, s.mechanisms);

    if opts.idle > 0 {
        eprintln!("[{}] opening {} idle sessions ({} in flight)", srv.name, opts.idle, opts.idle_concurrency);
        let r = idle_sessions(&client, srv.pid, opts.idle, opts.idle_concurrency, &seen).await?;
        eprintln!(
            "[{}] RSS {} -> {} KiB with {} sessions: {:.1} KiB/session; {} KiB after closing them",
            srv.name, r.before_kib, r.after_kib, r.n, (r.after_kib as f64 - r.before_kib as f64) / r.n as f64, r.closed_kib
        );
        rep.idle = Some(r);
    }
    if opts.logins > 0 {
        if opts.idle > 0 {
            // Logins on a fresh process too: no leftovers of 10,000 sessions (heap, GC).
            eprintln!("[{}] restarting for the login runs", srv.name);
            tokio::task::block_in_place(|| {
                srv.stop();
                srv.start()
            })?;
        }
        let pool = opts.login_pool();
        eprintln!("[{}] warm-up: {pool} logins", srv.name);
        login_run(&client, srv.pid, pool, pool, opts.concurrency, "warm", &seen).await?;
        for run in 0..opts.runs {
            let r = login_run(&client, srv.pid, opts.logins, pool, opts.concurrency, &format!("r{run}"), &seen).await?;
            eprintln!(
                "[{}] run {}: {} logins, {:.0}/s, p50 {:.1} ms, p99 {:.1} ms, server CPU {:.2} ms/login, client CPU {:.2} ms/login",
                srv.name, run + 1, opts.logins, r.rate, r.p50_ms, r.p99_ms, r.server_cpu_ms, r.client_cpu_ms
            );
            rep.runs.push(r);
        }
    }
    rep.note = format!("client PBKDF2 derivations: {}", client.derivations.load(Ordering::Relaxed));
    rep.seen = seen.lock().unwrap().clone();
    Ok(rep)
}

async fn run_one(name: &str, opts: &Opts) -> Result<Report> {
    let o = opts.clone();
    let n = name.to_string();
    // Starting is blocking (scripts, import): off the async workers.
    let mut srv = tokio::task::spawn_blocking(move || if n == "ours" { start_ours(&o) } else { start_peer(&n, &o) })
        .await
        .map_err(|e| e.to_string())??;
    eprintln!("[{name}] pid {} on 127.0.0.1:{}, RSS {} KiB", srv.pid, srv.port, rss_kib(srv.pid).unwrap_or(0));
    let r = match tokio::time::timeout(Duration::from_secs(opts.max_secs), bench_server(&mut srv, opts)).await {
        Ok(r) => r,
        Err(_) => Err(format!("{name}: over --max-secs {}", opts.max_secs)),
    };
    // Stopping blocks too; `srv` is dropped (stopped) here on every path.
    let _ = tokio::task::spawn_blocking(move || drop(srv)).await;
    r
}

fn print_table(reps: &[Report], opts: &Opts) {
    println!();
    println!(
        "c2s benchmark: {} logins x {} runs (median), {} in flight; {} idle sessions; SCRAM-SHA-256, kx {}",
        opts.logins, opts.runs, opts.concurrency, opts.idle, opts.kx
    );
    println!(
        "| server | logins/s (median) | runs | p50 / p99 ms | server CPU ms/login | client CPU ms/login | RSS before KiB | RSS with sessions KiB | KiB/session | RSS after close KiB | provisioning |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in reps {
        let rates: Vec<f64> = r.runs.iter().map(|x| x.rate).collect();
        let med = |f: fn(&RunResult) -> f64| median(r.runs.iter().map(f).collect());
        let (b, a, per, c) = match &r.idle {
            Some(i) => (
                i.before_kib.to_string(),
                i.after_kib.to_string(),
                format!("{:.1}", (i.after_kib as f64 - i.before_kib as f64) / i.n as f64),
                i.closed_kib.to_string(),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "| {} | {:.0} | {} | {:.1} / {:.1} | {:.2} | {:.2} | {b} | {a} | {per} | {c} | {} |",
            r.name,
            median(rates.clone()),
            rates.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", "),
            med(|x| x.p50_ms),
            med(|x| x.p99_ms),
            med(|x| x.server_cpu_ms),
            med(|x| x.client_cpu_ms),
            r.provision
        );
    }
    for r in reps {
        println!("- {}: {}; SASL offered: {}; {}", r.name, r.seen.tls, r.seen.mechanisms, r.note);
        if let Some(i) = &r.idle {
            println!("  {} idle sessions opened in {:.1} s ({:.2} server CPU ms each)", i.n, i.open_secs, i.server_cpu_ms);
        }
        let errs: usize = r.runs.iter().map(|x| x.errors).sum();
        if errs > 0 {
            println!("  {errs} failed logins in timed runs");
        }
    }
    let ours = reps.iter().find(|r| r.name == "ours");
    let peer_best = reps.iter().filter(|r| r.name != "ours").map(|r| median(r.runs.iter().map(|x| x.rate).collect())).fold(0.0, f64::max);
    if let Some(o) = ours {
        let rate = median(o.runs.iter().map(|x| x.rate).collect());
        if peer_best > 0.0 && !o.runs.is_empty() {
            println!("targets: ours/faster peer logins = {:.2}x (target >= 2x): {}", rate / peer_best, if rate >= 2.0 * peer_best { "met" } else { "MISSED" });
        }
        if let Some(i) = &o.idle {
            let per = (i.after_kib as f64 - i.before_kib as f64) / i.n as f64;
            println!("targets: ours {per:.1} KiB per idle session (target <= 16): {}", if per <= 16.0 { "met" } else { "MISSED" });
        }
    }
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("c2s: {e}");
            std::process::exit(2);
        }
    };
    let nofile = raise_nofile();
    let need = opts.idle + 200;
    if (nofile as usize) < need {
        eprintln!("c2s: open-files limit {nofile} is below the {need} that --idle {} needs", opts.idle);
        std::process::exit(2);
    }
    eprintln!("c2s: RLIMIT_NOFILE {nofile}; load average {}", loadavg());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let failed = rt.block_on(async {
        let (reps, failed) = each_server("c2s", &opts.servers, |name| run_one(name, &opts)).await;
        print_table(&reps, &opts);
        failed
    });
    eprintln!("c2s: load average at end {}", loadavg());
    rt.shutdown_timeout(Duration::from_secs(5));
    std::process::exit(if failed { 1 } else { 0 });
}
