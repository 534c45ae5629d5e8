#!/usr/bin/env bash
# The spool's disk writes with real 60 s windows (docs/benchmarks.md, "The spool's writes
# with 60 s windows"): bench.sh's job (100 sysfs series at 1 Hz, 5 min partitions, a local
# sink on tmpfs), RUNS agents side by side, each with its spool on disk, for MINUTES.
#
#   scripts/bench-spool.sh                              # 3 agents for 20 minutes
#   BENCH_RUNS=1 BENCH_MINUTES=5 scripts/bench-spool.sh
#   BENCH_BUDGET=1MiB scripts/bench-spool.sh            # a checkpoint every ~17 flushes
#
# write_bytes of /proc/PID/io from the end of the first flush (70 s) to the end of the
# run counts every 4 KiB page of the page cache the agent dirtied: the WAL's appends, the
# database's pages at checkpoints, and the -shm file's pages (the WAL index, mapped
# shared: the kernel writes those back after 30 s, so each flush 60 s apart dirties them
# again, which 2 s windows hide). Side by side because write_bytes is per process, and
# robust to the load the other agents make.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

RUNS=${BENCH_RUNS:-3}
MINUTES=${BENCH_MINUTES:-20}
BUDGET=${BENCH_BUDGET:-}
SERIES=100

release_build --bin edgespool

work=$(mktemp -d "${TMPDIR:-/var/tmp}/edgespool-bench-spool.XXXXXX")
shm=$(mktemp -d /dev/shm/edgespool-bench-spool.XXXXXX)
remove_at_exit "$work" "$shm"

for i in $(seq 1 $SERIES); do
    mkdir -p "$work/sys/class/hwmon/hwmon$i"
    echo $((40000 + i)) > "$work/sys/class/hwmon/hwmon$i/temp1_input"
done

pids=()
for run in $(seq 1 "$RUNS"); do
    mkdir -p "$work/$run/spool"
    {
        printf '[agent]\ndevice_id = "bench"\nspool = "%s/%s/spool/spool.db"\nwindow = "60s"\npartition = "5m"\ngrace = "5s"\n' "$work" "$run"
        if [ -n "$BUDGET" ]; then printf 'disk_budget = "%s"\n' "$BUDGET"; fi
        printf '\n[[sources]]\nkind = "sysfs"\nname = "hw"\nroot = "%s"\ninterval = "1s"\n' "$work"
        for i in $(seq 1 $SERIES); do
            printf '[[sources.files]]\nfield = "t%d"\npath = "sys/class/hwmon/hwmon%d/temp1_input"\nscale = 0.001\nunit = "celsius"\n' "$i" "$i"
        done
        printf '\n[[sinks]]\nkind = "local"\nname = "archive"\npath = "%s/out%s"\n' "$shm" "$run"
    } > "$work/$run/bench.toml"
    start_agent "$work/$run/bench.toml" "$work/$run/agent.log"
    eval "agent$run=$agent"
    stop_at_exit "agent$run"
    pids+=("$agent")
done
agent=""

echo "== $RUNS agent(s) side by side for $MINUTES min, 60 s windows${BUDGET:+, disk_budget $BUDGET}" >&2
sleep 70 # the first flush registers the series
w0=(); for pid in "${pids[@]}"; do w0+=("$(write_bytes "$pid")"); done
t0=$(now)
sleep $((MINUTES * 60 - 70))
t1=$(now)
per_hour=(); per_flush=()
for i in "${!pids[@]}"; do
    bytes=$(($(write_bytes "${pids[$i]}") - w0[i]))
    per_hour+=("$(awk -v b="$bytes" -v t0="$t0" -v t1="$t1" 'BEGIN {printf "%d", b * 3600 / (t1 - t0)}')")
    per_flush+=("$(awk -v b="$bytes" -v t0="$t0" -v t1="$t1" 'BEGIN {printf "%d", b * 60 / (t1 - t0)}')")
done
echo "edgespool $("$BIN" --version | cut -d' ' -f2), $SERIES series at 1 Hz, 60 s windows, 5 min partitions, $RUNS run(s) of $MINUTES min:"
echo "  spool disk writes per hour: $(median "${per_hour[@]}") bytes (runs: ${per_hour[*]})"
echo "  per flush of $SERIES windows: $(median "${per_flush[@]}") bytes (runs: ${per_flush[*]})"
