#!/usr/bin/env bash
# Scale benchmark: the agent's CPU, memory and spool writes at 100, 1,000 and 10,000
# series sampled at 1 Hz in 60 s windows (docs/benchmarks.md, "Scale").
#
# A generator (Python, one keep-alive connection over loopback) posts one point per
# series every second, stamped with that second, to a `listen` source (InfluxDB line
# protocol): device-stamped samples, so the repeat check's readings are kept too. Each
# series is a tag of one measurement (`bench,sensor=s00042 value=…`), or with
# BENCH_TAGS=0 a measurement of its own without tags (`s00042 value=…`). The
# partition is short (BENCH_PARTITION, 5m, with a 5 s grace) so that deliveries happen
# within the run; the sink is a local folder on tmpfs, so /proc/PID/io write_bytes is the spool's alone.
#
# Per run and series count it prints: CPU s/h, steady RSS (the median of VmRSS samples
# taken every 10 s after the first delivery), RssAnon (likewise), VmHWM (the peak), the
# spool's write_bytes per hour, and the deliveries made; then the medians of the runs.
#
#   scripts/bench-scale.sh                                   # 3 runs of 8 minutes each
#   BENCH_SERIES="10000" BENCH_RUNS=1 BENCH_MINUTES=6 scripts/bench-scale.sh
#   BENCH_BIN=/path/to/edgespool scripts/bench-scale.sh      # that binary, no build
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

RUNS=${BENCH_RUNS:-3}
MINUTES=${BENCH_MINUTES:-8}
SERIES_LIST=${BENCH_SERIES:-"100 1000 10000"}
PARTITION=${BENCH_PARTITION:-5m}
TAGS=${BENCH_TAGS:-1}
TOKEN="bench-token"

if [ -n "${BENCH_BIN:-}" ]; then
    BIN=$BENCH_BIN
else
    release_build --bin edgespool
fi
work=$(mktemp -d "${TMPDIR:-/var/tmp}/edgespool-scale.XXXXXX")
shm=$(mktemp -d /dev/shm/edgespool-scale.XXXXXX)
remove_at_exit "$work" "$shm"
gen=""
stop_at_exit gen

# generate PORT SERIES SECONDS: posts SERIES points (one per series) each second for
# SECONDS seconds, each batch stamped with its second; stops early on an answer other
# than 204 (and says so).
generate() {
    python3 - "$1" "$2" "$3" "$TAGS" <<'PY'
import http.client, sys, time
port, series, seconds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
line = "bench,sensor=s%05d value=%.2f %d\n" if sys.argv[4] != "0" else "s%05d value=%.2f %d\n"
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
headers = {"Authorization": "Token bench-token", "Content-Type": "text/plain; charset=utf-8"}
second = int(time.time())
for i in range(seconds):
    second += 1
    pause = second - time.time()
    if pause > 0:
        time.sleep(pause)
    body = "".join(line % (s, 20 + ((s + second) % 1000) / 100, second)
                   for s in range(series)).encode()
    conn.request("POST", "/api/v2/write?org=x&bucket=y&precision=s", body=body, headers=headers)
    answer = conn.getresponse()
    text = answer.read()
    if answer.status != 204:
        sys.exit("answer %d: %s" % (answer.status, text[:300]))
PY
}

delivered() { status_field "$work/agent.toml" "sum(x['delivered_parts'] for x in s['sinks'])"; }

declare -A cpus rsss anons hwms writes
for run in $(seq 1 "$RUNS"); do
    for n in $SERIES_LIST; do
        rm -rf "$work/spool" "$shm/out"
        port=$(free_port)
        cat > "$work/agent.toml" <<TOML
[agent]
device_id = "bench"
spool = "$work/spool/spool.db"
window = "60s"
partition = "$PARTITION"
grace = "5s"
[[sources]]
kind = "listen"
name = "push"
address = "127.0.0.1:$port"
token = "$TOKEN"
max_series = $((n + 10))
[[sinks]]
kind = "local"
path = "$shm/out"
TOML
        start_agent "$work/agent.toml" "$work/agent.log"
        wait_until --every 0.1 --alive "$agent" 30 "the agent to listen on $port" listening "$port"
        sleep 5 # past start-up and the code-page trim
        seconds=$((MINUTES * 60))
        generate "$port" "$n" "$seconds" &
        gen=$!
        t0=$(now)
        c0=$(cpu_ticks "$agent")
        w0=$(write_bytes "$agent")
        rss=(); anon=()
        end=$((SECONDS + seconds))
        while [ "$SECONDS" -lt "$end" ] && kill -0 "$gen" 2>/dev/null; do
            sleep 10
            kill -0 "$agent" 2>/dev/null || { echo "the agent exited (log: $work/agent.log)" >&2; exit 1; }
            parts=$(delivered) || parts=0
            if [ "${parts:-0}" -gt 0 ]; then
                rss+=("$(proc_kib "$agent" VmRSS)")
                anon+=("$(proc_kib "$agent" RssAnon)")
            fi
        done
        if ! wait "$gen"; then
            gen=""
            echo "the generator failed (agent log: $work/agent.log)" >&2
            exit 1
        fi
        gen=""
        c1=$(cpu_ticks "$agent")
        w1=$(write_bytes "$agent")
        t1=$(now)
        hwm=$(proc_kib "$agent" VmHWM)
        parts=$(delivered) || parts=0
        stop_agent
        : > "$work/agent.log"
        if [ ${#rss[@]} -eq 0 ]; then
            echo "no delivery within $MINUTES minutes at $n series: make BENCH_MINUTES longer than the partition" >&2
            exit 1
        fi
        cpu=$(awk -v d=$((c1 - c0)) -v t="$CLK_TCK" -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", d / t * 3600 / (b - a)}')
        wr=$(awk -v d=$((w1 - w0)) -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", d / 1e6 * 3600 / (b - a)}')
        cpus[$n]+="$cpu "
        rsss[$n]+="$(median "${rss[@]}") "
        anons[$n]+="$(median "${anon[@]}") "
        hwms[$n]+="$hwm "
        writes[$n]+="$wr "
        echo "run $run, $n series: CPU $cpu s/h, RSS $(median "${rss[@]}") KiB (RssAnon $(median "${anon[@]}") KiB; ${#rss[@]} samples after the first delivery), VmHWM $hwm KiB, spool writes $wr MB/h, $parts parts delivered" >&2
    done
done

echo
echo "$RUNS run(s) of $MINUTES minutes, 1 Hz, 60 s windows, $PARTITION partitions, listen source (tags: $TAGS), local sink on tmpfs; medians:"
printf '%8s %10s %14s %14s %12s %16s\n' series "CPU s/h" "RSS KiB" "RssAnon KiB" "VmHWM KiB" "spool MB/h"
for n in $SERIES_LIST; do
    # shellcheck disable=SC2086 # the lists are space-separated numbers
    printf '%8s %10s %14s %14s %12s %16s\n' "$n" "$(median ${cpus[$n]})" "$(median ${rsss[$n]})" \
        "$(median ${anons[$n]})" "$(median ${hwms[$n]})" "$(median ${writes[$n]})"
done
