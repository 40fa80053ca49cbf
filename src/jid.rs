//! Jabber identifiers (RFC 7622): parsing, validation and normalisation.
//!
//! A platform is named by its bare JID (`name@domain`); each session adds a
//! resource. Comparison always happens on the normalised form, so `Sensor1@Grid.Example`
//! and `sensor1@grid.example` are one platform. The PRECIS profiles are applied in a
//! practical subset: NFC, case folding of localpart and domain, and rejection of the
//! characters RFC 7622 §3.3.1 forbids (never mapping them to something else).
//! This module does no I/O and knows nothing about accounts.

use std::fmt;
use unicode_normalization::UnicodeNormalization;

/// Maximum length of each JID part in bytes (RFC 7622 §3.2, §3.3, §3.4).
const MAX_PART: usize = 1023;

/// Why a string is not a valid JID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JidError {
    #[error("empty domainpart")]
    EmptyDomain,
    #[error("empty localpart")]
    EmptyLocal,
    #[error("empty resourcepart")]
    EmptyResource,
    #[error("JID part longer than 1023 bytes")]
    TooLong,
    #[error("character {0:?} is not allowed in this JID part")]
    BadChar(char),
}

/// A bare JID (`local@domain` or just `domain`), normalised. Stored as its string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BareJid {
    local: Option<String>,
    domain: String,
}

/// A full JID: a bare JID plus a resource (one session of a platform).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FullJid {
    bare: BareJid,
    resource: String,
}

/// Either kind, as found in a stanza's `to` or `from`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Jid {
    Bare(BareJid),
    Full(FullJid),
}

/// Normalises a localpart (RFC 7622 §3.3, UsernameCaseMapped, simplified).
pub fn normalize_local(s: &str) -> Result<String, JidError> {
    if s.is_empty() {
        return Err(JidError::EmptyLocal);
    }
    let out: String = s.nfkc().flat_map(char::to_lowercase).collect::<String>().nfc().collect();
    if out.len() > MAX_PART {
        return Err(JidError::TooLong);
    }
    // RFC 7622 §3.3.1: these are never allowed in a localpart; spaces and
    // controls are disallowed by the IdentifierClass.
    if let Some(c) = out
        .chars()
        .find(|c| matches!(c, '"' | '&' | '\'' | '/' | ':' | '<' | '>' | '@') || c.is_whitespace() || c.is_control())
    {
        return Err(JidError::BadChar(c));
    }
    Ok(out)
}

/// Normalises a domainpart (RFC 7622 §3.2): lower case, NFC, no trailing dot.
pub fn normalize_domain(s: &str) -> Result<String, JidError> {
    let s = s.strip_suffix('.').unwrap_or(s);
    if s.is_empty() {
        return Err(JidError::EmptyDomain);
    }
    let out: String = s.chars().flat_map(char::to_lowercase).collect::<String>().nfc().collect();
    if out.len() > MAX_PART {
        return Err(JidError::TooLong);
    }
    if let Some(c) = out.chars().find(|c| {
        c.is_whitespace() || c.is_control() || matches!(c, '@' | '/' | '"' | '&' | '\'' | '<' | '>' | ':' | '\\')
    }) {
        // ':' would be an IPv6 literal; we do not serve those (platforms use names).
        return Err(JidError::BadChar(c));
    }
    if out.split('.').any(str::is_empty) {
        return Err(JidError::BadChar('.'));
    }
    Ok(out)
}

/// Normalises a resourcepart (RFC 7622 §3.4, OpaqueString, simplified).
pub fn normalize_resource(s: &str) -> Result<String, JidError> {
    if s.is_empty() {
        return Err(JidError::EmptyResource);
    }
    let out: String = s
        .chars()
        .map(|c| if c.is_whitespace() { ' ' } else { c })
        .collect::<String>()
        .nfc()
        .collect();
    if out.len() > MAX_PART {
        return Err(JidError::TooLong);
    }
    if let Some(c) = out.chars().find(|c| c.is_control()) {
        return Err(JidError::BadChar(c));
    }
    Ok(out)
}

