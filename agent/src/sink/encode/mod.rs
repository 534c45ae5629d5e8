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
//! its name (`{device}-{time}-part-{n}`). PostgreSQL's rows and the MQTT feed, which
//! have no path, keep it.
//!
//! Text formats can be compressed as a whole (gzip or zstd), deterministically: no time
//! or name in the gzip header, the same level, so a retried upload is byte-identical.
//!
//! A file is encoded as its rows come, chunk by chunk ([`Encoder`]): memory holds one
//! chunk's rows and encoded bytes, not the part's.
//!
//! Text formats spell times as RFC 3339 UTC (window times to the second, first_time and
//! last_time to the millisecond); Parquet stores them as UTC timestamps in
//! microseconds, counts as int64, statistics as float64, strings dictionary-encoded.
//!
//! Files:
//! - `mod.rs`: [`Encoding`], [`Part`], the streaming [`Encoder`] and [`encode`], and what the
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

use self::csv::long_csv_rows;
use self::json::json_long;

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

/// Encodes a part whole (as [`Encoder`] does chunk by chunk, with one chunk).
pub fn encode(encoding: Encoding, part: &Part<'_>) -> Result<Vec<u8>, String> {
    let series = part_series(part);
    let mut encoder = Encoder::new(encoding, part.device, &series)?;
    let mut out = encoder.push(part.rows)?;
    out.extend(encoder.finish()?);
    Ok(out)
}

/// A part's column set and its rows' own series (for the wide layout; empty for long).
fn part_series(part: &Part<'_>) -> Vec<Arc<Series>> {
    let all: BTreeSet<&Arc<Series>> = part
        .series
        .iter()
        .chain(part.rows.iter().map(|r| &r.series))
        .collect();
    all.into_iter().map(Arc::clone).collect()
}

/// One file, encoded chunk by chunk as its rows come: each [`Encoder::push`] returns the
/// bytes ready so far, [`Encoder::finish`] the rest. Parquet writes a row group per chunk
/// (its footer, which indexes them, comes last); the text formats write their rows
/// through a streaming gzip or zstd compressor. Deterministic: the same chunks give the
/// same bytes, and the text formats the same bytes however the rows are chunked.
pub struct Encoder {
    body: Body,
    codec: Option<Compressor>,
    /// Bytes ready before the first chunk (a CSV header), returned with it.
    head: Vec<u8>,
}

/// What a format keeps from one chunk to the next.
enum Body {
    JsonLong(Format),
    JsonWide(Format, json::WideKeys),
    CsvLong,
    CsvWide(WideColumns),
    #[cfg(feature = "parquet")]
    Parquet(parquet::ParquetFile),
}

/// A streaming compressor over the output buffer (taken after each chunk).
enum Compressor {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

impl Encoder {
    /// A file of `encoding` for `device`; `series` are the wide layout's columns (every
    /// series of the rows to come must be among them), ignored by the long layout.
    pub fn new(
        encoding: Encoding,
        device: &str,
        series: &[Arc<Series>],
    ) -> Result<Encoder, String> {
        let wide = || wide_columns(series);
        let (body, head) = match (encoding.format, encoding.layout) {
            (Format::Ndjson | Format::JsonSeq, Layout::Long) => {
                (Body::JsonLong(encoding.format), Vec::new())
            }
            (Format::Ndjson | Format::JsonSeq, Layout::Wide) => (
                Body::JsonWide(encoding.format, json::WideKeys::new(wide())),
                Vec::new(),
            ),
            (Format::Csv, Layout::Long) => (Body::CsvLong, csv::long_header()?),
            (Format::Csv, Layout::Wide) => {
                let columns = wide();
                let head = csv::wide_header(&columns)?;
                (Body::CsvWide(columns), head)
            }
            #[cfg(feature = "parquet")]
            (Format::Parquet, layout) => {
                let columns = (layout == Layout::Wide).then(wide);
                let file = parquet::ParquetFile::new(encoding.compression, device, columns)
                    .map_err(|e| e.to_string())?;
                (Body::Parquet(file), Vec::new())
            }
            // The configuration refuses the format in a build without it.
            #[cfg(not(feature = "parquet"))]
            (Format::Parquet, _) => {
                let _ = device;
                return Err("this build of edgespool has no Parquet encoder".to_owned());
            }
        };
        let codec = match text_codec(encoding) {
            None => None,
            Some(Compression::Gzip) => Some(Compressor::Gzip(
                flate2::GzBuilder::new()
                    .mtime(0)
                    .operating_system(255)
                    .write(Vec::new(), flate2::Compression::new(6)),
            )),
            Some(_) => Some(Compressor::Zstd(
                zstd::stream::write::Encoder::new(Vec::new(), 3).map_err(|e| e.to_string())?,
            )),
        };
        let mut encoder = Encoder {
            body,
            codec,
            head: Vec::new(),
        };
        encoder.head = encoder.compress(head).map_err(|e| e.to_string())?;
        Ok(encoder)
    }

