//! Stream negotiation (RFC 6120 §4-§7): stream headers, STARTTLS (required),
//! SASL, resource binding; then the bound session. Nothing but negotiation is
//! processed before TLS, and SASL is never offered before TLS.

use super::parser::{Event, Limits as ParserLimits, Parser, StreamHeader};
use super::{session_loop, ConnError, XmlConn};
use crate::audit::{self, Kind};
use crate::authz::{self, Action};
use crate::error::{StanzaError, StreamCondition, StreamError};
use crate::jid::{normalize_local, BareJid};
use crate::limits::{ConnectionSlot, ReadRate};
use crate::ns;
use crate::sasl::{self, Exchange, Mechanism, SaslContext, SaslFailure, Step};
use crate::server::Grid;
use crate::xml::Element;
use base64::Engine as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Failed SASL attempts allowed on one connection before it is closed.
const MAX_AUTH_ATTEMPTS: u32 = 3;

/// Serves one accepted TCP connection to its end.
pub async fn handle(grid: Arc<Grid>, tcp: TcpStream, peer: SocketAddr, direct_tls: bool, _slot: ConnectionSlot) {
    let _ = tcp.set_nodelay(true);
    let lim = &grid.cfg.limits;
    let parser = Parser::new(ParserLimits { max_stanza_bytes: lim.max_stanza_bytes, max_depth: lim.max_depth });
    let burst = lim.read_rate_bytes_per_sec.max(2 * lim.max_stanza_bytes as u64);
    let rate = ReadRate::new(lim.read_rate_bytes_per_sec, burst);
    let deadline = Instant::now() + Duration::from_secs(lim.negotiation_timeout_secs);
    let conn = XmlConn::new(tcp, parser, rate, deadline, grid.shutdown.subscribe(), grid.domain.to_string());
    let tls_state = grid.tls();

    let (tcp, state) = if direct_tls {
        conn.into_io()
    } else {
        let mut conn = conn;
        if let Err(e) = Box::pin(starttls(&mut conn, &grid)).await {
            end(&mut conn, e, &peer).await;
            return;
        }
        // CVE-2011-0411: bytes sent after <starttls/> and before the handshake
        // would be taken as if they came over TLS. Drop the connection.
        // (Whitespace is part of the old stream: go-xmpp ends each element with a newline.)
        conn.parser.skip_whitespace();
        if conn.parser.buffered_len() > 0 {
            tracing::warn!(%peer, "plaintext pipelined after <starttls/>: connection aborted");
            return;
        }
        conn.into_io()
    };
    let config = if direct_tls { tls_state.direct.clone() } else { tls_state.starttls.clone() };
    // Negotiation futures are boxed: their state is freed before the session
    // starts, so an idle session's task stays small.
    let accept = Box::pin(tokio::time::timeout_at(deadline, TlsAcceptor::from(config).accept_with(tcp, crate::tls::tune_connection)));
    let tls = match accept.await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, "TLS handshake failed: {e}");
            return;
        }
        Err(_) => return,
    };
    let mut conn = state.with_io(tls);
    conn.parser.restart();
    match secure_stream(&mut conn, &grid, peer, &tls_state.server_cert_der).await {
        Ok(()) => conn.close(None).await,
        Err(e) => end(&mut conn, e, &peer).await,
    }
}

/// Ends a connection as `e` says.
async fn end<S: AsyncRead + AsyncWrite + Unpin>(conn: &mut XmlConn<S>, e: ConnError, peer: &SocketAddr) {
    match e {
        ConnError::Stream(err) => {
            tracing::debug!(%peer, "closing stream: {err}");
            conn.close(Some(&err)).await;
        }
        ConnError::Closed => conn.close(None).await,
        ConnError::Io(_) | ConnError::Abort(_) => {}
    }
}

/// Reads the client's stream header and answers it with ours and `features`.
async fn open_stream<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut XmlConn<S>,
    grid: &Grid,
    features: Element,
) -> Result<(), ConnError> {
    let header = match conn.next_event().await? {
        Event::Open(h) => h,
        _ => return Err(StreamError::with_text(StreamCondition::NotWellFormed, "expected a stream header").into()),
    };
    conn.queue_header(&XmlConn::<S>::new_stream_id());
    check_header(&header, grid)?;
    conn.send(&features).await
}

/// RFC 6120 §4.7: the header must be addressed to us, in version 1.0.
fn check_header(h: &StreamHeader, grid: &Grid) -> Result<(), StreamError> {
    if let Some(to) = &h.to
        && BareJid::domain(to).ok().as_ref() != Some(&grid.domain) {
            return Err(StreamError::with_text(StreamCondition::HostUnknown, "this server does not serve that domain"));
        }
    match h.version.as_deref() {
        Some(v) if v.split('.').next() == Some("1") => Ok(()),
        _ => Err(StreamError::with_text(StreamCondition::UnsupportedVersion, "XMPP version 1.0 is required")),
    }
}

