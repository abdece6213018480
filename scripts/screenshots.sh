#!/usr/bin/env bash
#! Re-takes the README's screenshots from the real app (builds, starts wrangler dev, drives headless Chromium).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source "$root/scripts/env.sh"
[ -f build/index_bg.wasm ] || bash scripts/build.sh
bash scripts/build-web.sh
node web/test/screenshots.mjs
