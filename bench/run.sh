#!/usr/bin/env bash
# Side-by-side benchmark on loopback, all in one run:
#   direct  vs  wasmbassador  vs  HAProxy (tcp mode; skipped if not installed)
# - bulk throughput with iperf3 (plain-text upstream, so the proxies do the same work),
#   also through bench/relay.py, a bare splice(2) relay: the floor for any user-space
#   relay on this machine
# - pgbench -S -c 8 TPS against a real PostgreSQL 15 (plain, and TLS upstream for wasmbassador)
# - new connections per second: pgbench -S -C (a new connection per transaction)
# - wasmbassador RSS idle and with 1,000 open connections (HAProxy's too, for scale)
#
# Usage: bash bench/run.sh            (needs: .ci/run once, for the packages)
# Knobs: SECONDS_PER_RUN=10 ROUNDS=3 CLIENTS=8 CONNS=1000 WB_BIN=path/to/wasmbassador
# Prints a Markdown table; nothing is asserted (this is a benchmark, not a test).
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${SECONDS_PER_RUN:-10}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-8}
CONNS=${CONNS:-1000}
PGBIN=/usr/lib/postgresql/15/bin
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/wasmbassador/target}"

# WB_BIN=path skips the build (for a binary built just before).
if [ -z "${WB_BIN:-}" ]; then
  cargo build --release --locked -p wasmbassador >&2
fi
WB="${WB_BIN:-$CARGO_TARGET_DIR/release/wasmbassador}"

WORK=$(mktemp -d /tmp/wasmbassador-bench.XXXXXX)
chmod 755 "$WORK"
PIDS=()
PGDATA="$WORK/pg"
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  if [ -f "$PGDATA/postmaster.pid" ]; then as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m immediate stop >/dev/null 2>&1 || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

# --- certificates (openssl; the tests use rcgen) ---------------------------------
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-ca \
  -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=db.bench.internal \
  -keyout "$WORK/server.key" -out "$WORK/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:db.bench.internal\n' >"$WORK/ext"
openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" -CAcreateserial \
  -days 2 -extfile "$WORK/ext" -out "$WORK/server.pem" 2>/dev/null

# --- PostgreSQL 15, plain and TLS on one port -------------------------------------
PGPORT=$(free_port)
mkdir -p "$PGDATA"
[ "$(id -u)" = 0 ] && chown postgres "$PGDATA" "$WORK"
as_pg "$PGBIN/initdb" -D "$PGDATA" -U postgres --auth=trust --no-locale >/dev/null
cp "$WORK/server.pem" "$WORK/server.key" "$PGDATA/"
[ "$(id -u)" = 0 ] && chown postgres "$PGDATA/server.pem" "$PGDATA/server.key"
chmod 600 "$PGDATA/server.key"
cat >>"$PGDATA/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PGPORT
unix_socket_directories = '$PGDATA'
ssl = on
ssl_cert_file = 'server.pem'
ssl_key_file = 'server.key'
max_connections = 300
fsync = off
EOF
printf 'local all all trust\nhost all all 127.0.0.1/32 trust\n' >"$PGDATA/pg_hba.conf"
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/log" -w start >/dev/null
"$PGBIN/pgbench" -h 127.0.0.1 -p "$PGPORT" -U postgres -i -s 10 postgres >/dev/null 2>&1

# --- iperf3 and redis (a server that holds 1,000 idle connections) ----------------
IPORT=$(free_port)
iperf3 -s -p "$IPORT" >/dev/null 2>&1 &
PIDS+=($!)
RPORT=$(free_port)
redis-server --port "$RPORT" --save '' --appendonly no --maxclients 20000 >/dev/null 2>&1 &
PIDS+=($!)
wait_port "$IPORT"; wait_port "$RPORT"

