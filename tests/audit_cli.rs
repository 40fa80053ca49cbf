//! `xmpp-grid audit verify | tail` through the real binary, with and without a
//! running server: admin actions are audited, the chain verifies, a record
//! tampered with in the store is found and named.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_xmpp-grid");

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("xg-audit-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs the CLI; returns (success, stdout, stderr).
fn cli(config: &Path, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    common::run_cli(config, args, stdin)
}

fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
}

/// Lines of a child's stdout, read on a thread so that waits can time out.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn admin_actions_are_audited_verified_and_tampering_is_named() {
    let dir = temp_dir("main");
    let cfgp = dir.join("grid.toml");
    std::fs::write(&cfgp, "domain = \"grid.test\"\ndata_dir = \"data\"\n[listen]\nstarttls = \"127.0.0.1:0\"\ndirect_tls = \"127.0.0.1:0\"\n").unwrap();

    // Offline: an empty log verifies; admin actions append records.
    let (ok, out, err) = cli(&cfgp, &["audit", "verify"], None);
    assert!(ok && out.contains("0 records, chain intact"), "{out}{err}");
    for args in [&["platform", "add", "sensor1", "--role", "publisher"][..], &["platform", "add", "siem1", "--password-stdin"][..]] {
        let (ok, out, err) = cli(&cfgp, args, Some("pw\n"));
        assert!(ok, "{out}{err}");
    }
    let (ok, out, err) = cli(&cfgp, &["platform", "revoke", "sensor1"], None);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = cli(&cfgp, &["audit", "verify"], None);
    assert!(ok && out.contains("3 records, chain intact"), "{out}{err}");
    let (ok, out, err) = cli(&cfgp, &["audit", "tail", "-n", "2"], None);
    assert!(ok, "{err}");
    let recs = json_lines(&out);
    assert_eq!(recs.len(), 2, "{out}");
    assert_eq!((recs[0]["seq"].as_u64(), recs[1]["seq"].as_u64()), (Some(2), Some(3)));
    assert_eq!(recs[0]["kind"], "admin");
    assert_eq!(recs[0]["subject"], "siem1@grid.test");
    assert_eq!(recs[0]["fields"]["action"], "platform-add");
    assert_eq!(recs[0]["fields"]["auth"], "password");
    assert_eq!(recs[1]["kind"], "revocation");
    assert_eq!(recs[1]["subject"], "sensor1@grid.test");
    assert_eq!(recs[1]["fields"]["via"], "local-store");
    assert_eq!(recs[1]["prev"], recs[0]["hash"]);

    // Live: the same commands through the server's admin socket.
    let mut server = Command::new(BIN)
        .arg("--config")
        .arg(&cfgp)
        .arg("serve")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let banner = lines_of(&mut server);
    loop {
        let l = banner.recv_timeout(Duration::from_secs(60)).expect("no banner from serve");
        if l.contains("stop with Ctrl-C") {
            break;
        }
    }
    let mut follow = Command::new(BIN)
        .arg("--config")
        .arg(&cfgp)
        .args(["audit", "tail", "-n", "1", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let followed = lines_of(&mut follow);
    let first: serde_json::Value = serde_json::from_str(&followed.recv_timeout(Duration::from_secs(30)).unwrap()).unwrap();
    assert_eq!(first["seq"], 3);
    let (ok, out, err) = cli(&cfgp, &["platform", "revoke", "siem1"], None);
    assert!(ok, "{out}{err}");
    let next: serde_json::Value = serde_json::from_str(&followed.recv_timeout(Duration::from_secs(30)).unwrap()).unwrap();
    assert_eq!(next["seq"], 4);
    assert_eq!(next["kind"], "revocation");
    assert_eq!(next["subject"], "siem1@grid.test");
    assert_eq!(next["fields"]["via"], "admin-socket");
    follow.kill().unwrap();
    follow.wait().unwrap();
    let (ok, out, err) = cli(&cfgp, &["audit", "verify"], None);
    assert!(ok && out.contains("4 records, chain intact"), "{out}{err}");
    // kill -9: what the server acknowledged is on disk.
    server.kill().unwrap();
    server.wait().unwrap();
    let (ok, out, err) = cli(&cfgp, &["audit", "verify"], None);
    assert!(ok && out.contains("4 records, chain intact"), "{out}{err}");

    // Tamper with record 2 directly in sled: verify fails and names it.
    let db_dir = dir.join("data/db");
    let key = |seq: u64| [&[b'r'][..], &seq.to_be_bytes()[..]].concat();
    let original = {
        let db = sled::open(&db_dir).unwrap();
        let tree = db.open_tree("audit").unwrap();
        let original = tree.get(key(2)).unwrap().unwrap();
        let mut rec: serde_json::Value = serde_json::from_slice(&original).unwrap();
        rec["fields"]["roles"] = "admin".into();
        tree.insert(key(2), serde_json::to_vec(&rec).unwrap()).unwrap();
        db.flush().unwrap();
        original
    };
    let (ok, out, err) = cli(&cfgp, &["audit", "verify"], None);
    assert!(!ok, "{out}");
    assert!(err.contains("broken at record 2") && err.contains("altered"), "{err}");

    // Restored, then the newest record cut off: truncation is named too.
    {
        let db = sled::open(&db_dir).unwrap();
        let tree = db.open_tree("audit").unwrap();
        tree.insert(key(2), original).unwrap();
        tree.remove(key(4)).unwrap();
        db.flush().unwrap();
    }
    let (ok, out, err) = cli(&cfgp, &["audit", "verify"], None);
    assert!(!ok, "{out}");
    assert!(err.contains("broken at record 4") && err.contains("truncated"), "{err}");
    let (ok, out, err) = cli(&cfgp, &["audit", "tail", "-n", "2"], None);
    assert!(ok, "{err}");
    assert_eq!(json_lines(&out).len(), 2, "{out}");
    std::fs::remove_dir_all(&dir).ok();
}
