//! The Platform side of XMPP-Grid: an async XMPP client (RFC 6120) that logs in to a
//! Controller and talks XEP-0030/XEP-0060 to its Broker.
//!
//! Role: open the stream (STARTTLS, or direct TLS per XEP-0368), check the server's
//! certificate against a CA and/or a pinned fingerprint (RFC 8600 §8.3.6), authenticate
//! (SASL EXTERNAL with a client certificate, SCRAM-SHA-256-PLUS with tls-exporter
//! channel binding and its fallbacks, PLAIN only as the last resort), bind a resource,
//! and then exchange stanzas: [`Client::send`], [`Client::iq`] (request/response by id),
//! [`Client::next_stanza`] (everything else, in order). The pubsub convenience methods
//! live in [`pubsub`], the `xmpp-grid topics|publish|subscribe|retrieve` glue in [`cli`].
//!
//! It reuses the server's element type, stream parser (it parses the server's stream
//! just as well), JIDs and namespaces. One `Client` is driven by one task: there is no
//! background reader, so stanzas that arrive while [`Client::iq`] waits are buffered
//! (boundedly) and handed out by [`Client::next_stanza`] later.
//!
//! Must not: send a password or anything else before TLS is up (there is no plaintext
//! mode at all), accept a server signature it could not verify, or panic on anything the
//! server sends.

pub mod cli;
pub mod doc;
pub mod pubsub;
mod scram;
pub mod trust;

use crate::error::{StreamCondition, StreamError};
use crate::jid::{BareJid, FullJid, Jid};
use crate::ns;
use crate::stream::parser::{Event, Limits, ParseError, Parser};
use crate::xml::Element;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rustls::pki_types::ServerName;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub use pubsub::{
    Delay, EventKind, Item, NodeConfig, PubsubEvent, Retrieve, Subscription, SubscriptionState,
    Topic, TopicInfo,
};
pub use trust::{Fingerprint, Trust};

/// Standard client port (RFC 6120 §3.2.1 fallback when there are no SRV records).
pub const DEFAULT_STARTTLS_PORT: u16 = 5222;
/// Conventional direct-TLS client port (XEP-0368 announces it by SRV; 5223 by habit).
pub const DEFAULT_DIRECT_TLS_PORT: u16 = 5223;

/// How TLS is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// RFC 6120 §5: plain TCP, stream header, `<starttls/>`, then TLS.
    #[default]
    StartTls,
    /// XEP-0368: TLS from the first byte, ALPN `xmpp-client`.
    Direct,
}

/// A client certificate and its key (PEM files), for SASL EXTERNAL (XEP-0178).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
}

/// Everything [`Client::connect`] needs.
#[derive(Clone)]
pub struct ClientOptions {
    /// The platform's JID; a resource, if given, is requested at bind time.
    pub jid: Jid,
    /// Password for SCRAM (or PLAIN). Optional when a certificate is configured.
    pub password: Option<String>,
    /// Client certificate for SASL EXTERNAL.
    pub client_cert: Option<ClientCert>,
    /// `host:port` to connect to; `None`: derived from the JID's domain ([`Self::server_addr`]).
    pub server: Option<String>,
    /// STARTTLS or direct TLS.
    pub tls: TlsMode,
    /// Which server certificates are accepted.
    pub trust: Trust,
    /// Send initial presence after binding (needed to receive pubsub notifications
    /// addressed to the bare JID on servers that route by presence, e.g. Prosody).
    pub presence: bool,
    /// Time allowed for TCP connect, TLS, SASL and bind together.
    pub connect_timeout: Duration,
    /// Time allowed for the answer to one IQ.
    pub iq_timeout: Duration,
    /// Whitespace keepalive after this much silence on our side (RFC 6120 §4.6.1), so a
    /// long-idle subscriber is not closed by the server's idle timeout.
    pub keepalive: Option<Duration>,
    /// Largest stanza accepted from the server.
    pub max_stanza_bytes: usize,
    /// Deepest nesting accepted from the server.
    pub max_depth: usize,
    /// Stanzas buffered while an IQ waits; more is an error rather than unbounded memory.
    pub max_buffered: usize,
    /// Answer IQ get/set requests from the server ourselves: ping (XEP-0199) with a
    /// result, anything else with `service-unavailable` (RFC 6120 §8.4 requires some
    /// answer). When false they are handed out by [`Client::next_stanza`].
    pub answer_iqs: bool,
}

impl std::fmt::Debug for ClientOptions {
    // The password stays out of logs and panics.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("jid", &self.jid.to_string())
            .field("password", &self.password.as_ref().map(|_| "…"))
            .field("client_cert", &self.client_cert)
            .field("server", &self.server)
            .field("tls", &self.tls)
            .field("trust", &self.trust)
            .field("presence", &self.presence)
            .finish_non_exhaustive()
    }
}

