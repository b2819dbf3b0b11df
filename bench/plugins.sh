#!/usr/bin/env bash
# Plugin-chain benchmark of issue 3, in one run (a benchmark, not a test: nothing is
# asserted, a Markdown table is printed):
#   (a) in-process cost of the listener's plugin Chain over 0, 1 and 3 real plugins;
#   (b) new connections/s and latency through a running release wasmbassador (tcp
#       listeners with 0, 1, 3 plugins) next to a direct connection;
#   (c) hot-swap latency: rename a new .wasm into the watched folder -> new version.
#
# Usage: bash bench/plugins.sh [chain|listener|swap]
# Knobs: CHAIN_CONNS=20000 LISTENER_CONNS=2000 LISTENER_ROUNDS=5 CLIENTS=4 SWAPS=10
# Needs: rustup target add wasm32-wasip2 (the plugins are built from plugins/).
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench --locked -p wasmbassador --bench plugin_chain -- "$@"
