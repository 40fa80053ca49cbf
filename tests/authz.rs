//! Authorization end to end: the shipped Cedar policies in a running server,
//! honeytoken alerts, hot reload of a policy file, and subscriptions ended by
//! a policy change (issue "Authorization by hot-reloaded Cedar policies").

mod common;

use common::*;
use std::time::Duration;

const PUBSUB: &str = "http://jabber.org/protocol/pubsub";

fn create(node: &str) -> String {
    format!(
        "<iq type='set' id='c-{node}' to='broker.grid.test'><pubsub xmlns='{PUBSUB}'><create node='{node}'/><configure><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/pubsub#node_config</value></field><field var='pubsub#access_model'><value>open</value></field><field var='pubsub#type'><value>urn:ietf:params:xml:ns:iodef-2.0</value></field></x></configure></pubsub></iq>"
    )
}

/// A grid with its own copy of the shipped policies (tests edit them).
async fn grid(name: &str) -> TestGrid {
    let policies = temp_dir(&format!("{name}-policies"));
    xmpp_grid::authz::cedar::install_defaults(&policies).unwrap();
    start(name, |c| c.policies.dir = policies).await
}

#[tokio::test]
async fn a_platform_without_a_role_may_connect_and_discover_but_not_create() {
    let g = grid("az-norole").await;
    g.add_with_roles("plain", "pw", &[]);
    let (mut c, _) = login(&g, "plain", "pw", "r").await;
    c.send(&create("t1")).await;
    let r = c.read_until("</iq>").await;
    assert!(r.contains("type='error'") && r.contains("<forbidden"), "{r}");
    c.send("<iq type='get' id='d1' to='broker.grid.test'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>").await;
    let r = c.read_until("</iq>").await;
    assert!(r.contains("type='result'"), "{r}");
    // The denial is audited.
    g.grid.audit.flush().await.unwrap();
    let log = xmpp_grid::audit::AuditLog::open(&g.grid.store).unwrap();
    let recs = log.tail(50).unwrap();
    assert!(recs.iter().any(|r| r.to_json_line().contains("\"denial\"") && r.to_json_line().contains("create")), "no denial audited");
    g.shutdown().await;
}

#[tokio::test]
async fn touching_a_honeytoken_is_denied_audited_and_published_as_an_iodef_alert() {
    let g = grid("az-honey").await;
    g.add("watcher", "pw");
    g.add("curious", "pw");
    let (mut w, _) = login(&g, "watcher", "pw", "r").await;
    w.send("<presence/>").await;
    // The alerts topic and the bait exist; the watcher subscribes to alerts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.send(&format!("<iq type='set' id='s1' to='broker.grid.test'><pubsub xmlns='{PUBSUB}'><subscribe node='grid-alerts' jid='watcher@grid.test'/></pubsub></iq>")).await;
    let r = w.read_until("</iq>").await;
    assert!(r.contains("subscription='subscribed'"), "{r}");
    let (mut c, _) = login(&g, "curious", "pw", "r").await;
    c.send("<iq type='get' id='d1' to='broker.grid.test'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>").await;
    let r = c.read_until("</iq>").await;
    assert!(r.contains("node='domain-admin-credentials'"), "the bait must be discoverable: {r}");
    c.send(&format!("<iq type='set' id='s2' to='broker.grid.test'><pubsub xmlns='{PUBSUB}'><subscribe node='domain-admin-credentials' jid='curious@grid.test'/></pubsub></iq>")).await;
    let r = c.read_until("</iq>").await;
    assert!(r.contains("<forbidden"), "{r}");
    // The alert arrives as an IODEF incident on the alerts topic.
    let alert = w.read_until("</message>").await;
    assert!(alert.contains("node='grid-alerts'") && alert.contains("IODEF-Document") && alert.contains("curious@grid.test"), "{alert}");
    g.grid.audit.flush().await.unwrap();
    let recs = xmpp_grid::audit::AuditLog::open(&g.grid.store).unwrap().tail(50).unwrap();
    assert!(recs.iter().any(|r| r.to_json_line().contains("honeytoken-alert")), "no honeytoken alert audited");
    g.shutdown().await;
}

