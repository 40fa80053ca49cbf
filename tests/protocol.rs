//! Protocol tests: the controller in-process on 127.0.0.1:0, literal XML over real
//! TLS, for stream negotiation, SASL, binding, routing, limits and shutdown
//! (RFC 6120, issue "Controller core").

mod common;

use base64::Engine as _;
use common::*;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

fn auth(mech: &str, data: &str) -> String {
    format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='{mech}'>{data}</auth>")
}

fn plain_b64(user: &str, pass: &str) -> String {
    B64.encode(format!("\0{user}\0{pass}"))
}

#[tokio::test]
async fn starttls_is_required_and_nothing_else_is_offered_before_tls() {
    let g = start("st-required", |_| {}).await;
    let (mut c, features) = plain(g.starttls).await;
    assert!(features.contains("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>"), "{features}");
    assert!(!features.contains("mechanisms"), "SASL offered before TLS: {features}");
    // Trying SASL in plaintext ends the stream.
    c.send(&auth("PLAIN", &plain_b64("a", "b"))).await;
    let rest = c.read_to_close().await;
    assert!(rest.contains("<policy-violation"), "{rest}");
    g.shutdown().await;
}

#[tokio::test]
async fn plaintext_pipelined_after_starttls_aborts_the_connection() {
    let g = start("st-inject", |_| {}).await;
    let (mut c, _) = plain(g.starttls).await;
    // CVE-2011-0411: the injected IQ would otherwise be read as if sent over TLS.
    c.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><iq type='get' id='x'/>").await;
    let got = c.read_to_close().await;
    assert!(!got.contains("<iq"), "{got}");
    g.shutdown().await;
}

#[tokio::test]
async fn sasl_mechanisms_and_channel_binding_types_are_advertised_after_tls() {
    let g = start("mechs", |_| {}).await;
    let (_c, f) = starttls(&g).await;
    for m in ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-1", "PLAIN"] {
        assert!(f.contains(&format!("<mechanism>{m}</mechanism>")), "{m} missing: {f}");
    }
    assert!(!f.contains("EXTERNAL"), "EXTERNAL offered without a certificate: {f}");
    assert!(f.contains("<sasl-channel-binding xmlns='urn:xmpp:sasl-cb:0'>"), "{f}");
    assert!(f.contains("type='tls-exporter'"), "{f}");
    assert!(f.contains("type='tls-server-end-point'"), "{f}");
    g.shutdown().await;
}

#[tokio::test]
async fn plain_can_be_switched_off() {
    let g = start("noplain", |c| c.auth.plain = false).await;
    let (mut c, f) = starttls(&g).await;
    assert!(!f.contains("<mechanism>PLAIN</mechanism>"), "{f}");
    c.send(&auth("PLAIN", &plain_b64("a", "b"))).await;
    let r = c.read_until("</failure>").await;
    assert!(r.contains("<invalid-mechanism/>"), "{r}");
    g.shutdown().await;
}

#[tokio::test]
async fn plain_login_binds_and_wrong_or_unknown_credentials_fail_alike() {
    let g = start("plain", |_| {}).await;
    g.add("sensor1", "s3cret");
    let (mut c, _) = starttls(&g).await;
    c.send(&auth("PLAIN", &plain_b64("sensor1", "wrong"))).await;
    let wrong = c.read_until("</failure>").await;
    c.send(&auth("PLAIN", &plain_b64("nobody", "wrong"))).await;
    let unknown = c.read_until("</failure>").await;
    assert!(wrong.contains("<not-authorized/>"), "{wrong}");
    assert_eq!(wrong, unknown, "unknown user distinguishable from wrong password");
    c.send(&auth("PLAIN", &plain_b64("sensor1", "s3cret"))).await;
    c.read_until("<success").await;
    c.read_until(">").await;
    let (_c, jid) = bind(c, "ids").await;
    assert_eq!(jid, "sensor1@grid.test/ids");
    g.shutdown().await;
}

