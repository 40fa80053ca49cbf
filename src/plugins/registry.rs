//! Which plugins exist and which apply: the immutable [`PluginSet`] snapshot
//! and the directory scan that builds the next one.
//!
//! What it must not do: half-apply a reload (a set is built whole, then
//! swapped by the host), or drop a working plugin because its new file is
//! broken (the previous version stays, and the error is reported).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::host::{self, Host, Plugin};
use super::{Kind, Manifest};

/// An immutable snapshot of the loaded plugins, sorted by (order, name).
#[derive(Debug, Default)]
pub struct PluginSet {
    plugins: Vec<Arc<Plugin>>,
}

impl PluginSet {
    pub(super) fn new(mut plugins: Vec<Arc<Plugin>>) -> PluginSet {
        plugins.sort_by(|a, b| (a.manifest.order, &a.name).cmp(&(b.manifest.order, &b.name)));
        PluginSet { plugins }
    }

    /// The validators to run, in order, for a payload of namespace
    /// `payload_ns` published on `topic`.
    pub fn validators(&self, topic: &str, payload_ns: &str) -> Vec<Arc<Plugin>> {
        self.matching(Kind::Validator, topic, payload_ns)
    }

    /// The transformers to run, in order, before delivering such a payload.
    pub fn transformers(&self, topic: &str, payload_ns: &str) -> Vec<Arc<Plugin>> {
        self.matching(Kind::Transformer, topic, payload_ns)
    }

    /// Every plugin, disabled ones included, in order.
    pub fn plugins(&self) -> &[Arc<Plugin>] {
        &self.plugins
    }

    /// Whether there is no plugin at all (the broker can skip the blocking hop).
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }

    fn matching(&self, kind: Kind, topic: &str, payload_ns: &str) -> Vec<Arc<Plugin>> {
        self.plugins
            .iter()
            .filter(|p| p.kind == kind && p.applies(topic, payload_ns))
            .cloned()
            .collect()
    }

    fn get(&self, name: &str) -> Option<&Arc<Plugin>> {
        self.plugins.iter().find(|p| p.name == name)
    }
}

/// The outcome of a reload or check, for the log, the audit and `check`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Plugins in the resulting set that loaded cleanly (unchanged ones and
    /// built-ins included), sorted by name.
    pub loaded: Vec<String>,
    /// Plugins of the previous set that are gone (their file was removed).
    pub removed: Vec<String>,
    /// (file, error) for every file that failed; its plugin keeps its
    /// previous version, if it had one.
    pub errors: Vec<(String, String)>,
    /// (file, note) for files that are not plugins but look related, e.g. a
    /// manifest without its `.wasm` (a deploy in progress, or a source tree).
    pub notes: Vec<(String, String)>,
}

impl Report {
    /// True when no file failed.
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "plugins loaded: [{}]", self.loaded.join(", "))?;
        if !self.removed.is_empty() {
            write!(f, "; removed: [{}]", self.removed.join(", "))?;
        }
        for (file, error) in &self.errors {
            write!(f, "; {file}: {error}")?;
        }
        Ok(())
    }
}

/// The plugin name of `NAME.wasm`: letters, digits, '-', '_' and '.', not
/// starting with '.'. `None` for any other file.
pub(super) fn plugin_name(path: &Path) -> Option<String> {
    if path.extension()? != "wasm" {
        return None;
    }
    let stem = path.file_stem()?.to_str()?;
    let valid = !stem.is_empty()
        && !stem.starts_with('.')
        && stem
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    valid.then(|| stem.to_owned())
}

