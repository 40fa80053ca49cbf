//! Incremental, cancel-safe XMPP stream parser (RFC 6120 §4.2, §4.3, §11).
//!
//! The connection task appends bytes read from the socket (`read_buf`, which is
//! cancel-safe in `tokio::select!`) to [`Parser::buffer_mut`] and calls
//! [`Parser::next_event`] until it returns `Ok(None)`. The parser is pure and
//! synchronous, so dropping a pending read never loses parser state
//! (quick-xml's async reader is not cancel-safe: notes, pitfall 10).
//!
//! Two stages:
//! 1. A byte framer resumes where it stopped on every call (linear time however
//!    the input is split). It finds where the stream header and each top-level
//!    stanza end, enforces the size and depth limits as soon as they are
//!    crossed, and rejects early what RFC 6120 §11.1 forbids (comments, DTDs,
//!    processing instructions), characters XML 1.0 §2.2 forbids, and raw `<`
//!    in attribute values.
//! 2. A complete stanza is checked as UTF-8 and parsed by quick-xml's sync
//!    `NsReader` over the slice into an [`Element`]; here we add what quick-xml
//!    does not check (notes, pitfall 8): XML names, undefined entities, illegal
//!    character references, unbound attribute prefixes.
//!
//! It must not do I/O, know about negotiation state (that is
//! `stream::negotiation`), or look at what stanzas mean.

use crate::xml::Element;
use quick_xml::XmlVersion;
use quick_xml::escape::resolve_xml_entity;
use quick_xml::events::{BytesRef, BytesStart, Event as XmlEvent};
use quick_xml::name::{Namespace, PrefixDeclaration, QName, ResolveResult};
use quick_xml::reader::{NsReader, Reader};
use std::ops::Range;

/// The stream namespace (RFC 6120 §4.8.1).
pub const NS_STREAMS: &str = "http://etherx.jabber.org/streams";
/// The only content namespace we serve (RFC 6120 §4.8.2); jabber:server is not supported.
pub const NS_CLIENT: &str = "jabber:client";
const NS_XML: &str = "http://www.w3.org/XML/1998/namespace";
const NS_XMLNS: &str = "http://www.w3.org/2000/xmlns/";

/// Per-stream parsing limits (RFC 6120 §13.12: stanza size is a deployment choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest top-level stanza (and stream header), in bytes as received.
    pub max_stanza_bytes: usize,
    /// Deepest element nesting within a stanza; the stanza element itself is depth 1.
    pub max_depth: usize,
}

/// The attributes of a received stream header (RFC 6120 §4.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    /// `to`: the domain the peer wants to reach.
    pub to: Option<String>,
    /// `from`: the peer's claimed identity.
    pub from: Option<String>,
    /// `version`: `1.0` for RFC 6120 peers; checked by negotiation.
    pub version: Option<String>,
    /// `xml:lang`: the default language of the stream.
    pub lang: Option<String>,
    /// `id`: set only by a receiving entity; a client should not send it.
    pub id: Option<String>,
    /// The content namespace declared as default (always `jabber:client` once accepted).
    pub default_ns: String,
}

/// What the parser found in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A stream header `<stream:stream ...>` (at start and after each restart).
    Open(StreamHeader),
    /// A complete top-level element (stanza or negotiation element).
    Stanza(Element),
    /// The closing `</stream:stream>`.
    Close,
}

/// Why a stream must be closed. Each maps to an RFC 6120 §4.9.3 stream error
/// condition ([`condition`](Self::condition)); `Display` is the human-readable text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// XML or XML-Namespaces well-formedness violated (§4.9.3.13).
    #[error("not well-formed: {0}")]
    NotWellFormed(String),
    /// A construct RFC 6120 §11.1 forbids: comment, DTD, PI, undefined entity (§4.9.3.18).
    #[error("restricted XML: {0}")]
    RestrictedXml(String),
    /// A stanza or header above `Limits::max_stanza_bytes` (§4.9.3.15, §13.12).
    #[error("stanza larger than {limit} bytes")]
    StanzaTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// Elements nested deeper than `Limits::max_depth` (§4.9.3.15).
    #[error("elements nested deeper than {limit}")]
    TooDeep {
        /// The configured limit.
        limit: usize,
    },
    /// Wrong stream namespace or unsupported content namespace (§4.9.3.10, §11.2).
    #[error("invalid namespace: {0}")]
    InvalidNamespace(String),
    /// XML we cannot process as XMPP, e.g. text between stanzas (§4.9.3.1).
    #[error("bad format: {0}")]
    BadFormat(String),
    /// Input that is not UTF-8, or a declaration naming another encoding (§4.9.3.22, §11.6).
    #[error("unsupported encoding: {0}")]
    UnsupportedEncoding(String),
}

impl ParseError {
    /// The RFC 6120 §4.9.3 defined condition to send in the stream error.
    pub fn condition(&self) -> &'static str {
        match self {
            ParseError::NotWellFormed(_) => "not-well-formed",
            ParseError::RestrictedXml(_) => "restricted-xml",
            ParseError::StanzaTooLarge { .. } | ParseError::TooDeep { .. } => "policy-violation",
            ParseError::InvalidNamespace(_) => "invalid-namespace",
            ParseError::BadFormat(_) => "bad-format",
            ParseError::UnsupportedEncoding(_) => "unsupported-encoding",
        }
    }
}

fn nwf(msg: impl Into<String>) -> ParseError {
    ParseError::NotWellFormed(msg.into())
}

/// Peer-controlled text echoed in an error, cut short: error texts go to logs
/// and possibly the wire, and must not become an amplifier.
fn clip(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// Where the stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Before the stream header: optional XML declaration, whitespace, header.
    Prolog,
    /// Inside the stream: whitespace and top-level elements.
    Stream,
    /// After `</stream:stream>`: nothing more is read.
    Closed,
}

/// Lexical state of the framer, kept between calls so that scanning resumes
/// where the previous call stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// Character data (or stream-level whitespace when `depth == 0`).
    Text,
    /// Just after `<`.
    Lt,
    /// Inside a start tag, outside attribute values.
    StartTag,
    /// Inside an attribute value delimited by this quote byte.
    AttrValue(u8),
    /// Inside an end tag.
    EndTag,
    /// After `<!`, with this many bytes of `[CDATA[` matched.
    Bang(u8),
    /// Inside a CDATA section.
    CData,
    /// Inside `<?...?>`, allowed only as the XML declaration at stream start.
    Decl,
}

/// A complete unit found by the framer: a byte range of the buffer.
#[derive(Debug)]
enum Unit {
    Decl(Range<usize>),
    Header(Range<usize>),
    Stanza(Range<usize>),
    Close(Range<usize>),
}

const CDATA_OPEN: &[u8] = b"[CDATA[";

/// The framer: byte positions and lexical state. Positions index `Parser::buf`.
#[derive(Debug)]
struct Framer {
    mode: Mode,
    lex: Lex,
    /// Bytes before `head` are consumed (parsed units, stream-level whitespace).
    head: usize,
    /// Bytes before `pos` have been scanned.
    pos: usize,
    /// Start of the unit being scanned (its `<`), if any; size limits count from here.
    unit_start: Option<usize>,
    /// Open elements in the current stanza.
    depth: usize,
    /// Last start-tag byte was an unquoted `/` (so `>` closes an empty element).
    slash: bool,
    /// Consecutive `]` (capped at 2) in text or CDATA; in `Decl`, 1 after `?`.
    run: u8,
    /// Nothing but the stream start has been seen: `<?xml` is still allowed (XML §2.8).
    decl_allowed: bool,
    /// After a restart, whitespace left over from the previous stream (e.g. a
    /// newline after `<auth/>`) may precede the new XML declaration.
    restarted: bool,
}

