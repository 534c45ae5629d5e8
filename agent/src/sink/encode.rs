//! Encoding a part's rows into file bytes. Pure and deterministic: the same rows give
//! byte-identical output, so a retried upload writes the same object.
//!
//! Two layouts:
//! - `long`: one row per series and window: device, series, unit, tags, window_start,
//!   window_end, count, min, max, mean, stdev, median, first, last.
//! - `wide`: one row per window: device, window_start, window_end, then `{stat}_{series}`
//!   for every series of the part's column set (see [`wide_columns`]), empty where a series
//!   has no window.
//!
//! Text formats spell times as RFC 3339 UTC; Parquet stores them as UTC timestamps in
//! microseconds, counts as int64, statistics as float64, strings dictionary-encoded.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::sync::Arc;

use serde::Serialize;

use crate::aggregate::{Stats, WindowRow};
use crate::clock;
use crate::config::{Compression, Format, Layout};
use crate::source::Series;

/// How a sink writes its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    /// File format.
    pub format: Format,
    /// Row layout.
    pub layout: Layout,
    /// Parquet compression.
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

/// The long layout's columns, in order.
const LONG_COLUMNS: [&str; 14] = [
    "device",
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
];

/// The file extension of a format.
pub fn extension(format: Format) -> &'static str {
    match format {
        Format::Ndjson => "ndjson",
        Format::JsonSeq => "json-seq",
        Format::Csv => "csv",
        Format::Parquet => "parquet",
    }
}

/// The Content-Type of a format.
pub fn content_type(format: Format) -> &'static str {
    match format {
        Format::Ndjson => "application/x-ndjson",
        Format::JsonSeq => "application/json-seq",
        Format::Csv => "text/csv; charset=utf-8; header=present",
        Format::Parquet => "application/vnd.apache.parquet",
    }
}

/// Encodes a part.
pub fn encode(encoding: Encoding, part: &Part<'_>) -> Result<Vec<u8>, String> {
    match (encoding.format, encoding.layout) {
        (Format::Ndjson | Format::JsonSeq, Layout::Long) => {
            Ok(json_long(encoding.format, part.device, part.rows))
        }
        (Format::Ndjson | Format::JsonSeq, Layout::Wide) => Ok(json_wide(encoding.format, part)),
        (Format::Csv, Layout::Long) => csv_long(part.device, part.rows),
        (Format::Csv, Layout::Wide) => csv_wide(part),
        (Format::Parquet, Layout::Long) => {
            parquet_long(encoding.compression, part.device, part.rows).map_err(|e| e.to_string())
        }
        (Format::Parquet, Layout::Wide) => {
            parquet_wide(encoding.compression, part).map_err(|e| e.to_string())
        }
    }
}

/// One long-layout row, as the JSON formats spell it.
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

fn json_long(format: Format, device: &str, rows: &[WindowRow]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.len() * 256);
    for row in rows {
        if format == Format::JsonSeq {
            // RFC 7464: each text starts with RS (0x1E) and ends with LF.
            out.push(0x1e);
        }
        json_record(&mut out, device, row);
        out.push(b'\n');
    }
    out
}

/// One row as a JSON object (a line of NDJSON, the payload of an MQTT message).
pub fn json_record(out: &mut Vec<u8>, device: &str, row: &WindowRow) {
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
    // Plain structs of strings and finite numbers always serialize.
    serde_json::to_writer(out, &record).expect("a record serializes");
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

fn json_wide(format: Format, part: &Part<'_>) -> Vec<u8> {
    let columns = wide_columns(part);
    let keys: Vec<Vec<String>> = columns
        .stems
        .iter()
        .map(|stem| {
            STATS
                .iter()
                .map(|stat| serde_json::to_string(&format!("{stat}_{stem}")).unwrap_or_default())
                .collect()
        })
        .collect();
    let device = serde_json::to_string(part.device).unwrap_or_default();
    let mut out = Vec::new();
    for (start, end, cells) in wide_rows(&columns, part.rows) {
        if format == Format::JsonSeq {
            out.push(0x1e);
        }
        let _ = write!(
            out,
            "{{\"device\":{device},\"window_start\":\"{}\",\"window_end\":\"{}\"",
            clock::rfc3339(start),
            clock::rfc3339(end)
        );
        for (cell, keys) in cells.iter().zip(&keys) {
            for (i, key) in keys.iter().enumerate() {
                out.push(b',');
                out.extend_from_slice(key.as_bytes());
                out.push(b':');
                match cell {
                    Some(stats) if i == 0 => {
                        let _ = write!(out, "{}", stats.count);
                    }
                    Some(stats) => match stat(stats, i) {
                        Some(v) => {
                            out.extend_from_slice(ryu::Buffer::new().format_finite(v).as_bytes())
                        }
                        None => out.extend_from_slice(b"null"),
                    },
                    None => out.extend_from_slice(b"null"),
                }
            }
        }
        out.extend_from_slice(b"}\n");
    }
    out
}

fn csv_writer() -> csv::Writer<Vec<u8>> {
    csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new())
}

