//! Hot reload of the plugin directory: notify events, debounced (~200 ms),
//! trigger a whole [`Host::reload`] on a thread of our own.
//!
//! What it must not do: compile on the debouncer's or the async runtime's
//! threads, react to work-in-progress files (`*.part`, dot files), or watch
//! the files themselves (an atomic rename replaces the inode; we watch the
//! directory).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use notify_debouncer_full::notify::event::{AccessKind, AccessMode, ModifyKind};
use notify_debouncer_full::notify::{Event, EventKind, RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};

use super::{Host, PluginError, Report};

/// How long the directory must be quiet before a reload.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Keeps the watch alive; dropping it stops watching and waits for a reload
/// in progress to finish.
pub struct Watcher {
    debouncer: Option<Debouncer<RecommendedWatcher, RecommendedCache>>,
    reloader: Option<JoinHandle<()>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // Stopping the debouncer drops its handler and so the channel's
        // sender, which ends the reload thread.
        if let Some(debouncer) = self.debouncer.take() {
            debouncer.stop();
        }
        if let Some(reloader) = self.reloader.take() {
            let _ = reloader.join();
        }
    }
}

/// Watches `dir` (not recursively) and reloads `host` from it after changes
/// to `*.wasm` or `*.toml` files, then calls `on_reload` with the report (to
/// log and audit). Does not reload at start: call [`Host::reload`] first.
pub fn watch(
    host: Arc<Host>,
    dir: PathBuf,
    on_reload: impl Fn(&Report) + Send + Sync + 'static,
) -> Result<Watcher, PluginError> {
    let watch_error = |e: notify_debouncer_full::notify::Error| PluginError::Watch {
        path: dir.clone(),
        message: e.to_string(),
    };
    let (wake, woken) = mpsc::channel::<()>();
    let mut debouncer = new_debouncer(DEBOUNCE, None, move |result: DebounceEventResult| {
        let relevant = match result {
            Ok(events) => events.iter().any(|e| is_relevant(e)),
            Err(errors) => {
                // Events may have been lost (queue overflow): rescan.
                for e in errors {
                    tracing::warn!("plugin directory watch: {e}");
                }
                true
            }
        };
        if relevant {
            // The reload thread only stops when this sender is dropped.
            let _ = wake.send(());
        }
    })
    .map_err(watch_error)?;
    debouncer
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(watch_error)?;
    let reloader = std::thread::Builder::new()
        .name("plugin-reload".into())
        .spawn(move || {
            while woken.recv().is_ok() {
                // One reload covers every change signalled so far.
                while woken.try_recv().is_ok() {}
                let report = host.reload(&dir);
                on_reload(&report);
            }
        })
        .map_err(|source| PluginError::Io {
            path: PathBuf::from("plugin-reload thread"),
            source,
        })?;
    Ok(Watcher {
        debouncer: Some(debouncer),
        reloader: Some(reloader),
    })
}

/// Directory events that may change the set: a file created, written
/// (data or close-after-write), renamed into or out of place, or removed.
fn is_relevant(event: &Event) -> bool {
    let kind = matches!(
        event.kind,
        EventKind::Create(_)
            | EventKind::Remove(_)
            | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Name(_) | ModifyKind::Any)
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
    );
    kind && event.paths.iter().any(|p| is_plugin_file(p))
}

