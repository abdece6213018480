#!/usr/bin/env bash
#! Benchmarks: builds the release Wasm, then runs the bench binary against a local wrangler dev and prints figures (`control`, `floor`, `agent`, `pools` or `background` runs one part).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source "$root/scripts/env.sh"
bash scripts/build.sh --release
cargo build -q -p nightshift-sandbox --bins
cargo run --release -q -p nightshift-tests --bin bench -- "$@"