fn csv_finish(writer: csv::Writer<Vec<u8>>) -> Result<Vec<u8>, String> {
    writer.into_inner().map_err(|e| e.to_string())
}

fn number(buffer: &mut ryu::Buffer, value: Option<f64>) -> &str {
    match value {
        Some(v) => buffer.format_finite(v),
        None => "",
    }
}

fn csv_long(device: &str, rows: &[WindowRow]) -> Result<Vec<u8>, String> {
    long_csv(device, rows, LongCsv::File).map_err(|e| e.to_string())
}

/// The two spellings of the long layout as CSV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LongCsv {
    /// The `csv` file format: a header, `window_end`, empty `tags` when there are none.
    File,
    /// PostgreSQL's `COPY … (FORMAT csv)` of the table's columns: no header,
    /// `window_seconds` for `window_end`, `{}` for no tags (the column is NOT NULL).
    Copy,
}

/// Long-layout rows as CSV; an empty unquoted field is a missing value (NULL for COPY).
/// Tags and window times are formatted once per series and per window, not per row.
pub fn long_csv(device: &str, rows: &[WindowRow], flavour: LongCsv) -> Result<Vec<u8>, csv::Error> {
    let mut w = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(Vec::with_capacity(rows.len() * 160));
    if flavour == LongCsv::File {
        w.write_record(LONG_COLUMNS)?;
    }
    let mut tags: HashMap<&Series, String> = HashMap::new();
    let mut window: Option<(i64, String, String)> = None;
    let mut floats: [ryu::Buffer; 7] = std::array::from_fn(|_| ryu::Buffer::new());
    let mut ints: [itoa::Buffer; 2] = std::array::from_fn(|_| itoa::Buffer::new());
    for row in rows {
        let s = &row.stats;
        let tags = tags.entry(row.series.as_ref()).or_insert_with(|| {
            match (flavour, row.series.tags.is_empty()) {
                (LongCsv::File, true) => String::new(),
                _ => serde_json::to_string(&row.series.tags).unwrap_or_else(|_| "{}".to_owned()),
            }
        });
        if window
            .as_ref()
            .is_none_or(|(start, _, _)| *start != row.start)
        {
            window = Some((
                row.start,
                clock::rfc3339(row.start),
                clock::rfc3339(row.end()),
            ));
        }
        let (_, start, end) = window.as_ref().expect("set above");
        let [f1, f2, f3, f4, f5, f6, f7] = &mut floats;
        let [i1, i2] = &mut ints;
        let end = match flavour {
            LongCsv::File => end.as_str(),
            LongCsv::Copy => i1.format(row.seconds),
        };
        w.write_record([
            device,
            &row.series.name,
            row.series.unit.as_deref().unwrap_or(""),
            tags,
            start,
            end,
            i2.format(s.count),
            f1.format_finite(s.min),
            f2.format_finite(s.max),
            f3.format_finite(s.mean),
            s.stdev.map_or("", |v| f4.format_finite(v)),
            f5.format_finite(s.median),
            f6.format_finite(s.first),
            f7.format_finite(s.last),
        ])?;
    }
    w.into_inner().map_err(|e| e.into_error().into())
}