# --- wasmbassador -----------------------------------------------------------------
W_ADMIN=$(free_port); W_IPERF=$(free_port); W_PG=$(free_port); W_PGTLS=$(free_port); W_REDIS=$(free_port)
cat >"$WORK/wb.toml" <<EOF
[admin]
listen = "127.0.0.1:$W_ADMIN"
[[listener]]
name = "iperf"
listen = "127.0.0.1:$W_IPERF"
upstream = "iperf"
[[listener]]
name = "pg"
listen = "127.0.0.1:$W_PG"
protocol = "postgres"
upstream = "pg"
[[listener]]
name = "pg-tls"
listen = "127.0.0.1:$W_PGTLS"
protocol = "postgres"
upstream = "pg-tls"
[[listener]]
name = "redis"
listen = "127.0.0.1:$W_REDIS"
upstream = "redis"
[[upstream]]
name = "iperf"
endpoint = [{ address = "127.0.0.1:$IPORT" }]
[[upstream]]
name = "pg"
health = { check = "postgres" }
endpoint = [{ address = "127.0.0.1:$PGPORT" }]
[[upstream]]
name = "pg-tls"
health = { check = "postgres" }
tls = { ca = "$WORK/ca.pem", server_name = "db.bench.internal" }
endpoint = [{ address = "127.0.0.1:$PGPORT" }]
[[upstream]]
name = "redis"
endpoint = [{ address = "127.0.0.1:$RPORT" }]
EOF
RUST_LOG=warn "$WB" run --config "$WORK/wb.toml" 2>"$WORK/wb.log" &
WB_PID=$!
PIDS+=($WB_PID)
wait_port "$W_PG" || { cat "$WORK/wb.log" >&2; exit 1; }

# --- HAProxy ------------------------------------------------------------------------
HAVE_HA=0
if command -v haproxy >/dev/null; then
  HAVE_HA=1
  H_IPERF=$(free_port); H_SPLICE=$(free_port); H_PG=$(free_port); H_REDIS=$(free_port)
  cat >"$WORK/haproxy.cfg" <<EOF
global
  maxconn 5000
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
listen iperf
  bind 127.0.0.1:$H_IPERF
  server s 127.0.0.1:$IPORT
listen iperf_splice
  bind 127.0.0.1:$H_SPLICE
  option splice-auto
  server s 127.0.0.1:$IPORT
listen pg
  bind 127.0.0.1:$H_PG
  server s 127.0.0.1:$PGPORT
listen redis
  bind 127.0.0.1:$H_REDIS
  server s 127.0.0.1:$RPORT
EOF
  haproxy -f "$WORK/haproxy.cfg" -db >/dev/null 2>&1 &
  HA_PID=$!
  PIDS+=($HA_PID)
  wait_port "$H_PG" || { echo "haproxy did not start" >&2; exit 1; }
fi

# --- the reference splice relay ------------------------------------------------------
R_IPERF=$(free_port)
python3 bench/relay.py "$R_IPERF" "$IPORT" &
PIDS+=($!)
wait_port "$R_IPERF"

WB_IDLE_RSS=$(rss_kib "$WB_PID")

iperf() { # port -> Gbit/s (receiver)
  iperf3 -c 127.0.0.1 -p "$1" -t "$SECS" -J 2>/dev/null |
    python3 -c 'import json,sys; print("%.1f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'
}
pgb() { # port sslmode extra-args -> tps
  local port=$1 ssl=$2; shift 2
  PGSSLMODE=$ssl PGSSLROOTCERT="$WORK/ca.pem" "$PGBIN/pgbench" -h 127.0.0.1 -p "$port" -U postgres \
    -n -S -c "$CLIENTS" -j 2 -T "$SECS" "$@" postgres 2>/dev/null |
    awk '/^tps/ {printf "%.0f", $3; exit}'
}
hold_conns() { # port pid -> RSS of pid (KiB) with $CONNS open connections through port
  python3 - "$1" "$2" "$CONNS" <<'PY'
import socket, sys, time
port, pid, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
socks = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port)); s.sendall(b"PING\r\n"); socks.append(s)
for s in socks:
    assert s.recv(16).startswith(b"+PONG")
