#!/usr/bin/env bash
# HTTP benchmark on loopback, all in one run (a benchmark, not a test: nothing is
# asserted, Markdown tables are printed):
#   direct  vs  wasmbassador (`protocol = "http"`)  vs  HAProxy (`mode http`)
# against nginx serving a small static file over HTTP/1.1 keep-alive, on a plain-text
# port and on a TLS port (a certificate made here with openssl):
# - wrk -t2 -c$CLIENTS --latency: requests/s, p50 and p99 latency, proxy CPU per request,
#   for a plain-text upstream (0 plugins), a TLS upstream (0 plugins) and a TLS upstream
#   with 3 plugins in wasmbassador's chain (bearer-token, header-router, http-metrics;
#   three http-stamp test plugins stand in until those are built) on both upstreams, and
#   three http-pass test plugins on the TLS upstream: six hook calls per request
#   (on-request and on-response each) that do nothing, the runtime's own cost;
# - upstream TLS handshakes for $HS_REQUESTS requests each on a new app connection
#   (wrk -H "Connection: close"), counted from nginx's access log ($connection_requests
#   = 1 is a new upstream connection): how many connections each proxy opened.
#
# Usage: bash bench/http.sh
# Knobs: SECONDS_PER_RUN=10 ROUNDS=3 CLIENTS=32 THREADS=2 HS_REQUESTS=2000 HS_CLIENTS=8
#        BODY_BYTES=128 NGINX_WORKERS=1 UPSTREAM_H2=0 (1: nginx offers h2 on TLS, HAProxy
#        `alpn h2,http/1.1`) WB_BIN=path/to/wasmbassador (skips the host build)
#        PLUGIN_DIR=folder/with/*.wasm (skips the plugin build)
#        WB_WORKERS=N (wasmbassador --workers N; default one thread per CPU)
# Installs wrk, nginx-light (or nginx) and haproxy with apt-get when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${SECONDS_PER_RUN:-10}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-32}
THREADS=${THREADS:-2}
HS_REQUESTS=${HS_REQUESTS:-2000}
HS_CLIENTS=${HS_CLIENTS:-8}
BODY_BYTES=${BODY_BYTES:-128}
NGINX_WORKERS=${NGINX_WORKERS:-1}
UPSTREAM_H2=${UPSTREAM_H2:-0}
SERVER_NAME=upstream.bench.internal
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/wasmbassador/target}"

# --- packages -----------------------------------------------------------------------
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v haproxy >/dev/null || need+=(haproxy)
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  if apt-cache show nginx-light >/dev/null 2>&1; then need+=(nginx-light); else need+=(nginx); fi
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

# --- builds ---------------------------------------------------------------------------
# WB_BIN=path skips the host build (for a binary built just before).
if [ -z "${WB_BIN:-}" ]; then
  cargo build --release --locked -p wasmbassador >&2
fi
WB="${WB_BIN:-$CARGO_TARGET_DIR/release/wasmbassador}"

# PLUGIN_DIR=folder skips the plugin build. A failed build (plugins/ being edited) is not
# fatal: whatever .wasm files are already there are used.
if [ -z "${PLUGIN_DIR:-}" ]; then
  PLUGIN_DIR="$CARGO_TARGET_DIR/wasm32-wasip2/release"
  cargo build --locked --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --release >&2 ||
    echo "warning: the plugin build failed; using the .wasm files already in $PLUGIN_DIR" >&2
fi

WORK=$(mktemp -d /tmp/wasmbassador-http-bench.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  # nginx's workers leave with their master: give everything a moment, bounded
  for p in "${PIDS[@]:-}"; do
    for _ in $(seq 1 50); do [ -n "$p" ] && kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }

# --- the 3-plugin chain: the real http plugins when built, else http-stamp x3 --------
if [ -f "$PLUGIN_DIR/bearer_token.wasm" ] && [ -f "$PLUGIN_DIR/header_router.wasm" ] &&
  [ -f "$PLUGIN_DIR/http_metrics.wasm" ]; then
  printf 'bench-upstream-token\n' >"$WORK/token"
  CHAIN_NAMES="bearer-token, header-router, http-metrics"
  CHAIN_PLUGINS=$(
    cat <<EOF
[[plugin]]
name = "bearer-token"
path = "$PLUGIN_DIR/bearer_token.wasm"
grants = { files = ["$WORK/token"] }
config = { token_file = "$WORK/token" }
[[plugin]]
name = "header-router"
path = "$PLUGIN_DIR/header_router.wasm"
config = { rules = [{ header = "x-tenant", equals = "beta", route = { tag = "beta" } }] }
[[plugin]]
name = "http-metrics"
path = "$PLUGIN_DIR/http_metrics.wasm"
config = { routes = [{ name = "root", prefix = "/" }] }
EOF
  )
  CHAIN_LIST='["bearer-token", "header-router", "http-metrics"]'
