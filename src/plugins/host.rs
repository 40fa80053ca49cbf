//! The wasmtime side of plugins: one process-wide engine, loading (core
//! module → component, precompiled cache, pre-linking), and calls in a fresh
//! store with a deadline and a memory cap.
//!
//! What it must not do: link any import (a guest gets traps for every import,
//! WASI included), reuse a store across calls (a trapped instance is poisoned,
//! and payloads of different platforms must not share guest state), or
//! deserialize a `.cwasm` it did not write itself.

use std::borrow::Cow;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use wasmtime::component::{Component, Linker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolConcurrencyLimitError, PoolingAllocationConfig,
    ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder, Trap,
};

use super::manifest::{MAX_MEMORY_MIB, Manifest};
use super::registry::{self, PluginSet, Report};
use super::{
    Builtin, Kind, PluginError, PublisherInfo, SubscriberInfo, TopicInfo, Transformed, Verdict,
    Violation,
};

/// Bindings generated from the contract, one module per world (each world
/// gets its own copy of the `types` records).
mod bindings {
    pub mod validator {
        wasmtime::component::bindgen!({ world: "validator", path: "wit" });
    }
    pub mod transformer {
        wasmtime::component::bindgen!({ world: "transformer", path: "wit" });
    }
}
use bindings::transformer::{TransformerPre, xmpp_grid::plugin::types as tt};
use bindings::validator::{ValidatorPre, xmpp_grid::plugin::types as vt};

/// Concurrent plugin calls the pooling allocator has slots for. Calls run on
/// blocking threads; more than this at once get `PluginError::Busy`.
const POOL_INSTANCES: u32 = 256;
/// Epoch ticker period: deadlines are counted in these ticks (rounded up),
/// so they hold to within one tick. 5 ms keeps the ticker's wake-ups while
/// plugins run at 200 a second.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Bytes counted per violation on top of its strings (two (ptr, len) pairs
/// in the canonical ABI), so a flood of empty violations is capped too.
const VIOLATION_OVERHEAD: usize = 16;

/// Options for [`Host::new`].
#[derive(Clone, Debug, Default)]
pub struct HostOptions {
    /// Where precompiled `.cwasm` files are kept; `None` compiles in memory
    /// on every load (~60 ms per plugin).
    pub cache_dir: Option<PathBuf>,
    /// Plugins compiled into the binary.
    pub builtins: Vec<Builtin>,
    /// Whether `builtins` are loaded at all.
    pub use_builtins: bool,
}

/// A loaded, pre-linked plugin. Immutable; calls are independent.
pub struct Plugin {
    /// From the file name (`NAME.wasm`) or the built-in's name.
    pub name: String,
    /// Which world it implements.
    pub kind: Kind,
    /// Its manifest (defaults if it has none).
    pub manifest: Manifest,
    /// "built-in", or the path of the `.wasm` file.
    pub origin: String,
    /// Hex SHA-256 of the bytes it was loaded from.
    pub sha256: String,
    engine: Engine,
    pre: Pre,
}

/// Instantiation prepared once per plugin: type-checked and linked.
enum Pre {
    Validator(ValidatorPre<CallState>),
    Transformer(TransformerPre<CallState>),
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("origin", &self.origin)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

/// Per-call store data: only the resource limiter.
struct CallState {
    limits: CallLimits,
}

/// `StoreLimits` (memory cap, trap on a refused grow) that also remembers a
/// refusal, so the call's error is reported as out of memory whatever the
/// guest did next (trap, abort, or its allocator's own `unreachable`).
struct CallLimits {
    inner: StoreLimits,
    memory_refused: bool,
}

impl ResourceLimiter for CallLimits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let verdict = self.inner.memory_growing(current, desired, maximum);
        if !matches!(verdict, Ok(true)) {
            self.memory_refused = true;
        }
        verdict
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

impl Plugin {
    /// Whether this plugin applies to a payload of namespace `payload_ns` on
    /// `topic` (empty manifest lists mean any; disabled never applies).
    pub fn applies(&self, topic: &str, payload_ns: &str) -> bool {
        self.manifest.applies(topic, payload_ns)
    }