impl ClientOptions {
    /// Defaults for `jid`: STARTTLS, no credentials or trust yet, 30 s timeouts,
    /// 60 s keepalive, 16 MiB stanzas.
    pub fn new(jid: Jid) -> Self {
        ClientOptions {
            jid,
            password: None,
            client_cert: None,
            server: None,
            tls: TlsMode::StartTls,
            trust: Trust::default(),
            presence: false,
            connect_timeout: Duration::from_secs(30),
            iq_timeout: Duration::from_secs(30),
            keepalive: Some(Duration::from_secs(60)),
            max_stanza_bytes: 16 << 20,
            max_depth: 256,
            max_buffered: 100_000,
            answer_iqs: true,
        }
    }

    /// The address to connect to: the configured one, else `127.0.0.1` for
    /// `localhost` (which may resolve to ::1 first, where nothing listens), else the
    /// domain itself, on the mode's default port. SRV records (RFC 6120 §3.2.1,
    /// XEP-0368) are not looked up: there is no DNS resolver in this crate.
    pub fn server_addr(&self) -> String {
        if let Some(s) = &self.server {
            return s.clone();
        }
        let port = match self.tls {
            TlsMode::StartTls => DEFAULT_STARTTLS_PORT,
            TlsMode::Direct => DEFAULT_DIRECT_TLS_PORT,
        };
        match self.jid.bare().domain_part() {
            "localhost" => format!("127.0.0.1:{port}"),
            d => format!("{d}:{port}"),
        }
    }
}

/// A stanza error the server (or broker) answered with (RFC 6120 §8.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    /// `type` attribute: auth, cancel, continue, modify, wait (as received).
    pub kind: String,
    /// The defined condition, e.g. `item-not-found`; `undefined-condition` if none.
    pub condition: String,
    /// Human-readable text, if any.
    pub text: Option<String>,
    /// Application-specific condition (e.g. XEP-0060 `pubsub#errors` `invalid-payload`).
    pub app_condition: Option<String>,
}

impl RemoteError {
    /// Reads the `<error/>` child of an error stanza (missing parts become
    /// `undefined-condition`, so a malformed error is still an error).
    pub fn from_stanza(stanza: &Element) -> RemoteError {
        let err = stanza.child("error", ns::CLIENT);
        let kind = err.and_then(|e| e.attr("type")).unwrap_or("cancel").to_owned();
        let mut condition = None;
        let mut text = None;
        let mut app_condition = None;
        for c in err.iter().flat_map(|e| e.elements()) {
            if c.ns == ns::STANZA_ERRORS {
                if c.name == "text" {
                    text = Some(c.text());
                } else if condition.is_none() {
                    condition = Some(c.name.clone());
                }
            } else if app_condition.is_none() {
                app_condition = Some(c.name.clone());
            }
        }
        RemoteError {
            kind,
            condition: condition.unwrap_or_else(|| "undefined-condition".into()),
            text,
            app_condition,
        }
    }
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.condition)?;
        if let Some(a) = &self.app_condition {
            write!(f, " ({a})")?;
        }
        if let Some(t) = &self.text {
            write!(f, ": {t}")?;
        }
        Ok(())
    }
}

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad options (unparsable JID, missing credentials, unreadable files).
    #[error("{0}")]
    Config(String),
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// TLS set-up or handshake failure (includes an untrusted or unpinned certificate).
    #[error("TLS: {0}")]
    Tls(String),
    /// The server broke the stream protocol or negotiation (RFC 6120 §4-§7).
    #[error("protocol: {0}")]
    Protocol(String),
    /// The server's XML could not be parsed.
    #[error("server sent bad XML: {0}")]
    Parse(#[from] ParseError),
    /// The server ended the stream with an error (RFC 6120 §4.9).
    #[error("stream error from server: {0}")]
    Stream(StreamError),
    /// The connection ended (before the operation completed).
    #[error("connection closed")]
    Closed,
    /// None of the offered SASL mechanisms can be used with our credentials.
    #[error("no usable SASL mechanism (server offers: {offered})")]
    NoMechanism { offered: String },
    /// SASL failure (RFC 6120 §6.5): condition and optional text.
    #[error("authentication failed: {condition}{}", text.as_deref().map(|t| format!(": {t}")).unwrap_or_default())]
    Auth { condition: String, text: Option<String> },
    /// The server could not prove it knows our credentials (SCRAM `v=` missing or wrong):
    /// someone may be impersonating it.
    #[error("server authentication failed: {0}")]
    ServerAuth(String),
    /// An IQ (or other request) answered with a stanza error.
    #[error("{0}")]
    Stanza(RemoteError),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// Too many unrelated stanzas arrived while waiting for an IQ answer.
    #[error("more than {0} stanzas buffered while waiting for a reply")]
    Overflow(usize),
}

impl ClientError {
    /// The stanza error's defined condition, if this is one (e.g. `item-not-found`).
    pub fn condition(&self) -> Option<&str> {
        match self {
            ClientError::Stanza(e) => Some(&e.condition),
            _ => None,
        }
    }
}

