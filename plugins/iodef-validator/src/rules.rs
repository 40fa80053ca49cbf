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
//!
//! It runs once per published payload inside a fresh sandbox, so it keeps
//! allocation and work per element low: paths are built only for reported
//! violations, attributes are read in one pass into a fixed-size record, and
//! plain documents take an allocation-free tokenizer (`plain`) with quick-xml
//! as the fallback for everything else.

use std::borrow::Cow;

use quick_xml::events::{BytesStart, Event};
use quick_xml::escape::resolve_predefined_entity;
use quick_xml::name::ResolveResult;
use quick_xml::reader::NsReader;
use quick_xml::XmlVersion;

use crate::datetime;

mod plain;
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
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut checker = Checker::new();
    match plain::run(text, &mut checker) {
        Ok(()) => {}
        Err(plain::Stop::Fatal(list)) => return Err(list),
        Err(plain::Stop::GiveUp) => {
            // Whatever the plain lane reported is dropped with its checker.
            checker = Checker::new();
            checker.run(text)?;
        }
    }
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

/// Open elements deeper than this make the stack grow beyond its first
/// allocation; IODEF documents rarely nest past a dozen.
const USUAL_DEPTH: usize = 32;

/// Room for the text of an xs:dateTime element (with whitespace around it)
/// without growing the buffer.
const USUAL_TEXT: usize = 64;

/// An open element. Frames hold no path: the path of a violation is built
/// from the stack only when one is reported, so a valid document allocates
/// almost nothing per element.
struct Frame {
    /// Local name; borrowed from the schema for IODEF elements it knows.
    name: Cow<'static, str>,
    /// The `[n]` shown in paths, for elements the schema allows more than once.
    index: Option<u32>,
    rule: Option<&'static ElementRule>,
    /// Cursor in the content model: current slot and how often it matched.
    slot: usize,
    count: u32,
    /// The last child placed in the content model, for out-of-order messages.
    last_child: Option<&'static str>,
    /// Where this element's children start in `Checker::siblings`.
    siblings_from: usize,
    /// Where this element's text starts in `Checker::text` (xs:dateTime only).
    text_from: usize,
    stray_text_reported: bool,
}