    /// Runs `validate` in a fresh store. Blocking: call it from a blocking
    /// thread. `Err` is a sandbox failure (trap, deadline, memory, output cap),
    /// which the broker treats as a rejection.
    pub fn validate(
        &self,
        topic: &TopicInfo,
        publisher: &PublisherInfo,
        payload: &[u8],
    ) -> Result<Verdict, PluginError> {
        let Pre::Validator(pre) = &self.pre else {
            return Err(self.wrong_kind(Kind::Validator));
        };
        let topic = vt::TopicInfo {
            name: topic.name.clone(),
            payload_type: topic.payload_type.clone(),
            owner: topic.owner.clone(),
        };
        let publisher = vt::PublisherInfo {
            jid: publisher.jid.clone(),
            roles: publisher.roles.clone(),
            templates: publisher.templates.clone(),
        };
        let mut store = self.store();
        let _ticking = Ticking::start();
        let outcome = pre
            .instantiate(&mut store)
            .and_then(|guest| guest.call_validate(&mut store, &topic, &publisher, payload));
        match outcome {
            Ok(Ok(())) => Ok(Verdict::Accept),
            Ok(Err(violations)) => {
                let len: usize = violations
                    .iter()
                    .map(|v| v.location.len() + v.message.len() + VIOLATION_OVERHEAD)
                    .sum();
                self.check_output(len)?;
                Ok(Verdict::Reject(
                    violations
                        .into_iter()
                        .map(|v| Violation {
                            location: v.location,
                            message: v.message,
                        })
                        .collect(),
                ))
            }
            Err(err) => Err(self.call_error(err, &store)),
        }
    }

    /// Runs `transform` in a fresh store. Blocking. `Err` (including the
    /// plugin's own `Failed`) means: withhold the item from this subscriber
    /// and audit it.
    pub fn transform(
        &self,
        topic: &TopicInfo,
        subscriber: &SubscriberInfo,
        payload: &[u8],
    ) -> Result<Transformed, PluginError> {
        let Pre::Transformer(pre) = &self.pre else {
            return Err(self.wrong_kind(Kind::Transformer));
        };
        let topic = tt::TopicInfo {
            name: topic.name.clone(),
            payload_type: topic.payload_type.clone(),
            owner: topic.owner.clone(),
        };
        let subscriber = tt::SubscriberInfo {
            // The JID is withheld unless the manifest asks for it, so results
            // can be shared between subscribers with equal roles and grants.
            jid: subscriber
                .jid
                .clone()
                .filter(|_| self.manifest.subscriber_jid),
            roles: subscriber.roles.clone(),
            grants: subscriber.grants.clone(),
        };
        let mut store = self.store();
        let _ticking = Ticking::start();
        let outcome = pre
            .instantiate(&mut store)
            .and_then(|guest| guest.call_transform(&mut store, &topic, &subscriber, payload));
        match outcome {
            Ok(Ok(tt::Transformed::Unchanged)) => Ok(Transformed::Unchanged),
            Ok(Ok(tt::Transformed::Withhold)) => Ok(Transformed::Withhold),
            Ok(Ok(tt::Transformed::Rewritten(bytes))) => {
                self.check_output(bytes.len())?;
                Ok(Transformed::Rewritten(bytes))
            }
            Ok(Err(message)) => {
                self.check_output(message.len())?;
                Err(PluginError::Failed {
                    plugin: self.name.clone(),
                    message,
                })
            }
            Err(err) => Err(self.call_error(err, &store)),
        }
    }

    /// A fresh store with this plugin's limits. The deadline is set before
    /// instantiation, which otherwise traps at once (epoch deadline 0).
    fn store(&self) -> Store<CallState> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.manifest.memory_mib as usize * 1024 * 1024)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(
            &self.engine,
            CallState {
                limits: CallLimits {
                    inner: limits,
                    memory_refused: false,
                },
            },
        );
        store.limiter(|state| &mut state.limits);
        store.set_epoch_deadline(self.manifest.deadline_ms.div_ceil(EPOCH_TICK.as_millis() as u64).max(1));
        store
    }

    fn check_output(&self, len: usize) -> Result<(), PluginError> {
        let max = self.manifest.max_output_bytes();
        if len > max {
            return Err(PluginError::OutputTooLarge {
                plugin: self.name.clone(),
                len,
                max,
            });
        }
        Ok(())
    }

    /// Turns a wasmtime error from instantiate or call into an operator text.
    fn call_error(&self, err: wasmtime::Error, store: &Store<CallState>) -> PluginError {
        let plugin = self.name.clone();
        let trap = err.downcast_ref::<Trap>().copied();
        if trap == Some(Trap::Interrupt) {
            return PluginError::Timeout {
                plugin,
                deadline_ms: self.manifest.deadline_ms,
            };
        }
        if err.downcast_ref::<PoolConcurrencyLimitError>().is_some() {
            return PluginError::Busy { plugin };
        }
        if store.data().limits.memory_refused {
            return PluginError::OutOfMemory {
                plugin,
                limit_mib: self.manifest.memory_mib,
            };
        }
        let message = match trap {
            Some(trap) => trap.to_string(),
            // The outer context is a wasm backtrace; the root cause says
            // what happened (e.g. a WASI import called, which traps).
            None => err.root_cause().to_string(),
        };
        PluginError::Trap { plugin, message }
    }

    fn wrong_kind(&self, wanted: Kind) -> PluginError {
        PluginError::WrongKind {
            plugin: self.name.clone(),
            kind: self.kind,
            wanted,
        }
    }
}

