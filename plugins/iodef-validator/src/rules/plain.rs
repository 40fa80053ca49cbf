//! The plain-XML lane: a strict tokenizer for the simple XML that IODEF
//! payloads nearly always are, feeding the same `Checker` as the quick-xml
//! lane without allocating or re-checking UTF-8. It takes only ASCII names,
//! quoted attribute values and text without references, control characters
//! or carriage returns, and no comments, CDATA, processing instructions,
//! declaration or DOCTYPE. Whenever the input leaves that subset, malformed
//! input included, it gives up and the caller starts over with quick-xml,
//! which words the error. So it must never accept what quick-xml rejects, nor
//! see other elements, text or attributes than quick-xml would: the
//! differential test below runs both lanes over the corpus and mutations.

use std::borrow::Cow;

use super::{Attributes, Checker, Violation};

/// Open elements this lane tracks; deeper documents take the quick-xml lane.
const MAX_DEPTH: usize = 32;
/// Namespace declarations in scope this lane tracks.
const MAX_BINDINGS: usize = 16;
/// Attributes per start tag this lane takes.
const MAX_ATTRS: usize = 16;

/// How a run of the plain lane ended early.
pub(super) enum Stop {
    /// A violation that ends the check (the same quick-xml would give).
    Fatal(Vec<Violation>),
    /// The input left the plain subset: check it with quick-xml instead.
    GiveUp,
}

impl From<Vec<Violation>> for Stop {
    fn from(list: Vec<Violation>) -> Self {
        Stop::Fatal(list)
    }
}

/// Feeds `text` (valid UTF-8, BOM removed) to `checker` element by element.
pub(super) fn run(text: &str, checker: &mut Checker) -> Result<(), Stop> {
    let b = text.as_bytes();
    let mut pos = 0;
    // Qualified names of the open elements, with the default namespace and
    // the number of prefix bindings in scope when each opened (Namespaces in
    // XML 1.0 §6.1 scoping).
    let mut open = [("", None, 0); MAX_DEPTH];
    let mut depth: usize = 0;
    let mut default = None;
    let mut bindings = [("", ""); MAX_BINDINGS];
    let mut bound: usize = 0;
    let mut root_done = false;
    // One record reused for every start tag: it is large to move.
    let mut tag = StartTag { name: "", attrs: [("", ""); MAX_ATTRS], len: 0, empty: false, end: 0 };
    loop {
        let start = pos;
        while let Some(&c) = b.get(pos) {
            match c {
                b'<' => break,
                b'&' | b'\r' => return Err(Stop::GiveUp),
                b'>' if b[..pos].ends_with(b"]]") => return Err(Stop::GiveUp),
                c if c < 0x20 && c != b'\t' && c != b'\n' => return Err(Stop::GiveUp),
                _ => pos += 1,
            }
        }
        let run = &text[start..pos];
        if depth > 0 {
            if !run.is_empty() {
                checker.text(run)?;
            }
        } else if !run.bytes().all(|c| matches!(c, b' ' | b'\t' | b'\n')) {
            return Err(Stop::GiveUp);
        }
        if pos == b.len() {
            break;
        }
        if b.get(pos + 1) == Some(&b'/') {
            // End tag: exactly `</name>`, matching the open element.
            let end = qname(b, pos + 2).ok_or(Stop::GiveUp)?;
            let Some(&(name, outer_default, outer)) = depth.checked_sub(1).and_then(|d| open.get(d)) else {
                return Err(Stop::GiveUp);
            };
            if b.get(end) != Some(&b'>') || &text[pos + 2..end] != name {
                return Err(Stop::GiveUp);
            }
            checker.close();
            depth -= 1;
            default = outer_default;
            bound = outer;
            root_done = depth == 0;
            pos = end + 1;
            continue;
        }
        if root_done || depth == MAX_DEPTH {
            return Err(Stop::GiveUp);
        }
        tag.read(text, pos + 1)?;
        let (outer_default, outer) = (default, bound);
        for &(key, value) in &tag.attrs[..tag.len] {
            let prefix = if key == "xmlns" {
                None
            } else if let Some(prefix) = key.strip_prefix("xmlns:") {
                Some(prefix)
            } else {
                continue;
            };
            // Reserved prefixes and namespaces, and undeclaring, are left to quick-xml.
            if matches!(prefix, Some("xml" | "xmlns"))
                || matches!(value, "" | "http://www.w3.org/XML/1998/namespace" | "http://www.w3.org/2000/xmlns/")
                || bound == MAX_BINDINGS
            {
                return Err(Stop::GiveUp);
            }
            match prefix {
                None => default = Some(value),
                Some(prefix) => {
                    bindings[bound] = (prefix, value);
                    bound += 1;
                }
            }
        }
        let (ns, local) = match tag.name.split_once(':') {
            None => (default, tag.name),
            Some((prefix, local)) => match bindings[..bound].iter().rev().find(|(p, _)| *p == prefix) {
                Some(&(_, uri)) => (Some(uri), local),
                None => return Err(Stop::GiveUp),
            },
        };
        checker.enter(ns, local, |rule| {
            let mut attrs = Attributes::default();
            for &(key, value) in &tag.attrs[..tag.len] {
                // Namespace declarations and prefixed attributes are not checked.
                if !key.contains(':') && key != "xmlns" {
                    attrs.add(rule, key, Cow::Borrowed(value));
                }
            }
            Ok(attrs)
        })?;
        if tag.empty {
            checker.close();
            default = outer_default;
            bound = outer;
            root_done = depth == 0;
        } else {
            open[depth] = (tag.name, outer_default, outer);
            depth += 1;
        }
        pos = tag.end;
    }
    if depth > 0 || !root_done {
        return Err(Stop::GiveUp);
    }
    Ok(())
}

