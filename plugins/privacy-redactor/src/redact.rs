//! Removal of contact personal data from IODEF 2.0 documents (RFC 8600 §9:
//! the controller must not hand personal data to platforms not entitled to
//! it). Every `Email`, `Telephone` and `PostalAddress` element of the IODEF
//! namespace inside a `Contact` (at any depth, so nested Contacts too) is cut
//! out together with the whitespace-only text just before it. Everything else
//! is copied byte for byte, so prefixes, namespace declarations and
//! formatting survive. No I/O and no WIT types here, so it tests natively.

use std::fmt;
use std::ops::Range;

use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use quick_xml::reader::NsReader;

/// The grant that lets a subscriber see contact personal data.
pub const GRANT: &str = "read-personal-data";

const IODEF_NS: &str = "urn:ietf:params:xml:ns:iodef-2.0";

/// Contact children that carry personal data (RFC 7970 §3.9).
const PERSONAL: &[&str] = &["Email", "Telephone", "PostalAddress"];

/// Why a payload could not be redacted. The host then withholds the item, so
/// a payload the redactor cannot read never leaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedactError {
    /// The payload is not UTF-8.
    NotUtf8,
    /// The payload is not well-formed XML (byte offset, parser message).
    Malformed(u64, String),
}

impl fmt::Display for RedactError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotUtf8 => f.write_str("payload is not UTF-8"),
            Self::Malformed(at, why) => write!(f, "malformed XML at byte {at}: {why}"),
        }
    }
}

impl std::error::Error for RedactError {}

/// The redacted payload, or `None` when there was nothing to remove.
pub fn redact(payload: &[u8]) -> Result<Option<Vec<u8>>, RedactError> {
    let text = std::str::from_utf8(payload).map_err(|_| RedactError::NotUtf8)?;
    let cuts = personal_spans(text)?;
    if cuts.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(payload.len());
    let mut from = 0;
    for cut in cuts {
        out.extend_from_slice(&payload[from..cut.start]);
        from = cut.end;
    }
    out.extend_from_slice(&payload[from..]);
    Ok(Some(out))
}

/// Byte ranges to cut, in document order and disjoint.
fn personal_spans(text: &str) -> Result<Vec<Range<usize>>, RedactError> {
    let mut reader = NsReader::from_str(text);
    let mut cuts = Vec::new();
    // One entry per open element: whether it is an IODEF `Contact`.
    let mut open: Vec<bool> = Vec::new();
    let mut contacts = 0usize;
    // Start of the whitespace-only text just read, if the last event was one.
    let mut blank_from: Option<usize> = None;
    // While inside a subtree being cut: its depth and where the cut starts.
    let mut cutting: Option<(usize, usize)> = None;
    loop {
        let start = offset(reader.buffer_position());
        let event = reader
            .read_event()
            .map_err(|e| RedactError::Malformed(reader.error_position(), e.to_string()))?;
        let end = offset(reader.buffer_position());
        let before = blank_from.take().unwrap_or(start);
        match event {
            Event::Start(e) => {
                if cutting.is_none() {
                    let (ns, local) = reader.resolver().resolve_element(e.name());
                    let iodef = matches!(ns, ResolveResult::Bound(n) if n.into_inner() == IODEF_NS);
                    let local = local.into_inner();
                    if iodef && contacts > 0 && PERSONAL.contains(&local) {
                        cutting = Some((open.len(), before));
                    } else if iodef && local == "Contact" {
                        contacts += 1;
                        open.push(true);
                        continue;
                    }
                }
                open.push(false);
            }
            Event::Empty(e) if cutting.is_none() && contacts > 0 => {
                let (ns, local) = reader.resolver().resolve_element(e.name());
                let iodef = matches!(ns, ResolveResult::Bound(n) if n.into_inner() == IODEF_NS);
                if iodef && PERSONAL.contains(&local.into_inner()) {
                    cuts.push(before..end);
                }
            }
            Event::End(_) => {
                if open.pop() == Some(true) {
                    contacts = contacts.saturating_sub(1);
                }
                if let Some((depth, from)) = cutting
                    && open.len() == depth
                {
                    cuts.push(from..end);
                    cutting = None;
                }
            }
            Event::Text(t)
                if cutting.is_none()
                    && t.xml10_content().chars().all(|c| matches!(c, ' ' | '\t' | '\r' | '\n')) =>
            {
                blank_from = Some(start);
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if open.is_empty() {
        Ok(cuts)
    } else {
        Err(RedactError::Malformed(offset_u64(text.len()), "unexpected end of input".into()))
    }
}

/// Reader positions are in-memory offsets of a `&str`, so they fit `usize`.
fn offset(position: u64) -> usize {
    usize::try_from(position).unwrap_or(usize::MAX)
}

fn offset_u64(position: usize) -> u64 {
    u64::try_from(position).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "urn:ietf:params:xml:ns:iodef-2.0";

    fn redacted(doc: &str) -> String {
        let out = redact(doc.as_bytes()).expect("well-formed").expect("something removed");
        String::from_utf8(out).expect("UTF-8 out")
    }

    #[test]
    fn personal_children_of_a_contact_are_cut_with_their_indentation() {
        let doc = format!(
            "<Contact xmlns=\"{NS}\" role=\"creator\" type=\"person\">\n  <ContactName>A</ContactName>\n  <Email><EmailTo>a@b.example</EmailTo></Email>\n  <Telephone><TelephoneNumber>+1</TelephoneNumber></Telephone>\n</Contact>"
        );
        let want = format!("<Contact xmlns=\"{NS}\" role=\"creator\" type=\"person\">\n  <ContactName>A</ContactName>\n</Contact>");
        assert_eq!(redacted(&doc), want);
    }

    #[test]
    fn prefixed_and_nested_contacts_are_redacted_too() {
        let doc = format!(
            "<i:Contact xmlns:i=\"{NS}\" role=\"irt\" type=\"organization\"><i:PostalAddress><i:PAddress>x</i:PAddress></i:PostalAddress><i:Contact role=\"tech\" type=\"person\"><i:Email/></i:Contact></i:Contact>"
        );
        let want = format!("<i:Contact xmlns:i=\"{NS}\" role=\"irt\" type=\"organization\"><i:Contact role=\"tech\" type=\"person\"></i:Contact></i:Contact>");
        assert_eq!(redacted(&doc), want);
    }

    #[test]
    fn postal_address_outside_a_contact_and_foreign_email_are_kept() {
        let doc = format!(
            "<Node xmlns=\"{NS}\"><PostalAddress><PAddress>DC 1</PAddress></PostalAddress></Node>"
        );
        assert_eq!(redact(doc.as_bytes()), Ok(None));
        let foreign = format!("<Contact xmlns=\"{NS}\" role=\"cc\" type=\"person\"><x:Email xmlns:x=\"urn:x\"/></Contact>");
        assert_eq!(redact(foreign.as_bytes()), Ok(None));
    }

    #[test]
    fn malformed_or_non_utf8_payloads_are_errors_not_passed_through() {
        assert!(matches!(redact(b"<Contact><Email></Contact>"), Err(RedactError::Malformed(..))));
        assert!(matches!(redact(b"<a>"), Err(RedactError::Malformed(..))));
        assert_eq!(redact(&[0x3c, 0xff, 0x3e]), Err(RedactError::NotUtf8));
    }
}