fn features() -> Element {
    let mut f = Element::new("features", ns::STREAM);
    f.prefix = Some("stream".into());
    f
}

/// The plaintext phase: header, `<starttls><required/></starttls>`, `<proceed/>`.
async fn starttls(conn: &mut XmlConn<TcpStream>, grid: &Grid) -> Result<(), ConnError> {
    let f = features().with_child(Element::new("starttls", ns::TLS).with_child(Element::new("required", ns::TLS)));
    Box::pin(open_stream(conn, grid, f)).await?;
    let s = conn.next_stanza().await?;
    if s.name != "starttls" || s.ns != ns::TLS {
        return Err(StreamError::with_text(StreamCondition::PolicyViolation, "STARTTLS is required").into());
    }
    conn.send(&Element::new("proceed", ns::TLS)).await
}

/// Everything after the TLS handshake: SASL, bind, the session.
async fn secure_stream(
    conn: &mut XmlConn<TlsStream<TcpStream>>,
    grid: &Arc<Grid>,
    peer: SocketAddr,
    server_cert_der: &[u8],
) -> Result<(), ConnError> {
    let tls_conn = conn.io.get_ref().1;
    let tls_version = crate::tls::tls_version_name(tls_conn);
    let cert = crate::tls::peer_identity(tls_conn);
    // Without channel binding, -PLUS is not offered and a `y` flag is no downgrade.
    let bindings = if grid.cfg.auth.channel_binding {
        crate::tls::channel_bindings(tls_conn, server_cert_der)
    } else {
        crate::tls::ChannelBindings::default()
    };
    let ctx = Arc::new(SaslContext {
        domain: grid.domain.to_string(),
        lookup: grid.clone(),
        bindings,
        cert: cert.as_ref().map(|c| sasl::CertIdentity { xmpp_addrs: c.xmpp_addrs.clone() }),
        decoy_secret: grid.decoy_secret,
        decoy_iterations: grid.cfg.auth.scram_iterations,
        cb_type_unsupported: Default::default(),
    });
    let offered = sasl::offered_mechanisms(cert.is_some(), grid.cfg.auth.plain, &ctx.bindings);

    let mut mechs = Element::new("mechanisms", ns::SASL);
    for m in &offered {
        mechs.push(Element::new("mechanism", ns::SASL).with_text(m.name()));
    }
    // XEP-0440: which channel-binding types we support.
    let mut cb = Element::new("sasl-channel-binding", ns::SASL_CB);
    for (ty, present) in [
        ("tls-exporter", ctx.bindings.tls_exporter.is_some()),
        ("tls-server-end-point", ctx.bindings.tls_server_end_point.is_some()),
    ] {
        if present {
            cb.push(Element::new("channel-binding", ns::SASL_CB).with_attr("type", ty));
        }
    }
    let mut f = features().with_child(mechs);
    if ctx.bindings.any() {
        f.push(cb); // XEP-0440: the element must list at least one type
    }
    Box::pin(open_stream(conn, grid, f)).await?;

    let (local, mech, success_data) = Box::pin(authenticate(conn, grid, &ctx, &offered, peer)).await?;
    let jid = BareJid::new(&local, grid.domain.domain_part())
        .map_err(|_| StreamError::new(StreamCondition::InternalServerError))?;
    let actx = authz::Context {
        authn: if mech == Mechanism::External { "cert".into() } else { mech.name().to_string() },
        tls_version,
        source: peer.ip(),
    };
    let decision = grid.authz.authorize(&authz::Request { principal: &jid, action: Action::Connect, topic: None, context: &actx });
    if !decision.allowed {
        tracing::info!(%peer, %jid, "login denied by policy");
        grid.audit.record(
            Kind::Denial,
            jid.to_string(),
            audit::fields([("action", "connect".to_string()), ("source", peer.ip().to_string()), ("policies", decision.reasons.join(","))]),
        );
        conn.send(&sasl_failure(SaslFailure::NotAuthorized)).await?;
        return Err(ConnError::Closed);
    }
    conn.send(&Element::new("success", ns::SASL).with_text(success_text(&success_data))).await?;
    tracing::info!(%peer, %jid, mechanism = mech.name(), tls = tls_version, "login");
    grid.audit.record(
        Kind::LoginOk,
        jid.to_string(),
        audit::fields([("source", peer.ip().to_string()), ("mechanism", mech.name().to_string()), ("tls", tls_version.to_string())]),
    );

    // RFC 6120 §6.4.6: the stream restarts after success.
    conn.parser.restart();
    let f = features()
        .with_child(Element::new("bind", ns::BIND))
        .with_child(Element::new("session", ns::SESSION).with_child(Element::new("optional", ns::SESSION)));
    Box::pin(open_stream(conn, grid, f)).await?;

    let roles: Vec<String>;
    let (handle, mut rx) = loop {
        let iq = conn.next_stanza().await?;
        let bind = (iq.name == "iq" && iq.attr("type") == Some("set"))
            .then(|| iq.child("bind", ns::BIND))
            .flatten();
        let Some(bind) = bind else {
            // RFC 6120 §7.1: nothing before a resource is bound.
            return Err(StreamError::with_text(StreamCondition::NotAuthorized, "bind a resource first").into());
        };
        let requested = bind.child("resource", ns::BIND).map(|r| r.text()).filter(|r| !r.is_empty());
        let resource = requested.unwrap_or_else(XmlConn::<TcpStream>::new_stream_id);
        let full = match jid.with_resource(&resource) {
            Ok(f) => f,
            Err(e) => {
                if let Some(r) = StanzaError::new("bad-request").text(e.to_string()).reply_to(&iq) {
                    conn.send(&r).await?;
                }
                continue;
            }
        };
        // A revocation may have happened during negotiation.
        roles = match grid.store.account(&local) {
            Ok(Some(a)) if !a.revoked => a.roles,
            _ => return Err(StreamError::with_text(StreamCondition::NotAuthorized, "platform revoked").into()),
        };
        let (handle, rx) = grid.router.sessions().bind(full.clone(), grid.cfg.limits.outbound_queue_stanzas, actx.clone());
        let mut result = Element::new("iq", ns::CLIENT).with_attr("type", "result");
        if let Some(id) = iq.attr("id") {
            result.set_attr("id", id);
        }
        result.push(Element::new("bind", ns::BIND).with_child(Element::new("jid", ns::BIND).with_text(full.to_string())));
        conn.send(&result).await?;
        break (handle, rx);
    };
    let idle = Duration::from_secs(grid.cfg.limits.idle_timeout_secs);
    let rates = grid.rates.for_platform(&jid.to_string(), grid.cfg.rate_limits.for_roles(&roles));
    let r = session_loop(conn, &grid.router, &handle, &mut rx, idle, &rates, &grid.audit).await;
    grid.router.session_ended(&handle);
    let abusive = rates.lock().unwrap_or_else(|p| p.into_inner()).abusive();
    if abusive {
        // RFC 8600 §8.3.1: a misbehaving platform may be disabled automatically.
        tracing::warn!(%jid, "platform disabled after sustained rate-limit excess");
        grid.audit.record(Kind::PlatformDisabled, jid.to_string(), audit::fields([("reason", "sustained rate-limit excess")]));
        let g = grid.clone();
        let name = local.clone();
        let _ = tokio::task::spawn_blocking(move || {
            crate::admin::apply(&g.cfg, &g.store, Some(&g), crate::admin::AdminRequest::Revoke { name })
        })
        .await;
    }
    r
}

