#!/usr/bin/env bash
# Resource benchmark: `edgespool run` with BENCH_SERIES series (100 by default) sampled at
# 1 Hz in 60 s windows, the spool on disk and a local-folder sink, beside collectd (Debian's
# package) reading the same files each second, as docs/benchmarks.md describes.
#
#   scripts/bench.sh                                  # 3 runs of 20 minutes, at once (~22 min)
#   BENCH_SERIES=10000 BENCH_COLLECTD=0 scripts/bench.sh   # a row of the scale table
#   BENCH_RUNS=1 BENCH_MINUTES=3 scripts/bench.sh     # a quick look (no spool figure)
#   BENCH_SYSFS=1 scripts/bench.sh                    # a real sysfs attribute for every series
#   BENCH_PARTITION=1h BENCH_MINUTES=60 scripts/bench.sh   # the default hourly partitions
#   BENCH_BASE=/path/to/edgespool scripts/bench.sh    # another build beside each run
#   EDGESPOOL_BIN=/path/to/edgespool scripts/bench.sh     # that binary instead of a release build
#
# BENCH_RUNS runs (3) of BENCH_MINUTES (20) each; BENCH_CONCURRENT=1 (the default) starts
# every run, and collectd's runs, at the same time (each its own spool, output and
# process), BENCH_CONCURRENT=0 one after the other. BENCH_COLLECTD=0 leaves collectd out.
# BENCH_SYSFS=1 points every series at the same real sysfs attribute (/sys/class/net/lo/mtu,
# each series its own open file) instead of the fake tree: files as a Pi's hwmon files
# are, which the agent reads with no link check (docs/configuration.md, `kind = "sysfs"`).
# BENCH_PARTITION (5m) is the agents' partition length: 5m so that RSS after deliveries
# shows within 20 minutes, 1h for the deliveries a user's default gives. BENCH_BASE, the
# path of another edgespool binary (an earlier build), runs it beside each run on its own
# spool and files, and prints its figures and this build's ratio to them.
#
# Figures come from the kernel, not from the processes: VmRSS/VmHWM of /proc/PID/status,
# utime+stime of /proc/PID/stat, write_bytes of /proc/PID/io, each per process.
#
# 1. CPU: ticks from 5 s after start (start-up left out) to the end, scaled to an hour.
# 2. Resident memory after deliveries: partitions of 5 minutes, so the sink delivers every
#    5 minutes; VmRSS every 10 s once the first file is in the output folder, the median.
#    collectd delivers nothing: its samples are taken from the same instant.
# 3. Spool writes: write_bytes over the same span, scaled to an hour, with the real 60 s
#    windows (one flush a minute; SQLite checkpoints its WAL as it does in the field).
#    write_bytes counts only what reaches a block device: the agent's output folder is on
#    tmpfs, so what is counted is the spool's own writes. collectd has no spool: its CSV
#    files, its only store, are on the same disk as the spool.
# 4. fsync calls per flush, counted with strace over ten 2 s flushes.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

RUNS=${BENCH_RUNS:-3}
MINUTES=${BENCH_MINUTES:-20}
SERIES=${BENCH_SERIES:-100}
CONCURRENT=${BENCH_CONCURRENT:-1}
COLLECTD=${BENCH_COLLECTD:-1}
SYSFS=${BENCH_SYSFS:-0}
PARTITION=${BENCH_PARTITION:-5m}
BASE=${BENCH_BASE:-}
if [ -n "$BASE" ] && [ ! -x "$BASE" ]; then
    echo "BENCH_BASE=$BASE is not an executable" >&2
    exit 1
fi

if [ "$MINUTES" -lt 20 ]; then
    echo "note: BENCH_MINUTES=$MINUTES: the spool figure needs at least 20 minutes of 60 s windows" >&2
fi

# collectd from Debian, installed if missing.
collectd_bin=""
if [ "$COLLECTD" = 1 ]; then
    if ! command -v collectd >/dev/null 2>&1 && [ ! -x /usr/sbin/collectd ]; then
        if command -v apt-get >/dev/null 2>&1; then
            echo "== installing collectd-core (apt-get)" >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends collectd-core >&2 ||
                echo "apt-get could not install collectd-core" >&2
        fi
    fi
    collectd_bin=$(command -v collectd || { [ -x /usr/sbin/collectd ] && echo /usr/sbin/collectd; } || true)
    if [ -z "$collectd_bin" ]; then
        echo "SKIPPED collectd: not installed and apt-get is not available (or failed)" >&2
        COLLECTD=0
    fi
