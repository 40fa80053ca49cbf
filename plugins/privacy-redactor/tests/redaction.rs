//! Runs the redactor over the shared corpus: the input/expected pairs in
//! `tests/data/iodef/redaction/` match byte for byte, and every valid IODEF
//! document stays valid (per the validator) with no personal data left.

use std::fs;
use std::path::{Path, PathBuf};

use privacy_redactor::{GRANT, Outcome, transform};
use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use quick_xml::reader::NsReader;

fn corpus(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/iodef").join(dir)
}

fn files(dir: &str, suffix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(corpus(dir))
        .expect("corpus directory exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.to_str().is_some_and(|s| s.ends_with(suffix)))
        .collect();
    out.sort();
    out
}

/// Counts IODEF Email/Telephone/PostalAddress elements inside a Contact,
/// failing on anything not well-formed.
fn personal_elements(xml: &str) -> usize {
    let mut reader = NsReader::from_str(xml);
    let (mut stack, mut found) = (Vec::new(), 0);
    loop {
        let event = reader.read_event().expect("well-formed output");
        let (start, empty) = match &event {
            Event::Start(e) => (Some(e.clone()), false),
            Event::Empty(e) => (Some(e.clone()), true),
            Event::End(_) => {
                stack.pop();
                (None, false)
            }
            Event::Eof => break,
            _ => (None, false),
        };
        if let Some(e) = start {
            let (ns, local) = reader.resolver().resolve_element(e.name());
            let iodef = matches!(ns, ResolveResult::Bound(n) if n.into_inner() == "urn:ietf:params:xml:ns:iodef-2.0");
            let local = local.into_inner().to_owned();
            if iodef && stack.iter().any(|n| n == "Contact") && ["Email", "Telephone", "PostalAddress"].contains(&local.as_str()) {
                found += 1;
            }
            if !empty {
                stack.push(if iodef { local } else { String::new() });
            }
        }
    }
    assert!(stack.is_empty(), "unbalanced output");
    found
}

#[test]
fn each_redaction_pair_matches_its_expected_output_byte_for_byte() {
    let inputs = files("redaction", ".input.xml");
    assert!(inputs.len() >= 2);
    for input in inputs {
        let expected_path = PathBuf::from(input.to_string_lossy().replace(".input.xml", ".expected.xml"));
        let payload = fs::read(&input).expect("readable input");
        let expected = fs::read(&expected_path).expect("expected output exists");
        assert_eq!(transform(&[], &payload), Ok(Outcome::Rewritten(expected)), "{}", input.display());
        assert_eq!(transform(&[GRANT.to_owned()], &payload), Ok(Outcome::Unchanged));
    }
}

#[test]
fn every_valid_document_stays_valid_iodef_without_personal_data() {
    let mut rewritten = 0;
    for file in files("valid", ".xml") {
        let payload = fs::read(&file).expect("readable file");
        let original = String::from_utf8(payload.clone()).expect("UTF-8 corpus");
        match transform(&["publisher".to_owned()], &payload).expect("redactable") {
            Outcome::Unchanged => assert_eq!(personal_elements(&original), 0, "{}", file.display()),
            Outcome::Rewritten(out) => {
                rewritten += 1;
                let text = String::from_utf8(out).expect("UTF-8 output");
                assert!(personal_elements(&original) > 0);
                assert_eq!(personal_elements(&text), 0, "{}", file.display());
                assert_eq!(iodef_validator::validate(text.as_bytes()), Ok(()), "{}", file.display());
                assert!(text.len() < original.len());
            }
        }
    }
    assert!(rewritten >= 10, "only {rewritten} documents carried personal data");
}