/// What was negotiated, for logs and for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// `TLSv1.3` or `TLSv1.2`.
    pub tls_version: &'static str,
    /// The SASL mechanism used, e.g. `SCRAM-SHA-256-PLUS`.
    pub mechanism: String,
    /// The channel-binding type used, if any (`tls-exporter`, `tls-server-end-point`).
    pub channel_binding: Option<&'static str>,
    /// SHA-256 fingerprint of the server's leaf certificate (what `--pin` takes).
    pub server_fingerprint: Option<Fingerprint>,
}

/// An XML stream over one transport: bytes out, parser events in. No timeouts here;
/// callers bound whole operations.
struct Wire<S> {
    io: S,
    parser: Parser,
    out: Vec<u8>,
    last_write: Instant,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    fn new(io: S, limits: Limits) -> Self {
        Wire { io, parser: Parser::new(limits), out: Vec::new(), last_write: Instant::now() }
    }

    async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.io.write_all(bytes).await?;
        self.io.flush().await?;
        self.last_write = Instant::now();
        Ok(())
    }

    async fn send(&mut self, e: &Element) -> Result<(), ClientError> {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        e.write_to(&mut out, ns::CLIENT);
        // Wire traces for debugging (RUST_LOG=xmpp_grid::client=trace); may show payloads.
        tracing::trace!(out = %String::from_utf8_lossy(&out), "send");
        let r = self.write_raw(&out).await;
        // Keep a small buffer for the next stanza; drop a large one (a big publish).
        if out.capacity() <= 64 * 1024 {
            self.out = out;
        }
        r
    }

    /// Our stream header (RFC 6120 §4.7.1): `to` is the domain; `from` only once the
    /// stream is encrypted (§4.7.1 asks clients not to reveal it before).
    async fn open(&mut self, domain: &str, from: Option<&BareJid>) -> Result<(), ClientError> {
        let mut attrs = format!(" to='{}'", quick_xml::escape::escape(domain));
        if let Some(f) = from {
            attrs.push_str(&format!(" from='{}'", quick_xml::escape::escape(f.to_string())));
        }
        let s = format!(
            "<?xml version='1.0'?><stream:stream xmlns='{}' xmlns:stream='{}'{attrs} version='1.0' xml:lang='en'>",
            ns::CLIENT,
            ns::STREAM
        );
        self.write_raw(s.as_bytes()).await
    }

    /// Reads one more chunk into the parser, cancel-safe (`read_buf`). EOF is `Closed`.
    async fn fill(&mut self) -> Result<(), ClientError> {
        let buf = self.parser.buffer_mut();
        buf.reserve(8192);
        if self.io.read_buf(buf).await? == 0 {
            return Err(ClientError::Closed);
        }
        Ok(())
    }

    /// The next event, reading as needed.
    async fn next_event(&mut self) -> Result<Event, ClientError> {
        loop {
            if let Some(ev) = self.parser.next_event()? {
                return Ok(ev);
            }
            self.fill().await?;
        }
    }

    /// Expects the server's stream header (version 1.0, RFC 6120 §4.7.5).
    async fn read_header(&mut self) -> Result<(), ClientError> {
        match self.next_event().await? {
            Event::Open(h) if h.version.as_deref().is_some_and(|v| v.starts_with("1.")) => Ok(()),
            Event::Open(h) => Err(ClientError::Protocol(format!(
                "server stream version {:?}, need 1.0",
                h.version
            ))),
            Event::Stanza(e) => Err(stream_error_or(&e, "expected a stream header")),
            Event::Close => Err(ClientError::Closed),
        }
    }

    /// The next top-level element during negotiation; stream errors and closes are errors.
    async fn next_element(&mut self) -> Result<Element, ClientError> {
        match self.next_event().await? {
            Event::Stanza(e) if e.is("error", ns::STREAM) => Err(ClientError::Stream(stream_error(&e))),
            Event::Stanza(e) => Ok(e),
            Event::Open(_) => Err(ClientError::Protocol("unexpected stream header".into())),
            Event::Close => Err(ClientError::Closed),
        }
    }

    /// Header plus `<stream:features/>`.
    async fn read_features(&mut self) -> Result<Element, ClientError> {
        self.read_header().await?;
        let f = self.next_element().await?;
        if !f.is("features", ns::STREAM) {
            return Err(ClientError::Protocol(format!("expected stream features, got <{}>", f.name)));
        }
        Ok(f)
    }
}

/// Converts `<stream:error/>` (RFC 6120 §4.9) into our type.
fn stream_error(e: &Element) -> StreamError {
    let condition = e
        .elements()
        .find(|c| c.ns == ns::STREAM_ERRORS && c.name != "text")
        .map(|c| StreamCondition::from_name(&c.name))
        .unwrap_or(StreamCondition::UndefinedCondition);
    let text = e.child("text", ns::STREAM_ERRORS).map(Element::text);
    StreamError { condition, text }
}

fn stream_error_or(e: &Element, otherwise: &str) -> ClientError {
    if e.is("error", ns::STREAM) {
        ClientError::Stream(stream_error(e))
    } else {
        ClientError::Protocol(format!("{otherwise}, got <{}>", e.name))
    }
}

