#!/usr/bin/env bash
# Cluster benchmark (issue 12): one chatloop node against a 2-node cluster through Redis, side
# by side, interleaved, on this machine. Prints a markdown table (for docs/BENCHMARKS.md and
# docs/CLUSTER.md) and leaves the raw JSON in target/cluster-bench/results.jsonl.
#
#   benches/cluster.sh            # 3 runs (about 4 minutes)
#   benches/cluster.sh --runs 1
#   benches/cluster.sh --spread   # the second node on CPU 1 (beside Redis and the generator)
#
# Placement: every chatloop node on CPU 0 (two nodes share it, so the summed server CPU per
# delivery compares like with like: the cluster's overhead, not a second core); Redis and the
# load generator on CPU 1. With --spread the second node runs on CPU 1 instead. Requires redis-server (7+). Only processes this script started are
# stopped, by PID.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=3
OUT=target/cluster-bench
SPREAD=0
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --spread) SPREAD=1; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "cluster.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
command -v redis-server >/dev/null || { echo "cluster.sh: redis-server is required" >&2; exit 2; }
command -v taskset >/dev/null || { echo "cluster.sh: taskset is required" >&2; exit 2; }

cargo build --release --quiet --workspace --bins
BIN=target/release
BENCH="taskset -c 1 $BIN/chatloop-bench -q --json"
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
PIDS=()

stop_all() {
  for p in "${PIDS[@]:-}"; do
    [ -n "$p" ] && kill -TERM "$p" 2>/dev/null || true
  done
  for p in "${PIDS[@]:-}"; do
    [ -n "$p" ] && wait "$p" 2>/dev/null || true
  done
  PIDS=()
}
trap stop_all EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# listen_port PID: the port the process listens on (its first), waited for (bounded).
listen_port() {
  for _ in $(seq 1 100); do
    port=$(ss -Htlnp 2>/dev/null | awk -v pid="pid=$1," '$0 ~ pid {split($4,a,":"); print a[length(a)]; exit}')
    [ -n "$port" ] && { echo "$port"; return; }
    sleep 0.05
  done
  echo "cluster.sh: process $1 never listened" >&2; exit 1
}

COMMON=(--listen 127.0.0.1:0 --presence-limit 0 --log-level warn --max-pending 4MiB --cmd-rate 0 --input-rate 0)

start_redis() {
  RPORT=$(free_port)
  taskset -c 1 redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no >/dev/null 2>&1 &
  REDIS_PID=$!; PIDS+=("$REDIS_PID")
  for _ in $(seq 1 100); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && return; sleep 0.05; done
  echo "cluster.sh: redis did not start" >&2; exit 1
}

# start_node CPU [cluster args...]: a chatloop on CPU; sets NODE_PID and NODE_ADDR.
start_node() {
  local cpu=$1; shift
  taskset -c "$cpu" "$BIN/chatloop" "${COMMON[@]}" "$@" 2>>"$OUT/nodes.log" &
  NODE_PID=$!; PIDS+=("$NODE_PID")
  NODE_ADDR=127.0.0.1:$(listen_port "$NODE_PID")
}

bench() { # bench SETUP RUN ARGS...
  local setup=$1 run=$2; shift 2
  local r
  r=$($BENCH "$@") || r='{"error":"failed"}'
  echo "{\"setup\":\"$setup\",\"run\":$run,\"args\":\"$*\",\"r\":$r}" >> "$RESULTS"
}

scenarios() { # scenarios SETUP RUN ADDRS_AND_PIDS...
  local setup=$1 run=$2; shift 2
  bench "$setup" "$run" fanout --subs 1000 --rate 50 --duration 3s --warmup 1s --drain 1s "$@"
  bench "$setup" "$run" fanout --subs 1000 --rate 200 --duration 3s --warmup 1s --drain 1s "$@"
  bench "$setup" "$run" fanout --subs 10000 --rate 5 --duration 3s --warmup 1s --drain 1s "$@"
}

for run in $(seq 1 "$RUNS"); do
  echo "== run $run/$RUNS: one node" >&2
  start_node 0; A_PID=$NODE_PID; A=$NODE_ADDR
  scenarios single "$run" --addr "$A" --server-pid "$A_PID"
  stop_all
  echo "== run $run/$RUNS: two nodes and Redis" >&2
  start_redis
  start_node 0 --cluster "redis://127.0.0.1:$RPORT" --node-id a; A_PID=$NODE_PID; A=$NODE_ADDR
  start_node "$SPREAD" --cluster "redis://127.0.0.1:$RPORT" --node-id b; B_PID=$NODE_PID; B=$NODE_ADDR
  sleep 0.5 # both nodes' first connection to Redis (logged; not a wait for a measured event)
  scenarios cluster2 "$run" --addr "$A" --also-addr "$B" --server-pid "$A_PID" --also-pid "$B_PID" --redis-pid "$REDIS_PID"
  # Redis's own execution time per command (without its socket I/O), over the whole run.
  redis-cli -p "$RPORT" info commandstats | tr -d '\r' | grep -E '^cmdstat_(fcall|publish|set):' \
    | sed "s/^/{\"setup\":\"redis\",\"run\":$run,\"stat\":\"/; s/\$/\"}/" >> "$RESULTS"
  stop_all
done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(xs): return statistics.median(xs) if xs else float('nan')
def pick(setup, subs, rate):
    return [r['r'] for r in rows if r['setup'] == setup and r['r'].get('subs') == subs and r['r'].get('offered_rate') == rate]
print("| scenario (medians of runs) | one node | 2-node cluster | ratio |")
print("|---|---:|---:|---:|")
for subs, rate, what in [(1000, 50, "N = 1,000, 50 msg/s (50 k deliveries/s)"), (1000, 200, "N = 1,000, 200 msg/s (200 k deliveries/s)"), (10000, 5, "N = 10,000, 5 msg/s (one fan-out to 10,000)")]:
    s, c = pick('single', subs, rate), pick('cluster2', subs, rate)
    ns_s, ns_c = med([x.get('server_ns_per_delivery', float('nan')) for x in s]), med([x.get('server_ns_per_delivery', float('nan')) for x in c])
    print(f"| {what}: server CPU per delivery, ns (nodes summed) | {ns_s:.0f} | {ns_c:.0f} | {ns_c/ns_s:.2f} |")
    for q in ['p50', 'p99']:
        a, b = med([x['latency_ms'][q] for x in s]), med([x['latency_ms'][q] for x in c])
        print(f"| {what}: latency {q}, ms | {a:.2f} | {b:.2f} | {b/a:.2f} |")
    r = med([x.get('redis_us_per_message', float('nan')) for x in c])
    print(f"| {what}: Redis process CPU per published message (with its idle cost and socket I/O), µs | - | {r:.1f} | |")
    print(f"| {what}: deliveries lost (all runs) | {sum(x.get('lost',0) for x in s)} | {sum(x.get('lost',0) for x in c)} | |")
stats = [r['stat'] for r in rows if r.get('setup') == 'redis' and r['stat'].startswith('cmdstat_fcall:')]
per = [float(x.split('usec_per_call=')[1].split(',')[0]) for x in stats]
if per:
    print(f"| Redis's own execution time per FCALL (SAY, claim, ...; INFO commandstats, median of runs), µs | - | {med(per):.1f} | |")
PY
