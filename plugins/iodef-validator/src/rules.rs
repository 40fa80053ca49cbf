//! The RFC 7970 (IODEF 2.0) checks, run over one streamed parse of the
//! payload. Each violation names the element or attribute by a path such as
//! `/IODEF-Document/Incident[1]/IncidentID` (an index is shown where the
//! schema allows the element more than once) and says what is wrong.
//!
//! Checked: UTF-8 and well-formedness, no DOCTYPE or processing instruction
//! (RFC 6120 §11.1: they cannot travel in XMPP), the root element, namespace
//! and `version` (RFC 7970 §3.1), element order and occurrence counts of every
//! sequence the schema tables express, required attributes, enumerated
//! attribute values with their `ext-*` companions (RFC 7970 §5.1), and RFC 3339
//! timestamps (RFC 7970 §2.2.8). Not checked: simple types other than
//! enumerations and xs:dateTime, xs:ID uniqueness, foreign-namespace content.
//! This module must stay free of I/O and of the WIT bindings, so it runs
//! natively under `cargo test`.

use quick_xml::events::{BytesStart, Event};
use quick_xml::escape::resolve_predefined_entity;
use quick_xml::name::ResolveResult;
use quick_xml::reader::NsReader;
use quick_xml::XmlVersion;

use crate::datetime;
use crate::schema::{self, ElementRule, IODEF_NS, IODEF_VERSION};

/// Violations reported in full; the rest are summarised in one more entry.
pub const MAX_VIOLATIONS: usize = 50;

/// One reason the payload is rejected (mirrors the WIT `violation` record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Path of the offending element or attribute, or "" for the document.
    pub location: String,
    /// What is wrong, for the publisher's operator.
    pub message: String,
}

/// Checks `payload` (one standalone UTF-8 XML element) against RFC 7970.
pub fn validate(payload: &[u8]) -> Result<(), Vec<Violation>> {
    let text = std::str::from_utf8(payload).map_err(|e| {
        fatal(format!(
            "payload is not UTF-8: invalid byte sequence at byte {}",
            e.valid_up_to()
        ))
    })?;
    let mut checker = Checker::default();
    checker.run(text.strip_prefix('\u{feff}').unwrap_or(text))?;
    checker.report.finish()
}

/// A violation of the whole document that ends the check.
fn fatal(message: String) -> Vec<Violation> {
    vec![Violation { location: String::new(), message }]
}

#[derive(Default)]
struct Report {
    list: Vec<Violation>,
    dropped: usize,
}

impl Report {
    fn push(&mut self, location: String, message: String) {
        if self.list.len() < MAX_VIOLATIONS {
            self.list.push(Violation { location, message });
        } else {
            self.dropped += 1;
        }
    }

    fn finish(mut self) -> Result<(), Vec<Violation>> {
        if self.dropped > 0 {
            let message = format!("and {} more violations", self.dropped);
            self.list.push(Violation { location: String::new(), message });
        }
        if self.list.is_empty() { Ok(()) } else { Err(self.list) }
    }
}

/// An open element.
struct Frame {
    path: String,
    rule: Option<&'static ElementRule>,
    /// Cursor in the content model: current slot and how often it matched.
    slot: usize,
    count: u32,
    last_child: Option<String>,
    /// Children seen so far per local name, for `[n]` indices.
    siblings: Vec<(String, u32)>,
    /// Text content, collected only for xs:dateTime elements.
    text: String,
    stray_text_reported: bool,
}

#[derive(Default)]
struct Checker {
    report: Report,
    stack: Vec<Frame>,
    root_seen: bool,
}

