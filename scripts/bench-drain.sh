#!/usr/bin/env bash
# Drain benchmark: a 7-day backlog (100 series, 60 s windows: 1,008,000 rows) in the
# spool, then `edgespool run` with an S3 sink (Parquet, zstd) on a local S3-compatible
# server (moto), while the `system` source keeps sampling every second.
#
#   scripts/bench-drain.sh               # 3 runs, medians printed
#   BENCH_RUNS=1 BENCH_DAYS=1 scripts/bench-drain.sh
#
# Prints rows per second (backlog rows / seconds from start until `status` shows nothing
# pending), bytes per row in the bucket, peak resident memory (VmHWM of
# /proc/PID/status) and the system source's samples per second during and after the
# drain (equal when sampling kept its pace). Needs the venv of scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${BENCH_RUNS:-3}
DAYS=${BENCH_DAYS:-7}
SERIES=100
PY="$PWD/target/test-python/bin/python"
[ -x "$PY" ] || { echo "run scripts/test.sh once first: it makes $PY with moto" >&2; exit 1; }

cargo build --release --locked -p edgespool --bin edgespool --example backlog >&2
BIN="$PWD/target/release/edgespool"
BACKLOG="$PWD/target/release/examples/backlog"

work=$(mktemp -d "${TMPDIR:-/var/tmp}/edgespool-drain.XXXXXX")
agent=""; moto=""
cleanup() {
    for p in $agent $moto; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
endpoint="http://127.0.0.1:$port"
"$PY" -m moto.server -H 127.0.0.1 -p "$port" > "$work/moto.log" 2>&1 &
moto=$!
s3() { "$PY" -c '
import boto3, sys
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="bench", aws_secret_access_key="bench")
if sys.argv[2] == "mkbucket":
    s3.create_bucket(Bucket=sys.argv[3])
else:
    total = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=sys.argv[3]):
        total += sum(o["Size"] for o in page.get("Contents", []))
    print(total)
' "$endpoint" "$@"; }
for _ in $(seq 1 100); do s3 mkbucket setup >/dev/null 2>&1 && break; sleep 0.2; done

status_field() { # $1: python expression on the status JSON `s`
    "$BIN" status --config "$work/drain.toml" --json 2>/dev/null |
        "$PY" -c "import json, sys; s = json.load(sys.stdin); print($1)"
}
# "samples heartbeat started": the system source's samples at the last flush, the time of
# that flush and the agent's start, in Unix seconds.
since() { "$PY" -c 'import datetime, sys; print(datetime.datetime.fromisoformat(sys.argv[1].replace("Z", "+00:00")).timestamp())' "$1"; }
samples() {
    status_field '" ".join([str(next(x["samples"] for x in s["sources"] if x["name"] == "system")), s["daemon"]["heartbeat"], s["daemon"]["started"]])'
}
pending() { status_field 'next(x["pending_rows"] for x in s["sinks"] if x["name"] == "lake")'; }
median() { sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }

rates=(); bytes=(); peaks=(); during=(); after=()
for run in $(seq 1 "$RUNS"); do
    bucket="lake$run"
    s3 mkbucket "$bucket"
    rm -f "$work"/spool.db*
    rows=$("$BACKLOG" "$work/spool.db" "$DAYS" "$SERIES" | awk '{print $1}')
    cat > "$work/drain.toml" <<TOML
[agent]
device_id = "bench"
spool = "$work/spool.db"
window = "5s"
partition = "1h"
grace = "5s"
disk_budget = "1 GiB"
[[sources]]
kind = "system"
[[sinks]]
kind = "s3"
name = "lake"
bucket = "$bucket"
endpoint = "$endpoint"
access_key_id = "bench"
secret_access_key = "bench"
TOML
    start=$(date +%s.%N)
    "$BIN" run --config "$work/drain.toml" 2>> "$work/agent.log" &
    agent=$!
    peak=0
    while :; do
        hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$agent/status")
        [ "$hwm" -gt "$peak" ] && peak=$hwm
        left=$(pending 2>/dev/null || echo "?")
        # Only the backlog is pending at first; done when what is left is the live hour.
        if [ "$left" != "?" ] && [ "$left" -lt 1000 ]; then break; fi
        sleep 0.2
    done
    end=$(date +%s.%N)
    # Sampling pace: from the start to the first flush after the drain, then over 20 s.
    while :; do
        read -r n1 h1 started < <(samples)
        h1=$(since "$h1"); started=$(since "$started")
        awk -v h="$h1" -v e="$end" 'BEGIN {exit !(h > e)}' && break
        sleep 0.5
    done
    sleep 20
    read -r n2 h2 _ < <(samples)
    h2=$(since "$h2")
    kill -TERM "$agent"; wait "$agent" || true; agent=""
    secs=$(awk -v a="$start" -v b="$end" 'BEGIN {print b - a}')
    rate=$(awk -v r="$rows" -v s="$secs" 'BEGIN {printf "%d", r / s}')
    size=$(s3 size "$bucket")
    per_row=$(awk -v b="$size" -v r="$rows" 'BEGIN {printf "%.2f", b / r}')
    d=$(awk -v n="$n1" -v x="$started" -v y="$h1" 'BEGIN {printf "%.2f", n / (y - x)}')
    f=$(awk -v a="$n1" -v b="$n2" -v x="$h1" -v y="$h2" 'BEGIN {printf "%.2f", (b - a) / (y - x)}')
    echo "run $run: $rows rows in ${secs}s = $rate rows/s, $size bytes ($per_row B/row), peak RSS ${peak} KiB, system samples/s during $d, after $f" >&2
    rates+=("$rate"); bytes+=("$per_row"); peaks+=("$peak"); during+=("$d"); after+=("$f")
done

echo
echo "drain of $DAYS days x $SERIES series (60 s windows) to Parquet on S3 (moto), medians of $RUNS run(s):"
echo "  rows per second: $(printf '%s\n' "${rates[@]}" | median)"
echo "  bytes per row in the bucket: $(printf '%s\n' "${bytes[@]}" | median)"
echo "  peak resident memory: $(printf '%s\n' "${peaks[@]}" | median) KiB"
echo "  system source samples/s during the drain: $(printf '%s\n' "${during[@]}" | median), after: $(printf '%s\n' "${after[@]}" | median)"