fn is_plugin_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !name.starts_with('.') && (name.ends_with(".wasm") || name.ends_with(".toml"))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Instant;

    use super::*;
    use crate::plugins::fixtures::{TempDir, fixtures, shared_cache};
    use crate::plugins::{HostOptions, Kind, PluginSet};
    use notify_debouncer_full::notify::event::{CreateKind, RenameMode};

    /// Polls the current set until `done` holds; fails after 2 s, the
    /// promised bound on a change becoming visible.
    fn within_2s(host: &Host, what: &str, done: impl Fn(&PluginSet) -> bool) {
        let started = Instant::now();
        while !done(&host.current()) {
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "not seen within 2 s: {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{what}: {:?}", started.elapsed());
    }

    fn kind_of(set: &PluginSet, name: &str) -> Option<Kind> {
        set.plugins()
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.kind)
    }

    #[test]
    fn watched_directory_changes_are_applied_within_two_seconds() {
        let dir = TempDir::new("watch");
        let host = Host::new(HostOptions {
            cache_dir: Some(shared_cache()),
            ..HostOptions::default()
        })
        .unwrap();
        // Warm the compile cache so the timings measure the watch, not an
        // unoptimised cranelift.
        for bytes in [&fixtures().validator_core, &fixtures().transformer_core] {
            dir.deploy("warm.wasm", bytes);
            host.load_file(&dir.path().join("warm.wasm"), None).unwrap();
        }
        std::fs::remove_file(dir.path().join("warm.wasm")).unwrap();
        host.reload(dir.path());
        let reports: Arc<Mutex<Vec<Report>>> = Arc::default();
        let sink = Arc::clone(&reports);
        let watcher = watch(Arc::clone(&host), dir.path().to_owned(), move |r| {
            sink.lock().unwrap().push(r.clone());
        })
        .unwrap();

        dir.deploy("p.wasm", &fixtures().validator_core);
        within_2s(&host, "added", |set| {
            kind_of(set, "p") == Some(Kind::Validator)
        });

        dir.deploy("p.wasm", &fixtures().transformer_core);
        within_2s(&host, "replaced", |set| {
            kind_of(set, "p") == Some(Kind::Transformer)
        });

        // A plain (non-atomic) write of garbage: reported, previous kept.
        let seen = reports.lock().unwrap().len();
        std::fs::write(dir.path().join("p.wasm"), b"garbage").unwrap();
        within_2s(&host, "garbage reported", |_| {
            reports.lock().unwrap()[seen..]
                .iter()
                .any(|r| r.errors.iter().any(|(f, _)| f.ends_with("p.wasm")))
        });
        assert_eq!(kind_of(&host.current(), "p"), Some(Kind::Transformer));

        dir.deploy("p.wasm", &fixtures().validator_core);
        within_2s(&host, "repaired", |set| {
            kind_of(set, "p") == Some(Kind::Validator)
        });

        let seen = reports.lock().unwrap().len();
        dir.deploy("p.toml", b"deadline_ms = \"soon\"\n");
        within_2s(&host, "bad manifest reported", |_| {
            reports.lock().unwrap()[seen..]
                .iter()
                .any(|r| r.errors.iter().any(|(f, _)| f.ends_with("p.toml")))
        });
        assert_eq!(host.current().plugins()[0].manifest.deadline_ms, 50);

        dir.deploy("p.toml", b"deadline_ms = 70\n");
        within_2s(&host, "manifest fixed", |set| {
            set.plugins()
                .first()
                .is_some_and(|p| p.manifest.deadline_ms == 70)
        });

        // Uploads in progress are not looked at.
        let seen = reports.lock().unwrap().len();
        std::fs::write(dir.path().join("q.wasm.part"), b"garbage").unwrap();
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            reports.lock().unwrap().len(),
            seen,
            "a .part file triggered a reload"
        );

        std::fs::remove_file(dir.path().join("p.wasm")).unwrap();
        within_2s(&host, "removed", |set| set.is_empty());
        assert!(reports.lock().unwrap().iter().any(|r| r.removed == ["p"]));
        drop(watcher);
    }

    fn event(kind: EventKind, path: &str) -> Event {
        Event::new(kind).add_path(PathBuf::from(path))
    }

    #[test]
    fn plugin_files_are_relevant_and_uploads_are_not() {
        let create = EventKind::Create(CreateKind::File);
        assert!(is_relevant(&event(create, "/p/iodef.wasm")));
        assert!(is_relevant(&event(create, "/p/iodef.toml")));
        assert!(!is_relevant(&event(create, "/p/iodef.wasm.part")));
        assert!(!is_relevant(&event(create, "/p/.iodef.wasm")));
        assert!(!is_relevant(&event(create, "/p/readme.md")));
        assert!(is_relevant(&event(
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            "/p/a.wasm"
        )));
        assert!(!is_relevant(&event(
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            "/p/a.wasm"
        )));
    }
}
