#!/usr/bin/env bash
#! Benchmarks: builds the release Wasm, then runs the bench binary against a local wrangler dev and prints figures. One part by name: `control`, `floor`, `agent`, `pools` (also runs `restore` and `refill`), `restore` (sandbox death -> follow-up's first event, default settings), `refill` (cold start while a drained pool refills), `viewers` (agent output to 10/100/1,000 viewers), `reload` (a 20,000-event session reloaded and resumed), `idle` (first request to an idle session after a restart), `presence` (typing -> presence delta at every other client), `wake` (first request to a session after 10,000 prompts were queued and cancelled in it, after a restart) or `background` (scheduler on an unpruned shard, spawn -> running). Knobs: BENCH_N (samples), BENCH_POOL, BENCH_BATCH, BENCH_EVENTS, BENCH_RESTARTS, BENCH_AGENTS, BENCH_CYCLES.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source "$root/scripts/env.sh"
bash scripts/build.sh --release
cargo build -q -p nightshift-sandbox --bins
cargo run --release -q -p nightshift-tests --bin bench -- "$@"