/// Builds the next set from the built-ins and `dir`. Returns `None` for the
/// set when the directory itself cannot be read (keep everything).
pub(super) fn scan(host: &Host, dir: &Path, previous: &PluginSet) -> (Option<PluginSet>, Report) {
    let mut report = Report::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            report
                .errors
                .push((dir.display().to_string(), e.to_string()));
            return (None, report);
        }
    };
    let mut wasm: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut toml: BTreeMap<String, PathBuf> = BTreeMap::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        // Hidden files and `.part` uploads are work in progress (deploy by
        // copying to NAME.wasm.part, then renaming).
        if file_name.starts_with('.') || file_name.ends_with(".part") || !path.is_file() {
            continue;
        }
        match path.extension().and_then(|e| e.to_str()) {
            Some("wasm") => match plugin_name(&path) {
                Some(name) => {
                    wasm.insert(name, path);
                }
                None => report.errors.push((
                    path.display().to_string(),
                    "ignored: a plugin name is made of letters, digits, '-', '_' or '.'".into(),
                )),
            },
            Some("toml") => {
                if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                    toml.insert(stem.to_owned(), path);
                }
            }
            _ => {}
        }
    }
    for (name, path) in &toml {
        if !wasm.contains_key(name) {
            report.notes.push((
                path.display().to_string(),
                format!("ignored: no {name}.wasm beside it"),
            ));
        }
    }

    let mut next: BTreeMap<String, Arc<Plugin>> = host
        .builtins()
        .iter()
        .map(|p| (p.name.clone(), Arc::clone(p)))
        .collect();
    let mut kept = Vec::new();
    for (name, wasm_path) in &wasm {
        let manifest_path = toml.get(name);
        let loaded = (|| {
            let manifest = match manifest_path {
                Some(path) => {
                    Manifest::parse(&host::read_to_string(path)?, &path.display().to_string())?
                }
                None => Manifest::default(),
            };
            let bytes = host::read(wasm_path)?;
            host.load_or_reuse(
                name,
                &bytes,
                manifest,
                wasm_path.display().to_string(),
                previous.get(name),
            )
        })();
        match loaded {
            Ok(plugin) => {
                next.insert(name.clone(), plugin);
            }
            Err(e) => {
                // Blame the manifest when it is the manifest that failed.
                let file = match (&e, manifest_path) {
                    (super::PluginError::Manifest { .. }, Some(path)) => path,
                    _ => wasm_path,
                };
                tracing::warn!(plugin = %name, file = %file.display(), "plugin not (re)loaded: {e}");
                report
                    .errors
                    .push((file.display().to_string(), e.to_string()));
                if let Some(prev) = previous.get(name) {
                    next.insert(name.clone(), Arc::clone(prev));
                    kept.push(name.clone());
                }
            }
        }
    }
    report.loaded = next.keys().filter(|n| !kept.contains(n)).cloned().collect();
    report.removed = previous
        .plugins()
        .iter()
        .filter(|p| !next.contains_key(&p.name))
        .map(|p| p.name.clone())
        .collect();
    report.removed.sort();
    (Some(PluginSet::new(next.into_values().collect())), report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::fixtures::{TempDir, fixtures, shared_cache};
    use crate::plugins::{Builtin, HostOptions, PublisherInfo, TopicInfo, Verdict};

    fn host_with_builtin() -> Arc<Host> {
        Host::new(HostOptions {
            cache_dir: Some(shared_cache()),
            builtins: vec![Builtin {
                name: "base",
                wasm: &fixtures().validator_core,
                manifest: "order = 5",
            }],
            use_builtins: true,
        })
        .unwrap()
    }

    fn names(set: &PluginSet) -> Vec<(String, String)> {
        set.plugins()
            .iter()
            .map(|p| (p.name.clone(), p.origin.clone()))
            .collect()
    }

    fn accepts(plugin: &Plugin, payload: &str) -> bool {
        let topic = TopicInfo {
            name: "t".into(),
            payload_type: None,
            owner: "o@x".into(),
        };
        let publisher = PublisherInfo {
            jid: "p@x".into(),
            roles: vec![],
            templates: vec![],
        };
        plugin
            .validate(&topic, &publisher, payload.as_bytes())
            .unwrap()
            == Verdict::Accept
    }

    #[test]
    fn reload_sorts_by_order_then_name_and_filters_by_kind_and_scope() {
        let dir = TempDir::new("sorted");
        dir.deploy("zeta.wasm", &fixtures().validator_core);
        dir.deploy("zeta.toml", b"order = 1\n");
        dir.deploy("alpha.wasm", &fixtures().validator_core);
        dir.deploy("redact.wasm", &fixtures().transformer_core);
        dir.deploy("redact.toml", b"topics = [\"incidents/*\"]\n");
        dir.deploy("notes.txt", b"ignored");
        dir.deploy("half.wasm.part", b"ignored");
        let host = host_with_builtin();
        let report = host.reload(dir.path());
        assert!(report.is_ok(), "{report}");
        assert_eq!(report.loaded, ["alpha", "base", "redact", "zeta"]);
        let set = host.current();
        let order: Vec<_> = set.plugins().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(order, ["zeta", "base", "alpha", "redact"]);
        let validators: Vec<_> = set
            .validators("x", "urn:a")
            .iter()
            .map(|p| p.name.clone())
            .collect();
        assert_eq!(validators, ["zeta", "base", "alpha"]);
        assert!(set.transformers("leases", "urn:a").is_empty());
        assert_eq!(set.transformers("incidents/eu", "urn:a").len(), 1);
    }

    #[test]
    fn dir_plugin_overrides_a_builtin_and_its_removal_restores_it() {
        let dir = TempDir::new("override");
        let host = host_with_builtin();
        assert_eq!(
            names(&host.current()),
            [("base".to_owned(), "built-in".to_owned())]
        );
        dir.deploy("base.wasm", &fixtures().transformer_core);
        host.reload(dir.path());
        let set = host.current();
        assert_eq!(set.plugins().len(), 1);
        assert_eq!(
            (
                set.plugins()[0].kind,
                set.plugins()[0].origin.ends_with("base.wasm")
            ),
            (Kind::Transformer, true)
        );
        std::fs::remove_file(dir.path().join("base.wasm")).unwrap();
        let report = host.reload(dir.path());
        assert_eq!(
            names(&host.current()),
            [("base".to_owned(), "built-in".to_owned())]
        );
        assert!(
            report.removed.is_empty(),
            "the name is still there: {report}"
        );
    }

    #[test]
    fn broken_file_keeps_the_previous_version_and_is_reported() {
        let dir = TempDir::new("broken");
        let host = host_with_builtin();
        dir.deploy("v.wasm", &fixtures().validator_core);
        host.reload(dir.path());
        let before = Arc::clone(&host.current().plugins()[1]);
        dir.deploy("v.wasm", &fixtures().validator_core[..100]);
        dir.deploy("new.wasm", b"garbage");
        let report = host.reload(dir.path());
        assert_eq!(report.loaded, ["base"]);
        assert_eq!(report.errors.len(), 2, "{report}");
        assert!(
            report.errors[0].0.ends_with("new.wasm")
                && report.errors[0].1.contains("not a WebAssembly")
        );
        assert!(
            report.errors[1].0.ends_with("v.wasm")
                && report.errors[1].1.starts_with("cannot load plugin \"v\"")
        );
        let set = host.current();
        assert_eq!(set.plugins().len(), 2, "new.wasm never loaded, v kept");
        assert!(Arc::ptr_eq(&set.plugins()[1], &before));
        assert!(accepts(&set.plugins()[1], "fine"));
    }

    #[test]
    fn bad_manifest_keeps_the_previous_version_and_blames_the_manifest() {
        let dir = TempDir::new("manifest");
        let host = host_with_builtin();
        dir.deploy("v.wasm", &fixtures().validator_core);
        dir.deploy("v.toml", b"deadline_ms = 30\n");
        host.reload(dir.path());
        dir.deploy("v.toml", b"deadline_ms = 30\ncolour = \"red\"\n");
        let report = host.reload(dir.path());
        assert_eq!(report.errors.len(), 1, "{report}");
        assert!(report.errors[0].0.ends_with("v.toml"));
        assert!(
            report.errors[0].1.contains("unknown field `colour`"),
            "{report}"
        );
        let set = host.current();
        let v = set.plugins().iter().find(|p| p.name == "v").unwrap();
        assert_eq!(v.manifest.deadline_ms, 30);
    }

    #[test]
    fn removed_file_removes_its_plugin_and_unchanged_files_are_reused() {
        let dir = TempDir::new("removed");
        let host = host_with_builtin();
        dir.deploy("a.wasm", &fixtures().validator_core);
        dir.deploy("b.wasm", &fixtures().validator_core);
        host.reload(dir.path());
        let a = Arc::clone(
            host.current()
                .plugins()
                .iter()
                .find(|p| p.name == "a")
                .unwrap(),
        );
        std::fs::remove_file(dir.path().join("b.wasm")).unwrap();
        let report = host.reload(dir.path());
        assert_eq!(report.removed, ["b"]);
        assert_eq!(report.loaded, ["a", "base"]);
        assert!(Arc::ptr_eq(
            host.current()
                .plugins()
                .iter()
                .find(|p| p.name == "a")
                .unwrap(),
            &a
        ));
    }

    #[test]
    fn check_dir_reports_without_swapping() {
        let dir = TempDir::new("check");
        let host = host_with_builtin();
        dir.deploy("v.wasm", &fixtures().validator_core);
        dir.deploy("orphan.toml", b"");
        let report = host.check_dir(dir.path());
        assert_eq!(report.loaded, ["base", "v"]);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.notes.len(), 1);
        assert!(report.notes[0].1.contains("no orphan.wasm beside it"));
        assert_eq!(host.current().plugins().len(), 1, "check must not swap");
    }

    #[test]
    fn unreadable_dir_keeps_the_current_set() {
        let host = host_with_builtin();
        let report = host.reload(Path::new("/nonexistent/xg-plugins"));
        assert_eq!(report.errors.len(), 1);
        assert_eq!(host.current().plugins().len(), 1);
    }
}