/// One start tag, its attributes borrowed from the input.
struct StartTag<'a> {
    name: &'a str,
    attrs: [(&'a str, &'a str); MAX_ATTRS],
    len: usize,
    /// `<name/>`.
    empty: bool,
    /// Just past the closing `>`.
    end: usize,
}

impl<'a> StartTag<'a> {
    /// Reads the tag whose name starts at `from`: `name (ws key="value")* ws? /?>`.
    fn read(&mut self, text: &'a str, from: usize) -> Result<(), Stop> {
        let b = text.as_bytes();
        let mut pos = qname(b, from).ok_or(Stop::GiveUp)?;
        let tag = self;
        (tag.name, tag.len, tag.empty) = (&text[from..pos], 0, false);
        loop {
            let gap = pos;
            while matches!(b.get(pos), Some(b' ' | b'\t' | b'\n')) {
                pos += 1;
            }
            match b.get(pos) {
                Some(b'>') => {
                    tag.end = pos + 1;
                    return Ok(());
                }
                Some(b'/') if b.get(pos + 1) == Some(&b'>') => {
                    tag.empty = true;
                    tag.end = pos + 2;
                    return Ok(());
                }
                _ if pos == gap || tag.len == MAX_ATTRS => return Err(Stop::GiveUp),
                _ => {}
            }
            let key_end = qname(b, pos).ok_or(Stop::GiveUp)?;
            let key = &text[pos..key_end];
            let quote = match (b.get(key_end), b.get(key_end + 1)) {
                (Some(b'='), Some(&q @ (b'"' | b'\''))) => q,
                _ => return Err(Stop::GiveUp),
            };
            let value_start = key_end + 2;
            let mut value_end = value_start;
            loop {
                match b.get(value_end) {
                    Some(&c) if c == quote => break,
                    // References, markup characters and whitespace that
                    // normalisation would change are left to quick-xml.
                    None | Some(b'&' | b'<' | b'>') => return Err(Stop::GiveUp),
                    Some(&c) if c < 0x20 => return Err(Stop::GiveUp),
                    Some(_) => value_end += 1,
                }
            }
            // A repeated name is malformed (XML 1.0 §3.1): quick-xml words it.
            if tag.attrs[..tag.len].iter().any(|(k, _)| *k == key) {
                return Err(Stop::GiveUp);
            }
            tag.attrs[tag.len] = (key, &text[value_start..value_end]);
            tag.len += 1;
            pos = value_end + 1;
        }
    }
}