fi

if [ -n "${EDGESPOOL_BIN:-}" ]; then
    BIN=$EDGESPOOL_BIN # a binary built before (the runs take longer than a build stays put)
else
    release_build --bin edgespool
fi

work=$(mktemp -d "${TMPDIR:-/var/tmp}/edgespool-bench.XXXXXX")
shm=$(mktemp -d /dev/shm/edgespool-bench.XXXXXX)
remove_at_exit "$work" "$shm"

# A fake hwmon tree with one input per series, or a real sysfs attribute for each.
if [ "$SYSFS" = 1 ]; then
    attribute=/sys/class/net/lo/mtu
    [ -r "$attribute" ] || { echo "$attribute cannot be read: no BENCH_SYSFS here" >&2; exit 1; }
    tree=/
    file_of() { echo "$attribute"; }
    abs_of() { echo "$attribute"; }
else
    for i in $(seq 1 "$SERIES"); do
        mkdir -p "$work/sys/class/hwmon/hwmon$i"
        echo $((40000 + i % 1000)) > "$work/sys/class/hwmon/hwmon$i/temp1_input"
    done
    tree=$work
    # Relative to the source's root (an absolute path is taken under the root too).
    file_of() { echo "sys/class/hwmon/hwmon$1/temp1_input"; }
    abs_of() { echo "$work/sys/class/hwmon/hwmon$1/temp1_input"; }
fi

# agent_config FILE WINDOW SPOOL OUT: the agent's config.
agent_config() {
    {
        printf '[agent]\ndevice_id = "bench"\nspool = "%s/spool.db"\nwindow = "%s"\npartition = "%s"\ngrace = "5s"\n\n' "$3" "$2" "$PARTITION"
        printf '[[sources]]\nkind = "sysfs"\nname = "hw"\nroot = "%s"\ninterval = "1s"\n' "$tree"
        for i in $(seq 1 "$SERIES"); do
            printf '[[sources.files]]\nfield = "t%d"\npath = "%s"\nscale = 0.001\nunit = "celsius"\n' "$i" "$(file_of "$i")"
        done
        printf '\n[[sinks]]\nkind = "local"\nname = "archive"\npath = "%s"\n' "$4"
    } > "$1"
}

# collectd_config FILE DIR: collectd reading the same files every second with its `table`
# plugin (each file a table of one cell) and writing each value to CSV files under DIR.
collectd_config() {
    {
        printf 'Interval 1\nHostname "bench"\nFQDNLookup false\nBaseDir "%s"\nPIDFile "%s/collectd.pid"\n' "$2" "$2"
        printf 'PluginDir "/usr/lib/collectd"\nTypesDB "/usr/share/collectd/types.db"\n'
        printf 'LoadPlugin table\nLoadPlugin csv\n<Plugin csv>\n  DataDir "%s/csv"\n  StoreRates false\n</Plugin>\n<Plugin table>\n' "$2"
        for i in $(seq 1 "$SERIES"); do
            printf '  <Table "%s">\n    Instance "hwmon%d"\n    Separator " \\n"\n    <Result>\n      Type temperature\n      InstancePrefix "temp1"\n      ValuesFrom 0\n    </Result>\n  </Table>\n' "$(abs_of "$i")" "$i"
        done
        printf '</Plugin>\n'
    } > "$1"
}

# Processes of a group, by index: their kind (edgespool, collectd), PID, folders.
kinds=(); pids=(); outs=()
procs_stop() {
    local pid
    for pid in "${pids[@]}"; do
        [ -n "$pid" ] || continue
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    pids=()
}
at_exit procs_stop

# Per run, the figures: "kind cpu_s_per_h rss_kib peak_kib write_bytes_per_h".
results=()

