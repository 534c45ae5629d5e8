#!/usr/bin/env bash
# Serial ingest benchmark: the agent's CPU per line of a serial source at 115200 baud.
# A writer (Python's pty module) makes a pseudo-terminal pair, links its device where
# the source's `port` points, waits for the agent to set the line to 115200 baud, then
# plays N pulse-oximeter lines (the regex of docs/configuration.md, 121 bytes each, a
# third of them with `--` readings) paced at the wire rate of 115200 baud, 8N1 (10 bits a
# byte: about 90 lines a second). CPU is utime + stime of /proc/PID/stat, from the first
# line written until the source's samples counter in `status` shows every line; then the
# same agent idles 10 s with the port open and silent, and that rate (its flushes and
# heartbeats, which run whether lines come or not) is taken off to give the CPU the lines
# themselves cost.
#
#   scripts/bench-serial.sh            # N = 3000 lines, 3 runs, medians
#   BENCH_RUNS=1 BENCH_LINES=1000 scripts/bench-serial.sh
#   BENCH_STAMP=arrival scripts/bench-serial.sh
# By default each line's own time is taken ([sources.timestamp]); the writer's clock runs
# a second per line, so every line opens a window per series (3 windows a line, 270 a
# second, committed and delivered): the costliest case. BENCH_STAMP=arrival stamps lines
# on arrival instead: 90 lines share each 1 s window, as a device printing faster than
# the window would, which leaves mostly the cost of reading and parsing.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

RUNS=${BENCH_RUNS:-3}
STAMP='[sources.timestamp]
field = "time"
format = "%m/%d/%y %H:%M:%S"'
[ "${BENCH_STAMP:-device}" = arrival ] && STAMP=""
N=${BENCH_LINES:-3000}
BAUD=115200

release_build --bin edgespool
work=$(mktemp -d "${TMPDIR:-/var/tmp}/edgespool-serial.XXXXXX")
shm=$(mktemp -d /dev/shm/edgespool-serial.XXXXXX)
remove_at_exit "$work" "$shm"

# The writer: prints "ready" once the agent has set the speed, then "done SECONDS".
cat > "$work/writer.py" <<'PY'
import os, sys, termios, time
link, n, baud = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
master, slave = os.openpty()
attrs = termios.tcgetattr(slave)
attrs[3] &= ~(termios.ECHO | termios.ICANON)
termios.tcsetattr(slave, termios.TCSANOW, attrs)
path = os.ttyname(slave)
os.close(slave)
if os.path.lexists(link):
    os.remove(link)
os.symlink(path, link)
deadline = time.time() + 60
while termios.tcgetattr(master)[5] != termios.B115200:
    if time.time() > deadline:
        sys.exit("the agent did not set the port to 115200 baud")
    time.sleep(0.05)
print("ready", flush=True)
# A device that was quiet when the port opened: its first line is not taken for the tail
# of one (the source drops a first line whose bytes come at once).
time.sleep(0.2)
t0 = time.time()
base = 1767322800
sent = 0
for i in range(n):
    t = time.gmtime(base + i)
    stamp = time.strftime("%m/%d/%y %H:%M:%S", t)
    if i % 3 == 2:
        reading = "SPO2=---% BPM=--- PI=--.--%"
    else:
        reading = "SPO2=%03d%% BPM=%03d PI=%05.2f%%" % (94 + i % 5, 60 + i % 30, 1 + (i % 50) / 10)
    line = ("%s SN=0000012345 %s SPCO=--.-%% SPMET=--.-%% DESAT=-- PIDELTA=+-- ALARM=0000 EXC=000000\r\n"
            % (stamp, reading)).encode()
    os.write(master, line)
    sent += len(line)
    # Paced at the wire rate: 10 bits a byte (8N1).
    ahead = t0 + sent * 10 / baud - time.time()
    if ahead > 0:
        time.sleep(ahead)
print("done %.3f %d" % (time.time() - t0, sent), flush=True)
time.sleep(3600)
PY