impl Checker {
    fn run(&mut self, text: &str) -> Result<(), Vec<Violation>> {
        let mut reader = NsReader::from_str(text);
        reader.config_mut().check_comments = true;
        loop {
            let event = reader.read_event().map_err(|e| {
                fatal(format!("malformed XML at byte {}: {e}", reader.error_position()))
            })?;
            match event {
                Event::Start(e) => self.open(&reader, &e)?,
                Event::Empty(e) => {
                    self.open(&reader, &e)?;
                    self.close();
                }
                Event::End(_) => self.close(),
                Event::Text(t) => self.text(&t.xml10_content())?,
                Event::CData(t) => self.text(&t.xml10_content())?,
                Event::GeneralRef(r) => {
                    let resolved = if r.is_char_ref() {
                        r.resolve_char_ref().ok().flatten().map(String::from)
                    } else {
                        resolve_predefined_entity(&r.xml10_content()).map(String::from)
                    };
                    match resolved {
                        Some(s) => self.text(&s)?,
                        None => {
                            return Err(fatal(format!(
                                "malformed XML: undefined or invalid reference `&{};`",
                                r.xml10_content()
                            )));
                        }
                    }
                }
                Event::Decl(d) => {
                    if let Some(Ok(enc)) = d.encoding()
                        && !enc.eq_ignore_ascii_case("utf-8")
                    {
                        return Err(fatal(format!(
                            "the XML declaration names encoding `{enc}`; only UTF-8 is allowed"
                        )));
                    }
                }
                Event::DocType(_) => {
                    return Err(fatal("a DOCTYPE is not allowed (RFC 6120 §11.1)".into()));
                }
                Event::PI(_) => self.report.push(
                    String::new(),
                    "processing instructions are not allowed (RFC 6120 §11.1)".into(),
                ),
                Event::Comment(_) => {}
                Event::Eof => break,
            }
        }
        if let Some(open) = self.stack.last() {
            return Err(fatal(format!("malformed XML: unexpected end of input inside {}", open.path)));
        }
        if !self.root_seen {
            return Err(fatal("no root element".into()));
        }
        Ok(())
    }

    fn open(&mut self, reader: &NsReader<&[u8]>, e: &BytesStart<'_>) -> Result<(), Vec<Violation>> {
        let (resolved, local) = reader.resolver().resolve_element(e.name());
        let ns = match resolved {
            ResolveResult::Bound(ns) => Some(ns.into_inner()),
            ResolveResult::Unbound => None,
            ResolveResult::Unknown(prefix) => {
                return Err(fatal(format!("malformed XML: namespace prefix `{prefix}` is not declared")));
            }
        };
        let local = local.into_inner();
        let (path, rule) = match self.stack.last_mut() {
            None => {
                if self.root_seen {
                    return Err(fatal("malformed XML: more than one root element".into()));
                }
                self.root_seen = true;
                check_root(ns, local)?;
                ("/IODEF-Document".to_owned(), schema::rule("IODEF-Document"))
            }
            Some(parent) => {
                let path = parent.place(&schema::model_name(ns, local), local, &mut self.report);
                let rule = if ns == Some(IODEF_NS) { schema::rule(local) } else { None };
                (path, rule)
            }
        };
        let attrs = attributes(e)?;
        if self.stack.is_empty() {
            check_version(&attrs, &path, &mut self.report);
        }
        if let Some(rule) = rule {
            check_attributes(rule, &attrs, &path, &mut self.report);
        }
        self.stack.push(Frame {
            path,
            rule,
            slot: 0,
            count: 0,
            last_child: None,
            siblings: Vec::new(),
            text: String::new(),
            stray_text_reported: false,
        });
        Ok(())
    }

    fn close(&mut self) {
        let Some(frame) = self.stack.pop() else { return };
        let Some(rule) = frame.rule else { return };
        if let Some(slots) = rule.children {
            for (k, slot) in slots.iter().enumerate().skip(frame.slot) {
                let have = if k == frame.slot { frame.count } else { 0 };
                if have < slot.min {
                    self.report.push(
                        frame.path.clone(),
                        format!("missing required element {}", names(slot.names)),
                    );
                }
            }
        }
        if rule.date_time {
            let value = frame.text.trim();
            if let Err(why) = datetime::check(value) {
                self.report.push(
                    frame.path.clone(),
                    format!("`{value}` is not an RFC 3339 date-time (RFC 7970 §2.2.8): {why}"),
                );
            }
        }
    }

    fn text(&mut self, content: &str) -> Result<(), Vec<Violation>> {
        let blank = content.chars().all(|c| matches!(c, ' ' | '\t' | '\r' | '\n'));
        let Some(frame) = self.stack.last_mut() else {
            return if blank {
                Ok(())
            } else {
                Err(fatal("malformed XML: text outside the root element".into()))
            };
        };
        let Some(rule) = frame.rule else { return Ok(()) };
        if rule.date_time {
            frame.text.push_str(content);
        } else if !blank && !frame.stray_text_reported && rule.children.is_some_and(|s| !s.is_empty()) {
            frame.stray_text_reported = true;
            self.report.push(frame.path.clone(), format!("`{}` holds elements only, not text", rule.name));
        }
        Ok(())
    }
}

