//! NDJSON and JSON Text Sequences (RFC 7464), in the long and the wide layout.

use std::io::Write;

use serde::Serialize;

use crate::clock;
use crate::config::Format;
use crate::flow::{Tags, WindowRow};

use super::{STATS, WideColumns, stat, wide_rows};

/// One long-layout row, as the JSON formats spell it; `device` only where no key says it.
#[derive(Serialize)]
struct Record<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<&'a str>,
    series: &'a str,
    unit: Option<&'a str>,
    tags: &'a Tags,
    window_start: String,
    window_end: String,
    count: u64,
    min: f64,
    max: f64,
    mean: f64,
    stdev: Option<f64>,
    median: f64,
    first: f64,
    last: f64,
    first_time: String,
    last_time: String,
}

pub(super) fn json_long(format: Format, rows: &[WindowRow]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.len() * 256);
    for row in rows {
        if format == Format::JsonSeq {
            // RFC 7464: each text starts with RS (0x1E) and ends with LF.
            out.push(0x1e);
        }
        write_record(&mut out, None, row);
        out.push(b'\n');
    }
    out
}

/// One row as a JSON object with its device (the payload of an MQTT message).
#[cfg(feature = "mqtt-sink")]
pub fn json_record(out: &mut Vec<u8>, device: &str, row: &WindowRow) {
    write_record(out, Some(device), row);
}

/// One row as a JSON object: a line of NDJSON (no device: the key has it), or with it.
fn write_record(out: &mut Vec<u8>, device: Option<&str>, row: &WindowRow) {
    let record = Record {
        device,
        series: &row.series.name,
        unit: row.series.unit.as_deref(),
        tags: &row.series.tags,
        window_start: clock::rfc3339(row.start),
        window_end: clock::rfc3339(row.end()),
        count: row.stats.count,
        min: row.stats.min,
        max: row.stats.max,
        mean: row.stats.mean,
        stdev: row.stats.stdev,
        median: row.stats.median,
        first: row.stats.first,
        last: row.stats.last,
        first_time: clock::rfc3339_ms(row.stats.first_ms),
        last_time: clock::rfc3339_ms(row.stats.last_ms),
    };
    // Plain structs of strings and finite numbers always serialize.
    serde_json::to_writer(out, &record).expect("a record serializes");
}

/// The wide layout's columns and their JSON keys, quoted once per file.
pub(super) struct WideKeys {
    columns: WideColumns,
    keys: Vec<Vec<String>>,
}

impl WideKeys {
    pub(super) fn new(columns: WideColumns) -> WideKeys {
        let keys = columns
            .stems
            .iter()
            .map(|stem| {
                STATS
                    .iter()
                    .map(|stat| {
                        serde_json::to_string(&format!("{stat}_{stem}")).unwrap_or_default()
                    })
                    .collect()
            })
            .collect();
        WideKeys { columns, keys }
    }

    /// The wide layout's lines of these rows (whole window starts).
    pub(super) fn rows(&self, format: Format, rows: &[WindowRow]) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        for (start, end, cells) in wide_rows(&self.columns, rows)? {
            if format == Format::JsonSeq {
                out.push(0x1e);
            }
            let _ = write!(
                out,
                "{{\"window_start\":\"{}\",\"window_end\":\"{}\"",
                clock::rfc3339(start),
                clock::rfc3339(end)
            );
            for (cell, keys) in cells.iter().zip(&self.keys) {
                for (i, key) in keys.iter().enumerate() {
                    out.push(b',');
                    out.extend_from_slice(key.as_bytes());
                    out.push(b':');
                    match cell {
                        Some(stats) if i == 0 => {
                            let _ = write!(out, "{}", stats.count);
                        }
                        Some(stats) => match stat(stats, i) {
                            Some(v) => out
                                .extend_from_slice(ryu::Buffer::new().format_finite(v).as_bytes()),
                            None => out.extend_from_slice(b"null"),
                        },
                        None => out.extend_from_slice(b"null"),
                    }
                }
            }
            out.extend_from_slice(b"}\n");
        }
        Ok(out)
    }
}
