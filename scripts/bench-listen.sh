#!/usr/bin/env bash
# Line-protocol ingest benchmark: one client (Python's http.client, one keep-alive
# connection over loopback) posts N points of InfluxDB line protocol in batches of 5,000
# lines, each batch answered before the next is sent; measured against:
#   1. InfluxDB 1 (Debian's `influxdb` package: `influxd` on a temp dir), `POST /write`,
#      the reference server of the protocol, when it is installed;
#   2. edgespool with a listen source (`POST /api/v2/write`, a token, 1 s windows, a
#      local-folder sink on tmpfs): a 204 means the samples are in its aggregator.
# Points per second from the first post to the last answer; CPU (utime + stime of
# /proc/PID/stat of the server) per point, for edgespool until `status` counts every
# sample (its flush committed them); peak RSS (VmHWM). Medians of the runs.
#
#   scripts/bench-listen.sh            # N = 500000, 3 runs, medians
#   BENCH_RUNS=1 BENCH_POINTS=100000 scripts/bench-listen.sh
#   (apt-get install influxdb for the reference; without it only edgespool is measured)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

RUNS=${BENCH_RUNS:-3}
BATCH=5000
N=${BENCH_POINTS:-500000}
BATCHES=$((N / BATCH))
N=$((BATCHES * BATCH))
TOKEN="bench-token"

release_build --bin edgespool
work=$(mktemp -d "${TMPDIR:-/var/tmp}/edgespool-listen.XXXXXX")
shm=$(mktemp -d /dev/shm/edgespool-listen.XXXXXX)
remove_at_exit "$work" "$shm"

# The batches: 10 sensors (a tag each, so 10 series), one point each a millisecond
# apart in nanosecond timestamps, an hour back from now.
python3 - "$work/batches" "$BATCHES" "$BATCH" <<'PY'
import os, sys, time
folder, batches, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.makedirs(folder)
start_ms = (int(time.time()) - 3600) * 1000
i = 0
for b in range(batches):
    with open(os.path.join(folder, "%06d.lp" % b), "w") as f:
        for _ in range(size):
            f.write("bench,sensor=s%d value=%.1f,level=%di %d\n"
                    % (i % 10, 20 + (i % 100) / 10, i % 7, (start_ms + i) * 1_000_000))
            i += 1
PY

# post PORT PATH: posts every batch; prints the seconds from the first post to the last
# answer, or fails on an answer other than 204.
post() {
    python3 - "$1" "$2" "$work/batches" <<'PY'
import http.client, os, sys, time
port, path, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
bodies = [open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))]
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
headers = {"Authorization": "Token bench-token", "Content-Type": "text/plain; charset=utf-8"}
t0 = time.time()
for body in bodies:
    conn.request("POST", path, body=body, headers=headers)
    answer = conn.getresponse()
    text = answer.read()
    if answer.status != 204:
        sys.exit("answer %d: %s" % (answer.status, text[:300]))
print(time.time() - t0)
PY
}

# measure PID PORT PATH [COMMAND...]: posts the batches to the server PID; sets rate,
# cpu (until COMMAND succeeds too, if given), peak.
measure() {
    local pid=$1 port=$2 path=$3 c0 c1 seconds
    shift 3
    c0=$(cpu_ticks "$pid")
    seconds=$(post "$port" "$path")
    if [ $# -gt 0 ]; then wait_until --every 0.2 --alive "$pid" 60 "$((2 * N)) samples counted" "$@"; fi
    c1=$(cpu_ticks "$pid")
    peak=$(proc_kib "$pid" VmHWM)
    rate=$(awk -v n="$N" -v s="$seconds" 'BEGIN {printf "%d", n / s}')
    cpu=$(awk -v d=$((c1 - c0)) -v t="$CLK_TCK" -v n="$N" 'BEGIN {printf "%.2f", d / t / n * 1e6}')
}

all_counted() {
    local n
    n=$(source_samples "$work/agent.toml" push) && [ "$n" -eq $((2 * N)) ]
}

influx=""
ref_rates=(); ref_cpus=(); ref_peaks=(); rates=(); cpus=(); peaks=()
for run in $(seq 1 "$RUNS"); do
    # 1. InfluxDB 1, when installed.
    if command -v influxd >/dev/null 2>&1; then
        rm -rf "$work/influx"
        iport=$(free_port)
        rport=$(free_port)
        influxd config 2>/dev/null |
            sed -e "s|/var/lib/influxdb|$work/influx|g" \
                -e "s|^  bind-address = \":8086\"|  bind-address = \"127.0.0.1:$iport\"|" \
                -e "s|^bind-address = \"127.0.0.1:8088\"|bind-address = \"127.0.0.1:$rport\"|" \
                -e "s|^reporting-disabled = false|reporting-disabled = true|" \
                -e "s|^  query-log-enabled = true|  query-log-enabled = false|" \
                -e "s|^  log-enabled = true|  log-enabled = false|" > "$work/influxdb.conf"
        start_server influx "$iport" "$work/influx.log" influxd -config "$work/influxdb.conf"
        curl -sS -o /dev/null -XPOST "http://127.0.0.1:$iport/query" --data-urlencode "q=CREATE DATABASE bench"
        sleep 2
        measure "$influx" "$iport" "/write?db=bench&precision=ns"
        ref_rates+=("$rate"); ref_cpus+=("$cpu"); ref_peaks+=("$peak")
        echo "run $run: InfluxDB $rate points/s, $cpu us CPU per point, peak RSS $peak KiB" >&2
        kill "$influx"; wait "$influx" || true; influx=""
    fi

    # 2. The agent.
    rm -rf "$work/spool" "$shm/out"
    port=$(free_port)
    cat > "$work/agent.toml" <<TOML
[agent]
device_id = "bench"
spool = "$work/spool/spool.db"
window = "1s"
partition = "1m"
[[sources]]
kind = "listen"
name = "push"
address = "127.0.0.1:$port"
token = "$TOKEN"
repeats = "keep"
[[sinks]]
kind = "local"
path = "$shm/out"
TOML
    start_agent "$work/agent.toml" "$work/agent.log"
    wait_until --every 0.1 --alive "$agent" 30 "the agent to listen on $port" listening "$port"
    sleep 4 # past start-up and the code-page trim
    # Every 204 was a hand-over: the next flush counts all 2 × N samples. CPU is counted
    # until then (the aggregation and the spool's commit of those windows).
    measure "$agent" "$port" "/api/v2/write?org=x&bucket=y&precision=ns" all_counted
    stop_agent
    : > "$work/agent.log"
    echo "run $run: edgespool $rate points/s, $cpu us CPU per point, peak RSS $peak KiB" >&2
    rates+=("$rate"); cpus+=("$cpu"); peaks+=("$peak")
done

echo
echo "Line-protocol ingest of $N points (2 fields each) in batches of $BATCH over loopback, one client, medians of $RUNS run(s):"
if [ ${#ref_rates[@]} -gt 0 ]; then
    echo "  InfluxDB $(influxd version 2>/dev/null | awk '{print $2}') (/write): $(median "${ref_rates[@]}") points/s, $(median "${ref_cpus[@]}") us CPU per point, peak RSS $(median "${ref_peaks[@]}") KiB"
fi
echo "  edgespool (/api/v2/write): $(median "${rates[@]}") points/s, $(median "${cpus[@]}") us CPU per point, peak RSS $(median "${peaks[@]}") KiB"