struct Checker {
    report: Report,
    stack: Vec<Frame>,
    /// Children seen per local name, for `[n]` indices: one run per open
    /// element (from its `siblings_from`), dropped when it closes.
    siblings: Vec<(Cow<'static, str>, u32)>,
    /// Text of the open xs:dateTime elements, each from its `text_from`.
    text: String,
    root_seen: bool,
}

impl Checker {
    fn new() -> Self {
        Checker {
            report: Report::default(),
            stack: Vec::with_capacity(USUAL_DEPTH),
            siblings: Vec::with_capacity(USUAL_DEPTH),
            text: String::with_capacity(USUAL_TEXT),
            root_seen: false,
        }
    }

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
                    let mut utf8 = [0; 4];
                    let resolved = if r.is_char_ref() {
                        r.resolve_char_ref().ok().flatten().map(|c| &*c.encode_utf8(&mut utf8))
                    } else {
                        resolve_predefined_entity(&r.xml10_content())
                    };
                    match resolved {
                        Some(s) => self.text(s)?,
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
        if !self.stack.is_empty() {
            return Err(fatal(format!(
                "malformed XML: unexpected end of input inside {}",
                path(&self.stack)
            )));
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
        self.enter(ns, local.into_inner(), |rule| Attributes::read(e, rule))
    }

    /// Opens element `local` in namespace `ns`; `attributes` reads its
    /// attributes once the element's rule is known. Shared by both lanes.
    fn enter<'e>(
        &mut self,
        ns: Option<&str>,
        local: &str,
        attributes: impl FnOnce(Option<&'static ElementRule>) -> Result<Attributes<'e>, Vec<Violation>>,
    ) -> Result<(), Vec<Violation>> {
        let (name, index, rule) = if self.stack.is_empty() {
            if self.root_seen {
                return Err(fatal("malformed XML: more than one root element".into()));
            }
            self.root_seen = true;
            check_root(ns, local)?;
            (Cow::Borrowed("IODEF-Document"), None, schema::rule("IODEF-Document"))
        } else {
            let rule = if ns == Some(IODEF_NS) { schema::rule(local) } else { None };
            let name = match rule {
                Some(r) => Cow::Borrowed(r.name),
                None => Cow::Owned(local.to_owned()),
            };
            let index = self.place(&schema::model_name(ns, local), name.clone());
            (name, index, rule)
        };
        let child = Frame {
            name,
            index,
            rule,
            slot: 0,
            count: 0,
            last_child: None,
            siblings_from: self.siblings.len(),
            text_from: self.text.len(),
            stray_text_reported: false,
        };
        let attrs = attributes(rule)?;
        let at = |name: &str| format!("{}/@{name}", path(self.stack.iter().chain([&child])));
        if self.stack.is_empty() {
            check_version(attrs.version.as_deref(), at, &mut self.report);
        }
        if let Some(rule) = rule {
            check_attributes(rule, &attrs, at, &mut self.report);
        }
        self.stack.push(child);
        Ok(())
    }

    fn close(&mut self) {
        let Some(frame) = self.stack.last() else { return };
        if let Some(rule) = frame.rule {
            if let Some(slots) = rule.children {
                for (k, slot) in slots.iter().enumerate().skip(frame.slot) {
                    let have = if k == frame.slot { frame.count } else { 0 };
                    if have < slot.min {
                        self.report
                            .push(path(&self.stack), format!("missing required element {}", names(slot.names)));
                    }
                }
            }
            if rule.date_time {
                let value = self.text[frame.text_from..].trim();
                if let Err(why) = datetime::check(value) {
                    self.report.push(
                        path(&self.stack),
                        format!("`{value}` is not an RFC 3339 date-time (RFC 7970 §2.2.8): {why}"),
                    );
                }
            }
        }
        self.text.truncate(frame.text_from);
        self.siblings.truncate(frame.siblings_from);
        self.stack.pop();
    }

    fn text(&mut self, content: &str) -> Result<(), Vec<Violation>> {
        let blank = content.bytes().all(|c| matches!(c, b' ' | b'\t' | b'\r' | b'\n'));
        let Some(frame) = self.stack.last_mut() else {
            return if blank {
                Ok(())
            } else {
                Err(fatal("malformed XML: text outside the root element".into()))
            };
        };
        let Some(rule) = frame.rule else { return Ok(()) };
        if rule.date_time {
            self.text.push_str(content);
        } else if !blank && !frame.stray_text_reported && rule.children.is_some_and(|s| !s.is_empty()) {
            frame.stray_text_reported = true;
            self.report.push(path(&self.stack), format!("`{}` holds elements only, not text", rule.name));
        }
        Ok(())
    }

    /// Places child `key` (named `local`) in the content model of the
    /// innermost open element, reporting order and count problems, and
    /// returns the `[n]` index its path shows, if any.
    fn place(&mut self, key: &str, local: Cow<'static, str>) -> Option<u32> {
        let nth = self.count_sibling(local.clone());
        let Some(parent) = self.stack.last_mut() else { return Some(nth) };
        let Some(slots) = parent.rule.and_then(|r| r.children) else { return Some(nth) };
        let parent_name = parent.rule.map_or("", |r| r.name);
        let child_path = |stack: &[Frame], indexed: bool| {
            let parent = path(stack);
            if indexed { format!("{parent}/{local}[{nth}]") } else { format!("{parent}/{local}") }
        };
        let found = slots.iter().enumerate().skip(parent.slot).find_map(|(j, s)| {
            s.names.iter().find(|n| **n == key).map(|n| (j, s, *n))
        });
        match found {
            Some((j, slot, name)) => {
                parent.last_child = Some(name);
                if j == parent.slot {
                    parent.count += 1;
                    if let Some(max) = slot.max.filter(|max| parent.count > *max) {
                        self.report.push(
                            path(&self.stack),
                            format!("too many `{key}` elements in `{parent_name}` (at most {max})"),
                        );
                    }
                } else {
                    let (from, count) = (parent.slot, parent.count);
                    parent.slot = j;
                    parent.count = 1;
                    for (k, skipped) in slots.iter().enumerate().take(j).skip(from) {
                        let have = if k == from { count } else { 0 };
                        if have < skipped.min {
                            self.report.push(
                                path(&self.stack),
                                format!("missing required element {} before `{key}`", names(skipped.names)),
                            );
                        }
                    }
                }
                (slot.max != Some(1)).then_some(nth)
            }
            None => {
                let earlier = slots.iter().take(parent.slot).find(|s| s.names.contains(&key));
                let (indexed, message) = match earlier {
                    Some(slot) => (
                        slot.max != Some(1),
                        format!(
                            "element `{key}` is out of order in `{parent_name}`: it must come before `{}`",
                            parent.last_child.unwrap_or_default()
                        ),
                    ),
                    None => (true, format!("unexpected element `{key}` in `{parent_name}`")),
                };
                self.report.push(child_path(&self.stack, indexed), message);
                indexed.then_some(nth)
            }
        }
    }

    /// Counts one more child named `local` in the innermost open element and
    /// returns how many it now has.
    fn count_sibling(&mut self, local: Cow<'static, str>) -> u32 {
        let from = self.stack.last().map_or(0, |f| f.siblings_from);
        match self.siblings[from..].iter_mut().find(|(n, _)| *n == local) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                self.siblings.push((local, 1));
                1
            }
        }
    }
}

