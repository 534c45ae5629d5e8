//! Entry points for the fuzz targets under `fuzz/`: every parser of outside input, fed
//! arbitrary bytes, as the agent would meet them. Each panics only on a broken promise
//! (a panic inside a parser, or an invariant named below).

use std::path::Path;
use std::sync::{Mutex, OnceLock};

use crate::config::{Config, ConfigError, FileFormat, SourceKind};
use crate::source::Batch;

/// Sources configured as a user would: an HTTP source with fields, an event-time pointer
/// and a PurpleAir-style table; an MQTT source with number, JSON and flattened payloads.
const SOURCES: &str = r#"
[agent]
device_id = "fuzz"
spool = "/nonexistent/spool.db"

[[sources]]
kind = "http"
name = "api"
url = "http://127.0.0.1:9/"
timestamp = "/time"
[[sources.fields]]
name = "pm"
pointer = "/sensor/pm2_5"
scale = 0.5
[[sources.fields]]
name = "t"
pointer = "/sensor/temperature"
[sources.table]
key = "ID"
columns = ["pm", "Temperature"]
timestamp_column = "last_seen"

[[sources]]
kind = "mqtt"
name = "mqtt"
url = "mqtt://127.0.0.1"
[[sources.subscriptions]]
topic = "tele/+/SENSOR"
payload = "flatten"
series = "{topic.1}.{field}"
booleans = true
[[sources.subscriptions]]
topic = "zigbee2mqtt/+"
payload = "flatten"
timestamp = "/last_seen"
[[sources.subscriptions]]
topic = "count/#"
payload = "json"
timestamp = "/t"
[[sources.subscriptions.fields]]
name = "v"
pointer = "/v"
[[sources.subscriptions]]
topic = "+/sensor/+/state"
payload = "number"
series = "{topic.0}.{topic.2}"

[[sinks]]
kind = "local"
path = "/nonexistent/out"
"#;

fn sources() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| Config::parse(SOURCES, Path::new("fuzz.toml")).expect("valid"))
}

fn check(batch: &Batch) {
    for sample in &batch.samples {
        assert!(!sample.series.name.is_empty(), "a series without a name");
    }
}

/// An HTTP response body, as the `http` source reads it.
pub fn http_body(body: &[u8]) {
    static SOURCE: OnceLock<Mutex<crate::source::http::HttpSource>> = OnceLock::new();
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(body) else {
        return;
    };
    let source = SOURCE.get_or_init(|| {
        // As `run` does before any client is built.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = &sources().sources[0];
        let SourceKind::Http(http) = &config.kind else {
            unreachable!("the first source is http");
        };
        let source = crate::source::http::HttpSource::new(&config.name, http, config.timeout)
            .expect("the source builds");
        Mutex::new(source)
    });
    let mut batch = Batch {
        now_ms: 1_767_322_800_000,
        ..Batch::default()
    };
    let mut source = source.lock().unwrap_or_else(|p| p.into_inner());
    let _ = source.read(&doc, &mut batch);
    check(&batch);
}

/// An MQTT message: a topic (up to the first NUL of the input) and a payload.
pub fn mqtt_message(data: &[u8]) {
    let (topic, payload) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"count/a"[..], data),
    };
    let Ok(topic) = std::str::from_utf8(topic) else {
        return;
    };
    let config = &sources().sources[1];
    let SourceKind::Mqtt(mqtt) = &config.kind else {
        unreachable!("the second source is mqtt");
    };
    let batch = crate::source::mqtt::read_message(&config.name, mqtt, topic, payload);
    check(&batch);
}

/// A sysfs file (`w1_slave`, or one number).
pub fn sysfs_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/sys/bus/w1/devices/28-0/w1_slave");
    if let Ok(raw) = crate::source::parse_file(text, FileFormat::W1Slave, path) {
        assert!(raw.is_finite() && raw.fract() == 0.0, "{raw} from {text:?}");
    }
    let _ = crate::source::parse_file(text, FileFormat::Number, path);
}

