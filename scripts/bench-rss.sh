#!/usr/bin/env bash
# Steady resident memory of a lean or a full build (docs/benchmarks.md, "Resident memory
# after deliveries"): 100 sysfs series at 1 Hz, 60 s windows, 5-minute partitions (so
# that deliveries happen within the run), a local sink. RUNS agents run side by side,
# each in its own folder; every 10 s each one's VmRSS, RssAnon and RssFile are read,
# and the samples taken after its first delivery count. Per run: the medians of those
# samples, the peak (VmHWM), read_bytes (what it read from a block device) and its
# threads; then the median of the runs.
#
#   scripts/bench-rss.sh lean          # --no-default-features --features pi, as deploy/build-pi.sh
#   scripts/bench-rss.sh full          # every feature (the default build, the .deb)
#   BENCH_RUNS=3 BENCH_MINUTES=10 scripts/bench-rss.sh lean
#   EDGESPOOL_BIN=/path/edgespool scripts/bench-rss.sh lean   # a binary built before
#
# Memory per process is robust to a loaded machine; nothing here is a throughput.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

set_name=${1:-lean}
RUNS=${BENCH_RUNS:-3}
MINUTES=${BENCH_MINUTES:-10}
SERIES=100
case "$set_name" in
    lean) features=(--no-default-features --features pi) ;;
    full) features=() ;;
    *) echo "usage: scripts/bench-rss.sh lean|full" >&2; exit 2 ;;
esac
if [ -n "${EDGESPOOL_BIN:-}" ]; then
    BIN=$EDGESPOOL_BIN
else
    release_build --bin edgespool "${features[@]}"
fi

work=$(mktemp -d "${TMPDIR:-/var/tmp}/edgespool-rss.XXXXXX")
remove_at_exit "$work"
for i in $(seq 1 $SERIES); do
    mkdir -p "$work/sys/class/hwmon/hwmon$i"
    echo $((40000 + i)) > "$work/sys/class/hwmon/hwmon$i/temp1_input"
done

pids=()
stop_runs() { local pid; for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done; }
at_exit stop_runs
for run in $(seq 1 "$RUNS"); do
    dir="$work/run$run"
    mkdir -p "$dir/spool"
    {
        printf '[agent]\ndevice_id = "bench"\nspool = "%s/spool/spool.db"\nwindow = "60s"\npartition = "5m"\ngrace = "5s"\n\n' "$dir"
        printf '[[sources]]\nkind = "sysfs"\nname = "hw"\nroot = "%s"\ninterval = "1s"\n' "$work"
        for i in $(seq 1 $SERIES); do
            printf '[[sources.files]]\nfield = "t%d"\npath = "sys/class/hwmon/hwmon%d/temp1_input"\nscale = 0.001\nunit = "celsius"\n' "$i" "$i"
        done
        printf '\n[[sinks]]\nkind = "local"\nname = "archive"\npath = "%s/out"\n' "$dir"
    } > "$dir/bench.toml"
    "$BIN" run --config "$dir/bench.toml" >"$dir/agent.log" 2>&1 &
    pids+=($!)
done

echo "== $set_name ($BIN, $(stat -c %s "$BIN") bytes): $RUNS run(s) side by side of $MINUTES min" >&2
sleep 5 # start-up: loading the binary, creating the spool
c0=(); for pid in "${pids[@]}"; do c0+=("$(cpu_ticks "$pid")"); done
start=$SECONDS
end=$((SECONDS + MINUTES * 60))
while [ $SECONDS -lt $end ]; do
    sleep 10
    for run in $(seq 1 "$RUNS"); do
        pid=${pids[$((run - 1))]}
        kill -0 "$pid" 2>/dev/null || { cat "$work/run$run/agent.log" >&2; echo "run $run: the agent exited" >&2; exit 1; }
        # After the first delivery: a finished file (staging names hold a '#').
        find "$work/run$run/out" -type f ! -name '*#*' 2>/dev/null | grep -q . || continue
        echo "$(proc_kib "$pid" VmRSS) $(proc_kib "$pid" RssAnon) $(proc_kib "$pid" RssFile)" >> "$work/run$run/samples"
    done
done

seconds=$((SECONDS - start))
rss_runs=(); anon_runs=(); file_runs=(); cpu_runs=()
for run in $(seq 1 "$RUNS"); do
    pid=${pids[$((run - 1))]}
    samples="$work/run$run/samples"
    [ -s "$samples" ] || { echo "run $run: no delivery within $MINUTES min" >&2; exit 1; }
    rss=$(median $(awk '{print $1}' "$samples"))
    anon=$(median $(awk '{print $2}' "$samples"))
    file=$(median $(awk '{print $3}' "$samples"))
    read_bytes=$(awk '/^read_bytes/ {print $2}' "/proc/$pid/io")
    cpu=$(awk -v d=$(($(cpu_ticks "$pid") - c0[run - 1])) -v t="$(getconf CLK_TCK)" -v s="$seconds" 'BEGIN {printf "%.2f", d / t * 3600 / s}')
    threads=$(cat /proc/"$pid"/task/*/comm | sort | uniq -c | awk '{printf "%s%s x%s", sep, $2, $1; sep = ", "}')
    echo "run $run: VmRSS ${rss} KiB (RssAnon $anon, RssFile $file; $(wc -l < "$samples") samples after the first delivery), peak $(proc_kib "$pid" VmHWM) KiB, read_bytes $read_bytes, CPU $cpu s/h, threads: $threads" >&2
    rss_runs+=("$rss"); anon_runs+=("$anon"); file_runs+=("$file"); cpu_runs+=("$cpu")
done
echo
echo "edgespool $("$BIN" --version | cut -d' ' -f2), $set_name build ($(stat -c %s "$BIN") bytes), $SERIES series, 60 s windows, medians of $RUNS run(s) of $MINUTES min:"
echo "  resident memory after deliveries: $(median "${rss_runs[@]}") KiB (RssAnon $(median "${anon_runs[@]}"), RssFile $(median "${file_runs[@]}"))"
echo "  CPU: $(median "${cpu_runs[@]}") s per hour (taken on whatever else the machine runs)"