impl Framer {
    fn new() -> Self {
        Framer {
            mode: Mode::Prolog,
            lex: Lex::Text,
            head: 0,
            pos: 0,
            unit_start: None,
            depth: 0,
            slash: false,
            run: 0,
            decl_allowed: true,
            restarted: false,
        }
    }

    /// Scans `buf[self.pos..]` until a unit completes (returned, with `pos` just
    /// past it) or input runs out (`Ok(None)`, everything scanned).
    fn scan(&mut self, buf: &[u8], limits: &Limits) -> Result<Option<Unit>, ParseError> {
        let mut i = self.pos;
        while i < buf.len() {
            let b = buf[i];
            // XML 1.0 §2.2 Char: C0 controls other than TAB, LF, CR, and U+FFFE/U+FFFF
            // (EF BF BE/BF) are never allowed. Checked here once for all contexts;
            // references to them are checked by the tree builder.
            if (b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r'))
                || ((b == 0xBE || b == 0xBF) && i >= 2 && buf[i - 1] == 0xBF && buf[i - 2] == 0xEF)
            {
                return Err(nwf("character not allowed in XML"));
            }
            if let Some(start) = self.unit_start
                && i - start >= limits.max_stanza_bytes
            {
                return Err(ParseError::StanzaTooLarge {
                    limit: limits.max_stanza_bytes,
                });
            }
            match self.lex {
                Lex::Text if self.depth == 0 => match b {
                    b'<' => {
                        self.unit_start = Some(i);
                        self.lex = Lex::Lt;
                    }
                    // Whitespace between stanzas (keepalives, RFC 6120 §4.6.1) is consumed
                    // at once so an idle stream holds no bytes.
                    b' ' | b'\t' | b'\n' | b'\r' => {
                        self.head = i + 1;
                        if !(self.restarted && self.mode == Mode::Prolog) {
                            self.decl_allowed = false;
                        }
                    }
                    _ if self.mode == Mode::Prolog => {
                        return Err(nwf("character data before the stream header"));
                    }
                    _ => {
                        return Err(ParseError::BadFormat(
                            "character data at stream level".into(),
                        ));
                    }
                },
                Lex::Text => match b {
                    b'<' => self.lex = Lex::Lt,
                    b']' => self.run = (self.run + 1).min(2),
                    // XML §2.4: `]]>` must not appear in character data.
                    b'>' if self.run == 2 => return Err(nwf("']]>' in character data")),
                    _ => self.run = 0,
                },
                Lex::Lt => match b {
                    b'/' if self.depth == 0 && self.mode == Mode::Prolog => {
                        return Err(nwf("end tag before the stream header"));
                    }
                    b'/' => self.lex = Lex::EndTag,
                    b'!' => self.lex = Lex::Bang(0),
                    b'?' if self.decl_allowed && self.mode == Mode::Prolog => {
                        self.lex = Lex::Decl;
                        self.run = 0;
                    }
                    // RFC 6120 §11.1: no processing instructions; an XML declaration
                    // only at the very start of a stream.
                    b'?' => return Err(ParseError::RestrictedXml("processing instruction".into())),
                    b'<' | b'>' | b'=' | b'\'' | b'"' | b' ' | b'\t' | b'\n' | b'\r' => {
                        return Err(nwf("malformed tag"));
                    }
                    _ => {
                        if self.mode == Mode::Stream && self.depth + 1 > limits.max_depth {
                            return Err(ParseError::TooDeep {
                                limit: limits.max_depth,
                            });
                        }
                        self.lex = Lex::StartTag;
                        self.slash = false;
                    }
                },
                Lex::StartTag => match b {
                    b'"' | b'\'' => {
                        self.lex = Lex::AttrValue(b);
                        self.slash = false;
                    }
                    b'<' => return Err(nwf("'<' inside a tag")),
                    b'/' => self.slash = true,
                    b'>' => {
                        self.lex = Lex::Text;
                        self.run = 0;
                        if self.mode == Mode::Prolog {
                            if self.slash {
                                return Err(ParseError::BadFormat("empty stream header".into()));
                            }
                            self.mode = Mode::Stream;
                            return Ok(Some(Unit::Header(self.finish_unit(i))));
                        }
                        if !self.slash {
                            self.depth += 1;
                        } else if self.depth == 0 {
                            return Ok(Some(Unit::Stanza(self.finish_unit(i))));
                        }
                    }
                    _ => self.slash = false,
                },
                Lex::AttrValue(q) => match b {
                    // XML §3.1 AttValue: no raw `<`.
                    b'<' => return Err(nwf("'<' in an attribute value")),
                    _ if b == q => self.lex = Lex::StartTag,
                    _ => {}
                },
                Lex::EndTag => match b {
                    b'>' => {
                        self.lex = Lex::Text;
                        self.run = 0;
                        if self.depth == 0 {
                            self.mode = Mode::Closed;
                            return Ok(Some(Unit::Close(self.finish_unit(i))));
                        }
                        self.depth -= 1;
                        if self.depth == 0 {
                            return Ok(Some(Unit::Stanza(self.finish_unit(i))));
                        }
                    }
                    b'<' | b'\'' | b'"' => return Err(nwf("malformed end tag")),
                    _ => {}
                },
                Lex::Bang(k) => {
                    let k = usize::from(k);
                    if CDATA_OPEN.get(k) == Some(&b) {
                        if self.depth == 0 {
                            return Err(ParseError::BadFormat("CDATA at stream level".into()));
                        }
                        self.lex = if k + 1 == CDATA_OPEN.len() {
                            self.run = 0;
                            Lex::CData
                        } else {
                            Lex::Bang(k as u8 + 1)
                        };
                    } else if k == 0 && b == b'-' {
                        return Err(ParseError::RestrictedXml("comment".into()));
                    } else if k == 0 && b == b'D' {
                        return Err(ParseError::RestrictedXml(
                            "document type declaration".into(),
                        ));
                    } else {
                        return Err(nwf("malformed markup declaration"));
                    }
                }
                Lex::CData => match b {
                    b']' => self.run = (self.run + 1).min(2),
                    b'>' if self.run == 2 => {
                        self.lex = Lex::Text;
                        self.run = 0;
                    }
                    _ => self.run = 0,
                },
                Lex::Decl => match b {
                    b'?' => self.run = 1,
                    b'>' if self.run == 1 => {
                        self.lex = Lex::Text;
                        self.run = 0;
                        self.decl_allowed = false;
                        return Ok(Some(Unit::Decl(self.finish_unit(i))));
                    }
                    b'<' => return Err(nwf("'<' in the XML declaration")),
                    _ => self.run = 0,
                },
            }
            i += 1;
        }
        self.pos = i;
        Ok(None)
    }

    /// Ends the unit whose last byte is at `last`: consumed up to there.
    fn finish_unit(&mut self, last: usize) -> Range<usize> {
        let start = self.unit_start.take().unwrap_or(self.head);
        self.pos = last + 1;
        self.head = last + 1;
        start..last + 1
    }
}

/// What the stream header put in scope for every stanza (XML Namespaces §6.1).
#[derive(Debug, Clone)]
struct StreamScope {
    /// The header's qualified name, e.g. `stream:stream`, to match the closing tag.
    qname: String,
    /// The content namespace (default namespace on the header).
    default_ns: String,
    /// `xmlns:p` declarations on the header, e.g. (`stream`, NS_STREAMS).
    prefixes: Vec<(String, String)>,
}

/// Incremental XMPP stream parser. See the module docs for how to drive it.
#[derive(Debug)]
pub struct Parser {
    limits: Limits,
    buf: Vec<u8>,
    framer: Framer,
    scope: Option<StreamScope>,
    /// The first error, returned again on every later call: a failed stream is dead.
    failed: Option<ParseError>,
}

impl Parser {
    /// A parser expecting a stream header, holding no buffer memory yet.
    pub fn new(limits: Limits) -> Self {
        Parser {
            limits,
            buf: Vec::new(),
            framer: Framer::new(),
            scope: None,
            failed: None,
        }
    }