fn sasl_failure(f: SaslFailure) -> Element {
    Element::new("failure", ns::SASL).with_child(Element::new(f.condition(), ns::SASL))
}

fn success_text(data: &Option<Vec<u8>>) -> String {
    match data {
        Some(d) if !d.is_empty() => B64.encode(d),
        _ => String::new(),
    }
}

/// RFC 6120 §6.4: runs SASL exchanges until one succeeds; returns the
/// authenticated localpart, the mechanism and the data for `<success/>`, which the
/// caller sends once the login is also authorized.
async fn authenticate(
    conn: &mut XmlConn<TlsStream<TcpStream>>,
    grid: &Grid,
    ctx: &Arc<SaslContext>,
    offered: &[Mechanism],
    peer: SocketAddr,
) -> Result<(String, Mechanism, Option<Vec<u8>>), ConnError> {
    let ip_key = format!("ip:{}", peer.ip());
    let mut failures = 0;
    loop {
        let auth = conn.next_stanza().await?;
        if auth.name != "auth" || auth.ns != ns::SASL {
            return Err(StreamError::with_text(StreamCondition::NotAuthorized, "authenticate first").into());
        }
        let mech = auth.attr("mechanism").and_then(Mechanism::from_name).filter(|m| offered.contains(m));
        let Some(mech) = mech else {
            conn.send(&sasl_failure(SaslFailure::InvalidMechanism)).await?;
            continue;
        };
        // Back-off already due for this address (RFC 6120 §13.1 brute force).
        let pending = grid.throttle.pending(&[&ip_key]);
        if !pending.is_zero() {
            tokio::time::sleep(pending).await;
        }
        let outcome = run_exchange(conn, ctx, mech, &auth).await?;
        match outcome {
            Ok((local, data)) => {
                grid.throttle.success(&format!("acct:{local}"));
                return Ok((local, mech, data));
            }
            Err((failure, authcid)) => {
                let acct_key = format!("acct:{}", authcid.as_deref().unwrap_or(""));
                let delay = grid.throttle.failure(&[&ip_key, &acct_key]);
                tracing::info!(%peer, user = authcid.as_deref().unwrap_or(""), mechanism = mech.name(),
                    "login failed: {}", failure.condition());
                grid.audit.record(
                    Kind::LoginFailed,
                    authcid.as_deref().map_or_else(|| "(unknown)".to_string(), |u| format!("{u}@{}", grid.domain)),
                    audit::fields([
                        ("source", peer.ip().to_string()),
                        ("mechanism", mech.name().to_string()),
                        ("reason", failure.condition().to_string()),
                    ]),
                );
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                conn.send(&sasl_failure(failure)).await?;
                failures += 1;
                if failures >= MAX_AUTH_ATTEMPTS {
                    return Err(StreamError::with_text(StreamCondition::PolicyViolation, "too many failed authentication attempts").into());
                }
            }
        }
    }
}

