//! Payload plugins end to end (issue "Payload validators and transformers as
//! sandboxed Wasm components, hot-reloaded"): the built-in IODEF validator on
//! the corpus in tests/data/iodef, publishes refused with their violations,
//! personal data redacted per subscriber (live, offline, retrieved), hostile
//! components (tests/wasm-fixtures) contained, hot reload under load, and the
//! `check` and `plugin run` commands.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use xmpp_grid::plugins::{builtin, Host, HostOptions, PublisherInfo, SubscriberInfo, TopicInfo, Transformed, Verdict};

const PUBSUB: &str = "http://jabber.org/protocol/pubsub";
const IODEF: &str = "urn:ietf:params:xml:ns:iodef-2.0";
const STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";

fn corpus_dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/iodef").join(kind)
}

fn corpus(kind: &str) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(corpus_dir(kind))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "xml"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    files.sort();
    files
}

fn doc(kind: &str, name: &str) -> String {
    String::from_utf8(std::fs::read(corpus_dir(kind).join(name)).unwrap()).unwrap()
}

fn builtin_host() -> std::sync::Arc<Host> {
    let host = Host::new(HostOptions { cache_dir: None, builtins: builtin::BUILTINS.to_vec(), use_builtins: true }).unwrap();
    let empty = temp_dir("pl-empty");
    let report = host.reload(&empty);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    host
}

fn topic() -> TopicInfo {
    TopicInfo { name: "incidents".into(), payload_type: Some(IODEF.into()), owner: "sensor@grid.test".into() }
}

#[test]
fn the_builtin_validator_accepts_every_valid_and_rejects_every_invalid_corpus_document() {
    let host = builtin_host();
    let set = host.current();
    let validators = set.validators("incidents", IODEF);
    assert_eq!(validators.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["iodef-validator"]);
    let v = &validators[0];
    let publisher = PublisherInfo { jid: "sensor@grid.test".into(), roles: vec!["publisher".into()], templates: vec![] };
    let valid = corpus("valid");
    assert!(valid.len() >= 30, "only {} valid documents", valid.len());
    for (name, bytes) in &valid {
        match v.validate(&topic(), &publisher, bytes).unwrap() {
            Verdict::Accept => {}
            Verdict::Reject(vs) => panic!("{name} rejected: {vs:?}"),
        }
    }
    let expected: toml::Table = toml::from_str(&std::fs::read_to_string(corpus_dir("invalid").join("EXPECTED.toml")).unwrap()).unwrap();
    let invalid = corpus("invalid");
    assert!(invalid.len() >= 30, "only {} invalid documents", invalid.len());
    for (name, bytes) in &invalid {
        let want = expected.get(name).unwrap_or_else(|| panic!("{name} has no entry in EXPECTED.toml"));
        let (loc, msg) = (want["location"].as_str().unwrap(), want["message"].as_str().unwrap());
        match v.validate(&topic(), &publisher, bytes).unwrap() {
            Verdict::Accept => panic!("{name} accepted"),
            Verdict::Reject(vs) => assert!(
                vs.iter().any(|x| x.location == loc && x.message.contains(msg)),
                "{name}: want {loc} {msg:?}, got {vs:?}"
            ),
        }
    }
}

#[test]
fn the_builtin_redactor_removes_personal_data_only_without_the_grant() {
    let host = builtin_host();
    let set = host.current();
    let t = set.transformers("incidents", IODEF);
    assert_eq!(t.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["privacy-redactor"]);
    let r = &t[0];
    let without = SubscriberInfo { jid: None, roles: vec!["subscriber".into()], grants: vec![] };
    let with = SubscriberInfo { jid: None, roles: vec!["subscriber".into()], grants: vec!["read-personal-data".into()] };
    for (name, input) in corpus("redaction").into_iter().filter(|(n, _)| n.ends_with(".input.xml")) {
        let expected = std::fs::read(corpus_dir("redaction").join(name.replace(".input.", ".expected."))).unwrap();
        match r.transform(&topic(), &without, &input).unwrap() {
            Transformed::Rewritten(out) => assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&expected), "{name}"),
            _ => panic!("{name}: not rewritten"),
        }
        assert!(matches!(r.transform(&topic(), &with, &input).unwrap(), Transformed::Unchanged), "{name}");
    }
}

#[test]
fn the_valid_corpus_passes_the_rfc_7970_schema() {
    // xmllint with the schema in ../shared/data/iodef/schema (see the script).
    let out = std::process::Command::new("sh").arg(corpus_dir("check-corpus.sh").with_file_name("check-corpus.sh")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("corpus OK"), "{text}");
}

