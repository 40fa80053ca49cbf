//! Payload plugins: sandboxed WebAssembly components that validate a payload
//! before it is stored, or transform it per subscriber at delivery.
//!
//! The contract is `wit/plugin.wit` (package `xmpp-grid:plugin@0.1.0`, worlds
//! `validator` and `transformer`). This module loads plugins (`host`), keeps
//! an immutable, ordered snapshot of them (`registry`), and reloads that
//! snapshot when the plugin directory changes (`watch`).
//!
//! What it must not do: give a guest any capability (no files, network,
//! clock, randomness or environment: nothing is linked), let a guest outlive
//! its deadline or memory cap, or let a trapped instance be reused. It never
//! parses XML and never decides what a rejection means on the wire: the broker
//! maps [`Verdict`] and [`PluginError`] to XEP-0060 errors and audit records.

pub mod builtin;
mod host;
mod manifest;
mod registry;
mod watch;

#[cfg(test)]
mod fixtures;

use std::path::PathBuf;

pub use host::{Host, HostOptions, Plugin};
pub use manifest::Manifest;
pub use registry::{PluginSet, Report};
pub use watch::{Watcher, watch};

/// The topic (XEP-0060 node) a payload belongs to, as a plugin sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicInfo {
    /// The node name, e.g. "incidents".
    pub name: String,
    /// `pubsub#type` (RFC 8600 §5), if the owner set one.
    pub payload_type: Option<String>,
    /// The bare JID of the topic's owner.
    pub owner: String,
}

/// The platform publishing a payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublisherInfo {
    /// Bare JID of the publishing platform.
    pub jid: String,
    /// Roles the platform holds (Cedar `Role` groups).
    pub roles: Vec<String>,
    /// Functional templates (RFC 8600 §8.3.2) the platform belongs to.
    pub templates: Vec<String>,
}

/// The platform a notification is about to reach. Hashable so the broker can
/// reuse one transformation for every subscriber with the same roles and
/// grants when `jid` is `None` (manifest `subscriber_jid = false`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SubscriberInfo {
    /// Bare JID; only given to transformers whose manifest asks for it.
    pub jid: Option<String>,
    /// Roles the platform holds.
    pub roles: Vec<String>,
    /// Grants from the manifest that Cedar allows this platform on this topic.
    pub grants: Vec<String>,
}

/// One reason a validator rejects a payload; goes back to the publisher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// A path such as "/IODEF-Document/Incident[1]", or "" for the whole.
    pub location: String,
    /// What is wrong, readable by the publisher's operator.
    pub message: String,
}

/// A validator's decision on one payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Store the item.
    Accept,
    /// Refuse the item (XEP-0060 `not-acceptable`), with the plugin's reasons.
    Reject(Vec<Violation>),
}

/// A transformer's decision on one payload for one subscriber.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transformed {
    /// Deliver the payload as it is.
    Unchanged,
    /// Deliver these bytes instead (one XML element, UTF-8; the broker parses
    /// them before delivery, the host does not).
    Rewritten(Vec<u8>),
    /// Deliver nothing of this item to this subscriber.
    Withhold,
}

/// Which world a plugin implements, deduced from its single export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Exports `validate` (world `validator`).
    Validator,
    /// Exports `transform` (world `transformer`).
    Transformer,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Validator => "validator",
            Kind::Transformer => "transformer",
        })
    }
}

/// A plugin compiled into the binary (`include_bytes!`), loaded by every
/// reload unless the plugin directory holds a file of the same name.
#[derive(Clone, Copy, Debug)]
pub struct Builtin {
    /// Plugin name, as a file `NAME.wasm` would give it.
    pub name: &'static str,
    /// A component or a core module with wit-bindgen's component-type section.
    pub wasm: &'static [u8],
    /// The manifest as TOML text ("" for all defaults).
    pub manifest: &'static str,
}

/// Everything that can go wrong loading or running a plugin. The texts are
/// meant for an operator's log and, for call errors, a publisher's error.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The call ran past the manifest's `deadline_ms` (epoch interruption).
    #[error("plugin \"{plugin}\" exceeded its {deadline_ms} ms deadline")]
    Timeout { plugin: String, deadline_ms: u64 },
    /// The guest tried to grow its memory past the manifest's `memory_mib`.
    #[error("plugin \"{plugin}\" ran out of memory ({limit_mib} MiB)")]
    OutOfMemory { plugin: String, limit_mib: u32 },
    /// Any other trap: a guest panic, an unreachable, a bad memory access.
    #[error("plugin \"{plugin}\" trapped: {message}")]
    Trap { plugin: String, message: String },
    /// The transformed payload or the violations exceed `max_output_kib`.
    #[error("plugin \"{plugin}\" returned {len} bytes, more than its limit of {max} bytes")]
    OutputTooLarge {
        plugin: String,
        len: usize,
        max: usize,
    },
    /// A transformer returned its own error (`result::err`); the broker
    /// withholds the item from that subscriber.
    #[error("plugin \"{plugin}\" failed: {message}")]
    Failed { plugin: String, message: String },
    /// Every sandbox slot is in use; the call was not started.
    #[error("plugin \"{plugin}\" could not start: too many plugin calls at once")]
    Busy { plugin: String },
    /// Called with the wrong world (`validate` on a transformer or the reverse).
    #[error("plugin \"{plugin}\" is a {kind}, not a {wanted}")]
    WrongKind {
        plugin: String,
        kind: Kind,
        wanted: Kind,
    },
    /// The bytes are not a usable plugin: not wasm, no component type, wrong
    /// exports, does not compile or link.
    #[error("cannot load plugin \"{plugin}\": {message}")]
    Load { plugin: String, message: String },
    /// The manifest is not valid TOML, has an unknown key or a value out of
    /// bounds.
    #[error("manifest {file}: {message}")]
    Manifest { file: String, message: String },
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The wasmtime engine could not be configured (host bug or platform).
    #[error("plugin engine unavailable: {0}")]
    Engine(String),
    /// The directory watcher could not be started.
    #[error("cannot watch {path}: {message}")]
    Watch { path: PathBuf, message: String },
}
