//! Runs the validator over the shared IODEF corpus in `tests/data/iodef/`:
//! every valid document is accepted, and every invalid one yields the
//! violation `invalid/EXPECTED.toml` names for it. Also checks the manifest.

use std::fs;
use std::path::{Path, PathBuf};

use iodef_validator::{MAX_VIOLATIONS, validate};

fn corpus(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/iodef").join(dir)
}

fn xml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(corpus(dir))
        .expect("corpus directory exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "xml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_valid_corpus_document_is_accepted() {
    let files = xml_files("valid");
    assert!(files.len() >= 32, "only {} valid documents", files.len());
    for file in files {
        let bytes = fs::read(&file).expect("readable file");
        assert_eq!(validate(&bytes), Ok(()), "{}", file.display());
    }
}

#[test]
fn every_invalid_corpus_document_yields_its_expected_violation() {
    let expected: toml::Table = fs::read_to_string(corpus("invalid").join("EXPECTED.toml"))
        .expect("EXPECTED.toml exists")
        .parse()
        .expect("EXPECTED.toml is TOML");
    let files = xml_files("invalid");
    assert!(files.len() >= 32, "only {} invalid documents", files.len());
    assert_eq!(files.len(), expected.len(), "one EXPECTED.toml entry per file");
    for file in files {
        let name = file.file_name().and_then(|n| n.to_str()).expect("UTF-8 name");
        let want = expected.get(name).unwrap_or_else(|| panic!("{name} has no EXPECTED.toml entry"));
        let location = want.get("location").and_then(|v| v.as_str()).expect("location string");
        let message = want.get("message").and_then(|v| v.as_str()).expect("message string");
        let bytes = fs::read(&file).expect("readable file");
        let violations = validate(&bytes).expect_err(name);
        assert!(violations.len() <= MAX_VIOLATIONS + 1, "{name}: cap not applied");
        assert!(
            violations.iter().any(|v| v.location == location && v.message.contains(message)),
            "{name}: want {location:?} ~ {message:?}, got {violations:#?}"
        );
    }
}

#[test]
fn the_manifest_uses_only_keys_the_host_accepts() {
    const ALLOWED: &[&str] = &[
        "description", "enabled", "order", "namespaces", "topics", "deadline_ms", "memory_mib",
        "max_output_kib", "grants", "subscriber_jid",
    ];
    let manifest: toml::Table = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("plugin.toml"))
        .expect("plugin.toml exists")
        .parse()
        .expect("plugin.toml is TOML");
    for key in manifest.keys() {
        assert!(ALLOWED.contains(&key.as_str()), "unknown manifest key {key}");
    }
    let namespaces = manifest.get("namespaces").and_then(|v| v.as_array()).expect("namespaces list");
    assert_eq!(namespaces.len(), 1);
    assert_eq!(namespaces[0].as_str(), Some("urn:ietf:params:xml:ns:iodef-2.0"));
}