#[tokio::test]
async fn repeated_failures_end_the_stream() {
    let g = start("failures", |_| {}).await;
    let (mut c, _) = starttls(&g).await;
    for _ in 0..3 {
        c.send(&auth("PLAIN", &plain_b64("x", "y"))).await;
    }
    let r = c.read_to_close().await;
    assert!(r.contains("<policy-violation"), "{r}");
    g.shutdown().await;
}

async fn scram_login(g: &TestGrid, hash: scram::Hash, mech: &str, gs2: &str, cb: &[u8], password: &str) -> (Tls, String) {
    let (mut c, _) = starttls(g).await;
    let mut client = scram::Client::new(hash, "sensor1", password, gs2, cb);
    c.send(&auth(mech, &B64.encode(client.first()))).await;
    let ch = match c.try_read_until("</challenge>", Duration::from_secs(5)).await {
        Ok(ch) => ch,
        Err(failure) => return (c, failure), // refused at the first message
    };
    let sf = ch.split('>').nth(1).unwrap().trim_end_matches("</challenge");
    let server_first = String::from_utf8(B64.decode(sf).unwrap()).unwrap();
    let last = client.last(&server_first);
    c.send(&format!("<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>", B64.encode(last))).await;
    let r = c.try_read_until("</failure>", Duration::from_secs(2)).await;
    match r {
        Ok(failure) => (c, failure),
        Err(rest) => {
            c.buf = rest.clone();
            let success = c.read_until("</success>").await;
            let data = success.split('>').nth(1).unwrap().trim_end_matches("</success");
            let server_final = String::from_utf8(B64.decode(data).unwrap()).unwrap();
            assert!(client.verify(&server_final), "server signature did not verify: {server_final}");
            (c, success)
        }
    }
}

#[tokio::test]
async fn scram_sha_256_and_sha_1_log_in_and_verify_the_server() {
    let g = start("scram", |_| {}).await;
    g.add("sensor1", "pencil");
    let (_c, r) = scram_login(&g, scram::Hash::Sha256, "SCRAM-SHA-256", "n,,", b"", "pencil").await;
    assert!(r.contains("<success"), "{r}");
    let (_c, r) = scram_login(&g, scram::Hash::Sha1, "SCRAM-SHA-1", "n,,", b"", "pencil").await;
    assert!(r.contains("<success"), "{r}");
    let (_c, r) = scram_login(&g, scram::Hash::Sha256, "SCRAM-SHA-256", "n,,", b"", "wrong").await;
    assert!(r.contains("<not-authorized/>"), "{r}");
    g.shutdown().await;
}

#[tokio::test]
async fn scram_plus_binds_to_this_tls_channel_and_downgrades_are_refused() {
    let g = start("scram-plus", |_| {}).await;
    g.add("sensor1", "pencil");
    // Right tls-exporter data: computed on our side of this very connection.
    let (mut c, _) = starttls(&g).await;
    let cb = c.io.get_ref().1.export_keying_material([0u8; 32], b"EXPORTER-Channel-Binding", Some(&[])).unwrap();
    let mut client = scram::Client::new(scram::Hash::Sha256, "sensor1", "pencil", "p=tls-exporter,,", &cb);
    c.send(&auth("SCRAM-SHA-256-PLUS", &B64.encode(client.first()))).await;
    let ch = c.read_until("</challenge>").await;
    let sf = ch.split('>').nth(1).unwrap().trim_end_matches("</challenge");
    let last = client.last(&String::from_utf8(B64.decode(sf).unwrap()).unwrap());
    c.send(&format!("<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>", B64.encode(last))).await;
    let ok = c.read_until("</success>").await;
    assert!(ok.contains("<success"), "{ok}");

    // Wrong binding data (another channel's): refused.
    let (_c, r) = scram_login(&g, scram::Hash::Sha256, "SCRAM-SHA-256-PLUS", "p=tls-exporter,,", &[7u8; 32], "pencil").await;
    assert!(r.contains("<failure"), "{r}");
    // "y": the client supports binding but believes the server does not; the server
    // did offer -PLUS, so someone stripped it (RFC 5802 §6).
    let (_c, r) = scram_login(&g, scram::Hash::Sha256, "SCRAM-SHA-256", "y,,", b"", "pencil").await;
    assert!(r.contains("<failure"), "{r}");
    g.shutdown().await;
}

