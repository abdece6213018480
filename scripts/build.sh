#!/usr/bin/env bash
#! Builds the Worker to Wasm (build/worker/shim.mjs). Pass --release for an optimised build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source "$root/scripts/env.sh"
mode=(--dev --no-opt)
[ "${1:-}" = "--release" ] && mode=(--release)
echo "[build] worker-build ${mode[*]}" >&2
worker-build "${mode[@]}" >&2
if [ "${1:-}" = "--release" ]; then
  # The release Wasm drops its name section (~400 KB of function names) and producers: what is
  # deployed stays within 1 MB gzipped (BENCHMARKS.md, "Release Wasm size").
  "$WASM_OPT_BIN" --strip-debug --strip-producers build/index_bg.wasm -o build/index_bg.wasm
fi
bash scripts/build-web.sh
