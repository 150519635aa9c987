#!/usr/bin/env bash
# Soak run for chatloop (issue 8): a release build under connection churn, chatty rooms, slow
# consumers, garbage senders and resume storms at once, for a bounded time.
#
#   benches/soak.sh                    # 10 minutes
#   benches/soak.sh --duration 120     # 2 minutes
#
# The load comes from benches/soak.py (Python 3 standard library), which also samples the
# server's RSS, open descriptors and /metrics every second into target/soak/RUN/samples.csv
# and writes the figures to target/soak/RUN/summary.json. The run fails (non-zero exit, with
# the reasons) if memory or descriptors grow without bound, if a well-behaved client misses
# or reorders a message, if the state does not return to empty when everyone has left, or if
# the server exits. It ends by itself and only ever signals the server it started, by PID.
set -euo pipefail

DURATION=600
SEED=8
usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    echo "options: --duration SECONDS (default 600), --seed N (default 8)"
}
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) DURATION="${2:?--duration needs a value}"; shift 2 ;;
        --duration=*) DURATION="${1#*=}"; shift ;;
        --seed) SEED="${2:?--seed needs a value}"; shift 2 ;;
        --seed=*) SEED="${1#*=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "soak: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
case "$DURATION" in
    ''|*[!0-9]*) echo "soak: --duration must be a whole number of seconds" >&2; exit 2 ;;
esac
if [ "$DURATION" -lt 30 ]; then
    echo "soak: --duration must be at least 30 seconds (growth is judged after a warm-up)" >&2
    exit 2
fi

cd "$(dirname "$0")/.."
command -v python3 >/dev/null || { echo "soak: python3 is required" >&2; exit 2; }

echo "soak: building the release binary"
cargo build --release --bin chatloop
BIN=target/release/chatloop

OUT="target/soak/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
LOG="$OUT/server.log"

SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'echo "soak: interrupted" >&2; exit 130' INT TERM

# Short liveness timers so that heartbeats, idle and hello timeouts happen during the run;
# max-pending 64 KiB so that slow consumers are cut off within seconds.
"$BIN" --listen 127.0.0.1:0 --metrics 127.0.0.1:0 \
    --max-pending 64KiB --heartbeat 5s --idle-timeout 20s --hello-timeout 5s \
    --stats-interval 30s 2>"$LOG" &
SERVER_PID=$!

ADDR="" METRICS=""
for _ in $(seq 1 100); do
    ADDR=$(sed -n 's/.*listening on \([0-9.]*:[0-9]*\).*/\1/p' "$LOG" | head -n1)
    METRICS=$(sed -n 's|.*metrics on http://\([0-9.]*:[0-9]*\)/metrics.*|\1|p' "$LOG" | head -n1)
    [ -n "$ADDR" ] && [ -n "$METRICS" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1 # waiting for the server's first log lines (no event to await from a shell)
done
if [ -z "$ADDR" ] || [ -z "$METRICS" ]; then
    echo "soak: FAIL: the server did not start; log:" >&2
    cat "$LOG" >&2
    exit 1
fi
echo "soak: server pid $SERVER_PID on $ADDR, metrics on $METRICS, ${DURATION}s, output in $OUT"

STATUS=0
# The driver stops its load after DURATION seconds and needs up to ~3 more minutes to wind
# down in the worst case; `timeout` bounds it regardless (it signals only the driver).
timeout --kill-after=10 $((DURATION + 240)) \
    python3 benches/soak.py --addr "$ADDR" --metrics "$METRICS" --pid "$SERVER_PID" \
    --duration "$DURATION" --seed "$SEED" --out "$OUT" >"$OUT/driver.out" || STATUS=$?
REASONS=()
case "$STATUS" in
    0) ;;
    124|137) REASONS+=("the driver did not finish in time (exit $STATUS)") ;;
    *) REASONS+=("the driver reported failures (exit $STATUS)") ;;
esac

if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    wait "$SERVER_PID" && code=0 || code=$?
    REASONS+=("the server exited during the run (status $code)")
    SERVER_PID=""
else
    # Graceful stop: SIGTERM, then it must exit 0 within its 5 s grace plus slack.
    kill -TERM "$SERVER_PID"
    for _ in $(seq 1 150); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1 # waiting for the server to exit
    done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        REASONS+=("the server did not exit within 15 s of SIGTERM")
    else
        wait "$SERVER_PID" && code=0 || code=$?
        [ "$code" -eq 0 ] || REASONS+=("the server exited with status $code after SIGTERM")
        SERVER_PID=""
    fi
fi
if grep -Eq '\[(ERROR)\]|panicked' "$LOG"; then
    REASONS+=("errors or panics in the server log ($LOG)")
fi

# The figures (summary.json is written by the driver).
if [ -f "$OUT/summary.json" ]; then
    python3 - "$OUT/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
d = s["driver"]
print(f"soak: load phase {s['load_phase_s']} s, {s['samples']} samples")
if s["rss_kb"]:
    print(f"soak: RSS {s['rss_kb']['min'] / 1024:.1f}-{s['rss_kb']['max'] / 1024:.1f} MiB, "
          f"fds {s['fds']['min']}-{s['fds']['max']}, connections up to {s['connections_max']}")
for k, v in s["growth"].items():
    print(f"soak: {k}: first third max {v['first_third_max']}, last third max "
          f"{v['last_third_max']} (limit {v['limit']})")
print("soak: driver counts: " + ", ".join(f"{k}={v}" for k, v in d.items()))
if s["server_final"]:
    f = s["server_final"]
    print(f"soak: server totals: accepted {f['connections_accepted_total']}, messages "
          f"{f['messages_total']}, deliveries {f['deliveries_total']}, resumes "
          f"{f['resumes_total']}; closes: " + ", ".join(
              f"{k[7:]}={v}" for k, v in f.items() if k.startswith("closed_")))
for m in s["failures"][:20]:
    print(f"soak: failure: {m}")
EOF
else
    REASONS+=("the driver wrote no summary (see $OUT/driver.out)")
fi

if [ ${#REASONS[@]} -gt 0 ]; then
    for r in "${REASONS[@]}"; do echo "soak: FAIL: $r" >&2; done
    exit 1
fi
echo "soak: PASS (samples: $OUT/samples.csv, summary: $OUT/summary.json)"
