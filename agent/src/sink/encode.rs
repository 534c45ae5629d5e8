//! Encoding a part's rows into file bytes. Pure and deterministic: the same rows give
//! byte-identical output, so a retried upload writes the same object.

use serde::Serialize;
use std::collections::BTreeMap;

use crate::aggregate::WindowRow;
use crate::clock;
use crate::config::Format;

/// One output row, as every text format spells it.
#[derive(Serialize)]
struct Record<'a> {
    device: &'a str,
    series: &'a str,
    unit: Option<&'a str>,
    tags: &'a BTreeMap<String, String>,
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
}

/// The file extension of a format.
pub fn extension(format: Format) -> &'static str {
    match format {
        Format::Ndjson => "ndjson",
        Format::JsonSeq => "json-seq",
    }
}

/// Encodes rows in a format.
pub fn encode(format: Format, device: &str, rows: &[WindowRow]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.len() * 256);
    for row in rows {
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
        };
        if format == Format::JsonSeq {
            // RFC 7464: each text starts with RS (0x1E) and ends with LF.
            out.push(0x1e);
        }
        // Serializing plain structs of strings and finite numbers cannot fail.
        serde_json::to_writer(&mut out, &record).expect("a record serializes");
        out.push(b'\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::Stats;
    use crate::source::Series;
    use std::sync::Arc;

    fn rows() -> Vec<WindowRow> {
        let mut series = Series::new("pa.44071.pm", Some("ug/m3"));
        series.tags.insert("id".into(), "44071".into());
        vec![WindowRow {
            series: Arc::new(series),
            start: 1_795_269_900,
            seconds: 60,
            stats: Stats {
                count: 2,
                min: 1.0,
                max: 3.0,
                mean: 2.0,
                stdev: Some(std::f64::consts::SQRT_2),
                median: 2.0,
                first: 1.0,
                last: 3.0,
            },
        }]
    }

    #[test]
    fn ndjson_is_one_object_per_line() {
        let text = String::from_utf8(encode(Format::Ndjson, "pi-1", &rows())).expect("utf-8");
        assert_eq!(
            text,
            "{\"device\":\"pi-1\",\"series\":\"pa.44071.pm\",\"unit\":\"ug/m3\",\"tags\":{\"id\":\"44071\"},\"window_start\":\"2026-11-21T14:05:00Z\",\"window_end\":\"2026-11-21T14:06:00Z\",\"count\":2,\"min\":1.0,\"max\":3.0,\"mean\":2.0,\"stdev\":1.4142135623730951,\"median\":2.0,\"first\":1.0,\"last\":3.0}\n"
        );
    }

    #[test]
    fn json_seq_starts_each_text_with_a_record_separator() {
        let bytes = encode(Format::JsonSeq, "pi-1", &rows());
        assert_eq!(bytes[0], 0x1e);
        assert_eq!(bytes.last(), Some(&b'\n'));
        assert_eq!(&bytes[1..], &encode(Format::Ndjson, "pi-1", &rows())[..]);
    }
}
