//! Fan-out benchmark: pubsub delivery throughput and latency, for our controller and
//! the peer servers (Prosody, ejabberd) in `/work/shared/peers`.
//!
//! ```sh
//! cargo bench --bench fanout -- [--server ours|prosody|ejabberd|all] [--subs N] [--items N]
//!     [--window W] [--window-until delivered|ack] [--lat-subs N] [--rate R] [--lat-secs S] [--runs R]
//! ```
//!
//! Every client is its own TCP connection on 127.0.0.1: STARTTLS, TLS (1.3 as
//! negotiated), SASL PLAIN, resource bind; subscribers also send initial presence and
//! subscribe with their bare JID. One topic per phase, created by the publisher with
//! `pubsub#access_model` open, `pubsub#type` the IODEF 2.0 namespace and
//! `pubsub#max_items` 1000 (the peers' default). Items are a valid IODEF 2.0 document
//! padded to 1 KiB whose IncidentID carries `FANOUT-<run>.<seq>`; subscribers count
//! item notifications by scanning their decrypted bytes for that marker (no XML trees).
//!
//! 1. Closed loop: 1 publisher, `--subs` subscribers, `--items` publishes with at most
//!    `--window` in flight. In flight means not yet acknowledged *and* delivered to every
//!    subscriber (`--window-until delivered`, the default: the offered load follows what
//!    the server delivers, no server queue grows), or only not yet acknowledged (`ack`).
//!    Deliveries/s = items x subscribers / (first publish written .. last delivery read).
//! 2. Open loop: `--lat-subs` subscribers on a second topic; the publisher publishes at a
//!    fixed `--rate`/s for `--lat-secs` without waiting for anything; each delivery's
//!    latency is its read time minus the publish's write time (same clock, same process).
//!
//! One warm-up run, then `--runs` timed runs of each; the table shows medians. The
//! generator is one thread (tokio current_thread); its CPU time comes from getrusage, the
//! server's from /proc/PID/stat. Servers: `ours` runs the release binary built with this
//! bench (`XG_BENCH_BIN` overrides; `XG_BENCH_BROKER` is added to its `[broker]` table and
//! `XG_BENCH_TOML` appended to its config) in a
//! temporary directory (under `TMPDIR`); `XG_BENCH_DUMP=DIR` writes each open-loop
//! publish's send and ack times there; peers are started with their
//! scripts on free ports with a private state dir and accounts added with `adduser.sh -n`.
//! Every server started is stopped at the end, also on error, timeout or Ctrl-C.

mod common;
use common::*;

use memchr::memmem;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

const DOMAIN: &str = "grid.test";
const BROKER: &str = "broker.grid.test";
const PASSWORD: &str = "secret";
const PREFIX: &str = "platform";
const PEERS: &str = "/work/shared/peers";
const IODEF_NS: &str = "urn:ietf:params:xml:ns:iodef-2.0";
/// In each item's IncidentID: `FANOUT-<run>.<seq>`.
const MARKER: &[u8] = b"FANOUT-";
const PAYLOAD_BYTES: usize = 1024;

// ---------------------------------------------------------------- options

#[derive(Clone, Debug)]
struct Opts {
    servers: Vec<String>,
    subs: usize,
    items: usize,
    window: usize,
    /// Window released by delivery to all subscribers (true) or by the publish ack only.
    until_delivered: bool,
    lat_subs: usize,
    rate: u64,
    lat_secs: u64,
    runs: usize,
    /// Closed loop: no new publishes after this many seconds of a run (slow servers).
    closed_secs: u64,
    /// Open loop: how long a saturated server may take to deliver what was sent.
    drain_secs: u64,
    /// Logins in flight during setup.
    setup_concurrency: usize,
    /// Bound of one timed run, seconds.
    run_secs: u64,
    /// Bound per server, seconds.
    max_secs: u64,
}

fn parse_args() -> Result<Opts> {
    let mut o = Opts {
        servers: vec!["ours".into(), "prosody".into(), "ejabberd".into()],
        subs: 1000,
        items: 2000,
        window: 32,
        until_delivered: true,
        lat_subs: 100,
        rate: 1000,
        lat_secs: 10,
        runs: 3,
        closed_secs: 60,
        drain_secs: 30,
        setup_concurrency: 50,
        run_secs: 300,
        max_secs: 1800,
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
            "--subs" => o.subs = num(val(&a)?, &a)?,
            "--items" => o.items = num(val(&a)?, &a)?.max(1),
            "--window" => o.window = num(val(&a)?, &a)?.max(1),
            "--window-until" => {
                o.until_delivered = match val(&a)?.as_str() {
                    "delivered" => true,
                    "ack" => false,
                    v => return Err(format!("--window-until {v}: delivered or ack")),
                }
            }
            "--lat-subs" => o.lat_subs = num(val(&a)?, &a)?,
            "--rate" => o.rate = num(val(&a)?, &a)?.max(1) as u64,
            "--lat-secs" => o.lat_secs = num(val(&a)?, &a)?.max(1) as u64,
            "--runs" => o.runs = num(val(&a)?, &a)?.max(1),
            "--closed-secs" => o.closed_secs = num(val(&a)?, &a)?.max(1) as u64,
            "--drain-secs" => o.drain_secs = num(val(&a)?, &a)?.max(1) as u64,
            "--setup-concurrency" => o.setup_concurrency = num(val(&a)?, &a)?.max(1),
            "--run-secs" => o.run_secs = num(val(&a)?, &a)?.max(10) as u64,
            "--max-secs" => o.max_secs = num(val(&a)?, &a)?.max(60) as u64,
            "-h" | "--help" => {
                println!(
                    "cargo bench --bench fanout -- [--server ours|prosody|ejabberd|all] [--subs N (1000, 0 skips)] \
                     [--items N (2000)] [--window W (32)] [--window-until delivered|ack] [--lat-subs N (100, 0 skips)] \
                     [--rate R publishes/s (1000)] [--lat-secs S (10)] [--runs R (3)] [--closed-secs S (60)] [--drain-secs S (30)] \
                     [--setup-concurrency C (50)] \
                     [--run-secs S (300 per run)] [--max-secs S (1800 per server)]"
                );
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {a:?} (try --help)")),
        }
    }
    if o.subs == 0 && o.lat_subs == 0 {
        return Err("nothing to do: --subs 0 and --lat-subs 0".into());
    }
    Ok(o)
}

impl Opts {
    /// Subscriber connections: the latency phase reuses the first `lat_subs` of them.
    fn connections(&self) -> usize {
        self.subs.max(self.lat_subs)
    }
}

