//! Platforms, topics and their groups as Cedar entities.
//!
//! Platforms are prebuilt once per change of the account facts (one `Entity`
//! each, swapped whole by the authorizer); a topic entity is built per request
//! from what the broker knows (`authz::Topic`) and `policies/topics.toml`,
//! because topics come and go far more often than policies. Nothing here
//! decides anything.

use super::Topic;
use crate::store::Account;
use cedar_policy::{Entity, EntityId, EntityTypeName, EntityUid, RestrictedExpression};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::OnceLock;

/// What the policies know about a platform (from its account in the store).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlatformFacts {
    /// The localpart of its JID: `Grid::Platform::"<name>"`.
    pub name: String,
    /// `Grid::Role` groups.
    pub roles: Vec<String>,
    /// `Grid::Template` groups (functional templates, RFC 8600 §8.3.2).
    pub templates: Vec<String>,
    pub read_only: bool,
    pub revoked: bool,
    /// Organisation; "" when unknown.
    pub org: String,
}

impl PlatformFacts {
    pub fn from_account(name: &str, a: &Account) -> PlatformFacts {
        PlatformFacts {
            name: name.to_string(),
            roles: a.roles.clone(),
            templates: a.templates.clone(),
            read_only: a.read_only,
            revoked: a.revoked,
            org: String::new(),
        }
    }
}

/// The entity type names of the schema (namespace `Grid`).
pub(crate) struct Names {
    pub platform: EntityTypeName,
    pub role: EntityTypeName,
    pub template: EntityTypeName,
    pub topic: EntityTypeName,
    pub topic_kind: EntityTypeName,
    pub controller: EntityTypeName,
    pub action: EntityTypeName,
}

pub(crate) fn names() -> &'static Names {
    static N: OnceLock<Names> = OnceLock::new();
    N.get_or_init(|| {
        // Constant, valid type names: parsing cannot fail.
        let t = |s: &str| EntityTypeName::from_str(s).expect("valid entity type name");
        Names {
            platform: t("Grid::Platform"),
            role: t("Grid::Role"),
            template: t("Grid::Template"),
            topic: t("Grid::Topic"),
            topic_kind: t("Grid::TopicKind"),
            controller: t("Grid::Controller"),
            action: t("Grid::Action"),
        }
    })
}

pub(crate) fn uid(ty: &EntityTypeName, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(ty.clone(), EntityId::new(id))
}

/// A prebuilt platform: its entity, and the groups it is in (for the policy index).
#[derive(Clone)]
pub(crate) struct PlatformEntry {
    pub entity: Entity,
    pub groups: Vec<EntityUid>,
}

pub(crate) fn platform_entry(f: &PlatformFacts) -> PlatformEntry {
    let n = names();
    let mut groups: Vec<EntityUid> = f
        .roles
        .iter()
        .map(|r| uid(&n.role, r))
        .chain(f.templates.iter().map(|t| uid(&n.template, t)))
        .collect();
    // Each group once: the index evaluates one shard per group.
    groups.sort_by_key(|g| g.to_string());
    groups.dedup();
    let attrs = HashMap::from([
        ("read_only".to_string(), RestrictedExpression::new_bool(f.read_only)),
        ("revoked".to_string(), RestrictedExpression::new_bool(f.revoked)),
        ("org".to_string(), RestrictedExpression::new_string(f.org.clone())),
    ]);
    let parents: HashSet<EntityUid> = groups.iter().cloned().collect();
    let uid = uid(&n.platform, &f.name);
    // Literal attributes never fail to evaluate; keep the groups if they somehow did.
    let entity = Entity::new(uid.clone(), attrs, parents.clone()).unwrap_or_else(|_| Entity::new_no_attrs(uid, parents));
    PlatformEntry { entity, groups }
}

/// `policies/topics.toml`: kinds, tags and honeytokens of topics.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsFile {
    /// Topic names (or `prefix*`) that are decoys.
    #[serde(default)]
    pub honeytokens: Vec<String>,
    /// Payload type (pubsub#type) → topic kind.
    #[serde(default)]
    pub kinds: BTreeMap<String, String>,
    /// Topic name (or `prefix*`) → extra kinds and tags.
    #[serde(default)]
    pub topics: BTreeMap<String, TopicEntry>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicEntry {
    #[serde(default)]
    pub kinds: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// `name` matches `pattern`: equal, or `pattern` ends in `*` and `name` starts with the rest.
fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

impl TopicsFile {
    pub fn is_honeytoken(&self, name: &str) -> bool {
        self.honeytokens.iter().any(|p| matches(p, name))
    }

    /// The kinds and tags of a topic, each sorted and without duplicates.
    pub fn classify(&self, name: &str, payload_type: &str) -> (Vec<String>, Vec<String>) {
        let mut kinds: Vec<String> = self.kinds.get(payload_type).cloned().into_iter().collect();
        let mut tags = Vec::new();
        for (pattern, e) in &self.topics {
            if matches(pattern, name) {
                kinds.extend(e.kinds.iter().cloned());
                tags.extend(e.tags.iter().cloned());
            }
        }
        kinds.sort();
        kinds.dedup();
        tags.sort();
        tags.dedup();
        (kinds, tags)
    }

    /// The topic's entity for one request.
    pub(crate) fn topic_entity(&self, t: &Topic<'_>) -> Result<Entity, String> {
        let n = names();
        let (kinds, tags) = self.classify(t.name, t.payload_type);
        let mut attrs = HashMap::from([
            ("payload_type".to_string(), RestrictedExpression::new_string(t.payload_type.to_string())),
            ("tags".to_string(), RestrictedExpression::new_set(tags.into_iter().map(RestrictedExpression::new_string))),
            ("honeytoken".to_string(), RestrictedExpression::new_bool(self.is_honeytoken(t.name))),
        ]);
        if let Some(owner) = t.owner.and_then(|o| o.local()) {
            attrs.insert("owner".into(), RestrictedExpression::new_entity_uid(uid(&n.platform, owner)));
        }
        let parents = kinds.iter().map(|k| uid(&n.topic_kind, k)).collect();
        Entity::new(uid(&n.topic, t.name), attrs, parents).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_classified_by_payload_type_and_name_patterns() {
        let f: TopicsFile = toml::from_str(
            r#"
            honeytokens = ["decoy-*", "vault"]
            [kinds]
            "urn:ietf:params:xml:ns:iodef-2.0" = "incident"
            [topics."hr-*"]
            tags = ["pii"]
            kinds = ["hr"]
            "#,
        )
        .unwrap();
        assert_eq!(
            f.classify("hr-incidents", "urn:ietf:params:xml:ns:iodef-2.0"),
            (vec!["hr".into(), "incident".into()], vec!["pii".into()])
        );
        assert_eq!(f.classify("other", ""), (vec![], vec![]));
        assert!(f.is_honeytoken("decoy-1") && f.is_honeytoken("vault") && !f.is_honeytoken("vault2"));
    }
}
