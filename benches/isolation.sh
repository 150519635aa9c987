#!/usr/bin/env bash
# Isolation under hostile load (issue 13): the full-size attacks, against chatloop and against
# the async (tokio, multi-thread runtime) version of the same server, each with its default
# flags plus --metrics; prints the figures that go into docs/RELIABILITY.md as one table.
# About 4 to 5 minutes.
#
#   benches/isolation.sh                       # both servers, every attack
#   benches/isolation.sh --servers chatloop    # one server (chatloop or async-mt)
#   benches/isolation.sh --quick               # scaled down, about 1 minute (trying the script)
#   benches/isolation.sh --out DIR             # raw JSON and logs (default target/isolation)
#
# Attacks (chatloop-bench attack ...; each on a freshly started server, so RSS figures start
# from a clean process):
#   amp 1000 / amp 2000   1,000 or 2,000 members with a 4 KiB receive buffer that never read,
#                         one flooder sending 60 KiB SAYs to their room for 20 s, an honest pair
#                         in a room of its own; then 10 s after the attack
#   partial header        15,000 connections holding the first byte of a header
#   partial frame         1,000 connections holding a max-size frame one byte short, after HELLO
#   slowheaders           16 slow request heads on the metrics port, a /healthz scraper
#
# The script measures and reports; it does not judge. The issue's bounds are printed beside the
# figures. The server is pinned to CPU 0 and the load generator to CPU 1 (as benches/compare.sh
# does); every run is bounded by `timeout`, and only processes this script started are stopped,
# by PID.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=target/isolation
SERVERS="chatloop async-mt"
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --servers) SERVERS="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "isolation.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
for s in $SERVERS; do
  case "$s" in chatloop|async-mt) ;; *) echo "isolation.sh: unknown server $s (chatloop, async-mt)" >&2; exit 2 ;; esac
done

command -v taskset >/dev/null || { echo "isolation.sh: taskset (util-linux) is required" >&2; exit 2; }
command -v timeout >/dev/null || { echo "isolation.sh: timeout (coreutils) is required" >&2; exit 2; }
[ "$(nproc)" -ge 2 ] || { echo "isolation.sh: needs 2 CPUs (server on 0, generator on 1)" >&2; exit 2; }

if [ "$QUICK" = 1 ]; then
  AMP_SIZES="200 400"; AMP_DURATION=5s; AFTER=3s; PARTIAL_CONNS=2000; FRAME_CONNS=200; SLOW_DURATION=6s
else
  AMP_SIZES="1000 2000"; AMP_DURATION=20s; AFTER=10s; PARTIAL_CONNS=15000; FRAME_CONNS=1000; SLOW_DURATION=10s
fi

echo "== building (release)" >&2
cargo build --release --quiet --workspace --bins --example async_server

BIN=target/release
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
SERVER_PID=""
SERVER_ADDR=""
METRICS_ADDR=""

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

# start_server NAME TAG: the named server, defaults plus --metrics, pinned to CPU 0, on free
# ports read from its `listening on` and `metrics on http://` log lines.
start_server() {
  local log="$OUT/$1-$2.log"
  local common=(--listen 127.0.0.1:0 --metrics 127.0.0.1:0)
  : > "$log" # exists before the server opens it, for the reads below
  case "$1" in
    chatloop) taskset -c 0 "$BIN/chatloop" "${common[@]}" 2>"$log" & ;;
    async-mt) taskset -c 0 "$BIN/examples/async_server" --runtime multi-thread "${common[@]}" 2>"$log" & ;;
  esac
  SERVER_PID=$!
  SERVER_ADDR=""
  METRICS_ADDR=""
  for _ in $(seq 1 100); do
    SERVER_ADDR=$(sed -n 's/.*listening on \([0-9.]*:[0-9]*\).*/\1/p' "$log" | head -n 1) || true
    METRICS_ADDR=$(sed -n 's|.*metrics on http://\([0-9.]*:[0-9]*\)/.*|\1|p' "$log" | head -n 1) || true
    if [ -n "$SERVER_ADDR" ] && [ -n "$METRICS_ADDR" ]; then break; fi
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  if [ -z "$SERVER_ADDR" ] || [ -z "$METRICS_ADDR" ]; then
    echo "isolation.sh: $1 did not log its addresses; see $log" >&2
    exit 1
  fi
}

