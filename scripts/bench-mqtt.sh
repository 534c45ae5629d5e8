#!/usr/bin/env bash
# MQTT ingest benchmark: 10 publishers (mosquitto_pub, QoS 1) send N plain-number
# messages over 10 topics to a local Mosquitto; measured twice in one run:
#   1. the ceiling: mosquitto_sub (QoS 1) to /dev/null, from the first publish to the
#      last message received;
#   2. edgespool with an mqtt source on `bench/#` (1 s windows, a local-folder sink on
#      tmpfs), from the first publish until its samples counter in `status` reaches N;
#      CPU (utime + stime of /proc/PID/stat) per message and peak RSS (VmHWM).
#
#   scripts/bench-mqtt.sh            # N = 200000, 3 runs, medians
#   BENCH_RUNS=1 BENCH_MESSAGES=50000 scripts/bench-mqtt.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin"

RUNS=${BENCH_RUNS:-3}
N=${BENCH_MESSAGES:-200000}
TOPICS=10
PER=$((N / TOPICS))
N=$((PER * TOPICS))
command -v mosquitto >/dev/null || { echo "Mosquitto is missing: run scripts/test.sh once" >&2; exit 1; }

release_build --bin edgespool
work=$(mktemp -d "${TMPDIR:-/var/tmp}/edgespool-mqtt.XXXXXX")
shm=$(mktemp -d /dev/shm/edgespool-mqtt.XXXXXX)
remove_at_exit "$work" "$shm"

port=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 1000\n' "$port" > "$work/mosquitto.conf"
[ "$(id -u)" -eq 0 ] && echo "user root" >> "$work/mosquitto.conf"
start_server broker "$port" "$work/broker.log" mosquitto -c "$work/mosquitto.conf"
seq 1 "$PER" | awk '{print 20 + ($1 % 100) / 10}' > "$work/values"

publish() {
    local pids=()
    for t in $(seq 1 "$TOPICS"); do
        mosquitto_pub -h 127.0.0.1 -p "$port" -q 1 -t "bench/t$t" -l < "$work/values" &
        pids+=($!)
    done
    wait "${pids[@]}"
}
connected() { grep -q "connected to the MQTT broker" "$work/agent.log" 2>/dev/null; }
all_counted() {
    local n
    n=$(source_samples "$work/agent.toml" mqtt) && [ "$n" -ge "$N" ]
}

ceilings=(); rates=(); cpus=(); peaks=()
for run in $(seq 1 "$RUNS"); do
    # 1. The broker alone.
    mosquitto_sub -h 127.0.0.1 -p "$port" -q 1 -t 'bench/#' -C "$N" > /dev/null &
    sub=$!
    sleep 0.5
    t0=$(now); publish; wait "$sub"; t1=$(now)
    ceiling=$(awk -v n="$N" -v a="$t0" -v b="$t1" 'BEGIN {printf "%d", n / (b - a)}')

    # 2. The agent.
    rm -rf "$work/spool" "$shm/out"
    cat > "$work/agent.toml" <<TOML
[agent]
device_id = "bench"
spool = "$work/spool/spool.db"
window = "1s"
partition = "1m"
[[sources]]
kind = "mqtt"
name = "mqtt"
url = "mqtt://127.0.0.1:$port"
client_id = "edgespool-bench-$run"
clean_session = true
[[sources.subscriptions]]
topic = "bench/#"
payload = "number"
series = "{topic.1}"
[[sinks]]
kind = "local"
path = "$shm/out"
TOML
    start_agent "$work/agent.toml" "$work/agent.log"
    wait_until --every 0.1 --alive "$agent" 30 "the agent connected" connected
    sleep 4 # past start-up and the code-page trim
    c0=$(cpu_ticks "$agent")
    t0=$(now); publish
    wait_until --every 0.5 --alive "$agent" 1800 "$N samples counted" all_counted
    t1=$(now)
    c1=$(cpu_ticks "$agent")
    peak=$(proc_kib "$agent" VmHWM)
    stop_agent
    : > "$work/agent.log"
    rate=$(awk -v n="$N" -v a="$t0" -v b="$t1" 'BEGIN {printf "%d", n / (b - a)}')
    cpu=$(awk -v d=$((c1 - c0)) -v t="$CLK_TCK" -v n="$N" 'BEGIN {printf "%.2f", d / t / n * 1e6}')
    echo "run $run: broker alone $ceiling msg/s; edgespool $rate msg/s, $cpu us CPU per message, peak RSS $peak KiB" >&2
    ceilings+=("$ceiling"); rates+=("$rate"); cpus+=("$cpu"); peaks+=("$peak")
done

echo
echo "MQTT ingest of $N messages (QoS 1, 10 publishers, 10 topics), medians of $RUNS run(s):"
echo "  broker alone (mosquitto_sub to /dev/null): $(median "${ceilings[@]}") msg/s"
echo "  edgespool: $(median "${rates[@]}") msg/s (counted when its samples counter reaches N; 1 s windows)"
echo "  CPU: $(median "${cpus[@]}") us per message; peak RSS $(median "${peaks[@]}") KiB"