/// The result of one exchange: the account and the success data, or the failure
/// and the name that was tried (for throttling).
type ExchangeOutcome = Result<(String, Option<Vec<u8>>), (SaslFailure, Option<String>)>;

/// One SASL exchange: `<auth/>`, challenges and responses, until success or failure.
async fn run_exchange(
    conn: &mut XmlConn<TlsStream<TcpStream>>,
    ctx: &Arc<SaslContext>,
    mech: Mechanism,
    auth: &Element,
) -> Result<ExchangeOutcome, ConnError> {
    let mut exchange = match Exchange::start(mech, ctx.clone()) {
        Ok(x) => x,
        Err(f) => return Ok(Err((f, None))),
    };
    // RFC 6120 §6.4.2: "=" is an empty initial response; no text, none at all.
    let mut data = match auth.text().trim() {
        "" => None,
        "=" => Some(Vec::new()),
        t => match B64.decode(t) {
            Ok(d) => Some(d),
            Err(_) => return Ok(Err((SaslFailure::IncorrectEncoding, None))),
        },
    };
    loop {
        let input = match data.take() {
            Some(d) => d,
            None => {
                conn.send(&Element::new("challenge", ns::SASL)).await?;
                match read_response(conn).await? {
                    Ok(d) => d,
                    Err(f) => return Ok(Err((f, exchange.authcid()))),
                }
            }
        };
        // A SCRAM step costs microseconds and runs here; PLAIN costs a PBKDF2 and
        // goes to the blocking pool, away from the async workers.
        let step = if mech == Mechanism::Plain {
            let (ex, step) = tokio::task::spawn_blocking(move || {
                let step = exchange.step(&input);
                (exchange, step)
            })
            .await
            .map_err(|_| StreamError::new(StreamCondition::InternalServerError))?;
            exchange = ex;
            step
        } else {
            exchange.step(&input)
        };
        match step {
            Step::Challenge(c) => {
                conn.send(&Element::new("challenge", ns::SASL).with_text(B64.encode(c))).await?;
                match read_response(conn).await? {
                    Ok(d) => data = Some(d),
                    Err(f) => return Ok(Err((f, exchange.authcid()))),
                }
            }
            Step::Success { localpart, additional_data } => {
                let local = normalize_local(&localpart).map_err(|_| StreamError::new(StreamCondition::InternalServerError))?;
                return Ok(Ok((local, additional_data)));
            }
            Step::Failure(f) => return Ok(Err((f, exchange.authcid()))),
        }
    }
}

/// Reads `<response/>` (or `<abort/>`).
async fn read_response(conn: &mut XmlConn<TlsStream<TcpStream>>) -> Result<Result<Vec<u8>, SaslFailure>, ConnError> {
    let r = conn.next_stanza().await?;
    if r.ns != ns::SASL {
        return Err(StreamError::with_text(StreamCondition::NotAuthorized, "SASL negotiation in progress").into());
    }
    match r.name.as_str() {
        "abort" => Ok(Err(SaslFailure::Aborted)),
        "response" => match r.text().trim() {
            "" | "=" => Ok(Ok(Vec::new())),
            t => Ok(B64.decode(t).map_err(|_| SaslFailure::IncorrectEncoding)),
        },
        _ => Err(StreamError::with_text(StreamCondition::NotAuthorized, "SASL negotiation in progress").into()),
    }
}
