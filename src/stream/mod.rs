//! One task per connection: reading and writing XML over TCP or TLS, timeouts,
//! the read-rate limit, and the bound session's loop (inbound stanzas to the
//! router, outbound queue to the socket, close requests from elsewhere).
//!
//! Reads use `read_buf` into the parser's buffer, which is cancel-safe, so the
//! loop can `select!` between reading, writing and being told to close. No
//! stanza logic lives here.

pub mod negotiation;
pub mod parser;

use crate::error::{StreamCondition, StreamError};
use crate::limits::ReadRate;
use crate::ns;
use crate::router::Router;
use crate::limits::PlatformRate;
use crate::session::{Ack, Outbound, SessionHandle};
use crate::xml::Element;
use parser::{Event, Parser};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

/// How a connection ended, or must end.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The peer closed the TCP connection or the stream.
    #[error("connection closed by peer")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// We end the stream with this error.
    #[error("stream error: {0}")]
    Stream(StreamError),
    /// Drop the connection without another byte (e.g. plaintext injected after STARTTLS).
    #[error("aborted: {0}")]
    Abort(&'static str),
}

impl From<StreamError> for ConnError {
    fn from(e: StreamError) -> Self {
        ConnError::Stream(e)
    }
}

/// An XML stream over some byte transport.
pub struct XmlConn<S> {
    pub io: S,
    pub parser: Parser,
    /// Bytes waiting to be written; reused between writes.
    out: Vec<u8>,
    rate: ReadRate,
    /// Reads pause until then (read-rate limit).
    resume_at: Option<Instant>,
    /// The next read must complete by then (negotiation or idle timeout).
    pub deadline: Instant,
    shutdown: watch::Receiver<bool>,
    header_sent: bool,
    domain: String,
}

impl<S> XmlConn<S> {
    /// Pauses reading for `d` (rate limiting: the peer waits, nothing is dropped).
    pub fn pause_reads(&mut self, d: Duration) {
        let until = Instant::now() + d;
        self.resume_at = Some(self.resume_at.map_or(until, |t| t.max(until)));
    }

    /// Takes the transport out (for the TLS handshake), keeping the stream state.
    pub fn into_io(self) -> (S, XmlConn<()>) {
        let XmlConn { io, parser, out, rate, resume_at, deadline, shutdown, header_sent: _, domain } = self;
        (io, XmlConn { io: (), parser, out, rate, resume_at, deadline, shutdown, header_sent: false, domain })
    }
}

impl XmlConn<()> {
    /// Puts the stream state onto a new transport; a new stream starts on it.
    pub fn with_io<T>(self, io: T) -> XmlConn<T> {
        let XmlConn { io: (), parser, out, rate, resume_at, deadline, shutdown, header_sent: _, domain } = self;
        XmlConn { io, parser, out, rate, resume_at, deadline, shutdown, header_sent: false, domain }
    }
}

/// Largest write buffer kept between writes; larger ones are released (an
/// idle session should hold no buffer at all).
const OUT_KEEP: usize = 256;

impl<S: AsyncRead + AsyncWrite + Unpin> XmlConn<S> {
    pub fn new(io: S, parser: Parser, rate: ReadRate, deadline: Instant, shutdown: watch::Receiver<bool>, domain: String) -> Self {
        XmlConn { io, parser, out: Vec::new(), rate, resume_at: None, deadline, shutdown, header_sent: false, domain }
    }

    /// Reads more bytes into the parser; returns how many. Cancel-safe: it may be
    /// dropped at any await.
    pub async fn read_more(&mut self) -> Result<usize, ConnError> {
        if *self.shutdown.borrow() {
            return Err(StreamError::new(StreamCondition::SystemShutdown).into());
        }
        if let Some(t) = self.resume_at {
            tokio::time::sleep_until(t).await;
            self.resume_at = None;
        }
        let buf = self.parser.buffer_mut();
        // An idle connection waits with a small buffer; a stanza in progress reads in
        // large steps (rustls has the bytes decrypted already: this is a copy).
        buf.reserve(if buf.is_empty() { 512 } else { 8192 });
        let n = tokio::select! {
            r = tokio::time::timeout_at(self.deadline, self.io.read_buf(buf)) => match r {
                Ok(r) => r?,
                Err(_) => return Err(StreamError::new(StreamCondition::ConnectionTimeout).into()),
            },
            _ = self.shutdown.changed() => return Err(StreamError::new(StreamCondition::SystemShutdown).into()),
        };
        if n == 0 {
            return Err(ConnError::Closed);
        }
        if let Some(pause) = self.rate.consume(n) {
            self.pause_reads(pause);
        }
        Ok(n)
    }

