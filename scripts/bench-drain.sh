#!/usr/bin/env bash
# Drain benchmark: a backlog in the spool (agent/examples/backlog.rs: BENCH_SERIES series
# in 60 s windows, one batch per window as the agent commits them, hourly partitions,
# ending 2026-01-01), then `edgespool run` with one sink (Parquet, zstd) while the
# `system` source keeps sampling every second: an S3 sink on a local S3-compatible
# server (moto), and a local folder.
#
#   scripts/bench-drain.sh                              # 100 series, 168 h; s3 and local; 3 runs
#   BENCH_SERIES=10000 BENCH_HOURS=4 scripts/bench-drain.sh   # the peak figure (600,000-row hours)
#   BENCH_RUNS=1 BENCH_SINKS=local scripts/bench-drain.sh
#
# Other settings: BENCH_CHUNK_ROWS (the sinks' chunk_rows, default theirs), BENCH_PART_SIZE
# (the S3 sink's part_size, default "5 MiB"); BENCH_BIN and BENCH_BACKLOG: that agent and
# backlog example, no build (to run two builds side by side).
#
# Prints per sink: rows per second (backlog rows / seconds from the start until `status`
# shows the backlog delivered, polled every 0.1 s), bytes per row landed, peak resident
# memory (VmHWM of /proc/PID/status, the process's whole life), and the system source's
# samples per second during the drain against after it. Fails (exit 1) when
#  - the sampling pace during the drain is below 90 % of the pace after it, or
#  - what landed differs between runs: the SHA-256 of every object of the backlog's
#    partitions (key and bytes) is compared with the first run's (the backlog is the
#    same rows every run, so a drain must land the same bytes).
# Needs the venv of scripts/test.sh.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

RUNS=${BENCH_RUNS:-3}
SERIES=${BENCH_SERIES:-100}
HOURS=${BENCH_HOURS:-168}
SINKS=${BENCH_SINKS:-s3 local}
PART_SIZE=${BENCH_PART_SIZE:-5 MiB}
CHUNK_ROWS=${BENCH_CHUNK_ROWS:-}
PY="$PWD/target/test-python/bin/python"
[ -x "$PY" ] || { echo "run scripts/test.sh once first: it makes $PY with moto" >&2; exit 1; }

if [ -n "${BENCH_BIN:-}" ]; then
    BIN=$BENCH_BIN
    BACKLOG=${BENCH_BACKLOG:?BENCH_BIN needs BENCH_BACKLOG, the backlog example built beside it}
else
    release_build --bin edgespool --example backlog
    BACKLOG="$RELEASE/examples/backlog"
fi

work=$(mktemp -d "${TMPDIR:-/var/tmp}/edgespool-drain.XXXXXX")
remove_at_exit "$work"

port=$(free_port)
endpoint="http://127.0.0.1:$port"
start_server moto "$port" "$work/moto.log" "$PY" -m moto.server -H 127.0.0.1 -p "$port"
# s3 mkbucket BUCKET | s3 size BUCKET | s3 hashes BUCKET (key and SHA-256 of each object
# of 2025, the backlog's year).
s3() { "$PY" -c '
import boto3, hashlib, sys
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="bench", aws_secret_access_key="bench")
objects = lambda: [o for page in s3.get_paginator("list_objects_v2").paginate(Bucket=sys.argv[3])
                   for o in page.get("Contents", []) if "/year=2025/" in o["Key"]]
if sys.argv[2] == "mkbucket":
    s3.create_bucket(Bucket=sys.argv[3])
elif sys.argv[2] == "size":
    print(sum(o["Size"] for o in objects()))
else:
    for o in sorted(objects(), key=lambda o: o["Key"]):
        body = s3.get_object(Bucket=sys.argv[3], Key=o["Key"])["Body"].read()
        print(o["Key"], hashlib.sha256(body).hexdigest())
' "$endpoint" "$@"; }
# The same for a local folder.
local_size() { find "$1" -path '*/year=2025/*' -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}'; }
local_hashes() { (cd "$1" && find . -path '*/year=2025/*' -type f | sed 's|^\./||' | sort | while read -r f; do echo "$f $(sha256sum "$f" | cut -d' ' -f1)"; done); }

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