    /// The buffer to append received bytes to (e.g. `reader.read_buf(parser.buffer_mut())`).
    /// Consumed bytes are dropped first, so appending never shifts pending data twice.
    pub fn buffer_mut(&mut self) -> &mut Vec<u8> {
        self.compact();
        &mut self.buf
    }

    /// The next event, `Ok(None)` when more bytes are needed. After an error the
    /// stream is unusable and the same error is returned again.
    pub fn next_event(&mut self) -> Result<Option<Event>, ParseError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.step();
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    /// Stream restart (RFC 6120 §5.4.3.3 after STARTTLS, §6.4.6 after SASL): expect a
    /// new header, possibly preceded by an XML declaration. Bytes already buffered are
    /// kept and parsed as the new stream (the caller checks `buffered_len` first where
    /// that would be unsafe).
    pub fn restart(&mut self) {
        let head = self.framer.head;
        self.framer = Framer {
            head,
            pos: head,
            restarted: true,
            ..Framer::new()
        };
        self.scope = None;
    }

    /// Consumes whitespace waiting at the start of the buffer, between top-level
    /// elements (it belongs to the stream, RFC 6120 §11.7). Used right after
    /// `<proceed/>`, where a client's trailing newline is not an injection.
    pub fn skip_whitespace(&mut self) {
        let f = &mut self.framer;
        if f.depth > 0 || f.unit_start.is_some() || !matches!(f.lex, Lex::Text) {
            return;
        }
        while f.head < self.buf.len() && matches!(self.buf[f.head], b' ' | b'\t' | b'\n' | b'\r') {
            f.head += 1;
        }
        f.pos = f.pos.max(f.head);
    }

    /// Received bytes not yet consumed. Must be 0 right after `<proceed/>`: bytes
    /// sent before the TLS handshake would otherwise be injected into the secure
    /// stream (CVE-2011-0411).
    pub fn buffered_len(&self) -> usize {
        self.buf.len() - self.framer.head
    }

    /// Releases buffer memory while idle: frees the buffer when nothing is pending,
    /// otherwise shrinks it to the pending bytes. Call before waiting on an idle
    /// connection, not after every stanza (the buffer would be regrown each time).
    pub fn shrink_idle(&mut self) {
        self.compact();
        if self.buf.is_empty() {
            self.buf = Vec::new();
        } else {
            self.buf.shrink_to_fit();
        }
    }

    /// Drops consumed bytes from the front of the buffer.
    fn compact(&mut self) {
        let f = &mut self.framer;
        if f.head == 0 {
            return;
        }
        self.buf.drain(..f.head);
        f.pos -= f.head;
        f.unit_start = f.unit_start.map(|s| s - f.head);
        f.head = 0;
    }