    /// The next parsed event, reading as needed.
    pub async fn next_event(&mut self) -> Result<Event, ConnError> {
        loop {
            match self.parser.next_event() {
                Ok(Some(ev)) => return Ok(ev),
                Ok(None) => {
                    self.read_more().await?;
                }
                Err(e) => return Err(StreamError::with_text(StreamCondition::from_name(e.condition()), e.to_string()).into()),
            }
        }
    }

    /// The next stanza; a stream close or a repeated header ends the connection.
    pub async fn next_stanza(&mut self) -> Result<Element, ConnError> {
        match self.next_event().await? {
            Event::Stanza(e) => Ok(e),
            Event::Close => Err(ConnError::Closed),
            Event::Open(_) => Err(StreamError::with_text(StreamCondition::NotWellFormed, "unexpected stream header").into()),
        }
    }

    /// Our stream header (RFC 6120 §4.7), answering the client's.
    pub fn queue_header(&mut self, stream_id: &str) {
        self.out.extend_from_slice(b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0' xml:lang='en' id='");
        self.out.extend_from_slice(stream_id.as_bytes());
        self.out.extend_from_slice(b"' from='");
        self.out.extend_from_slice(quick_xml::escape::escape(self.domain.as_str()).as_bytes());
        self.out.extend_from_slice(b"'>");
        self.header_sent = true;
    }

    pub fn queue(&mut self, e: &Element) {
        e.write_to(&mut self.out, ns::CLIENT);
    }

    pub fn queue_bytes(&mut self, b: &[u8]) {
        self.out.extend_from_slice(b);
    }

    /// Writes everything queued.
    /// Writes everything queued. Cancel-safe: bytes leave `out` only once the
    /// transport took them, so a write interrupted by a close request resumes
    /// where it stopped (never sends a stanza twice, never half of one).
    pub async fn flush(&mut self) -> Result<(), ConnError> {
        while !self.out.is_empty() {
            let n = self.io.write(&self.out).await?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
            }
            self.out.drain(..n);
        }
        if self.out.capacity() > OUT_KEEP {
            self.out = Vec::new();
        }
        self.io.flush().await?;
        Ok(())
    }

    pub async fn send(&mut self, e: &Element) -> Result<(), ConnError> {
        self.queue(e);
        self.flush().await
    }

    /// Ends the stream: the error (if any), `</stream:stream>`, then TCP shutdown.
    /// Bounded in time so that a peer that stops reading cannot hold us.
    pub async fn close(&mut self, error: Option<&StreamError>) {
        if !self.header_sent {
            self.queue_header("error");
        }
        if let Some(e) = error {
            self.queue(&e.to_element());
        }
        self.out.extend_from_slice(b"</stream:stream>");
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self.flush().await;
            let _ = self.io.shutdown().await;
        })
        .await;
    }

    /// A new random stream id.
    pub fn new_stream_id() -> String {
        let mut b = [0u8; 12];
        let _ = aws_lc_rs::rand::fill(&mut b);
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}

