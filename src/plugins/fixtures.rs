//! Test support: builds the guest fixtures in `tests/wasm-fixtures/` (once per
//! test process) and gives tests scratch directories.
//!
//! What it must not do: depend on fixtures built beforehand; CI builds them
//! here, with cargo, from the committed `tests/wasm-fixtures/Cargo.lock`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// The built guests, as bytes.
pub struct Fixtures {
    /// `misbehave-validator` for wasm32-unknown-unknown: a core module with
    /// wit-bindgen's component-type section.
    pub validator_core: Vec<u8>,
    /// `misbehave-transformer`, same target.
    pub transformer_core: Vec<u8>,
    /// `misbehave-validator` for wasm32-wasip2: a component importing WASI.
    pub validator_wasip2: Vec<u8>,
}

/// Builds the fixtures on first use; panics with cargo's output on failure.
pub fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/wasm-fixtures");
        let target = target_dir();
        build(&workspace, &target, &["--target", "wasm32-unknown-unknown"]);
        build(
            &workspace,
            &target,
            &["--target", "wasm32-wasip2", "-p", "misbehave-validator"],
        );
        let read = |triple: &str, file: &str| {
            let path = target.join(triple).join("release").join(file);
            std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        };
        Fixtures {
            validator_core: read("wasm32-unknown-unknown", "misbehave_validator.wasm"),
            transformer_core: read("wasm32-unknown-unknown", "misbehave_transformer.wasm"),
            validator_wasip2: read("wasm32-wasip2", "misbehave_validator.wasm"),
        }
    })
}

/// `<outer target dir>/plugin-fixtures`, found from the test binary's path
/// (`target/<profile>/deps/<test>`), so it is shared and never committed.
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
        .unwrap_or_else(std::env::temp_dir)
        .join("plugin-fixtures")
}

fn build(workspace: &Path, target: &Path, args: &[&str]) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    // The outer cargo's settings (target dir, profile, build target, flags
    // meant for the host crate) must not leak into the guest build.
    for (key, _) in std::env::vars_os() {
        if let Some(key) = key.to_str()
            && (key.starts_with("CARGO_") && key != "CARGO_HOME"
                || matches!(key, "RUSTFLAGS" | "RUSTDOCFLAGS"))
        {
            cmd.env_remove(key);
        }
    }
    let output = cmd
        .current_dir(workspace)
        .env("CARGO_TARGET_DIR", target)
        .args(["build", "--release", "--locked"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo for the plugin fixtures: {e}"));
    assert!(
        output.status.success(),
        "building the plugin fixtures ({args:?}) failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "xg-plugins-{label}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `bytes` to `name` in this directory the way an operator should
    /// deploy: to `name.part`, then rename.
    pub fn deploy(&self, name: &str, bytes: &[u8]) {
        let part = self.0.join(format!("{name}.part"));
        std::fs::write(&part, bytes).unwrap_or_else(|e| panic!("{}: {e}", part.display()));
        std::fs::rename(&part, self.0.join(name)).unwrap_or_else(|e| panic!("rename {name}: {e}"));
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `.cwasm` cache shared by the tests of one target dir, so each fixture
/// is compiled once (tests of the cache itself use their own directory).
pub fn shared_cache() -> PathBuf {
    target_dir().join("cwasm-cache")
}