    fn step(&mut self) -> Result<Option<Event>, ParseError> {
        loop {
            if self.framer.mode == Mode::Closed {
                // After `</stream:stream>` nothing is parsed; drop what still arrives.
                self.framer.head = self.buf.len();
                self.framer.pos = self.buf.len();
                return Ok(None);
            }
            let Some(unit) = self.framer.scan(&self.buf, &self.limits)? else {
                return Ok(None);
            };
            match unit {
                Unit::Decl(r) => check_decl(utf8(&self.buf[r])?)?,
                Unit::Header(r) => {
                    let (header, scope) = parse_header(utf8(&self.buf[r])?)?;
                    self.scope = Some(scope);
                    return Ok(Some(Event::Open(header)));
                }
                Unit::Stanza(r) => {
                    let Some(scope) = &self.scope else {
                        return Err(nwf("stanza outside a stream"));
                    };
                    let el = build_stanza(utf8(&self.buf[r])?, scope)?;
                    return Ok(Some(Event::Stanza(el)));
                }
                Unit::Close(r) => {
                    // `</` + name + optional whitespace + `>`, matched against the header.
                    let bytes = &self.buf[r.start + 2..r.end - 1];
                    let name = utf8(bytes)?.trim_end_matches([' ', '\t', '\n', '\r']);
                    return match &self.scope {
                        Some(s) if s.qname == name => Ok(Some(Event::Close)),
                        _ => Err(nwf(format!("unexpected end tag '{}'", clip(name)))),
                    };
                }
            }
        }
    }
}

/// RFC 6120 §11.6: UTF-8 only.
fn utf8(bytes: &[u8]) -> Result<&str, ParseError> {
    std::str::from_utf8(bytes).map_err(|_| ParseError::UnsupportedEncoding("invalid UTF-8".into()))
}

fn xml_err(e: quick_xml::Error) -> ParseError {
    match e {
        quick_xml::Error::Escape(quick_xml::escape::EscapeError::UnrecognizedEntity(_, name)) => {
            ParseError::RestrictedXml(format!("undefined entity '{}'", clip(&name)))
        }
        quick_xml::Error::Encoding(_) => ParseError::UnsupportedEncoding("invalid UTF-8".into()),
        other => nwf(clip(&other.to_string())),
    }
}

/// The XML declaration (XML §2.8): version 1.0, and UTF-8 if an encoding is named.
fn check_decl(src: &str) -> Result<(), ParseError> {
    let mut reader = Reader::from_str(src);
    match reader.read_event().map_err(xml_err)? {
        XmlEvent::Decl(d) => {
            if d.version().map_err(xml_err)? != "1.0" {
                return Err(nwf("XML version must be 1.0"));
            }
            if let Some(enc) = d.encoding() {
                let enc = enc.map_err(|e| xml_err(e.into()))?;
                if !enc.eq_ignore_ascii_case("UTF-8") {
                    return Err(ParseError::UnsupportedEncoding(clip(&enc)));
                }
            }
            Ok(())
        }
        _ => Err(ParseError::RestrictedXml("processing instruction".into())),
    }
}

/// Parses the header start tag (RFC 6120 §4.7, §4.8): `stream` in the streams
/// namespace, with `jabber:client` as the default namespace.
fn parse_header(src: &str) -> Result<(StreamHeader, StreamScope), ParseError> {
    let mut reader = NsReader::from_str(src);
    loop {
        match reader.read_event().map_err(xml_err)? {
            // The framer let through only whitespace before the tag.
            XmlEvent::Text(_) => continue,
            XmlEvent::Start(start) => {
                let el = element_from(&reader, &start)?;
                if el.ns != NS_STREAMS || el.name != "stream" {
                    return Err(ParseError::InvalidNamespace(format!(
                        "stream header {{{}}}{}",
                        clip(&el.ns),
                        clip(&el.name)
                    )));
                }
                let default_ns = match reader.resolver().resolve_element(QName("x")).0 {
                    ResolveResult::Bound(ns) => ns.into_inner().to_owned(),
                    _ => String::new(),
                };
                if default_ns != NS_CLIENT {
                    return Err(ParseError::InvalidNamespace(format!(
                        "content namespace '{}' not supported",
                        clip(&default_ns)
                    )));
                }
                let prefixes = el
                    .attrs
                    .iter()
                    .filter_map(|(k, v)| Some((k.strip_prefix("xmlns:")?.to_owned(), v.clone())))
                    .collect();
                let attr = |k: &str| el.attr(k).map(str::to_owned);
                let header = StreamHeader {
                    to: attr("to"),
                    from: attr("from"),
                    version: attr("version"),
                    lang: attr("xml:lang"),
                    id: attr("id"),
                    default_ns: default_ns.clone(),
                };
                let qname = start.name().into_inner().to_owned();
                return Ok((
                    header,
                    StreamScope {
                        qname,
                        default_ns,
                        prefixes,
                    },
                ));
            }
            _ => return Err(nwf("expected a stream header")),
        }
    }
}

/// Builds the element tree of one complete top-level element, in the scope of
/// the stream header's namespace declarations.
fn build_stanza(src: &str, scope: &StreamScope) -> Result<Element, ParseError> {
    let mut reader = NsReader::from_str(src);
    // XML §3 WFC Element Type Match (on by default; the framer only counts tags).
    reader.config_mut().check_end_names = true;
    let resolver = reader.resolver_mut();
    let ns_err = |e: quick_xml::name::NamespaceError| nwf(clip(&e.to_string()));
    resolver
        .add(PrefixDeclaration::Default, Namespace(&scope.default_ns))
        .map_err(ns_err)?;
    for (p, uri) in &scope.prefixes {
        resolver
            .add(PrefixDeclaration::Named(p), Namespace(uri))
            .map_err(ns_err)?;
    }
    let mut stack: Vec<Element> = Vec::new();
    loop {
        let done = match reader.read_event().map_err(xml_err)? {
            XmlEvent::Start(start) => {
                stack.push(element_from(&reader, &start)?);
                None
            }
            XmlEvent::Empty(start) => Some(element_from(&reader, &start)?),
            XmlEvent::End(_) => Some(stack.pop().ok_or_else(|| nwf("unbalanced end tag"))?),
            XmlEvent::Text(t) => {
                text_target(&mut stack)?.push_text(t.xml10_content());
                None
            }
            XmlEvent::CData(c) => {
                text_target(&mut stack)?.push_text(c.xml10_content());
                None
            }
            XmlEvent::GeneralRef(r) => {
                let target = text_target(&mut stack)?;
                match resolve_ref(&r)? {
                    Resolved::Char(c) => target.push_text(c.encode_utf8(&mut [0; 4]).to_owned()),
                    Resolved::Str(s) => target.push_text(s),
                }
                None
            }
            // The framer rejects these first; kept so the tree builder is safe alone.
            XmlEvent::Comment(_) | XmlEvent::DocType(_) | XmlEvent::PI(_) | XmlEvent::Decl(_) => {
                return Err(ParseError::RestrictedXml("restricted XML construct".into()));
            }
            XmlEvent::Eof => return Err(nwf("unexpected end of stanza")),
        };
        if let Some(el) = done {
            match stack.last_mut() {
                Some(parent) => parent.push(el),
                None => {
                    // The framer cut at the root's end; anything else means the two
                    // stages disagree about the structure: refuse rather than guess.
                    return match reader.read_event().map_err(xml_err)? {
                        XmlEvent::Eof => Ok(el),
                        _ => Err(nwf("content after the top-level element")),
                    };
                }
            }
        }
    }
}

fn text_target(stack: &mut [Element]) -> Result<&mut Element, ParseError> {
    stack
        .last_mut()
        .ok_or_else(|| ParseError::BadFormat("character data at stream level".into()))
}

enum Resolved {
    Char(char),
    Str(&'static str),
}

/// RFC 6120 §11.1: only the five predefined entities and character references;
/// XML §2.2 WFC Legal Character for the latter.
fn resolve_ref(r: &BytesRef<'_>) -> Result<Resolved, ParseError> {
    match r.resolve_char_ref() {
        Ok(Some(c)) if is_xml_char(c) => Ok(Resolved::Char(c)),
        Ok(Some(_)) => Err(nwf("character reference to a character not allowed in XML")),
        Ok(None) => match resolve_xml_entity(r) {
            Some(s) => Ok(Resolved::Str(s)),
            None => Err(ParseError::RestrictedXml(format!(
                "undefined entity '{}'",
                clip(r)
            ))),
        },
        Err(e) => Err(xml_err(e)),
    }
}

/// XML 1.0 §2.2 Char (surrogates cannot occur in a `char`).
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{FFFD}' | '\u{10000}'..)
}

/// Builds an element (without children) from a start tag, with the reader's
/// resolver holding the bindings in scope for it.
fn element_from<R>(reader: &NsReader<R>, start: &BytesStart<'_>) -> Result<Element, ParseError> {
    let qname = start.name();
    check_qname(qname.into_inner())?;
    let resolver = reader.resolver();
    let (res, local) = resolver.resolve_element(qname);
    let ns = match res {
        ResolveResult::Bound(ns) => ns.into_inner().to_owned(),
        ResolveResult::Unbound => String::new(),
        ResolveResult::Unknown(p) => return Err(nwf(format!("unbound prefix '{}'", clip(&p)))),
    };
    let prefix = qname.prefix().map(|p| p.into_inner().to_owned());
    // XML Namespaces §3: element names must not have the prefix `xmlns`.
    if prefix.as_deref() == Some("xmlns") {
        return Err(nwf("element with the 'xmlns' prefix"));
    }
    let mut attrs: Vec<(String, String)> = Vec::new();
    // Prefixes used by attributes, with their bindings, for the copy-down below.
    let mut used: Vec<(String, String)> = Vec::new();
    // Duplicate, unquoted and valueless attributes are rejected by quick-xml's checks.
    for a in start.attributes() {
        let a = a.map_err(|e| nwf(clip(&e.to_string())))?;
        let key = a.key.into_inner();
        check_qname(key)?;
        let raw_has_ref = a.value.contains('&');
        let value = a
            .normalized_value_with(XmlVersion::Implicit1_0, 1, resolve_xml_entity)
            .map_err(xml_err)?;
        // Raw characters were checked by the framer; references may still produce
        // illegal ones (`&#x1;`).
        if raw_has_ref && !value.chars().all(is_xml_char) {
            return Err(nwf("character reference to a character not allowed in XML"));
        }
        if key == "xmlns" {
            // XML Namespaces §3: the reserved namespaces cannot be the default.
            if value == NS_XML || value == NS_XMLNS {
                return Err(nwf("reserved namespace declared as default"));
            }
            continue; // carried by `ns` (and by the children's `ns`)
        }
        if let Some(p) = key.strip_prefix("xmlns:") {
            // XML Namespaces 1.0 §3: a prefix cannot be undeclared.
            if value.is_empty() {
                return Err(nwf(format!("empty namespace for prefix '{}'", clip(p))));
            }
        } else if let Some(p) = a.key.prefix().filter(|p| !p.is_xml()) {
            match resolver.resolve_attribute(a.key).0 {
                ResolveResult::Bound(uri) => {
                    used.push((p.into_inner().to_owned(), uri.into_inner().to_owned()));
                }
                _ => return Err(nwf(format!("unbound prefix '{}'", clip(p.into_inner())))),
            }
        }
        attrs.push((key.to_owned(), value.into_owned()));
    }
    if let Some(p) = &prefix {
        used.insert(0, (p.clone(), ns.clone()));
    }
    // Copy down the declarations of prefixes this element uses but an ancestor
    // declared, so the element serializes standalone (the writer drops them again
    // where they are redundant).
    for (p, uri) in used {
        if p != "xml"
            && !attrs
                .iter()
                .any(|(k, _)| k.strip_prefix("xmlns:") == Some(p.as_str()))
        {
            attrs.push((format!("xmlns:{p}"), uri));
        }
    }
    Ok(Element {
        name: local.into_inner().to_owned(),
        ns,
        prefix,
        attrs,
        children: Vec::new(),
    })
}

/// XML Namespaces §4 QName: an NCName, or two NCNames joined by one colon.
/// quick-xml does not check names (notes, pitfall 8: `<1message/>` passes).
fn check_qname(name: &str) -> Result<(), ParseError> {
    let ok = match name.split_once(':') {
        Some((p, l)) => is_ncname(p) && is_ncname(l),
        None => is_ncname(name),
    };
    if ok {
        Ok(())
    } else {
        Err(nwf(format!("invalid XML name '{}'", clip(name))))
    }
}

/// XML 1.0 (5th ed.) §2.3 Name productions, without the colon.
fn is_ncname(s: &str) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if is_name_start(c) => chars.all(is_name_char),
        _ => false,
    }
}