failed=0
report=()
for sink in $SINKS; do
    rates=(); bytes=(); peaks=(); during=(); after=()
    for run in $(seq 1 "$RUNS"); do
        rm -rf "$work"/spool.db* "$work/out"
        rows=$("$BACKLOG" "$work/spool.db" "$HOURS" "$SERIES" | awk '{print $1}')
        chunk=""
        [ -z "$CHUNK_ROWS" ] || chunk="chunk_rows = $CHUNK_ROWS"
        if [ "$sink" = s3 ]; then
            bucket="lake-$run"
            s3 mkbucket "$bucket"
            target="kind = \"s3\"
bucket = \"$bucket\"
endpoint = \"$endpoint\"
access_key_id = \"bench\"
secret_access_key = \"bench\"
part_size = \"$PART_SIZE\""
        else
            target="kind = \"local\"
path = \"$work/out\"
format = \"parquet\""
        fi
        cat > "$work/drain.toml" <<TOML
[agent]
device_id = "bench"
spool = "$work/spool.db"
window = "5s"
partition = "1h"
grace = "5s"
disk_budget = "16 GiB"
[[sources]]
kind = "system"
[[sinks]]
name = "lake"
$target
$chunk
TOML
        start=$(now)
        start_agent "$work/drain.toml" "$work/agent.log"
        peak=0
        wait_until --every 0.1 --alive "$agent" 7200 "the backlog drained" \
            backlog_drained "$work/drain.toml" lake
        end=$(now)
        # Sampling pace: from the start to the first flush after the drain, then over 20 s.
        wait_until --every 0.5 --alive "$agent" 120 "a flush after the drain" flushed_after_drain
        sleep 20
        read -r n2 h2 _ < <(samples)
        h2=$(utc_seconds "$h2")
        note_peak "$agent"
        stop_agent
        secs=$(awk -v a="$start" -v b="$end" 'BEGIN {print b - a}')
        rate=$(awk -v r="$rows" -v s="$secs" 'BEGIN {printf "%d", r / s}')
        if [ "$sink" = s3 ]; then
            size=$(s3 size "$bucket")
            s3 hashes "$bucket" > "$work/hashes-$sink-$run"
        else
            size=$(local_size "$work/out")
            local_hashes "$work/out" > "$work/hashes-$sink-$run"
        fi
        per_row=$(awk -v b="$size" -v r="$rows" 'BEGIN {printf "%.2f", b / r}')
        d=$(awk -v n="$n1" -v x="$started" -v y="$h1" 'BEGIN {printf "%.2f", n / (y - x)}')
        f=$(awk -v a="$n1" -v b="$n2" -v x="$h1" -v y="$h2" 'BEGIN {printf "%.2f", (b - a) / (y - x)}')
        objects=$(wc -l < "$work/hashes-$sink-$run")
        echo "$sink run $run: $rows rows in ${secs}s = $rate rows/s, $objects objects, $size bytes ($per_row B/row), peak RSS ${peak} KiB, system samples/s during $d, after $f" >&2
        if awk -v d="$d" -v f="$f" 'BEGIN {exit !(d < 0.9 * f)}'; then
            echo "FAIL: $sink run $run: sampling fell behind during the drain ($d samples/s against $f after)" >&2
            failed=1
        fi
        if [ "$objects" -eq 0 ]; then
            echo "FAIL: $sink run $run: nothing of the backlog landed" >&2
            failed=1
        elif ! cmp -s "$work/hashes-$sink-1" "$work/hashes-$sink-$run"; then
            echo "FAIL: $sink run $run landed other bytes than run 1:" >&2
            diff "$work/hashes-$sink-1" "$work/hashes-$sink-$run" | head -5 >&2
            failed=1
        fi
        rates+=("$rate"); bytes+=("$per_row"); peaks+=("$peak"); during+=("$d"); after+=("$f")
    done
    report+=("$sink: rows per second $(median "${rates[@]}"), bytes per row $(median "${bytes[@]}"), peak resident memory $(median "${peaks[@]}") KiB, system samples/s during the drain $(median "${during[@]}") and after $(median "${after[@]}")")
done

echo
echo "drain of $HOURS h x $SERIES series (60 s windows, $((SERIES * 60)) rows an hour) to Parquet, medians of $RUNS run(s):"
printf '  %s\n' "${report[@]}"
if [ "$failed" -ne 0 ]; then
    echo "FAILED: see above" >&2
    exit 1
fi
echo "  the same bytes landed in every run (SHA-256 of every object); sampling kept its pace"
