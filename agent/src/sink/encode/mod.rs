//! Encoding a part's rows into file bytes. Pure and deterministic: the same rows give
//! byte-identical output, so a retried upload writes the same object.
//!
//! Two layouts:
//! - `long`: one row per series and window: series, unit, tags, window_start,
//!   window_end, count, min, max, mean, stdev, median, first, last, first_time, last_time
//!   (the times of `first` and `last`, to the millisecond).
//! - `wide`: one row per window: window_start, window_end, then `{stat}_{series}`
//!   for every series of the part's column set (see [`wide_columns`]), empty where a series
//!   has no window; no `first_time`/`last_time` (they would add a quarter to its width).
//!
//! Design: the device is no column of a file. It is a partition column, in the object's
//! key (`device=…/`), as the time is: a column both in the files and in the path makes
//! readers that merge the two (pandas, pyarrow) fail, and Glue repeat it. A Parquet file
//! still names its device in its key-value metadata (`edgespool.device`); a text file by
//! its name (`{device}-{time}-part-{n}`). PostgreSQL's COPY text and the MQTT feed, which
//! have no path, keep it.
//!
//! Text formats can be compressed as a whole (gzip or zstd), deterministically: no time
//! or name in the gzip header, the same level, so a retried upload is byte-identical.
//!
//! Text formats spell times as RFC 3339 UTC (window times to the second, first_time and
//! last_time to the millisecond); Parquet stores them as UTC timestamps in
//! microseconds, counts as int64, statistics as float64, strings dictionary-encoded.
//!
//! Files:
//! - `mod.rs`: [`Encoding`], [`Part`], the format dispatcher [`encode`], and what the
//!   formats share: the statistic names, the long layout's columns and the wide column set.
//! - `json.rs`: NDJSON and JSON Text Sequences.
//! - `csv.rs`: CSV, including the long-layout CSV that PostgreSQL's COPY reads.
//! - `parquet.rs`: Parquet, through the parquet crate's column writers.

mod csv;
mod json;
#[cfg(feature = "parquet")]
mod parquet;
#[cfg(all(test, feature = "parquet"))]
mod tests;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::config::{Compression, Format, Layout};
use crate::flow::{Series, Stats, WindowRow};

use self::csv::{csv_long, csv_wide};
use self::json::{json_long, json_wide};
#[cfg(feature = "parquet")]
use self::parquet::{parquet_long, parquet_wide};

#[cfg(feature = "postgres")]
pub use self::csv::{LongCsv, long_csv};
#[cfg(feature = "mqtt-sink")]
pub use self::json::json_record;

/// How a sink writes its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    /// File format.
    pub format: Format,
    /// Row layout.
    pub layout: Layout,
    /// Parquet's page compression, or a text file's as a whole.
    pub compression: Compression,
}

/// What one file holds.
pub struct Part<'a> {
    /// The device id.
    pub device: &'a str,
    /// The rows, ordered by window start and series.
    pub rows: &'a [WindowRow],
    /// For the wide layout: the series that get columns (the rows' own series are
    /// always added).
    pub series: &'a [Arc<Series>],
}

/// The names of the statistics, in column order.
const STATS: [&str; 8] = [
    "count", "min", "max", "mean", "stdev", "median", "first", "last",
];

/// The long layout's columns in a file, in order (PostgreSQL's COPY puts `device` first).
const LONG_COLUMNS: [&str; 15] = [
    "series",
    "unit",
    "tags",
    "window_start",
    "window_end",
    "count",
    "min",
    "max",
    "mean",
    "stdev",
    "median",
    "first",
    "last",
    "first_time",
    "last_time",
];

/// The file extension of an encoding: the format's, then the compression's for text.
pub fn extension(encoding: Encoding) -> &'static str {
    match (encoding.format, text_codec(encoding)) {
        (Format::Parquet, _) => "parquet",
        (Format::Ndjson, None) => "ndjson",
        (Format::Ndjson, Some(Compression::Gzip)) => "ndjson.gz",
        (Format::Ndjson, Some(_)) => "ndjson.zst",
        (Format::JsonSeq, None) => "json-seq",
        (Format::JsonSeq, Some(Compression::Gzip)) => "json-seq.gz",
        (Format::JsonSeq, Some(_)) => "json-seq.zst",
        (Format::Csv, None) => "csv",
        (Format::Csv, Some(Compression::Gzip)) => "csv.gz",
        (Format::Csv, Some(_)) => "csv.zst",
    }
}

/// The Content-Type of a format (a compressed text file keeps its format's, and says
/// how it is compressed in [`content_encoding`]).
pub fn content_type(format: Format) -> &'static str {
    match format {
        Format::Ndjson => "application/x-ndjson",
        Format::JsonSeq => "application/json-seq",
        Format::Csv => "text/csv; charset=utf-8; header=present",
        Format::Parquet => "application/vnd.apache.parquet",
    }
}

/// The Content-Encoding of a compressed text file.
pub fn content_encoding(encoding: Encoding) -> Option<&'static str> {
    match text_codec(encoding)? {
        Compression::Gzip => Some("gzip"),
        _ => Some("zstd"),
    }
}