// ---- over XMPP ----------------------------------------------------------------

/// A logged-in platform that reads whole stanzas (literal XML).
struct P {
    c: Tls,
    jid: String,
    n: u32,
}

impl P {
    async fn online(g: &TestGrid, user: &str) -> P {
        let (mut c, jid) = login(g, user, "pw", "r").await;
        c.send("<presence/>").await;
        P { c, jid, n: 0 }
    }

    /// Sends a pubsub IQ and returns its answer (other stanzas before it are dropped).
    async fn iq(&mut self, kind: &str, body: &str) -> String {
        self.n += 1;
        let id = format!("q{}", self.n);
        self.c.send(&format!("<iq type='{kind}' id='{id}' to='broker.grid.test'><pubsub xmlns='{PUBSUB}'>{body}</pubsub></iq>")).await;
        loop {
            let s = self.c.read_until("</iq>").await;
            let start = s.rfind("<iq").unwrap();
            let head = &s[start..];
            if head.contains(&format!("id='{id}'")) {
                return head.to_string();
            }
        }
    }

    async fn create(&mut self, node: &str) {
        let form = format!(
            "<configure><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>{PUBSUB}#node_config</value></field>\
             <field var='pubsub#access_model'><value>open</value></field><field var='pubsub#max_items'><value>10000</value></field>\
             <field var='pubsub#type'><value>{IODEF}</value></field></x></configure>"
        );
        let r = self.iq("set", &format!("<create node='{node}'/>{form}")).await;
        assert!(r.contains("type='result'"), "{r}");
    }

    async fn publish(&mut self, node: &str, id: &str, payload: &str) -> String {
        self.iq("set", &format!("<publish node='{node}'><item id='{id}'>{payload}</item></publish>")).await
    }

    async fn subscribe(&mut self, node: &str) {
        let jid = self.jid.split('/').next().unwrap().to_string();
        let r = self.iq("set", &format!("<subscribe node='{node}' jid='{jid}'/>")).await;
        assert!(r.contains("subscription='subscribed'"), "{r}");
    }

    /// The next notification carrying an item, or None within `within`.
    async fn item(&mut self, within: Duration) -> Option<String> {
        match self.c.try_read_until("</message>", within).await {
            Ok(m) => Some(m),
            Err(rest) => {
                self.c.buf = rest;
                None
            }
        }
    }
}

async fn audit_lines(g: &TestGrid) -> Vec<String> {
    g.grid.audit.flush().await.unwrap();
    let log = xmpp_grid::audit::AuditLog::open(&g.grid.store).unwrap();
    log.tail(200).unwrap().iter().map(|r| r.to_json_line()).collect()
}

async fn plugin_grid(name: &str, tweak: impl FnOnce(&mut xmpp_grid::config::Config)) -> TestGrid {
    start(name, |c| {
        c.plugins.builtin = true;
        tweak(c);
    })
    .await
}

#[tokio::test]
async fn an_invalid_iodef_publish_is_not_acceptable_with_its_violations_and_audited() {
    let g = plugin_grid("pl-reject", |_| {}).await;
    g.add("sensor", "pw");
    let mut p = P::online(&g, "sensor").await;
    p.create("incidents").await;
    let r = p.publish("incidents", "bad1", &doc("invalid", "01-missing-purpose.xml")).await;
    assert!(r.contains("type='error'") && r.contains("<error type='modify'>"), "{r}");
    assert!(r.contains(&format!("<not-acceptable xmlns='{STANZAS}'/>")), "{r}");
    assert!(r.contains("<invalid-payload xmlns='http://jabber.org/protocol/pubsub#errors'/>"), "{r}");
    assert!(r.contains("/IODEF-Document/Incident[1]/@purpose") && r.contains("missing required attribute `purpose`"), "{r}");
    let r = p.publish("incidents", "good1", &doc("valid", "01-ids-ssh-bruteforce.xml")).await;
    assert!(r.contains("type='result'"), "{r}");
    // Only the valid item was stored.
    let r = p.iq("get", "<items node='incidents'/>").await;
    assert!(r.contains("id='good1'") && !r.contains("id='bad1'"), "{r}");
    let audit = audit_lines(&g).await;
    assert!(
        audit.iter().any(|l| l.contains("plugin-rejected") && l.contains("iodef-validator") && l.contains("purpose")),
        "{audit:#?}"
    );
    g.shutdown().await;
}

