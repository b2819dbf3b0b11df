#!/usr/bin/env bash
# Plugin-chain benchmark of issue 3, in one run (a benchmark, not a test: nothing is
# asserted, a Markdown table is printed):
#   (a) in-process cost of the listener's plugin Chain over 0, 1 and 3 real plugins;
#   (b) new connections/s and latency through a running release wasmbassador (tcp
#       listeners with 0, 1, 3 plugins) next to a direct connection;
#   (c) hot-swap latency: rename a new .wasm into the watched folder -> new version;
#   (d) the http hooks per request, in process;
#   (e) new connections/s through postgres listeners (0, 1, 3 plugins) to a real
#       PostgreSQL 15 that the bench starts (initdb in a temporary folder).
# (b) and (e) also run three allow-all plugins: the least any three-plugin chain costs.
#
# Usage: bash bench/plugins.sh [chain|http|listener|swap|postgres]
# Knobs: CHAIN_CONNS=20000 LISTENER_CONNS=2000 LISTENER_ROUNDS=9 CLIENTS=4 SWAPS=10
#        PG_CONNS=300 PG_ROUNDS=7
# Needs: rustup target add wasm32-wasip2 (the plugins are built from plugins/), and
# PostgreSQL 15 for (e) (.ci/run installs both).
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench --locked -p wasmbassador --bench plugin_chain -- "$@"
