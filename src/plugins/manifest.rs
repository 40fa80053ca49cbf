//! A plugin's manifest (`NAME.toml` beside `NAME.wasm`): where it applies,
//! its order, and its sandbox limits, each with a unit and a bound.
//!
//! What it must not do: accept an unknown key (a typo would silently fall
//! back to a default) or a limit outside its bound.

use serde::Deserialize;

use super::PluginError;

/// Upper bound on `deadline_ms`: a validator holds its topic's validator
/// thread and a transformer the broker's thread for up to this long.
pub const MAX_DEADLINE_MS: u64 = 10_000;
/// Upper bound on `memory_mib`; also the pooling allocator's slot size.
pub const MAX_MEMORY_MIB: u32 = 256;
/// Upper bound on `max_output_kib` (16 MiB), above any sane item size.
pub const MAX_OUTPUT_KIB: u32 = 16 * 1024;

/// Parsed `NAME.toml`. Every key is optional.
///
/// ```toml
/// description = "Checks IODEF 2.0 documents"
/// order = 10                      # lower runs first; ties by name
/// namespaces = ["urn:ietf:params:xml:ns:iodef-2.0"]   # empty = any
/// topics = ["incidents", "incidents/*"]               # empty = any; * = any run of characters
/// deadline_ms = 50                # 1..=10000
/// memory_mib = 16                 # 1..=256
/// max_output_kib = 512            # 1..=16384
/// grants = ["read-personal-data"] # transformers: grants Cedar may give a subscriber
/// subscriber_jid = false          # transformers: pass the subscriber's JID
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Manifest {
    /// Free text for operators.
    pub description: String,
    /// A disabled plugin is still loaded and checked, but never applies.
    pub enabled: bool,
    /// Plugins of one kind run in ascending `order`, then by name.
    pub order: u32,
    /// Payload namespaces (the payload element's namespace) it applies to.
    pub namespaces: Vec<String>,
    /// Topic name globs it applies to.
    pub topics: Vec<String>,
    /// Wall-clock budget per call, instantiation included.
    pub deadline_ms: u64,
    /// Linear memory cap per call.
    pub memory_mib: u32,
    /// Cap on a rewritten payload, and on the total size of violations.
    pub max_output_kib: u32,
    /// Grants this transformer understands (checked by Cedar per subscriber).
    pub grants: Vec<String>,
    /// Whether the transformer receives the subscriber's JID; if not, the
    /// broker may reuse one result for subscribers with equal roles and grants.
    pub subscriber_jid: bool,
}

impl Default for Manifest {
    fn default() -> Self {
        Manifest {
            description: String::new(),
            enabled: true,
            order: 100,
            namespaces: Vec::new(),
            topics: Vec::new(),
            deadline_ms: 50,
            memory_mib: 16,
            max_output_kib: 512,
            grants: Vec::new(),
            subscriber_jid: false,
        }
    }
}

impl Manifest {
    /// Parses and bounds-checks manifest text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Manifest, PluginError> {
        let bad = |message: String| PluginError::Manifest {
            file: file.to_owned(),
            message,
        };
        let manifest: Manifest = toml::from_str(text).map_err(|e| bad(e.message().to_owned()))?;
        if !(1..=MAX_DEADLINE_MS).contains(&manifest.deadline_ms) {
            return Err(bad(format!(
                "deadline_ms = {} is outside 1..={MAX_DEADLINE_MS}",
                manifest.deadline_ms
            )));
        }
        if !(1..=MAX_MEMORY_MIB).contains(&manifest.memory_mib) {
            return Err(bad(format!(
                "memory_mib = {} is outside 1..={MAX_MEMORY_MIB}",
                manifest.memory_mib
            )));
        }
        if !(1..=MAX_OUTPUT_KIB).contains(&manifest.max_output_kib) {
            return Err(bad(format!(
                "max_output_kib = {} is outside 1..={MAX_OUTPUT_KIB}",
                manifest.max_output_kib
            )));
        }
        if let Some(empty) = manifest.topics.iter().position(|t| t.is_empty()) {
            return Err(bad(format!("topics[{empty}] is empty")));
        }
        Ok(manifest)
    }

    /// Whether the plugin applies to a payload of namespace `payload_ns` on
    /// topic `topic`. An empty list means any; a disabled plugin never applies.
    pub fn applies(&self, topic: &str, payload_ns: &str) -> bool {
        self.enabled
            && (self.namespaces.is_empty() || self.namespaces.iter().any(|n| n == payload_ns))
            && (self.topics.is_empty() || self.topics.iter().any(|g| glob_matches(g, topic)))
    }

    /// The output cap in bytes.
    pub fn max_output_bytes(&self) -> usize {
        self.max_output_kib as usize * 1024
    }
}