/// A connected, authenticated, bound client.
pub struct Client {
    wire: Wire<TlsStream<TcpStream>>,
    jid: FullJid,
    info: SessionInfo,
    /// Stanzas received while waiting for an IQ reply, handed out in order later.
    pending: VecDeque<Element>,
    /// Random per-connection prefix: IQ ids stay unique even across reconnects.
    id_prefix: String,
    next_id: u64,
    iq_timeout: Duration,
    keepalive: Option<Duration>,
    max_buffered: usize,
    answer_iqs: bool,
    /// The server closed its stream (`</stream:stream>` seen).
    closed: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("jid", &self.jid.to_string()).field("info", &self.info).finish_non_exhaustive()
    }
}

impl Client {
    /// Connects, secures, authenticates and binds, all within `opts.connect_timeout`.
    pub async fn connect(opts: ClientOptions) -> Result<Client, ClientError> {
        tokio::time::timeout(opts.connect_timeout, connect_inner(opts))
            .await
            .map_err(|_| ClientError::Timeout("connection set-up"))?
    }

    /// Our full JID as bound by the server.
    pub fn jid(&self) -> &FullJid {
        &self.jid
    }

    /// What was negotiated (TLS version, mechanism, channel binding, server fingerprint).
    pub fn session_info(&self) -> &SessionInfo {
        &self.info
    }

    /// Sends one stanza as is. Build it in `jabber:client` (`ns::CLIENT`).
    pub async fn send(&mut self, stanza: &Element) -> Result<(), ClientError> {
        if self.closed {
            return Err(ClientError::Closed);
        }
        self.wire.send(stanza).await
    }

    /// The next stanza not claimed by an [`iq`](Self::iq) call: messages, presence,
    /// stray IQs (unless answered automatically, see [`ClientOptions::answer_iqs`]).
    /// `Ok(None)` once the server has closed its stream. Cancel-safe: dropping the
    /// future between stanzas loses nothing (reads use `read_buf`; a keepalive may be
    /// cut mid-write only if the future is dropped during that write).
    pub async fn next_stanza(&mut self) -> Result<Option<Element>, ClientError> {
        if let Some(st) = self.pending.pop_front() {
            return Ok(Some(st));
        }
        loop {
            let Some(st) = self.read_stanza().await? else { return Ok(None) };
            if !self.answer_iq(&st).await? {
                return Ok(Some(st));
            }
        }
    }

    /// Sends an IQ (`type` get or set) with a fresh id and waits for its answer: the
    /// `result` stanza, or [`ClientError::Stanza`] for an `error` reply. Other stanzas
    /// arriving meanwhile are buffered for [`next_stanza`](Self::next_stanza). Not
    /// cancel-safe: dropping it mid-way leaves the answer to arrive as a stray stanza.
    pub async fn iq(&mut self, mut iq: Element) -> Result<Element, ClientError> {
        if !iq.is("iq", ns::CLIENT) || !matches!(iq.attr("type"), Some("get" | "set")) {
            return Err(ClientError::Config("iq() takes an <iq type='get|set'/> in jabber:client".into()));
        }
        let id = self.fresh_id();
        iq.set_attr("id", id.clone());
        let to = iq.attr("to").map(str::to_owned);
        self.send(&iq).await?;
        let deadline = Instant::now() + self.iq_timeout;
        loop {
            let st = tokio::time::timeout_at(deadline, self.read_stanza())
                .await
                .map_err(|_| ClientError::Timeout("an IQ reply"))??
                .ok_or(ClientError::Closed)?;
            if is_reply_to(&st, &id, to.as_deref(), &self.jid) {
                return match st.attr("type") {
                    Some("result") => Ok(st),
                    _ => Err(ClientError::Stanza(RemoteError::from_stanza(&st))),
                };
            }
            if self.answer_iq(&st).await? {
                continue;
            }
            if self.pending.len() >= self.max_buffered {
                return Err(ClientError::Overflow(self.max_buffered));
            }
            self.pending.push_back(st);
        }
    }

