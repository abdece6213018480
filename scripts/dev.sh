#!/usr/bin/env bash
#! Starts Nightshift locally: builds if needed, runs the Worker under wrangler dev with local Durable Object state, prints the URL.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source "$root/scripts/env.sh"
PORT="${PORT:-8787}"
if [ ! -f build/index_bg.wasm ] || [ -n "$(find src durable_objects core/src Cargo.toml -newer build/index_bg.wasm -print -quit)" ]; then
  bash scripts/build.sh
fi
mkdir -p .state/dev
echo "Nightshift: http://127.0.0.1:$PORT  (dev sign-in: POST /auth/dev {\"user\":\"you\"}; API: /openapi.json)"
exec wrangler dev --ip 127.0.0.1 --port "$PORT" --inspector-port "${INSPECTOR_PORT:-9229}" \
  --persist-to .state/dev --show-interactive-dev-session=false \
  --var DEV_AUTH:1 --var AUTH_SECRET:"${AUTH_SECRET:-local-dev-secret-not-for-production}" \
  --var PROMPT_RUNNER:"${PROMPT_RUNNER:-echo}" "$@"
