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
bash scripts/build-web.sh
