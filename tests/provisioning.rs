//! Provisioning and revocation through the real `xmpp-grid` binary, with and
//! without a running server, and their effect on live sessions and later logins.

mod common;

use base64::Engine as _;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_xmpp-grid");

fn cli(config: &Path, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let (ok, out, err) = run_cli(config, args, stdin);
    (ok, out + &err)
}

/// A config file for a grid in `dir` listening on ephemeral ports.
fn write_config(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("grid.toml");
    std::fs::write(&p, "domain = \"grid.test\"\ndata_dir = \"data\"\n[listen]\nstarttls = \"127.0.0.1:0\"\ndirect_tls = \"127.0.0.1:0\"\n").unwrap();
    p
}

// Multi-threaded: the CLI calls block this thread while the server answers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platforms_are_provisioned_offline_then_served_and_revoked_live() {
    let dir = temp_dir("prov");
    let cfgp = write_config(&dir);
    // Offline: add, import, cert, list.
    let (ok, out) = cli(&cfgp, &["platform", "add", "Sensor1", "--password-stdin", "--role", "publisher"], Some("pw1\n"));
    assert!(ok, "{out}");
    let (ok, out) = cli(&cfgp, &["platform", "add", "sensor1", "--password-stdin"], Some("again\n"));
    assert!(!ok && out.contains("already exists"), "{out}");
    let csv = dir.join("p.csv");
    std::fs::write(&csv, "name,password,roles,templates\nsiem,pw2,subscriber,siem\ncmdb,,,\n").unwrap();
    let (ok, out) = cli(&cfgp, &["platform", "import", csv.to_str().unwrap()], None);
    assert!(ok && out.contains("imported 2 of 2"), "{out}");
    let certs = dir.join("certs");
    let (ok, out) = cli(&cfgp, &["platform", "cert", "cmdb", "--out", certs.to_str().unwrap()], None);
    assert!(ok, "{out}");
    let (ok, out) = cli(&cfgp, &["platform", "cert", "nobody", "--out", certs.to_str().unwrap()], None);
    assert!(!ok && out.contains("no platform named nobody"), "{out}");
    assert!(!certs.join("nobody.pem").exists());
    let (ok, out) = cli(&cfgp, &["platform", "list"], None);
    assert!(ok && out.contains("sensor1@grid.test") && out.contains("roles=publisher") && out.contains("cmdb@grid.test"), "{out}");

    // Online: the same store, served.
    let cfg = xmpp_grid::config::Config::load(Some(&cfgp)).unwrap();
    let g = start_with(cfg, dir.clone()).await;
    let (mut sensor, _) = login(&g, "sensor1", "pw1", "a").await;
    let cert_pem = std::fs::read_to_string(certs.join("cmdb.pem")).unwrap();
    let key_pem = std::fs::read_to_string(certs.join("cmdb.key")).unwrap();
    let ccfg = client_config(&g.ca_path(), Some((&cert_pem, &key_pem)), rustls::DEFAULT_VERSIONS);
    let (mut c, _) = starttls_with(&g, ccfg.clone()).await;
    c.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>").await;
    c.read_until("<success").await;
    c.read_until(">").await;
    let (mut cmdb, _) = bind(c, "r").await;

    // Live: a platform added while the server runs can log in at once.
    let (ok, out) = cli(&cfgp, &["platform", "add", "late", "--password-stdin"], Some("pw3\n"));
    assert!(ok, "{out}");
    let _late = login(&g, "late", "pw3", "r").await;

    // Revocation ends live sessions within a second...
    let t = Instant::now();
    let (ok, out) = cli(&cfgp, &["platform", "revoke", "sensor1"], None);
    assert!(ok && out.contains("1 live session(s) ended"), "{out}");
    let r = sensor.read_to_close().await;
    assert!(t.elapsed() < Duration::from_secs(1) + Duration::from_millis(500), "took {:?}", t.elapsed());
    assert!(r.contains("<policy-violation") && r.contains("platform revoked"), "{r}");
    let (ok, out) = cli(&cfgp, &["platform", "revoke", "cmdb"], None);
    assert!(ok && out.contains("1 certificate(s)"), "{out}");
    let r = cmdb.read_to_close().await;
    assert!(r.contains("platform revoked"), "{r}");

    // ...and every later login fails: password...
    let (mut c, _) = starttls(&g).await;
    c.send(&format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{}</auth>", B64.encode("\0sensor1\0pw1"))).await;
    let r = c.read_until("</failure>").await;
    assert!(r.contains("<not-authorized/>"), "{r}");
    // ...and certificate: a full handshake is refused (CRL), and so is resumption
    // with the session ticket the same client config cached before revocation.
    let tcp = tokio::net::TcpStream::connect(g.direct).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(DOMAIN).unwrap();
    let refused = match tokio_rustls::TlsConnector::from(ccfg).connect(name, tcp).await {
        Err(_) => true,
        Ok(tls) => {
            let mut c = Raw::new(tls);
            c.send(HEADER).await;
            let r = c.try_read_until("</stream:features>", Duration::from_secs(5)).await;
            match r {
                Err(_) => true, // TLS 1.3 reports a refused certificate on first read
                Ok(f) => {
                    if f.contains("EXTERNAL") {
                        c.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>").await;
                        c.read_until("</failure>").await.contains("not-authorized")
                    } else {
                        true
                    }
                }
            }
        }
    };
    assert!(refused, "revoked certificate still logs in");
    // The CRL on disk lists the certificate.
    let crl = xmpp_grid::pki::read_crl_info(&g.grid.cfg.tls_dir()).unwrap();
    assert_eq!(crl.revoked_serials_hex.len(), 1);
    let mut g = g;
    g.running.take().unwrap().shutdown().await; // keeps the directory, unlike g.shutdown()
    drop(g); // releases the database lock

    // Offline again: list shows the state, survived restart. The server's
    // background tasks release the database a moment after shutdown.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (ok, out) = loop {
        let (ok, out) = cli(&cfgp, &["platform", "list"], None);
        if ok || !out.contains("in use") || Instant::now() > deadline {
            break (ok, out);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(ok && out.lines().any(|l| l.starts_with("sensor1@") && l.contains("revoked")), "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn init_and_check_create_a_valid_grid() {
    let dir = temp_dir("init");
    let (ok, out) = cli(Path::new("/nonexistent-unused.toml"), &["init", "--domain", "grid.example", "--dir", dir.to_str().unwrap()], None);
    // --config is global but init does not read it.
    assert!(ok, "{out}");
    assert!(dir.join("grid.toml").exists() && dir.join("data/tls/ca.pem").exists());
    let (ok, out) = cli(&dir.join("grid.toml"), &["check"], None);
    assert!(ok && out.contains("config ok"), "{out}");
    std::fs::write(dir.join("bad.toml"), "[limits]\nmax_depth = 0\n").unwrap();
    let (ok, out) = cli(&dir.join("bad.toml"), &["check"], None);
    assert!(!ok && out.contains("limits.max_depth"), "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `xmpp-grid serve` with no config and no files: a working grid on localhost
/// (default ports 5222/5223), certificates generated, a newcomer told what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_no_config_runs_a_grid_on_localhost() {
    use tokio::io::AsyncBufReadExt;
    let dir = temp_dir("zero");
    let mut child = tokio::process::Command::new(BIN)
        .arg("serve")
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut banner = String::new();
    let read = async {
        while let Ok(Some(l)) = lines.next_line().await {
            banner.push_str(&l);
            banner.push('\n');
            if l.contains("stop with Ctrl-C") {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read).await.expect("no banner");
    assert!(banner.contains("domain localhost") && banner.contains("127.0.0.1:5222") && banner.contains("127.0.0.1:5223"), "{banner}");
    assert!(banner.contains("ca.pem") && banner.contains("platform add"), "{banner}");
    assert!(dir.join("data/tls/ca.pem").exists());
    // A platform added while it runs can log in over STARTTLS on the default port.
    let (ok, out) = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || {
            let out = Command::new(BIN)
                .args(["platform", "add", "sensor1", "--password-stdin"])
                .current_dir(&dir)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    use std::io::Write;
                    c.stdin.take().unwrap().write_all(b"pw\n")?;
                    c.wait_with_output()
                })
                .unwrap();
            (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
        }
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    let tcp = tokio::net::TcpStream::connect("127.0.0.1:5222").await.unwrap();
    let mut c = Raw::new(tcp);
    c.send(&HEADER.replace("grid.test", "localhost")).await;
    let f = c.read_until("</stream:features>").await;
    assert!(f.contains("<required/>"), "{f}");
    // SIGTERM: graceful shutdown, the open stream gets system-shutdown.
    let pid = child.id().unwrap() as i32;
    unsafe_kill(pid);
    let r = c.read_to_close().await;
    assert!(r.contains("<system-shutdown"), "{r}");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status:?}");
    std::fs::remove_dir_all(&dir).ok();
}

fn unsafe_kill(pid: i32) {
    // No libc dependency for one signal: the kill(1) command does it.
    let ok = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().unwrap().success();
    assert!(ok);
}
