//! Payload plugin cost: one call of the built-in IODEF validator and privacy
//! redactor on a 2 KiB IODEF 2.0 document, sandbox included (a fresh Store
//! and instance per call, the deadline and memory cap armed), as the broker
//! makes it. Fan-out with the plugins on and off is `benches/fanout.rs`
//! (see docs/benchmarks.md for the commands).
//!
//! cargo bench --bench plugins -- [--calls N] [--runs N]

use std::time::Instant;
use xmpp_grid::plugins::{builtin, Host, HostOptions, Plugin, PublisherInfo, SubscriberInfo, TopicInfo, Transformed, Verdict};

const DOC: &str = "tests/data/iodef/valid/03-ddos-udp-flood.xml";

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs `call` `calls` times per run; prints per-run mean and the median, and
/// p50/p99 of single calls over all runs. Returns the median mean (µs).
fn measure(what: &str, calls: usize, runs: usize, mut call: impl FnMut()) -> f64 {
    for _ in 0..200 {
        call(); // warm-up: page in the pool slots and code
    }
    let mut means = Vec::new();
    let mut singles = Vec::with_capacity(calls * runs);
    for _ in 0..runs {
        let start = Instant::now();
        for _ in 0..calls {
            let t = Instant::now();
            call();
            singles.push(t.elapsed().as_secs_f64() * 1e6);
        }
        means.push(start.elapsed().as_secs_f64() * 1e6 / calls as f64);
    }
    singles.sort_by(|a, b| a.total_cmp(b));
    let m = median(means.clone());
    println!(
        "{what:<42} median of {runs} run means {m:>7.1} µs/call  (runs: {})  single calls p50 {:.1} µs, p99 {:.1} µs",
        means.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(" "),
        singles[singles.len() / 2],
        singles[singles.len() * 99 / 100],
    );
    m
}

fn find(host: &Host, name: &str) -> std::sync::Arc<Plugin> {
    match host.current().plugins().iter().find(|p| p.name == name) {
        Some(p) => p.clone(),
        None => panic!("built-in plugin {name} missing (built with XMPP_GRID_NO_BUILTIN_PLUGINS?)"),
    }
}

fn main() {
    let calls = arg("--calls", 5000);
    let runs = arg("--runs", 5);
    let payload = std::fs::read(DOC).unwrap_or_else(|e| panic!("{DOC}: {e} (run from the repository root)"));
    let cache = std::env::temp_dir().join(format!("xg-bench-plugins-{}", std::process::id()));
    let t = Instant::now();
    let host = Host::new(HostOptions { cache_dir: Some(cache.clone()), builtins: builtin::BUILTINS.to_vec(), use_builtins: true })
        .unwrap_or_else(|e| panic!("plugin host: {e}"));
    let empty = cache.join("none");
    let _ = std::fs::create_dir_all(&empty);
    let report = host.reload(&empty);
    println!("loaded {:?} in {:.1} ms (compile; cached afterwards)", report.loaded, t.elapsed().as_secs_f64() * 1e3);
    let t = Instant::now();
    let again = Host::new(HostOptions { cache_dir: Some(cache.clone()), builtins: builtin::BUILTINS.to_vec(), use_builtins: true })
        .unwrap_or_else(|e| panic!("plugin host: {e}"));
    again.reload(&empty);
    println!("reloaded from the precompiled cache in {:.2} ms", t.elapsed().as_secs_f64() * 1e3);

    let topic = TopicInfo { name: "incidents".into(), payload_type: Some("urn:ietf:params:xml:ns:iodef-2.0".into()), owner: "sensor@grid.test".into() };
    let publisher = PublisherInfo { jid: "sensor@grid.test".into(), roles: vec!["publisher".into()], templates: vec![] };
    let validator = find(&host, "iodef-validator");
    let redactor = find(&host, "privacy-redactor");
    assert!(matches!(validator.validate(&topic, &publisher, &payload), Ok(Verdict::Accept)), "the document must be valid");
    println!("payload: {DOC}, {} bytes; {calls} calls x {runs} runs; {} cores", payload.len(), std::thread::available_parallelism().map_or(0, |n| n.get()));
    let v = measure("iodef-validator validate (accept)", calls, runs, || {
        let _ = validator.validate(&topic, &publisher, &payload);
    });
    let plain = SubscriberInfo { jid: None, roles: vec!["subscriber".into()], grants: vec![] };
    let cleared = SubscriberInfo { jid: None, roles: vec!["subscriber".into()], grants: vec!["read-personal-data".into()] };
    assert!(matches!(redactor.transform(&topic, &plain, &payload), Ok(Transformed::Rewritten(_))), "the document must carry personal data");
    measure("privacy-redactor transform (redacts)", calls, runs, || {
        let _ = redactor.transform(&topic, &plain, &payload);
    });
    measure("privacy-redactor transform (granted)", calls, runs, || {
        let _ = redactor.transform(&topic, &cleared, &payload);
    });
    println!("target: validator < 50 µs per 2 KiB item including the sandbox: {}", if v < 50.0 { "met" } else { "MISSED" });
    let _ = std::fs::remove_dir_all(&cache);
}
