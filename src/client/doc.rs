//! Standalone XML documents (payload files such as an IODEF report) into an [`Element`].
//!
//! Role: accept what XML files usually contain but an XMPP stream may not (an XML
//! declaration, a byte-order mark, comments, processing instructions: RFC 6120 §11.1),
//! drop those, and parse the rest with the stream parser so that a payload is checked
//! exactly as the server will check it.
//!
//! Must not: accept a DTD (entity expansion has no place in a payload), or a document
//! whose root element is in no namespace (XEP-0060 §7.1.1 payloads are namespaced).

use crate::ns;
use crate::stream::parser::{Event, Limits, Parser};
use crate::xml::{Element, Node};
use quick_xml::events::Event as XmlEvent;

/// Deepest nesting accepted in a payload file.
const MAX_DEPTH: usize = 1024;

/// Why a document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocError {
    #[error("not well-formed XML: {0}")]
    Xml(String),
    #[error("DTDs are not allowed in a payload")]
    Dtd,
    #[error("no root element")]
    Empty,
    #[error("more than one root element")]
    TrailingContent,
    #[error("the root element <{0}> has no namespace; a payload needs one (xmlns='…')")]
    NoNamespace(String),
}

/// Parses a document with one root element.
pub fn parse_document(text: &str) -> Result<Element, DocError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let body = strip_non_content(text)?;
    let mut parser = Parser::new(Limits { max_stanza_bytes: body.len() + 1024, max_depth: MAX_DEPTH });
    let buf = parser.buffer_mut();
    // The stream wrapper only gives the parser its expected frame. Its default namespace
    // is jabber:client, so an un-namespaced root shows up as that and is refused below.
    buf.extend_from_slice(format!("<stream:stream xmlns='{}' xmlns:stream='{}'>", ns::CLIENT, ns::STREAM).as_bytes());
    buf.extend_from_slice(body.as_bytes());
    buf.extend_from_slice(b"</stream:stream>");
    let err = |e: crate::stream::parser::ParseError| DocError::Xml(e.to_string());
    let mut root = None;
    loop {
        match parser.next_event().map_err(err)? {
            Some(Event::Open(_)) => {}
            Some(Event::Stanza(e)) if root.is_none() => root = Some(e),
            Some(Event::Stanza(_)) => return Err(DocError::TrailingContent),
            Some(Event::Close) | None => break,
        }
    }
    let root = root.ok_or(DocError::Empty)?;
    if root.ns == ns::CLIENT || root.ns.is_empty() {
        return Err(DocError::NoNamespace(root.name));
    }
    Ok(root)
}

/// Drops indentation: whitespace-only text in elements that also have child elements
/// (element-only content, where XML tools treat it as ignorable), recursively. Text of
/// leaf elements is kept even when blank, since there it is the value. Publishing a
/// pretty-printed file compacted this way keeps stanzas small and prints on one line.
pub fn strip_indentation(e: &mut Element) {
    if e.elements().next().is_some() {
        e.children.retain(|n| !matches!(n, Node::Text(t) if t.chars().all(|c| matches!(c, ' ' | '\t' | '\r' | '\n'))));
    }
    for n in &mut e.children {
        if let Node::Element(c) = n {
            strip_indentation(c);
        }
    }
}

/// The document without XML declaration, comments and processing instructions, byte
/// for byte otherwise.
fn strip_non_content(text: &str) -> Result<String, DocError> {
    let mut reader = quick_xml::Reader::from_str(text);
    let mut writer = quick_xml::Writer::new(Vec::with_capacity(text.len()));
    loop {
        let ev = reader.read_event().map_err(|e| DocError::Xml(e.to_string()))?;
        match ev {
            XmlEvent::Eof => break,
            XmlEvent::DocType(_) => return Err(DocError::Dtd),
            XmlEvent::Decl(_) | XmlEvent::Comment(_) | XmlEvent::PI(_) => {}
            other => writer.write_event(other).map_err(|e| DocError::Xml(e.to_string()))?,
        }
    }
    String::from_utf8(writer.into_inner()).map_err(|e| DocError::Xml(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const IODEF: &str = "urn:ietf:params:xml:ns:iodef-2.0";

    #[test]
    fn declaration_comments_and_bom_are_dropped() {
        let doc = "\u{feff}<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!-- report -->\n\
                   <IODEF-Document version=\"2.00\" xmlns=\"urn:ietf:params:xml:ns:iodef-2.0\">\
                   <!-- inner --><Incident purpose=\"reporting\">a &amp; b &#x41;<![CDATA[<x>]]></Incident>\
                   <?pi data?></IODEF-Document>\n";
        let e = parse_document(doc).unwrap_or_else(|e| panic!("{e}"));
        assert!(e.is("IODEF-Document", IODEF));
        let inc = e.child("Incident", IODEF).map(Element::text);
        assert_eq!(inc.as_deref(), Some("a & b A<x>"));
    }

    #[test]
    fn prefixed_roots_keep_their_namespace() {
        let e = parse_document("<iodef:IODEF-Document xmlns:iodef='urn:ietf:params:xml:ns:iodef-2.0'><iodef:Incident/></iodef:IODEF-Document>")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(e.is("IODEF-Document", IODEF));
        assert!(e.child("Incident", IODEF).is_some());
    }

    #[test]
    fn indentation_is_stripped_but_leaf_text_kept() {
        let mut e = parse_document("<a xmlns='urn:a'>\n  <b> </b>\n  <c>x\n y</c>\n  <d>t<e/> </d>\n</a>")
            .unwrap_or_else(|e| panic!("{e}"));
        strip_indentation(&mut e);
        assert_eq!(
            String::from_utf8_lossy(&e.to_bytes("")),
            "<a xmlns='urn:a'><b> </b><c>x\n y</c><d>t<e/></d></a>"
        );
    }

    #[test]
    fn bad_documents_are_refused() {
        assert_eq!(parse_document("<x/>"), Err(DocError::NoNamespace("x".into())));
        assert_eq!(parse_document("<x xmlns='urn:a'/><y xmlns='urn:a'/>"), Err(DocError::TrailingContent));
        assert_eq!(parse_document("  "), Err(DocError::Empty));
        assert_eq!(parse_document("<!DOCTYPE x [<!ENTITY a 'b'>]><x xmlns='urn:a'>&a;</x>"), Err(DocError::Dtd));
        assert!(matches!(parse_document("<x xmlns='urn:a'><y></x>"), Err(DocError::Xml(_))));
        assert!(matches!(parse_document("<x xmlns='urn:a'>&bogus;</x>"), Err(DocError::Xml(_))));
    }
}
