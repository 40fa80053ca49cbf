//! RFC 6120 stream errors (§4.9) and stanza errors (§8.3), and their XML.
//!
//! Inside the server errors are typed; this is the one place where they become
//! XML. Internal detail never goes on the wire: callers log it and send a
//! generic condition.

use crate::ns;
use crate::xml::Element;

/// A stream-level error condition (RFC 6120 §4.9.3): the stream is closed after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamCondition {
    BadFormat,
    Conflict,
    ConnectionTimeout,
    HostUnknown,
    InternalServerError,
    InvalidFrom,
    InvalidNamespace,
    InvalidXml,
    NotAuthorized,
    NotWellFormed,
    PolicyViolation,
    ResourceConstraint,
    RestrictedXml,
    SystemShutdown,
    UndefinedCondition,
    UnsupportedEncoding,
    UnsupportedFeature,
    UnsupportedStanzaType,
    UnsupportedVersion,
}

impl StreamCondition {
    pub fn name(self) -> &'static str {
        use StreamCondition::*;
        match self {
            BadFormat => "bad-format",
            Conflict => "conflict",
            ConnectionTimeout => "connection-timeout",
            HostUnknown => "host-unknown",
            InternalServerError => "internal-server-error",
            InvalidFrom => "invalid-from",
            InvalidNamespace => "invalid-namespace",
            InvalidXml => "invalid-xml",
            NotAuthorized => "not-authorized",
            NotWellFormed => "not-well-formed",
            PolicyViolation => "policy-violation",
            ResourceConstraint => "resource-constraint",
            RestrictedXml => "restricted-xml",
            SystemShutdown => "system-shutdown",
            UndefinedCondition => "undefined-condition",
            UnsupportedEncoding => "unsupported-encoding",
            UnsupportedFeature => "unsupported-feature",
            UnsupportedStanzaType => "unsupported-stanza-type",
            UnsupportedVersion => "unsupported-version",
        }
    }

    /// Maps a condition name (as the stream parser reports it) back to a condition.
    pub fn from_name(name: &str) -> StreamCondition {
        use StreamCondition::*;
        [
            BadFormat, Conflict, ConnectionTimeout, HostUnknown, InternalServerError, InvalidFrom,
            InvalidNamespace, InvalidXml, NotAuthorized, NotWellFormed, PolicyViolation,
            ResourceConstraint, RestrictedXml, SystemShutdown, UnsupportedEncoding,
            UnsupportedFeature, UnsupportedStanzaType, UnsupportedVersion,
        ]
        .into_iter()
        .find(|c| c.name() == name)
        .unwrap_or(UndefinedCondition)
    }
}

/// A stream error with an optional human-readable text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamError {
    pub condition: StreamCondition,
    pub text: Option<String>,
}

impl StreamError {
    pub fn new(condition: StreamCondition) -> Self {
        StreamError { condition, text: None }
    }
    pub fn with_text(condition: StreamCondition, text: impl Into<String>) -> Self {
        StreamError { condition, text: Some(text.into()) }
    }
    /// `<stream:error>…</stream:error>`, to be followed by `</stream:stream>`.
    pub fn to_element(&self) -> Element {
        let mut e = Element::new("error", ns::STREAM);
        e.prefix = Some("stream".into());
        e.push(Element::new(self.condition.name(), ns::STREAM_ERRORS));
        if let Some(t) = &self.text {
            e.push(Element::new("text", ns::STREAM_ERRORS).with_text(t));
        }
        e
    }
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.text {
            Some(t) => write!(f, "{} ({t})", self.condition.name()),
            None => f.write_str(self.condition.name()),
        }
    }
}

/// The error type of a stanza error (RFC 6120 §8.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    Auth,
    Cancel,
    Continue,
    Modify,
    Wait,
}

impl ErrorType {
    pub fn name(self) -> &'static str {
        match self {
            ErrorType::Auth => "auth",
            ErrorType::Cancel => "cancel",
            ErrorType::Continue => "continue",
            ErrorType::Modify => "modify",
            ErrorType::Wait => "wait",
        }
    }
}

/// A stanza error: a defined condition (RFC 6120 §8.3.3), its type, an optional
/// text and an optional application-specific condition (e.g. `pubsub#errors`).
#[derive(Debug, Clone, PartialEq)]
pub struct StanzaError {
    pub kind: ErrorType,
    pub condition: &'static str,
    pub text: Option<String>,
    pub app: Option<Element>,
}

