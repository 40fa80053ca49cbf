//! The RFC 7970 schema as data: per-element content models, required and
//! enumerated attributes, and which elements hold an xs:dateTime. The tables
//! themselves are generated into `schema_tables.rs`; this module only defines
//! their shape and the lookups. It must not hold validation logic.

use std::borrow::Cow;

use crate::schema_tables::{BY_HASH, ELEMENTS, NAME_HASH_BITS, NAME_HASH_SEED};

/// The IODEF 2.0 namespace (RFC 7970 §8).
pub const IODEF_NS: &str = "urn:ietf:params:xml:ns:iodef-2.0";

/// The only `version` RFC 7970 §3.1 allows on `IODEF-Document`.
pub const IODEF_VERSION: &str = "2.00";

/// Foreign namespaces the schema references by prefix in content models
/// (`sci:AttackPattern`, `ds:Signature`, `enum:ReferenceName`).
const FOREIGN_PREFIXES: &[(&str, &str)] = &[
    ("urn:ietf:params:xml:ns:iodef-sci-1.0", "sci"),
    ("http://www.w3.org/2000/09/xmldsig#", "ds"),
    ("urn:ietf:params:xml:ns:iodef-enum-1.0", "enum"),
];

/// One particle of a sequence: an element, or an element-only choice.
#[derive(Debug)]
pub(crate) struct Slot {
    /// Element names accepted in this position (several for a choice).
    pub names: &'static [&'static str],
    /// minOccurs.
    pub min: u32,
    /// maxOccurs; `None` is unbounded.
    pub max: Option<u32>,
}

/// What the schema says about one global element.
#[derive(Debug)]
pub(crate) struct ElementRule {
    /// Local name in the IODEF namespace.
    pub name: &'static str,
    /// The content model, in order; `Some(&[])` is text-only content and
    /// `None` content the tables do not check (xs:any, mixed).
    pub children: Option<&'static [Slot]>,
    /// Attributes with `use="required"`.
    pub required_attrs: &'static [&'static str],
    /// Attributes whose type is an enumeration, with the allowed values.
    pub enum_attrs: &'static [(&'static str, &'static [&'static str])],
    /// Whether the text content is an xs:dateTime.
    pub date_time: bool,
}

/// Looks up the rule for an IODEF element by local name. It runs for every
/// element, so it hashes the name once and compares a single string.
pub(crate) fn rule(name: &str) -> Option<&'static ElementRule> {
    let entry = *BY_HASH.get(name_hash(name))?;
    let r = ELEMENTS.get(usize::from(entry).checked_sub(1)?)?;
    (r.name == name).then_some(r)
}

/// FNV-1a of `name` from `NAME_HASH_SEED`, keeping the top `NAME_HASH_BITS`
/// bits; `tools/gen_tables.py` chose the seed so that no two element names
/// collide (and computes the same function, which must stay in step).
fn name_hash(name: &str) -> usize {
    let h = name.bytes().fold(NAME_HASH_SEED, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    (h >> (32 - NAME_HASH_BITS)) as usize
}

/// The name a child element has in content models: the local name for the
/// IODEF namespace, `prefix:local` for the referenced foreign namespaces, and
/// `{ns}local` (matching nothing) otherwise.
/// Borrows `local` in the common IODEF case, so that costs no allocation.
pub(crate) fn model_name<'a>(ns: Option<&str>, local: &'a str) -> Cow<'a, str> {
    match ns {
        Some(IODEF_NS) => Cow::Borrowed(local),
        Some(other) => Cow::Owned(match FOREIGN_PREFIXES.iter().find(|(uri, _)| *uri == other) {
            Some((_, prefix)) => format!("{prefix}:{local}"),
            None => format!("{{{other}}}{local}"),
        }),
        None => Cow::Owned(format!("{{}}{local}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_hash_finds_every_element_and_nothing_else() {
        for pair in ELEMENTS.windows(2) {
            assert!(pair[0].name < pair[1].name, "{} >= {}", pair[0].name, pair[1].name);
        }
        for r in ELEMENTS {
            assert_eq!(rule(r.name).map(|found| found.name), Some(r.name));
        }
        for other in ["", "Incidents", "incident", "sci:AttackPattern", "IODEF-Document "] {
            assert!(rule(other).is_none(), "{other}");
        }
    }

    #[test]
    fn incident_requires_purpose_and_orders_incident_id_first() {
        let incident = rule("Incident").expect("Incident is in the schema");
        assert_eq!(incident.required_attrs, &["purpose"]);
        let slots = incident.children.expect("Incident has a sequence");
        assert_eq!(slots[0].names, &["IncidentID"]);
        assert_eq!(slots[0].min, 1);
    }

    #[test]
    fn foreign_children_get_the_prefix_the_schema_uses() {
        assert_eq!(model_name(Some("urn:ietf:params:xml:ns:iodef-sci-1.0"), "AttackPattern"), "sci:AttackPattern");
        assert_eq!(model_name(Some(IODEF_NS), "Contact"), "Contact");
        assert_eq!(model_name(None, "Contact"), "{}Contact");
    }
}
