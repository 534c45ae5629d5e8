//! One line of a serial device into samples, in each of the line formats.
//!
//! - Every value a line holds is a field: a plotter's labels and positions, a CSV line's
//!   columns, a regex's named groups (the timestamp's excepted); a JSON line's fields
//!   are those configured, by pointer. `[[sources.fields]]` give scale, offset and unit.
//! - No reading is no sample: a value made of dashes (`--`, `--.-`, `+--`, as a pulse
//!   oximeter prints with its probe off), an empty CSV cell, a regex group that took no
//!   part in the match and a JSON `null` are counted as `nulls`; NaN and ±Inf as
//!   `not_finite` (by [`Batch::push`]). Anything else that is not a number is invalid.
//! - A line that is not UTF-8 (a wrong baud rate), does not match the regex, has the
//!   wrong number of CSV values or is not a JSON object is counted invalid, whole.
//! - Pure: the line's arrival time is given.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::TimeZone;
use serde_json::Value;

use super::super::http::number;
use super::super::{Batch, Series, Stamp, parse_timestamp};
use crate::config::{
    LineFormat, SerialField, SerialSource as SerialConfig, SerialTimestamp, format_has_offset,
    parse_utc_offset,
};

/// How a line becomes samples, built once from the configuration.
pub struct Parser {
    source: String,
    format: Format,
    /// Scale, offset and unit by field name.
    fields: HashMap<String, SerialField>,
    /// For JSON lines: (field, pointer), in the configuration's order.
    pointers: Vec<(String, String)>,
    /// The timestamp, when lines carry one.
    timestamp: Option<Timestamp>,
    /// Series made so far, by field name, and the most there may be.
    series: HashMap<String, Arc<Series>>,
    max_series: u32,
}

enum Format {
    Plotter { columns: Vec<String> },
    Csv { columns: Vec<String> },
    Json,
    Regex(regex_lite::Regex),
}

struct Timestamp {
    field: String,
    format: Option<String>,
    offset: chrono::FixedOffset,
}

impl Parser {
    /// The parser a (validated) configuration describes.
    pub fn new(name: &str, config: &SerialConfig) -> Result<Parser, String> {
        let format = match config.format {
            LineFormat::Plotter => Format::Plotter {
                columns: config.columns.clone(),
            },
            LineFormat::Csv => Format::Csv {
                columns: config.columns.clone(),
            },
            LineFormat::Json => Format::Json,
            LineFormat::Regex => {
                let pattern = config.regex.as_deref().unwrap_or_default();
                Format::Regex(
                    regex_lite::Regex::new(pattern)
                        .map_err(|err| format!("regex does not compile: {err}"))?,
                )
            }
        };
        let timestamp = match &config.timestamp {
            Some(SerialTimestamp {
                field,
                format,
                utc_offset,
            }) => Some(Timestamp {
                field: field.clone(),
                format: format.clone(),
                offset: parse_utc_offset(utc_offset.as_deref().unwrap_or("+00:00"))?,
            }),
            None => None,
        };
        Ok(Parser {
            source: name.to_owned(),
            format,
            fields: config
                .fields
                .iter()
                .map(|f| (f.name.clone(), f.clone()))
                .collect(),
            pointers: config
                .fields
                .iter()
                .filter_map(|f| Some((f.name.clone(), f.pointer.clone()?)))
                .collect(),
            timestamp,
            series: HashMap::new(),
            max_series: config.max_series.get(),
        })
    }