# attack NAME TAG LIMIT_S ARGS...: a fresh server, one attack (bounded by LIMIT_S seconds),
# its JSON recorded under TAG (or a failure), the server stopped.
attack() {
  local name="$1" tag="$2" limit="$3"; shift 3
  start_server "$name" "$tag"
  local args=("$@")
  local i
  for i in "${!args[@]}"; do
    args[i]="${args[i]//@PID@/$SERVER_PID}"
    args[i]="${args[i]//@ADDR@/$SERVER_ADDR}"
    args[i]="${args[i]//@METRICS@/$METRICS_ADDR}"
  done
  echo "== $name: $tag ($(( $(date +%s) - START ))s elapsed)" >&2
  local json
  if json=$(timeout --kill-after=5 "$limit" taskset -c 1 "$BIN/chatloop-bench" --json "${args[@]}" \
      2>"$OUT/$name-$tag.err"); then
    printf '%s\n' "$json" > "$OUT/$name-$tag.json"
  else
    echo "isolation.sh: $name $tag failed (status $?); see $OUT/$name-$tag.err" >&2
    printf '{"failed":true}\n' > "$OUT/$name-$tag.json"
  fi
  printf '{"server":"%s","attack":"%s","result":%s}\n' "$name" "$tag" "$(cat "$OUT/$name-$tag.json")" >> "$RESULTS"
  stop_server
}

# The share of both CPUs busy over one second: this machine may be shared, and what others
# run competes with the server and the generator.
cpu_busy() {
  local a b
  a=($(head -n 1 /proc/stat)); sleep 1; b=($(head -n 1 /proc/stat))
  local idle=$(( (b[4] + b[5]) - (a[4] + a[5]) )) total=0 k
  for k in 1 2 3 4 5 6 7 8; do total=$(( total + b[k] - a[k] )); done
  [ "$total" -gt 0 ] && echo $(( 100 * (total - idle) / total )) || echo 0
}

START=$(date +%s)
BUSY_BEFORE=$(cpu_busy)
[ "$BUSY_BEFORE" -gt 10 ] && echo "isolation.sh: warning: the CPUs were ${BUSY_BEFORE}% busy before the run; figures will be noisy" >&2

for name in $SERVERS; do
  for n in $AMP_SIZES; do
    attack "$name" "amp$n" 120 attack amp --addr @ADDR@ --members "$n" --rcvbuf 4KiB --say-bytes 60KiB \
      --duration "$AMP_DURATION" --after "$AFTER" --server-pid @PID@ --metrics @METRICS@
  done
  attack "$name" partial-header 90 attack partial --addr @ADDR@ --conns "$PARTIAL_CONNS" --bytes 1 \
    --after "$AFTER" --server-pid @PID@ --metrics @METRICS@
  attack "$name" partial-frame 90 attack partial --addr @ADDR@ --conns "$FRAME_CONNS" --bytes 65543 \
    --after "$AFTER" --server-pid @PID@ --metrics @METRICS@
  attack "$name" slowheaders 60 attack slowheaders --metrics @METRICS@ --attackers 16 --duration "$SLOW_DURATION"
done
ELAPSED=$(( $(date +%s) - START ))
BUSY_AFTER=$(cpu_busy)

# ---- the table ----