# Every line makes samples: 2 of 3 make three, the probe-off ones none (three nulls).
SAMPLES=$(( (N / 3) * 6 + (N % 3 >= 1 ? 3 : 0) + (N % 3 >= 2 ? 3 : 0) ))
all_counted() {
    local n
    n=$(source_samples "$work/agent.toml" oxi) && [ "$n" -ge "$SAMPLES" ]
}
writer_ready() { grep -q '^ready' "$work/writer.out" 2>/dev/null; }
writer_done() { grep -q '^done' "$work/writer.out" 2>/dev/null; }

cpus=(); rates=(); nets=(); idles=(); peaks=()
for run in $(seq 1 "$RUNS"); do
    rm -rf "$work/spool" "$shm/out" "$work/writer.out"
    cat > "$work/agent.toml" <<TOML
[agent]
device_id = "bench"
spool = "$work/spool/spool.db"
window = "1s"
partition = "1m"
[[sources]]
kind = "serial"
name = "oxi"
port = "$work/oximeter"
baud = $BAUD
format = "regex"
regex = '^(?P<time>\d\d/\d\d/\d\d \d\d:\d\d:\d\d) SN=\d+ SPO2=(?P<spo2>[\d.+-]+)% BPM=(?P<bpm>[\d.+-]+) PI=(?P<pi>[\d.+-]+)%'
$STAMP
[[sinks]]
kind = "local"
path = "$shm/out"
TOML
    python3 "$work/writer.py" "$work/oximeter" "$N" "$BAUD" > "$work/writer.out" &
    writer=$!
    stop_at_exit writer
    start_agent "$work/agent.toml" "$work/agent.log"
    # The writer waits for the agent to open the port; the agent retries until the link exists.
    wait_until --every 0.1 --alive "$agent" 60 "the agent to open the port" writer_ready
    sleep 2 # past start-up
    c0=$(cpu_ticks "$agent"); t0=$(now)
    wait_until --every 0.5 --alive "$agent" 600 "the writer to finish" writer_done
    wait_until --every 0.2 --alive "$agent" 120 "$SAMPLES samples counted" all_counted
    c1=$(cpu_ticks "$agent"); t1=$(now)
    peak=$(proc_kib "$agent" VmHWM)
    sleep 10 # the measurement of the idle agent, not a wait
    c2=$(cpu_ticks "$agent"); t2=$(now)
    stop_agent
    kill "$writer" 2>/dev/null || true
    wait "$writer" 2>/dev/null || true
    writer=""
    : > "$work/agent.log"
    read -r _ secs bytes < <(grep '^done' "$work/writer.out")
    rate=$(awk -v n="$N" -v s="$secs" 'BEGIN {printf "%d", n / s}')
    cpu=$(awk -v d=$((c1 - c0)) -v t="$CLK_TCK" -v n="$N" 'BEGIN {printf "%.1f", d / t / n * 1e6}')
    share=$(awk -v d=$((c1 - c0)) -v t="$CLK_TCK" -v s="$secs" 'BEGIN {printf "%.2f", d / t / s * 100}')
    idle=$(awk -v d=$((c2 - c1)) -v t="$CLK_TCK" -v a="$t1" -v b="$t2" 'BEGIN {printf "%.0f", d / t / (b - a) * 1e6}')
    net=$(awk -v d=$((c1 - c0)) -v t="$CLK_TCK" -v i="$idle" -v a="$t0" -v b="$t1" -v n="$N" \
        'BEGIN {printf "%.1f", (d / t * 1e6 - i * (b - a)) / n}')
    echo "run $run: $N lines ($bytes bytes) in ${secs}s ($rate lines/s); $cpu us CPU per line ($share% of a core), $net us above the idle agent's $idle us/s; peak RSS $peak KiB" >&2
    cpus+=("$cpu"); rates+=("$rate"); nets+=("$net"); idles+=("$idle"); peaks+=("$share:$peak")
done

echo
echo "Serial ingest of $N oximeter lines at $BAUD baud (8N1, through a pty), stamped by ${BENCH_STAMP:-device} time, medians of $RUNS run(s):"
echo "  $(median "${rates[@]}") lines/s on the wire; CPU $(median "${cpus[@]}") us per line (the whole agent: 1 s windows, a local sink)"
echo "  of which the lines: $(median "${nets[@]}") us per line (the idle agent: $(median "${idles[@]}") us of CPU per second)"
echo "  per run (share of a core : peak RSS KiB): ${peaks[*]}"