time.sleep(1)
print(next(l.split()[1] for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS")))
PY
}

# Each measure runs ROUNDS times per target, the targets interleaved within a round
# (direct, wasmbassador, HAProxy, direct, ...), and reports the median: load that comes
# and goes on a shared machine then hits every target alike.
median() { python3 -c 'import statistics,sys; v=[float(x) for x in sys.argv[1:] if x not in ("", "-")]; print("-" if not v else "%g" % statistics.median(v))' "$@"; }
declare -A RUNS
measure() { # key command... : appends one result to RUNS[key]
  local key=$1; shift
  RUNS[$key]="${RUNS[$key]:-} $("$@")"
}
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round of $ROUNDS: iperf3, pgbench -S -c $CLIENTS, pgbench -S -C (${SECS}s each)" >&2
  measure i_direct iperf "$IPORT"; measure i_wb iperf "$W_IPERF"; measure i_relay iperf "$R_IPERF"
  if [ $HAVE_HA = 1 ]; then measure i_ha iperf "$H_IPERF"; measure i_has iperf "$H_SPLICE"; fi
  measure p_direct pgb "$PGPORT" disable; measure p_wb pgb "$W_PG" disable
  [ $HAVE_HA = 1 ] && measure p_ha pgb "$H_PG" disable
  measure pt_direct pgb "$PGPORT" verify-ca; measure pt_wb pgb "$W_PGTLS" disable
  measure c_direct pgb "$PGPORT" disable -C; measure c_wb pgb "$W_PG" disable -C
  [ $HAVE_HA = 1 ] && measure c_ha pgb "$H_PG" disable -C
  measure ct_direct pgb "$PGPORT" verify-ca -C; measure ct_wb pgb "$W_PGTLS" disable -C
done
m() { median ${RUNS[$1]:-}; }
I_DIRECT=$(m i_direct); I_WB=$(m i_wb); I_HA=$(m i_ha); I_HAS=$(m i_has); I_RELAY=$(m i_relay)
P_DIRECT=$(m p_direct); P_WB=$(m p_wb); P_HA=$(m p_ha)
P_DIRECT_TLS=$(m pt_direct); P_WB_TLS=$(m pt_wb)
C_DIRECT=$(m c_direct); C_WB=$(m c_wb); C_HA=$(m c_ha)
C_DIRECT_TLS=$(m ct_direct); C_WB_TLS=$(m ct_wb)
echo "running: $CONNS open connections" >&2
WB_CONN_RSS=$(hold_conns "$W_REDIS" "$WB_PID"); HA_CONN_RSS=-; HA_IDLE_RSS=-
if [ $HAVE_HA = 1 ]; then HA_IDLE_RSS=$(rss_kib "$HA_PID"); HA_CONN_RSS=$(hold_conns "$H_REDIS" "$HA_PID"); fi

ratio() { python3 -c "import sys; a,b=sys.argv[1],sys.argv[2]; print('-' if '-' in (a,b) else '%.2f' % (float(a)/float(b)))" "$1" "$2"; }
mib() { [ "$1" = - ] && echo - || python3 -c "print('%.1f' % ($1/1024))"; }

cat <<EOF

wasmbassador $("$WB" --version | awk '{print $2}') benchmark, $(date -u +%Y-%m-%d), $(nproc) cores, loopback, median of $ROUNDS interleaved rounds of ${SECS}s per measure
| measure | direct | wasmbassador | HAProxy | wasmbassador / direct | wasmbassador / HAProxy |
|---|---|---|---|---|---|
| iperf3 throughput, Gbit/s | $I_DIRECT | $I_WB | $I_HA | $(ratio "$I_WB" "$I_DIRECT") | $(ratio "$I_WB" "$I_HA") |
| iperf3 throughput, Gbit/s, HAProxy with \`option splice-auto\` | $I_DIRECT | $I_WB | $I_HAS | $(ratio "$I_WB" "$I_DIRECT") | $(ratio "$I_WB" "$I_HAS") |
| iperf3 throughput, Gbit/s, bare splice relay (bench/relay.py) in the HAProxy column | $I_DIRECT | $I_WB | $I_RELAY | $(ratio "$I_WB" "$I_DIRECT") | $(ratio "$I_WB" "$I_RELAY") |
| pgbench -S -c $CLIENTS TPS, plain upstream | $P_DIRECT | $P_WB | $P_HA | $(ratio "$P_WB" "$P_DIRECT") | $(ratio "$P_WB" "$P_HA") |
| pgbench -S -c $CLIENTS TPS, TLS upstream (direct = TLS end to end) | $P_DIRECT_TLS | $P_WB_TLS | - | $(ratio "$P_WB_TLS" "$P_DIRECT_TLS") | - |
| new connections/s (pgbench -S -C), plain upstream | $C_DIRECT | $C_WB | $C_HA | $(ratio "$C_WB" "$C_DIRECT") | $(ratio "$C_WB" "$C_HA") |
| new connections/s (pgbench -S -C), TLS upstream | $C_DIRECT_TLS | $C_WB_TLS | - | $(ratio "$C_WB_TLS" "$C_DIRECT_TLS") | - |
| RSS idle, MiB | - | $(mib "$WB_IDLE_RSS") | $(mib "$HA_IDLE_RSS") | - | - |
| RSS with $CONNS open connections, MiB | - | $(mib "$WB_CONN_RSS") | $(mib "$HA_CONN_RSS") | - | - |
EOF