#[tokio::test]
async fn external_uses_the_client_certificate_and_is_offered_only_with_one() {
    let g = start("external", |_| {}).await;
    g.add("cmdb", "");
    let issued = xmpp_grid::pki::issue_client_cert(&g.grid.cfg.tls_dir(), "cmdb@grid.test", 30).unwrap();
    let cfg = client_config(&g.ca_path(), Some((&issued.cert_pem, &issued.key_pem)), rustls::DEFAULT_VERSIONS);
    let (mut c, f) = starttls_with(&g, cfg).await;
    assert!(f.contains("<mechanism>EXTERNAL</mechanism>"), "{f}");
    c.send(&auth("EXTERNAL", "=")).await;
    c.read_until("<success").await;
    c.read_until(">").await;
    let (_c, jid) = bind(c, "r").await;
    assert_eq!(jid, "cmdb@grid.test/r");

    // A certificate for a platform that has no account: refused.
    let stray = xmpp_grid::pki::issue_client_cert(&g.grid.cfg.tls_dir(), "ghost@grid.test", 30).unwrap();
    let cfg = client_config(&g.ca_path(), Some((&stray.cert_pem, &stray.key_pem)), rustls::DEFAULT_VERSIONS);
    let (mut c, _) = starttls_with(&g, cfg).await;
    c.send(&auth("EXTERNAL", "=")).await;
    let r = c.read_until("</failure>").await;
    assert!(r.contains("<not-authorized/>"), "{r}");
    g.shutdown().await;
}

#[tokio::test]
async fn direct_tls_with_alpn_works() {
    let g = start("direct", |_| {}).await;
    g.add("sensor1", "pw");
    let mut cfg = (*client_config(&g.ca_path(), None, rustls::DEFAULT_VERSIONS)).clone();
    cfg.alpn_protocols = vec![b"xmpp-client".to_vec()];
    let tcp = tokio::net::TcpStream::connect(g.direct).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(DOMAIN).unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)).connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"xmpp-client"[..]));
    let mut c = Raw::new(tls);
    c.send(HEADER).await;
    let f = c.read_until("</stream:features>").await;
    assert!(f.contains("<mechanism>PLAIN</mechanism>") && !f.contains("starttls"), "{f}");
    c.send(&auth("PLAIN", &plain_b64("sensor1", "pw"))).await;
    c.read_until("<success").await;
    g.shutdown().await;
}