/// The end of the ASCII qualified name (`ncname` or `ncname:ncname`)
/// starting at `from`, or `None` if there is none.
fn qname(b: &[u8], from: usize) -> Option<usize> {
    let end = ncname(b, from)?;
    if b.get(end) == Some(&b':') { ncname(b, end + 1) } else { Some(end) }
}

/// The end of the ASCII NCName starting at `from`: a letter or `_`, then
/// letters, digits, `_`, `-` and `.`.
fn ncname(b: &[u8], from: usize) -> Option<usize> {
    if !b.get(from).is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_') {
        return None;
    }
    let len = b[from..].iter().take_while(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.')).count();
    Some(from + len)
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::{Path, PathBuf};

    use super::*;

    fn corpus(dir: &str) -> Vec<(PathBuf, String)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/iodef").join(dir);
        let mut files: Vec<(PathBuf, String)> = fs::read_dir(dir)
            .expect("corpus directory exists")
            .map(|e| e.expect("readable entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "xml"))
            .filter_map(|p| fs::read_to_string(&p).ok().map(|text| (p, text)))
            .collect();
        files.sort();
        files
    }

    /// The plain lane's verdict, or `None` where it gives up.
    fn plain(text: &str) -> Option<Result<(), Vec<Violation>>> {
        let mut checker = Checker::new();
        match run(text, &mut checker) {
            Ok(()) => Some(checker.report.finish()),
            Err(Stop::Fatal(list)) => Some(Err(list)),
            Err(Stop::GiveUp) => None,
        }
    }

    fn quick_xml(text: &str) -> Result<(), Vec<Violation>> {
        let mut checker = Checker::new();
        checker.run(text)?;
        checker.report.finish()
    }

    #[test]
    fn every_valid_corpus_document_takes_the_plain_lane() {
        for (path, text) in corpus("valid") {
            assert_eq!(plain(&text), Some(Ok(())), "{}", path.display());
        }
    }

    #[test]
    fn where_the_plain_lane_decides_it_agrees_with_quick_xml() {
        let mut decided = 0;
        for dir in ["valid", "invalid", "redaction"] {
            for (path, text) in corpus(dir) {
                // Each document, and each of its prefixes (cut inside tags,
                // values, text), must get the same verdict from both lanes.
                let cuts = (1..text.len()).step_by(7).chain([text.len()]);
                for cut in cuts.filter(|i| text.is_char_boundary(*i)) {
                    let doc = &text[..cut];
                    if let Some(verdict) = plain(doc) {
                        decided += 1;
                        assert_eq!(verdict, quick_xml(doc), "{} cut at {cut}", path.display());
                    }
                }
            }
        }
        assert!(decided > 50, "the plain lane decided only {decided} documents");
    }

    #[test]
    fn the_plain_lane_leaves_anything_unusual_to_quick_xml() {
        let base = r#"<IODEF-Document version="2.00" xmlns="urn:ietf:params:xml:ns:iodef-2.0"><Incident purpose="reporting"/></IODEF-Document>"#;
        for (from, to) in [
            ("<Incident ", "<!-- c --><Incident "),
            ("<Incident ", "<?pi?><Incident "),
            ("purpose=\"reporting\"", "purpose=\"report&#105;ng\""),
            ("purpose=\"reporting\"", "purpose=\"reporting\" purpose=\"watch\""),
            ("purpose=\"reporting\"", "purpose = \"reporting\""),
            ("purpose=\"reporting\"", "purpose=\"a\tb\""),
            ("<Incident ", "<x:Incident "),
            ("<Incident ", "<Incident xmlns=\"\" "),
            ("</IODEF-Document>", "</IODEF-Document >"),
            ("</IODEF-Document>", "</IODEF-Document><x/>"),
            ("</IODEF-Document>", ""),
        ] {
            let doc = base.replacen(from, to, 1);
            assert!(plain(&doc).is_none(), "{doc}");
        }
        assert_eq!(plain(base).map(|v| v.is_err()), Some(true), "Incident lacks its children");
    }
}