# measure_group RUN...: starts the runs named (an agent, and collectd if wanted, per
# run), measures them side by side for MINUTES, stops them and appends to `results`.
measure_group() {
    local run i
    kinds=(); pids=(); outs=()
    for run in "$@"; do
        mkdir -p "$work/run$run/spool" "$shm/run$run"
        agent_config "$work/run$run/bench.toml" 60s "$work/run$run/spool" "$shm/run$run/out"
        "$BIN" run --config "$work/run$run/bench.toml" 2>> "$work/run$run/agent.log" &
        kinds+=(edgespool); pids+=("$!"); outs+=("$shm/run$run/out")
        if [ -n "$BASE" ]; then
            mkdir -p "$work/base$run/spool"
            agent_config "$work/base$run/bench.toml" 60s "$work/base$run/spool" "$shm/base$run/out"
            "$BASE" run --config "$work/base$run/bench.toml" 2>> "$work/base$run/agent.log" &
            kinds+=(base); pids+=("$!"); outs+=("$shm/base$run/out")
        fi
        if [ "$COLLECTD" = 1 ]; then
            mkdir -p "$work/collectd$run"
            collectd_config "$work/collectd$run/collectd.conf" "$work/collectd$run"
            "$collectd_bin" -f -C "$work/collectd$run/collectd.conf" > "$work/collectd$run/log" 2>&1 &
            kinds+=(collectd); pids+=("$!"); outs+=("")
        fi
    done
    sleep 5 # start-up left out: loading the binary, creating the spool
    local n=${#pids[@]} t0 c0=() w0=() after=() samples=()
    # first_of I: the index of the agent of process I's run (the group's first of it).
    first_of() {
        local j=$1
        while [ "$j" -gt 0 ] && [ "${kinds[$j]}" != edgespool ]; do j=$((j - 1)); done
        echo "$j"
    }
    t0=$(now)
    for i in $(seq 0 $((n - 1))); do
        kill -0 "${pids[$i]}" 2>/dev/null || { echo "${kinds[$i]} exited at start (logs under $work)" >&2; exit 1; }
        c0[i]=$(cpu_ticks "${pids[$i]}"); w0[i]=$(write_bytes "${pids[$i]}"); after[i]=0; samples[i]=""
    done
    local end=$((SECONDS + MINUTES * 60))
    while [ $SECONDS -lt $end ]; do
        sleep 10
        for i in $(seq 0 $((n - 1))); do
            if [ "${after[$i]}" = 0 ]; then
                if [ "${kinds[$i]}" = collectd ]; then
                    # collectd has no deliveries: from the instant this run's agent had one.
                    [ "${after[$(first_of "$i")]}" = 1 ] && after[i]=1
                elif [ -n "$(find "${outs[$i]}" -name '*.ndjson' -print -quit 2>/dev/null)" ]; then
                    after[i]=1
                fi
            fi
            [ "${after[$i]}" = 1 ] && samples[i]+=" $(proc_kib "${pids[$i]}" VmRSS)"
        done
    done
    local t1 c1 w1 peak cpu rss writes
    t1=$(now)
    for i in $(seq 0 $((n - 1))); do
        c1=$(cpu_ticks "${pids[$i]}"); w1=$(write_bytes "${pids[$i]}"); peak=$(proc_kib "${pids[$i]}" VmHWM)
        cpu=$(awk -v d=$((c1 - c0[i])) -v t="$CLK_TCK" -v s="$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')" 'BEGIN {printf "%.2f", d / t * 3600 / s}')
        writes=$(awk -v d=$((w1 - w0[i])) -v s="$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')" 'BEGIN {printf "%d", d * 3600 / s}')
        # shellcheck disable=SC2086 # the samples are words
        if [ -n "${samples[$i]}" ]; then rss=$(median ${samples[$i]}); else rss="none"; fi
        echo "${kinds[$i]}: cpu $cpu s/h, rss after deliveries $rss KiB, peak $peak KiB, writes $writes B/h" >&2
        results+=("${kinds[$i]} $cpu $rss $peak $writes")
    done
    procs_stop
}

echo "== $RUNS run(s) of $MINUTES min, $SERIES series, 60 s windows, $([ "$CONCURRENT" = 1 ] && echo "all at once" || echo "one after the other")$([ "$COLLECTD" = 1 ] && echo ", collectd beside each run")" >&2
if [ "$CONCURRENT" = 1 ]; then
    measure_group $(seq 1 "$RUNS")
else
    for run in $(seq 1 "$RUNS"); do measure_group "$run"; done
fi
# Figures of an agent that could not read its files would be figures of nothing.
if grep -l "read failed" "$work"/run*/agent.log "$work"/base*/agent.log >/dev/null 2>&1; then
    echo "bench.sh: an agent could not read its files: $(grep -m1 -h "read failed" "$work"/run*/agent.log "$work"/base*/agent.log 2>/dev/null)" >&2
    exit 1
fi

syncs="(strace not installed)"
if command -v strace >/dev/null 2>&1; then
    mkdir -p "$work/strace/spool"
    agent_config "$work/strace/bench.toml" 2s "$work/strace/spool" "$shm/strace-out"
    # fsync and fdatasync calls from 5 s to 25 s after start: ten 2 s flushes, without
    # the spool's creation at start-up and the checkpoint at shutdown.
    t0=$(date +%s.%N)
    timeout -s INT 27 strace -f -qq -ttt -e trace=fsync,fdatasync -o "$work/strace.log" \
        "$BIN" run --config "$work/strace/bench.toml" 2>/dev/null || true
    syncs=$(awk -v t0="$t0" '/fsync|fdatasync/ && $2 >= t0 + 5 && $2 < t0 + 25 {n++} END {print n + 0}' "$work/strace.log")
    syncs="$syncs in 10 flushes"
fi

# column KIND N: the Nth figure of every run of KIND, space separated.
column() { printf '%s\n' "${results[@]}" | awk -v k="$1" -v n="$2" '$1 == k {printf "%s%s", sep, $(n + 1); sep = ", "}'; }
# shellcheck disable=SC2046 # the runs' figures are words
med() { median $(column "$1" "$2" | tr -d ,); }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b + 0 > 0) printf "%.2f", a / b; else print "n/a"}'; }

