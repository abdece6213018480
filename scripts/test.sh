#!/usr/bin/env bash
#! Runs every test: format and lint checks, the core's unit tests and model checks, end-to-end tests against wrangler dev, the Modal provider's tests, then the web app's browser tests.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source "$root/scripts/env.sh"
echo "[test] cargo fmt --check"
cargo fmt --all -- --check
echo "[test] clippy (host and wasm)"
cargo clippy --workspace --all-targets -q -- -D warnings
cargo clippy -p nightshift-worker --target wasm32-unknown-unknown -q -- -D warnings
echo "[test] building the Worker"
bash scripts/build.sh
echo "[test] cargo test (core, model checks, end to end)"
# End-to-end tests each start their own wrangler dev; three at a time suits two cores.
cargo build -q -p nightshift-sandbox --bins
cargo test --workspace -- --test-threads 3
echo "[test] Modal provider: HTTP layer and backend with the Modal SDK replaced at its seam (Python standard library)"
python3 -m unittest discover -s modal_provider/tests -t modal_provider
echo "[test] web app: model unit tests and browser tests (headless Chromium against wrangler dev)"
node --test web/test/model.test.mjs web/test/browser.test.mjs
