//! Builds the first-party payload plugins (`plugins/`, Rust guests of the WIT
//! package in `wit/`) for `wasm32-unknown-unknown` and leaves their modules in
//! OUT_DIR, where `src/plugins/builtin.rs` embeds them: a fresh
//! `xmpp-grid serve` validates and redacts IODEF with nothing else installed.
//!
//! The guests are their own cargo workspace (own lock file, own target
//! directory under OUT_DIR), built by a nested cargo with the outer build's
//! flags removed. Set `XMPP_GRID_NO_BUILTIN_PLUGINS=1` to build without them.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The shipped plugins: crate directories under `plugins/`.
const PLUGINS: &[&str] = &["iodef-validator", "privacy-redactor"];
const TARGET: &str = "wasm32-unknown-unknown";

fn main() {
    let root = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    println!("cargo:rerun-if-env-changed=XMPP_GRID_NO_BUILTIN_PLUGINS");
    for p in ["wit", "plugins/Cargo.toml", "plugins/Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    for p in PLUGINS {
        for f in ["Cargo.toml", "plugin.toml", "src"] {
            println!("cargo:rerun-if-changed={}", root.join("plugins").join(p).join(f).display());
        }
    }
    let skip = std::env::var_os("XMPP_GRID_NO_BUILTIN_PLUGINS").is_some_and(|v| !v.is_empty() && v != "0");
    let mut listing = String::from("[\n");
    if !skip {
        build(&root, &out);
        for p in PLUGINS {
            let module = out.join("guests").join(TARGET).join("release").join(format!("{}.wasm", p.replace('-', "_")));
            let manifest = root.join("plugins").join(p).join("plugin.toml");
            listing.push_str(&format!(
                "    Builtin {{ name: {p:?}, wasm: include_bytes!({:?}), manifest: include_str!({:?}) }},\n",
                module.display().to_string(),
                manifest.display().to_string()
            ));
        }
    }
    listing.push(']');
    if let Err(e) = std::fs::write(out.join("builtin_plugins.rs"), listing) {
        panic!("cannot write {}: {e}", out.join("builtin_plugins.rs").display());
    }
}

fn build(root: &Path, out: &Path) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--locked", "--target", TARGET, "--manifest-path"])
        .arg(root.join("plugins").join("Cargo.toml"))
        .arg("--target-dir")
        .arg(out.join("guests"));
    // The outer build's settings are not the guests' (flags for the host target,
    // a shared target dir that the outer cargo holds locked).
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET", "RUSTC_WORKSPACE_WRAPPER"] {
        cmd.env_remove(var);
    }
    let status = cmd.status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "building the built-in plugins (plugins/) failed ({s}). They need the {TARGET} target: \
             `rustup target add {TARGET}`. Or build without them: XMPP_GRID_NO_BUILTIN_PLUGINS=1"
        ),
        Err(e) => panic!("cannot run cargo to build the built-in plugins: {e}"),
    }
}
