#!/usr/bin/env bash
# PostgreSQL drain benchmark: a 7-day backlog (100 series, 60 s windows: 1,008,000
# rows) in the spool, loaded by `edgespool run` into a fresh PostgreSQL server (from its
# start to its log line for the last part: rows per second); then the
# same rows, exported as CSV, loaded with `psql \copy` into the same (emptied) table on
# the same server: the ceiling.
#
#   scripts/bench-postgres.sh            # 3 runs, medians printed
#   BENCH_RUNS=1 BENCH_DAYS=1 scripts/bench-postgres.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

RUNS=${BENCH_RUNS:-3}
DAYS=${BENCH_DAYS:-7}
SERIES=100
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
[ -x "$pgbin/postgres" ] || { echo "PostgreSQL is missing: run scripts/test.sh once" >&2; exit 1; }

release_build --bin edgespool --example backlog
BACKLOG="$RELEASE/examples/backlog"

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

agent_rates=(); copy_rates=(); ratios=(); peaks=()
cols="device, series, unit, tags, window_start, window_seconds, count, min, max, mean, stdev, median, first, last"
for run in $(seq 1 "$RUNS"); do
    sql -c "DROP TABLE IF EXISTS edgespool_windows, edgespool_loads" >/dev/null
    rm -f "$work"/spool.db*
    rows=$("$BACKLOG" "$work/spool.db" "$DAYS" "$SERIES" | awk '{print $1}')
    cat > "$work/drain.toml" <<TOML
[agent]
device_id = "bench"
spool = "$work/spool.db"
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
TOML
    : > "$work/agent.log"
    start=$(now)
    start_agent "$work/drain.toml" "$work/agent.log"
    peak=0
    wait_until --every 1 --alive "$agent" 3600 "the backlog loaded" \
        backlog_drained "$work/drain.toml" db
    # The end is the agent's own log line for the last part of the backlog, so that the
    # polling above (every second) neither counts nor slows the figure.
    end=$(utc_seconds "$(grep ' delivered' "$work/agent.log" | tail -1 | cut -d' ' -f1)")
    stop_agent
    loaded=$(sql -c "SELECT count(*) FROM edgespool_windows WHERE device = 'bench' AND window_seconds = 60")

    # The ceiling: the same rows through psql \copy into the same table, emptied.
    sql -c "\\copy (SELECT $cols FROM edgespool_windows WHERE window_seconds = 60) TO '$work/rows.csv' CSV"
    sql -c "TRUNCATE edgespool_windows" >/dev/null
    c0=$(now)
    sql -c "\\copy edgespool_windows ($cols) FROM '$work/rows.csv' CSV" >/dev/null
    c1=$(now)

    a=$(awk -v r="$rows" -v a="$start" -v b="$end" 'BEGIN {printf "%d", r / (b - a)}')
    c=$(awk -v r="$loaded" -v a="$c0" -v b="$c1" 'BEGIN {printf "%d", r / (b - a)}')
    r=$(awk -v a="$a" -v c="$c" 'BEGIN {printf "%.2f", a / c}')
    echo "run $run: agent $rows rows ($loaded in the table) at $a rows/s; psql \\copy $c rows/s; ratio $r; peak RSS $peak KiB" >&2
    agent_rates+=("$a"); copy_rates+=("$c"); ratios+=("$r"); peaks+=("$peak")
done

a=$(median "${agent_rates[@]}")
c=$(median "${copy_rates[@]}")
echo
echo "drain of $DAYS days x $SERIES series (60 s windows) to PostgreSQL, medians of $RUNS run(s):"
echo "  edgespool: $a rows/s (from start to an empty backlog, one transaction per hourly part)"
echo "  psql \\copy of the same rows into the same table: $c rows/s"
echo "  ratio to psql \\copy, per run: ${ratios[*]}; median $(median "${ratios[@]}")"
echo "  peak resident memory: $(median "${peaks[@]}") KiB"