fn is_name_start(c: char) -> bool {
    matches!(c,
        'A'..='Z' | '_' | 'a'..='z' | '\u{C0}'..='\u{D6}' | '\u{D8}'..='\u{F6}'
        | '\u{F8}'..='\u{2FF}' | '\u{370}'..='\u{37D}' | '\u{37F}'..='\u{1FFF}'
        | '\u{200C}'..='\u{200D}' | '\u{2070}'..='\u{218F}' | '\u{2C00}'..='\u{2FEF}'
        | '\u{3001}'..='\u{D7FF}' | '\u{F900}'..='\u{FDCF}' | '\u{FDF0}'..='\u{FFFD}'
        | '\u{10000}'..='\u{EFFFF}')
}

fn is_name_char(c: char) -> bool {
    is_name_start(c)
        || matches!(c, '-' | '.' | '0'..='9' | '\u{B7}' | '\u{300}'..='\u{36F}' | '\u{203F}'..='\u{2040}')
}

/// Exactly one element in `xml`, with the stream parser's rules and `limits`
/// (no DOCTYPE, comments or processing instructions; size and depth caps). For
/// XML from outside a stream, e.g. a payload rewritten by a plugin: the caller
/// re-serializes the result, so what goes on the wire is always well-formed.
/// The element is parsed in the scope of a `jabber:client` stream: an element
/// without a namespace declaration gets that one.
pub fn parse_element(xml: &[u8], limits: Limits) -> Result<Element, ParseError> {
    const HEAD: &[u8] =
        b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='grid.test' version='1.0'>";
    let mut p = Parser::new(Limits { max_stanza_bytes: limits.max_stanza_bytes, max_depth: limits.max_depth + 1 });
    p.buffer_mut().extend_from_slice(HEAD);
    p.buffer_mut().extend_from_slice(xml);
    p.buffer_mut().extend_from_slice(b"</stream:stream>");
    let mut found = None;
    loop {
        match p.next_event()? {
            Some(Event::Stanza(e)) if found.is_none() => found = Some(e),
            Some(Event::Stanza(_)) => return Err(ParseError::NotWellFormed("more than one element".into())),
            Some(Event::Close) => break,
            Some(_) => continue,
            None => return Err(ParseError::NotWellFormed("unfinished element".into())),
        }
    }
    found.ok_or_else(|| ParseError::NotWellFormed("no element".into()))
}

