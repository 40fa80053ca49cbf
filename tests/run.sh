#!/usr/bin/env bash
# The project's test command (README "Tests"; .ci/run runs exactly this).
# Installs what the tests need, idempotently, then runs every test:
# unit, protocol (real TLS on loopback, real sled), CLI, and interop with
# independent XMPP clients (slixmpp, aioxmpp, go-sendxmpp, xmppc, openssl).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages for the interop tests.
pkgs=(python3-slixmpp python3-aioxmpp go-sendxmpp xmppc openssl libxml2-utils)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "tests/run.sh: installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -q
  $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# WebAssembly targets: the built-in plugins (plugins/, built by build.rs) and
# the test fixtures (tests/wasm-fixtures) are Rust guests; one host test loads
# a wasm32-wasip2 component.
if command -v rustup >/dev/null; then
  installed=$(rustup target list --installed)
  for t in wasm32-unknown-unknown wasm32-wasip2; do
    grep -qx "$t" <<<"$installed" || rustup target add "$t"
  done
fi

# The tests open a few hundred sockets at once at most; make sure the soft limit allows it.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# Benches are programs that print figures (docs/benchmarks.md), not tests.
cargo test --locked --lib --bins --tests --examples
# The plugins' own rules, natively (IODEF corpus, redaction pairs).
cargo test --locked --manifest-path plugins/Cargo.toml