/// The path of the innermost of `frames` (root first), such as
/// `/IODEF-Document/Incident[1]/Contact[2]`.
fn path<'f>(frames: impl IntoIterator<Item = &'f Frame>) -> String {
    let mut out = String::new();
    for frame in frames {
        out.push('/');
        out.push_str(&frame.name);
        if let Some(n) = frame.index {
            out.push_str(&format!("[{n}]"));
        }
    }
    out
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
/// `at` gives the location of an attribute.
fn check_version(version: Option<&str>, at: impl Fn(&str) -> String, report: &mut Report) {
    match version {
        None => report.push(
            at("version"),
            format!("missing required attribute `version` (must be \"{IODEF_VERSION}\")"),
        ),
        Some(v) if v != IODEF_VERSION => {
            report.push(at("version"), format!("`version` must be \"{IODEF_VERSION}\", found \"{v}\""))
        }
        Some(_) => {}
    }
}

fn check_attributes(rule: &ElementRule, attrs: &Attributes<'_>, at: impl Fn(&str) -> String, report: &mut Report) {
    for (i, name) in rule.required_attrs.iter().enumerate() {
        if attrs.required & (1 << i) == 0 {
            report.push(at(name), format!("missing required attribute `{name}`"));
        }
    }
    for (i, (name, allowed)) in rule.enum_attrs.iter().enumerate() {
        // NMTOKEN values collapse whitespace (XSD Part 2 §3.3.4).
        let Some(value) = attrs.enums[i].as_deref().map(str::trim) else { continue };
        if !allowed.contains(&value) {
            report.push(
                at(name),
                format!("`{value}` is not an allowed value of `{name}`; expected one of: {}", allowed.join(", ")),
            );
        } else if value == "ext-value" && attrs.ext & (1 << i) == 0 {
            report.push(
                at(name),
                format!("`{name}` is `ext-value` but the `ext-{name}` attribute is missing (RFC 7970 §5.1)"),
            );
        }
    }
}

/// Most enumerated attributes any element of the schema has (a test checks
/// the tables against it).
const MAX_ENUM_ATTRS: usize = 5;

/// What the checks need from a start tag's unprefixed attributes (namespace
/// declarations and prefixed, foreign attributes are left out), gathered in
/// one pass: values are normalised but kept only where a check reads them.
#[derive(Default)]
struct Attributes<'e> {
    /// `version`, read on every element but checked on the root only.
    version: Option<Cow<'e, str>>,
    /// Bit `i` set: `rule.required_attrs[i]` is present.
    required: u32,
    /// The value of each of `rule.enum_attrs`, by position.
    enums: [Option<Cow<'e, str>>; MAX_ENUM_ATTRS],
    /// Bit `i` set: `ext-` + `rule.enum_attrs[i].0` is present.
    ext: u32,
}

/// Attribute names the duplicate check below remembers; a start tag with
/// more goes the slow way.
const USUAL_ATTRS: usize = 16;

/// Why a pass over the attributes stopped.
enum AttrStop {
    Fatal(Vec<Violation>),
    /// A repeated (or too many) names: read again with quick-xml's own check.
    Recheck,
}

impl<'e> Attributes<'e> {
    /// Reads the attributes with a duplicate check on the stack. quick-xml's
    /// own check allocates per start tag, so it only runs, to word the
    /// error exactly, when a name repeats (XML 1.0 §3.1 "Unique Att Spec").
    fn read(e: &'e BytesStart<'_>, rule: Option<&ElementRule>) -> Result<Self, Vec<Violation>> {
        match Self::read_with(e, rule, false) {
            Ok(attrs) => Ok(attrs),
            Err(AttrStop::Fatal(v)) => Err(v),
            Err(AttrStop::Recheck) => Self::read_with(e, rule, true).map_err(|stop| match stop {
                AttrStop::Fatal(v) => v,
                AttrStop::Recheck => fatal("malformed XML: bad attribute".into()),
            }),
        }
    }

    fn read_with(e: &'e BytesStart<'_>, rule: Option<&ElementRule>, checked: bool) -> Result<Self, AttrStop> {
        let mut out = Attributes::default();
        let mut seen = [""; USUAL_ATTRS];
        let mut seen_len = 0;
        let mut all = e.attributes();
        all.with_checks(checked);
        for a in all {
            let a = a.map_err(|err| AttrStop::Fatal(fatal(format!("malformed XML: bad attribute: {err}"))))?;
            let key = a.key.into_inner();
            if !checked {
                if seen_len == USUAL_ATTRS || seen[..seen_len].contains(&key) {
                    return Err(AttrStop::Recheck);
                }
                seen[seen_len] = key;
                seen_len += 1;
            }
            if a.key.as_namespace_binding().is_some() || a.key.prefix().is_some() {
                continue;
            }
            // Every value is normalised, even unchecked ones: a bad
            // reference anywhere makes the document malformed.
            let value = a.normalized_value(XmlVersion::Implicit1_0).map_err(|err| {
                AttrStop::Fatal(fatal(format!("malformed XML: bad attribute value: {err}")))
            })?;
            out.add(rule, key, value);
        }
        Ok(out)
    }

    /// Records unprefixed attribute `key` with its normalised `value`.
    fn add(&mut self, rule: Option<&ElementRule>, key: &str, value: Cow<'e, str>) {
        if key == "version" {
            self.version = Some(value.clone());
        }
        let Some(rule) = rule else { return };
        if let Some(i) = rule.required_attrs.iter().position(|n| *n == key) {
            self.required |= 1 << i;
        }
        if let Some(i) = rule.enum_attrs.iter().position(|(n, _)| *n == key) {
            self.enums[i] = Some(value);
        }
        if let Some(base) = key.strip_prefix("ext-")
            && let Some(i) = rule.enum_attrs.iter().position(|(n, _)| *n == base)
        {
            self.ext |= 1 << i;
        }
    }
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
    #[test]
    fn every_schema_element_fits_the_fixed_size_attribute_record() {
        for rule in crate::schema_tables::ELEMENTS {
            assert!(rule.enum_attrs.len() <= MAX_ENUM_ATTRS, "{}", rule.name);
            assert!(rule.required_attrs.len() <= 32, "{}", rule.name);
        }
    }

    #[test]
    fn a_repeated_attribute_is_malformed_in_quick_xml_words() {
        let doc = MINIMAL.replace(r#"role="irt""#, r#"role="irt" role="cc""#);
        let v = only(doc.as_bytes());
        assert_eq!(v.location, "");
        assert!(v.message.starts_with("malformed XML: bad attribute: "), "{}", v.message);
        assert!(v.message.contains("duplicated"), "{}", v.message);
    }

    #[test]
    fn paths_are_built_only_for_violations_but_match_the_element() {
        let doc = MINIMAL.replace(
            r#"<Contact role="irt" type="organization"/>"#,
            r#"<Contact role="irt" type="organization"/><Contact role="x" type="person"><Contact role="cc" type="y"/></Contact>"#,
        );
        let list = validate(doc.as_bytes()).expect_err("rejected");
        let locations: Vec<&str> = list.iter().map(|v| v.location.as_str()).collect();
        assert_eq!(
            locations,
            [
                "/IODEF-Document/Incident[1]/Contact[2]/@role",
                "/IODEF-Document/Incident[1]/Contact[2]/Contact[1]/@type",
            ]
        );
    }
}