#[tokio::test]
async fn personal_data_reaches_only_subscribers_cleared_for_it_live_offline_and_on_retrieval() {
    let g = plugin_grid("pl-privacy", |_| {}).await;
    g.add_with_roles("sensor", "pw", &["publisher"]);
    g.add_with_roles("plain", "pw", &["subscriber"]);
    g.add_with_roles("cleared", "pw", &["subscriber", "privacy-cleared"]);
    let mut p = P::online(&g, "sensor").await;
    p.create("incidents").await;
    let mut plain = P::online(&g, "plain").await;
    plain.subscribe("incidents").await;
    let mut cleared = P::online(&g, "cleared").await;
    cleared.subscribe("incidents").await;
    let phishing = doc("valid", "02-phishing-campaign.xml");
    let personal = ["jane.analyst@bank.example", "+44 20 7946 0958", "Threadneedle"];
    let r = p.publish("incidents", "ph1", &phishing).await;
    assert!(r.contains("type='result'"), "{r}");

    let m = plain.item(Duration::from_secs(5)).await.expect("plain got nothing");
    assert!(m.contains("PHISH-7731") && m.contains("Jane Analyst"), "{m}");
    for x in personal {
        assert!(!m.contains(x), "{x} leaked to plain: {m}");
    }
    let m = cleared.item(Duration::from_secs(5)).await.expect("cleared got nothing");
    for x in personal {
        assert!(m.contains(x), "{x} missing for cleared: {m}");
    }
    // Retrieval is shaped the same way.
    let r = plain.iq("get", "<items node='incidents'/>").await;
    assert!(r.contains("PHISH-7731") && !r.contains(personal[0]), "{r}");
    let r = cleared.iq("get", "<items node='incidents'/>").await;
    assert!(r.contains(personal[0]), "{r}");
    // Offline delivery too.
    plain.c.send("</stream:stream>").await;
    let _ = plain.c.read_to_close().await;
    let r = p.publish("incidents", "ph2", &phishing.replace("PHISH-7731", "PHISH-7732")).await;
    assert!(r.contains("type='result'"), "{r}");
    let mut plain = P::online(&g, "plain").await;
    let m = plain.item(Duration::from_secs(5)).await.expect("no offline delivery");
    assert!(m.contains("PHISH-7732") && m.contains("urn:xmpp:delay"), "{m}");
    assert!(!m.contains(personal[0]), "{m}");
    g.shutdown().await;
}

/// Drops a plugin in the way an operator should: copy to NAME.wasm.part, rename.
fn install(dir: &Path, name: &str, module: &Path, manifest: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(format!("{name}.toml")), manifest).unwrap();
    let part = dir.join(format!("{name}.wasm.part"));
    std::fs::copy(module, &part).unwrap();
    std::fs::rename(&part, dir.join(format!("{name}.wasm"))).unwrap();
}