#[tokio::test]
async fn tls_1_2_is_accepted() {
    let g = start("tls12", |_| {}).await;
    let cfg = client_config(&g.ca_path(), None, &[&rustls::version::TLS12]);
    let (c, f) = starttls_with(&g, cfg).await;
    assert_eq!(c.io.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
    assert!(f.contains("SCRAM-SHA-256-PLUS"), "{f}");
    g.shutdown().await;
}

#[tokio::test]
async fn bind_generates_a_resource_and_a_conflict_replaces_the_old_session() {
    let g = start("bind", |_| {}).await;
    g.add("a", "pw");
    let (_c, jid) = login(&g, "a", "pw", "").await;
    assert!(jid.starts_with("a@grid.test/") && jid.len() > "a@grid.test/".len(), "{jid}");
    let (mut old, _) = login(&g, "a", "pw", "desk").await;
    let (mut new, _) = login(&g, "a", "pw", "desk").await;
    let gone = old.read_to_close().await;
    assert!(gone.contains("<conflict"), "{gone}");
    new.send("<iq type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>").await;
    new.read_until("id='p'").await;
    g.shutdown().await;
}

#[tokio::test]
async fn stanzas_before_bind_end_the_stream_with_not_authorized() {
    let g = start("prebind", |_| {}).await;
    g.add("a", "pw");
    let (mut c, _) = starttls(&g).await;
    c.send(&auth("PLAIN", &plain_b64("a", "pw"))).await;
    c.read_until("<success").await;
    c.send(HEADER).await;
    let f = c.read_until("</stream:features>").await;
    assert!(f.contains("urn:ietf:params:xml:ns:xmpp-bind"), "{f}");
    c.send("<message to='a@grid.test'><body>x</body></message>").await;
    let r = c.read_to_close().await;
    assert!(r.contains("<not-authorized"), "{r}");
    g.shutdown().await;
}

#[tokio::test]
async fn server_answers_ping_disco_and_legacy_session_and_refuses_unknown_payloads() {
    let g = start("server-iq", |_| {}).await;
    g.add("a", "pw");
    let (mut c, _) = login(&g, "a", "pw", "r").await;
    c.send("<iq type='set' id='s1'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>").await;
    let r = c.read_until("id='s1'").await + &c.read_until(">").await;
    assert!(r.contains("type='result'") && r.contains("id='s1'"), "{r}");
    c.send("<iq type='get' id='p1' to='grid.test'><ping xmlns='urn:xmpp:ping'/></iq>").await;
    let r = c.read_until("id='p1'").await + &c.read_until(">").await;
    assert!(r.contains("type='result'"), "{r}");
    c.send("<iq type='get' id='d1' to='grid.test'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>").await;
    let r = c.read_until("</iq>").await;
    assert!(r.contains("category='server'") && r.contains("var='urn:xmpp:ping'"), "{r}");
    c.send("<iq type='get' id='d2' to='grid.test'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>").await;
    let r = c.read_until("</iq>").await;
    assert!(r.contains("jid='broker.grid.test'"), "{r}");
    c.send("<iq type='get' id='u1' to='grid.test'><query xmlns='urn:example:unknown'/></iq>").await;
    let r = c.read_until("</iq>").await;
    assert!(r.contains("type='error'") && r.contains("<service-unavailable"), "{r}");
    // Results and errors are never answered: the next thing we get is p2's answer.
    c.send("<iq type='result' id='r1' to='grid.test'/><iq type='error' id='e1' to='grid.test'/>").await;
    c.send("<iq type='get' id='p2'><ping xmlns='urn:xmpp:ping'/></iq>").await;
    let r = c.read_until("/>").await;
    assert!(r.contains("id='p2'") && !r.contains("r1") && !r.contains("e1"), "{r}");
    // Two children in a get: bad-request.
    c.send("<iq type='get' id='b1' to='grid.test'><ping xmlns='urn:xmpp:ping'/><ping xmlns='urn:xmpp:ping'/></iq>").await;
    let r = c.read_until("</iq>").await;
    assert!(r.contains("<bad-request"), "{r}");
    g.shutdown().await;
}

#[tokio::test]
async fn messages_route_between_platforms_with_stamped_from() {
    let g = start("route", |_| {}).await;
    g.add("ids", "pw");
    g.add("siem", "pw");
    let (mut ids, _) = login(&g, "ids", "pw", "s1").await;
    let (mut siem, _) = login(&g, "siem", "pw", "r").await;
    siem.send("<presence/>").await;
    // Full JID.
    ids.send("<message to='siem@grid.test/r' id='m1'><body>hello</body></message>").await;
    let m = siem.read_until("</message>").await;
    assert!(m.contains("from='ids@grid.test/s1'") && m.contains("<body>hello</body>"), "{m}");
    // Bare JID reaches available sessions.
    ids.send("<message to='SIEM@grid.test' id='m2' type='chat'><body>two</body></message>").await;
    let m = siem.read_until("</message>").await;
    assert!(m.contains("<body>two</body>"), "{m}");
    // An offline platform: the sender is told.
    ids.send("<message to='nobody@grid.test' id='m3'><body>x</body></message>").await;
    let e = ids.read_until("</message>").await;
    assert!(e.contains("type='error'") && e.contains("<service-unavailable"), "{e}");
    // IQ to a missing full JID.
    ids.send("<iq to='siem@grid.test/gone' type='get' id='q1'><query xmlns='urn:x'/></iq>").await;
    let e = ids.read_until("</iq>").await;
    assert!(e.contains("<service-unavailable"), "{e}");
    // Another domain: no federation.
    ids.send("<message to='x@elsewhere.example' id='m4'><body>x</body></message>").await;
    let e = ids.read_until("</message>").await;
    assert!(e.contains("<remote-server-not-found"), "{e}");
    // Malformed JID.
    ids.send("<message to='a@b@c' id='m5'><body>x</body></message>").await;
    let e = ids.read_until("</message>").await;
    assert!(e.contains("<jid-malformed"), "{e}");
    g.shutdown().await;
}

#[tokio::test]
async fn a_spoofed_from_ends_the_stream_with_invalid_from() {
    let g = start("spoof", |_| {}).await;
    g.add("a", "pw");
    let (mut c, _) = login(&g, "a", "pw", "r").await;
    c.send("<message from='admin@grid.test/x' to='a@grid.test'><body>x</body></message>").await;
    let r = c.read_to_close().await;
    assert!(r.contains("<invalid-from"), "{r}");
    g.shutdown().await;
}

#[tokio::test]
async fn hostile_xml_gets_the_rfc_6120_stream_errors() {
    let g = start("hostile", |c| c.limits.max_stanza_bytes = 8192).await;
    g.add("a", "pw");
    let cases = [
        ("<!DOCTYPE x [<!ENTITY a 'b'>]>", "restricted-xml"),
        ("<?pi x?>", "restricted-xml"),
        ("<!-- c -->", "restricted-xml"),
        ("<message><body>&xxe;</body></message>", "restricted-xml"),
        ("<message><body>a</bodyx></message>", "not-well-formed"),
        ("<1message/>", "not-well-formed"),
    ];
    for (input, condition) in cases {
        let (mut c, _) = login(&g, "a", "pw", "r").await;
        c.send(input).await;
        let r = c.read_to_close().await;
        assert!(r.contains(&format!("<{condition}")), "{input}: {r}");
    }
    // Invalid UTF-8.
    let (mut c, _) = login(&g, "a", "pw", "r").await;
    c.io.write_all(b"<message><body>\xff\xfe</body></message>").await.unwrap();
    let r = c.read_to_close().await;
    assert!(r.contains("<unsupported-encoding"), "{r}");
    // Too large: refused once past the cap, not buffered.
    let (mut c, _) = login(&g, "a", "pw", "r").await;
    c.send(&format!("<message><body>{}", "x".repeat(20_000))).await;
    let r = c.read_to_close().await;
    assert!(r.contains("<policy-violation"), "{r}");
    // Too deep.
    let (mut c, _) = login(&g, "a", "pw", "r").await;
    c.send(&"<a>".repeat(100)).await;
    let r = c.read_to_close().await;
    assert!(r.contains("<policy-violation"), "{r}");
    // The server is still fine.
    let (mut c, _) = login(&g, "a", "pw", "r").await;
    c.send("<iq type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>").await;
    c.read_until("id='p'").await;
    g.shutdown().await;
}

#[tokio::test]
async fn a_wrong_host_or_version_is_refused_in_the_header() {
    let g = start("header", |_| {}).await;
    let mut c = Raw::new(tokio::net::TcpStream::connect(g.starttls).await.unwrap());
    c.send("<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='other.example' version='1.0'>").await;
    let r = c.read_to_close().await;
    assert!(r.contains("<host-unknown"), "{r}");
    let mut c = Raw::new(tokio::net::TcpStream::connect(g.starttls).await.unwrap());
    c.send("<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='grid.test'>").await;
    let r = c.read_to_close().await;
    assert!(r.contains("<unsupported-version"), "{r}");
    let mut c = Raw::new(tokio::net::TcpStream::connect(g.starttls).await.unwrap());
    c.send("<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' to='grid.test' version='1.0'>").await;
    let r = c.read_to_close().await;
    assert!(r.contains("<invalid-namespace"), "{r}");
    g.shutdown().await;
}

#[tokio::test]
async fn negotiation_and_idle_timeouts_close_with_connection_timeout() {
    let g = start("timeouts", |c| {
        c.limits.negotiation_timeout_secs = 1;
        c.limits.idle_timeout_secs = 5;
    })
    .await;
    g.add("a", "pw");
    let (mut c, _) = plain(g.starttls).await;
    let r = c.read_to_close().await;
    assert!(r.contains("<connection-timeout"), "{r}");
    let (mut c, _) = login(&g, "a", "pw", "r").await;
    // Whitespace keepalives keep a session alive...
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        c.send(" ").await;
    }
    c.send("<iq type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>").await;
    c.read_until("id='p'").await;
    // ...silence ends it.
    let r = c.read_to_close().await;
    assert!(r.contains("<connection-timeout"), "{r}");
    g.shutdown().await;
}