# jget FILE KEY: the value of a top-level "KEY": in the one-line JSON of FILE ("" if absent).
jget() {
  grep -o "\"$2\":[^,}]*" "$1" 2>/dev/null | head -n 1 | cut -d: -f2- | tr -d '"'
}
# fmt VALUE SCALE DECIMALS: VALUE / SCALE, or "-" when missing or null.
fmt() {
  case "$1" in ""|null) echo "-" ;; *) awk -v v="$1" -v s="$2" -v d="$3" 'BEGIN { printf "%.*f", d, v / s }' ;; esac
}
cell() { # cell SERVER TAG KIND: one table cell
  local f="$OUT/$1-$2.json"
  if [ ! -s "$f" ] || grep -q '"failed":true' "$f"; then echo "failed"; return; fi
  case "$3" in
    honest) echo "$(fmt "$(jget "$f" honest_p99_ms)" 1 1) / $(fmt "$(jget "$f" honest_max_ms)" 1 1) (generator late <= $(fmt "$(jget "$f" honest_late_attack_ms)" 1 1))" ;;
    honest_after) echo "$(fmt "$(jget "$f" honest_after_p99_ms)" 1 1) / $(fmt "$(jget "$f" honest_after_max_ms)" 1 1) (generator late <= $(fmt "$(jget "$f" honest_late_after_ms)" 1 1))" ;;
    lost) echo "$(jget "$f" honest_lost) of $(jget "$f" honest_sent)" ;;
    iter)
      if [ "$1" = chatloop ]; then echo "$(fmt "$(jget "$f" iteration_max_after_us)" 1000 1)"; else echo "n/a (reports 0)"; fi ;;
    slow_iters)
      if [ "$1" = chatloop ]; then echo "$(fmt "$(jget "$f" iterations_over_32ms)" 1 0) / $(fmt "$(jget "$f" iterations_over_65ms)" 1 0)"; else echo "n/a"; fi ;;
    peak) echo "$(fmt "$(jget "$f" server_rss_peak_kib)" 1024 1)" ;;
    tcp) echo "$(fmt "$(jget "$f" kernel_tcp_mem_peak_kib)" 1024 1)" ;;
    after)
      local r; r=$(jget "$f" server_rss_recovered_s)
      echo "$(fmt "$(jget "$f" server_rss_after_kib)" 1024 1) ($(fmt "$(jget "$f" server_rss_before_kib)" 1024 1) before; $( [ "$r" = null ] && echo "not back within the limit" || echo "back within it after $(fmt "$r" 1 1) s"))" ;;
    cut) echo "$(jget "$f" members_cut) of $(jget "$f" members) (flood: $(jget "$f" flood_says) SAYs, $(fmt "$(jget "$f" flood_bytes)" 1048576 0) MiB)" ;;
    cpu) echo "$(fmt "$(jget "$f" server_cpu_flood_pct)" 1 0)% (waiting for a CPU $(fmt "$(jget "$f" server_cpu_wait_flood_pct)" 1 0)%)" ;;
    per_conn) echo "$(fmt "$(jget "$f" bytes_per_conn)" 1 0) B (held $(jget "$f" held) of $(jget "$f" conns))" ;;
    held) echo "$(fmt "$(jget "$f" server_rss_held_kib)" 1024 1)" ;;
    ratio) echo "$(jget "$f" scrapes_ok) of $(jget "$f" scrapes) = $(fmt "$(jget "$f" scrape_ok_ratio)" 0.01 1)%" ;;
  esac
}
row() { # row LABEL BOUND TAG KIND
  local line="| $1 |"
  local s
  for s in $SERVERS; do line="$line $(cell "$s" "$3" "$4") |"; done
  echo "$line $2 |"
}

header="| figure |"; sep="|---|"
for s in $SERVERS; do header="$header $s |"; sep="$sep---:|"; done
echo
echo "Isolation under hostile load (issue 13): benches/isolation.sh$([ "$QUICK" = 1 ] && echo " --quick"), ${ELAPSED} s"
echo "Machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), Linux $(uname -r); CPUs ${BUSY_BEFORE}% busy before the run, ${BUSY_AFTER}% after (other work on the machine competes with the server and the generator)."
echo "Servers: default flags plus --metrics; the async version on tokio's multi-thread runtime. Server on CPU 0, generator on CPU 1."
echo "Honest latencies include the generator's own delay; \"generator late\" is the most its measuring thread was behind schedule."
echo
echo "$header bound (issue 13) |"
echo "$sep---|"
for n in $AMP_SIZES; do
  t="amp$n"
  row "amp $n: honest p99 / max during the attack, ms" "<= 20 / <= 100" "$t" honest
  row "amp $n: honest messages lost" "0" "$t" lost
  row "amp $n: slowest loop iteration, ms" "<= 50" "$t" iter
  row "amp $n: iterations over 32.8 / 65.5 ms" "" "$t" slow_iters
  row "amp $n: server peak RSS, MiB" "<= 256" "$t" peak
  row "amp $n: kernel TCP buffers at their peak (whole machine, in no RSS), MiB" "" "$t" tcp
  row "amp $n: server RSS ${AFTER} after the attack, MiB" "<= 2x before + 16 MiB" "$t" after
  row "amp $n: members cut as slow consumers" "all" "$t" cut
  row "amp $n: server CPU during the flood (and runnable but waiting: other load)" "" "$t" cpu
  row "amp $n: honest p99 / max after the attack, ms" "" "$t" honest_after
done
row "partial header, $PARTIAL_CONNS conns: cost per connection" "<= 1 KB" partial-header per_conn
row "partial header: server RSS held, MiB" "<= 20 MB" partial-header held
row "partial header: server RSS ${AFTER} after, MiB" "<= 2x before + 16 MiB" partial-header after
row "partial frame (max-frame, 1 B short), $FRAME_CONNS conns: cost per connection" "<= declared length + small constant" partial-frame per_conn
row "partial frame: server RSS ${AFTER} after, MiB" "<= 2x before + 16 MiB" partial-frame after
row "slowheaders, 16 attackers: /healthz scrapes that succeeded" ">= 99%" slowheaders ratio
echo
echo "Raw results: $RESULTS (one JSON object per attack, with per-phase honest figures, RSS timelines and sampled gauges); logs in $OUT."