/// Runs a bound session until it ends: inbound stanzas go to the router, queued
/// outbound stanzas to the socket. Returns the error to end the stream with.
pub async fn session_loop<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut XmlConn<S>,
    router: &Router,
    handle: &std::sync::Arc<SessionHandle>,
    rx: &mut crate::session::Outbox,
    idle: Duration,
    rates: &std::sync::Mutex<PlatformRate>,
    audit: &crate::audit::AuditSink,
) -> Result<(), ConnError> {
    conn.deadline = Instant::now() + idle;
    // `<message to='our-jid'`: the start of every notification serialized once for many.
    let mut to_self = b"<message to='".to_vec();
    to_self.extend_from_slice(quick_xml::escape::escape(handle.jid.to_string().as_str()).as_bytes());
    to_self.push(b'\'');
    let mut acks: Vec<Ack> = Vec::new();
    loop {
        // Stanzas already received are processed unless the rate limit paused us.
        while conn.resume_at.is_none_or(|t| t <= Instant::now()) {
            match conn.parser.next_event() {
                Ok(Some(Event::Stanza(s))) => {
                    let publish = is_publish(&s);
                    router.route(handle, s)?;
                    throttle(conn, handle, rates, audit, 1, usize::from(publish), 0)?;
                }
                Ok(Some(Event::Close)) => return Err(ConnError::Closed),
                Ok(Some(Event::Open(_))) => {
                    return Err(StreamError::with_text(StreamCondition::NotWellFormed, "unexpected stream header").into());
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(StreamError::with_text(StreamCondition::from_name(e.condition()), e.to_string()).into());
                }
            }
        }
        if conn.parser.buffered_len() == 0 {
            conn.parser.shrink_idle();
        }
        let paused = conn.resume_at.filter(|t| *t > Instant::now());
        tokio::select! {
            biased;
            reason = handle.closed() => return Err(reason.into()),
            // Throttled: neither parse nor read until the buckets refill. The idle
            // timer keeps running only while we are willing to read.
            _ = tokio::time::sleep_until(paused.unwrap_or_else(Instant::now)), if paused.is_some() => {
                conn.resume_at = None;
                conn.deadline = Instant::now() + idle;
            }
            Some(first) = rx.recv() => {
                let mut next = Some(first);
                while let Some(o) = next.take() {
                    match o {
                        Outbound::Stanza(b) => conn.queue_bytes(&b),
                        Outbound::ToSelf { rest, ack } => {
                            conn.queue_bytes(&to_self);
                            conn.queue_bytes(&rest);
                            acks.extend(ack);
                        }
                    }
                    if conn.out.len() < 64 * 1024 {
                        next = rx.try_recv();
                    }
                }
                // A client that stops reading must not pin us in write_all: a close
                // request (e.g. its queue overflowed meanwhile) interrupts the write.
                tokio::select! {
                    r = conn.flush() => r?,
                    reason = handle.closed() => return Err(ConnError::Stream(reason)),
                }
                for a in acks.drain(..) {
                    a.cursor.fetch_max(a.seq, std::sync::atomic::Ordering::Relaxed);
                }
            }
            r = conn.read_more(), if paused.is_none() => {
                let n = r?;
                conn.deadline = Instant::now() + idle;
                throttle(conn, handle, rates, audit, 0, 0, n)?;
            }
        }
    }
}

/// A publish request (XEP-0060 §7.1), for the publish rate limit.
fn is_publish(s: &Element) -> bool {
    s.name == "iq"
        && s.elements().next().is_some_and(|c| {
            c.name == "pubsub" && c.ns == crate::pubsub::protocol::NS_PUBSUB && c.elements().any(|e| e.name == "publish")
        })
}

/// Charges the platform's rate limits; pauses reading when over, and ends the
/// stream when the excess has lasted too long (the caller then disables the platform).
fn throttle<S>(
    conn: &mut XmlConn<S>,
    handle: &SessionHandle,
    rates: &std::sync::Mutex<PlatformRate>,
    audit: &crate::audit::AuditSink,
    stanzas: usize,
    publishes: usize,
    bytes: usize,
) -> Result<(), ConnError> {
    let c = rates.lock().unwrap_or_else(|p| p.into_inner()).charge(stanzas, publishes, bytes);
    if c.episode_started {
        tracing::warn!(platform = %handle.jid.bare(), "rate limit reached: reads paused");
        audit.record(
            crate::audit::Kind::RateLimit,
            handle.jid.bare().to_string(),
            crate::audit::fields([("action", "throttled"), ("source", &handle.context.source.to_string())]),
        );
    }
    if c.abuse {
        return Err(StreamError::with_text(StreamCondition::PolicyViolation, "rate limits exceeded for too long").into());
    }
    if let Some(p) = c.pause {
        conn.pause_reads(p);
    }
    Ok(())
}