echo
echo "edgespool $("$BIN" --version | cut -d' ' -f2), $SERIES series at 1 Hz ($([ "$SYSFS" = 1 ] && echo "$attribute" || echo "a fake hwmon tree")), 60 s windows, $PARTITION partitions, medians of $RUNS run(s) of $MINUTES min:"
echo "  CPU: $(med edgespool 1) s per hour (runs: $(column edgespool 1))"
echo "  resident memory after deliveries: $(med edgespool 2) KiB (VmRSS every 10 s; runs: $(column edgespool 2)), peak $(med edgespool 3) KiB (VmHWM)"
echo "  spool disk writes: $(med edgespool 4) bytes per hour (runs: $(column edgespool 4))"
echo "  aggregates: $((SERIES * 60)) windows per hour = $((SERIES * 60 * 8 * 8)) bytes per hour of raw statistics (8 numbers of 8 bytes)"
echo "  fsync calls: $syncs"
if [ -n "$BASE" ]; then
    echo "beside each run, edgespool $("$BASE" --version | cut -d' ' -f2) at $BASE, the same job on its own spool and files:"
    echo "  CPU: $(med base 1) s per hour (runs: $(column base 1))"
    echo "  resident memory after deliveries: $(med base 2) KiB (runs: $(column base 2)), peak $(med base 3) KiB"
    echo "  spool disk writes: $(med base 4) bytes per hour (runs: $(column base 4))"
    echo "this build / that one: CPU $(ratio "$(med edgespool 1)" "$(med base 1)"), resident memory $(ratio "$(med edgespool 2)" "$(med base 2)"), spool writes $(ratio "$(med edgespool 4)" "$(med base 4)")"
fi
if [ "$COLLECTD" = 1 ]; then
    echo "collectd $("$collectd_bin" -h 2>&1 | awk '/^collectd [0-9]/ {sub(/,$/, "", $2); print $2; exit}'), the same files every second (table plugin), every value to CSV on disk, medians of $RUNS run(s):"
    echo "  CPU: $(med collectd 1) s per hour (runs: $(column collectd 1))"
    echo "  resident memory: $(med collectd 2) KiB (runs: $(column collectd 2)), peak $(med collectd 3) KiB"
    echo "  disk writes: $(med collectd 4) bytes per hour (runs: $(column collectd 4))"
    echo "edgespool / collectd: CPU $(ratio "$(med edgespool 1)" "$(med collectd 1)"), resident memory $(ratio "$(med edgespool 2)" "$(med collectd 2)"), disk writes $(ratio "$(med edgespool 4)" "$(med collectd 4)")"
fi
