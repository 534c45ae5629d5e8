#!/usr/bin/env bash
# Resource benchmark: `edgespool run` with 100 series sampled at 1 Hz, the spool on disk
# and a local-folder sink, as docs/benchmarks.md describes.
#
#   scripts/bench.sh                                  # 3 runs of 10 minutes, medians printed
#   BENCH_RUNS=1 BENCH_MINUTES=2 BENCH_DISK_SECONDS=120 scripts/bench.sh
#
# Figures come from the kernel, not from the agent: VmRSS/VmHWM of /proc/PID/status,
# utime+stime of /proc/PID/stat, write_bytes of /proc/PID/io.
#
# 1. Resources: 60 s windows for BENCH_MINUTES; resident memory sampled every 10 s, CPU
#    seconds scaled to an hour.
# 2. Disk: write_bytes counts only what reaches a block device, so the output folder is on
#    tmpfs (/dev/shm) and what is counted is the spool's own writes. A flush costs the same
#    bytes whatever the window length (100 windows of fixed-size statistics), but SQLite
#    checkpoints its WAL only every ~1 MiB, i.e. every ~45 flushes: 2 s windows make many
#    flushes and several checkpoints in a few minutes. Bytes per flush × 60 flushes is the
#    hourly figure for 60 s windows.
# 3. fsync calls per flush, counted with strace over ten 2 s flushes.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

RUNS=${BENCH_RUNS:-3}
MINUTES=${BENCH_MINUTES:-10}
DISK_SECONDS=${BENCH_DISK_SECONDS:-300}
SERIES=100

release_build --bin edgespool

work=$(mktemp -d "${TMPDIR:-/var/tmp}/edgespool-bench.XXXXXX")
shm=$(mktemp -d /dev/shm/edgespool-bench.XXXXXX)
remove_at_exit "$work" "$shm"

# A fake hwmon tree with one input per series.
for i in $(seq 1 $SERIES); do
    mkdir -p "$work/sys/class/hwmon/hwmon$i"
    echo $((40000 + i)) > "$work/sys/class/hwmon/hwmon$i/temp1_input"
done

start_bench_agent() { # $1: window length; sets $agent
    rm -rf "$work/spool" "$shm/out"
    mkdir -p "$work/spool"
    {
        printf '[agent]\ndevice_id = "bench"\nspool = "%s/spool/spool.db"\nwindow = "%s"\npartition = "5m"\ngrace = "5s"\n\n' "$work" "$1"
        printf '[[sources]]\nkind = "sysfs"\nname = "hw"\nroot = "%s"\ninterval = "1s"\n' "$work"
        for i in $(seq 1 $SERIES); do
            printf '[[sources.files]]\nfield = "t%d"\npath = "sys/class/hwmon/hwmon%d/temp1_input"\nscale = 0.001\nunit = "celsius"\n' "$i" "$i"
        done
        printf '\n[[sinks]]\nkind = "local"\nname = "archive"\npath = "%s/out"\n' "$shm"
    } > "$work/bench.toml"
    start_agent "$work/bench.toml" "$work/agent.log"
}

echo "== resources: $RUNS run(s) of $MINUTES min, 60 s windows" >&2
rss_runs=(); peak_runs=(); cpu_runs=()
for run in $(seq 1 "$RUNS"); do
    start_bench_agent 60s
    sleep 5 # skip start-up: loading the binary, creating the spool
    c0=$(cpu_ticks "$agent")
    samples=()
    end=$((SECONDS + MINUTES * 60))
    while [ $SECONDS -lt $end ]; do
        sleep 10
        samples+=("$(proc_kib "$agent" VmRSS)")
    done
    c1=$(cpu_ticks "$agent")
    peak=$(proc_kib "$agent" VmHWM)
    stop_agent
    rss=$(median "${samples[@]}")
    cpu=$(awk -v d=$((c1 - c0)) -v t="$CLK_TCK" -v s=$((MINUTES * 60)) 'BEGIN {printf "%.2f", d / t * 3600 / s}')
    echo "run $run: rss median ${rss} KiB, peak ${peak} KiB, cpu ${cpu} s/h" >&2
    rss_runs+=("$rss"); peak_runs+=("$peak"); cpu_runs+=("$cpu")
done

echo "== disk: 2 s windows for $DISK_SECONDS s" >&2
start_bench_agent 2s
sleep 7
w0=$(write_bytes "$agent")
sleep "$DISK_SECONDS"
w1=$(write_bytes "$agent")
stop_agent
per_flush=$(( (w1 - w0) * 2 / DISK_SECONDS ))

syncs="(strace not installed)"
if command -v strace >/dev/null 2>&1; then
    rm -rf "$work/spool"; mkdir -p "$work/spool"
    # fsync and fdatasync calls from 5 s to 25 s after start: ten 2 s flushes, without
    # the spool's creation at start-up and the checkpoint at shutdown.
    t0=$(date +%s.%N)
    timeout -s INT 27 strace -f -qq -ttt -e trace=fsync,fdatasync -o "$work/strace.log" \
        "$BIN" run --config "$work/bench.toml" 2>/dev/null || true
    syncs=$(awk -v t0="$t0" '/fsync|fdatasync/ && $2 >= t0 + 5 && $2 < t0 + 25 {n++} END {print n + 0}' "$work/strace.log")
    syncs="$syncs in 10 flushes (a WAL checkpoint, every ~45 flushes, adds its own)"
fi

rows_per_hour=$((SERIES * 60))
echo
echo "edgespool $("$BIN" --version | cut -d' ' -f2), $SERIES series at 1 Hz, 60 s windows, medians of $RUNS run(s):"
echo "  resident memory: $(median "${rss_runs[@]}") KiB (VmRSS every 10 s), peak $(median "${peak_runs[@]}") KiB (VmHWM)"
echo "  CPU: $(median "${cpu_runs[@]}") s per hour"
echo "  spool disk writes: $per_flush bytes per flush of $SERIES windows = $((per_flush * 60)) bytes per hour"
echo "  aggregates: $rows_per_hour windows per hour = $((rows_per_hour * 8 * 8)) bytes per hour of raw statistics (8 numbers of 8 bytes)"
echo "  fsync calls: $syncs"