elif [ -f "$PLUGIN_DIR/http_stamp.wasm" ]; then
  echo "note: bearer-token, header-router or http-metrics not built in $PLUGIN_DIR; three http-stamp test plugins stand in" >&2
  CHAIN_NAMES="http-stamp x3 (stand-in for bearer-token, header-router, http-metrics)"
  CHAIN_PLUGINS=""
  for n in a b c; do
    CHAIN_PLUGINS+="[[plugin]]
name = \"stamp-$n\"
path = \"$PLUGIN_DIR/http_stamp.wasm\"
config = { name = \"$n\" }
"
  done
  CHAIN_LIST='["stamp-a", "stamp-b", "stamp-c"]'
else
  echo "no plugins in $PLUGIN_DIR (rustup target add wasm32-wasip2, then build plugins/)" >&2
  exit 1
fi

# --- certificates (openssl) -----------------------------------------------------------
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-ca \
  -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$SERVER_NAME" \
  -keyout "$WORK/server.key" -out "$WORK/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:%s\n' "$SERVER_NAME" >"$WORK/ext"
openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" -CAcreateserial \
  -days 2 -extfile "$WORK/ext" -out "$WORK/server.pem" 2>/dev/null

# --- nginx: plain-text, TLS, and a logged TLS port for the handshake count --------------
N_PLAIN=$(free_port); N_TLS=$(free_port); N_HS=$(free_port)
mkdir -p "$WORK/nginx" "$WORK/www"
chmod 755 "$WORK/nginx" "$WORK/www"
head -c "$BODY_BYTES" /dev/zero | tr '\0' x >"$WORK/www/hello.txt"
chmod 644 "$WORK/www/hello.txt"
H2=""; [ "$UPSTREAM_H2" = 1 ] && H2=" http2"
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes $NGINX_WORKERS;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 8192; }
http {
  default_type text/plain;
  access_log off;
  keepalive_timeout 300s;
  keepalive_requests 1000000;
  open_file_cache max=16;
  root $WORK/www;
  ssl_certificate $WORK/server.pem;
  ssl_certificate_key $WORK/server.key;
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_session_cache shared:SSL:10m;
  log_format hs '\$connection \$connection_requests \$ssl_session_reused \$status';
  server { listen 127.0.0.1:$N_PLAIN; }
  server { listen 127.0.0.1:$N_TLS ssl$H2; server_name $SERVER_NAME; }
  server { listen 127.0.0.1:$N_HS ssl$H2; server_name $SERVER_NAME; access_log $WORK/nginx/hs.log hs; }
}
EOF
"$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" -g 'daemon off;' &
PIDS+=($!)
wait_port "$N_PLAIN" || { cat "$WORK/nginx/error.log" >&2; exit 1; }
wait_port "$N_TLS"; wait_port "$N_HS"

# --- wasmbassador -------------------------------------------------------------------------
W_ADMIN=$(free_port); W_PLAIN=$(free_port); W_TLS=$(free_port); W_TLS3=$(free_port); W_HS=$(free_port)
W_FLOOR=$(free_port); W_PLAIN3=$(free_port)
# The floor row: three plugins whose hooks do nothing (when http-pass is built).
FLOOR_BLOCK=""; FLOOR_PLUGINS=""
if [ -f "$PLUGIN_DIR/http_pass.wasm" ]; then
  FLOOR_BLOCK="[[listener]]