#[tokio::test]
async fn a_policy_file_change_takes_effect_within_two_seconds_and_ends_subscriptions_it_forbids() {
    let g = grid("az-reload").await;
    g.add("owner", "pw");
    g.add("reader", "pw");
    let (mut o, _) = login(&g, "owner", "pw", "r").await;
    o.send(&create("feed")).await;
    o.read_until("id='c-feed'").await;
    let (mut r, _) = login(&g, "reader", "pw", "r").await;
    r.send("<presence/>").await;
    r.send(&format!("<iq type='set' id='s1' to='broker.grid.test'><pubsub xmlns='{PUBSUB}'><subscribe node='feed' jid='reader@grid.test'/></pubsub></iq>")).await;
    let s = r.read_until("</iq>").await;
    assert!(s.contains("subscription='subscribed'"), "{s}");
    // A broken file: the old set stays, the error names file:line:col.
    std::fs::write(g.grid.cfg.policies.dir.join("broken.cedar"), "forbid(principal, action, resource) when { oops };\n").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    o.send("<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>").await;
    o.read_until("id='p1'").await;
    std::fs::remove_file(g.grid.cfg.policies.dir.join("broken.cedar")).unwrap();
    // Forbid reading "feed" to reader: the live subscription ends with a notification.
    let t = std::time::Instant::now();
    std::fs::write(
        g.grid.cfg.policies.dir.join("local.cedar"),
        "@id(\"no-feed-for-reader\")\nforbid(principal == Grid::Platform::\"reader\", action in Grid::Action::\"read\", resource) when { resource has owner };\n",
    )
    .unwrap();
    let n = r.read_until("</message>").await;
    assert!(n.contains("subscription='none'") && n.contains("node='feed'"), "{n}");
    assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
    g.grid.audit.flush().await.unwrap();
    let recs = xmpp_grid::audit::AuditLog::open(&g.grid.store).unwrap().tail(100).unwrap();
    let lines: Vec<String> = recs.iter().map(|r| r.to_json_line()).collect();
    assert!(lines.iter().any(|l| l.contains("policy-reload") && l.contains("broken.cedar:1:")), "broken reload not audited with its location: {lines:?}");
    assert!(lines.iter().any(|l| l.contains("policy-reload") && l.contains("\"ok\"")), "{lines:?}");
    g.shutdown().await;
}

const CMD: &str = "http://jabber.org/protocol/commands";

fn disable_user_submit(jid: &str) -> String {
    format!(
        "<iq type='set' id='x2' to='grid.test'><command xmlns='{CMD}' node='http://jabber.org/protocol/admin#disable-user' sessionid='s1'><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/admin</value></field><field var='accountjids'><value>{jid}</value></field></x></command></iq>"
    )
}

#[tokio::test]
async fn xep_0133_disable_user_revokes_at_once_for_an_admin_with_a_certificate_only() {
    let g = grid("az-xep0133").await;
    g.add_with_roles("boss", "pw", &["admin"]);
    g.add("victim", "pw");
    let (mut victim, _) = login(&g, "victim", "pw", "v").await;

    // The admin role with a password login: refused (RFC 8600 §8.3.3).
    let (mut pw_admin, _) = login(&g, "boss", "pw", "pw").await;
    pw_admin.send(&disable_user_submit("victim@grid.test")).await;
    let r = pw_admin.read_until("</iq>").await;
    assert!(r.contains("<forbidden"), "{r}");

    // With a certificate: the form, then the revocation.
    let issued = xmpp_grid::pki::issue_client_cert(&g.grid.cfg.tls_dir(), "boss@grid.test", 30).unwrap();
    let cfg = client_config(&g.ca_path(), Some((&issued.cert_pem, &issued.key_pem)), rustls::DEFAULT_VERSIONS);
    let (mut c, _) = starttls_with(&g, cfg).await;
    c.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>").await;
    c.read_until("<success").await;
    c.read_until(">").await;
    let (mut admin, _) = bind(c, "cert").await;
    admin.send(&format!("<iq type='set' id='x1' to='grid.test'><command xmlns='{CMD}' node='http://jabber.org/protocol/admin#disable-user' action='execute'/></iq>")).await;
    let form = admin.read_until("</iq>").await;
    assert!(form.contains("status='executing'") && form.contains("var='accountjids'"), "{form}");
    let t = std::time::Instant::now();
    admin.send(&disable_user_submit("victim@grid.test")).await;
    let done = admin.read_until("</iq>").await;
    assert!(done.contains("status='completed'") && done.contains("Disabled 1 platform"), "{done}");
    let gone = victim.read_to_close().await;
    assert!(gone.contains("platform revoked"), "{gone}");
    assert!(t.elapsed() < Duration::from_secs(1), "took {:?}", t.elapsed());
    g.shutdown().await;
}