impl Frame {
    /// Places child `key` in this element's content model, reporting order and
    /// count problems, and returns the child's path.
    fn place(&mut self, key: &str, local: &str, report: &mut Report) -> String {
        let nth = match self.siblings.iter_mut().find(|(n, _)| n == local) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                self.siblings.push((local.to_owned(), 1));
                1
            }
        };
        let mut indexed = true;
        let mut problem = None;
        if let Some(slots) = self.rule.and_then(|r| r.children) {
            let parent = self.rule.map_or("", |r| r.name);
            let found = slots.iter().enumerate().skip(self.slot).find(|(_, s)| s.names.contains(&key));
            match found {
                Some((j, slot)) => {
                    indexed = slot.max != Some(1);
                    if j == self.slot {
                        self.count += 1;
                        if let Some(max) = slot.max.filter(|max| self.count > *max) {
                            report.push(
                                self.path.clone(),
                                format!("too many `{key}` elements in `{parent}` (at most {max})"),
                            );
                        }
                    } else {
                        for (k, skipped) in slots.iter().enumerate().take(j).skip(self.slot) {
                            let have = if k == self.slot { self.count } else { 0 };
                            if have < skipped.min {
                                report.push(
                                    self.path.clone(),
                                    format!("missing required element {} before `{key}`", names(skipped.names)),
                                );
                            }
                        }
                        self.slot = j;
                        self.count = 1;
                    }
                }
                None => match slots.iter().take(self.slot).find(|s| s.names.contains(&key)) {
                    Some(slot) => {
                        indexed = slot.max != Some(1);
                        let last = self.last_child.as_deref().unwrap_or_default();
                        problem = Some(format!(
                            "element `{key}` is out of order in `{parent}`: it must come before `{last}`"
                        ));
                    }
                    None => problem = Some(format!("unexpected element `{key}` in `{parent}`")),
                },
            }
        }
        if problem.is_none() {
            self.last_child = Some(key.to_owned());
        }
        let path = if indexed { format!("{}/{local}[{nth}]", self.path) } else { format!("{}/{local}", self.path) };
        if let Some(message) = problem {
            report.push(path.clone(), message);
        }
        path
    }
}

/// The root must be `IODEF-Document` in the IODEF 2.0 namespace (RFC 7970 §3.1).
fn check_root(ns: Option<&str>, local: &str) -> Result<(), Vec<Violation>> {
    let location = format!("/{local}");
    let message = if local != "IODEF-Document" {
        format!("the root element must be `IODEF-Document`, found `{local}`")
    } else if ns != Some(IODEF_NS) {
        format!(
            "`IODEF-Document` must be in namespace {IODEF_NS}, found {}",
            ns.map_or("no namespace".to_owned(), |n| format!("`{n}`"))
        )
    } else {
        return Ok(());
    };
    Err(vec![Violation { location, message }])
}

/// RFC 7970 §3.1: `version` is REQUIRED and is "2.00" (the schema only fixes it).
fn check_version(attrs: &[(String, String)], path: &str, report: &mut Report) {
    match attr(attrs, "version") {
        None => report.push(
            format!("{path}/@version"),
            format!("missing required attribute `version` (must be \"{IODEF_VERSION}\")"),
        ),
        Some(v) if v != IODEF_VERSION => report.push(
            format!("{path}/@version"),
            format!("`version` must be \"{IODEF_VERSION}\", found \"{v}\""),
        ),
        Some(_) => {}
    }
}

fn check_attributes(rule: &ElementRule, attrs: &[(String, String)], path: &str, report: &mut Report) {
    for name in rule.required_attrs {
        if attr(attrs, name).is_none() {
            report.push(format!("{path}/@{name}"), format!("missing required attribute `{name}`"));
        }
    }
    for (name, allowed) in rule.enum_attrs {
        // NMTOKEN values collapse whitespace (XSD Part 2 §3.3.4).
        let Some(value) = attr(attrs, name).map(str::trim) else { continue };
        if !allowed.contains(&value) {
            report.push(
                format!("{path}/@{name}"),
                format!("`{value}` is not an allowed value of `{name}`; expected one of: {}", allowed.join(", ")),
            );
        } else if value == "ext-value" && attr(attrs, &format!("ext-{name}")).is_none() {
            report.push(
                format!("{path}/@{name}"),
                format!("`{name}` is `ext-value` but the `ext-{name}` attribute is missing (RFC 7970 §5.1)"),
            );
        }
    }
}

/// The element's unprefixed attributes, values normalised; namespace
/// declarations and prefixed (foreign) attributes are left out.
fn attributes(e: &BytesStart<'_>) -> Result<Vec<(String, String)>, Vec<Violation>> {
    let mut out = Vec::new();
    for a in e.attributes() {
        let a = a.map_err(|err| fatal(format!("malformed XML: bad attribute: {err}")))?;
        if a.key.as_namespace_binding().is_some() || a.key.prefix().is_some() {
            continue;
        }
        let value = a
            .normalized_value(XmlVersion::Implicit1_0)
            .map_err(|err| fatal(format!("malformed XML: bad attribute value: {err}")))?;
        out.push((a.key.into_inner().to_owned(), value.into_owned()));
    }
    Ok(out)
}