/// How a text file is compressed as a whole: `None` for Parquet (whose pages are
/// compressed inside) and for uncompressed text.
fn text_codec(encoding: Encoding) -> Option<Compression> {
    match (encoding.format, encoding.compression) {
        (Format::Parquet, _) | (_, Compression::None) => None,
        (_, Compression::Gzip) => Some(Compression::Gzip),
        // Snappy is refused for text when the configuration is loaded.
        (_, Compression::Zstd | Compression::Snappy) => Some(Compression::Zstd),
    }
}

/// Encodes a part.
pub fn encode(encoding: Encoding, part: &Part<'_>) -> Result<Vec<u8>, String> {
    let text = match (encoding.format, encoding.layout) {
        (Format::Ndjson | Format::JsonSeq, Layout::Long) => json_long(encoding.format, part.rows),
        (Format::Ndjson | Format::JsonSeq, Layout::Wide) => json_wide(encoding.format, part),
        (Format::Csv, Layout::Long) => csv_long(part.rows)?,
        (Format::Csv, Layout::Wide) => csv_wide(part)?,
        #[cfg(feature = "parquet")]
        (Format::Parquet, Layout::Long) => {
            return parquet_long(encoding.compression, part.device, part.rows)
                .map_err(|e| e.to_string());
        }
        #[cfg(feature = "parquet")]
        (Format::Parquet, Layout::Wide) => {
            return parquet_wide(encoding.compression, part).map_err(|e| e.to_string());
        }
        // The configuration refuses the format in a build without it.
        #[cfg(not(feature = "parquet"))]
        (Format::Parquet, _) => {
            return Err("this build of edgespool has no Parquet encoder".to_owned());
        }
    };
    compress(text_codec(encoding), text).map_err(|e| e.to_string())
}

/// Compresses a text file as a whole. gzip: level 6, and a header with no file name, no
/// time (MTIME 0) and OS "unknown", so that the bytes depend on the rows alone. zstd:
/// level 3, one frame that states its content size.
fn compress(codec: Option<Compression>, text: Vec<u8>) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    match codec {
        None => Ok(text),
        Some(Compression::Gzip) => {
            let out = Vec::with_capacity(text.len() / 4);
            let mut gz = flate2::GzBuilder::new()
                .mtime(0)
                .operating_system(255)
                .write(out, flate2::Compression::new(6));
            gz.write_all(&text)?;
            gz.finish()
        }
        Some(_) => zstd::bulk::compress(&text, 3),
    }
}

/// A statistic as a JSON or CSV value; `None` for a missing standard deviation.
fn stat(stats: &Stats, index: usize) -> Option<f64> {
    match index {
        0 => Some(stats.count as f64),
        1 => Some(stats.min),
        2 => Some(stats.max),
        3 => Some(stats.mean),
        4 => stats.stdev,
        5 => Some(stats.median),
        6 => Some(stats.first),
        _ => Some(stats.last),
    }
}

/// The wide layout's series, in column order, with their column stems.
struct WideColumns<'a> {
    series: Vec<&'a Series>,
    stems: Vec<String>,
    index: HashMap<&'a Series, usize>,
}

/// The series that get columns in a wide file: the part's column set and the rows' own
/// series, ordered by name and tags. A stem is the series name with every character
/// other than ASCII letters, digits and `_` replaced by `_`; series that share a name
/// get their tag values appended, and stems that still clash get `_2`, `_3`, …
fn wide_columns<'a>(part: &'a Part<'_>) -> WideColumns<'a> {
    let all: BTreeSet<&Series> = part
        .series
        .iter()
        .map(|s| s.as_ref())
        .chain(part.rows.iter().map(|r| r.series.as_ref()))
        .collect();
    let series: Vec<&Series> = all.into_iter().collect();
    let mut name_count: HashMap<&str, usize> = HashMap::new();
    for s in &series {
        *name_count.entry(s.name.as_str()).or_default() += 1;
    }
    let mut used: HashMap<String, usize> = HashMap::new();
    let mut stems = Vec::with_capacity(series.len());
    for s in &series {
        let mut stem = s.name.clone();
        if name_count[s.name.as_str()] > 1 {
            for value in s.tags.values() {
                stem.push('_');
                stem.push_str(value);
            }
        }
        let mut stem: String = stem
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let seen = used.entry(stem.clone()).or_default();
        *seen += 1;
        if *seen > 1 {
            stem = format!("{stem}_{seen}");
        }
        stems.push(stem);
    }
    let index = series.iter().enumerate().map(|(i, s)| (*s, i)).collect();
    WideColumns {
        series,
        stems,
        index,
    }
}

/// The rows of a wide file: per window start, one optional stats per column.
fn wide_rows<'a>(
    columns: &WideColumns<'_>,
    rows: &'a [WindowRow],
) -> Vec<(i64, i64, Vec<Option<&'a Stats>>)> {
    let mut out: Vec<(i64, i64, Vec<Option<&Stats>>)> = Vec::new();
    for row in rows {
        if out.last().is_none_or(|(start, _, _)| *start != row.start) {
            out.push((row.start, row.end(), vec![None; columns.series.len()]));
        }
        let slot = columns.index[row.series.as_ref()];
        if let Some((_, _, cells)) = out.last_mut() {
            cells[slot] = Some(&row.stats);
        }
    }
    out
}