    /// Reads one line that arrived at `now_ms`.
    pub fn read(&mut self, line: &[u8], now_ms: i64, batch: &mut Batch) {
        let Ok(text) = std::str::from_utf8(line) else {
            batch.invalid.push(format!(
                "line is not UTF-8 text (a wrong baud rate?): {}",
                clip(&String::from_utf8_lossy(line))
            ));
            return;
        };
        let text = text.trim();
        if text.is_empty() {
            return;
        }
        // (field, its text or JSON value) pairs, and the timestamp's text.
        let mut values: Vec<(String, Raw<'_>)> = Vec::new();
        let mut stamp_raw: Option<Raw<'_>> = None;
        let stamp_field = self.timestamp.as_ref().map(|t| t.field.as_str());
        match &self.format {
            Format::Plotter { columns } => {
                let comma = text.contains([',', '\t']);
                let tokens: Vec<&str> = if comma {
                    text.split([',', '\t']).map(str::trim).collect()
                } else {
                    text.split_whitespace().collect()
                };
                let mut position = 0;
                for token in tokens.into_iter().filter(|t| !t.is_empty()) {
                    let (name, value) = match token.split_once(':') {
                        Some((label, value)) => (label.trim().replace(' ', "_"), value.trim()),
                        None => {
                            position += 1;
                            let name = match columns.get(position - 1) {
                                Some(name) => name.clone(),
                                None => format!("value{position}"),
                            };
                            (name, token)
                        }
                    };
                    if name.is_empty() || name == "_" {
                        continue;
                    }
                    if Some(name.as_str()) == stamp_field {
                        stamp_raw = Some(Raw::Text(value));
                    } else {
                        values.push((name, Raw::Text(value)));
                    }
                }
            }
            Format::Csv { columns } => {
                let cells: Vec<&str> = text.split(',').map(unquote).collect();
                if cells.len() != columns.len() {
                    batch.invalid.push(format!(
                        "line has {} values, columns names {}: {}",
                        cells.len(),
                        columns.len(),
                        clip(text)
                    ));
                    return;
                }
                if cells
                    .iter()
                    .zip(columns)
                    .all(|(cell, column)| cell == column)
                {
                    // The device printed its header (at boot): no reading.
                    return;
                }
                for (cell, column) in cells.into_iter().zip(columns) {
                    if column.is_empty() || column == "_" {
                        continue;
                    }
                    if Some(column.as_str()) == stamp_field {
                        stamp_raw = Some(Raw::Text(cell));
                    } else {
                        values.push((column.clone(), Raw::Text(cell)));
                    }
                }
            }
            Format::Regex(regex) => {
                let Some(captures) = regex.captures(text) else {
                    batch
                        .invalid
                        .push(format!("line does not match the regex: {}", clip(text)));
                    return;
                };
                for name in regex.capture_names().flatten() {
                    let raw = match captures.name(name) {
                        Some(m) => Raw::Text(m.as_str()),
                        None => Raw::Absent,
                    };
                    if Some(name) == stamp_field {
                        stamp_raw = Some(raw);
                    } else {
                        values.push((name.to_owned(), raw));
                    }
                }
            }
            Format::Json => {
                let doc: Value = match serde_json::from_str(text) {
                    Ok(doc @ Value::Object(_)) => doc,
                    Ok(_) => {
                        batch
                            .invalid
                            .push(format!("line is not a JSON object: {}", clip(text)));
                        return;
                    }
                    Err(err) => {
                        batch
                            .invalid
                            .push(format!("line is not JSON ({err}): {}", clip(text)));
                        return;
                    }
                };
                self.read_json(&doc, now_ms, batch);
                return;
            }
        }
        let stamp = self.stamp(stamp_raw, now_ms, batch);
        for (name, raw) in values {
            let value = match raw {
                Raw::Absent => {
                    batch.nulls += 1;
                    continue;
                }
                Raw::Text(text) => match reading(text) {
                    Reading::None => {
                        batch.nulls += 1;
                        continue;
                    }
                    Reading::Number(x) => x,
                    Reading::Bad => {
                        batch
                            .invalid
                            .push(format!("{name} is {:?}, not a number", clip(text)));
                        continue;
                    }
                },
                Raw::Json(_) => continue,
            };
            self.push(&name, stamp, value, batch);
        }
    }

    /// A JSON line: the configured fields by pointer.
    fn read_json(&mut self, doc: &Value, now_ms: i64, batch: &mut Batch) {
        let stamp_raw = self
            .timestamp
            .as_ref()
            .map(|t| doc.pointer(&t.field).map_or(Raw::Absent, Raw::Json));
        let stamp = self.stamp(stamp_raw, now_ms, batch);
        // Taken out while samples are pushed (which needs `self`), put back after.
        let pointers = std::mem::take(&mut self.pointers);
        for (name, pointer) in &pointers {
            let value = match doc.pointer(pointer) {
                None => {
                    batch.invalid.push(format!("no value at {pointer}"));
                    continue;
                }
                Some(Value::String(s)) if matches!(reading(s), Reading::None) => {
                    batch.nulls += 1;
                    continue;
                }
                Some(value) => number(value, pointer, batch),
            };
            if let Some(x) = value {
                self.push(name, stamp, x, batch);
            }
        }
        self.pointers = pointers;
    }

    /// The line's time: its timestamp field, or its arrival (also when the field is bad,
    /// which is counted invalid).
    fn stamp(&self, raw: Option<Raw<'_>>, now_ms: i64, batch: &mut Batch) -> Stamp {
        let (Some(stamp), Some(raw)) = (&self.timestamp, raw) else {
            return Stamp::Own(now_ms);
        };
        let parsed = match (raw, &stamp.format) {
            (Raw::Absent, _) => Err(format!("no timestamp in {}", stamp.field)),
            (Raw::Text(text), Some(format)) => device_time(text, format, stamp.offset),
            (Raw::Json(Value::String(text)), Some(format)) => {
                device_time(text, format, stamp.offset)
            }
            (Raw::Text(text), None) => {
                let value = match text.trim().parse::<serde_json::Number>() {
                    Ok(n) => Value::Number(n),
                    Err(_) => Value::String(text.trim().to_owned()),
                };
                parse_timestamp(&value)
            }
            (Raw::Json(value), _) => parse_timestamp(value),
        };
        match parsed {
            Ok(ms) => Stamp::Device(ms),
            Err(why) => {
                batch
                    .invalid
                    .push(format!("{why}; using the time received"));
                Stamp::Own(now_ms)
            }
        }
    }

    /// A sample of field `name`, scaled; its series made the first time (up to
    /// `max_series`).
    fn push(&mut self, name: &str, stamp: Stamp, raw: f64, batch: &mut Batch) {
        let field = self.fields.get(name);
        let value = field.map_or(raw, |f| raw * f.scale + f.offset);
        let series = match self.series.get(name) {
            Some(series) => Arc::clone(series),
            None => {
                if self.series.len() >= self.max_series as usize {
                    let max = self.max_series;
                    batch.refuse(max, || format!("{}.{name}", self.source));
                    return;
                }
                let unit = field.and_then(|f| f.unit.as_deref());
                let series = Arc::new(Series::new(format!("{}.{name}", self.source), unit));
                self.series.insert(name.to_owned(), Arc::clone(&series));
                series
            }
        };
        batch.push(&series, stamp, value);
    }
}

/// A value as the line holds it.
enum Raw<'a> {
    /// Text: a token, a cell, a group.
    Text(&'a str),
    /// A value of a JSON line.
    Json(&'a Value),
    /// A regex group that took no part in the match, a JSON pointer to nothing.
    Absent,
}

/// What a value's text reads as.
enum Reading {
    Number(f64),
    /// No reading: empty, or dashes (`--`, `--.-`, `+--`).
    None,
    Bad,
}

fn reading(text: &str) -> Reading {
    let text = text.trim();
    if text.is_empty()
        || (text.contains("--") && text.chars().all(|c| matches!(c, '-' | '+' | '.')))
    {
        return Reading::None;
    }
    match text.parse::<f64>() {
        Ok(x) => Reading::Number(x),
        Err(_) => Reading::Bad,
    }
}

/// A device's time in `format`, at `offset` unless the format has its own.
fn device_time(text: &str, format: &str, offset: chrono::FixedOffset) -> Result<i64, String> {
    let text = text.trim();
    let bad = |err: chrono::ParseError| {
        format!(
            "timestamp {:?} does not read as {format:?}: {err}",
            clip(text)
        )
    };
    if format_has_offset(format) {
        return chrono::DateTime::parse_from_str(text, format)
            .map(|t| t.timestamp_millis())
            .map_err(bad);
    }
    let naive = chrono::NaiveDateTime::parse_from_str(text, format).map_err(bad)?;
    offset
        .from_local_datetime(&naive)
        .single()
        .map(|t| t.timestamp_millis())
        .ok_or_else(|| format!("timestamp {:?} is not a time", clip(text)))
}

/// A CSV cell without its surrounding spaces and quotes.
fn unquote(cell: &str) -> &str {
    let cell = cell.trim();
    cell.strip_prefix('"')
        .and_then(|c| c.strip_suffix('"'))
        .unwrap_or(cell)
}

/// The first 80 characters of a line, for an error message.
fn clip(text: &str) -> String {
    text.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, SourceKind};

    /// The parser of a serial source whose settings (after `kind`, `name` and `port`)
    /// are `settings`.
    fn parser(settings: &str) -> Parser {
        let text = format!(
            "[agent]\nspool = \"/x.db\"\n[[sources]]\nkind = \"serial\"\nname = \"s\"\nport = \"/dev/ttyUSB0\"\n{settings}\n[[sinks]]\nkind = \"local\"\npath = \"/x\"\n"
        );
        let config = Config::parse(&text, std::path::Path::new("t.toml")).expect("valid");
        let SourceKind::Serial(serial) = &config.sources[0].kind else {
            panic!("a serial source");
        };
        Parser::new("s", serial).expect("a parser")
    }

    const NOW: i64 = 1_795_000_000_000;

    fn read(parser: &mut Parser, line: &[u8]) -> Batch {
        let mut batch = Batch::default();
        parser.read(line, NOW, &mut batch);
        batch
    }

    /// (series, value, timestamp, own clock) of each sample.
    fn samples(batch: &Batch) -> Vec<(String, f64, i64, bool)> {
        batch
            .samples
            .iter()
            .map(|s| (s.series.name.clone(), s.value, s.timestamp_ms, s.own_clock))
            .collect()
    }

    /// The documented example of docs/configuration.md, as written there.
    pub(crate) const OXIMETER: &str = r#"format = "regex"
regex = '^(?P<time>\d\d/\d\d/\d\d \d\d:\d\d:\d\d) SN=\d+ SPO2=(?P<spo2>[\d.+-]+)% BPM=(?P<bpm>[\d.+-]+) PI=(?P<pi>[\d.+-]+)%'
[sources.timestamp]
field = "time"
format = "%m/%d/%y %H:%M:%S"
utc_offset = "+00:00"
[[sources.fields]]
name = "spo2"
unit = "%"
[[sources.fields]]
name = "bpm"
unit = "1/min"
[[sources.fields]]
name = "pi"
unit = "%"
"#;

    #[test]
    fn the_oximeter_line_reads_with_its_own_time_and_skips_its_dashes() {
        let mut p = parser(OXIMETER);
        let line = b"11/21/26 14:05:33 SN=0000012345 SPO2=097% BPM=072 PI=01.23% SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+-- ALARM=0000 EXC=000000";
        let batch = read(&mut p, line);
        let t = 1_795_269_933_000; // 2026-11-21T14:05:33Z
        assert_eq!(
            samples(&batch),
            [
                ("s.spo2".into(), 97.0, t, false),
                ("s.bpm".into(), 72.0, t, false),
                ("s.pi".into(), 1.23, t, false),
            ]
        );
        assert_eq!(batch.samples[0].series.unit.as_deref(), Some("%"));
        assert!(batch.invalid.is_empty(), "{:?}", batch.invalid);
        // Probe off: no reading is no sample, counted as no value, never zero.
        let off = b"11/21/26 14:05:34 SN=0000012345 SPO2=---% BPM=--- PI=--.--% SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+-- ALARM=0000 EXC=000000";
        let batch = read(&mut p, off);
        assert_eq!(samples(&batch), []);
        assert_eq!((batch.nulls, batch.invalid.len()), (3, 0));
        // Half of them.
        let half = b"11/21/26 14:05:35 SN=0000012345 SPO2=096% BPM=--- PI=--.--% SPCO=--.-%";
        let batch = read(&mut p, half);
        assert_eq!(samples(&batch), [("s.spo2".into(), 96.0, t + 2000, false)]);
        assert_eq!(batch.nulls, 2);
    }

    #[test]
    fn a_line_the_regex_does_not_match_a_cut_one_is_invalid_whole() {
        let mut p = parser(OXIMETER);
        let batch = read(&mut p, b"SPO2=097% BPM=072 PI=01.23% SPCO=--.-%");
        assert_eq!(samples(&batch), []);
        assert_eq!(
            batch.invalid,
            ["line does not match the regex: SPO2=097% BPM=072 PI=01.23% SPCO=--.-%"]
        );
        let batch = read(&mut p, &[0xff, 0xfe, b'S', 0x80, b'P']);
        assert_eq!(
            batch.invalid,
            ["line is not UTF-8 text (a wrong baud rate?): \u{fffd}\u{fffd}S\u{fffd}P"]
        );
        // A bad date is counted, and the line stamped on arrival.
        let batch = read(
            &mut p,
            b"13/45/26 14:05:33 SN=0000012345 SPO2=097% BPM=072 PI=01.23%",
        );
        assert_eq!(batch.samples.len(), 3);
        assert!(
            batch
                .samples
                .iter()
                .all(|s| s.own_clock && s.timestamp_ms == NOW)
        );
        assert!(
            batch.invalid[0].starts_with("timestamp \"13/45/26 14:05:33\" does not read as"),
            "{:?}",
            batch.invalid
        );
    }

    #[test]
    fn plotter_lines_take_labels_positions_and_column_names() {
        let mut p = parser(
            "format = \"plotter\"\ncolumns = [\"temp\", \"_\", \"hum\"]\n[[sources.fields]]\nname = \"temp\"\nscale = 0.1\nunit = \"°C\"\n",
        );
        let batch = read(&mut p, b"215 7 40.5 12\r");
        assert_eq!(
            samples(&batch),
            [
                ("s.temp".into(), 21.5, NOW, true),
                ("s.hum".into(), 40.5, NOW, true),
                ("s.value4".into(), 12.0, NOW, true),
            ]
        );
        let batch = read(&mut p, b"Sensor 1:3.5,Sensor 2:-1e3\tlight:nan");
        assert_eq!(
            samples(&batch),
            [
                ("s.Sensor_1".into(), 3.5, NOW, true),
                ("s.Sensor_2".into(), -1000.0, NOW, true),
            ]
        );
        assert_eq!(batch.not_finite, 1);
        let batch = read(&mut p, b"a:1 b:x -- 7 2");
        assert_eq!(
            samples(&batch),
            [
                ("s.a".into(), 1.0, NOW, true),
                ("s.hum".into(), 2.0, NOW, true)
            ]
        );
        assert_eq!(
            (batch.nulls, batch.invalid.as_slice()),
            (1, &["b is \"x\", not a number".to_owned()][..])
        );
    }

    #[test]
    fn plotter_labels_beyond_max_series_are_dropped_and_counted() {
        let mut p = parser("format = \"plotter\"\nmax_series = 2\n");
        let batch = read(&mut p, b"a:1 b:2 c:3 d:4");
        assert_eq!(batch.samples.len(), 2);
        assert_eq!(batch.series_dropped, 2);
        assert_eq!(
            batch.series_refused.as_deref(),
            Some("max_series (2) reached: s.c and other new series are not made")
        );
    }

    #[test]
    fn csv_lines_take_named_columns_with_their_time() {
        let mut p = parser(
            "format = \"csv\"\ncolumns = [\"t\", \"temp\", \"hum\"]\n[sources.timestamp]\nfield = \"t\"\n",
        );
        let batch = read(&mut p, b"1767322800, 21.5,\"40\"");
        let t = 1_767_322_800_000;
        assert_eq!(
            samples(&batch),
            [
                ("s.temp".into(), 21.5, t, false),
                ("s.hum".into(), 40.0, t, false)
            ]
        );
        // The header a device prints at boot is no reading; an empty cell no value.
        assert_eq!(read(&mut p, b"t,temp,hum").invalid.len(), 0);
        let batch = read(&mut p, b"2026-01-02T03:00:01Z,,41");
        assert_eq!(samples(&batch), [("s.hum".into(), 41.0, t + 1000, false)]);
        assert_eq!(batch.nulls, 1);
        let batch = read(&mut p, b"1767322800,21.5");
        assert_eq!(
            batch.invalid,
            ["line has 2 values, columns names 3: 1767322800,21.5"]
        );
    }

    #[test]
    fn json_lines_take_fields_by_pointer() {
        let mut p = parser(
            "format = \"json\"\n[sources.timestamp]\nfield = \"/ts\"\nformat = \"%Y-%m-%d %H:%M:%S%.f\"\nutc_offset = \"+01:00\"\n[[sources.fields]]\nname = \"cpm\"\npointer = \"/geiger/cpm\"\n[[sources.fields]]\nname = \"usv\"\npointer = \"/geiger/usv\"\nscale = 1000\n",
        );
        let batch = read(
            &mut p,
            br#"{"ts": "2026-01-02 04:00:00.250", "geiger": {"cpm": 18, "usv": null}}"#,
        );
        assert_eq!(
            samples(&batch),
            [("s.cpm".into(), 18.0, 1_767_322_800_250, false)]
        );
        assert_eq!(batch.nulls, 1);
        // In the configuration's order, each scaled.
        let batch = read(
            &mut p,
            br#"{"ts": "2026-01-02 04:00:01", "geiger": {"cpm": 20, "usv": 0.125}}"#,
        );
        assert_eq!(
            samples(&batch),
            [
                ("s.cpm".into(), 20.0, 1_767_322_801_000, false),
                ("s.usv".into(), 125.0, 1_767_322_801_000, false),
            ]
        );
        assert_eq!(
            read(&mut p, b"[1, 2]").invalid,
            ["line is not a JSON object: [1, 2]"]
        );
        assert!(read(&mut p, b"{\"geiger\": ").invalid[0].starts_with("line is not JSON ("));
    }
}
