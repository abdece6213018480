#!/usr/bin/env bash
#! Starts Nightshift locally: the scripted model (unless a real one is configured), the local provider, and the Worker under wrangler dev.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source "$root/scripts/env.sh"
PORT="${PORT:-8787}"
PROVIDER_PORT="${PROVIDER_PORT:-8790}"
MODEL_PORT="${MODEL_PORT:-8791}"
PROVIDER_SECRET="${PROVIDER_SECRET:-local-provider-secret-not-for-production}"
if [ ! -f build/index_bg.wasm ] || [ -n "$(find src durable_objects core/src Cargo.toml -newer build/index_bg.wasm -print -quit)" ]; then
  bash scripts/build.sh
else
  bash scripts/build-web.sh
fi
echo "[dev] building the sandbox side (provider, supervisor, scripted model)"
cargo build -q -p nightshift-sandbox --bins
mkdir -p .state/dev .state/dev-logs
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

if [ -z "${NIGHTSHIFT_MODEL_URL:-}" ] && [ -z "${NIGHTSHIFT_MODEL:-}" ]; then
  RECORDING="${NIGHTSHIFT_RECORDING:-sandbox/recordings/demo.json}"
  target/debug/nightshift-scripted-model --port "$MODEL_PORT" --recording "$RECORDING" > .state/dev-logs/model.log 2>&1 &
  pids+=($!)
  export NIGHTSHIFT_MODEL_URL="http://127.0.0.1:$MODEL_PORT/v1"
  export NIGHTSHIFT_MODEL="nightshift/scripted"
  echo "[dev] model: the SCRIPTED model replaying $RECORDING (no real model is called)"
else
  echo "[dev] model: ${NIGHTSHIFT_MODEL:-nightshift/default} ${NIGHTSHIFT_MODEL_URL:+at $NIGHTSHIFT_MODEL_URL}"
fi
export NIGHTSHIFT_OPENCODE_BIN="$root/node_modules/opencode-linux-x64/bin/opencode"
export NIGHTSHIFT_PLUGIN_MODULES="$root/node_modules"
NIGHTSHIFT_DEV_MODE=1 PROVIDER_SECRET="$PROVIDER_SECRET" target/debug/nightshift-provider --port "$PROVIDER_PORT" --root .state/dev-provider \
  > >(tee .state/dev-logs/provider.log) 2>&1 &
pids+=($!)
echo "Nightshift: http://127.0.0.1:$PORT  (dev sign-in: POST /auth/dev {\"user\":\"you\"}; API: /openapi.json)"
wrangler dev --ip 127.0.0.1 --port "$PORT" --inspector-port "${INSPECTOR_PORT:-9229}" \
  --persist-to .state/dev --show-interactive-dev-session=false --test-scheduled \
  --var DEV_AUTH:1 --var AUTH_SECRET:"${AUTH_SECRET:-local-dev-secret-not-for-production}" \
  --var PROMPT_RUNNER:"${PROMPT_RUNNER:-sandbox}" \
  --var PROVIDER_URL:"http://127.0.0.1:$PROVIDER_PORT" --var PROVIDER_SECRET:"$PROVIDER_SECRET" \
  --var CONTROL_URL:"http://127.0.0.1:$PORT" "$@" &
pids+=($!)
wait "${pids[-1]}"