fn csv_wide(part: &Part<'_>) -> Result<Vec<u8>, String> {
    let columns = wide_columns(part);
    let mut w = csv_writer();
    let mut header = vec![
        "device".to_owned(),
        "window_start".to_owned(),
        "window_end".to_owned(),
    ];
    for stem in &columns.stems {
        header.extend(STATS.iter().map(|stat| format!("{stat}_{stem}")));
    }
    w.write_record(&header).map_err(|e| e.to_string())?;
    let mut record: Vec<String> = Vec::with_capacity(header.len());
    let mut buffer = ryu::Buffer::new();
    for (start, end, cells) in wide_rows(&columns, part.rows) {
        record.clear();
        record.push(part.device.to_owned());
        record.push(clock::rfc3339(start));
        record.push(clock::rfc3339(end));
        for cell in cells {
            for i in 0..STATS.len() {
                record.push(match cell {
                    Some(stats) if i == 0 => stats.count.to_string(),
                    Some(stats) => number(&mut buffer, stat(stats, i)).to_owned(),
                    None => String::new(),
                });
            }
        }
        w.write_record(&record).map_err(|e| e.to_string())?;
    }
    csv_finish(w)
}

// ---------------------------------------------------------------------------------------
// Parquet, through the parquet crate's column writers (no Arrow: a smaller binary).

use parquet::basic::{LogicalType, Repetition, TimeUnit, Type as Physical, ZstdLevel};
use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int64Type};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::{ColumnPath, Type};

/// The values of one leaf column, with its definition and repetition levels.
enum Leaf {
    Bytes(Vec<ByteArray>),
    Int64(Vec<i64>),
    Double(Vec<f64>),
}

struct Column {
    leaf: Leaf,
    defs: Option<Vec<i16>>,
    reps: Option<Vec<i16>>,
}

impl Column {
    fn required(leaf: Leaf) -> Column {
        Column {
            leaf,
            defs: None,
            reps: None,
        }
    }
}

fn micros(seconds: i64) -> i64 {
    seconds.saturating_mul(1_000_000)
}

fn field(name: &str, physical: Physical, repetition: Repetition) -> Type {
    Type::primitive_type_builder(name, physical)
        .with_repetition(repetition)
        .build()
        .expect("a valid primitive column")
}

fn string_field(name: &str, repetition: Repetition) -> Type {
    Type::primitive_type_builder(name, Physical::BYTE_ARRAY)
        .with_repetition(repetition)
        .with_logical_type(Some(LogicalType::String))
        .build()
        .expect("a valid string column")
}

fn timestamp_field(name: &str) -> Type {
    Type::primitive_type_builder(name, Physical::INT64)
        .with_repetition(Repetition::REQUIRED)
        .with_logical_type(Some(LogicalType::timestamp(true, TimeUnit::MICROS)))
        .build()
        .expect("a valid timestamp column")
}

fn properties(compression: Compression, strings: &[ColumnPath]) -> WriterProperties {
    let codec = match compression {
        Compression::Zstd => {
            parquet::basic::Compression::ZSTD(ZstdLevel::try_new(3).expect("level 3 is valid"))
        }
        Compression::Snappy => parquet::basic::Compression::SNAPPY,
        Compression::None => parquet::basic::Compression::UNCOMPRESSED,
    };
    let mut builder = WriterProperties::builder()
        .set_created_by(format!("edgespool version {}", env!("CARGO_PKG_VERSION")))
        .set_compression(codec)
        .set_dictionary_enabled(false)
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .set_max_row_group_row_count(None);
    for path in strings {
        builder = builder.set_column_dictionary_enabled(path.clone(), true);
    }
    builder.build()
}