impl StanzaError {
    /// A condition with its usual type (RFC 6120 §8.3.3 examples).
    pub fn new(condition: &'static str) -> Self {
        let kind = match condition {
            "bad-request" | "jid-malformed" | "not-acceptable" | "policy-violation" | "redirect"
            | "undefined-condition" => ErrorType::Modify,
            "forbidden" | "not-authorized" | "registration-required" | "subscription-required" => {
                ErrorType::Auth
            }
            "recipient-unavailable" | "remote-server-timeout" | "resource-constraint" | "unexpected-request" => {
                ErrorType::Wait
            }
            _ => ErrorType::Cancel,
        };
        StanzaError { kind, condition, text: None, app: None }
    }
    pub fn text(mut self, t: impl Into<String>) -> Self {
        self.text = Some(t.into());
        self
    }
    pub fn app(mut self, e: Element) -> Self {
        self.app = Some(e);
        self
    }
    pub fn kind(mut self, k: ErrorType) -> Self {
        self.kind = k;
        self
    }

    /// The `<error/>` child.
    pub fn to_element(&self) -> Element {
        let mut e = Element::new("error", ns::CLIENT).with_attr("type", self.kind.name());
        e.push(Element::new(self.condition, ns::STANZA_ERRORS));
        if let Some(t) = &self.text {
            e.push(Element::new("text", ns::STANZA_ERRORS).with_text(t));
        }
        if let Some(a) = &self.app {
            e.push(a.clone());
        }
        e
    }

    /// The error reply to `stanza` (addresses swapped, same id, type error), or
    /// None when `stanza` is itself an error or an IQ result, which must never be
    /// answered (RFC 6120 §8.3.1, §8.2.3).
    pub fn reply_to(&self, stanza: &Element) -> Option<Element> {
        let ty = stanza.attr("type");
        if ty == Some("error") || (stanza.name == "iq" && ty == Some("result")) {
            return None;
        }
        let mut r = Element::new(&stanza.name, ns::CLIENT).with_attr("type", "error");
        if let Some(id) = stanza.attr("id") {
            r.set_attr("id", id);
        }
        if let Some(to) = stanza.attr("to") {
            r.set_attr("from", to);
        }
        if let Some(from) = stanza.attr("from") {
            r.set_attr("to", from);
        }
        r.push(self.to_element());
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_error_serialises_with_condition_and_text() {
        let e = StreamError::with_text(StreamCondition::PolicyViolation, "stanza too large").to_element();
        let s = String::from_utf8(e.to_bytes(ns::CLIENT)).unwrap();
        assert!(s.starts_with("<stream:error"), "{s}");
        assert!(s.contains("<policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"), "{s}");
        assert!(s.contains(">stanza too large</text>"), "{s}");
    }

    #[test]
    fn error_and_result_stanzas_are_never_answered() {
        let err = StanzaError::new("service-unavailable");
        let e = Element::new("iq", ns::CLIENT).with_attr("type", "error");
        assert!(err.reply_to(&e).is_none());
        let r = Element::new("iq", ns::CLIENT).with_attr("type", "result");
        assert!(err.reply_to(&r).is_none());
        let m = Element::new("message", ns::CLIENT).with_attr("type", "error");
        assert!(err.reply_to(&m).is_none());
    }

    #[test]
    fn reply_swaps_addresses_and_keeps_id() {
        let q = Element::new("iq", ns::CLIENT)
            .with_attr("type", "get")
            .with_attr("id", "q1")
            .with_attr("from", "a@x/r")
            .with_attr("to", "x");
        let r = StanzaError::new("service-unavailable").reply_to(&q).unwrap();
        assert_eq!(r.attr("to"), Some("a@x/r"));
        assert_eq!(r.attr("from"), Some("x"));
        assert_eq!(r.attr("id"), Some("q1"));
        let err = r.child("error", ns::CLIENT).unwrap();
        assert_eq!(err.attr("type"), Some("cancel"));
        assert!(err.child("service-unavailable", ns::STANZA_ERRORS).is_some());
    }

    #[test]
    fn stream_condition_names_round_trip() {
        for c in [StreamCondition::NotWellFormed, StreamCondition::RestrictedXml, StreamCondition::PolicyViolation] {
            assert_eq!(StreamCondition::from_name(c.name()), c);
        }
        assert_eq!(StreamCondition::from_name("nonsense"), StreamCondition::UndefinedCondition);
    }
}
