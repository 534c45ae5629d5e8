#!/usr/bin/env bash
# PostgreSQL drain benchmark: a backlog (100 series, 60 s windows; 14 days: 2,016,000
# rows) in the spool, loaded by `edgespool run` into a fresh PostgreSQL server (from its
# start to its log line for the last part: rows per second), once with the default
# `transaction_rows` (several parts per transaction) and once with `transaction_rows = 1`
# (a part per transaction, as before), each from its own copy of the same spool; then
# the same rows, exported as CSV with every column the agent copies, loaded with
# `psql \copy` into the same (emptied) table on the same server: the ceiling. Each
# figure comes with the CPU seconds of the agent and of the server (every PostgreSQL
# backend that loaded the rows) and the server's transactions.
#
#   scripts/bench-postgres.sh            # 3 runs, medians printed
#   BENCH_RUNS=1 BENCH_DAYS=1 scripts/bench-postgres.sh
#   BENCH_BIN=/path/to/edgespool scripts/bench-postgres.sh   # another build, not rebuilt
#   BENCH_PERF=DIR scripts/bench-postgres.sh  # perf record of the agent and its backend
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

RUNS=${BENCH_RUNS:-3}
DAYS=${BENCH_DAYS:-14}
SERIES=100
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
[ -x "$pgbin/postgres" ] || { echo "PostgreSQL is missing: run scripts/test.sh once" >&2; exit 1; }

if [ -n "${BENCH_BIN:-}" ]; then
    # Another build (an earlier one, to compare): nothing is built; the backlog tool is
    # the one built last.
    BIN=$BENCH_BIN
    BACKLOG="${CARGO_TARGET_DIR:-$PWD/target}/release/examples/backlog"
else
    release_build --bin edgespool --example backlog
    BACKLOG="$RELEASE/examples/backlog"
fi
PERF=${BENCH_PERF:-}

work=$(mktemp -d "${TMPDIR:-/var/tmp}/edgespool-pg.XXXXXX")
remove_at_exit "$work"
chmod 755 "$work"
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
stop_postgres() { as_pg "$pgbin/pg_ctl" -D "$work/data" -m fast stop >/dev/null 2>&1; }
at_exit stop_postgres

port=$(free_port)
echo bench > "$work/pw"
[ "$(id -u)" -eq 0 ] && chown postgres "$work" "$work/pw"
as_pg "$pgbin/initdb" -D "$work/data" -U edgespool --auth=scram-sha-256 --pwfile="$work/pw" -E UTF8 >/dev/null
as_pg "$pgbin/pg_ctl" -D "$work/data" -l "$work/pg.log" -w \
    -o "-p $port -k $work -c listen_addresses=127.0.0.1" start >/dev/null
export PGPASSWORD=bench
sql() { psql -h 127.0.0.1 -p "$port" -U edgespool -d postgres -X -A -t -v ON_ERROR_STOP=1 "$@"; }

tick=$(getconf CLK_TCK)
# stat_cpu: CPU seconds (utime + stime) of the /proc/PID/stat line on stdin.
stat_cpu() { awk -v t="$tick" '{sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / t}'; }
# process_cpu PID: its CPU seconds.
process_cpu() { stat_cpu < "/proc/$1/stat"; }
# commits: transactions committed in the database so far.
commits() { sql -c "SELECT xact_commit FROM pg_stat_database WHERE datname = 'postgres'"; }

# drain SPOOL TRANSACTION_ROWS: loads the backlog in SPOOL with the agent into an empty
# table; sets rate, acpu (agent CPU s), scpu (CPU s of the server process that loaded
# the rows: the agent's backend), xacts, peak.
drain() {
    sql -c "DROP TABLE IF EXISTS edgespool_windows, edgespool_loads" >/dev/null
    cat > "$work/drain.toml" <<TOML
[agent]
device_id = "bench"
spool = "$1"
window = "5s"
partition = "1h"
disk_budget = "1 GiB"
[[sources]]
kind = "system"
[[sinks]]
kind = "postgres"
name = "db"
host = "127.0.0.1"
port = $port
user = "edgespool"
dbname = "postgres"
password = "bench"
sslmode = "disable"
transaction_rows = $2
TOML
    : > "$work/agent.log"
    local start x0 end
    x0=$(commits)
    start=$(now)
    start_agent "$work/drain.toml" "$work/agent.log"
    peak=0
    local perfs=()
    if [ -n "$PERF" ]; then
        # The agent from its start, its backend once it has connected.
        perf record -q -F 499 -g -p "$agent" -o "$PERF/agent-$2.data" 2>/dev/null & perfs+=($!)
        wait_until 60 "the agent's backend" agent_backend
        perf record -q -F 499 -g -p "$backend" -o "$PERF/backend-$2.data" 2>/dev/null & perfs+=($!)
    fi
    wait_until --every 1 --alive "$agent" 3600 "the backlog loaded" \
        backlog_drained "$work/drain.toml" db
    for p in "${perfs[@]}"; do kill -INT "$p"; wait "$p" || true; done
    # The end is the agent's own log line for the last part of the backlog, so that the
    # polling above neither counts nor slows the figure.
    end=$(utc_seconds "$(grep ' delivered' "$work/agent.log" | tail -1 | cut -d' ' -f1)")
    acpu=$(process_cpu "$agent")
    agent_backend
    scpu=$(process_cpu "$backend")
    xacts=$(( $(commits) - x0 ))
    stop_agent
    rate=$(awk -v r="$rows" -v a="$start" -v b="$end" 'BEGIN {printf "%d", r / (b - a)}')
    wall=$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.1f", b - a}')
}