name = \"tls-3-pass\"
listen = \"127.0.0.1:$W_FLOOR\"
protocol = \"http\"
upstream = \"tls\"
plugins = [\"pass-1\", \"pass-2\", \"pass-3\"]"
  for n in 1 2 3; do
    FLOOR_PLUGINS+="[[plugin]]
name = \"pass-$n\"
path = \"$PLUGIN_DIR/http_pass.wasm\"
"
  done
else
  echo "note: http-pass not built in $PLUGIN_DIR; no floor row" >&2
fi
cat >"$WORK/wb.toml" <<EOF
[admin]
listen = "127.0.0.1:$W_ADMIN"
[[listener]]
name = "plain"
listen = "127.0.0.1:$W_PLAIN"
protocol = "http"
upstream = "plain"
[[listener]]
name = "plain-3-plugins"
listen = "127.0.0.1:$W_PLAIN3"
protocol = "http"
upstream = "plain"
plugins = $CHAIN_LIST
[[listener]]
name = "tls"
listen = "127.0.0.1:$W_TLS"
protocol = "http"
upstream = "tls"
[[listener]]
name = "tls-3-plugins"
listen = "127.0.0.1:$W_TLS3"
protocol = "http"
upstream = "tls"
plugins = $CHAIN_LIST
$FLOOR_BLOCK
[[listener]]
name = "handshakes"
listen = "127.0.0.1:$W_HS"
protocol = "http"
upstream = "handshakes"
[[upstream]]
name = "plain"
endpoint = [{ address = "127.0.0.1:$N_PLAIN" }]
[[upstream]]
name = "tls"
tls = { ca = "$WORK/ca.pem", server_name = "$SERVER_NAME" }
endpoint = [{ address = "127.0.0.1:$N_TLS" }]
[[upstream]]
name = "handshakes"
tls = { ca = "$WORK/ca.pem", server_name = "$SERVER_NAME" }
endpoint = [{ address = "127.0.0.1:$N_HS" }]
$CHAIN_PLUGINS
$FLOOR_PLUGINS
EOF
# WB_WORKERS=N runs wasmbassador with `--workers N` (default: one per CPU).
WB_ARGS=()
[ -n "${WB_WORKERS:-}" ] && WB_ARGS=(--workers "$WB_WORKERS")
RUST_LOG=warn "$WB" "${WB_ARGS[@]}" run --config "$WORK/wb.toml" 2>"$WORK/wb.log" &
WB_PID=$!
PIDS+=($WB_PID)
wait_port "$W_HS" || { cat "$WORK/wb.log" >&2; exit 1; }

# --- HAProxy (mode http; default http-reuse safe, and `http-reuse always` for the count) --
H_PLAIN=$(free_port); H_TLS=$(free_port); H_HS=$(free_port); H_HS_ALWAYS=$(free_port)
ALPN=""; [ "$UPSTREAM_H2" = 1 ] && ALPN=" alpn h2,http/1.1"
HA_SSL="ssl verify required ca-file $WORK/ca.pem sni str($SERVER_NAME) verifyhost $SERVER_NAME$ALPN"
cat >"$WORK/haproxy.cfg" <<EOF
global
  maxconn 5000
defaults
  mode http
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout http-keep-alive 1h
listen plain
  bind 127.0.0.1:$H_PLAIN
  server s 127.0.0.1:$N_PLAIN
listen tls
  bind 127.0.0.1:$H_TLS
  server s 127.0.0.1:$N_TLS $HA_SSL
listen handshakes
  bind 127.0.0.1:$H_HS
  server s 127.0.0.1:$N_HS $HA_SSL
listen handshakes_always
  bind 127.0.0.1:$H_HS_ALWAYS
  http-reuse always
  server s 127.0.0.1:$N_HS $HA_SSL
EOF
haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 &
HA_PID=$!
PIDS+=($HA_PID)
wait_port "$H_HS_ALWAYS" || { cat "$WORK/haproxy.log" >&2; exit 1; }

# --- every target answers 200 with the file before anything is timed ---------------------
check() { # url [curl args...]
  local url=$1; shift
  local body
  body=$(curl -sS --max-time 5 --fail "$@" "$url") || { echo "no 200 from $url" >&2; cat "$WORK/wb.log" >&2; exit 1; }
  [ "${#body}" = "$BODY_BYTES" ] || { echo "wrong body from $url: $body" >&2; exit 1; }
}
check "http://127.0.0.1:$N_PLAIN/hello.txt"
check "https://$SERVER_NAME:$N_TLS/hello.txt" --cacert "$WORK/ca.pem" --resolve "$SERVER_NAME:$N_TLS:127.0.0.1"
FLOOR_PORT=""; [ -n "$FLOOR_BLOCK" ] && FLOOR_PORT=$W_FLOOR
for p in $W_PLAIN $W_PLAIN3 $W_TLS $W_TLS3 $FLOOR_PORT $W_HS $H_PLAIN $H_TLS $H_HS $H_HS_ALWAYS; do
  check "http://127.0.0.1:$p/hello.txt"
done
# ... and the chain really ran (its plugins' calls are counted).
calls=$(curl -sS --max-time 5 "http://127.0.0.1:$W_ADMIN/metrics" | awk '/^wasmbassador_plugin_calls_total/ {n += $NF} END {print n + 0}')
[ "$calls" -gt 0 ] || { echo "the plugin chain was not called" >&2; exit 1; }

# --- wrk ----------------------------------------------------------------------------------
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)
# One wrk run: prints "requests/s p50_ms p99_ms errors proxy_cpu_us_per_request".
wrkrun() { # url proxy-pid-or-0
  local url=$1 pid=$2 out c0=0 c1=0
  [ "$pid" != 0 ] && c0=$(cpu_ticks "$pid")
  out=$(timeout $((SECS + 30)) wrk -t"$THREADS" -c"$CLIENTS" -d"${SECS}s" --latency "$url" 2>&1) || true
  [ "$pid" != 0 ] && c1=$(cpu_ticks "$pid")
  WRK_OUT=$out python3 - "$pid" "$c0" "$c1" "$TICK" <<'PY'
import os, re, sys
out = os.environ["WRK_OUT"]
pid, c0, c1, tick = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def ms(v):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", v)
    return float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[m.group(2)]
rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
n = re.search(r"(\d+) requests in", out)
p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
errs = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
errs += int(non2xx.group(1)) if non2xx else 0
if not (rps and n and p50 and p99):
    print("- - - - -"); sys.stderr.write(out); sys.exit()
cpu = "-" if pid == "0" or int(n.group(1)) == 0 else "%.1f" % ((c1 - c0) / tick * 1e6 / int(n.group(1)))
print("%.0f %.3f %.3f %d %s" % (float(rps.group(1)), ms(p50.group(1)), ms(p99.group(1)), errs, cpu))
PY
}
declare -A RUNS
measure() { # key url pid : appends one result of each column to RUNS[key.col]
  local key=$1 r
  read -r -a r <<<"$(wrkrun "$2" "$3")"
  RUNS[$key.rps]="${RUNS[$key.rps]:-} ${r[0]}"; RUNS[$key.p50]="${RUNS[$key.p50]:-} ${r[1]}"
  RUNS[$key.p99]="${RUNS[$key.p99]:-} ${r[2]}"; RUNS[$key.err]="${RUNS[$key.err]:-} ${r[3]}"
  RUNS[$key.cpu]="${RUNS[$key.cpu]:-} ${r[4]}"
}
median() { python3 -c 'import statistics,sys; v=[float(x) for x in sys.argv[1:] if x not in ("", "-")]; print("-" if not v else "%g" % statistics.median(v))' "$@"; }
total() { python3 -c 'import sys; v=[int(x) for x in sys.argv[1:] if x not in ("", "-")]; print(sum(v))' "$@"; }