/// Plugin calls in progress, and the ticker waiting for the first one. The
/// epoch ticks only while calls run: a ticker waking every millisecond for
/// nothing cost the whole server its tail latency (1,000 wake-ups a second
/// on two cores pushed the fan-out p99 from 4.8 ms to 15 ms).
static CALLS: Mutex<usize> = Mutex::new(0);
static CALLS_STARTED: Condvar = Condvar::new();

/// Keeps the epoch ticking while a call runs.
struct Ticking;

impl Ticking {
    fn start() -> Ticking {
        let mut n = CALLS.lock().unwrap_or_else(|p| p.into_inner());
        *n += 1;
        if *n == 1 {
            CALLS_STARTED.notify_one();
        }
        Ticking
    }

    /// Blocks the ticker while no call runs.
    fn wait_for_calls() {
        let mut n = CALLS.lock().unwrap_or_else(|p| p.into_inner());
        while *n == 0 {
            n = CALLS_STARTED.wait(n).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for Ticking {
    fn drop(&mut self) {
        let mut n = CALLS.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
    }
}

/// The process-wide engine; a config error is kept as text so every caller
/// sees it.
static ENGINE: OnceLock<Result<Engine, String>> = OnceLock::new();

fn engine() -> Result<Engine, PluginError> {
    ENGINE
        .get_or_init(|| build_engine().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(PluginError::Engine)
}

fn build_engine() -> wasmtime::Result<Engine> {
    let mut pool = PoolingAllocationConfig::default();
    // Components made from Rust guests use one core instance and memory;
    // wasip2 ones a few more. Slots reserve address space, not RAM.
    pool.total_component_instances(POOL_INSTANCES)
        .total_core_instances(POOL_INSTANCES * 4)
        .total_memories(POOL_INSTANCES * 2)
        .total_tables(POOL_INSTANCES * 2)
        .max_memory_size(MAX_MEMORY_MIB as usize * 1024 * 1024);
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .parallel_compilation(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    let engine = Engine::new(&config)?;
    let weak = engine.weak();
    // The ticker ends when the last engine clone is gone; with the static
    // engine that is never, which is what the process needs.
    std::thread::Builder::new()
        .name("wasm-epoch".into())
        .spawn(move || {
            // A tick is a full period after a call began, never at its start.
            loop {
                Ticking::wait_for_calls();
                std::thread::sleep(EPOCH_TICK);
                let Some(engine) = weak.upgrade() else { break };
                engine.increment_epoch();
            }
        })?;
    Ok(engine)
}

/// Loads plugins and holds the current [`PluginSet`].
pub struct Host {
    engine: Engine,
    cache_dir: Option<PathBuf>,
    builtins: Vec<Arc<Plugin>>,
    current: ArcSwap<PluginSet>,
    /// Serialises reloads (the watcher and an admin command may race), so a
    /// slower reload never swaps in an older view of the directory.
    reloading: Mutex<()>,
}

impl Host {
    /// Creates the host (engine on first use, cache directory) and loads the
    /// built-ins, which must load: a broken built-in is a build bug.
    pub fn new(opts: HostOptions) -> Result<Arc<Host>, PluginError> {
        let engine = engine()?;
        if let Some(dir) = &opts.cache_dir {
            fs::create_dir_all(dir).map_err(|source| PluginError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        let mut host = Host {
            engine,
            cache_dir: opts.cache_dir,
            builtins: Vec::new(),
            current: ArcSwap::from_pointee(PluginSet::default()),
            reloading: Mutex::new(()),
        };
        if opts.use_builtins {
            for builtin in &opts.builtins {
                let manifest =
                    Manifest::parse(builtin.manifest, &format!("{} (built-in)", builtin.name))?;
                let plugin =
                    host.load_bytes(builtin.name, builtin.wasm, manifest, "built-in".into())?;
                host.builtins.push(Arc::new(plugin));
            }
        }
        host.current
            .store(Arc::new(PluginSet::new(host.builtins.clone())));
        Ok(Arc::new(host))
    }

    /// The current plugin set; hold it for the whole publish or delivery.
    pub fn current(&self) -> Arc<PluginSet> {
        self.current.load_full()
    }

    /// Reloads built-ins plus every `NAME.wasm` (with optional `NAME.toml`)
    /// directly in `dir` and swaps the set. A file that fails keeps its
    /// plugin's previous version; an unreadable directory keeps everything.
    /// Blocking (compiles): run it on a blocking thread.
    pub fn reload(&self, dir: &Path) -> Report {
        // A poisoned lock only means an earlier reload panicked; the set it
        // guards is an ArcSwap, always whole, so carry on.
        let _guard = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let previous = self.current();
        let (set, report) = registry::scan(self, dir, &previous);
        if let Some(set) = set {
            self.prune_cache(&set);
            self.current.store(Arc::new(set));
        }
        report
    }

    /// Removes compiled files of plugins no longer in `set` (replaced or
    /// removed), so the cache does not grow with every deployment. A file
    /// still mapped by an in-flight call stays readable until it is unmapped.
    fn prune_cache(&self, set: &PluginSet) {
        let Some(dir) = &self.cache_dir else { return };
        let Ok(entries) = fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let used = set.plugins().iter().any(|p| name.starts_with(&format!("{}-", p.sha256)));
            if name.ends_with(".cwasm") && !used {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// The same checks as [`Host::reload`] without swapping: for `check`.
    pub fn check_dir(&self, dir: &Path) -> Report {
        registry::scan(self, dir, &self.current()).1
    }

    /// Loads one file, outside any set: for `plugin run`. The name is the
    /// file stem; without a manifest the defaults apply.
    pub fn load_file(
        &self,
        wasm: &Path,
        manifest: Option<&Path>,
    ) -> Result<Arc<Plugin>, PluginError> {
        let name = registry::plugin_name(wasm).ok_or_else(|| PluginError::Load {
            plugin: wasm.display().to_string(),
            message:
                "the file name must be NAME.wasm, NAME made of letters, digits, '-', '_' or '.'"
                    .into(),
        })?;
        let manifest = match manifest {
            Some(path) => Manifest::parse(&read_to_string(path)?, &path.display().to_string())?,
            None => Manifest::default(),
        };
        let bytes = read(wasm)?;
        Ok(Arc::new(self.load_bytes(
            &name,
            &bytes,
            manifest,
            wasm.display().to_string(),
        )?))
    }

    pub(super) fn builtins(&self) -> &[Arc<Plugin>] {
        &self.builtins
    }

    /// Loads `bytes`, reusing `previous` when neither the bytes nor the
    /// manifest changed (no recompile, no new `InstancePre`).
    pub(super) fn load_or_reuse(
        &self,
        name: &str,
        bytes: &[u8],
        manifest: Manifest,
        origin: String,
        previous: Option<&Arc<Plugin>>,
    ) -> Result<Arc<Plugin>, PluginError> {
        let sha256 = sha256_hex(bytes);
        if let Some(prev) =
            previous.filter(|p| p.sha256 == sha256 && p.manifest == manifest && p.origin == origin)
        {
            return Ok(Arc::clone(prev));
        }
        self.load_bytes(name, bytes, manifest, origin).map(Arc::new)
    }

    fn load_bytes(
        &self,
        name: &str,
        bytes: &[u8],
        manifest: Manifest,
        origin: String,
    ) -> Result<Plugin, PluginError> {
        let load = |message: String| PluginError::Load {
            plugin: name.to_owned(),
            message,
        };
        let sha256 = sha256_hex(bytes);
        let component = self.compile(name, bytes, &sha256)?;
        let kind = kind_of(&self.engine, &component).map_err(load)?;
        let mut linker = Linker::<CallState>::new(&self.engine);
        // Nothing is granted: every import, WASI included, traps when called.
        linker
            .define_unknown_imports_as_traps(&component)
            .map_err(|e| load(format!("{e:#}")))?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| load(format!("{e:#}")))?;
        let pre = match kind {
            Kind::Validator => {
                Pre::Validator(ValidatorPre::new(pre).map_err(|e| load(format!("{e:#}")))?)
            }
            Kind::Transformer => {
                Pre::Transformer(TransformerPre::new(pre).map_err(|e| load(format!("{e:#}")))?)
            }
        };
        Ok(Plugin {
            name: name.to_owned(),
            kind,
            manifest,
            origin,
            sha256,
            engine: self.engine.clone(),
            pre,
        })
    }

    /// Compiles, through the `.cwasm` cache when there is one. The key is the
    /// input's SHA-256 plus the engine's compatibility hash, so a different
    /// wasmtime or config never reads an incompatible file.
    fn compile(&self, name: &str, bytes: &[u8], sha256: &str) -> Result<Component, PluginError> {
        let load = |message: String| PluginError::Load {
            plugin: name.to_owned(),
            message,
        };
        let Some(dir) = &self.cache_dir else {
            let component = to_component(&self.engine, bytes).map_err(load)?;
            return Component::new(&self.engine, &component).map_err(|e| load(format!("{e:#}")));
        };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        let path = dir.join(format!("{sha256}-{:016x}.cwasm", hasher.finish()));
        if path.is_file() {
            // SAFETY: `deserialize_file` trusts the file to be wasmtime output.
            // Only files in our own cache directory get here, named by the
            // hash of their input and written by `write_atomically` below, so
            // no partial or foreign file has that name. A corrupt file fails
            // wasmtime's header/compatibility checks and is recompiled.
            match unsafe { Component::deserialize_file(&self.engine, &path) } {
                Ok(component) => return Ok(component),
                Err(e) => {
                    tracing::warn!(plugin = name, path = %path.display(), "unusable cached plugin, recompiling: {e:#}")
                }
            }
        }
        let component = to_component(&self.engine, bytes).map_err(load)?;
        let cwasm = self
            .engine
            .precompile_component(&component)
            .map_err(|e| load(format!("{e:#}")))?;
        match write_atomically(&path, &cwasm) {
            // SAFETY: we just wrote this file from `precompile_component`, in
            // our own cache directory (see above).
            Ok(()) => unsafe { Component::deserialize_file(&self.engine, &path) },
            Err(e) => {
                tracing::warn!(plugin = name, path = %path.display(), "cannot cache compiled plugin: {e}");
                // SAFETY: these bytes come from this engine's
                // `precompile_component` a moment ago.
                unsafe { Component::deserialize(&self.engine, &cwasm) }
            }
        }
        .map_err(|e| load(format!("{e:#}")))
    }
}

/// A component as it is, or a core module with wit-bindgen's component-type
/// section wrapped into one. Anything else is refused.
fn to_component<'a>(engine: &Engine, bytes: &'a [u8]) -> Result<Cow<'a, [u8]>, String> {
    match bytes.get(..8) {
        // Magic, then version 0x0d and layer 1: a component.
        Some([0, b'a', b's', b'm', _, _, 1, 0]) => Ok(Cow::Borrowed(bytes)),
        // Magic, version 1, layer 0: a core module.
        Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => {
            // wit-component 0.262 panics on a truncated module (it slices
            // section ranges unchecked), so validate first, and contain any
            // other panic: a bad file must not kill the reload thread.
            wasmtime::Module::validate(engine, bytes)
                .map_err(|e| format!("invalid core module: {e:#}"))?;
            let encoded = std::panic::catch_unwind(|| {
                wit_component::ComponentEncoder::default()
                    .module(bytes)
                    .and_then(|encoder| encoder.validate(true).encode())
            });
            match encoded {
                Ok(Ok(component)) => Ok(Cow::Owned(component)),
                Ok(Err(e)) => Err(format!("core module cannot be made a component: {e:#}")),
                Err(_) => {
                    Err("core module cannot be made a component (wit-component panicked)".into())
                }
            }
        }
        _ => Err("not a WebAssembly module or component".into()),
    }
}

/// The world, from the component's exports: exactly one of the two.
fn kind_of(engine: &Engine, component: &Component) -> Result<Kind, String> {
    let ty = component.component_type();
    let names: Vec<&str> = ty.exports(engine).map(|(name, _)| name).collect();
    match (names.contains(&"validate"), names.contains(&"transform")) {
        (true, false) => Ok(Kind::Validator),
        (false, true) => Ok(Kind::Transformer),
        (true, true) => {
            Err("exports both `validate` and `transform`; a plugin implements one world".into())
        }
        (false, false) => Err(format!(
            "exports neither `validate` nor `transform` (worlds xmpp-grid:plugin/validator and transformer); it exports [{}]",
            names.join(", ")
        )),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` beside `path` under a unique temporary name, then renames:
/// a reader (or a crash) never sees a partial `.cwasm`.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(
        ".{file_name}.{}.{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let written = fs::File::create(&tmp).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    match written.and_then(|()| fs::rename(&tmp, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            // Best effort: a stray temporary is harmless (ignored by name).
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

pub(super) fn read(path: &Path) -> Result<Vec<u8>, PluginError> {
    fs::read(path).map_err(|source| PluginError::Io {
        path: path.to_owned(),
        source,
    })
}

pub(super) fn read_to_string(path: &Path) -> Result<String, PluginError> {
    fs::read_to_string(path).map_err(|source| PluginError::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::plugins::fixtures::{TempDir, fixtures, shared_cache};

    fn host() -> Arc<Host> {
        Host::new(HostOptions {
            cache_dir: Some(shared_cache()),
            ..HostOptions::default()
        })
        .unwrap()
    }

    fn load(host: &Host, name: &str, bytes: &[u8], manifest: &str) -> Plugin {
        host.load_bytes(
            name,
            bytes,
            Manifest::parse(manifest, "test.toml").unwrap(),
            "test".into(),
        )
        .unwrap()
    }

    fn topic() -> TopicInfo {
        TopicInfo {
            name: "incidents".into(),
            payload_type: None,
            owner: "owner@grid.example".into(),
        }
    }

    fn publisher() -> PublisherInfo {
        PublisherInfo {
            jid: "ids@grid.example".into(),
            roles: vec!["publisher".into()],
            templates: vec![],
        }
    }

    fn subscriber() -> SubscriberInfo {
        SubscriberInfo {
            jid: Some("soc@grid.example".into()),
            roles: vec![],
            grants: vec![],
        }
    }

    fn validate(plugin: &Plugin, payload: &str) -> Result<Verdict, PluginError> {
        plugin.validate(&topic(), &publisher(), payload.as_bytes())
    }

    fn transform(plugin: &Plugin, payload: &str) -> Result<Transformed, PluginError> {
        plugin.transform(&topic(), &subscriber(), payload.as_bytes())
    }

    #[test]
    fn validator_accepts_by_default_and_rejects_on_request() {
        let plugin = load(&host(), "v", &fixtures().validator_core, "");
        assert_eq!(plugin.kind, Kind::Validator);
        assert_eq!(
            validate(&plugin, "<ok xmlns='urn:test'/>").unwrap(),
            Verdict::Accept
        );
        assert_eq!(
            validate(&plugin, "<reject xmlns='urn:test'/>").unwrap(),
            Verdict::Reject(vec![Violation {
                location: "/x".into(),
                message: "rejected on request".into()
            }])
        );
    }

    #[test]
    fn endless_loop_is_stopped_near_the_deadline_and_the_next_call_works() {
        let plugin = load(
            &host(),
            "spin",
            &fixtures().validator_core,
            "deadline_ms = 100",
        );
        let started = Instant::now();
        let err = validate(&plugin, "loop").unwrap_err();
        let took = started.elapsed();
        assert!(
            matches!(
                err,
                PluginError::Timeout {
                    deadline_ms: 100,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "plugin \"spin\" exceeded its 100 ms deadline"
        );
        assert!(
            took >= Duration::from_millis(95) && took < Duration::from_millis(1000),
            "took {took:?}"
        );
        assert_eq!(validate(&plugin, "fine").unwrap(), Verdict::Accept);
    }

    #[test]
    fn memory_bomb_is_out_of_memory_and_the_next_call_works() {
        let plugin = load(
            &host(),
            "bomb",
            &fixtures().validator_core,
            "memory_mib = 8",
        );
        let err = validate(&plugin, "bomb").unwrap_err();
        assert!(
            matches!(err, PluginError::OutOfMemory { limit_mib: 8, .. }),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "plugin \"bomb\" ran out of memory (8 MiB)");
        assert_eq!(validate(&plugin, "fine").unwrap(), Verdict::Accept);
    }

    #[test]
    fn guest_panic_is_a_readable_trap_and_the_next_call_works() {
        let plugin = load(&host(), "x", &fixtures().validator_core, "");
        let err = validate(&plugin, "trap").unwrap_err();
        assert_eq!(
            err.to_string(),
            "plugin \"x\" trapped: wasm trap: wasm `unreachable` instruction executed"
        );
        assert_eq!(validate(&plugin, "fine").unwrap(), Verdict::Accept);
    }

    #[test]
    fn violation_flood_is_output_too_large() {
        // The deadline is generous: this tests the cap, and an unoptimised
        // test build lifts 100,000 records slowly.
        let plugin = load(
            &host(),
            "flood",
            &fixtures().validator_core,
            "deadline_ms = 5000",
        );
        let err = validate(&plugin, "flood").unwrap_err();
        assert!(
            matches!(err, PluginError::OutputTooLarge { max: 524_288, len, .. } if len > 1_000_000),
            "{err:?}"
        );
        // A larger cap lets the same list through.
        let roomy = load(
            &host(),
            "flood",
            &fixtures().validator_core,
            "max_output_kib = 16384\ndeadline_ms = 5000",
        );
        assert!(
            matches!(validate(&roomy, "flood").unwrap(), Verdict::Reject(v) if v.len() == 100_000)
        );
    }

    #[test]
    fn transformer_outcomes_follow_the_payload() {
        let plugin = load(&host(), "t", &fixtures().transformer_core, "");
        assert_eq!(plugin.kind, Kind::Transformer);
        assert_eq!(transform(&plugin, "<a/>").unwrap(), Transformed::Unchanged);
        assert_eq!(
            transform(&plugin, "withhold").unwrap(),
            Transformed::Withhold
        );
        assert_eq!(
            transform(&plugin, "redact").unwrap(),
            Transformed::Rewritten(b"<redacted xmlns='urn:test'/>".to_vec())
        );
        let err = transform(&plugin, "fail").unwrap_err();
        assert_eq!(
            err.to_string(),
            "plugin \"t\" failed: failure requested by the payload"
        );
    }

    #[test]
    fn the_subscriber_jid_reaches_only_transformers_that_ask_for_it() {
        let who = |manifest: &str| {
            let plugin = load(&host(), "t", &fixtures().transformer_core, manifest);
            match transform(&plugin, "whoami").unwrap() {
                Transformed::Rewritten(b) => String::from_utf8(b).unwrap(),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(who(""), "<who xmlns='urn:test'></who>");
        assert_eq!(who("subscriber_jid = true"), "<who xmlns='urn:test'>soc@grid.example</who>");
    }

    #[test]
    fn transformer_misbehaviour_is_contained() {
        let plugin = load(
            &host(),
            "t",
            &fixtures().transformer_core,
            "deadline_ms = 50",
        );
        assert!(matches!(
            transform(&plugin, "loop"),
            Err(PluginError::Timeout {
                deadline_ms: 50,
                ..
            })
        ));
        assert!(matches!(
            transform(&plugin, "trap"),
            Err(PluginError::Trap { .. })
        ));
        // Generous deadline: this tests the cap, and an unoptimised test
        // build copies 8 MiB slowly.
        let plugin = load(
            &host(),
            "t",
            &fixtures().transformer_core,
            "deadline_ms = 5000",
        );
        let err = transform(&plugin, "big").unwrap_err();
        assert_eq!(
            err.to_string(),
            "plugin \"t\" returned 8388608 bytes, more than its limit of 524288 bytes"
        );
        assert_eq!(transform(&plugin, "<a/>").unwrap(), Transformed::Unchanged);
    }

    #[test]
    fn calling_the_other_world_is_refused() {
        let host = host();
        let v = load(&host, "v", &fixtures().validator_core, "");
        let t = load(&host, "t", &fixtures().transformer_core, "");
        assert!(matches!(
            transform(&v, "x"),
            Err(PluginError::WrongKind { .. })
        ));
        assert_eq!(
            validate(&t, "x").unwrap_err().to_string(),
            "plugin \"t\" is a transformer, not a validator"
        );
    }

    #[test]
    fn core_module_component_and_wasip2_inputs_behave_alike() {
        let host = host();
        let component = to_component(&host.engine, &fixtures().validator_core)
            .unwrap()
            .into_owned();
        assert_eq!(&component[4..8], &[0x0d, 0, 1, 0]);
        for (label, bytes) in [
            ("core", &fixtures().validator_core),
            ("component", &component),
            ("wasip2", &fixtures().validator_wasip2),
        ] {
            let plugin = load(&host, label, bytes, "");
            assert_eq!(
                validate(&plugin, "fine").unwrap(),
                Verdict::Accept,
                "{label}"
            );
            assert!(
                matches!(validate(&plugin, "reject").unwrap(), Verdict::Reject(_)),
                "{label}"
            );
            // wasip2's panic path calls WASI (stderr), which traps: no capability.
            let err = validate(&plugin, "trap").unwrap_err().to_string();
            let expected = match label {
                "wasip2" => "has not been defined",
                _ => "wasm `unreachable` instruction executed",
            };
            assert!(
                err.starts_with(&format!("plugin \"{label}\" trapped: ")) && err.contains(expected),
                "{err}"
            );
            assert_eq!(
                validate(&plugin, "fine").unwrap(),
                Verdict::Accept,
                "{label}"
            );
        }
    }

    #[test]
    fn garbage_plain_modules_and_empty_components_do_not_load() {
        let host = host();
        let load_err = |bytes: &[u8]| {
            host.load_bytes("bad", bytes, Manifest::default(), "test".into())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            load_err(b"garbage!"),
            "cannot load plugin \"bad\": not a WebAssembly module or component"
        );
        // A core module without wit-bindgen's component-type section.
        // A core module without wit-bindgen's component-type section wraps
        // into a component with no exports.
        assert!(
            load_err(b"\0asm\x01\0\0\0").contains("exports neither `validate` nor `transform`")
        );
        // A valid component that exports nothing.
        assert!(
            load_err(b"\0asm\x0d\0\x01\0").contains("exports neither `validate` nor `transform`")
        );
        // A truncated core module (wit-component alone would panic on it).
        let half = &fixtures().validator_core[..fixtures().validator_core.len() / 2];
        assert!(load_err(half).starts_with("cannot load plugin \"bad\": invalid core module: "));
        // A truncated component.
        let component = to_component(&host.engine, &fixtures().validator_core)
            .unwrap()
            .into_owned();
        assert!(
            load_err(&component[..component.len() / 2]).starts_with("cannot load plugin \"bad\": ")
        );
    }

    #[test]
    fn load_file_names_the_plugin_after_the_file() {
        let dir = TempDir::new("load-file");
        dir.deploy("iodef-check.wasm", &fixtures().validator_core);
        dir.deploy("iodef-check.toml", b"deadline_ms = 20\n");
        let plugin = host()
            .load_file(
                &dir.path().join("iodef-check.wasm"),
                Some(&dir.path().join("iodef-check.toml")),
            )
            .unwrap();
        assert_eq!(
            (plugin.name.as_str(), plugin.manifest.deadline_ms),
            ("iodef-check", 20)
        );
        assert_eq!(plugin.sha256, sha256_hex(&fixtures().validator_core));
        let missing = host()
            .load_file(&dir.path().join("nope.wasm"), None)
            .unwrap_err();
        assert!(matches!(missing, PluginError::Io { .. }));
    }

    #[test]
    fn precompiled_cache_is_written_once_and_reused() {
        let cache = TempDir::new("cache");
        let host = Host::new(HostOptions {
            cache_dir: Some(cache.path().into()),
            ..Default::default()
        })
        .unwrap();
        let started = Instant::now();
        load(&host, "v", &fixtures().validator_core, "");
        let cold = started.elapsed();
        let files: Vec<_> = std::fs::read_dir(cache.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let name = files[0].to_string_lossy().into_owned();
        assert!(
            name.starts_with(&sha256_hex(&fixtures().validator_core)) && name.ends_with(".cwasm")
        );
        let started = Instant::now();
        let plugin = load(&host, "v", &fixtures().validator_core, "");
        let warm = started.elapsed();
        assert_eq!(validate(&plugin, "fine").unwrap(), Verdict::Accept);
        eprintln!("plugin load: compile {cold:?}, from cache {warm:?}");
        assert!(warm * 3 < cold, "compile {cold:?}, from cache {warm:?}");
    }

    #[test]
    fn a_reload_removes_the_compiled_files_of_plugins_that_are_gone() {
        let cache = TempDir::new("cache-prune");
        let dir = TempDir::new("cache-prune-dir");
        let host = Host::new(HostOptions { cache_dir: Some(cache.path().into()), ..Default::default() }).unwrap();
        let cached = || -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(cache.path())
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".cwasm"))
                .collect();
            v.sort();
            v
        };
        dir.deploy("p.wasm", &fixtures().validator_core);
        assert!(host.reload(dir.path()).is_ok());
        let first = cached();
        assert_eq!(first.len(), 1);
        // Replaced by another component: the old compiled file goes.
        dir.deploy("p.wasm", &fixtures().transformer_core);
        assert!(host.reload(dir.path()).is_ok());
        let second = cached();
        assert_eq!(second.len(), 1);
        assert_ne!(first, second);
        assert!(second[0].starts_with(&sha256_hex(&fixtures().transformer_core)));
        // Removed: nothing left.
        std::fs::remove_file(dir.path().join("p.wasm")).unwrap();
        host.reload(dir.path());
        assert!(cached().is_empty());
    }

    #[test]
    fn corrupt_cache_file_is_recompiled() {
        let cache = TempDir::new("cache-corrupt");
        let host = Host::new(HostOptions {
            cache_dir: Some(cache.path().into()),
            ..Default::default()
        })
        .unwrap();
        load(&host, "v", &fixtures().validator_core, "");
        let file = std::fs::read_dir(cache.path())
            .unwrap()
            .flatten()
            .next()
            .unwrap()
            .path();
        std::fs::write(&file, b"not a cwasm").unwrap();
        let plugin = load(&host, "v", &fixtures().validator_core, "");
        assert_eq!(validate(&plugin, "fine").unwrap(), Verdict::Accept);
        assert!(std::fs::metadata(&file).unwrap().len() > 1000);
    }

    /// Per-call cost (fresh Store + instantiate + call) for a 2 KiB payload.
    /// `cargo test --release -- --ignored --nocapture per_call_cost`
    #[test]
    #[ignore = "benchmark: run in release with --ignored --nocapture"]
    fn per_call_cost_of_an_accepting_validator() {
        let plugin = load(&host(), "bench", &fixtures().validator_core, "");
        let payload = format!("<p xmlns='urn:test'>{}</p>", "a".repeat(2048 - 24));
        assert_eq!(payload.len(), 2048);
        for _ in 0..1000 {
            validate(&plugin, &payload).unwrap();
        }
        let calls = 20_000;
        let started = Instant::now();
        for _ in 0..calls {
            assert_eq!(validate(&plugin, &payload).unwrap(), Verdict::Accept);
        }
        let per_call = started.elapsed() / calls;
        eprintln!(
            "validate, 2 KiB payload, accept: {per_call:?} per call (fresh store + instantiate + call)"
        );
    }
}
