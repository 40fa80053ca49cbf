//! Interoperability tests: XMPP clients nobody here wrote, run as subprocesses
//! against the controller started in-process (RFC 6120 negotiation, SASL, routing).
//!
//! Needs these Debian packages (the CI script installs them):
//!   python3-slixmpp (1.8.3), python3-aioxmpp (0.13.3), go-sendxmpp (0.5.6), openssl.
//! xmppc is installed too but not used: it has no option for a server host or port
//! (it resolves the JID's domain), so it cannot reach an ephemeral 127.0.0.1 port.
//! The Python client scripts are in tests/interop/ and run with /usr/bin/python3.
//!
//! Every client runs under a deadline (the scripts' own and `CLIENT_DEADLINE`
//! here), so a hang fails the test instead of stalling it. The runtime has two
//! workers so that waiting on a child never starves the server.

mod common;

use base64::Engine as _;
use common::*;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Longest any one client subprocess may run before the test fails.
const CLIENT_DEADLINE: Duration = Duration::from_secs(30);

/// What a finished client did.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Display for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {:?}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

/// Runs `cmd` with `stdin` fed to it; kills it and panics after `CLIENT_DEADLINE`.
async fn run(mut cmd: tokio::process::Command, stdin: &str) -> Ran {
    use tokio::io::AsyncWriteExt;
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let shown = format!("{cmd:?}");
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {shown}: {e} (see the package list atop tests/interop.rs)"));
    let mut input = child.stdin.take().unwrap();
    // A client that exits without reading its input is judged by its exit code.
    let _ = input.write_all(stdin.as_bytes()).await;
    drop(input);
    match tokio::time::timeout(CLIENT_DEADLINE, child.wait_with_output()).await {
        Ok(out) => {
            let out = out.unwrap();
            Ran {
                code: out.status.code(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        }
        // Dropping the future drops the child, which kills it (kill_on_drop).
        Err(_) => panic!("{shown} still running after {CLIENT_DEADLINE:?}"),
    }
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop").join(name)
}

/// `/usr/bin/python3 tests/interop/<name> --port .. --ca ..` plus `args`.
fn python(g: &TestGrid, name: &str, port: u16, args: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("/usr/bin/python3");
    // No __pycache__ in the source tree from importing gridclient.py.
    c.env("PYTHONDONTWRITEBYTECODE", "1");
    c.arg(script(name)).arg("--port").arg(port.to_string()).arg("--ca").arg(g.ca_path()).args(args);
    c
}

/// Server log lines (tracing, all tests of this binary) kept in memory, so that a
/// test can check which SASL mechanism the server saw. Users are unique per test.
static LOG: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        LOG.get().unwrap().lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the in-memory log as the global subscriber, once per test binary.
fn capture_server_log() {
    if LOG.set(Mutex::new(Vec::new())).is_ok() {
        let _ = tracing_subscriber::fmt().with_ansi(false).with_max_level(tracing::Level::INFO).with_writer(|| LogWriter).try_init();
    }
}

/// Server log lines mentioning `who`.
fn server_log(who: &str) -> Vec<String> {
    let log = LOG.get().map(|l| String::from_utf8_lossy(&l.lock().unwrap()).into_owned()).unwrap_or_default();
    log.lines().filter(|l| l.contains(who)).map(str::to_owned).collect()
}

/// The mechanisms the server logged for `jid`'s successful logins, in order.
fn logged_mechanisms(jid: &str) -> Vec<String> {
    server_log(&format!("jid={jid} "))
        .iter()
        .filter(|l| l.contains(": login peer="))
        .filter_map(|l| l.split("mechanism=").nth(1))
        .map(|m| m.split_whitespace().next().unwrap_or("").trim_matches('"').to_string())
        .collect()
}

/// Starts a grid with the server log captured.
async fn grid(name: &str) -> TestGrid {
    capture_server_log();
    start(name, |_| {}).await
}

// ---- slixmpp: each SASL mechanism, bind, a message with the right `from` ----

/// slixmpp sender `user` logs in with `mech`, sends to `user`-rx. `--no-cb` hides
/// tls-unique from slixmpp's SCRAM, which would otherwise send the gs2 flag "y" and
/// be refused (see `slixmpp_defaults_try_plus_then_scram_y_and_are_refused`).
async fn slixmpp_message_with(name: &str, user: &str, mech: &str) {
    let g = grid(name).await;
    let rx = format!("{user}-rx");
    g.add(user, "s3cret-tx");
    g.add(&rx, "s3cret-rx");
    let (tx_jid, rx_jid) = (format!("{user}@grid.test"), format!("{rx}@grid.test"));
    let cmd = python(&g, "slix_message.py", g.starttls.port(), &[
        "--sender", &tx_jid, "--sender-password", "s3cret-tx",
        "--receiver", &rx_jid, "--receiver-password", "s3cret-rx",
        "--mech", mech, "--no-cb",
    ]);
    let r = run(cmd, "").await;
    assert!(r.ok(), "{r}");
    assert!(r.stdout.contains(&format!("sender: refused mechanisms [] ([]), logged in with {mech} as {tx_jid}/")), "{r}");
    assert!(r.stdout.contains(&format!("from {tx_jid}/")), "{r}");
    // The server's side of the story: the mechanism it logged for this platform.
    assert_eq!(logged_mechanisms(&tx_jid), [mech]);
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slixmpp_scram_sha_256_login_and_message() {
    slixmpp_message_with("ix-sha256", "slix256", "SCRAM-SHA-256").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slixmpp_scram_sha_1_login_and_message() {
    slixmpp_message_with("ix-sha1", "slix1", "SCRAM-SHA-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slixmpp_plain_login_and_message() {
    slixmpp_message_with("ix-plain", "slixplain", "PLAIN").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slixmpp_external_with_a_client_certificate() {
    let g = grid("ix-external").await;
    g.add("slixcert", ""); // certificate-only platform
    g.add("slixcert-rx", "s3cret-rx");
    let issued = xmpp_grid::pki::issue_client_cert(&g.grid.cfg.tls_dir(), "slixcert@grid.test", 30).unwrap();
    let (cert, key) = (g.dir.join("slixcert.pem"), g.dir.join("slixcert.key"));
    std::fs::write(&cert, &issued.cert_pem).unwrap();
    std::fs::write(&key, &issued.key_pem).unwrap();
    // No --mech: slixmpp ranks EXTERNAL first once the server offers it.
    let cmd = python(&g, "slix_message.py", g.starttls.port(), &[
        "--sender", "slixcert@grid.test", "--certfile", cert.to_str().unwrap(), "--keyfile", key.to_str().unwrap(),
        "--receiver", "slixcert-rx@grid.test", "--receiver-password", "s3cret-rx",
    ]);
    let r = run(cmd, "").await;
    assert!(r.ok(), "{r}");
    assert!(r.stdout.contains("sender: refused mechanisms [] ([]), logged in with EXTERNAL as slixcert@grid.test/"), "{r}");
    assert!(r.stdout.contains("from slixcert@grid.test/"), "{r}");
    assert_eq!(logged_mechanisms("slixcert@grid.test"), ["EXTERNAL"]);
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slixmpp_defaults_fall_back_from_tls_unique_to_scram_sha_256() {
    // slixmpp 1.8.3 unmodified: it ranks SCRAM-SHA-256-PLUS first and binds to
    // tls-unique, the only type Python's ssl module exports; we offer tls-exporter
    // and tls-server-end-point (XEP-0440), so that is refused, and so is
    // SCRAM-SHA-1-PLUS. It then tries SCRAM-SHA-256 with the gs2 flag "y". RFC 5802
    // section 6 makes "y" a downgrade signal when the server binds; but this client
    // saw -PLUS offered on this very connection (it just tried it), so nothing was
    // stripped: the server accepts, and the login uses SCRAM-SHA-256.
    let g = grid("ix-defaults").await;
    g.add("slixdef", "s3cret");
    g.add("slixdef-rx", "s3cret-rx");
    let cmd = python(&g, "slix_message.py", g.starttls.port(), &[
        "--sender", "slixdef@grid.test", "--sender-password", "s3cret",
        "--receiver", "slixdef-rx@grid.test", "--receiver-password", "s3cret-rx",
    ]);
    let r = run(cmd, "").await;
    assert!(r.ok(), "{r}");
    assert!(r.stdout.contains("logged in with SCRAM-SHA-256"), "{r}");
    assert_eq!(logged_mechanisms("slixdef@grid.test"), ["SCRAM-SHA-256"]);

    // Forcing plain SCRAM-SHA-256 straight away with "y" (no -PLUS attempt before):
    // that is what a stripped mechanism list looks like, and it is refused.
    let cmd = python(&g, "slix_login_fails.py", g.starttls.port(), &["--jid", "slixdef@grid.test", "--password", "s3cret", "--mech", "SCRAM-SHA-256"]);
    let r = run(cmd, "").await;
    assert!(r.ok(), "{r}");
    g.shutdown().await;
}

// ---- slixmpp: wrong credentials fail cleanly ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slixmpp_wrong_password_or_unknown_user_is_refused_cleanly() {
    let g = grid("ix-wrong").await;
    g.add("slixwrong", "right");
    for (jid, mech) in [("slixwrong@grid.test", "SCRAM-SHA-256"), ("slixwrong@grid.test", "PLAIN"), ("nobody@grid.test", "SCRAM-SHA-1")] {
        let started = std::time::Instant::now();
        let cmd = python(&g, "slix_login_fails.py", g.starttls.port(), &["--jid", jid, "--password", "wrong", "--mech", mech, "--no-cb"]);
        let r = run(cmd, "").await;
        assert!(r.ok(), "{jid} {mech}: {r}");
        assert!(r.stdout.contains(&format!("tried ['{mech}'], failures ['not-authorized']")), "{jid} {mech}: {r}");
        assert!(started.elapsed() < Duration::from_secs(15), "{jid} {mech}: took {:?}", started.elapsed());
    }
    assert!(logged_mechanisms("slixwrong@grid.test").is_empty());
    g.shutdown().await;
}

// ---- Other clients: aioxmpp, go-sendxmpp ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aioxmpp_logs_in_pings_and_messages_itself() {
    let g = grid("ix-aioxmpp").await;
    g.add("aiox", "s3cret-aiox");
    for (port, extra) in [(g.starttls.port(), None), (g.direct.port(), Some("--direct-tls"))] {
        let mut args = vec!["--jid", "aiox@grid.test", "--password", "s3cret-aiox"];
        args.extend(extra);
        let r = run(python(&g, "aioxmpp_ping.py", port, &args), "").await;
        assert!(r.ok(), "{args:?}: {r}");
        assert!(r.stdout.contains("pinged the server grid.test"), "{r}");
        assert!(r.stdout.contains("pinged myself aiox@grid.test/"), "{r}");
        assert!(r.stdout.contains("from aiox@grid.test/"), "{r}");
    }
    // aioxmpp uses aiosasl's SCRAM (no -PLUS, gs2 "n") with the strongest hash offered.
    assert_eq!(logged_mechanisms("aiox@grid.test"), ["SCRAM-SHA-256", "SCRAM-SHA-256"]);
    g.shutdown().await;
}

/// go-sendxmpp with the grid CA as its only trust anchor and no config file.
fn go_sendxmpp(g: &TestGrid, args: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("go-sendxmpp");
    c.env("SSL_CERT_FILE", g.ca_path()).env("HOME", &g.dir).args(args);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_sendxmpp_message_reaches_a_slixmpp_receiver() {
    use tokio::io::AsyncBufReadExt;
    let g = grid("ix-gosendxmpp").await;
    g.add("gosend", "s3cret-go");
    g.add("gosend-rx", "s3cret-rx");
    for (port, tls_flag) in [(g.starttls.port(), None), (g.direct.port(), Some("-t"))] {
        let body = format!("hello from go-sendxmpp on port {port}");
        let mut rx = python(&g, "slix_receive.py", g.starttls.port(), &[
            "--jid", "gosend-rx@grid.test", "--password", "s3cret-rx", "--expect-body", &body, "--expect-from", "gosend@grid.test",
        ]);
        // stdout is read line by line below; stderr (normally silent) goes to ours.
        rx.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::inherit()).kill_on_drop(true);
        let mut rx = rx.spawn().expect("python3");
        let mut lines = tokio::io::BufReader::new(rx.stdout.take().unwrap()).lines();
        let mut seen = String::new();
        let ready = tokio::time::timeout(Duration::from_secs(15), async {
            while let Some(l) = lines.next_line().await.unwrap() {
                seen += &l;
                seen += "\n";
                if l.starts_with("ready ") {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(matches!(ready, Ok(true)), "receiver not ready: {seen}");

        let addr = format!("127.0.0.1:{port}");
        let mut args = vec!["-d", "-u", "gosend@grid.test", "-p", "s3cret-go", "-j", &addr];
        args.extend(tls_flag);
        args.push("gosend-rx@grid.test");
        let sent = run(go_sendxmpp(&g, &args), &format!("{body}\n")).await;
        assert!(sent.ok(), "go-sendxmpp {args:?}: {sent}");

        let done = tokio::time::timeout(CLIENT_DEADLINE, async {
            while let Some(l) = lines.next_line().await.unwrap() {
                seen += &l;
                seen += "\n";
            }
            rx.wait().await.unwrap()
        })
        .await
        .unwrap_or_else(|_| panic!("receiver still running: {seen}"));
        assert!(done.success(), "receiver {done}: {seen}\ngo-sendxmpp: {sent}");
        assert!(seen.contains(&format!("got '{body}' from gosend@grid.test/")), "{seen}");
    }
    // Seen over direct TLS, the one path that got as far as SASL: this go-xmpp
    // picks PLAIN even though SCRAM is offered.
    assert_eq!(logged_mechanisms("gosend@grid.test"), ["PLAIN", "PLAIN"]);
    g.shutdown().await;
}

// ---- TLS versions and direct TLS with openssl s_client ----

/// `openssl s_client` against `port` trusting the grid CA; stdin closed at once.
async fn s_client(g: &TestGrid, args: &[&str]) -> Ran {
    let mut c = tokio::process::Command::new("openssl");
    c.arg("s_client").arg("-CAfile").arg(g.ca_path()).args(["-verify_return_error", "-verify_hostname", DOMAIN]).args(args);
    run(c, "").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_starttls_accepts_tls_1_2_and_1_3_and_refuses_1_1() {
    let g = grid("ix-openssl").await;
    let addr = g.starttls.to_string();
    let starttls = ["-starttls", "xmpp", "-xmpphost", DOMAIN, "-connect", &addr];
    for (flag, protocol) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let r = s_client(&g, &[&starttls[..], &[flag]].concat()).await;
        assert!(r.ok(), "{flag}: {r}");
        assert!(r.stdout.contains(&format!("New, {protocol}, Cipher is")), "{flag}: {r}");
        assert!(r.stdout.contains("Verify return code: 0 (ok)"), "{flag}: {r}");
    }
    // Security level 0 so that the client is willing to speak TLS 1.1 at all: the
    // refusal must come from the server (a protocol_version alert), not from us.
    let r = s_client(&g, &[&starttls[..], &["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"]].concat()).await;
    assert!(!r.ok(), "TLS 1.1 accepted: {r}");
    assert!(r.stdout.contains("New, (NONE), Cipher is (NONE)"), "{r}");
    assert!(r.stderr.contains("alert protocol version") || r.stderr.contains("alert handshake failure"), "{r}");
    assert!(!r.stdout.contains("New, TLSv1.1"), "{r}");
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_direct_tls_negotiates_alpn_xmpp_client() {
    let g = grid("ix-openssl-direct").await;
    let addr = g.direct.to_string();
    let r = s_client(&g, &["-connect", &addr, "-servername", DOMAIN, "-alpn", "xmpp-client"]).await;
    assert!(r.ok(), "{r}");
    assert!(r.stdout.contains("ALPN protocol: xmpp-client"), "{r}");
    assert!(r.stdout.contains("New, TLSv1.3, Cipher is"), "{r}");
    assert!(r.stdout.contains("Verify return code: 0 (ok)"), "{r}");
    g.shutdown().await;
}

// ---- Server bugs found by go-sendxmpp, pinned down with literal XML ----
//
// go-sendxmpp (go-xmpp) ends each element it writes with "\n", e.g.
// "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>\n" and "<auth ...>..</auth>\n",
// and restarts streams with "<?xml version='1.0'?>\n<stream:stream ...>". The
// newline is inter-stanza whitespace of the old stream (RFC 6120 §11.7), but the
// server leaves it unconsumed at the restart point.

/// Whitespace after `<starttls/>` is not injected plaintext (CVE-2011-0411 is about
/// stanzas): the handshake must proceed. Each case is the same one-write input with
/// and without the newline; the control case shows the rest of the exchange is fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newline_after_starttls_does_not_abort_the_handshake() {
    let g = grid("ix-ws-starttls").await;
    for tail in ["", "\n"] {
        let (mut c, _) = plain(g.starttls).await;
        c.send(&format!("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>{tail}")).await;
        c.read_until("<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>").await;
        let name = rustls::pki_types::ServerName::try_from(DOMAIN).unwrap();
        let cfg = client_config(&g.ca_path(), None, rustls::DEFAULT_VERSIONS);
        let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, c.io).await;
        assert!(tls.is_ok(), "after <starttls/>{tail:?}: {:?}", tls.err());
    }
    g.shutdown().await;
}

/// A newline after `</auth>` is the old stream's whitespace: the restarted stream
/// may still begin with an XML declaration (RFC 6120 §11.5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newline_after_auth_still_allows_an_xml_declaration_on_restart() {
    let g = grid("ix-ws-restart").await;
    g.add("wsuser", "pw");
    for tail in ["", "\n"] {
        let (mut c, _) = starttls(&g).await;
        let creds = B64.encode("\0wsuser\0pw");
        c.send(&format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{creds}</auth>{tail}")).await;
        c.read_until("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>").await;
        c.send(&HEADER.replacen("?>", "?>\n", 1)).await; // go-xmpp's line break
        let r = c.try_read_until("</stream:features>", Duration::from_secs(5)).await;
        assert!(r.as_ref().is_ok_and(|f| f.contains("urn:ietf:params:xml:ns:xmpp-bind")), "after </auth>{tail:?}: {r:?}");
    }
    g.shutdown().await;
}