/// Writes one row group of `columns` (in schema leaf order) and returns the file.
fn write_parquet(
    schema: Type,
    props: WriterProperties,
    columns: Vec<Column>,
) -> parquet::errors::Result<Vec<u8>> {
    let mut writer = SerializedFileWriter::new(Vec::new(), Arc::new(schema), Arc::new(props))?;
    let mut group = writer.next_row_group()?;
    let mut columns = columns.into_iter();
    while let Some(mut column) = group.next_column()? {
        let Some(data) = columns.next() else {
            return Err(parquet::errors::ParquetError::General(
                "more schema columns than data".into(),
            ));
        };
        let (defs, reps) = (data.defs.as_deref(), data.reps.as_deref());
        match data.leaf {
            Leaf::Bytes(values) => {
                column
                    .typed::<ByteArrayType>()
                    .write_batch(&values, defs, reps)?;
            }
            Leaf::Int64(values) => {
                column
                    .typed::<Int64Type>()
                    .write_batch(&values, defs, reps)?;
            }
            Leaf::Double(values) => {
                column
                    .typed::<DoubleType>()
                    .write_batch(&values, defs, reps)?;
            }
        }
        column.close()?;
    }
    group.close()?;
    writer.into_inner()
}

fn parquet_long(
    compression: Compression,
    device: &str,
    rows: &[WindowRow],
) -> parquet::errors::Result<Vec<u8>> {
    const OPTIONAL: Repetition = Repetition::OPTIONAL;
    const REPEATED: Repetition = Repetition::REPEATED;
    const REQUIRED: Repetition = Repetition::REQUIRED;
    let key_value = Type::group_type_builder("key_value")
        .with_repetition(REPEATED)
        .with_fields(vec![
            Arc::new(string_field("key", REQUIRED)),
            Arc::new(string_field("value", REQUIRED)),
        ])
        .build()?;
    let tags = Type::group_type_builder("tags")
        .with_repetition(OPTIONAL)
        .with_logical_type(Some(LogicalType::Map))
        .with_fields(vec![Arc::new(key_value)])
        .build()?;
    let mut fields = vec![
        string_field("device", REQUIRED),
        string_field("series", REQUIRED),
        string_field("unit", OPTIONAL),
        tags,
        timestamp_field("window_start"),
        timestamp_field("window_end"),
        field("count", Physical::INT64, REQUIRED),
    ];
    for name in &STATS[1..] {
        let repetition = if *name == "stdev" { OPTIONAL } else { REQUIRED };
        fields.push(field(name, Physical::DOUBLE, repetition));
    }
    let schema = Type::group_type_builder("edgespool")
        .with_fields(fields.into_iter().map(Arc::new).collect())
        .build()?;

    let n = rows.len();
    let mut device_col = Vec::with_capacity(n);
    let mut series_col = Vec::with_capacity(n);
    let (mut unit_col, mut unit_defs) = (Vec::new(), Vec::with_capacity(n));
    let (mut keys, mut values, mut tag_defs, mut tag_reps) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut starts, mut ends, mut counts) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut stats: [Vec<f64>; 7] = std::array::from_fn(|_| Vec::with_capacity(n));
    let mut stdev_defs = Vec::with_capacity(n);
    let device = ByteArray::from(device);
    let mut names: HashMap<&Series, (ByteArray, Option<ByteArray>)> = HashMap::new();
    for row in rows {
        let (name, unit) = names.entry(row.series.as_ref()).or_insert_with(|| {
            (
                ByteArray::from(row.series.name.as_str()),
                row.series.unit.as_deref().map(ByteArray::from),
            )
        });
        device_col.push(device.clone());
        series_col.push(name.clone());
        match unit {
            Some(unit) => {
                unit_col.push(unit.clone());
                unit_defs.push(1);
            }
            None => unit_defs.push(0),
        }
        if row.series.tags.is_empty() {
            // An empty map, present (def 1 of 2).
            tag_defs.push(1);
            tag_reps.push(0);
        } else {
            for (i, (k, v)) in row.series.tags.iter().enumerate() {
                keys.push(ByteArray::from(k.as_str()));
                values.push(ByteArray::from(v.as_str()));
                tag_defs.push(2);
                tag_reps.push(i16::from(i > 0));
            }
        }
        starts.push(micros(row.start));
        ends.push(micros(row.end()));
        let s = &row.stats;
        counts.push(i64::try_from(s.count).unwrap_or(i64::MAX));
        for (i, column) in stats.iter_mut().enumerate() {
            // Index 3 is stdev: only present values are written.
            if let Some(v) = stat(s, i + 1) {
                column.push(v);
            }
        }
        stdev_defs.push(i16::from(s.stdev.is_some()));
    }
    let mut columns = vec![
        Column::required(Leaf::Bytes(device_col)),
        Column::required(Leaf::Bytes(series_col)),
        Column {
            leaf: Leaf::Bytes(unit_col),
            defs: Some(unit_defs),
            reps: None,
        },
        Column {
            leaf: Leaf::Bytes(keys),
            defs: Some(tag_defs.clone()),
            reps: Some(tag_reps.clone()),
        },
        Column {
            leaf: Leaf::Bytes(values),
            defs: Some(tag_defs),
            reps: Some(tag_reps),
        },
        Column::required(Leaf::Int64(starts)),
        Column::required(Leaf::Int64(ends)),
        Column::required(Leaf::Int64(counts)),
    ];
    for (i, values) in stats.into_iter().enumerate() {
        columns.push(Column {
            leaf: Leaf::Double(values),
            defs: (i == 3).then(|| stdev_defs.clone()),
            reps: None,
        });
    }
    let strings =
        ["device", "series", "unit"]
            .iter()
            .map(|c| ColumnPath::from(*c))
            .chain(["key", "value"].iter().map(|leaf| {
                ColumnPath::new(vec!["tags".into(), "key_value".into(), (*leaf).into()])
            }))
            .collect::<Vec<_>>();
    write_parquet(schema, properties(compression, &strings), columns)
}