/// A configuration file: it parses, or the error names a line and column inside it.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, Path::new("fuzz.toml")) {
        Ok(_) => {}
        Err(ConfigError::Invalid {
            line,
            column,
            message,
            ..
        }) => {
            let lines = text.split('\n').count();
            assert!(
                line >= 1 && line <= lines && column >= 1,
                "{line}:{column} outside the text ({lines} lines): {message}"
            );
            assert!(!message.is_empty());
        }
        Err(other) => panic!("an error without a place: {other}"),
    }
}

/// A body of InfluxDB line protocol, as the `listen` source reads a request; the first
/// byte picks the precision.
#[cfg(feature = "listen")]
pub fn line_protocol(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let precision = ["ns", "us", "ms", "s", "m", "h"][usize::from(first) % 6];
    let batch = crate::source::listen::read_for_fuzzing(text, precision);
    check(&batch);
    for sample in &batch.samples {
        assert!(sample.value.is_finite(), "a sample that is no number");
    }
}

/// Serial sources, one per line format: the pulse oximeter's regex with its device time,
/// an Arduino plotter, CSV with a timestamp column, JSON by pointer; short lines, so that
/// the limit is met.
#[cfg(feature = "serial")]
const SERIAL: &str = r#"
[agent]
device_id = "fuzz"
spool = "/nonexistent/spool.db"

[[sources]]
kind = "serial"
name = "oxi"
port = "/dev/null"
max_line = "200 B"
format = "regex"
regex = '^(?P<time>\d\d/\d\d/\d\d \d\d:\d\d:\d\d) SN=\d+ SPO2=(?P<spo2>[\d.+-]+)% BPM=(?P<bpm>[\d.+-]+) PI=(?P<pi>[\d.+-]+)%'
[sources.timestamp]
field = "time"
format = "%m/%d/%y %H:%M:%S"
utc_offset = "+01:00"

[[sources]]
kind = "serial"
name = "ard"
port = "/dev/null"
max_line = "64 B"
format = "plotter"
columns = ["temp", "_", "hum"]
max_series = 8

[[sources]]
kind = "serial"
name = "csv"
port = "/dev/null"
format = "csv"
columns = ["t", "temp", "hum"]
[sources.timestamp]
field = "t"

[[sources]]
kind = "serial"
name = "json"
port = "/dev/null"
format = "json"
[sources.timestamp]
field = "/ts"
[[sources.fields]]
name = "cpm"
pointer = "/geiger/cpm"
scale = 0.5

[[sinks]]
kind = "local"
path = "/nonexistent/out"
"#;

/// Bytes from a serial port (cut in two at the first NUL, as two reads), through every
/// line format.
#[cfg(feature = "serial")]
pub fn serial_bytes(data: &[u8]) {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    let config =
        CONFIG.get_or_init(|| Config::parse(SERIAL, Path::new("fuzz.toml")).expect("valid"));
    let chunks: Vec<&[u8]> = match data.iter().position(|&b| b == 0) {
        Some(i) => vec![&data[..i], &data[i + 1..]],
        None => vec![data],
    };
    for source in &config.sources {
        let SourceKind::Serial(serial) = &source.kind else {
            unreachable!("only serial sources");
        };
        let batch = crate::source::serial::read_bytes(&source.name, serial, &chunks);
        check(&batch);
        assert!(batch.samples.iter().all(|s| s.value.is_finite()));
    }
}

#[cfg(all(test, feature = "serial"))]
mod serial_tests {
    /// The fuzz entry takes the shapes its corpus starts from without a panic.
    #[test]
    fn the_serial_fuzz_entry_reads_every_format() {
        let seeds: [&[u8]; 5] = [
            b"11/21/26 14:05:33 SN=0000012345 SPO2=097% BPM=072 PI=01.23% SPCO=--.-%\r\n11/21/26 14:05:34 SN=0000012345 SPO2=---% BPM=--- PI=--.--%\r\n",
            b"temp:21.5,hum:40\n21.5 7 40 1e308 -1e308\n",
            b"1767322800,21.5,40\n\x00t,temp,hum\n",
            b"{\"ts\": 1767322800, \"geiger\": {\"cpm\": 18}}\n{\"geiger\n",
            &[0xff, 0xfe, b'\n', b'1', 0, b' ', b'2', b'\n'],
        ];
        for seed in seeds {
            super::serial_bytes(seed);
        }
    }
}