// ---------------------------------------------------------------- process helpers

/// Write system calls (write, writev, ...) a process has made: `syscw` of /proc/PID/io.
fn proc_syscw(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix("syscw:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

// ---------------------------------------------------------------- servers

/// A server under test; dropping it stops it.
struct Server {
    name: String,
    port: u16,
    pid: u32,
    ca: PathBuf,
    version: String,
    kind: Kind,
}

enum Kind {
    Ours { child: Child, dir: PathBuf },
    Peer { script_dir: PathBuf, state_dir: PathBuf, rundir: PathBuf, env: Vec<(String, String)> },
}

impl Drop for Server {
    fn drop(&mut self) {
        match &mut self.kind {
            Kind::Ours { child, dir } => {
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
                let _ = std::fs::remove_dir_all(dir);
            }
            Kind::Peer { script_dir, state_dir, rundir, env } => {
                let out = Command::new(script_dir.join("stop.sh"))
                    .envs(env.iter().map(|(k, v)| (k, v)))
                    .env("PEER_STATE_DIR", &*state_dir)
                    .stdin(Stdio::null())
                    .output();
                match out {
                    Ok(o) if o.status.success() => {
                        let _ = std::fs::remove_dir_all(&*rundir);
                        let _ = std::fs::remove_dir_all(&*state_dir);
                    }
                    Ok(o) => eprintln!("{}: stop.sh failed: {}", self.name, String::from_utf8_lossy(&o.stderr)),
                    Err(e) => eprintln!("{}: stop.sh: {e}", self.name),
                }
                // The recorded PID must be gone.
                let end = Instant::now() + Duration::from_secs(10);
                while Path::new(&format!("/proc/{}", self.pid)).exists() && Instant::now() < end {
                    std::thread::sleep(Duration::from_millis(100));
                }
                if self.pid != 0 && Path::new(&format!("/proc/{}", self.pid)).exists() {
                    eprintln!("{}: pid {} still alive after stop.sh; SIGKILL", self.name, self.pid);
                    unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
                }
            }
        }
        eprintln!("[{}] stopped", self.name);
    }
}

fn ours_binary() -> PathBuf {
    std::env::var_os("XG_BENCH_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_xmpp-grid")))
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
    for e in std::fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))? {
        let e = e.map_err(|e| e.to_string())?;
        let t = to.join(e.file_name());
        if e.file_type().map_err(|e| e.to_string())?.is_dir() {
            copy_dir(&e.path(), &t)?;
        } else {
            std::fs::copy(e.path(), &t).map_err(|x| format!("{}: {x}", e.path().display()))?;
        }
    }
    Ok(())
}