fn parquet_wide(compression: Compression, part: &Part<'_>) -> parquet::errors::Result<Vec<u8>> {
    const OPTIONAL: Repetition = Repetition::OPTIONAL;
    const REQUIRED: Repetition = Repetition::REQUIRED;
    let columns = wide_columns(part);
    let mut fields = vec![
        string_field("device", REQUIRED),
        timestamp_field("window_start"),
        timestamp_field("window_end"),
    ];
    for stem in &columns.stems {
        fields.push(field(&format!("count_{stem}"), Physical::INT64, OPTIONAL));
        for stat in &STATS[1..] {
            fields.push(field(&format!("{stat}_{stem}"), Physical::DOUBLE, OPTIONAL));
        }
    }
    let schema = Type::group_type_builder("edgespool")
        .with_fields(fields.into_iter().map(Arc::new).collect())
        .build()?;

    let rows = wide_rows(&columns, part.rows);
    let n = rows.len();
    let device = ByteArray::from(part.device);
    let mut data = vec![
        Column::required(Leaf::Bytes(vec![device; n])),
        Column::required(Leaf::Int64(rows.iter().map(|r| micros(r.0)).collect())),
        Column::required(Leaf::Int64(rows.iter().map(|r| micros(r.1)).collect())),
    ];
    for slot in 0..columns.series.len() {
        let cells = rows.iter().map(|r| r.2[slot]);
        let defs: Vec<i16> = cells.clone().map(|c| i16::from(c.is_some())).collect();
        data.push(Column {
            leaf: Leaf::Int64(
                cells
                    .clone()
                    .flatten()
                    .map(|s| i64::try_from(s.count).unwrap_or(i64::MAX))
                    .collect(),
            ),
            defs: Some(defs),
            reps: None,
        });
        for i in 1..STATS.len() {
            let values: Vec<Option<f64>> =
                cells.clone().map(|c| c.and_then(|s| stat(s, i))).collect();
            data.push(Column {
                defs: Some(values.iter().map(|v| i16::from(v.is_some())).collect()),
                leaf: Leaf::Double(values.into_iter().flatten().collect()),
                reps: None,
            });
        }
    }
    write_parquet(
        schema,
        properties(compression, &[ColumnPath::from("device")]),
        data,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(count: u64, value: f64) -> Stats {
        Stats {
            count,
            min: value,
            max: value,
            mean: value,
            stdev: (count > 1).then_some(0.0),
            median: value,
            first: value,
            last: value,
        }
    }

    fn series(name: &str, unit: Option<&str>, tags: &[(&str, &str)]) -> Arc<Series> {
        let mut s = Series::new(name, unit);
        for (k, v) in tags {
            s.tags.insert((*k).into(), (*v).into());
        }
        Arc::new(s)
    }

    fn rows() -> Vec<WindowRow> {
        vec![WindowRow {
            series: series("pa.44071.pm", Some("ug/m3"), &[("id", "44071")]),
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

    fn encode_as(format: Format, layout: Layout, part: &Part<'_>) -> String {
        let encoding = Encoding {
            format,
            layout,
            compression: Compression::Zstd,
        };
        String::from_utf8(encode(encoding, part).expect("encodes")).expect("utf-8")
    }

    fn part<'a>(rows: &'a [WindowRow], series: &'a [Arc<Series>]) -> Part<'a> {
        Part {
            device: "pi-1",
            rows,
            series,
        }
    }

    #[test]
    fn ndjson_is_one_object_per_line() {
        let rows = rows();
        assert_eq!(
            encode_as(Format::Ndjson, Layout::Long, &part(&rows, &[])),
            "{\"device\":\"pi-1\",\"series\":\"pa.44071.pm\",\"unit\":\"ug/m3\",\"tags\":{\"id\":\"44071\"},\"window_start\":\"2026-11-21T14:05:00Z\",\"window_end\":\"2026-11-21T14:06:00Z\",\"count\":2,\"min\":1.0,\"max\":3.0,\"mean\":2.0,\"stdev\":1.4142135623730951,\"median\":2.0,\"first\":1.0,\"last\":3.0}\n"
        );
    }

    #[test]
    fn json_seq_starts_each_text_with_a_record_separator() {
        let rows = rows();
        let seq = encode_as(Format::JsonSeq, Layout::Long, &part(&rows, &[]));
        let nd = encode_as(Format::Ndjson, Layout::Long, &part(&rows, &[]));
        assert_eq!(seq.as_bytes()[0], 0x1e);
        assert_eq!(&seq[1..], nd);
    }

    #[test]
    fn csv_has_a_header_and_empty_cells_for_missing_values() {
        let mut rows = rows();
        rows.push(WindowRow {
            series: series("sys.load1", None, &[]),
            start: 1_795_269_900,
            seconds: 60,
            stats: stats(1, 0.5),
        });
        assert_eq!(
            encode_as(Format::Csv, Layout::Long, &part(&rows, &[])),
            "device,series,unit,tags,window_start,window_end,count,min,max,mean,stdev,median,first,last\n\
             pi-1,pa.44071.pm,ug/m3,\"{\"\"id\"\":\"\"44071\"\"}\",2026-11-21T14:05:00Z,2026-11-21T14:06:00Z,2,1.0,3.0,2.0,1.4142135623730951,2.0,1.0,3.0\n\
             pi-1,sys.load1,,,2026-11-21T14:05:00Z,2026-11-21T14:06:00Z,1,0.5,0.5,0.5,,0.5,0.5,0.5\n"
        );
    }

    fn wide_fixture() -> (Vec<WindowRow>, Vec<Arc<Series>>) {
        let a = series("hw.t-1", Some("celsius"), &[]);
        let b = series("hw.t.1", None, &[]);
        let silent = series("hw.door", None, &[]);
        let rows = vec![
            WindowRow {
                series: Arc::clone(&a),
                start: 60,
                seconds: 60,
                stats: stats(3, 1.5),
            },
            WindowRow {
                series: Arc::clone(&a),
                start: 120,
                seconds: 60,
                stats: stats(1, 2.0),
            },
            WindowRow {
                series: Arc::clone(&b),
                start: 120,
                seconds: 60,
                stats: stats(2, 7.0),
            },
        ];
        (rows, vec![silent, a])
    }

    #[test]
    fn wide_csv_has_a_column_per_stat_and_series_and_a_row_per_window() {
        let (rows, known) = wide_fixture();
        let text = encode_as(Format::Csv, Layout::Wide, &part(&rows, &known));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "device,window_start,window_end,\
             count_hw_door,min_hw_door,max_hw_door,mean_hw_door,stdev_hw_door,median_hw_door,first_hw_door,last_hw_door,\
             count_hw_t_1,min_hw_t_1,max_hw_t_1,mean_hw_t_1,stdev_hw_t_1,median_hw_t_1,first_hw_t_1,last_hw_t_1,\
             count_hw_t_1_2,min_hw_t_1_2,max_hw_t_1_2,mean_hw_t_1_2,stdev_hw_t_1_2,median_hw_t_1_2,first_hw_t_1_2,last_hw_t_1_2"
        );
        assert_eq!(
            lines[1],
            "pi-1,1970-01-01T00:01:00Z,1970-01-01T00:02:00Z,,,,,,,,,3,1.5,1.5,1.5,0.0,1.5,1.5,1.5,,,,,,,,"
        );
        assert_eq!(
            lines[2],
            "pi-1,1970-01-01T00:02:00Z,1970-01-01T00:03:00Z,,,,,,,,,1,2.0,2.0,2.0,,2.0,2.0,2.0,2,7.0,7.0,7.0,0.0,7.0,7.0,7.0"
        );
        assert_eq!(lines.len(), 3);
    }

    #[test]
    fn wide_json_uses_null_for_missing_cells() {
        let (rows, known) = wide_fixture();
        let text = encode_as(Format::Ndjson, Layout::Wide, &part(&rows, &known));
        let first: serde_json::Value =
            serde_json::from_str(text.lines().next().expect("a line")).expect("json");
        assert_eq!(first["count_hw_t_1"], 3);
        assert_eq!(first["mean_hw_t_1"], 1.5);
        assert!(first["count_hw_door"].is_null() && first["last_hw_t_1_2"].is_null());
        assert_eq!(first["window_start"], "1970-01-01T00:01:00Z");
    }

    #[test]
    fn series_sharing_a_name_are_told_apart_by_their_tags() {
        let rows = vec![
            WindowRow {
                series: series("pa.pm", None, &[("id", "7")]),
                start: 0,
                seconds: 60,
                stats: stats(1, 1.0),
            },
            WindowRow {
                series: series("pa.pm", None, &[("id", "9")]),
                start: 0,
                seconds: 60,
                stats: stats(1, 2.0),
            },
        ];
        let text = encode_as(Format::Csv, Layout::Wide, &part(&rows, &[]));
        let header = text.lines().next().expect("header");
        assert!(header.contains(",count_pa_pm_7,") && header.contains(",count_pa_pm_9,"));
    }

    #[test]
    fn parquet_is_deterministic_and_sized_sensibly() {
        let (rows, known) = wide_fixture();
        for layout in [Layout::Long, Layout::Wide] {
            for compression in [Compression::Zstd, Compression::Snappy, Compression::None] {
                let encoding = Encoding {
                    format: Format::Parquet,
                    layout,
                    compression,
                };
                let one = encode(encoding, &part(&rows, &known)).expect("encodes");
                let two = encode(encoding, &part(&rows, &known)).expect("encodes");
                assert_eq!(one, two, "{layout:?} {compression:?}");
                assert_eq!(&one[..4], b"PAR1");
                assert_eq!(&one[one.len() - 4..], b"PAR1");
            }
        }
    }

    #[test]
    fn parquet_columns_read_back_with_their_values() {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let mut rows = rows();
        rows.push(WindowRow {
            series: series("sys.load1", None, &[]),
            start: 1_795_269_960,
            seconds: 60,
            stats: stats(1, 0.25),
        });
        let encoding = Encoding {
            format: Format::Parquet,
            layout: Layout::Long,
            compression: Compression::Zstd,
        };
        let bytes = encode(encoding, &part(&rows, &[])).expect("encodes");
        let reader = SerializedFileReader::new(bytes::Bytes::from(bytes)).expect("reads");
        let meta = reader.metadata();
        assert_eq!(meta.file_metadata().num_rows(), 2);
        let text: Vec<String> = reader
            .get_row_iter(None)
            .expect("rows")
            .map(|r| r.expect("row").to_string())
            .collect();
        assert!(
            text[0].contains("series: \"pa.44071.pm\"")
                && text[0].contains("tags: {\"id\" -> \"44071\"}")
                && text[0].contains("stdev: 1.4142135623730951"),
            "{}",
            text[0]
        );
        assert!(
            text[1].contains("unit: null") && text[1].contains("stdev: null"),
            "{}",
            text[1]
        );
    }
}