# Targets: key url proxy-pid
TARGETS=(
  "p_direct http://127.0.0.1:$N_PLAIN/hello.txt 0"
  "p_wb http://127.0.0.1:$W_PLAIN/hello.txt $WB_PID"
  "p_wb3 http://127.0.0.1:$W_PLAIN3/hello.txt $WB_PID"
  "p_ha http://127.0.0.1:$H_PLAIN/hello.txt $HA_PID"
  "t_direct https://127.0.0.1:$N_TLS/hello.txt 0"
  "t_wb http://127.0.0.1:$W_TLS/hello.txt $WB_PID"
  "t_wb3 http://127.0.0.1:$W_TLS3/hello.txt $WB_PID"
  "t_ha http://127.0.0.1:$H_TLS/hello.txt $HA_PID"
)
[ -n "$FLOOR_PORT" ] && TARGETS+=("t_wbf http://127.0.0.1:$W_FLOOR/hello.txt $WB_PID")
echo "warm-up: 1s per target" >&2
for t in "${TARGETS[@]}"; do
  read -r _ url _ <<<"$t"
  timeout 30 wrk -t"$THREADS" -c"$CLIENTS" -d1s "$url" >/dev/null 2>&1 || true
done
# Each target runs ROUNDS times, the targets interleaved within a round, and the tables
# show medians: load that comes and goes on a shared machine then hits every target alike.
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round of $ROUNDS: wrk -t$THREADS -c$CLIENTS -d${SECS}s on ${#TARGETS[@]} targets" >&2
  for t in "${TARGETS[@]}"; do
    read -r key url pid <<<"$t"
    measure "$key" "$url" "$pid"
  done
done

# --- upstream handshakes for HS_REQUESTS requests, each on a new app connection -----------
cat >"$WORK/stop.lua" <<'EOF'
-- stop this thread after its share of the requests (init gets it as the first argument)
local want, seen = 0, 0
function init(args) want = tonumber(args[1]) end
function response()
  seen = seen + 1
  if seen >= want then wrk.thread:stop() end
end
EOF
# wrk's threads stop themselves after their share (stop.lua), but wrk itself sleeps for
# all of -d: so it runs in the background and gets SIGINT (it then prints its results)
# once the upstream has logged every request, or after HS_LIMIT seconds at most.
HS_LIMIT=120
declare -A HS
hs_run() { # key url : HS[key] = "app_requests upstream_requests handshakes resumed conns_per_s"
  local key=$1 url=$2 before t0 t1 pid seen=0
  before=$(wc -l <"$WORK/nginx/hs.log")
  t0=$(date +%s.%N)
  wrk -t"$THREADS" -c"$HS_CLIENTS" -d"${HS_LIMIT}s" -H "Connection: close" -s "$WORK/stop.lua" \
    "$url" -- $((HS_REQUESTS / THREADS)) >"$WORK/hs.out" 2>&1 &
  pid=$!
  PIDS+=($pid)
  for _ in $(seq 1 $((HS_LIMIT * 20))); do
    seen=$(($(wc -l <"$WORK/nginx/hs.log") - before))
    [ "$seen" -ge "$HS_REQUESTS" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  t1=$(date +%s.%N)
  kill -INT "$pid" 2>/dev/null || true
  wait "$pid" || true
  unset 'PIDS[-1]'
  sleep 0.5 # a proxy may still be finishing a request the app no longer waits for
  HS[$key]=$(tail -n +"$((before + 1))" "$WORK/nginx/hs.log" | python3 -c '
import re, sys
out, secs, seen = open(sys.argv[1]).read(), float(sys.argv[2]), int(sys.argv[3])
lines = [l.split() for l in sys.stdin if l.strip()]
n = re.search(r"(\d+) requests in", out)
new = [l for l in lines if l[1] == "1"]
print(n.group(1) if n else "-", len(lines), len(new), sum(1 for l in new if l[2] == "r"),
      "%.0f" % (seen / secs) if secs > 0 else "-")
' "$WORK/hs.out" "$(python3 -c "print($t1 - $t0)")" "$seen")
}
echo "handshakes: $HS_REQUESTS requests, each on a new connection (wrk -c$HS_CLIENTS -H 'Connection: close')" >&2
hs_run direct "https://127.0.0.1:$N_HS/hello.txt"
hs_run wb "http://127.0.0.1:$W_HS/hello.txt"
hs_run ha "http://127.0.0.1:$H_HS/hello.txt"
hs_run ha_always "http://127.0.0.1:$H_HS_ALWAYS/hello.txt"
WB_OPENED=$(curl -sS --max-time 5 "http://127.0.0.1:$W_ADMIN/metrics" |
  awk '/^wasmbassador_http_upstream_connections_opened_total\{.*upstream="handshakes"/ {n += $NF} END {print n + 0}')

# --- tables -----------------------------------------------------------------------------
m() { median ${RUNS[$1]:-}; }
ratio() { python3 -c "import sys; a,b=sys.argv[1],sys.argv[2]; print('-' if '-' in (a,b) or float(b) == 0 else '%.2f' % (float(a)/float(b)))" "$1" "$2"; }
row() { # label key direct-key ha-key
  local rps
  rps=$(m "$2.rps")
  echo "| $1 | $rps | $(m "$2.p50") | $(m "$2.p99") | $(m "$2.cpu") | $(ratio "$rps" "$(m "$3.rps")") | $(ratio "$rps" "$(m "$4.rps")") | $(total ${RUNS[$2.err]:-}) |"
}
hs_row() { # label "app upstream handshakes resumed rate"
  local a
  read -r -a a <<<"$2"
  echo "| $1 | ${a[0]} | ${a[1]} | ${a[2]} | ${a[3]} | ${a[4]} |"
}
PROTO="HTTP/1.1"; [ "$UPSTREAM_H2" = 1 ] && PROTO="h2 or HTTP/1.1 by ALPN"
cost() { python3 -c "import sys; a,b=sys.argv[1],sys.argv[2]; print('-' if '-' in (a,b) else '%.1f%%' % (100*(1-float(a)/float(b))))" "$1" "$2"; }
COST=$(cost "$(m t_wb3.rps)" "$(m t_wb.rps)")
PLAIN_COST=$(cost "$(m p_wb3.rps)" "$(m p_wb.rps)")
FLOOR_ROW=""; FLOOR_LINE=""
if [ -n "$FLOOR_PORT" ]; then
  FLOOR_ROW=$(row "TLS upstream: wasmbassador, 3 × http-pass (6 hook calls that do nothing)" t_wbf t_direct t_ha)
  FLOOR_LINE="3 × http-pass (six hook calls a request, each doing nothing) cost $(cost "$(m t_wbf.rps)" "$(m t_wb.rps)"); proxy CPU per request on the TLS upstream, 0 plugins → 3 plugins → 3 × http-pass: $(m t_wb.cpu) → $(m t_wb3.cpu) → $(m t_wbf.cpu) µs."
fi

cat <<EOF

wasmbassador $("$WB" --version | awk '{print $2}') HTTP benchmark, $(date -u +%Y-%m-%d), $(nproc) cores, loopback, nginx $("$NGINX" -v 2>&1 | sed 's|.*/||') ($NGINX_WORKERS worker, ${BODY_BYTES}-byte static file, TLS port $PROTO), $(haproxy -v | awk 'NR==1 {print "HAProxy " $3}') (mode http), wrk -t$THREADS -c$CLIENTS --latency, median of $ROUNDS interleaved rounds of ${SECS}s, wasmbassador workers: ${WB_WORKERS:-one per CPU}
| target | requests/s | p50 ms | p99 ms | proxy CPU µs/request | vs direct | vs HAProxy | errors |
|---|---:|---:|---:|---:|---:|---:|---:|
$(row "plain-text upstream: direct" p_direct p_direct p_ha)
$(row "plain-text upstream: wasmbassador, 0 plugins" p_wb p_direct p_ha)
$(row "plain-text upstream: wasmbassador, 3 plugins" p_wb3 p_direct p_ha)
$(row "plain-text upstream: HAProxy" p_ha p_direct p_ha)
$(row "TLS upstream: direct (wrk over https)" t_direct t_direct t_ha)
$(row "TLS upstream: wasmbassador, 0 plugins" t_wb t_direct t_ha)
$(row "TLS upstream: wasmbassador, 3 plugins" t_wb3 t_direct t_ha)
$FLOOR_ROW
$(row "TLS upstream: HAProxy (ssl verify required)" t_ha t_direct t_ha)

3 plugins ($CHAIN_NAMES) cost $COST of the 0-plugin requests/s on the TLS upstream, $PLAIN_COST on the plain-text one.
$FLOOR_LINE

Upstream TLS handshakes for $HS_REQUESTS requests, each on a new app connection (wrk -t$THREADS -c$HS_CLIENTS -H "Connection: close"; counted in nginx's access log: \`\$connection_requests\` = 1 is a new connection, \`\$ssl_session_reused\` = r a resumed session):
| target | app connections (requests) | requests at the upstream | upstream TLS handshakes | of which resumed | app connections/s |
|---|---:|---:|---:|---:|---:|
$(hs_row "direct (each wrk connection is one)" "${HS[direct]}")
$(hs_row "wasmbassador (pooled)" "${HS[wb]}")
$(hs_row "HAProxy, default \`http-reuse safe\`" "${HS[ha]}")
$(hs_row "HAProxy, \`http-reuse always\`" "${HS[ha_always]}")

wasmbassador's own count, the pre-run check's request included: wasmbassador_http_upstream_connections_opened_total{upstream="handshakes"} = $WB_OPENED.
EOF
