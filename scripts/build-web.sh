#!/usr/bin/env bash
#! Builds the web app into web/dist (served by the Worker as static assets): one minified module, styles, PWA files, the _headers file (CSP).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source "$root/scripts/env.sh"
rm -rf web/dist && mkdir -p web/dist
esbuild web/src/app.js --bundle --format=esm --minify --target=es2022 --log-level=warning --outfile=web/dist/app.js
esbuild web/src/style.css --minify --log-level=warning --outfile=web/dist/style.css
cp web/src/_headers web/src/index.html web/src/manifest.webmanifest web/src/sw.js web/src/icon.svg web/src/icon-192.png web/src/icon-512.png web/dist/
echo "[build] web app: $(du -b web/dist/app.js | cut -f1) bytes of script, $(du -b web/dist/style.css | cut -f1) of styles" >&2