fn attr<'a>(attrs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    attrs.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

fn names(names: &[&str]) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(" or ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"<IODEF-Document version="2.00" xmlns="urn:ietf:params:xml:ns:iodef-2.0"><Incident purpose="reporting"><IncidentID name="a.example">1</IncidentID><GenerationTime>2024-01-01T00:00:00Z</GenerationTime><Contact role="irt" type="organization"/></Incident></IODEF-Document>"#;

    fn only(payload: &[u8]) -> Violation {
        let mut list = validate(payload).expect_err("rejected");
        assert_eq!(list.len(), 1, "{list:?}");
        list.remove(0)
    }

    #[test]
    fn a_minimal_document_is_accepted_with_or_without_a_utf8_bom_or_declaration() {
        assert_eq!(validate(MINIMAL.as_bytes()), Ok(()));
        assert_eq!(validate(format!("\u{feff}{MINIMAL}").as_bytes()), Ok(()));
        assert_eq!(validate(format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>{MINIMAL}").as_bytes()), Ok(()));
    }

    #[test]
    fn non_utf8_payloads_and_other_declared_encodings_are_rejected() {
        // ISO-8859-1 "é" is the lone byte 0xE9, not a UTF-8 sequence.
        let mut bytes = MINIMAL.as_bytes().to_vec();
        let at = MINIMAL.find(">1<").expect("incident id text") + 1;
        bytes[at] = 0xe9;
        assert!(only(&bytes).message.contains("not UTF-8"));
        let declared = format!("<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?>{MINIMAL}");
        assert!(only(declared.as_bytes()).message.contains("only UTF-8"));
    }

    #[test]
    fn a_doctype_is_rejected_before_any_entity_is_used() {
        let doc = format!("<!DOCTYPE IODEF-Document [<!ENTITY x \"y\">]>{MINIMAL}");
        let v = only(doc.as_bytes());
        assert_eq!(v.location, "");
        assert!(v.message.contains("DOCTYPE is not allowed"));
    }

    #[test]
    fn processing_instructions_are_reported() {
        let doc = MINIMAL.replace("<Incident ", "<?app data?><Incident ");
        assert!(only(doc.as_bytes()).message.contains("processing instructions"));
    }

    #[test]
    fn a_second_root_element_and_trailing_text_are_malformed() {
        assert!(only(format!("{MINIMAL}{MINIMAL}").as_bytes()).message.contains("more than one root"));
        assert!(only(format!("{MINIMAL}tail").as_bytes()).message.contains("text outside"));
        assert!(only(b"").message.contains("no root element"));
    }

    #[test]
    fn foreign_elements_the_schema_names_are_placed_by_namespace() {
        let ok = MINIMAL.replace(
            "<Contact ",
            r#"<Method><sci:AttackPattern xmlns:sci="urn:ietf:params:xml:ns:iodef-sci-1.0"/></Method><Contact "#,
        );
        assert_eq!(validate(ok.as_bytes()), Ok(()));
        let wrong = MINIMAL.replace("<Contact ", r#"<Method><x:AttackPattern xmlns:x="urn:other"/></Method><Contact "#);
        let v = only(wrong.as_bytes());
        assert_eq!(v.location, "/IODEF-Document/Incident[1]/Method[1]/AttackPattern[1]");
        assert!(v.message.contains("unexpected element `{urn:other}AttackPattern`"));
    }

    #[test]
    fn entity_and_character_references_count_as_timestamp_text() {
        let doc = MINIMAL.replace("2024-01-01T00:00:00Z", "2024-01-01T00:00:00&#x5A;");
        assert_eq!(validate(doc.as_bytes()), Ok(()));
    }

    #[test]
    fn the_cap_keeps_fifty_violations_and_counts_the_rest() {
        let contacts = r#"<Contact role="bad" type="person"/>"#.repeat(MAX_VIOLATIONS + 7);
        let doc = MINIMAL.replace(r#"<Contact role="irt" type="organization"/>"#, &contacts);
        let list = validate(doc.as_bytes()).expect_err("rejected");
        assert_eq!(list.len(), MAX_VIOLATIONS + 1);
        assert_eq!(list[MAX_VIOLATIONS].message, "and 7 more violations");
    }
}
