#!/usr/bin/env bash
# Side-by-side benchmark: chatloop (one mio loop) against the async (tokio) version of the same
# server, on a current-thread and on a multi-thread runtime. Bounded to about 10 minutes.
#
#   benches/compare.sh            # 3 runs of everything, writes docs/BENCHMARKS.md and docs/bench-fanout.svg
#   benches/compare.sh --runs 1   # one run (about 3 minutes)
#
# The server under test is pinned to CPU 0, the load generator to CPU 1. Every server is
# started fresh for the idle-memory figures (RSS growth must not include earlier runs).
# Only processes this script started are stopped, by PID.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=3
OUT=target/compare
DOCS=docs
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --docs) DOCS="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "compare.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

command -v taskset >/dev/null || { echo "compare.sh: taskset (util-linux) is required" >&2; exit 2; }
[ "$(nproc)" -ge 2 ] || { echo "compare.sh: needs 2 CPUs (server on 0, generator on 1)" >&2; exit 2; }

echo "== building (release)" >&2
# chatloop-bench is a workspace member (crates/chatloop-bench). Building the whole workspace's
# binaries selects the same packages as the README's test command, so its artifacts are reused.
cargo build --release --quiet --workspace --bins --example async_server --example bench_report

BIN=target/release
BENCH="taskset -c 1 $BIN/chatloop-bench -q --json"
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
SERVER_PID=""
SERVER_ADDR=""

stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
trap stop_server EXIT

# start_server NAME: starts the named server pinned to CPU 0 on a free port.
start_server() {
  local log="$OUT/$1.log"
  # Flood control off: one publisher connection sends up to hundreds of thousands of SAYs a
  # second here on purpose, and the benchmark measures what the loop can deliver.
  local common=(--listen 127.0.0.1:0 --presence-limit 0 --log-level warn --max-pending 4MiB
    --cmd-rate 0 --input-rate 0)
  case "$1" in
    chatloop) taskset -c 0 "$BIN/chatloop" "${common[@]}" 2>"$log" & ;;
    async-ct) taskset -c 0 "$BIN/examples/async_server" "${common[@]}" --runtime current-thread 2>"$log" & ;;
    async-mt) taskset -c 0 "$BIN/examples/async_server" "${common[@]}" --runtime multi-thread 2>"$log" & ;;
  esac
  SERVER_PID=$!
  # --log-level warn hides the info line, so find the port from /proc instead.
  SERVER_ADDR=""
  for _ in $(seq 1 100); do
    local port
    port=$(ss -Htlnp 2>/dev/null | awk -v pid="pid=$SERVER_PID," '$0 ~ pid {split($4,a,":"); print a[length(a)]; exit}')
    if [ -n "$port" ]; then SERVER_ADDR="127.0.0.1:$port"; break; fi
    sleep 0.05
  done
  [ -n "$SERVER_ADDR" ] || { echo "compare.sh: $1 did not start listening; see $log" >&2; exit 1; }
}

# record NAME RUN JSON: appends one tagged result line.
record() {
  printf '{"server":"%s","run":%s,"result":%s}\n' "$1" "$2" "$3" >> "$RESULTS"
}

bench() { # bench NAME RUN ARGS...: runs the generator, records its JSON (or the failure)
  local name="$1" run="$2"; shift 2
  local json
  if json=$($BENCH "$@" --addr "$SERVER_ADDR" 2>>"$OUT/bench.err"); then
    record "$name" "$run" "$json"
  else
    record "$name" "$run" "{\"scenario\":\"$1\",\"failed\":true}"
  fi
}

START=$(date +%s)
for run in $(seq 1 "$RUNS"); do
  for name in chatloop async-ct async-mt; do
    echo "== run $run/$RUNS: $name ($(( $(date +%s) - START ))s elapsed)" >&2
    for conns in 10000 19000; do
      start_server "$name"
      bench "$name" "$run" idle --conns "$conns" --server-pid "$SERVER_PID" --settle 1s
      stop_server
    done
    start_server "$name"
    for subs in 100 1000 10000; do
      # Latency at a fixed 200,000 deliveries/s.
      bench "$name" "$run" fanout --subs "$subs" --rate $(( 200000 / subs )) --duration 2s --warmup 500ms --drain 500ms \
        --server-pid "$SERVER_PID"
    done
    for subs in 100 1000 10000; do
      # One message to 10,000 subscribers is 10,000 writes (tens of ms on its own), so the
      # latency bound there is 500 ms, as in shared/PERFORMANCE.md; 50 ms elsewhere.
      p99=50; [ "$subs" -ge 10000 ] && p99=500
      bench "$name" "$run" sweep --subs "$subs" --start-rate $(( 100000 / subs )) \
        --step-duration 1s --warmup 200ms --drain 500ms --bisect 2 --p99-ms "$p99" --server-pid "$SERVER_PID"
    done
    bench "$name" "$run" connect --concurrency 16 --duration 1500ms
    bench "$name" "$run" rtt --count 300 --bg-subs 1000 --bg-rate 200
    stop_server
  done
done

MACHINE="$(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(free -g | awk '/Mem:/ {print $2}') GiB, Linux $(uname -r)"
"$BIN/examples/bench_report" --results "$RESULTS" --docs "$DOCS" --machine "$MACHINE" \
  --command "benches/compare.sh --runs $RUNS" --elapsed "$(( $(date +%s) - START ))"
echo "== done in $(( $(date +%s) - START ))s: $DOCS/BENCHMARKS.md, $DOCS/bench-fanout.svg" >&2
