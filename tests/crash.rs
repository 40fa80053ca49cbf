//! Crash safety of the broker with the real binary: an item whose publish was
//! acknowledged (IQ result) survives `kill -9` of the server, with its payload
//! intact (the broker acknowledges only after its group commit has flushed).
//!
//! One data directory, three rounds of: publish from a pipelined client for a
//! random 0.3–1.5 s, SIGKILL the server mid-load, start it again on the same
//! directory, and page through every item (XEP-0059) checking that each
//! acknowledged item of every round so far is there, once, in publish order.

mod common;

use common::*;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_xmpp-grid");
const USER: &str = "crashpub";
const PASSWORD: &str = "s3cret-crash";
const NODE: &str = "crash-topic";
/// Publishes in flight at once on the one connection.
const WINDOW: usize = 16;
/// Items per retrieval page (the broker's page cap is raised to this in the config).
const PAGE: usize = 500;

/// A running `xmpp-grid serve`.
struct Server {
    child: tokio::process::Child,
    starttls: SocketAddr,
}

fn write_config(dir: &Path) -> PathBuf {
    let path = dir.join("grid.toml");
    std::fs::write(
        &path,
        format!(
            r#"domain = "{DOMAIN}"
data_dir = "data"

[listen]
starttls = "127.0.0.1:0"
direct_tls = "127.0.0.1:0"

[broker]
max_items_per_page = {PAGE}
max_items_per_topic = 10000000
"#
        ),
    )
    .unwrap();
    path
}

/// `xmpp-grid --config <cfg> <args>` to completion (10 s at most), stdin fed.
async fn cli(cfg: &Path, args: &[&str], stdin: &str) -> std::process::Output {
    let mut c = tokio::process::Command::new(BIN);
    c.arg("--config").arg(cfg).args(args);
    c.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    c.kill_on_drop(true);
    let mut child = c.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    tokio::time::timeout(Duration::from_secs(10), child.wait_with_output()).await.expect("xmpp-grid cli hangs").unwrap()
}

/// Starts `xmpp-grid serve` and waits (20 s at most) for the banner's STARTTLS address.
/// Its log (stderr) is appended to `server.log` in `dir`.
async fn serve(dir: &Path, cfg: &Path) -> Server {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("server.log")).unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(cfg)
        .arg("serve")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(l)) = lines.next_line().await {
            seen.push_str(&l);
            seen.push('\n');
            if let Some(a) = l.trim().strip_prefix("STARTTLS:") {
                return a.trim().parse::<SocketAddr>().ok();
            }
        }
        None
    })
    .await;
    let Ok(Some(starttls)) = found else {
        let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
        panic!("no STARTTLS address in the banner: {seen}\n--- server.log\n{log}");
    };
    // Keep reading so that the pipe never fills.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Server { child, starttls }
}

/// The payload of item `id`, in the form the server writes it back (its
/// serializer: single quotes, the namespace first), so intact means byte-equal.
fn payload(id: &str) -> String {
    let filler: String = id.bytes().cycle().take(300).map(|b| (b'a' + b % 26) as char).collect();
    format!("<entry xmlns='urn:xmpp-grid:test:crash' id='{id}'>crash test &amp; {id} {filler}</entry>")
}

/// The value of attribute `name` in the first start tag of `xml`.
fn attr<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let tag = &xml[..xml.find('>')?];
    let start = tag.find(&format!(" {name}='"))? + name.len() + 3;
    Some(&tag[start..start + tag[start..].find('\'')?])
}

/// Publishes until the connection dies; returns the acknowledged item ids in
/// acknowledgement order. Panics on any answer other than a result naming the item.
async fn publish_until_killed(mut c: Tls, round: usize) -> Vec<String> {
    let mut acked = Vec::new();
    let mut in_flight: HashMap<String, String> = HashMap::new();
    let mut n = 0usize;
    loop {
        while in_flight.len() < WINDOW {
            n += 1;
            let (iq_id, item) = (format!("p{round}-{n}"), format!("r{round}-{n:06}"));
            let iq = format!(
                "<iq type='set' id='{iq_id}' to='broker.{DOMAIN}'><pubsub xmlns='http://jabber.org/protocol/pubsub'>\
                 <publish node='{NODE}'><item id='{item}'>{}</item></publish></pubsub></iq>",
                payload(&item)
            );
            if c.io.write_all(iq.as_bytes()).await.is_err() || c.io.flush().await.is_err() {
                return acked; // the server is gone
            }
            in_flight.insert(iq_id, item);
        }
        // The publisher subscribes to nothing: every stanza it gets is an IQ answer.
        let Ok(reply) = c.try_read_until("</iq>", Duration::from_secs(10)).await else {
            return acked; // EOF or reset: the server was killed
        };
        let reply = &reply[reply.find("<iq").unwrap_or_else(|| panic!("not an IQ: {reply}"))..];
        let id = attr(reply, "id").unwrap_or_else(|| panic!("IQ answer without id: {reply}"));
        let item = in_flight.remove(id).unwrap_or_else(|| panic!("answer to no request: {reply}"));
        assert_eq!(attr(reply, "type"), Some("result"), "publish {item} failed: {reply}");
        assert!(reply.contains(&format!("<item id='{item}'/>")), "result does not name {item}: {reply}");
        acked.push(item);
    }
}

