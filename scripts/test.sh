#!/usr/bin/env bash
# The whole test suite: unit tests, then end-to-end tests that run the built binary.
#
# It builds the agent once and the end-to-end tests reuse that build. Servers the tests
# need are installed here when they are missing: into a venv under target/ from PyPI,
# DuckDB, pandas, pyarrow, polars, boto3 and azure-storage-blob to read the output back,
# influxdb-client and influxdb to write line protocol to the listen source,
# moto as the S3-compatible server and gcp-storage-emulator for GCS; from npm into
# target/, Azurite for Azure Blob Storage; from Debian, PostgreSQL, Mosquitto,
# libfaketime and fuse3. Each test starts its own servers on free loopback ports in temp
# dirs and stops them, even when it fails.
#
#   scripts/test.sh            the suite as CI runs it (fault loops at a reduced count)
#   scripts/test.sh --long     the fault loops at full count: 50 kill -9, 30 fault batches
#   scripts/test.sh ARGS...    other arguments go to cargo test (a filter, --nocapture)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--long" ]; then
    shift
    export EDGESPOOL_FAULT_ROUNDS=full
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "scripts/test.sh: cargo is missing; install the Rust toolchain with rustup first" >&2
    exit 1
fi

# Installs Debian packages when a tool is missing (as root, or through sudo).
apt_install() {
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "==> installing $* with apt-get"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

# DuckDB, pandas, pyarrow and polars read the output back (readers we did not write);
# moto serves S3.
venv="$PWD/target/test-python"
if ! "$venv/bin/python" -c 'import duckdb, pytz, moto.server, boto3, pandas, pyarrow.dataset, polars' >/dev/null 2>&1; then
    echo "==> installing DuckDB, pandas, pyarrow, polars and moto for the tests into $venv"
    command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
    [ -x "$venv/bin/pip" ] || {
        rm -rf "$venv"
        python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$venv"; }
    }
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        'duckdb==2.0.0' 'pytz' 'moto[server]==5.2.5' \
        'pandas==3.1.1' 'pyarrow==26.0.1' 'polars==2.1.0'
fi
export EDGESPOOL_PYTHON="$venv/bin/python"

# Google Cloud Storage: gcp-storage-emulator serves it; Azure: Microsoft's own client
# reads Azurite's blobs back.
if ! "$venv/bin/python" -c 'import gcp_storage_emulator, azure.storage.blob' >/dev/null 2>&1; then
    echo "==> installing gcp-storage-emulator and azure-storage-blob for the tests into $venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        'gcp-storage-emulator==2026.7.19' 'azure-storage-blob==12.31.1'
fi

# The listen source's writers: InfluxDB's own Python client libraries, for InfluxDB 2
# (influxdb-client) and InfluxDB 1 (influxdb): line protocol, gzip, tokens, basic auth.
if ! "$venv/bin/python" -c 'import influxdb_client, influxdb' >/dev/null 2>&1; then
    echo "==> installing influxdb-client and influxdb for the tests into $venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        'influxdb-client==1.50.0' 'influxdb==5.3.2'
fi

# Azurite, the Azure Blob Storage emulator, from npm into target/test-node (3.35.0: the
# last release that runs on Node 20). The emulator tests fail without their emulator
# when run from here (EDGESPOOL_REQUIRE_EMULATORS); `cargo test` alone skips them.
node_prefix="$PWD/target/test-node"
export EDGESPOOL_AZURITE="$node_prefix/node_modules/.bin/azurite-blob"
export EDGESPOOL_REQUIRE_EMULATORS=1
if [ ! -x "$EDGESPOOL_AZURITE" ]; then
    command -v npm >/dev/null 2>&1 || apt_install nodejs npm
    echo "==> installing Azurite for the tests into $node_prefix"
    npm install --silent --no-audit --no-fund --prefix "$node_prefix" 'azurite@3.35.0'
fi

# PostgreSQL: the tests run their own servers (initdb in a temp dir, a free loopback
# port), so only the programs are needed, never a running system service.
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || ! command -v psql >/dev/null 2>&1; then
    apt_install postgresql postgresql-client
    # Debian's package starts a cluster on port 5432; the tests do not use it.
    { command -v pg_ctlcluster >/dev/null 2>&1 && pg_lsclusters -h 2>/dev/null |
        while read -r version name _; do pg_ctlcluster "$version" "$name" stop || true; done; } || true
fi

# Mosquitto: the tests run their own brokers on free loopback ports.
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ] || ! command -v mosquitto_pub >/dev/null 2>&1; then
    apt_install mosquitto mosquitto-clients
    # Debian's package starts a broker on port 1883; the tests do not use it.
    { command -v systemctl >/dev/null 2>&1 && systemctl stop mosquitto 2>/dev/null; } || true
fi
export PATH="$PATH:/usr/sbin"

# libfaketime: the clock tests move the agent's wall clock (and only the agent's).
if ! compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null && [ ! -e /usr/lib/faketime/libfaketime.so.1 ]; then
    apt_install faketime
fi

# fusermount3: the power-cut test mounts its own FUSE file system (it says SKIPPED where
# FUSE cannot work: no /dev/fuse, not root).
if ! command -v fusermount3 >/dev/null 2>&1; then
    apt_install fuse3 || echo "==> fuse3 could not be installed: the power-cut test will be skipped"
fi

echo "==> building edgespool"
cargo build --locked -p edgespool

echo "==> unit and end-to-end tests"
export EDGESPOOL_BIN="$PWD/target/debug/edgespool"
cargo test --locked --workspace "$@"
