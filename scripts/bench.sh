#!/usr/bin/env bash
#! Benchmarks: builds the release Wasm, then runs the bench binary against a local wrangler dev and prints figures. One part by name: `control`, `floor`, `agent`, `pools` (also runs `restore` and `refill`), `restore` (sandbox death -> follow-up's first event, default settings), `refill` (cold start while a drained pool refills), `viewers` (agent output to 10/100/1,000 viewers), `reload` (a 20,000-event session reloaded and resumed), `idle` (first request to an idle session after a restart), `presence` (typing -> presence delta at every other client), `wake` (first request to a session after 10,000 prompts were queued and cancelled in it, after a restart) or `background` (scheduler on an unpruned shard, spawn -> running). `control` measures Nightshift, then the runtime floor (`tests/floor/`) the same ways, and ends with the regression guard: each figure with a floor counterpart, the floor's value from the same run and the ratio Nightshift/floor. Knobs: BENCH_N (samples; under `control`/`floor`: creates, default 200, and prompt rounds, default 100), BENCH_FANOUT (`control`/`floor`: session sizes for fan-out, default `100,1000`), BENCH_ROUNDS (fan-out rounds per trigger and size, default 12, the first 2 not counted), BENCH_SINGLE (single events per throughput figure, default 1000), BENCH_PIPELINED (pipelined commands, default 3000), BENCH_POOL, BENCH_BATCH, BENCH_EVENTS, BENCH_RESTARTS, BENCH_AGENTS, BENCH_CYCLES. BENCH_NO_BUILD=1 skips the builds (the Worker already in build/ and the sandbox binaries already built are used: for smoke runs).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source "$root/scripts/env.sh"
if [ -z "${BENCH_NO_BUILD:-}" ]; then
  bash scripts/build.sh --release
  cargo build -q -p nightshift-sandbox --bins
fi
cargo run --release -q -p nightshift-tests --bin bench -- "$@"