# agent_backend: sets backend to the pid of the agent's server process, if connected.
agent_backend() {
    backend=$(sql -c "SELECT pid FROM pg_stat_activity WHERE application_name = 'edgespool'")
    [ -n "$backend" ]
}

agent_rates=(); one_rates=(); copy_rates=(); ratios=(); one_ratios=(); peaks=()
agent_cpu=(); agent_server=(); copy_server=(); agent_xacts=(); one_xacts=()
cols="device, series, unit, tags, window_start, window_seconds, count, min, max, mean, stdev, median, first, last, first_time, last_time, mean_rest"
for run in $(seq 1 "$RUNS"); do
    rm -f "$work"/spool.db* "$work"/one.db*
    rows=$("$BACKLOG" "$work/spool.db" "$((DAYS * 24))" "$SERIES" | awk '{print $1}')
    # The same spool twice: the same rows for both drains.
    for f in "$work"/spool.db*; do cp "$f" "$work/one.db${f#"$work"/spool.db}"; done

    # The two drains take turns going first: the second meets the server's checkpoint of
    # the first's writes.
    one_drain() {
        drain "$work/one.db" 1
        one=$rate; one_x=$xacts
        echo "run $run: a part per transaction: $rate rows/s ($wall s), agent CPU $acpu s, server backend CPU $scpu s, $xacts transactions" >&2
    }
    [ $((run % 2)) -eq 1 ] && one_drain
    drain "$work/spool.db" 100000
    loaded=$(sql -c "SELECT count(*) FROM edgespool_windows WHERE device = 'bench' AND window_seconds = 60")
    echo "run $run: default batches: $rate rows/s ($loaded rows in the table, $wall s), agent CPU $acpu s, server backend CPU $scpu s, $xacts transactions, peak RSS $peak KiB" >&2
    batch_rate=$rate; batch_cpu=$acpu; batch_scpu=$scpu; batch_x=$xacts; batch_peak=$peak
    # Either drain leaves the same rows in the table, for psql \copy below.
    [ $((run % 2)) -eq 0 ] && one_drain

    # The ceiling: the same rows through psql \copy into the same table, emptied.
    sql -c "\\copy (SELECT $cols FROM edgespool_windows WHERE window_seconds = 60) TO '$work/rows.csv' CSV"
    sql -c "TRUNCATE edgespool_windows" >/dev/null
    c0=$(now)
    # The backend reads its own CPU time once the COPY is done, in the same session.
    cs=$(sql -c "\\copy edgespool_windows ($cols) FROM '$work/rows.csv' CSV" \
        -c "SELECT pg_read_file('/proc/self/stat')" | grep -m1 ' (postgres) ' | stat_cpu)
    c1=$(now)
    copied=$(sql -c "SELECT count(*) FROM edgespool_windows")
    [ "$copied" = "$loaded" ] || { echo "psql \\copy loaded $copied rows, the agent $loaded" >&2; exit 1; }

    c=$(awk -v r="$loaded" -v a="$c0" -v b="$c1" 'BEGIN {printf "%d", r / (b - a)}')
    r=$(awk -v a="$batch_rate" -v c="$c" 'BEGIN {printf "%.2f", a / c}')
    r1=$(awk -v a="$one" -v c="$c" 'BEGIN {printf "%.2f", a / c}')
    echo "run $run: psql \\copy $c rows/s ($(awk -v a="$c0" -v b="$c1" 'BEGIN {printf "%.1f", b - a}') s), server backend CPU $cs s; ratio $r (a part per transaction: $r1)" >&2
    agent_rates+=("$batch_rate"); one_rates+=("$one"); copy_rates+=("$c"); ratios+=("$r"); one_ratios+=("$r1")
    peaks+=("$batch_peak"); agent_cpu+=("$batch_cpu"); agent_server+=("$batch_scpu"); copy_server+=("$cs")
    agent_xacts+=("$batch_x"); one_xacts+=("$one_x")
done

echo
echo "drain of $DAYS days x $SERIES series (60 s windows, $rows rows) to PostgreSQL, medians of $RUNS run(s):"
echo "  edgespool: $(median "${agent_rates[@]}") rows/s (from start to an empty backlog; $(median "${agent_xacts[@]}") transactions)"
echo "    agent CPU $(median "${agent_cpu[@]}") s, its server backend's CPU $(median "${agent_server[@]}") s"
echo "  edgespool, a part per transaction: $(median "${one_rates[@]}") rows/s ($(median "${one_xacts[@]}") transactions)"
echo "  psql \\copy of the same rows into the same table: $(median "${copy_rates[@]}") rows/s, its backend's CPU $(median "${copy_server[@]}") s"
echo "  ratio to psql \\copy, per run: ${ratios[*]}; median $(median "${ratios[@]}")"
echo "  a part per transaction, per run: ${one_ratios[*]}; median $(median "${one_ratios[@]}")"
echo "  peak resident memory: $(median "${peaks[@]}") KiB"