#[tokio::test]
async fn hostile_plugins_fail_one_payload_each_while_other_platforms_carry_on() {
    let validator = wasm_module("tests/wasm-fixtures", "misbehave-validator");
    let transformer = wasm_module("tests/wasm-fixtures", "misbehave-transformer");
    let dir = temp_dir("pl-hostile-plugins");
    // The deadline leaves room for copying a flood of violations out of the
    // sandbox in a debug build; the loop is still stopped by it.
    install(&dir, "misbehave-validator", &validator, "topics = [\"sandbox\"]\ndeadline_ms = 1000\nmemory_mib = 16\nmax_output_kib = 64\n");
    install(&dir, "misbehave-transformer", &transformer, "topics = [\"shaped\"]\ndeadline_ms = 100\nmemory_mib = 16\nmax_output_kib = 64\n");
    let g = start("pl-hostile", |c| c.plugins.dir = dir.clone()).await;
    for u in ["evil", "calm", "reader"] {
        g.add(u, "pw");
    }
    let mut evil = P::online(&g, "evil").await;
    evil.create("sandbox").await;
    evil.create("shaped").await;
    let mut calm = P::online(&g, "calm").await;
    calm.create("calm").await;
    let mut reader = P::online(&g, "reader").await;
    reader.subscribe("calm").await;
    reader.subscribe("shaped").await;

    // Another publisher and subscriber carry on while every hostile payload is refused.
    let calm_task = tokio::spawn(async move {
        let mut worst = Duration::ZERO;
        for i in 0..40 {
            let t = Instant::now();
            let r = calm.publish("calm", &format!("c{i}"), &format!("<x xmlns='urn:test'>calm {i}</x>")).await;
            assert!(r.contains("type='result'"), "{r}");
            worst = worst.max(t.elapsed());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        worst
    });
    for (what, says) in [("loop", "deadline"), ("bomb", "memory"), ("trap", "trap"), ("flood", "more than its limit")] {
        let t = Instant::now();
        let r = evil.publish("sandbox", what, &format!("<x xmlns='urn:test'>{what}</x>")).await;
        assert!(r.contains(&format!("<not-acceptable xmlns='{STANZAS}'/>")), "{what}: {r}");
        assert!(r.contains("misbehave-validator") && r.to_lowercase().contains(says), "{what}: {r}");
        assert!(t.elapsed() < Duration::from_secs(5), "{what} took {:?}", t.elapsed());
    }
    let r = evil.publish("sandbox", "fine", "<x xmlns='urn:test'>fine</x>").await;
    assert!(r.contains("type='result'"), "the validator works again after its failures: {r}");
    let worst = calm_task.await.unwrap();
    assert!(worst < Duration::from_secs(2), "another publisher waited {worst:?}");
    for i in 0..40 {
        let m = reader.item(Duration::from_secs(5)).await.unwrap_or_else(|| panic!("calm item {i} missing"));
        assert!(m.contains(&format!("calm {i}<")), "{i}: {m}");
    }

    // Transformers: failures withhold the item from that subscriber, nothing else.
    for what in ["plain", "redact", "withhold", "trap", "loop", "big", "after"] {
        let r = evil.publish("shaped", what, &format!("<x xmlns='urn:test'>{what}</x>")).await;
        assert!(r.contains("type='result'"), "{what}: {r}");
    }
    let mut got = Vec::new();
    while let Some(m) = reader.item(Duration::from_secs(2)).await {
        got.push(m);
    }
    assert_eq!(got.len(), 3, "{got:#?}");
    assert!(got[0].contains("id='plain'") && got[0].contains(">plain</x>"), "{}", got[0]);
    assert!(got[1].contains("id='redact'") && got[1].contains("<redacted xmlns='urn:test'/>"), "{}", got[1]);
    assert!(got[2].contains("id='after'"), "{}", got[2]);
    let audit = audit_lines(&g).await;
    for what in ["deadline", "memory", "trap"] {
        assert!(audit.iter().any(|l| l.contains("plugin-rejected") && l.contains("validate") && l.contains(what)), "{what}: {audit:#?}");
    }
    assert!(audit.iter().filter(|l| l.contains("plugin-rejected") && l.contains("\"transform\"")).count() >= 3, "{audit:#?}");
    g.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn plugins_dropped_in_replaced_and_removed_under_load_take_effect_within_two_seconds() {
    let misbehave = wasm_module("tests/wasm-fixtures", "misbehave-validator");
    let iodef = wasm_module("plugins", "iodef-validator");
    let dir = temp_dir("pl-reload-plugins");
    let g = start("pl-reload", |c| {
        c.plugins.dir = dir.clone();
        c.broker.max_items_per_page = 10_000;
    })
    .await;
    g.add("pub", "pw");
    let mut p = P::online(&g, "pub").await;
    p.create("load").await;
    // Phases: none (all accepted), the misbehaving validator ("reject" payloads
    // refused), the IODEF validator under the same name (these test payloads are
    // not IODEF: all refused), removed (all accepted).
    let manifest = "topics = [\"load\"]\n";
    let phase = Duration::from_secs(3);
    let mut log: Vec<(Instant, usize, String, bool)> = Vec::new();
    let mut changes = Vec::new();
    let started = Instant::now();
    let mut n = 0;
    for k in 0..4 {
        if k == 1 {
            install(&dir, "gate", &misbehave, manifest);
        } else if k == 2 {
            install(&dir, "gate", &iodef, manifest);
        } else if k == 3 {
            std::fs::remove_file(dir.join("gate.wasm")).unwrap();
        }
        changes.push(Instant::now());
        let until = started + phase * (k as u32 + 1);
        while Instant::now() < until {
            n += 1;
            let word = if n % 2 == 0 { "reject" } else { "ok" };
            let id = format!("i{n}");
            let t = Instant::now();
            let r = p.publish("load", &id, &format!("<x xmlns='urn:test'>{word} {n}</x>")).await;
            let accepted = r.contains("type='result'");
            assert!(accepted || r.contains("<not-acceptable"), "{r}");
            log.push((t, k, word.to_string(), accepted));
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    }
    // Settled (2 s after a change): exactly the rule of that phase.
    let rule = |k: usize, word: &str| match k {
        0 | 3 => true,
        1 => word == "ok",
        _ => false,
    };
    let mut checked = 0;
    for (t, k, word, accepted) in &log {
        let since = t.duration_since(changes[*k]);
        if *k == 0 || since >= Duration::from_secs(2) {
            assert_eq!(*accepted, rule(*k, word), "phase {k}, {word}, {since:?} after the change");
            checked += 1;
        } else if *k > 0 {
            // In transition: either the old or the new rule, nothing else.
            assert!(*accepted == rule(*k, word) || *accepted == rule(*k - 1, word), "phase {k} transition, {word}");
        }
    }
    assert!(checked > 100, "only {checked} settled publishes");
    // No acknowledged publish was lost.
    let r = p.iq("get", "<items node='load'/>").await;
    for (i, (_, _, _, accepted)) in log.iter().enumerate() {
        let has = r.contains(&format!("id='i{}'", i + 1));
        assert_eq!(has, *accepted, "item i{}", i + 1);
    }
    let audit = audit_lines(&g).await;
    assert!(audit.iter().any(|l| l.contains("plugin-reload") && l.contains("gate")), "{audit:#?}");
    g.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- tooling ------------------------------------------------------------------

fn xmpp_grid(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xmpp-grid")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn plugin_run_prints_the_verdict_with_its_exit_code() {
    let iodef = wasm_module("plugins", "iodef-validator");
    let redactor = wasm_module("plugins", "privacy-redactor");
    let misbehave = wasm_module("tests/wasm-fixtures", "misbehave-validator");
    let v = iodef.to_str().unwrap();
    let valid = corpus_dir("valid").join("02-phishing-campaign.xml");
    let invalid = corpus_dir("invalid").join("01-missing-purpose.xml");
    let (code, out, err) = xmpp_grid(&["plugin", "run", v, "--payload", valid.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("accepted"), "{out}");
    let (code, out, err) = xmpp_grid(&["plugin", "run", v, "--payload", invalid.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("/IODEF-Document/Incident[1]/@purpose: missing required attribute `purpose`"), "{out}");
    let (code, out, err) = xmpp_grid(&["plugin", "run", redactor.to_str().unwrap(), "--payload", valid.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("PHISH-7731") && !out.contains("jane.analyst@bank.example"), "{out}");
    let (code, out, _) = xmpp_grid(&[
        "plugin", "run", redactor.to_str().unwrap(), "--payload", valid.to_str().unwrap(), "--grant", "read-personal-data",
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("jane.analyst@bank.example"), "{out}");
    let dir = temp_dir("pl-run");
    let trap = dir.join("trap.xml");
    std::fs::write(&trap, "<x xmlns='urn:test'>trap</x>").unwrap();
    let (code, out, err) = xmpp_grid(&["plugin", "run", misbehave.to_str().unwrap(), "--payload", trap.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(out.contains("failed") && out.contains("trap"), "{out}");
    let junk = dir.join("junk.wasm");
    std::fs::write(&junk, b"\0asm junk").unwrap();
    let (code, _, err) = xmpp_grid(&["plugin", "run", junk.to_str().unwrap(), "--payload", trap.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_validates_plugins_and_manifests() {
    let misbehave = wasm_module("tests/wasm-fixtures", "misbehave-validator");
    let dir = temp_dir("pl-check");
    let config = dir.join("grid.toml");
    std::fs::write(&config, "domain = \"grid.test\"\n[plugins]\ndir = \"plugins\"\n").unwrap();
    let plugins = dir.join("plugins");
    install(&plugins, "gate", &misbehave, "topics = [\"load\"]\n");
    let (ok, out, err) = run_cli(&config, &["check"], None);
    assert!(ok, "{out}{err}");
    assert!(out.contains("gate") && out.contains("iodef-validator") && out.contains("privacy-redactor"), "{out}");
    // A half-copied component and a manifest with a typo are both reported by file.
    std::fs::write(plugins.join("broken.wasm"), &std::fs::read(&misbehave).unwrap()[..1000]).unwrap();
    std::fs::write(plugins.join("gate.toml"), "topicz = [\"load\"]\n").unwrap();
    let (ok, out, err) = run_cli(&config, &["check"], None);
    assert!(!ok, "{out}{err}");
    assert!(err.contains("broken.wasm") && err.contains("gate.toml") && err.contains("topicz"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