    /// Ends the stream (RFC 6120 §4.4): our `</stream:stream>`, the server's, then TLS
    /// close_notify. Stanzas still arriving are discarded; waits at most 5 s.
    pub async fn close(mut self) -> Result<(), ClientError> {
        if !self.closed {
            self.wire.write_raw(b"</stream:stream>").await?;
            let drain = async {
                loop {
                    match self.wire.next_event().await {
                        Ok(Event::Close) | Err(_) => break,
                        Ok(_) => continue,
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        }
        // The peer may already have dropped TCP; a failed close_notify changes nothing.
        let _ = self.wire.io.shutdown().await;
        Ok(())
    }

    fn fresh_id(&mut self) -> String {
        self.next_id += 1;
        format!("{}-{}", self.id_prefix, self.next_id)
    }

    /// Reads the next stanza from the socket (not from `pending`), sending whitespace
    /// keepalives while idle. `None` when the server closed the stream.
    async fn read_stanza(&mut self) -> Result<Option<Element>, ClientError> {
        if self.closed {
            return Ok(None);
        }
        loop {
            match self.wire.parser.next_event()? {
                Some(Event::Stanza(e)) if e.is("error", ns::STREAM) => {
                    return Err(ClientError::Stream(stream_error(&e)));
                }
                Some(Event::Stanza(e)) => {
                    if tracing::enabled!(tracing::Level::TRACE) {
                        tracing::trace!(stanza = %e.to_string_lossy(), "recv");
                    }
                    return Ok(Some(e));
                }
                Some(Event::Close) => {
                    self.closed = true;
                    return Ok(None);
                }
                Some(Event::Open(_)) => return Err(ClientError::Protocol("unexpected stream header".into())),
                None => {}
            }
            match self.keepalive {
                None => self.wire.fill().await?,
                Some(every) => {
                    let due = self.wire.last_write + every;
                    let read = tokio::select! {
                        r = self.wire.fill() => Some(r),
                        _ = tokio::time::sleep_until(due) => None,
                    };
                    match read {
                        Some(r) => r?,
                        None => self.wire.write_raw(b" ").await?,
                    }
                }
            }
        }
    }

    /// Answers a server's IQ get/set if [`ClientOptions::answer_iqs`]; true if answered.
    async fn answer_iq(&mut self, st: &Element) -> Result<bool, ClientError> {
        if !self.answer_iqs || st.name != "iq" || !matches!(st.attr("type"), Some("get" | "set")) {
            return Ok(false);
        }
        let is_ping = st.attr("type") == Some("get") && st.child("ping", ns::PING).is_some();
        let reply = if is_ping {
            let mut r = Element::new("iq", ns::CLIENT).with_attr("type", "result");
            if let Some(id) = st.attr("id") {
                r.set_attr("id", id);
            }
            if let Some(from) = st.attr("from") {
                r.set_attr("to", from);
            }
            Some(r)
        } else {
            crate::error::StanzaError::new("service-unavailable").reply_to(st)
        };
        if let Some(r) = reply {
            self.send(&r).await?;
        }
        Ok(true)
    }
}

/// RFC 6120 §8.1.2.1, §10.1: a reply carries our id, type result or error, and comes
/// from where we sent the request (or, for a request without `to`, from our own
/// account or server, or without `from`). Checking the sender keeps another entity from
/// answering in the broker's name with a guessed id.
fn is_reply_to(st: &Element, id: &str, to: Option<&str>, me: &FullJid) -> bool {
    if st.name != "iq" || st.attr("id") != Some(id) || !matches!(st.attr("type"), Some("result" | "error")) {
        return false;
    }
    let from = st.attr("from");
    let same = |a: &str, b: &str| match (Jid::parse(a), Jid::parse(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    };
    match (to, from) {
        (Some(t), Some(f)) => same(t, f),
        (Some(_), None) => false,
        (None, None) => true,
        (None, Some(f)) => {
            let mine = [me.to_string(), me.bare().to_string(), me.bare().domain_part().to_owned()];
            mine.iter().any(|m| same(m, f))
        }
    }
}

async fn connect_inner(opts: ClientOptions) -> Result<Client, ClientError> {
    let bare = opts.jid.bare().clone();
    let domain = bare.domain_part().to_owned();
    if bare.local().is_none() {
        return Err(ClientError::Config(format!("{bare} is a domain; a platform JID is name@domain")));
    }
    if opts.password.is_none() && opts.client_cert.is_none() {
        return Err(ClientError::Config("no credentials: give a password or a client certificate".into()));
    }
    let alpn = opts.tls == TlsMode::Direct;
    let config = trust::client_config(&opts.trust, opts.client_cert.as_ref(), alpn)?;
    let connector = TlsConnector::from(config);
    // The certificate is checked against the JID's domain (RFC 6120 §13.7.2.1), never
    // against the host we happen to connect to.
    let server_name = ServerName::try_from(domain.clone())
        .map_err(|e| ClientError::Config(format!("domain {domain}: {e}")))?;
    let limits = Limits { max_stanza_bytes: opts.max_stanza_bytes, max_depth: opts.max_depth };

    let addr = opts.server_addr();
    let tcp = TcpStream::connect(&addr)
        .await
        .map_err(|source| ClientError::Connect { addr: addr.clone(), source })?;
    // Stanzas are written whole; Nagle would only delay small IQs.
    let _ = tcp.set_nodelay(true);

    let tcp = match opts.tls {
        TlsMode::Direct => tcp,
        TlsMode::StartTls => starttls(tcp, &domain, limits).await?,
    };
    let tls = connector
        .connect(server_name, tcp)
        .await
        .map_err(|e| ClientError::Tls(tls_error_text(&e)))?;

    let (_, conn) = tls.get_ref();
    let tls_version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "unknown",
    };
    if alpn && conn.alpn_protocol().is_some_and(|p| p != crate::tls::ALPN_XMPP_CLIENT) {
        return Err(ClientError::Tls("server chose another ALPN protocol".into()));
    }
    let leaf = conn.peer_certificates().and_then(|c| c.first()).map(|c| c.as_ref().to_vec());
    let bindings = scram::Bindings {
        // RFC 9266 §2: 32 bytes, label "EXPORTER-Channel-Binding", empty context. Sound
        // on TLS 1.2 too, because our config requires Extended Master Secret.
        tls_exporter: conn
            .export_keying_material([0u8; 32], crate::tls::TLS_EXPORTER_LABEL, Some(&[]))
            .ok()
            .map(|b| b.to_vec()),
        tls_server_end_point: leaf.as_deref().and_then(crate::tls::tls_server_end_point),
        tls13: tls_version == "TLSv1.3",
    };
    let server_fingerprint = leaf.as_deref().map(Fingerprint::of);

    let mut wire = Wire::new(tls, limits);
    wire.open(&domain, Some(&bare)).await?;
    let features = wire.read_features().await?;
    let (mechanism, channel_binding) = authenticate(&mut wire, &features, &opts, &bindings).await?;

    // RFC 6120 §6.4.6: after <success/> both sides restart the stream.
    wire.parser.restart();
    wire.open(&domain, Some(&bare)).await?;
    let features = wire.read_features().await?;
    let jid = bind(&mut wire, &features, &opts, &bare).await?;

    let mut prefix = [0u8; 6];
    aws_lc_rs::rand::fill(&mut prefix).map_err(|_| ClientError::Config("no randomness".into()))?;
    let mut client = Client {
        wire,
        jid,
        info: SessionInfo { tls_version, mechanism, channel_binding, server_fingerprint },
        pending: VecDeque::new(),
        id_prefix: prefix.iter().map(|b| format!("{b:02x}")).collect(),
        next_id: 0,
        iq_timeout: opts.iq_timeout,
        keepalive: opts.keepalive,
        max_buffered: opts.max_buffered,
        answer_iqs: opts.answer_iqs,
        closed: false,
    };
    if opts.presence {
        client.send(&Element::new("presence", ns::CLIENT)).await?;
    }
    tracing::debug!(jid = %client.jid, info = ?client.info, "connected");
    Ok(client)
}

/// RFC 6120 §5.4: header, features, `<starttls/>`, `<proceed/>`; returns the socket
/// for the TLS handshake. A server that does not offer STARTTLS is refused: we never
/// authenticate in the clear.
async fn starttls(tcp: TcpStream, domain: &str, limits: Limits) -> Result<TcpStream, ClientError> {
    let mut plain = Wire::new(tcp, limits);
    plain.open(domain, None).await?;
    let features = plain.read_features().await?;
    if features.child("starttls", ns::TLS).is_none() {
        return Err(ClientError::Protocol("server does not offer STARTTLS; refusing to continue in plaintext".into()));
    }
    plain.send(&Element::new("starttls", ns::TLS)).await?;
    let answer = plain.next_element().await?;
    if answer.is("failure", ns::TLS) {
        return Err(ClientError::Tls("server refused STARTTLS".into()));
    }
    if !answer.is("proceed", ns::TLS) {
        return Err(ClientError::Protocol(format!("expected <proceed/>, got <{}>", answer.name)));
    }
    // Bytes sent after <proceed/> but before the handshake would be injected into the
    // secure stream (CVE-2011-0411): a server must send none.
    if plain.parser.buffered_len() != 0 {
        return Err(ClientError::Protocol("data after <proceed/>".into()));
    }
    Ok(plain.io)
}

/// rustls errors with the pin mismatch or certificate problem spelled out.
fn tls_error_text(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        // Our pin check reports through `General`, whose Display adds "unexpected error".
        Some(rustls::Error::General(m)) => m.clone(),
        Some(r) => r.to_string(),
        None => e.to_string(),
    }
}

/// RFC 6120 §6: chooses a mechanism ([`scram::choose`]) and runs the exchange.
/// Returns the mechanism name and the channel-binding type used.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    wire: &mut Wire<S>,
    features: &Element,
    opts: &ClientOptions,
    bindings: &scram::Bindings,
) -> Result<(String, Option<&'static str>), ClientError> {
    let offered: Vec<String> = features
        .child("mechanisms", ns::SASL)
        .map(|m| m.elements().filter(|e| e.is("mechanism", ns::SASL)).map(|e| e.text().trim().to_owned()).collect())
        .unwrap_or_default();
    // XEP-0440: the server's channel-binding types, if it says.
    let cb_types: Option<Vec<String>> = features.child("sasl-channel-binding", ns::SASL_CB).map(|c| {
        c.elements()
            .filter(|e| e.is("channel-binding", ns::SASL_CB))
            .filter_map(|e| e.attr("type").map(str::to_owned))
            .collect()
    });
    let choice = scram::choose(&offered, opts.client_cert.is_some(), opts.password.is_some(), bindings, cb_types.as_deref())
        .ok_or_else(|| ClientError::NoMechanism { offered: offered.join(" ") })?;
    let name = choice.name();
    let username = opts.jid.bare().local().unwrap_or_default().to_owned();

    let mut scram_state = None;
    let initial: Vec<u8> = match &choice {
        scram::Choice::External => Vec::new(),
        scram::Choice::Plain => {
            let pw = opts.password.as_deref().unwrap_or_default();
            format!("\0{username}\0{pw}").into_bytes()
        }
        scram::Choice::Scram { hash, cb, .. } => {
            let pw = opts.password.as_deref().unwrap_or_default();
            let s = scram::ScramClient::new(*hash, &username, pw, cb.clone(), scram::random_nonce()?)
                .map_err(|e| ClientError::Config(e.to_string()))?;
            let first = s.client_first();
            scram_state = Some(s);
            first
        }
    };
    // RFC 6120 §6.4.2: an empty initial response is written "=".
    let text = if initial.is_empty() { "=".to_owned() } else { B64.encode(&initial) };
    wire.send(&Element::new("auth", ns::SASL).with_attr("mechanism", &name).with_text(text)).await?;

    let mut step = 0;
    let mut verified = false;
    loop {
        let e = wire.next_element().await?;
        if e.ns != ns::SASL {
            return Err(ClientError::Protocol(format!("unexpected <{}> during SASL", e.name)));
        }
        let data = match e.text().trim() {
            "" | "=" => Vec::new(),
            t => B64.decode(t).map_err(|_| ClientError::Protocol("SASL data is not base64".into()))?,
        };
        match e.name.as_str() {
            "challenge" => {
                step += 1;
                let reply = match (&mut scram_state, step) {
                    (Some(s), 1) => s.handle_server_first(&data).map_err(scram_err)?,
                    (Some(s), 2) => {
                        // Some servers send server-final as a challenge and <success/> empty.
                        s.verify_server_final(&data).map_err(scram_err)?;
                        verified = true;
                        Vec::new()
                    }
                    _ => return Err(ClientError::Protocol("unexpected SASL challenge".into())),
                };
                let text = if reply.is_empty() { String::new() } else { B64.encode(&reply) };
                wire.send(&Element::new("response", ns::SASL).with_text(text)).await?;
            }
            "success" => {
                if let Some(s) = scram_state.as_ref().filter(|_| !verified) {
                    if data.is_empty() {
                        return Err(ClientError::ServerAuth("no server signature in <success/>".into()));
                    }
                    s.verify_server_final(&data).map_err(scram_err)?;
                }
                let cb = match &choice {
                    scram::Choice::Scram { cb: scram::Cb::Bound { name, .. }, .. } => Some(*name),
                    _ => None,
                };
                return Ok((name, cb));
            }
            "failure" => {
                let condition = e
                    .elements()
                    .find(|c| c.name != "text")
                    .map(|c| c.name.clone())
                    .unwrap_or_else(|| "not-authorized".into());
                let text = e.child("text", ns::SASL).map(Element::text);
                return Err(ClientError::Auth { condition, text });
            }
            other => return Err(ClientError::Protocol(format!("unexpected <{other}> during SASL"))),
        }
    }
}

fn scram_err(e: scram::ScramError) -> ClientError {
    match e {
        scram::ScramError::BadServerSignature => ClientError::ServerAuth(e.to_string()),
        scram::ScramError::ServerError(ref m) => ClientError::Auth { condition: m.clone(), text: None },
        _ => ClientError::Protocol(e.to_string()),
    }
}

/// RFC 6120 §7: binds a resource (ours if the JID had one, else the server's choice),
/// then the RFC 3921 session IQ only where a server still marks it mandatory.
async fn bind<S: AsyncRead + AsyncWrite + Unpin>(
    wire: &mut Wire<S>,
    features: &Element,
    opts: &ClientOptions,
    bare: &BareJid,
) -> Result<FullJid, ClientError> {
    if features.child("bind", ns::BIND).is_none() {
        return Err(ClientError::Protocol("server does not offer resource binding".into()));
    }
    let mut b = Element::new("bind", ns::BIND);
    if let Some(r) = opts.jid.resource() {
        b.push(Element::new("resource", ns::BIND).with_text(r));
    }
    let reply = negotiation_iq(wire, "bind1", b).await?;
    let jid_text = reply
        .child("bind", ns::BIND)
        .and_then(|b| b.child("jid", ns::BIND))
        .map(Element::text)
        .ok_or_else(|| ClientError::Protocol("bind result without <jid/>".into()))?;
    let jid = match Jid::parse(jid_text.trim()) {
        Ok(Jid::Full(f)) => f,
        _ => return Err(ClientError::Protocol(format!("server bound an invalid JID {jid_text:?}"))),
    };
    // EXTERNAL may authenticate another account than the one named on the command
    // line; the server's word is what counts, but a surprise deserves a log line.
    if jid.bare() != bare {
        tracing::warn!(requested = %bare, bound = %jid, "server bound another JID");
    }
    let session_required = features
        .child("session", ns::SESSION)
        .is_some_and(|s| s.child("optional", ns::SESSION).is_none());
    if session_required {
        negotiation_iq(wire, "sess1", Element::new("session", ns::SESSION)).await?;
    }
    Ok(jid)
}

/// One IQ set during negotiation, when nothing else may arrive.
async fn negotiation_iq<S: AsyncRead + AsyncWrite + Unpin>(
    wire: &mut Wire<S>,
    id: &str,
    payload: Element,
) -> Result<Element, ClientError> {
    let iq = Element::new("iq", ns::CLIENT).with_attr("type", "set").with_attr("id", id).with_child(payload);
    wire.send(&iq).await?;
    loop {
        let r = wire.next_element().await?;
        if r.name != "iq" || r.attr("id") != Some(id) {
            // Nothing is routed to an unbound resource; skip rather than fail on oddities.
            continue;
        }
        return match r.attr("type") {
            Some("result") => Ok(r),
            _ => Err(ClientError::Stanza(RemoteError::from_stanza(&r))),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> FullJid {
        match Jid::parse("p1@grid.test/r") {
            Ok(Jid::Full(f)) => f,
            other => panic!("test JID: {other:?}"),
        }
    }

    fn iq(ty: &str, id: &str, from: Option<&str>) -> Element {
        let mut e = Element::new("iq", ns::CLIENT).with_attr("type", ty).with_attr("id", id);
        if let Some(f) = from {
            e.set_attr("from", f);
        }
        e
    }

    #[test]
    fn replies_must_come_from_the_addressee() {
        let me = me();
        assert!(is_reply_to(&iq("result", "1", Some("broker.grid.test")), "1", Some("broker.grid.test"), &me));
        assert!(is_reply_to(&iq("error", "1", Some("Broker.Grid.Test")), "1", Some("broker.grid.test"), &me));
        assert!(!is_reply_to(&iq("result", "1", Some("evil@grid.test")), "1", Some("broker.grid.test"), &me));
        assert!(!is_reply_to(&iq("result", "1", None), "1", Some("broker.grid.test"), &me));
        assert!(!is_reply_to(&iq("result", "2", Some("broker.grid.test")), "1", Some("broker.grid.test"), &me));
        assert!(!is_reply_to(&iq("get", "1", Some("broker.grid.test")), "1", Some("broker.grid.test"), &me));
    }

    #[test]
    fn replies_to_requests_without_to_come_from_us_or_our_server() {
        let me = me();
        for from in [None, Some("grid.test"), Some("p1@grid.test"), Some("p1@grid.test/r")] {
            assert!(is_reply_to(&iq("result", "1", from), "1", None, &me), "{from:?}");
        }
        assert!(!is_reply_to(&iq("result", "1", Some("p2@grid.test")), "1", None, &me));
    }

    #[test]
    fn remote_errors_carry_condition_text_and_pubsub_condition() {
        let st = Element::new("iq", ns::CLIENT).with_attr("type", "error").with_child(
            Element::new("error", ns::CLIENT)
                .with_attr("type", "modify")
                .with_child(Element::new("bad-request", ns::STANZA_ERRORS))
                .with_child(Element::new("text", ns::STANZA_ERRORS).with_text("no payload"))
                .with_child(Element::new("invalid-payload", pubsub::NS_PUBSUB_ERRORS)),
        );
        let e = RemoteError::from_stanza(&st);
        assert_eq!(e.kind, "modify");
        assert_eq!(e.condition, "bad-request");
        assert_eq!(e.text.as_deref(), Some("no payload"));
        assert_eq!(e.app_condition.as_deref(), Some("invalid-payload"));
        assert_eq!(e.to_string(), "bad-request (invalid-payload): no payload");
        let bare = RemoteError::from_stanza(&Element::new("iq", ns::CLIENT));
        assert_eq!(bare.condition, "undefined-condition");
    }

    #[test]
    fn stream_errors_map_to_conditions() {
        let e = Element::new("error", ns::STREAM)
            .with_child(Element::new("policy-violation", ns::STREAM_ERRORS))
            .with_child(Element::new("text", ns::STREAM_ERRORS).with_text("too big"));
        let s = stream_error(&e);
        assert_eq!(s.condition, StreamCondition::PolicyViolation);
        assert_eq!(s.text.as_deref(), Some("too big"));
    }

    #[test]
    fn default_server_address_follows_the_domain() {
        let j = |s: &str| Jid::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        let mut o = ClientOptions::new(j("a@localhost"));
        assert_eq!(o.server_addr(), "127.0.0.1:5222");
        o.tls = TlsMode::Direct;
        assert_eq!(o.server_addr(), "127.0.0.1:5223");
        let o = ClientOptions::new(j("a@grid.example"));
        assert_eq!(o.server_addr(), "grid.example:5222");
        let mut o = ClientOptions::new(j("a@grid.example"));
        o.server = Some("10.0.0.1:15222".into());
        assert_eq!(o.server_addr(), "10.0.0.1:15222");
    }

    #[test]
    fn options_debug_hides_the_password() {
        let mut o = ClientOptions::new(Jid::parse("a@localhost").unwrap_or_else(|e| panic!("{e}")));
        o.password = Some("hunter2".into());
        assert!(!format!("{o:?}").contains("hunter2"));
    }
}