#[tokio::test]
async fn connections_per_address_are_capped() {
    let g = start("per-ip", |c| c.limits.max_connections_per_ip = 2).await;
    let _a = plain(g.starttls).await;
    let _b = plain(g.starttls).await;
    let mut c = Raw::new(tokio::net::TcpStream::connect(g.starttls).await.unwrap());
    c.send(HEADER).await;
    let r = c.try_read_until("<stream:features", Duration::from_secs(2)).await;
    assert!(r.is_err(), "third connection was served");
    g.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_every_stream_with_system_shutdown() {
    let g = start("shutdown", |_| {}).await;
    g.add("a", "pw");
    let (mut bound, _) = login(&g, "a", "pw", "r").await;
    let (mut negotiating, _) = starttls(&g).await;
    let shut = tokio::spawn(g.shutdown());
    let r = bound.read_to_close().await;
    assert!(r.contains("<system-shutdown"), "{r}");
    let r = negotiating.read_to_close().await;
    assert!(r.contains("<system-shutdown"), "{r}");
    shut.await.unwrap();
}

#[tokio::test]
async fn rate_limits_delay_excess_stanzas_without_dropping_them() {
    let g = start("rate", |c| {
        c.rate_limits.stanzas_per_sec = 10;
    })
    .await;
    g.add("chatty", "pw");
    let (mut c, _) = login(&g, "chatty", "pw", "r").await;
    let t = std::time::Instant::now();
    let mut burst = String::new();
    for i in 0..30 {
        burst.push_str(&format!("<iq type='get' id='p{i}'><ping xmlns='urn:xmpp:ping'/></iq>"));
    }
    c.send(&burst).await;
    // Every ping is answered, but the 20 beyond the one-second burst wait ~2 s.
    c.read_until("id='p29'").await;
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(1500), "not throttled: {took:?}");
    assert!(took < Duration::from_secs(8), "too slow: {took:?}");
    g.shutdown().await;
}

#[tokio::test]
async fn sustained_excess_disables_the_platform_when_configured() {
    let g = start("rate-abuse", |c| {
        c.rate_limits.stanzas_per_sec = 5;
        c.rate_limits.disable_after_secs = 1;
    })
    .await;
    g.add("flood", "pw");
    let (mut c, _) = login(&g, "flood", "pw", "r").await;
    let mut burst = String::new();
    for i in 0..200 {
        burst.push_str(&format!("<iq type='get' id='f{i}'><ping xmlns='urn:xmpp:ping'/></iq>"));
    }
    c.send(&burst).await;
    let r = c.read_to_close().await;
    assert!(r.contains("<policy-violation") && r.contains("rate limits exceeded"), "{r}");
    // Disabled: the next login fails.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut c, _) = starttls(&g).await;
    c.send(&auth("PLAIN", &plain_b64("flood", "pw"))).await;
    let r = c.read_until("</failure>").await;
    assert!(r.contains("<not-authorized/>"), "{r}");
    g.shutdown().await;
}
