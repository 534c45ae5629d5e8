#!/usr/bin/env bash
# The spool's disk writes with real 60 s windows (docs/benchmarks.md, "The spool's writes
# with 60 s windows"): bench.sh's job (100 sysfs series at 1 Hz, 5 min partitions, a local
# sink on tmpfs), RUNS agents side by side, each with its spool on disk, for MINUTES.
#
#   scripts/bench-spool.sh                              # 3 agents for 20 minutes
#   BENCH_RUNS=1 BENCH_MINUTES=5 scripts/bench-spool.sh
#   BENCH_BUDGET=1MiB scripts/bench-spool.sh            # a checkpoint every ~17 flushes
#   BENCH_BASELINE=/path/to/old/edgespool scripts/bench-spool.sh  # RUNS more agents of
#                                                       # another build beside: before/after
#   BENCH_BIN=/path/to/edgespool ...                    # that binary, not a release build
#   BENCH_PARTITION=1h ...                              # the default partitions (5m: a
#                                                       # delivery every 5 flushes)
#
# write_bytes of /proc/PID/io from the end of the first flush (70 s) to the end of the
# run counts every 4 KiB page of the page cache the agent dirtied on a block device: the
# WAL's appends, the database's pages at checkpoints, and, for a build whose WAL index is
# the -shm file beside the spool (before issue 17's second round), that file's pages (mapped shared: the
# kernel writes those back after 30 s, so each flush 60 s apart dirties them again,
# which 2 s windows hide). edgespool's index is now in /dev/shm, a tmpfs, which counts
# nothing. Side by side because write_bytes is per process, and robust to the load the
# other agents make.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

RUNS=${BENCH_RUNS:-3}
MINUTES=${BENCH_MINUTES:-20}
BUDGET=${BENCH_BUDGET:-}
BASELINE=${BENCH_BASELINE:-}
PARTITION=${BENCH_PARTITION:-5m}
SERIES=100

if [ -n "${BENCH_BIN:-}" ]; then BIN=$BENCH_BIN; else release_build --bin edgespool; fi
builds=("$BIN")
if [ -n "$BASELINE" ]; then builds+=("$BASELINE"); fi

work=$(mktemp -d "${TMPDIR:-/var/tmp}/edgespool-bench-spool.XXXXXX")
shm=$(mktemp -d /dev/shm/edgespool-bench-spool.XXXXXX)
remove_at_exit "$work" "$shm"

for i in $(seq 1 $SERIES); do
    mkdir -p "$work/sys/class/hwmon/hwmon$i"
    echo $((40000 + i)) > "$work/sys/class/hwmon/hwmon$i/temp1_input"
done

pids=(); bins=()
for build in "${builds[@]}"; do
    for _ in $(seq 1 "$RUNS"); do
        n=${#pids[@]}
        mkdir -p "$work/$n/spool"
        {
            printf '[agent]\ndevice_id = "bench"\nspool = "%s/%s/spool/spool.db"\nwindow = "60s"\npartition = "%s"\ngrace = "5s"\n' "$work" "$n" "$PARTITION"
            if [ -n "$BUDGET" ]; then printf 'disk_budget = "%s"\n' "$BUDGET"; fi
            printf '\n[[sources]]\nkind = "sysfs"\nname = "hw"\nroot = "%s"\ninterval = "1s"\n' "$work"
            for i in $(seq 1 $SERIES); do
                printf '[[sources.files]]\nfield = "t%d"\npath = "sys/class/hwmon/hwmon%d/temp1_input"\nscale = 0.001\nunit = "celsius"\n' "$i" "$i"
            done
            printf '\n[[sinks]]\nkind = "local"\nname = "archive"\npath = "%s/out%s"\n' "$shm" "$n"
        } > "$work/$n/bench.toml"
        BIN=$build start_agent "$work/$n/bench.toml" "$work/$n/agent.log"
        eval "agent$n=$agent"
        stop_at_exit "agent$n"
        pids+=("$agent"); bins+=("$build")
    done
done
agent=""

echo "== ${#pids[@]} agent(s) side by side for $MINUTES min, 60 s windows${BUDGET:+, disk_budget $BUDGET}" >&2
sleep 70 # the first flush registers the series
w0=(); for pid in "${pids[@]}"; do w0+=("$(write_bytes "$pid")"); done
t0=$(now)
sleep $((MINUTES * 60 - 70))
t1=$(now)
for build in "${builds[@]}"; do
    per_hour=(); per_flush=()
    for i in "${!pids[@]}"; do
        [ "${bins[$i]}" = "$build" ] || continue
        bytes=$(($(write_bytes "${pids[$i]}") - w0[i]))
        per_hour+=("$(awk -v b="$bytes" -v t0="$t0" -v t1="$t1" 'BEGIN {printf "%d", b * 3600 / (t1 - t0)}')")
        per_flush+=("$(awk -v b="$bytes" -v t0="$t0" -v t1="$t1" 'BEGIN {printf "%d", b * 60 / (t1 - t0)}')")
    done
    echo "$build: edgespool $("$build" --version | cut -d' ' -f2), $SERIES series at 1 Hz, 60 s windows, $PARTITION partitions, $RUNS run(s) of $MINUTES min:"
    echo "  spool disk writes per hour: $(median "${per_hour[@]}") bytes (runs: ${per_hour[*]})"
    echo "  per flush of $SERIES windows: $(median "${per_flush[@]}") bytes (runs: ${per_flush[*]})"
done