/// Every item of the topic, paging with XEP-0059 after=<last>: (id, whole <item> element).
async fn retrieve_all(c: &mut Tls) -> Vec<(String, String)> {
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    for page in 0.. {
        assert!(page < 1000, "paging does not end");
        let after_el = after.as_ref().map(|a| format!("<after>{a}</after>")).unwrap_or_default();
        c.send(&format!(
            "<iq type='get' id='g{page}' to='broker.{DOMAIN}'><pubsub xmlns='http://jabber.org/protocol/pubsub'>\
             <items node='{NODE}'/><set xmlns='http://jabber.org/protocol/rsm'><max>{PAGE}</max>{after_el}</set></pubsub></iq>"
        ))
        .await;
        let reply = c.read_until("</iq>").await;
        assert!(reply.contains("type='result'") && reply.contains(&format!("id='g{page}'")), "page {page}: {reply}");
        let mut got = 0;
        let mut rest = reply.as_str();
        while let Some(i) = rest.find("<item id='") {
            rest = &rest[i..];
            let end = rest.find("</item>").unwrap_or_else(|| panic!("unterminated item: {rest}")) + "</item>".len();
            let el = &rest[..end];
            all.push((attr(el, "id").unwrap().to_string(), el.to_string()));
            rest = &rest[end..];
            got += 1;
        }
        if got == 0 {
            return all;
        }
        let last = reply.split("<last>").nth(1).and_then(|s| s.split("</last>").next());
        after = Some(last.unwrap_or_else(|| panic!("a non-empty page without <last/>: {reply}")).to_string());
    }
    unreachable!()
}

/// A pseudo-random duration in [lo, hi) ms, different per run.
fn random_ms(lo: u64, hi: u64, salt: u64) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(salt);
    Duration::from_millis(lo + h.finish() % (hi - lo))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_items_survive_kill_9_three_times() {
    let started = std::time::Instant::now();
    let dir = temp_dir("crash");
    let cfg = write_config(&dir);
    let out = cli(&cfg, &["platform", "add", USER, "--password-stdin", "--role", "publisher"], &format!("{PASSWORD}\n")).await;
    assert!(out.status.success(), "platform add: {out:?}");
    let ca = dir.join("data/tls/ca.pem");

    let mut server = serve(&dir, &cfg).await;
    let (mut c, _) = login_at(server.starttls, &ca, USER, PASSWORD, "setup").await;
    c.send(&format!(
        "<iq type='set' id='create' to='broker.{DOMAIN}'><pubsub xmlns='http://jabber.org/protocol/pubsub'>\
         <create node='{NODE}'/><configure><x xmlns='jabber:x:data' type='submit'>\
         <field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/pubsub#node_config</value></field>\
         <field var='pubsub#max_items'><value>max</value></field></x></configure></pubsub></iq>"
    ))
    .await;
    let r = c.read_until("</iq>").await;
    assert!(r.contains("type='result'"), "create: {r}");
    drop(c);

    let mut acked_all: Vec<String> = Vec::new();
    for round in 1..=3 {
        let (c, _) = login_at(server.starttls, &ca, USER, PASSWORD, &format!("load{round}")).await;
        let load = tokio::spawn(publish_until_killed(c, round));
        tokio::time::sleep(random_ms(300, 1500, round as u64)).await;
        server.child.start_kill().unwrap(); // SIGKILL
        let status = tokio::time::timeout(Duration::from_secs(10), server.child.wait()).await.expect("server survives SIGKILL").unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "the server ended otherwise: {status:?}");
        let acked = tokio::time::timeout(Duration::from_secs(15), load).await.expect("publisher hangs after the kill").unwrap();
        assert!(!acked.is_empty(), "round {round}: nothing acknowledged before the kill");
        acked_all.extend(acked.iter().cloned());

        server = serve(&dir, &cfg).await;
        let (mut c, _) = login_at(server.starttls, &ca, USER, PASSWORD, &format!("check{round}")).await;
        let items = retrieve_all(&mut c).await;
        let stored: HashMap<&str, &str> = items.iter().map(|(id, el)| (id.as_str(), el.as_str())).collect();
        let ids: Vec<&str> = items.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids.len(), stored.len(), "round {round}: an item listed twice");
        let missing: Vec<&String> = acked_all.iter().filter(|id| !stored.contains_key(id.as_str())).collect();
        assert!(
            missing.is_empty(),
            "round {round}: {} of {} acknowledged items lost after kill -9, e.g. {:?}",
            missing.len(),
            acked_all.len(),
            &missing[..missing.len().min(5)]
        );
        for id in &acked_all {
            let want = format!("<item id='{id}' publisher='{USER}@{DOMAIN}'>{}</item>", payload(id));
            assert_eq!(stored[id.as_str()], want, "round {round}: item {id} damaged");
        }
        // Acknowledged items keep their publish order (ids sort in publish order within a round).
        let acked_set: HashSet<&str> = acked_all.iter().map(String::as_str).collect();
        let order: Vec<&str> = ids.iter().copied().filter(|id| acked_set.contains(id)).collect();
        assert_eq!(order, acked_all.iter().map(String::as_str).collect::<Vec<_>>(), "round {round}: order changed");
        eprintln!(
            "round {round}: {} acknowledged ({} so far), {} stored after restart",
            acked.len(),
            acked_all.len(),
            items.len()
        );
        drop(c);
    }

    // A clean stop at the end (SIGTERM), then the directory goes.
    unsafe { libc::kill(server.child.id().unwrap() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(10), server.child.wait()).await.expect("no clean stop").unwrap();
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
}