/// The one stanza in `xml`, parsed as on a client stream (for tests elsewhere
/// in the crate that need an [`Element`] from literal XML).
#[cfg(test)]
pub(crate) fn test_stanza(xml: &str) -> Element {
    match parse_element(xml.as_bytes(), Limits { max_stanza_bytes: 1 << 20, max_depth: 32 }) {
        Ok(e) => e,
        Err(e) => panic!("no stanza in {xml}: {e:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xml::Node;
    use std::time::Instant;

    const LIMITS: Limits = Limits {
        max_stanza_bytes: 4096,
        max_depth: 16,
    };
    const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' to='grid.test' version='1.0' xml:lang='en'>";
    const PUBSUB_EVENT: &str = "http://jabber.org/protocol/pubsub#event";
    const IODEF: &str = "urn:ietf:params:xml:ns:iodef-2.0";

    /// Feeds `chunks` one after another, collecting events until the input is
    /// exhausted or an error occurs.
    fn run(limits: Limits, chunks: &[&[u8]]) -> (Vec<Event>, Option<ParseError>) {
        let mut p = Parser::new(limits);
        let mut events = Vec::new();
        for c in chunks {
            p.buffer_mut().extend_from_slice(c);
            loop {
                match p.next_event() {
                    Ok(Some(e)) => events.push(e),
                    Ok(None) => break,
                    Err(e) => return (events, Some(e)),
                }
            }
        }
        (events, None)
    }

    fn events_of(s: &str) -> Vec<Event> {
        let (ev, err) = run(LIMITS, &[s.as_bytes()]);
        assert_eq!(err, None, "unexpected error for {s}");
        ev
    }

    /// The one stanza sent after the standard header.
    fn stanza(s: &str) -> Element {
        let mut ev = events_of(&format!("{HEADER}{s}"));
        match ev.pop() {
            Some(Event::Stanza(e)) if ev.len() == 1 => e,
            other => panic!("expected one stanza, got {other:?}"),
        }
    }

    /// The error condition for a stanza sent after the standard header.
    fn condition_for(body: &[u8]) -> Option<&'static str> {
        let (_, err) = run(LIMITS, &[HEADER.as_bytes(), body]);
        err.map(|e| e.condition())
    }

    fn header_error(header: &str) -> Option<&'static str> {
        run(LIMITS, &[header.as_bytes()]).1.map(|e| e.condition())
    }

    fn transcript() -> String {
        format!(
            "{HEADER}\n  <message to='a@grid.test' id='m1'><body>caf\u{e9} \u{263a} &amp; &lt;&#x263A;&#65;\
             <![CDATA[<raw> & ]] stuff]]></body></message> \n\
             <iq type='set' id='p1'><pubsub xmlns='http://jabber.org/protocol/pubsub'>\
             <publish node='incidents'><item id=\"x'1\"><iodef:IODEF-Document xmlns:iodef='{IODEF}' \
             version='2.0'><iodef:Incident purpose='reporting'><iodef:Description>\u{4e2d}\u{6587} \
             &quot;quoted&quot;</iodef:Description></iodef:Incident></iodef:IODEF-Document></item>\
             </publish></pubsub></iq><presence/><stream:error><conflict \
             xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error></stream:stream>"
        )
    }

    #[test]
    fn header_fields_are_reported() {
        match events_of(HEADER).as_slice() {
            [Event::Open(h)] => {
                assert_eq!(h.to.as_deref(), Some("grid.test"));
                assert_eq!(h.version.as_deref(), Some("1.0"));
                assert_eq!(h.lang.as_deref(), Some("en"));
                assert_eq!(h.from, None);
                assert_eq!(h.id, None);
                assert_eq!(h.default_ns, NS_CLIENT);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn transcript_gives_header_stanzas_and_close() {
        let ev = events_of(&transcript());
        assert_eq!(ev.len(), 6);
        assert!(matches!(ev[0], Event::Open(_)));
        assert_eq!(ev[5], Event::Close);
        let Event::Stanza(msg) = &ev[1] else {
            panic!("{:?}", ev[1])
        };
        assert!(msg.is("message", NS_CLIENT));
        let body = msg.child("body", NS_CLIENT).map(Element::text);
        assert_eq!(
            body.as_deref(),
            Some("caf\u{e9} \u{263a} & <\u{263a}A<raw> & ]] stuff")
        );
        let Event::Stanza(err) = &ev[4] else {
            panic!("{:?}", ev[4])
        };
        assert!(err.is("error", NS_STREAMS));
        assert_eq!(err.prefix.as_deref(), Some("stream"));
        assert_eq!(
            err.attr("xmlns:stream"),
            Some(NS_STREAMS),
            "declaration copied down"
        );
        assert!(
            err.child("conflict", "urn:ietf:params:xml:ns:xmpp-streams")
                .is_some()
        );
    }

    #[test]
    fn input_split_at_every_byte_boundary_gives_identical_events() {
        let t = transcript();
        let whole = events_of(&t);
        let b = t.as_bytes();
        for k in 0..=b.len() {
            let (ev, err) = run(LIMITS, &[&b[..k], &b[k..]]);
            assert_eq!(err, None, "split at {k}");
            assert_eq!(ev, whole, "split at {k}");
        }
        let bytes: Vec<&[u8]> = b.chunks(1).collect();
        assert_eq!(run(LIMITS, &bytes), (whole, None), "one byte at a time");
    }

    #[test]
    fn parse_serialize_parse_round_trips() {
        for ev in events_of(&transcript()) {
            let Event::Stanza(e) = ev else { continue };
            let wire = String::from_utf8(e.to_bytes(NS_CLIENT)).unwrap_or_default();
            assert_eq!(stanza(&wire), e, "{wire}");
            let standalone = String::from_utf8(e.to_bytes("")).unwrap_or_default();
            assert!(standalone.contains("xmlns='jabber:client'") || e.prefix.is_some());
        }
    }

    #[test]
    fn foreign_payload_with_ancestor_prefixes_serializes_standalone() {
        let iq = stanza(&format!(
            "<message xmlns:iodef='{IODEF}' xmlns:ev='{PUBSUB_EVENT}'><ev:event><ev:items node='n'>\
             <ev:item id='1'><iodef:IODEF-Document iodef:lang='en'><iodef:Incident/>\
             </iodef:IODEF-Document></ev:item></ev:items></ev:event></message>"
        ));
        let item = iq
            .child("event", PUBSUB_EVENT)
            .and_then(|e| e.child("items", PUBSUB_EVENT))
            .and_then(|e| e.child("item", PUBSUB_EVENT));
        let Some(doc) = item.and_then(|i| i.child("IODEF-Document", IODEF)) else {
            panic!("payload not found: {iq:?}")
        };
        let wire = String::from_utf8(doc.to_bytes("")).unwrap_or_default();
        assert_eq!(
            wire,
            format!(
                "<iodef:IODEF-Document iodef:lang='en' xmlns:iodef='{IODEF}'><iodef:Incident/></iodef:IODEF-Document>"
            )
        );
        // Standalone bytes reparse (inside a stream) to the same element.
        assert_eq!(&stanza(&wire), doc);
        // Inside the full stanza the copies are redundant and dropped.
        let full = String::from_utf8(iq.to_bytes(NS_CLIENT)).unwrap_or_default();
        assert_eq!(full.matches("xmlns:iodef").count(), 1, "{full}");
    }

    #[test]
    fn default_namespace_changes_and_undeclaring_are_resolved() {
        let e = stanza("<iq><query xmlns='jabber:iq:roster'><item/></query><x xmlns=''/></iq>");
        let q = e.child("query", "jabber:iq:roster");
        assert!(
            q.and_then(|q| q.child("item", "jabber:iq:roster"))
                .is_some()
        );
        assert!(e.child("x", "").is_some());
        assert_eq!(
            String::from_utf8(e.to_bytes(NS_CLIENT)).unwrap_or_default(),
            "<iq><query xmlns='jabber:iq:roster'><item/></query><x xmlns=''/></iq>"
        );
    }

    #[test]
    fn escapes_and_entities_round_trip() {
        let e = stanza(
            "<message a='&lt;&amp;&gt;&quot;&apos;&#x263A;&#9;'>]] &gt; \"x\" &#13;</message>",
        );
        assert_eq!(e.attr("a"), Some("<&>\"'\u{263a}\t"));
        assert_eq!(e.text(), "]] > \"x\" \r");
        let wire = String::from_utf8(e.to_bytes(NS_CLIENT)).unwrap_or_default();
        assert_eq!(stanza(&wire), e, "{wire}");
    }

    #[test]
    fn whitespace_keepalives_are_ignored_and_consumed() {
        let mut p = Parser::new(LIMITS);
        p.buffer_mut().extend_from_slice(HEADER.as_bytes());
        assert!(matches!(p.next_event(), Ok(Some(Event::Open(_)))));
        for _ in 0..3 {
            p.buffer_mut().extend_from_slice(b" \n\t\r\n ");
            assert_eq!(p.next_event(), Ok(None));
            assert_eq!(p.buffered_len(), 0);
        }
        p.buffer_mut().extend_from_slice(b"  <presence/>  ");
        assert!(matches!(p.next_event(), Ok(Some(Event::Stanza(_)))));
        assert_eq!(p.next_event(), Ok(None));
        assert_eq!(p.buffered_len(), 0);
    }

    #[test]
    fn restart_expects_a_new_header_and_keeps_buffered_bytes() {
        let mut p = Parser::new(LIMITS);
        let input =
            format!("{HEADER}<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>{HEADER}<iq/>");
        p.buffer_mut().extend_from_slice(input.as_bytes());
        assert!(matches!(p.next_event(), Ok(Some(Event::Open(_)))));
        assert!(matches!(p.next_event(), Ok(Some(Event::Stanza(_)))));
        assert_eq!(p.buffered_len(), HEADER.len() + "<iq/>".len());
        p.restart();
        assert!(
            matches!(p.next_event(), Ok(Some(Event::Open(_)))),
            "declaration allowed again"
        );
        assert!(matches!(p.next_event(), Ok(Some(Event::Stanza(e))) if e.is("iq", NS_CLIENT)));
        // Without a restart, a second header is just an unclosed stanza, and a
        // declaration mid-stream is a processing instruction.
        assert_eq!(condition_for(HEADER.as_bytes()), Some("restricted-xml"));
    }

    #[test]
    fn stanza_after_proceed_shows_as_buffered() {
        let mut p = Parser::new(LIMITS);
        let input =
            format!("{HEADER}<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><message/>");
        p.buffer_mut().extend_from_slice(input.as_bytes());
        assert!(matches!(p.next_event(), Ok(Some(Event::Open(_)))));
        assert!(matches!(p.next_event(), Ok(Some(Event::Stanza(_)))));
        assert_eq!(p.buffered_len(), "<message/>".len());
    }

    #[test]
    fn close_ends_the_stream_and_later_bytes_are_dropped() {
        let (ev, err) = run(LIMITS, &[HEADER.as_bytes(), b"</stream:stream><garbage"]);
        assert_eq!(err, None);
        assert_eq!(ev.last(), Some(&Event::Close));
        assert_eq!(condition_for(b"</stream:other>"), Some("not-well-formed"));
    }

    #[test]
    fn shrink_idle_releases_the_buffer() {
        let mut p = Parser::new(LIMITS);
        p.buffer_mut().extend_from_slice(HEADER.as_bytes());
        p.buffer_mut().extend_from_slice(&[b' '; 3000]);
        assert!(matches!(p.next_event(), Ok(Some(Event::Open(_)))));
        assert_eq!(p.next_event(), Ok(None));
        assert!(p.buffer_mut().capacity() >= 3000);
        p.shrink_idle();
        assert_eq!(p.buffer_mut().capacity(), 0);
        // With a partial stanza pending, only the pending bytes are kept.
        p.buffer_mut().extend_from_slice(b"<message><body>");
        p.buffer_mut().reserve(10_000);
        assert_eq!(p.next_event(), Ok(None));
        p.shrink_idle();
        assert!(p.buffer_mut().capacity() < 100);
        p.buffer_mut().extend_from_slice(b"hi</body></message>");
        assert!(
            matches!(p.next_event(), Ok(Some(Event::Stanza(e))) if e.child("body", NS_CLIENT).is_some())
        );
    }

    #[test]
    fn resting_parser_is_small() {
        let mut p = Parser::new(LIMITS);
        p.buffer_mut().extend_from_slice(HEADER.as_bytes());
        assert!(matches!(p.next_event(), Ok(Some(Event::Open(_)))));
        p.shrink_idle();
        let heap = p.scope.as_ref().map_or(0, |s| {
            s.qname.capacity()
                + s.default_ns.capacity()
                + s.prefixes
                    .iter()
                    .map(|(a, b)| a.capacity() + b.capacity() + 48)
                    .sum::<usize>()
        });
        assert!(
            std::mem::size_of::<Parser>() + heap < 512,
            "{}",
            std::mem::size_of::<Parser>() + heap
        );
    }

    #[test]
    fn size_limit_admits_exactly_the_limit_and_refuses_one_more() {
        let limits = Limits {
            max_stanza_bytes: 100,
            max_depth: 16,
        };
        let header = format!("<stream:stream xmlns='jabber:client' xmlns:stream='{NS_STREAMS}'>");
        assert!(header.len() < 100);
        let body = |n: usize| format!("<message><body>{}</body></message>", "x".repeat(n));
        let fixed = body(0).len();
        let ok = body(100 - fixed);
        assert_eq!(ok.len(), 100);
        assert_eq!(run(limits, &[header.as_bytes(), ok.as_bytes()]).1, None);
        let over = body(101 - fixed);
        let err = run(limits, &[header.as_bytes(), over.as_bytes()]).1;
        assert_eq!(err, Some(ParseError::StanzaTooLarge { limit: 100 }));
        assert_eq!(err.map(|e| e.condition()), Some("policy-violation"));
        // The header counts too.
        let big_header = format!(
            "<stream:stream xmlns='jabber:client' xmlns:stream='{NS_STREAMS}' id='{}'>",
            "i".repeat(100)
        );
        assert_eq!(
            run(limits, &[big_header.as_bytes()]).1,
            Some(ParseError::StanzaTooLarge { limit: 100 })
        );
    }

    #[test]
    fn unterminated_huge_text_is_refused_near_the_limit() {
        let limits = Limits {
            max_stanza_bytes: 65536,
            max_depth: 16,
        };
        let mut p = Parser::new(limits);
        p.buffer_mut().extend_from_slice(HEADER.as_bytes());
        assert!(matches!(p.next_event(), Ok(Some(Event::Open(_)))));
        p.buffer_mut().extend_from_slice(b"<message><body>");
        let chunk = [b'a'; 8192];
        let mut fed = 0;
        let err = loop {
            assert!(fed < 10_000_000, "never refused");
            p.buffer_mut().extend_from_slice(&chunk);
            fed += chunk.len();
            if let Err(e) = p.next_event() {
                break e;
            }
        };
        assert_eq!(err.condition(), "policy-violation");
        assert!(fed <= 65536 + chunk.len(), "refused after {fed} bytes");
        assert!(p.buffered_len() <= 65536 + 2 * chunk.len());
    }

    #[test]
    fn depth_limit_admits_exactly_the_limit_and_refuses_one_more() {
        let nest = |n: usize| format!("{}{}", "<a>".repeat(n), "</a>".repeat(n));
        let limits = Limits {
            max_stanza_bytes: 4096,
            max_depth: 5,
        };
        assert_eq!(
            run(limits, &[HEADER.as_bytes(), nest(5).as_bytes()]).1,
            None
        );
        assert_eq!(
            run(
                limits,
                &[HEADER.as_bytes(), b"<a><a><a><a><a/></a></a></a></a>"]
            )
            .1,
            None
        );
        let err = run(limits, &[HEADER.as_bytes(), nest(6).as_bytes()]).1;
        assert_eq!(err, Some(ParseError::TooDeep { limit: 5 }));
        let err = run(limits, &[HEADER.as_bytes(), b"<a><a><a><a><a><b/>"]).1;
        assert_eq!(
            err.map(|e| e.condition()),
            Some("policy-violation"),
            "refused before the end"
        );
    }

    #[test]
    fn large_stanza_fed_one_byte_at_a_time_is_linear() {
        let limits = Limits {
            max_stanza_bytes: 1 << 20,
            max_depth: 16,
        };
        let mut big = String::from("<message><body>");
        while big.len() < 200_000 {
            big.push_str("<b x='1'>text &amp; more <![CDATA[<c>]]></b>");
        }
        big.push_str("</body></message>");
        let mut p = Parser::new(limits);
        p.buffer_mut().extend_from_slice(HEADER.as_bytes());
        assert!(matches!(p.next_event(), Ok(Some(Event::Open(_)))));
        let t = Instant::now();
        let mut got = None;
        for b in big.as_bytes() {
            p.buffer_mut().push(*b);
            if let Some(ev) = p.next_event().ok().flatten() {
                got = Some(ev);
            }
        }
        let elapsed = t.elapsed();
        assert!(matches!(got, Some(Event::Stanza(_))));
        assert!(elapsed.as_millis() < 1000, "took {elapsed:?}");
    }

    #[test]
    fn error_is_sticky() {
        let mut p = Parser::new(LIMITS);
        p.buffer_mut()
            .extend_from_slice(format!("{HEADER}<!-- x -->").as_bytes());
        assert!(matches!(p.next_event(), Ok(Some(Event::Open(_)))));
        let e = p.next_event();
        assert!(e.is_err());
        p.buffer_mut().extend_from_slice(b"<presence/>");
        assert_eq!(p.next_event(), e);
    }

    #[test]
    fn restricted_xml_constructs_are_refused() {
        assert_eq!(condition_for(b"<!-- hi -->"), Some("restricted-xml"));
        assert_eq!(
            condition_for(b"<message><!-- hi --></message>"),
            Some("restricted-xml")
        );
        assert_eq!(
            condition_for(b"<message><?php x ?></message>"),
            Some("restricted-xml")
        );
        assert_eq!(
            condition_for(b"<?xml version='1.0'?>"),
            Some("restricted-xml")
        );
        assert_eq!(
            condition_for(b"<message>&foo;</message>"),
            Some("restricted-xml")
        );
        assert_eq!(
            condition_for(b"<message a='&foo;'/>"),
            Some("restricted-xml")
        );
        assert_eq!(
            header_error("<!DOCTYPE x [<!ENTITY a 'b'>]><stream:stream>"),
            Some("restricted-xml")
        );
        assert_eq!(
            header_error("<?xml-stylesheet href='a'?><stream:stream>"),
            Some("restricted-xml")
        );
        assert_eq!(
            condition_for(b"<message><!DOCTYPE x></message>"),
            Some("restricted-xml")
        );
    }

    #[test]
    fn billion_laughs_is_refused_at_the_doctype() {
        let doc =
            "<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'><!ENTITY lol2 '&lol;&lol;'>]>";
        assert_eq!(header_error(doc), Some("restricted-xml"));
    }

    #[test]
    fn malformed_xml_is_not_well_formed() {
        let cases: &[&[u8]] = &[
            b"<1message/>",
            b"<message 1a='x'/>",
            b"<a:b:c/>",
            b"<message>&#x1;</message>",
            b"<message a='&#1;'/>",
            b"<message>&#xFFFE;</message>",
            b"<message>\x01</message>",
            b"<message a='\x02'/>",
            b"<message>\xEF\xBF\xBF</message>",
            b"<message a='<'/>",
            b"<message></presence>",
            b"<message><body></message></body>",
            b"<foo:message/>",
            b"<message foo:a='1'/>",
            b"<message xmlns:p=''/>",
            b"<message>]]></message>",
            b"<message a='1' a='2'/>",
            b"<message a=1/>",
            b"< message/>",
            b"<message>&amp</message>",
            b"</message>",
            b"<message xmlns:xml='urn:x'/>",
            b"<message xmlns:xmlns='urn:x'/>",
            b"<xmlns:a xmlns:xmlns='urn:x'/>",
            b"<xmlns:a/>",
            b"<message xmlns='http://www.w3.org/XML/1998/namespace'/>",
        ];
        for c in cases {
            assert_eq!(
                condition_for(c),
                Some("not-well-formed"),
                "{}",
                String::from_utf8_lossy(c)
            );
        }
    }

    #[test]
    fn invalid_utf8_is_unsupported_encoding() {
        assert_eq!(
            condition_for(b"<message>\xC3\x28</message>"),
            Some("unsupported-encoding")
        );
        assert_eq!(
            condition_for(b"<message>\xED\xA0\x80</message>"),
            Some("unsupported-encoding")
        );
        assert_eq!(
            header_error("<?xml version='1.0' encoding='ISO-8859-1'?><stream:stream>"),
            Some("unsupported-encoding")
        );
        let ok = format!("<?xml version='1.0' encoding='utf-8'?>{}", &HEADER[21..]);
        assert_eq!(header_error(&ok), None);
    }

    #[test]
    fn wrong_stream_namespaces_are_invalid_namespace() {
        let server = HEADER.replace("jabber:client", "jabber:server");
        assert_eq!(header_error(&server), Some("invalid-namespace"));
        let streams = HEADER.replace("http://etherx.jabber.org/streams", "urn:wrong");
        assert_eq!(header_error(&streams), Some("invalid-namespace"));
        assert_eq!(
            header_error("<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>"),
            Some("invalid-namespace"),
            "no content namespace"
        );
        assert_eq!(
            header_error("<stream xmlns='jabber:client'>"),
            Some("invalid-namespace")
        );
        assert_eq!(
            header_error("<stream:stream xmlns='jabber:client'>"),
            Some("not-well-formed"),
            "unbound prefix"
        );
    }

    #[test]
    fn character_data_at_stream_level_is_bad_format() {
        assert_eq!(condition_for(b"hello"), Some("bad-format"));
        assert_eq!(condition_for(b"<![CDATA[x]]>"), Some("bad-format"));
        assert_eq!(
            header_error("hello<stream:stream>"),
            Some("not-well-formed")
        );
        assert_eq!(
            header_error(&format!(" {HEADER}")),
            Some("restricted-xml"),
            "declaration not first"
        );
        assert_eq!(
            header_error(&format!(" \n{}", &HEADER[21..])),
            None,
            "whitespace before header"
        );
        assert_eq!(
            header_error(
                "<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:client'/>"
            ),
            Some("bad-format")
        );
    }

    #[test]
    fn text_and_attributes_keep_their_xml_lang_and_unicode() {
        let e = stanza("<message xml:lang='fr'><body>\u{1F600} \u{e9}</body></message>");
        assert_eq!(e.attr("xml:lang"), Some("fr"));
        assert_eq!(
            e.child("body", NS_CLIENT).map(Element::text).as_deref(),
            Some("\u{1F600} \u{e9}")
        );
        assert!(
            !e.attrs.iter().any(|(k, _)| k.starts_with("xmlns")),
            "{:?}",
            e.attrs
        );
        assert!(matches!(e.children.first(), Some(Node::Element(_))));
    }

    /// A ~2 KiB IODEF report published through XEP-0060, as platforms send it.
    fn iodef_publish(i: usize) -> String {
        format!(
            "<iq type='set' id='pub{i}' to='pubsub.grid.test'><pubsub xmlns='http://jabber.org/protocol/pubsub'>\
             <publish node='incidents'><item id='item{i}'><IODEF-Document version='2.00' xml:lang='en' \
             xmlns='{IODEF}'><Incident purpose='reporting' restriction='default'>\
             <IncidentID name='csirt.example.com'>189493</IncidentID><ReportTime>2024-02-05T13:44:16Z</ReportTime>\
             <GenerationTime>2024-02-05T13:44:16Z</GenerationTime><Description>Host illicitly accessed &amp; \
             scanned the internal network; see the attached logs &lt;redacted&gt;.</Description>\
             <Assessment><SystemImpact severity='high' completion='succeeded' type='takeover-system'/></Assessment>\
             <Method><Reference><URL>http://www.example.com/exploit/12345</URL><Description>Exploit for \
             CVE-2024-0001</Description></Reference></Method><Contact role='creator' type='organization'>\
             <ContactName>example.com CSIRT</ContactName><Email><EmailTo>contact@csirt.example.com</EmailTo>\
             </Email></Contact><EventData><Flow><System category='source'><Node><Address category='ipv4-addr'>\
             192.0.2.200</Address><Counter uom='event'>57</Counter></Node></System><System category='target' \
             interface='eth1'><Node><Address category='ipv4-net'>192.0.2.16/28</Address></Node><Service \
             ip-protocol='6'><Port>80</Port></Service></System></Flow><Expectation action='block-host'/>\
             <Record><RecordData><DateTime>2024-02-05T13:40:00Z</DateTime><Description>Web-server logs\
             </Description><RecordItem dtype='string'><![CDATA[192.0.2.1 - - [05/Feb/2024:13:39:56] \
             \"GET /phpmyadmin HTTP/1.1\" 404 1234]]></RecordItem><RecordItem dtype='string'>192.0.2.1 - - \
             [05/Feb/2024:13:39:58] &quot;GET /admin HTTP/1.1&quot; 200 5678</RecordItem></RecordData>\
             </Record></EventData><History><HistoryItem action='nothing'><DateTime>2024-02-05T13:44:16Z\
             </DateTime><Description>Notification sent to network owner; awaiting reply from \
             the hosting provider for the affected system.</Description></HistoryItem></History>\
             </Incident></IODEF-Document></item></publish></pubsub></iq>"
        )
    }

    /// Throughput, for the benchmark notes:
    /// `cargo test --release -- --ignored --nocapture parser_throughput`.
    #[test]
    #[ignore]
    fn parser_throughput_on_iodef_in_pubsub() {
        let stanza = iodef_publish(1);
        assert!((1900..2600).contains(&stanza.len()), "{}", stanza.len());
        let n = 20_000;
        let mut input = HEADER.as_bytes().to_vec();
        for _ in 0..n {
            input.extend_from_slice(stanza.as_bytes());
        }
        let limits = Limits {
            max_stanza_bytes: 65536,
            max_depth: 64,
        };
        for chunk_size in [16384, 1500] {
            let mut p = Parser::new(limits);
            let t = Instant::now();
            let mut count = 0;
            for chunk in input.chunks(chunk_size) {
                p.buffer_mut().extend_from_slice(chunk);
                while let Ok(Some(ev)) = p.next_event() {
                    count += usize::from(matches!(ev, Event::Stanza(_)));
                }
            }
            let secs = t.elapsed().as_secs_f64();
            assert_eq!(count, n);
            println!(
                "parser: {n} stanzas of {} B in {chunk_size} B reads: {:.1} MB/s, {:.0} stanzas/s",
                stanza.len(),
                input.len() as f64 / secs / 1e6,
                n as f64 / secs
            );
        }
        let Some(Event::Stanza(el)) = run(limits, &[HEADER.as_bytes(), stanza.as_bytes()]).0.pop()
        else {
            panic!("no stanza")
        };
        let t = Instant::now();
        let mut out = Vec::with_capacity(4096);
        for _ in 0..n {
            out.clear();
            el.write_to(&mut out, NS_CLIENT);
        }
        let secs = t.elapsed().as_secs_f64();
        println!("writer: {:.1} MB/s", (out.len() * n) as f64 / secs / 1e6);
    }
}
