//! Interoperability of the broker (XEP-0060 at broker.grid.test) with pubsub
//! clients nobody here wrote: slixmpp's xep_0060 plugin and aioxmpp's
//! PubSubClient, run as subprocesses (Debian's /usr/bin/python3, as in
//! tests/interop.rs) against the controller started in-process. Also the shared
//! smoke test, /work/shared/peers/smoke.py, unmodified, from ../shared beside the
//! repository, as CI lays it out.
//!
//! Needs: python3-slixmpp (1.8.3), python3-aioxmpp (0.13.3), libxml2-utils
//! (xmllint, to check the IODEF sample against the RFC 7970 schema in
//! ../shared/data/iodef/schema).
//!
//! The scripts print one line per check ("ok"/"FAIL") and exit 0 only if all
//! passed; each runs under its own deadline and under `CLIENT_DEADLINE` here.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest any one client subprocess may run before the test fails.
const CLIENT_DEADLINE: Duration = Duration::from_secs(60);

/// `../shared/<rel>` beside the repository.
fn shared(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared").join(rel)
}

/// A script's run must end with exit 0, "N passed, 0 failed" and no FAIL line.
fn assert_all_checks_passed(r: &ChildRun) {
    assert!(r.ok(), "{r}");
    assert!(r.stdout.contains(" passed, 0 failed"), "{r}");
    assert!(!r.stdout.lines().any(|l| l.starts_with("FAIL")), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iodef_sample_is_valid_against_the_rfc_7970_schema() {
    let mut c = tokio::process::Command::new("xmllint");
    c.arg("--nonet").arg("--noout").arg("--schema").arg(shared("data/iodef/schema/iodef-2.0.xsd"));
    c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/iodef-sample.xml"));
    let r = run_child(c, Duration::from_secs(20)).await;
    assert!(r.ok(), "{r}");
    assert!(r.stderr.contains("validates"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slixmpp_xep0060_create_configure_discover_publish_retrieve_retract_purge_delete() {
    let g = start("px-slix", |_| {}).await;
    g.add("slixowner", "s3cret");
    g.add("slixsub", "s3cret");
    let cmd = interop_python("slix_pubsub.py", g.starttls.port(), &g.ca_path(), &[
        "--owner", "slixowner@grid.test", "--subscriber", "slixsub@grid.test", "--password", "s3cret", "--timeout", "45",
    ]);
    let r = run_child(cmd, CLIENT_DEADLINE).await;
    assert_all_checks_passed(&r);
    // The checks the brief names, so that a script edit cannot drop them silently.
    for step in [
        "ok   owner creates the node with a node_config form",
        "ok   configure get: pubsub#type is IODEF 2.0",
        "ok   configure set: title and description changed, the rest kept",
        "ok   disco#items on the broker lists the node with its title",
        "ok   disco#info on the node: identity pubsub/leaf",
        "ok   meta-data pubsub#type is IODEF 2.0",
        "ok   subscriber subscribes (open node)",
        "ok   notification for incident-5: IODEF payload intact",
        "ok   retrieve all items, in publish order",
        "ok   retrieve max_items=2: the two most recent",
        "ok   retrieve by id: payload intact",
        "ok   RSM paging (max 2, after=<last>): three pages, every item once",
        "ok   RSM paging backwards (max 4, before=<first>): two pages",
        "ok   republish incident-4: still one item of that id, with the new payload",
        "ok   retract notification names incident-2",
        "ok   purge notification names the node",
        "ok   delete notification names the node",
    ] {
        assert!(r.stdout.contains(step), "missing {step:?}\n{r}");
    }
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aioxmpp_pubsubclient_create_configure_discover_publish_retrieve_retract_purge_delete() {
    let g = start("px-aioxmpp", |_| {}).await;
    g.add("aioxowner", "s3cret");
    g.add("aioxsub", "s3cret");
    let cmd = interop_python("aioxmpp_pubsub.py", g.starttls.port(), &g.ca_path(), &[
        "--owner", "aioxowner@grid.test", "--subscriber", "aioxsub@grid.test", "--password", "s3cret", "--timeout", "45",
    ]);
    let r = run_child(cmd, CLIENT_DEADLINE).await;
    assert_all_checks_passed(&r);
    for step in [
        "ok   owner creates the node with a node_config form",
        "ok   configure set (the form as received, two values changed): applied, the rest kept",
        "ok   disco#info on the node: pubsub#meta-data form with pubsub#type IODEF 2.0",
        "ok   notification for aiox-5: IODEF payload intact",
        "ok   retrieve by ids",
        "ok   RSM paging (max 2, after=<last>): every item once, count right",
        "ok   subscriber gets the retraction of aiox-3",
        "ok   subscriber gets a purge notification",
        "ok   subscriber gets a delete notification",
    ] {
        assert!(r.stdout.contains(step), "missing {step:?}\n{r}");
    }
    g.shutdown().await;
}

/// RFC 8600 §6: a subscriber that was away gets what was published meanwhile, in
/// order, once, with XEP-0203 delay stamps; then live items without. 100 items is
/// more than one round of the broker's replay (64 per round).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slixmpp_offline_delivery_in_order_with_delay_stamps_then_live() {
    let g = start("px-offline", |_| {}).await;
    g.add("offowner", "s3cret");
    g.add("offsub", "s3cret");
    let cmd = interop_python("slix_offline.py", g.starttls.port(), &g.ca_path(), &[
        "--owner", "offowner@grid.test", "--subscriber", "offsub@grid.test", "--password", "s3cret",
        "--count", "100", "--timeout", "45",
    ]);
    let r = run_child(cmd, CLIENT_DEADLINE).await;
    assert_all_checks_passed(&r);
    for step in [
        "ok   offline delivery after login: every item once, in publish order",
        "ok   offline delivery after login: each carries an XEP-0203 delay",
        "ok   offline delivery after login: stamps are the publication times, non-decreasing",
        "ok   live items after the backlog: each once, in order",
        "ok   live items carry no delay stamp",
        "ok   offline delivery after available presence: every item once, in publish order",
        "ok   offline delivery after a retraction: every item once, in publish order",
        "ok   no item delivered twice over the whole run",
    ] {
        assert!(r.stdout.contains(step), "missing {step:?}\n{r}");
    }
    g.shutdown().await;
}

// ---- The shared smoke test, unmodified ----

/// Runs ../shared/peers/smoke.py against `g` with platform1/platform2 (password
/// "secret") and `extra` arguments.
async fn smoke(g: &TestGrid, extra: &[&str]) -> ChildRun {
    g.add("platform1", "secret");
    g.add("platform2", "secret");
    let mut c = tokio::process::Command::new("/usr/bin/python3");
    c.env("PYTHONDONTWRITEBYTECODE", "1");
    c.arg(shared("peers/smoke.py"))
        .arg("--port")
        .arg(g.starttls.port().to_string())
        .arg("--ca")
        .arg(g.ca_path())
        .args(["--user-prefix", "platform", "--password", "secret"])
        .args(extra);
    run_child(c, CLIENT_DEADLINE).await
}

fn assert_smoke_passed(r: &ChildRun) {
    assert!(r.ok(), "{r}");
    let summary = r.stdout.lines().last().unwrap_or_default();
    assert!(summary.starts_with("PASS: ") && summary.contains(" 0 failed"), "summary {summary:?}\n{r}");
    assert!(!r.stdout.lines().any(|l| l.starts_with("FAIL")), "{r}");
    assert!(r.stdout.contains("PASS B receives event notification, payload intact"), "{r}");
    assert!(r.stdout.contains("PASS B retrieves item by id, payload intact"), "{r}");
}

/// Without -PLUS offered, stock slixmpp picks SCRAM-SHA-256 straight away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_smoke_test_passes_without_channel_binding() {
    let g = start("px-smoke", |cfg| cfg.auth.channel_binding = false).await;
    let r = smoke(&g, &[]).await;
    assert_smoke_passed(&r);
    assert!(r.stdout.contains("mechanism SCRAM-SHA-256"), "{r}");
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_smoke_test_passes_with_plain_on_the_default_config() {
    let g = start("px-smoke-plain", |_| {}).await;
    let r = smoke(&g, &["--mech", "PLAIN"]).await;
    assert_smoke_passed(&r);
    assert!(r.stdout.contains("mechanism PLAIN"), "{r}");
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slixmpp_publisher_gets_the_violation_and_subscribers_get_personal_data_by_their_grants() {
    // The built-in plugins, as on a fresh `xmpp-grid serve`.
    let g = start("px-plugins", |c| c.plugins.builtin = true).await;
    g.add_with_roles("slixpub", "s3cret", &["publisher"]);
    g.add_with_roles("slixcleared", "s3cret", &["subscriber", "privacy-cleared"]);
    g.add_with_roles("slixplain", "s3cret", &["subscriber"]);
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/iodef");
    let invalid = data.join("invalid/01-missing-purpose.xml");
    let valid = data.join("valid/02-phishing-campaign.xml");
    let cmd = interop_python("slix_plugins.py", g.starttls.port(), &g.ca_path(), &[
        "--owner", "slixpub@grid.test", "--cleared", "slixcleared@grid.test", "--plain", "slixplain@grid.test",
        "--password", "s3cret", "--timeout", "45",
        "--invalid", invalid.to_str().unwrap(), "--violation", "/IODEF-Document/Incident[1]/@purpose: missing required attribute `purpose`",
        "--valid", valid.to_str().unwrap(), "--keep", "PHISH-7731",
        "--personal", "jane.analyst@bank.example", "--personal", "+44 20 7946 0958", "--personal", "Threadneedle",
    ]);
    let r = run_child(cmd, CLIENT_DEADLINE).await;
    assert_all_checks_passed(&r);
    for step in [
        "ok   invalid IODEF is refused with not-acceptable",
        "ok   the error text carries the violation",
        "ok   the cleared subscriber receives the personal data",
        "ok   the other subscriber receives it redacted",
        "ok   retrieval by the other subscriber is redacted too",
    ] {
        assert!(r.stdout.contains(step), "missing {step:?}\n{r}");
    }
    g.shutdown().await;
}
