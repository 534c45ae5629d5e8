# Shared by the benchmark scripts (bench.sh, bench-drain.sh, bench-postgres.sh,
# bench-mqtt.sh, bench-listen.sh), sourced before they change folder:
#
#   . "$(dirname "$0")/lib.sh"
#
# The release build, temporary folders and processes removed and stopped at exit, bounded
# polling, the agent and the servers in the background, `edgespool status` fields,
# readings of /proc/PID and medians. Nothing here runs when sourced but the exit trap.
# shellcheck shell=bash

# --- at exit -----------------------------------------------------------------------
# Names of the variables holding PIDs to stop at exit (an empty one: already stopped),
# functions to run then, and folders to remove last.
bench_stop_vars=(agent)
bench_exit_steps=()
bench_dirs=()
agent=""

# stop_at_exit VAR: the process whose PID VAR holds at exit is killed and waited for.
stop_at_exit() { bench_stop_vars+=("$1"); }

# at_exit FUNCTION: runs FUNCTION at exit, after the processes are stopped and before the
# folders are removed.
at_exit() { bench_exit_steps+=("$1"); }

bench_cleanup() {
    local var pid step
    for var in "${bench_stop_vars[@]}"; do
        pid=${!var:-}
        [ -n "$pid" ] || continue
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    for step in "${bench_exit_steps[@]}"; do "$step" || true; done
    if [ ${#bench_dirs[@]} -gt 0 ]; then rm -rf "${bench_dirs[@]}"; fi
}
trap bench_cleanup EXIT

# remove_at_exit DIR...: the folders are removed at exit, last.
remove_at_exit() { bench_dirs+=("$@"); }

# --- build -------------------------------------------------------------------------
# release_build CARGO_ARGS...: `cargo build --release --locked -p edgespool CARGO_ARGS...`;
# sets RELEASE (the build's folder, $CARGO_TARGET_DIR's if set) and BIN (the binary).
release_build() {
    cargo build --release --locked -p edgespool "$@" >&2
    RELEASE="${CARGO_TARGET_DIR:-$PWD/target}/release"
    BIN="$RELEASE/edgespool"
}

# --- polling -----------------------------------------------------------------------
# wait_until [--every SECONDS] [--alive PID] TIMEOUT DESCRIPTION COMMAND...
# Runs COMMAND, in this shell (it may set variables), until it succeeds; a failure is
# "not yet": it sleeps (0.2 s, or --every) and tries again. Ends the script, naming
# DESCRIPTION, once TIMEOUT seconds have passed, or as soon as the process PID (--alive)
# has exited.
wait_until() {
    local every=0.2 alive=""
    while :; do
        case $1 in
            --every) every=$2; shift 2 ;;
            --alive) alive=$2; shift 2 ;;
            *) break ;;
        esac
    done
    local timeout=$1 what=$2
    shift 2
    local deadline=$((SECONDS + timeout))
    while :; do
        if [ -n "$alive" ] && ! kill -0 "$alive" 2>/dev/null; then
            echo "$(basename "$0"): process $alive exited while waiting for $what" >&2
            exit 1
        fi
        if "$@"; then return 0; fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "$(basename "$0"): timed out after ${timeout}s waiting for $what" >&2
            exit 1
        fi
        sleep "$every"
    done
}

# --- servers and the agent ---------------------------------------------------------
# free_port: a free loopback port (bound, then released for a server to take).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# listening PORT: whether something accepts connections on 127.0.0.1:PORT.
listening() { (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# start_server VAR PORT LOG COMMAND...: COMMAND in the background, its output to LOG,
# its PID in VAR (stopped at exit); returns once it listens on PORT (at most 60 s).
start_server() {
    local var=$1 port=$2 log=$3
    shift 3
    "$@" > "$log" 2>&1 &
    printf -v "$var" '%s' "$!"
    stop_at_exit "$var"
    wait_until --every 0.1 --alive "${!var}" 60 "$(basename "$1") to listen on port $port (log: $log)" \
        listening "$port"
}

# start_agent CONFIG LOG: `edgespool run --config CONFIG` in the background, its log
# appended to LOG, its PID in `agent` (stopped at exit).
start_agent() {
    "$BIN" run --config "$1" 2>> "$2" &
    agent=$!
}

# stop_agent: SIGTERM to the agent, then waits for it to exit.
stop_agent() {
    kill -TERM "$agent"
    wait "$agent" || true
    agent=""
}

# --- status ------------------------------------------------------------------------
# status_field CONFIG EXPRESSION: prints the Python EXPRESSION on the agent's
# `status --json` (named `s`); fails, printing nothing, while status cannot be read.
status_field() {
    "$BIN" status --config "$1" --json 2>/dev/null |
        python3 -c "import json, sys; s = json.load(sys.stdin); print($2)" 2>/dev/null
}

# source_samples CONFIG SOURCE: the samples counter of SOURCE.
source_samples() {
    status_field "$1" "next(x['samples'] for x in s['sources'] if x['name'] == '$2')"
}

# pending_rows CONFIG SINK: the rows SINK has yet to receive.
pending_rows() {
    status_field "$1" "next(x['pending_rows'] for x in s['sinks'] if x['name'] == '$2')"
}

# utc_seconds TIME: Unix seconds of an RFC 3339 time ("2026-01-02T03:00:00.5Z").
utc_seconds() {
    python3 -c 'import datetime, sys; print(datetime.datetime.fromisoformat(sys.argv[1].replace("Z", "+00:00")).timestamp())' "$1"
}

# --- measuring ---------------------------------------------------------------------
# shellcheck disable=SC2034 # for the scripts that source this
CLK_TCK=$(getconf CLK_TCK)

# now: Unix seconds, to the nanosecond.
now() { date +%s.%N; }

# proc_kib PID FIELD: a field of /proc/PID/status in KiB (VmRSS, VmHWM).
proc_kib() { awk -v field="$2:" '$1 == field {print $2}' "/proc/$1/status"; }

# cpu_ticks PID: utime + stime, fields 14 and 15 of /proc/PID/stat (the command name
# has no spaces), in CLK_TCK ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# write_bytes PID: what PID has caused to be written to a block device, /proc/PID/io.
write_bytes() { awk '/^write_bytes/ {print $2}' "/proc/$1/io"; }

# note_peak PID: raises `peak` to the VmHWM of PID (KiB), if it is still there.
note_peak() {
    local hwm
    hwm=$(proc_kib "$1" VmHWM) || return 0
    if [ -n "$hwm" ] && [ "$hwm" -gt "$peak" ]; then peak=$hwm; fi
}

# backlog_drained CONFIG SINK: raises `peak` to the agent's VmHWM (note_peak), and says
# whether SINK has fewer than 1000 rows pending: at first only the backlog is pending,
# once it is drained what is left is the live hour.
backlog_drained() {
    note_peak "$agent"
    local left
    left=$(pending_rows "$1" "$2") && [ "$left" -lt 1000 ]
}

# median NUMBER...: the middle one (of an even count, the lower middle).
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
