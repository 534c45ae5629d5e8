#!/usr/bin/env bash
# Resource benchmark: `edgespool run` with 100 series sampled at 1 Hz, 60 s windows,
# the spool on disk and a local-folder sink, as docs/benchmarks.md describes.
#
#   scripts/bench.sh                  # 3 runs of 10 minutes, medians printed
#   BENCH_RUNS=1 BENCH_MINUTES=3 scripts/bench.sh
#
# Figures come from the kernel, not from the agent: VmRSS/VmHWM of /proc/PID/status,
# utime+stime of /proc/PID/stat, write_bytes of /proc/PID/io. The output folder is on
# tmpfs (/dev/shm), which write_bytes does not count, so write_bytes is the spool's own
# disk writes. A last short pass under strace counts fsyncs per flush.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${BENCH_RUNS:-3}
MINUTES=${BENCH_MINUTES:-10}
SERIES=100

cargo build --release --locked -p edgespool >&2
BIN="$PWD/target/release/edgespool"

work=$(mktemp -d "${TMPDIR:-/var/tmp}/edgespool-bench.XXXXXX")
shm=$(mktemp -d /dev/shm/edgespool-bench.XXXXXX)
agent=""
cleanup() {
    [ -n "$agent" ] && kill "$agent" 2>/dev/null && wait "$agent" 2>/dev/null
    rm -rf "$work" "$shm"
}
trap cleanup EXIT

# A fake hwmon tree with one input per series, values changing between reads is not
# needed: the cost is the read, parse and aggregate, whatever the value.
for i in $(seq 1 $SERIES); do
    mkdir -p "$work/sys/class/hwmon/hwmon$i"
    echo $((40000 + i)) > "$work/sys/class/hwmon/hwmon$i/temp1_input"
done

write_config() { # $1: spool path, $2: output folder
    {
        printf '[agent]\ndevice_id = "bench"\nspool = "%s"\nwindow = "60s"\npartition = "5m"\ngrace = "5s"\n\n' "$1"
        printf '[[sources]]\nkind = "sysfs"\nname = "hw"\nroot = "%s"\ninterval = "1s"\n' "$work"
        for i in $(seq 1 $SERIES); do
            printf '[[sources.files]]\nfield = "t%d"\npath = "sys/class/hwmon/hwmon%d/temp1_input"\nscale = 0.001\nunit = "celsius"\n' "$i" "$i"
        done
        printf '\n[[sinks]]\nkind = "local"\nname = "archive"\npath = "%s"\n' "$2"
    } > "$work/bench.toml"
}

ticks=$(getconf CLK_TCK)
# utime + stime: fields 14 and 15 of /proc/PID/stat (the command name has no spaces).
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
results="$work/results"
: > "$results"

for run in $(seq 1 "$RUNS"); do
    rm -rf "$work/spool" "$shm/out"
    mkdir -p "$work/spool"
    write_config "$work/spool/spool.db" "$shm/out"
    "$BIN" run --config "$work/bench.toml" 2> "$work/agent-$run.log" &
    agent=$!
    # Skip start-up (binary loading, spool creation): measure from 5 s in.
    sleep 5
    c0=$(cpu_ticks "$agent")
    w0=$(awk '/^write_bytes/ {print $2}' "/proc/$agent/io")
    rss_samples=()
    end=$((SECONDS + MINUTES * 60))
    while [ $SECONDS -lt $end ]; do
        sleep 10
        rss_samples+=("$(awk '/^VmRSS/ {print $2}' "/proc/$agent/status")")
    done
    c1=$(cpu_ticks "$agent")
    w1=$(awk '/^write_bytes/ {print $2}' "/proc/$agent/io")
    hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$agent/status")
    kill -TERM "$agent"; wait "$agent" || true; agent=""
    rss_median=$(printf '%s\n' "${rss_samples[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    seconds=$((MINUTES * 60))
    cpu_per_hour=$(awk -v d=$((c1 - c0)) -v t="$ticks" -v s="$seconds" 'BEGIN {printf "%.2f", d / t * 3600 / s}')
    writes_per_hour=$(awk -v d=$((w1 - w0)) -v s="$seconds" 'BEGIN {printf "%.0f", d * 3600 / s}')
    out_bytes=$(find "$shm/out" -type f -printf '%s\n' 2>/dev/null | awk '{s+=$1} END {print s+0}')
    out_rows=$(find "$shm/out" -type f -exec cat {} + 2>/dev/null | wc -l)
    echo "run $run: rss_median_kib=$rss_median rss_peak_kib=$hwm cpu_s_per_hour=$cpu_per_hour spool_write_bytes_per_hour=$writes_per_hour output_rows=$out_rows output_bytes=$out_bytes" | tee -a "$results"
done

median() { # $1: field name
    sed -n "s/.*$1=\([0-9.]*\).*/\1/p" "$results" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
rows_per_hour=$((SERIES * 60))
echo
echo "edgespool $("$BIN" --version | cut -d' ' -f2), $SERIES series at 1 Hz, 60 s windows, $RUNS run(s) of $MINUTES min, medians:"
echo "  resident memory (median of 10 s samples): $(median rss_median_kib) KiB, peak (VmHWM) $(median rss_peak_kib) KiB"
echo "  CPU: $(median cpu_s_per_hour) s per hour"
echo "  spool disk writes: $(median spool_write_bytes_per_hour) bytes per hour"
echo "  aggregates: $rows_per_hour rows per hour; raw statistics $((rows_per_hour * 8 * 8)) bytes per hour (8 numbers of 8 bytes a row)"

if command -v strace >/dev/null 2>&1; then
    rm -rf "$work/spool" "$shm/out"
    mkdir -p "$work/spool"
    write_config "$work/spool/spool.db" "$shm/out"
    # Three flushes under strace: fsync-family calls per flush.
    timeout -s INT 185 strace -f -qq -e trace=fsync,fdatasync -o "$work/strace.log" "$BIN" run --config "$work/bench.toml" 2> /dev/null || true
    syncs=$(grep -c -E 'fsync|fdatasync' "$work/strace.log" || true)
    flushes=3
    echo "  fsync calls in ${flushes} min under strace (3 window flushes, start-up included): $syncs"
fi
