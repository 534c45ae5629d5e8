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
cd "$(dirname "$0")/.."

RUNS=${BENCH_RUNS:-3}
DAYS=${BENCH_DAYS:-7}
SERIES=100
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
[ -x "$pgbin/postgres" ] || { echo "PostgreSQL is missing: run scripts/test.sh once" >&2; exit 1; }

cargo build --release --locked -p edgespool --bin edgespool --example backlog >&2
BIN="$PWD/target/release/edgespool"
BACKLOG="$PWD/target/release/examples/backlog"

work=$(mktemp -d "${TMPDIR:-/var/tmp}/edgespool-pg.XXXXXX")
chmod 755 "$work"
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
agent=""
cleanup() {
    [ -n "$agent" ] && { kill "$agent" 2>/dev/null || true; wait "$agent" 2>/dev/null || true; }
    as_pg "$pgbin/pg_ctl" -D "$work/data" -m fast stop >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo bench > "$work/pw"
[ "$(id -u)" -eq 0 ] && chown postgres "$work" "$work/pw"
as_pg "$pgbin/initdb" -D "$work/data" -U edgespool --auth=scram-sha-256 --pwfile="$work/pw" -E UTF8 >/dev/null
as_pg "$pgbin/pg_ctl" -D "$work/data" -l "$work/pg.log" -w \
    -o "-p $port -k $work -c listen_addresses=127.0.0.1" start >/dev/null
export PGPASSWORD=bench
sql() { psql -h 127.0.0.1 -p "$port" -U edgespool -d postgres -X -A -t -v ON_ERROR_STOP=1 "$@"; }
median() { sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
now() { date +%s.%N; }

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
    "$BIN" run --config "$work/drain.toml" 2>> "$work/agent.log" &
    agent=$!
    peak=0
    while :; do
        hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$agent/status")
        [ "$hwm" -gt "$peak" ] && peak=$hwm
        left=$("$BIN" status --config "$work/drain.toml" --json 2>/dev/null |
            python3 -c 'import json, sys; s = json.load(sys.stdin); print(next(x["pending_rows"] for x in s["sinks"]))' 2>/dev/null || echo "?")
        if [ "$left" != "?" ] && [ "$left" -lt 1000 ]; then break; fi
        sleep 1
    done
    # The end is the agent's own log line for the last part of the backlog, so that the
    # polling above (every second) neither counts nor slows the figure.
    end=$(grep ' delivered' "$work/agent.log" | tail -1 | cut -d' ' -f1 |
        python3 -c 'import datetime, sys; print(datetime.datetime.fromisoformat(sys.stdin.read().strip().replace("Z", "+00:00")).timestamp())')
    kill -TERM "$agent"; wait "$agent" || true; agent=""
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

a=$(printf '%s\n' "${agent_rates[@]}" | median)
c=$(printf '%s\n' "${copy_rates[@]}" | median)
echo
echo "drain of $DAYS days x $SERIES series (60 s windows) to PostgreSQL, medians of $RUNS run(s):"
echo "  edgespool: $a rows/s (from start to an empty backlog, one transaction per hourly part)"
echo "  psql \\copy of the same rows into the same table: $c rows/s"
echo "  ratio to psql \\copy, per run: ${ratios[*]}; median $(printf '%s\n' "${ratios[@]}" | median)"
echo "  peak resident memory: $(printf '%s\n' "${peaks[@]}" | median) KiB"
