//! The first-party plugins compiled into the binary (`plugins/`, built by
//! `build.rs`): active on a fresh `xmpp-grid serve` unless `[plugins] builtin
//! = false`; a file of the same name in the plugins directory replaces one.

use super::Builtin;

/// `iodef-validator` and `privacy-redactor` (empty when built with
/// `XMPP_GRID_NO_BUILTIN_PLUGINS=1`).
pub static BUILTINS: &[Builtin] = &include!(concat!(env!("OUT_DIR"), "/builtin_plugins.rs"));