impl BareJid {
    /// A platform's JID `local@domain`, normalising both parts.
    pub fn new(local: &str, domain: &str) -> Result<Self, JidError> {
        Ok(BareJid { local: Some(normalize_local(local)?), domain: normalize_domain(domain)? })
    }
    /// A domain JID (the controller itself, or a service such as the broker).
    pub fn domain(domain: &str) -> Result<Self, JidError> {
        Ok(BareJid { local: None, domain: normalize_domain(domain)? })
    }
    pub fn local(&self) -> Option<&str> {
        self.local.as_deref()
    }
    pub fn domain_part(&self) -> &str {
        &self.domain
    }
    /// This bare JID with a resource.
    pub fn with_resource(&self, resource: &str) -> Result<FullJid, JidError> {
        Ok(FullJid { bare: self.clone(), resource: normalize_resource(resource)? })
    }
    /// Parses and normalises `local@domain` or `domain`; a resource is an error.
    pub fn parse(s: &str) -> Result<Self, JidError> {
        match Jid::parse(s)? {
            Jid::Bare(b) => Ok(b),
            Jid::Full(_) => Err(JidError::BadChar('/')),
        }
    }
}

impl TryFrom<String> for BareJid {
    type Error = JidError;
    fn try_from(s: String) -> Result<Self, JidError> {
        BareJid::parse(&s)
    }
}

impl From<BareJid> for String {
    fn from(j: BareJid) -> String {
        j.to_string()
    }
}

impl FullJid {
    pub fn bare(&self) -> &BareJid {
        &self.bare
    }
    pub fn resource(&self) -> &str {
        &self.resource
    }
}

impl Jid {
    /// Parses and normalises any JID (RFC 7622 §3.1: the first '/' starts the
    /// resource; the localpart ends at the first '@' before it).
    pub fn parse(s: &str) -> Result<Self, JidError> {
        let (head, resource) = match s.split_once('/') {
            Some((h, r)) => (h, Some(r)),
            None => (s, None),
        };
        let bare = match head.split_once('@') {
            Some((l, d)) => BareJid::new(l, d)?,
            None => BareJid::domain(head)?,
        };
        match resource {
            Some(r) => Ok(Jid::Full(bare.with_resource(r)?)),
            None => Ok(Jid::Bare(bare)),
        }
    }
    pub fn bare(&self) -> &BareJid {
        match self {
            Jid::Bare(b) => b,
            Jid::Full(f) => &f.bare,
        }
    }
    pub fn resource(&self) -> Option<&str> {
        match self {
            Jid::Bare(_) => None,
            Jid::Full(f) => Some(&f.resource),
        }
    }
}

impl fmt::Display for BareJid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.local {
            Some(l) => write!(f, "{l}@{}", self.domain),
            None => f.write_str(&self.domain),
        }
    }
}

impl fmt::Display for FullJid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.bare, self.resource)
    }
}

impl fmt::Display for Jid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Jid::Bare(b) => b.fmt(f),
            Jid::Full(j) => j.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn localpart_and_domain_are_case_folded() {
        let j = Jid::parse("Sensor1@Grid.Example/Res").unwrap();
        assert_eq!(j.to_string(), "sensor1@grid.example/Res");
    }

    #[test]
    fn resource_keeps_case_and_may_contain_slash_and_at() {
        let j = Jid::parse("a@b/c/d@e").unwrap();
        assert_eq!(j.resource(), Some("c/d@e"));
        assert_eq!(j.bare().to_string(), "a@b");
    }

    #[test]
    fn domain_only_and_trailing_dot() {
        assert_eq!(Jid::parse("Broker.Localhost.").unwrap().to_string(), "broker.localhost");
    }

    #[test]
    fn forbidden_localpart_characters_are_rejected() {
        for bad in ["a b@x", "a:b@x", "a<b@x", "a'b@x", "a\"b@x", "a&b@x", "a\u{1}b@x"] {
            assert!(Jid::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn empty_parts_are_rejected() {
        assert_eq!(Jid::parse("@x"), Err(JidError::EmptyLocal));
        assert_eq!(Jid::parse("a@"), Err(JidError::EmptyDomain));
        assert_eq!(Jid::parse("a@x/"), Err(JidError::EmptyResource));
        assert!(Jid::parse("a@x..y").is_err());
    }

    #[test]
    fn unicode_is_normalised_to_nfc() {
        // "é" composed and decomposed are one localpart.
        let a = BareJid::new("caf\u{e9}", "x").unwrap();
        let b = BareJid::new("cafe\u{301}", "x").unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn overlong_parts_are_rejected() {
        let long = "a".repeat(1024);
        assert_eq!(BareJid::new(&long, "x"), Err(JidError::TooLong));
        assert!(BareJid::new(&"a".repeat(1023), "x").is_ok());
    }

    #[test]
    fn bare_parse_refuses_a_resource() {
        assert!(BareJid::parse("a@b/c").is_err());
        assert_eq!(BareJid::parse("A@B").unwrap().local(), Some("a"));
    }
}
