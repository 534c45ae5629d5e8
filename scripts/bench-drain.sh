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
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

RUNS=${BENCH_RUNS:-3}
DAYS=${BENCH_DAYS:-7}
SERIES=100
PY="$PWD/target/test-python/bin/python"
[ -x "$PY" ] || { echo "run scripts/test.sh once first: it makes $PY with moto" >&2; exit 1; }

release_build --bin edgespool --example backlog
BACKLOG="$RELEASE/examples/backlog"

work=$(mktemp -d "${TMPDIR:-/var/tmp}/edgespool-drain.XXXXXX")
remove_at_exit "$work"

port=$(free_port)
endpoint="http://127.0.0.1:$port"
start_server moto "$port" "$work/moto.log" "$PY" -m moto.server -H 127.0.0.1 -p "$port"
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

# "samples heartbeat started": the system source's samples at the last flush, the time of
# that flush and the agent's start (RFC 3339).
samples() {
    status_field "$work/drain.toml" '" ".join([str(next(x["samples"] for x in s["sources"] if x["name"] == "system")), s["daemon"]["heartbeat"], s["daemon"]["started"]])'
}
# Whether the last flush came after the drain's end; sets n1 (the samples then), h1 (the
# flush's time) and started (the agent's start), the times in Unix seconds.
flushed_after_drain() {
    read -r n1 h1 started < <(samples) || return 1
    h1=$(utc_seconds "$h1") && started=$(utc_seconds "$started") &&
        awk -v h="$h1" -v e="$end" 'BEGIN {exit !(h > e)}'
}

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
    start=$(now)
    start_agent "$work/drain.toml" "$work/agent.log"
    peak=0
    wait_until --alive "$agent" 3600 "the backlog drained" \
        backlog_drained "$work/drain.toml" lake
    end=$(now)
    # Sampling pace: from the start to the first flush after the drain, then over 20 s.
    wait_until --every 0.5 --alive "$agent" 120 "a flush after the drain" flushed_after_drain
    sleep 20
    read -r n2 h2 _ < <(samples)
    h2=$(utc_seconds "$h2")
    stop_agent
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
echo "  rows per second: $(median "${rates[@]}")"
echo "  bytes per row in the bucket: $(median "${bytes[@]}")"
echo "  peak resident memory: $(median "${peaks[@]}") KiB"
echo "  system source samples/s during the drain: $(median "${during[@]}"), after: $(median "${after[@]}")"