/// `*` matches any run of characters (including none and `/`); everything
/// else matches itself. Greedy with backtracking to the last star, so it is
/// linear in practice and never exponential.
fn glob_matches(glob: &str, text: &str) -> bool {
    let (g, t): (Vec<char>, Vec<char>) = (glob.chars().collect(), text.chars().collect());
    let (mut gi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if gi < g.len() && g[gi] == '*' {
            star = Some((gi, ti));
            gi += 1;
        } else if gi < g.len() && g[gi] == t[ti] {
            gi += 1;
            ti += 1;
        } else if let Some((sg, st)) = star {
            // Let the last star swallow one more character and retry.
            gi = sg + 1;
            ti = st + 1;
            star = Some((sg, st + 1));
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_manifest_gives_the_documented_defaults() {
        let m = Manifest::parse("", "x.toml").unwrap();
        assert!(m.enabled);
        assert_eq!(
            (m.order, m.deadline_ms, m.memory_mib, m.max_output_kib),
            (100, 50, 16, 512)
        );
        assert!(!m.subscriber_jid);
        assert_eq!(m, Manifest::default());
    }

    #[test]
    fn unknown_key_is_refused_with_its_name() {
        let err = Manifest::parse("deadline = 5\n", "x.toml").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("manifest x.toml: unknown field `deadline`"),
            "{text}"
        );
    }

    #[test]
    fn limits_out_of_bounds_are_refused() {
        for (toml, key) in [
            ("deadline_ms = 0", "deadline_ms"),
            ("deadline_ms = 10001", "deadline_ms"),
            ("memory_mib = 257", "memory_mib"),
            ("max_output_kib = 0", "max_output_kib"),
            ("topics = [\"\"]", "topics[0]"),
        ] {
            let text = Manifest::parse(toml, "m.toml").unwrap_err().to_string();
            assert!(text.contains(key), "{toml}: {text}");
        }
        assert_eq!(
            Manifest::parse("deadline_ms = 10000", "m")
                .unwrap()
                .deadline_ms,
            10_000
        );
    }

    #[test]
    fn wrong_type_is_refused() {
        assert!(Manifest::parse("order = \"first\"", "m").is_err());
    }

    #[test]
    fn globs_match_runs_of_characters() {
        assert!(glob_matches("incidents", "incidents"));
        assert!(!glob_matches("incidents", "incidents2"));
        assert!(glob_matches("incidents/*", "incidents/ddos/eu"));
        assert!(!glob_matches("incidents/*", "incidents"));
        assert!(glob_matches("*", ""));
        assert!(glob_matches("a*b*c", "axxbyyc"));
        assert!(!glob_matches("a*b*c", "axxbyy"));
        assert!(glob_matches("*-lease", "dhcp-lease"));
    }

    #[test]
    fn applies_checks_namespace_topic_and_enabled() {
        let mut m = Manifest::parse(
            "namespaces = [\"urn:ietf:params:xml:ns:iodef-2.0\"]\ntopics = [\"incidents*\"]",
            "m",
        )
        .unwrap();
        assert!(m.applies("incidents/eu", "urn:ietf:params:xml:ns:iodef-2.0"));
        assert!(!m.applies("incidents/eu", "urn:other"));
        assert!(!m.applies("leases", "urn:ietf:params:xml:ns:iodef-2.0"));
        m.enabled = false;
        assert!(!m.applies("incidents/eu", "urn:ietf:params:xml:ns:iodef-2.0"));
        assert!(Manifest::default().applies("anything", "urn:any"));
    }
}