fn start_ours(opts: &Opts) -> Result<Server> {
    let bin = ours_binary();
    let dir = temp_dir("fanout", "ours")?;
    let port = free_port()?;
    let cfg = dir.join("grid.toml");
    // Like the peers (no rate limiting, no per-address cap): read rate 1 GiB/s, many
    // connections per address. The outbound queue stays at its default (1024).
    // Authorization as in production: a snapshot of the repository's Cedar policies,
    // platform1 with the roles publisher and subscriber, the others subscriber.
    copy_dir(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies"), &dir.join("policies"))?;
    std::fs::write(
        &cfg,
        format!(
            "domain = \"{DOMAIN}\"\ndata_dir = \"data\"\n\n[listen]\nstarttls = \"127.0.0.1:{port}\"\ndirect_tls = \"\"\n\n\
             [broker]\ndefault_access_model = \"open\"\n{}\n\n\
             [limits]\nmax_connections_per_ip = 100000\nmax_connections = 100000\nread_rate_bytes_per_sec = 1073741824\n\n{}\n",
            // For experiments: XG_BENCH_BROKER=$'group_commit_ms = 5' (more [broker] keys),
            // XG_BENCH_TOML=$'[policies]\nenforce = false' (more tables).
            std::env::var("XG_BENCH_BROKER").unwrap_or_default(),
            std::env::var("XG_BENCH_TOML").unwrap_or_default()
        ),
    )
    .map_err(|e| e.to_string())?;
    let n = opts.connections() + 1;
    let csv = dir.join("accounts.csv");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&csv).map_err(|e| e.to_string())?);
        writeln!(f, "name,password,roles,templates").map_err(|e| e.to_string())?;
        for i in 1..=n {
            let roles = if i == 1 { "publisher;subscriber" } else { "subscriber" };
            writeln!(f, "{PREFIX}{i},{PASSWORD},{roles},").map_err(|e| e.to_string())?;
        }
    }
    let out = Command::new(&bin)
        .arg("--config")
        .arg(&cfg)
        .args(["platform", "import"])
        .arg(&csv)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(format!("platform import failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    eprintln!("[ours] {}", String::from_utf8_lossy(&out.stdout).trim());
    let log = std::fs::File::create(dir.join("serve.log")).map_err(|e| e.to_string())?;
    let child = Command::new(&bin)
        .arg("--config")
        .arg(&cfg)
        .arg("serve")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let pid = child.id();
    let srv = Server {
        name: "ours".into(),
        port,
        pid,
        ca: dir.join("data/tls/ca.pem"),
        version: format!("xmpp-grid {} ({})", env!("CARGO_PKG_VERSION"), bin.display()),
        kind: Kind::Ours { child, dir },
    };
    wait_port(port, Duration::from_secs(30), || Path::new(&format!("/proc/{pid}")).exists())?;
    Ok(srv)
}

fn start_peer(name: &str, opts: &Opts) -> Result<Server> {
    let script_dir = Path::new(PEERS).join(name);
    let state_dir = temp_dir("fanout", &format!("{name}-state"))?;
    let mut env = vec![("PEER_PORT".to_string(), free_port()?.to_string())];
    if name == "ejabberd" {
        env.push(("PEER_DIST_PORT".into(), free_port()?.to_string()));
    }
    eprintln!("[{name}] start.sh (PEER_AUTH=plain)");
    let out = Command::new(script_dir.join("start.sh"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("PEER_AUTH", "plain")
        .env("PEER_STATE_DIR", &state_dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{name} start.sh: {e}"))?;
    let state = parse_state(&state_dir.join(format!("peer-{name}.env")));
    let st = state.as_ref().ok();
    let get = |k: &str| st.and_then(|m| m.get(k)).cloned().unwrap_or_default();
    let srv = Server {
        name: name.into(),
        port: get("PORT").parse().unwrap_or(0),
        pid: get("PID").parse().unwrap_or(0),
        ca: PathBuf::from(get("CA")),
        version: get("VERSION"),
        kind: Kind::Peer { script_dir: script_dir.clone(), state_dir: state_dir.clone(), rundir: PathBuf::from(get("RUNDIR")), env: env.clone() },
    };
    if !out.status.success() || state.is_err() || srv.pid == 0 {
        let msg = format!("{name} start.sh failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
        if srv.pid == 0 {
            std::mem::forget(srv); // nothing recorded to stop
            let _ = std::fs::remove_dir_all(&state_dir);
        }
        return Err(msg);
    }
    // From here on `srv` is dropped (stopped) on any error.
    let n = opts.connections() + 1;
    let add = Command::new(script_dir.join("adduser.sh"))
        .args(["-n", &n.to_string()])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("PEER_AUTH", "plain")
        .env("PEER_STATE_DIR", &state_dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{name} adduser.sh: {e}"))?;
    if !add.status.success() {
        return Err(format!("{name} adduser.sh -n {n} failed: {}", String::from_utf8_lossy(&add.stderr)));
    }
    for l in String::from_utf8_lossy(&add.stderr).lines() {
        eprintln!("  {l}");
    }
    Ok(srv)
}

// ---------------------------------------------------------------- XMPP client (setup)

type Tls = tokio_rustls::client::TlsStream<TcpStream>;
/// Subscribers logged in and subscribed, by index, waiting for the measurement.
type Ready = Arc<Mutex<Vec<(usize, Xml<Tls>)>>>;

struct Connector {
    tls: tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
}

fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

impl Connector {
    /// STARTTLS, TLS, SASL PLAIN, bind.
    async fn login(&self, user: &str, resource: &str) -> Result<Xml<Tls>> {
        use base64::Engine as _;
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
        let name = rustls::pki_types::ServerName::try_from(DOMAIN).map_err(|e| e.to_string())?;
        let tls = tokio::time::timeout(STEP, self.tls.connect(name, c.io))
            .await
            .map_err(|_| "TLS handshake timeout".to_string())?
            .map_err(|e| format!("TLS: {e}"))?;
        let mut t = Xml { io: tls, buf: Vec::new() };
        t.send(HEADER).await?;
        let features = t.until("<stream:features", "</stream:features>").await?;
        if !features.contains(">PLAIN<") {
            return Err(format!("PLAIN not offered: {features}"));
        }
        let creds = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{PASSWORD}"));
        t.send(&format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{creds}</auth>")).await?;
        t.until("<success", ">").await?;
        t.send(HEADER).await?;
        t.until("<stream:features", "</stream:features>").await?;
        let bind = t
            .iq("b1", &format!("<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>"))
            .await?;
        if !bind.contains("<jid") {
            return Err(format!("bind failed: {bind}"));
        }
        Ok(t)
    }
}

fn create_node_iq(id: &str, node: &str) -> String {
    let field = |var: &str, v: &str| format!("<field var='{var}'><value>{v}</value></field>");
    format!(
        "<iq type='set' id='{id}' to='{BROKER}'><pubsub xmlns='http://jabber.org/protocol/pubsub'><create node='{node}'/>\
         <configure><x xmlns='jabber:x:data' type='submit'>\
         <field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/pubsub#node_config</value></field>{}{}{}\
         </x></configure></pubsub></iq>",
        field("pubsub#access_model", "open"),
        field("pubsub#type", IODEF_NS),
        field("pubsub#max_items", "1000"),
    )
}

/// A valid IODEF 2.0 document (RFC 7970: Incident with IncidentID, GenerationTime,
/// Description, Contact) padded to about `PAYLOAD_BYTES`, split around the marker's
/// `<run>.<seq>` so each publish only formats two numbers.
fn iodef_parts() -> (String, String) {
    let head = format!(
        "<IODEF-Document version='2.00' xml:lang='en' xmlns='{IODEF_NS}'>\
         <Incident purpose='reporting' restriction='green'>\
         <IncidentID name='csirt.grid.test'>{}",
        String::from_utf8_lossy(MARKER)
    );
    let tail_start = "</IncidentID><GenerationTime>2025-11-27T12:00:00Z</GenerationTime><Description>";
    let tail_end = "</Description><Contact role='creator' type='organization'><ContactName>Grid fan-out bench</ContactName>\
                    <Email><EmailTo>soc@grid.test</EmailTo></Email></Contact></Incident></IODEF-Document>";
    let fixed = head.len() + "00.000000".len() + tail_start.len() + tail_end.len();
    let filler = "Scan of 192.0.2.0/24 from 198.51.100.7 blocked at the perimeter. ";
    let pad: String = filler.chars().cycle().take(PAYLOAD_BYTES.saturating_sub(fixed)).collect();
    (head, format!("{tail_start}{pad}{tail_end}"))
}

fn publish_iq(node: &str, run: u32, seq: usize, parts: &(String, String)) -> String {
    format!(
        "<iq type='set' id='p{run}.{seq}' to='{BROKER}'><pubsub xmlns='http://jabber.org/protocol/pubsub'>\
         <publish node='{node}'><item id='r{run}.{seq}'>{}{run}.{seq}{}</item></publish></pubsub></iq>",
        parts.0, parts.1
    )
}

// ---------------------------------------------------------------- run state

/// What one timed run shares between the publisher and the subscribers.
struct Run {
    id: u32,
    /// Subscribers expected to receive every item.
    subs: usize,
    base: Instant,
    /// Write time of each publish, ns since `base` (0: not yet).
    sent_ns: Vec<AtomicU64>,
    delivered: Vec<AtomicU32>,
    /// Ack time of each publish, ns since `base` (0: not yet).
    ack_ns: Vec<AtomicU64>,
    /// Time of each publish's first and last delivery, ns since `base` (for `XG_BENCH_DUMP`).
    first_ns: Vec<AtomicU64>,
    done_ns: Vec<AtomicU64>,
    /// Items delivered to every subscriber.
    complete: AtomicUsize,
    acked: AtomicUsize,
    total: AtomicU64,
    last_ns: AtomicU64,
    progress: Notify,
    /// Latency samples in µs (open loop only).
    lat: Option<Mutex<Vec<u32>>>,
    /// Deliveries that were not expected (unknown seq, or beyond `subs`).
    odd: AtomicU64,
}

impl Run {
    fn new(id: u32, items: usize, subs: usize, latency: bool) -> Arc<Run> {
        Arc::new(Run {
            id,
            subs,
            base: Instant::now(),
            sent_ns: (0..items).map(|_| AtomicU64::new(0)).collect(),
            delivered: (0..items).map(|_| AtomicU32::new(0)).collect(),
            ack_ns: (0..items).map(|_| AtomicU64::new(0)).collect(),
            first_ns: (0..items).map(|_| AtomicU64::new(0)).collect(),
            done_ns: (0..items).map(|_| AtomicU64::new(0)).collect(),
            complete: AtomicUsize::new(0),
            acked: AtomicUsize::new(0),
            total: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
            progress: Notify::new(),
            lat: latency.then(|| Mutex::new(Vec::with_capacity(items * subs))),
            odd: AtomicU64::new(0),
        })
    }

    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn ack(&self, seq: usize) {
        if let Some(a) = self.ack_ns.get(seq)
            && a.load(Ordering::Relaxed) == 0
        {
            a.store(self.now_ns().max(1), Ordering::Relaxed);
            self.acked.fetch_add(1, Ordering::Relaxed);
        } else {
            self.odd.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Publish-to-ack times in µs of the first `n` publishes, sorted.
    fn ack_latencies(&self, n: usize) -> Vec<u32> {
        let mut v: Vec<u32> = (0..n.min(self.ack_ns.len()))
            .filter_map(|i| {
                let a = self.ack_ns[i].load(Ordering::Relaxed);
                (a > 0).then(|| (a.saturating_sub(self.sent_ns[i].load(Ordering::Relaxed)) / 1000) as u32)
            })
            .collect();
        v.sort_unstable();
        v
    }

    fn deliver(&self, seq: usize, now: u64) {
        let Some(d) = self.delivered.get(seq) else {
            self.odd.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let n = d.fetch_add(1, Ordering::Relaxed) + 1;
        if n as usize > self.subs {
            self.odd.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        self.last_ns.fetch_max(now, Ordering::Relaxed);
        if let Some(lat) = &self.lat {
            let sent = self.sent_ns[seq].load(Ordering::Relaxed);
            lat.lock().unwrap().push((now.saturating_sub(sent) / 1000).min(u32::MAX as u64) as u32);
        }
        if n == 1 {
            self.first_ns[seq].store(now, Ordering::Relaxed);
        }
        if n as usize == self.subs {
            self.done_ns[seq].store(now, Ordering::Relaxed);
            self.complete.fetch_add(1, Ordering::Relaxed);
            self.progress.notify_one();
        }
    }
}

/// State shared by every subscriber for the whole server's benchmark.
struct Shared {
    current: Mutex<Option<Arc<Run>>>,
    /// Subscribers whose stream ended, with what they last read.
    dead: Mutex<Vec<String>>,
    stop: AtomicBool,
}

/// A subscriber's read loop: decrypt, scan for markers, count. Runs until the stream
/// ends or `stop`. Parsing is a memmem for the marker plus two decimal numbers.
async fn subscriber(mut conn: Xml<Tls>, name: String, shared: Arc<Shared>) {
    let mut buf = std::mem::take(&mut conn.buf);
    buf.reserve(32 * 1024);
    let finder = memmem::Finder::new(MARKER);
    let mut run: Option<Arc<Run>> = None;
    loop {
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(16 * 1024);
        }
        let n = match conn.io.read_buf(&mut buf).await {
            Ok(0) | Err(_) if shared.stop.load(Ordering::Relaxed) => return,
            Ok(0) => {
                let tail = String::from_utf8_lossy(&buf[buf.len().saturating_sub(300)..]).into_owned();
                shared.dead.lock().unwrap().push(format!("{name}: stream closed by server; last bytes {tail:?}"));
                return;
            }
            Err(e) => {
                shared.dead.lock().unwrap().push(format!("{name}: read: {e}"));
                return;
            }
            Ok(n) => n,
        };
        let _ = n;
        let mut pos = 0;
        let mut keep_from = None;
        while let Some(i) = finder.find(&buf[pos..]) {
            let (run_id, seq, end) = match run_seq(&buf, pos + i + MARKER.len()) {
                Ok(x) => x,
                Err(None) => {
                    keep_from = Some(pos + i);
                    break;
                }
                Err(Some(j)) => {
                    pos = j;
                    continue;
                }
            };
            pos = end;
            if run.as_ref().map(|r| r.id as u64) != Some(run_id) {
                run = shared.current.lock().unwrap().clone();
            }
            if let Some(r) = &run
                && r.id as u64 == run_id
            {
                r.deliver(seq as usize, r.now_ns());
            }
        }
        let keep = keep_from.unwrap_or_else(|| buf.len().saturating_sub(MARKER.len() - 1).max(pos));
        buf.drain(..keep);
    }
}

/// The publisher's read side: counts IQ results (acks); an error reply ends the run.
/// `<run>.<seq>` at `buf[at..]`: the numbers and where they end, `Err(None)` if the
/// buffer ends first, `Err(Some(i))` if it is not that shape (resume at `i`).
fn run_seq(buf: &[u8], at: usize) -> std::result::Result<(u64, u64, usize), Option<usize>> {
    let mut j = at;
    let num = |j: &mut usize| {
        let mut v: u64 = 0;
        while *j < buf.len() && buf[*j].is_ascii_digit() {
            v = v.wrapping_mul(10).wrapping_add((buf[*j] - b'0') as u64);
            *j += 1;
        }
        v
    };
    let run = num(&mut j);
    match buf.get(j) {
        None => return Err(None),
        Some(b'.') => j += 1,
        Some(_) => return Err(Some(j)),
    }
    let seq = num(&mut j);
    if j >= buf.len() { Err(None) } else { Ok((run, seq, j)) }
}

/// The publisher's read side: each result to `p<run>.<seq>` acknowledges that publish;
/// an error reply ends the run.
async fn ack_reader<R: AsyncRead + Unpin>(mut rd: R, mut buf: Vec<u8>, shared: Arc<Shared>, errors: Arc<Mutex<Option<String>>>) {
    let ids = [memmem::Finder::new(b"id='p"), memmem::Finder::new(b"id=\"p")];
    let errs = [memmem::Finder::new(b"type='error'"), memmem::Finder::new(b"type=\"error\"")];
    let mut run: Option<Arc<Run>> = None;
    loop {
        if errs.iter().any(|f| f.find(&buf).is_some()) {
            errors.lock().unwrap().get_or_insert(format!("publish error: {}", String::from_utf8_lossy(&buf)));
            if let Some(r) = shared.current.lock().unwrap().clone() {
                r.progress.notify_one();
            }
        }
        let mut pos = 0;
        let mut incomplete = None;
        let mut acked = false;
        for f in &ids {
            let mut from = 0;
            while let Some(i) = f.find(&buf[from..]).map(|i| i + from) {
                match run_seq(&buf, i + f.needle().len()) {
                    Err(None) => {
                        incomplete = Some(incomplete.map_or(i, |x: usize| x.min(i)));
                        break;
                    }
                    Err(Some(j)) => from = j,
                    Ok((r, seq, end)) => {
                        from = end;
                        pos = pos.max(end);
                        if run.as_ref().map(|x| x.id as u64) != Some(r) {
                            run = shared.current.lock().unwrap().clone();
                        }
                        if let Some(x) = &run
                            && x.id as u64 == r
                        {
                            x.ack(seq as usize);
                            acked = true;
                        }
                    }
                }
            }
        }
        if acked && let Some(r) = &run {
            r.progress.notify_one();
        }
        let keep = incomplete.unwrap_or_else(|| buf.len().saturating_sub(5).max(pos));
        buf.drain(..keep);
        if buf.capacity() - buf.len() < 8192 {
            buf.reserve(8192);
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => {
                if !shared.stop.load(Ordering::Relaxed) {
                    errors.lock().unwrap().get_or_insert("publisher stream closed by server".into());
                    if let Some(r) = shared.current.lock().unwrap().clone() {
                        r.progress.notify_one();
                    }
                }
                return;
            }
            Ok(_) => {}
        }
    }
}

// ---------------------------------------------------------------- measurements

struct Closed {
    /// Items published (fewer than asked if the run hit `--closed-secs`).
    items: usize,
    rate: f64,
    secs: f64,
    server_cpu: f64,
    gen_cpu: f64,
    acks_secs: f64,
    /// Server write system calls per delivery.
    writes_per_delivery: f64,
}

struct Open {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    samples: usize,
    /// Deliveries still missing `--drain-secs` after a saturated run.
    missing: usize,
    /// Publish-to-ack (IQ result) latency: the server's publish path including its store.
    ack_p50_ms: f64,
    ack_p99_ms: f64,
    /// Publishes sent / (first publish .. last delivery); the worst lag behind schedule.
    sustained_rate: f64,
    max_lag_ms: f64,
    /// Seconds into the run when the server fell behind and publishing stopped.
    saturated: Option<f64>,
    /// First publish .. everything delivered and acknowledged.
    wall: f64,
    writes_per_delivery: f64,
    server_cpu: f64,
    gen_cpu: f64,
}

struct Publisher {
    wr: tokio::io::WriteHalf<Tls>,
    errors: Arc<Mutex<Option<String>>>,
}

impl Publisher {
    fn check(&self) -> Result<()> {
        match self.errors.lock().unwrap().clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn check_dead(shared: &Shared) -> Result<()> {
    let dead = shared.dead.lock().unwrap();
    if dead.is_empty() { Ok(()) } else { Err(format!("{} subscriber stream(s) ended; first: {}", dead.len(), dead[0])) }
}

async fn closed_run(
    p: &mut Publisher,
    shared: &Arc<Shared>,
    pid: u32,
    run_id: u32,
    opts: &Opts,
    items: usize,
    parts: &(String, String),
) -> Result<Closed> {
    let run = Run::new(run_id, items, opts.subs, false);
    *shared.current.lock().unwrap() = Some(run.clone());
    let cpu0 = (proc_cpu(pid).unwrap_or(0.0), self_cpu());
    let w0 = proc_syscw(pid);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(opts.run_secs);
    let mut first_ns = None;
    let mut sent = 0;
    let mut stanza = String::with_capacity(2048);
    let budget = tokio::time::Instant::now() + Duration::from_secs(opts.closed_secs);
    let mut items = items;
    while sent < items || run.total.load(Ordering::Relaxed) < (sent * opts.subs) as u64 || run.acked.load(Ordering::Relaxed) < sent {
        if sent < items && tokio::time::Instant::now() >= budget {
            items = sent; // slow server: measure what was published so far
        }
        p.check()?;
        check_dead(shared)?;
        let done = if opts.until_delivered {
            run.complete.load(Ordering::Relaxed).min(run.acked.load(Ordering::Relaxed))
        } else {
            run.acked.load(Ordering::Relaxed)
        };
        if sent < items && sent - done.min(sent) < opts.window {
            // Fill the window in one write.
            stanza.clear();
            let first = sent;
            while sent < items && sent - done.min(sent) < opts.window {
                stanza.push_str(&publish_iq("fanout", run_id, sent, parts));
                sent += 1;
            }
            let now = run.now_ns();
            first_ns.get_or_insert(now);
            p.wr.write_all(stanza.as_bytes()).await.map_err(|e| format!("publish: {e}"))?;
            p.wr.flush().await.map_err(|e| format!("publish: {e}"))?;
            for s in first..sent {
                run.sent_ns[s].store(now, Ordering::Relaxed);
            }
            continue;
        }
        if tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + Duration::from_secs(1)), run.progress.notified())
            .await
            .is_err()
            && tokio::time::Instant::now() >= deadline
        {
            return Err(format!(
                "run {run_id}: over {} s: {sent} sent, {} acked, {} of {} deliveries",
                opts.run_secs,
                run.acked.load(Ordering::Relaxed),
                run.total.load(Ordering::Relaxed),
                sent * opts.subs
            ));
        }
    }
    let want = (sent * opts.subs) as u64;
    let end_ns = run.last_ns.load(Ordering::Relaxed);
    let secs = (end_ns - first_ns.unwrap_or(0)) as f64 / 1e9;
    let acks_secs = run.now_ns().saturating_sub(first_ns.unwrap_or(0)) as f64 / 1e9;
    let cpu1 = (proc_cpu(pid).unwrap_or(0.0), self_cpu());
    let odd = run.odd.load(Ordering::Relaxed);
    if odd > 0 {
        eprintln!("  {odd} unexpected deliveries (duplicates?)");
    }
    let writes_per_delivery = proc_syscw(pid).saturating_sub(w0) as f64 / want.max(1) as f64;
    Ok(Closed { items: sent, rate: want as f64 / secs, secs, server_cpu: cpu1.0 - cpu0.0, gen_cpu: cpu1.1 - cpu0.1, acks_secs, writes_per_delivery })
}

/// Publishes at a fixed rate; every delivery's latency is recorded. A server that
/// cannot keep up (a quarter second of publishes unacknowledged, or our writes blocked
/// for as long) is marked saturated: publishing stops there and what was sent gets
/// `--drain-secs` to arrive; deliveries still missing then count as infinitely late.
async fn open_run(p: &mut Publisher, shared: &Arc<Shared>, pid: u32, run_id: u32, opts: &Opts, secs: u64, parts: &(String, String)) -> Result<Open> {
    let items = (opts.rate * secs) as usize;
    let run = Run::new(run_id, items, opts.lat_subs, true);
    *shared.current.lock().unwrap() = Some(run.clone());
    let cpu0 = (proc_cpu(pid).unwrap_or(0.0), self_cpu());
    let w0 = proc_syscw(pid);
    let interval_ns = 1_000_000_000 / opts.rate;
    let backlog_max = (opts.rate as usize / 4).max(10);
    let start = tokio::time::Instant::now();
    let first_ns = run.now_ns();
    let mut max_lag = Duration::ZERO;
    let mut saturated = None;
    let mut stanza = String::with_capacity(2048);
    let mut sent = 0;
    while sent < items {
        let at = start + Duration::from_nanos(interval_ns * sent as u64);
        tokio::time::sleep_until(at).await;
        let lag = tokio::time::Instant::now().saturating_duration_since(at);
        max_lag = max_lag.max(lag);
        p.check()?;
        if sent - run.acked.load(Ordering::Relaxed).min(sent) > backlog_max || lag > Duration::from_millis(250) {
            saturated = Some(start.elapsed().as_secs_f64());
            break;
        }
        stanza.clear();
        stanza.push_str(&publish_iq("latency", run_id, sent, parts));
        run.sent_ns[sent].store(run.now_ns(), Ordering::Relaxed);
        p.wr.write_all(stanza.as_bytes()).await.map_err(|e| format!("publish: {e}"))?;
        p.wr.flush().await.map_err(|e| format!("publish: {e}"))?;
        sent += 1;
    }
    let want = (sent * opts.lat_subs) as u64;
    let drain = if saturated.is_some() { opts.drain_secs } else { opts.run_secs };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(drain);
    while run.total.load(Ordering::Relaxed) < want || run.acked.load(Ordering::Relaxed) < sent {
        p.check()?;
        check_dead(shared)?;
        if tokio::time::Instant::now() >= deadline {
            if saturated.is_some() {
                break;
            }
            return Err(format!(
                "latency run {run_id}: {} of {want} deliveries, {} of {sent} acks after {} s",
                run.total.load(Ordering::Relaxed),
                run.acked.load(Ordering::Relaxed),
                opts.run_secs
            ));
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), run.progress.notified()).await;
    }
    // What never arrived counts as later than anything that did.
    let missing = want.saturating_sub(run.total.load(Ordering::Relaxed)) as usize;
    let wall = start.elapsed().as_secs_f64();
    let writes = proc_syscw(pid).saturating_sub(w0);
    let cpu1 = (proc_cpu(pid).unwrap_or(0.0), self_cpu());
    let mut lat = std::mem::take(&mut *run.lat.as_ref().unwrap().lock().unwrap());
    lat.sort_unstable();
    let n = lat.len() + missing;
    let pct = |q: f64| pct_of(&lat, n, q);
    let acks = run.ack_latencies(sent);
    // For diagnosis: XG_BENCH_DUMP=DIR writes each publish's send and ack times (ms).
    if let Ok(dir) = std::env::var("XG_BENCH_DUMP") {
        let mut out = String::from("seq sent_ms ack_ms first_ms last_ms\n");
        let ms = |v: &AtomicU64| v.load(Ordering::Relaxed) as f64 / 1e6;
        for i in 0..sent {
            let (s, a, f, l) = (ms(&run.sent_ns[i]), ms(&run.ack_ns[i]), ms(&run.first_ns[i]), ms(&run.done_ns[i]));
            out.push_str(&format!("{i} {s:.3} {a:.3} {f:.3} {l:.3}\n"));
        }
        let _ = std::fs::write(Path::new(&dir).join(format!("acks-run{run_id}.txt")), out);
    }
    let busy_secs = (run.last_ns.load(Ordering::Relaxed).saturating_sub(first_ns)) as f64 / 1e9;
    Ok(Open {
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        max_ms: if missing > 0 { f64::INFINITY } else { lat.last().copied().unwrap_or(0) as f64 / 1e3 },
        samples: lat.len(),
        missing,
        ack_p50_ms: pct_of(&acks, sent, 0.5),
        ack_p99_ms: pct_of(&acks, sent, 0.99),
        sustained_rate: sent as f64 / busy_secs.max(1e-9),
        max_lag_ms: max_lag.as_secs_f64() * 1e3,
        saturated,
        wall,
        writes_per_delivery: writes as f64 / run.total.load(Ordering::Relaxed).max(1) as f64,
        server_cpu: cpu1.0 - cpu0.0,
        gen_cpu: cpu1.1 - cpu0.1,
    })
}

// ---------------------------------------------------------------- driver

struct Report {
    name: String,
    version: String,
    tls: String,
    setup_secs: f64,
    closed: Vec<Closed>,
    open: Vec<Open>,
    rss_kib: u64,
}

async fn bench_server(srv: &Server, opts: &Opts, shared: &Arc<Shared>) -> Result<Report> {
    let conn = Arc::new(Connector {
        tls: tokio_rustls::TlsConnector::from(client_config(&srv.ca)?),
        addr: format!("127.0.0.1:{}", srv.port).parse().map_err(|e| format!("{e}"))?,
    });
    let t0 = Instant::now();
    // Publisher = platform1; it creates both topics.
    let mut publ = conn.login(&format!("{PREFIX}1"), "pub").await.map_err(|e| format!("publisher login: {e}"))?;
    let tls = {
        let c = publ.io.get_ref().1;
        format!("{:?} {:?}", c.protocol_version().unwrap(), c.negotiated_cipher_suite().map(|c| c.suite()).unwrap())
    };
    for (id, node, n) in [("c1", "fanout", opts.subs), ("c2", "latency", opts.lat_subs)] {
        if n > 0 {
            publ.iq(id, &create_node_iq(id, node)).await.map_err(|e| format!("create {node}: {e}"))?;
        }
    }
    // Subscribers platform2..: login, presence, subscribe (bare JID).
    let n = opts.connections();
    eprintln!("[{}] {n} subscribers logging in ({} in flight)", srv.name, opts.setup_concurrency);
    let next = Arc::new(AtomicUsize::new(0));
    let ready: Ready = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let mut tasks = Vec::new();
    for _ in 0..opts.setup_concurrency.min(n) {
        let (conn, next, ready, opts) = (conn.clone(), next.clone(), ready.clone(), opts.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<(), String>(());
                }
                let jid = format!("{PREFIX}{}@{DOMAIN}", i + 2);
                let mut c = conn.login(&format!("{PREFIX}{}", i + 2), "sub").await.map_err(|e| format!("{jid}: {e}"))?;
                c.send("<presence/>").await?;
                for (node, k) in [("fanout", opts.subs), ("latency", opts.lat_subs)] {
                    if i < k {
                        let r = c
                            .iq(
                                "s1",
                                &format!(
                                    "<iq type='set' id='s1' to='{BROKER}'><pubsub xmlns='http://jabber.org/protocol/pubsub'>\
                                     <subscribe node='{node}' jid='{jid}'/></pubsub></iq>"
                                ),
                            )
                            .await
                            .map_err(|e| format!("{jid} subscribe {node}: {e}"))?;
                        if !r.contains("subscribed") {
                            return Err(format!("{jid} subscribe {node}: {r}"));
                        }
                    }
                }
                ready.lock().unwrap().push((i, c));
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let setup_secs = t0.elapsed().as_secs_f64();
    eprintln!("[{}] {n} subscribers ready in {setup_secs:.1} s; server RSS {} KiB", srv.name, rss_kib(srv.pid).unwrap_or(0));
    let subs = std::mem::take(&mut *ready.lock().unwrap());
    let mut handles = Vec::with_capacity(subs.len());
    for (i, c) in subs {
        handles.push(tokio::spawn(subscriber(c, format!("{PREFIX}{}", i + 2), shared.clone())));
    }
    let (rd, wr) = tokio::io::split(publ.io);
    let errors = Arc::new(Mutex::new(None));
    let acker = tokio::spawn(ack_reader(rd, publ.buf, shared.clone(), errors.clone()));
    let mut p = Publisher { wr, errors };
    let parts = iodef_parts();
    eprintln!(
        "[{}] item stanza {} bytes, IODEF payload {} bytes",
        srv.name,
        publish_iq("fanout", 1, 1, &parts).len(),
        parts.0.len() + parts.1.len() + 3
    );
    let mut rep = Report { name: srv.name.clone(), version: srv.version.clone(), tls, setup_secs, closed: Vec::new(), open: Vec::new(), rss_kib: 0 };
    let mut run_id = 0;
    let result = async {
        if opts.subs > 0 {
            run_id += 1;
            let w = closed_run(&mut p, shared, srv.pid, run_id, opts, (opts.items / 10).max(1), &parts).await?;
            eprintln!("[{}] closed-loop warm-up: {:.0} deliveries/s", srv.name, w.rate);
            for r in 0..opts.runs {
                run_id += 1;
                let c = closed_run(&mut p, shared, srv.pid, run_id, opts, opts.items, &parts).await?;
                eprintln!(
                    "[{}] closed run {}: {} items, {:.0} deliveries/s ({:.2} s; acks done at {:.2} s), server CPU {:.2} s, generator CPU {:.2} s, \
                     {:.2} server writes/delivery",
                    srv.name,
                    r + 1,
                    c.items,
                    c.rate,
                    c.secs,
                    c.acks_secs,
                    c.server_cpu,
                    c.gen_cpu,
                    c.writes_per_delivery
                );
                rep.closed.push(c);
            }
        }
        if opts.lat_subs > 0 {
            run_id += 1;
            let w = open_run(&mut p, shared, srv.pid, run_id, opts, 2, &parts).await?;
            eprintln!(
                "[{}] open-loop warm-up: p50 {:.2} ms p99 {:.2} ms{}",
                srv.name,
                w.p50_ms,
                w.p99_ms,
                if w.saturated.is_some() { " SATURATED" } else { "" }
            );
            // A saturated server still works off its backlog: no timed run would be
            // clean, and the warm-up already shows the overload. It is the result.
            let mut pending = if w.saturated.is_some() { vec![w] } else { Vec::new() };
            for r in 0..opts.runs {
                let o = match pending.pop() {
                    Some(o) => o,
                    None => {
                        run_id += 1;
                        open_run(&mut p, shared, srv.pid, run_id, opts, opts.lat_secs, &parts).await?
                    }
                };
                eprintln!(
                    "[{}] open run {}: {} deliveries ({} missing), p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; ack p50 {:.2} ms p99 {:.2} ms; sustained {:.0} publishes/s (max lag {:.1} ms){}, \
                     server CPU {:.2} s, generator CPU {:.2} s in {:.1} s, {:.2} server writes/delivery",
                    srv.name,
                    r + 1,
                    o.samples,
                    o.missing,
                    o.p50_ms,
                    o.p99_ms,
                    o.max_ms,
                    o.ack_p50_ms,
                    o.ack_p99_ms,
                    o.sustained_rate,
                    o.max_lag_ms,
                    o.saturated.map(|t| format!(", SATURATED after {t:.2} s")).unwrap_or_default(),
                    o.server_cpu,
                    o.gen_cpu,
                    o.wall,
                    o.writes_per_delivery
                );
                let saturated = o.saturated.is_some();
                rep.open.push(o);
                if saturated {
                    eprintln!("[{}] saturated at {} publishes/s: no further open-loop runs", srv.name, opts.rate);
                    break;
                }
            }
        }
        Ok::<(), String>(())
    }
    .await;
    rep.rss_kib = rss_kib(srv.pid).unwrap_or(0);
    shared.stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = p.wr.write_all(b"</stream:stream>").await;
        let _ = p.wr.shutdown().await;
    })
    .await;
    acker.abort();
    for h in handles {
        h.abort();
    }
    result.map(|()| rep)
}

async fn run_one(name: &str, opts: &Opts) -> Result<Report> {
    let o = opts.clone();
    let n = name.to_string();
    // Starting is blocking (scripts, import): off the runtime thread.
    let srv = tokio::task::spawn_blocking(move || if n == "ours" { start_ours(&o) } else { start_peer(&n, &o) })
        .await
        .map_err(|e| e.to_string())??;
    eprintln!("[{name}] pid {} on 127.0.0.1:{} ({}), RSS {} KiB", srv.pid, srv.port, srv.version, rss_kib(srv.pid).unwrap_or(0));
    let shared = Arc::new(Shared { current: Mutex::new(None), dead: Mutex::new(Vec::new()), stop: AtomicBool::new(false) });
    let r = match tokio::time::timeout(Duration::from_secs(opts.max_secs), bench_server(&srv, opts, &shared)).await {
        Ok(r) => r,
        Err(_) => Err(format!("{name}: over --max-secs {}", opts.max_secs)),
    };
    shared.stop.store(true, Ordering::Relaxed);
    // Let the closed connections go before the server stops (quieter logs).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = tokio::task::spawn_blocking(move || drop(srv)).await;
    r
}

/// Quantile `q` in ms of sorted µs samples out of `n` expected (missing ones: infinite).
fn pct_of(sorted_us: &[u32], n: usize, q: f64) -> f64 {
    sorted_us.get(((n as f64 * q) as usize).min(n.saturating_sub(1))).map_or(f64::INFINITY, |&v| v as f64 / 1e3)
}

/// Milliseconds for the table; infinite = some deliveries never arrived.
fn ms(v: f64) -> String {
    if v.is_finite() { format!("{v:.2}") } else { "∞ (undelivered)".into() }
}

fn print_table(reps: &[Report], opts: &Opts) {
    println!();
    if opts.subs > 0 {
        println!(
            "Closed loop: 1 publisher, {} subscribers, {} items of {PAYLOAD_BYTES} B IODEF, window {} (until {}), median of {} runs",
            opts.subs,
            opts.items,
            opts.window,
            if opts.until_delivered { "delivered" } else { "ack" },
            opts.runs
        );
        println!(
            "| server | deliveries/s | runs | items/run | wall s/run | server CPU s/run | server CPU µs/delivery | server writes/delivery | generator CPU s/run |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        for r in reps.iter().filter(|r| !r.closed.is_empty()) {
            let med = |f: fn(&Closed) -> f64| median(r.closed.iter().map(f).collect());
            println!(
                "| {} | {:.0} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                r.name,
                med(|c| c.rate),
                r.closed.iter().map(|c| format!("{:.0}", c.rate)).collect::<Vec<_>>().join(", "),
                r.closed.iter().map(|c| c.items.to_string()).collect::<Vec<_>>().join(", "),
                med(|c| c.secs),
                med(|c| c.server_cpu),
                median(r.closed.iter().map(|c| c.server_cpu * 1e6 / (c.items * opts.subs) as f64).collect()),
                med(|c| c.writes_per_delivery),
                med(|c| c.gen_cpu),
            );
        }
    }
    if opts.lat_subs > 0 {
        println!();
        println!(
            "Open loop: {} subscribers, {} publishes/s for {} s ({} deliveries/run), median of {} runs",
            opts.lat_subs,
            opts.rate,
            opts.lat_secs,
            opts.rate as usize * opts.lat_secs as usize * opts.lat_subs,
            opts.runs
        );
        println!("| server | p50 ms | p99 ms | max ms | p99 of runs | ack p50 / p99 ms | sustained publishes/s | server CPU % | generator CPU % |");
        println!("|---|---|---|---|---|---|---|---|---|");
        for r in reps.iter().filter(|r| !r.open.is_empty()) {
            let med = |f: fn(&Open) -> f64| median(r.open.iter().map(f).collect());
            let sat = r.open.iter().filter(|o| o.saturated.is_some()).count();
            println!(
                "| {} | {} | {} | {} | {} | {} / {} | {:.0}{} | {:.0} | {:.0} |",
                r.name,
                ms(med(|o| o.p50_ms)),
                ms(med(|o| o.p99_ms)),
                ms(med(|o| o.max_ms)),
                r.open.iter().map(|o| ms(o.p99_ms)).collect::<Vec<_>>().join(", "),
                ms(med(|o| o.ack_p50_ms)),
                ms(med(|o| o.ack_p99_ms)),
                med(|o| o.sustained_rate),
                if sat > 0 { format!(" (saturated in {sat} of {} runs)", r.open.len()) } else { String::new() },
                median(r.open.iter().map(|o| o.server_cpu * 100.0 / o.wall).collect()),
                median(r.open.iter().map(|o| o.gen_cpu * 100.0 / o.wall).collect())
            );
        }
    }
    println!();
    for r in reps {
        println!("- {}: {}; {}; setup {:.1} s; server RSS at end {} KiB", r.name, r.version, r.tls, r.setup_secs, r.rss_kib);
    }
    let rate = |r: &Report| median(r.closed.iter().map(|c| c.rate).collect());
    let p99 = |r: &Report| median(r.open.iter().map(|o| o.p99_ms).collect());
    if let Some(o) = reps.iter().find(|r| r.name == "ours") {
        let peers: Vec<&Report> = reps.iter().filter(|r| r.name != "ours").collect();
        let best = peers.iter().filter(|r| !r.closed.is_empty()).map(|r| rate(r)).fold(0.0, f64::max);
        if best > 0.0 && !o.closed.is_empty() {
            let x = rate(o) / best;
            println!("target: ours / faster peer deliveries/s = {x:.2}x (>= 3x): {}", if x >= 3.0 { "met" } else { "MISSED" });
        }
        if !o.open.is_empty() {
            let mine = p99(o);
            let below_peers = peers.iter().filter(|r| !r.open.is_empty()).all(|r| mine < p99(r));
            println!(
                "target: ours p99 {mine:.2} ms (< 2 ms and below both peers): {}",
                if mine < 2.0 && below_peers && peers.iter().filter(|r| !r.open.is_empty()).count() == 2 {
                    "met"
                } else if mine < 2.0 && below_peers {
                    "met against the peers measured"
                } else {
                    "MISSED"
                }
            );
        }
    }
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("fanout: {e}");
            std::process::exit(2);
        }
    };
    let nofile = raise_nofile();
    let need = opts.connections() + 100;
    if (nofile as usize) < need {
        eprintln!("fanout: open-files limit {nofile} is below the {need} needed");
        std::process::exit(2);
    }
    eprintln!("fanout: RLIMIT_NOFILE {nofile}; load average {}", loadavg());
    // The generator shares the machine with the server: one thread.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let failed = rt.block_on(async {
        let (reps, failed) = each_server("fanout", &opts.servers, |name| run_one(name, &opts)).await;
        print_table(&reps, &opts);
        failed
    });
    eprintln!("fanout: load average at end {}", loadavg());
    rt.shutdown_timeout(Duration::from_secs(5));
    std::process::exit(if failed { 1 } else { 0 });
}