    /// Encodes the next rows (ordered by window start and series; a window start's rows
    /// all in one chunk for the wide layout) and returns the bytes ready.
    pub fn push(&mut self, rows: &[WindowRow]) -> Result<Vec<u8>, String> {
        let text = match &mut self.body {
            Body::JsonLong(format) => json_long(*format, rows),
            Body::JsonWide(format, keys) => keys.rows(*format, rows)?,
            Body::CsvLong => long_csv_rows(rows).map_err(|e| e.to_string())?,
            Body::CsvWide(columns) => csv::wide_rows_csv(columns, rows)?,
            #[cfg(feature = "parquet")]
            Body::Parquet(file) => {
                let bytes = file.push(rows).map_err(|e| e.to_string())?;
                return Ok(self.with_head(bytes));
            }
        };
        let bytes = self.compress(text).map_err(|e| e.to_string())?;
        Ok(self.with_head(bytes))
    }

    /// These bytes, after the head if it was not returned yet.
    fn with_head(&mut self, bytes: Vec<u8>) -> Vec<u8> {
        if self.head.is_empty() {
            return bytes;
        }
        let mut out = std::mem::take(&mut self.head);
        out.extend(bytes);
        out
    }

    /// Ends the file and returns its last bytes (Parquet's footer, the compressor's end).
    pub fn finish(self) -> Result<Vec<u8>, String> {
        let Encoder { body, codec, head } = self;
        #[cfg(feature = "parquet")]
        if let Body::Parquet(file) = body {
            let mut out = head;
            out.extend(file.finish().map_err(|e| e.to_string())?);
            return Ok(out);
        }
        #[cfg(not(feature = "parquet"))]
        let _ = body;
        let tail = {
            match codec {
                None => Vec::new(),
                Some(Compressor::Gzip(gz)) => gz.finish().map_err(|e| e.to_string())?,
                Some(Compressor::Zstd(z)) => z.finish().map_err(|e| e.to_string())?,
            }
        };
        let mut out = head;
        out.extend(tail);
        Ok(out)
    }

    /// Text through the compressor, if any; returns the bytes it has ready.
    fn compress(&mut self, text: Vec<u8>) -> std::io::Result<Vec<u8>> {
        use std::io::Write;
        match &mut self.codec {
            None => Ok(text),
            Some(Compressor::Gzip(gz)) => {
                gz.write_all(&text)?;
                Ok(std::mem::take(gz.get_mut()))
            }
            Some(Compressor::Zstd(z)) => {
                z.write_all(&text)?;
                Ok(std::mem::take(z.get_mut()))
            }
        }
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
struct WideColumns {
    series: Vec<Arc<Series>>,
    stems: Vec<String>,
    index: HashMap<Arc<Series>, usize>,
}

/// The series that get columns in a wide file, ordered by name and tags. A stem is the
/// series name with every character other than ASCII letters, digits and `_` replaced
/// by `_`; series that share a name get their tag values appended, and stems that still
/// clash get `_2`, `_3`, …
fn wide_columns(series: &[Arc<Series>]) -> WideColumns {
    let all: BTreeSet<&Arc<Series>> = series.iter().collect();
    let series: Vec<Arc<Series>> = all.into_iter().map(Arc::clone).collect();
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
    let index = series
        .iter()
        .enumerate()
        .map(|(i, s)| (Arc::clone(s), i))
        .collect();
    WideColumns {
        series,
        stems,
        index,
    }
}

/// One row of a wide file: window start and end, and one optional stats per column.
type WideRow<'a> = (i64, i64, Vec<Option<&'a Stats>>);

/// The rows of a wide file: per window start, one optional stats per column.
fn wide_rows<'a>(columns: &WideColumns, rows: &'a [WindowRow]) -> Result<Vec<WideRow<'a>>, String> {
    let mut out: Vec<(i64, i64, Vec<Option<&Stats>>)> = Vec::new();
    for row in rows {
        if out.last().is_none_or(|(start, _, _)| *start != row.start) {
            out.push((row.start, row.end(), vec![None; columns.series.len()]));
        }
        let Some(&slot) = columns.index.get(row.series.as_ref()) else {
            return Err(format!(
                "series {:?} has no column in this file",
                row.series.name
            ));
        };
        if let Some((_, _, cells)) = out.last_mut() {
            cells[slot] = Some(&row.stats);
        }
    }
    Ok(out)
}
