//! Parquet, through the parquet crate's column writers (no Arrow: a smaller binary).
//! (The module is named `parquet`; the crate is spelled `::parquet`.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ::parquet::basic::{LogicalType, Repetition, TimeUnit, Type as Physical, ZstdLevel};
use ::parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int64Type};
use ::parquet::file::metadata::KeyValue;
use ::parquet::file::properties::{EnabledStatistics, WriterProperties};
use ::parquet::file::writer::SerializedFileWriter;
use ::parquet::schema::types::{ColumnPath, Type};

use crate::config::Compression;
use crate::flow::{Series, WindowRow};

use super::{STATS, WideColumns, stat, wide_rows};

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

/// The key-value metadata entry that names a file's device (no column does: the key's
/// `device=…` folder is the column).
pub const DEVICE_KEY: &str = "edgespool.device";

fn properties(compression: Compression, device: &str, strings: &[ColumnPath]) -> WriterProperties {
    let codec = match compression {
        Compression::Zstd => {
            ::parquet::basic::Compression::ZSTD(ZstdLevel::try_new(3).expect("level 3 is valid"))
        }
        Compression::Snappy => ::parquet::basic::Compression::SNAPPY,
        // gzip is for the text formats: the configuration refuses it for Parquet.
        Compression::None | Compression::Gzip => ::parquet::basic::Compression::UNCOMPRESSED,
    };
    let mut builder = WriterProperties::builder()
        .set_created_by(format!("edgespool version {}", env!("CARGO_PKG_VERSION")))
        .set_compression(codec)
        .set_dictionary_enabled(false)
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .set_max_row_group_row_count(None)
        .set_key_value_metadata(Some(vec![KeyValue::new(
            DEVICE_KEY.to_owned(),
            device.to_owned(),
        )]));
    for path in strings {
        builder = builder.set_column_dictionary_enabled(path.clone(), true);
    }
    builder.build()
}

/// The output buffer, shared with the file writer: what a row group wrote is taken out
/// of it after each chunk.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Shared {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl std::io::Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A Parquet file written a row group per chunk.
pub(super) struct ParquetFile {
    writer: SerializedFileWriter<Shared>,
    out: Shared,
    /// The wide layout's columns; `None` for the long layout.
    wide: Option<WideColumns>,
}

impl ParquetFile {
    pub(super) fn new(
        compression: Compression,
        device: &str,
        wide: Option<WideColumns>,
    ) -> ::parquet::errors::Result<ParquetFile> {
        let (schema, strings) = match &wide {
            None => (long_schema()?, long_strings()),
            Some(columns) => (wide_schema(columns)?, Vec::new()),
        };
        let props = properties(compression, device, &strings);
        let out = Shared::default();
        let writer = SerializedFileWriter::new(out.clone(), Arc::new(schema), Arc::new(props))?;
        Ok(ParquetFile { writer, out, wide })
    }

    /// Writes these rows as one row group; returns the bytes written so far.
    pub(super) fn push(&mut self, rows: &[WindowRow]) -> ::parquet::errors::Result<Vec<u8>> {
        if !rows.is_empty() {
            match &self.wide {
                None => {
                    let mut index = 0;
                    write_group(&mut self.writer, || {
                        index += 1;
                        long_column(rows, index - 1)
                    })?;
                }
                Some(columns) => {
                    let data = wide_data(columns, rows)
                        .map_err(::parquet::errors::ParquetError::General)?;
                    let mut data = data.into_iter();
                    write_group(&mut self.writer, || data.next())?;
                }
            }
        }
        Ok(self.out.take())
    }

    /// Writes the footer; returns the last bytes.
    pub(super) fn finish(self) -> ::parquet::errors::Result<Vec<u8>> {
        let ParquetFile { writer, out, .. } = self;
        writer.close()?;
        Ok(out.take())
    }
}

/// Writes one row group, its columns in schema leaf order as `next_column` gives them.
fn write_group(
    writer: &mut SerializedFileWriter<Shared>,
    mut next_column: impl FnMut() -> Option<Column>,
) -> ::parquet::errors::Result<()> {
    let mut group = writer.next_row_group()?;
    while let Some(mut column) = group.next_column()? {
        let Some(data) = next_column() else {
            return Err(::parquet::errors::ParquetError::General(
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
    Ok(())
}

/// The long layout's schema.
fn long_schema() -> ::parquet::errors::Result<Type> {
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
    fields.push(timestamp_field("first_time"));
    fields.push(timestamp_field("last_time"));
    Type::group_type_builder("edgespool")
        .with_fields(fields.into_iter().map(Arc::new).collect())
        .build()
}

/// The long layout's string columns (dictionary-encoded).
fn long_strings() -> Vec<ColumnPath> {
    ["series", "unit"]
        .iter()
        .map(|c| ColumnPath::from(*c))
        .chain(
            ["key", "value"].iter().map(|leaf| {
                ColumnPath::new(vec!["tags".into(), "key_value".into(), (*leaf).into()])
            }),
        )
        .collect()
}

/// The long layout's leaf column `index` (in schema order) of these rows; `None` past
/// the last.
///
/// Design: a column at a time, each written (encoded and compressed) before the next is
/// built, so a row group holds one column's values beside its rows, not all sixteen
/// (about 170 bytes a row; 1.7 MB for a chunk of 10,000 series).
fn long_column(rows: &[WindowRow], index: usize) -> Option<Column> {
    let n = rows.len();
    let int64 = |value: fn(&WindowRow) -> i64| {
        Column::required(Leaf::Int64(rows.iter().map(value).collect()))
    };
    let column = match index {
        0 => Column::required(Leaf::Bytes(names(rows, |s| Some(s.name.as_str())))),
        1 => Column {
            leaf: Leaf::Bytes(names(rows, |s| s.unit.as_deref())),
            defs: Some(
                rows.iter()
                    .map(|r| i16::from(r.series.unit.is_some()))
                    .collect(),
            ),
            reps: None,
        },
        2 | 3 => {
            let (mut leaf, mut defs, mut reps) =
                (Vec::new(), Vec::with_capacity(n), Vec::with_capacity(n));
            for row in rows {
                if row.series.tags.is_empty() {
                    // An empty map, present (def 1 of 2).
                    defs.push(1);
                    reps.push(0);
                }
                for (i, (k, v)) in row.series.tags.iter().enumerate() {
                    leaf.push(ByteArray::from(if index == 2 {
                        k.as_str()
                    } else {
                        v.as_str()
                    }));
                    defs.push(2);
                    reps.push(i16::from(i > 0));
                }
            }
            Column {
                leaf: Leaf::Bytes(leaf),
                defs: Some(defs),
                reps: Some(reps),
            }
        }
        4 => int64(|r| micros(r.start)),
        5 => int64(|r| micros(r.end())),
        6 => int64(|r| i64::try_from(r.stats.count).unwrap_or(i64::MAX)),
        7..=13 => {
            let stat_index = index - 6;
            // stdev (4): only present values are written, the others by their level.
            Column {
                leaf: Leaf::Double(
                    rows.iter()
                        .filter_map(|r| stat(&r.stats, stat_index))
                        .collect(),
                ),
                defs: (stat_index == 4).then(|| {
                    rows.iter()
                        .map(|r| i16::from(r.stats.stdev.is_some()))
                        .collect()
                }),
                reps: None,
            }
        }
        14 => int64(|r| r.stats.first_ms.saturating_mul(1000)),
        15 => int64(|r| r.stats.last_ms.saturating_mul(1000)),
        _ => return None,
    };
    Some(column)
}

/// A string column of these rows: each row's `text` of its series, the present ones.
/// The rows of a series share one copy of it; a chunk of one window (its rows each of
/// another series) needs no table to find them.
fn names(rows: &[WindowRow], text: fn(&Series) -> Option<&str>) -> Vec<ByteArray> {
    let mut column = Vec::with_capacity(rows.len());
    let one_window = rows.first().map(|r| r.start) == rows.last().map(|r| r.start);
    if one_window {
        column.extend(
            rows.iter()
                .filter_map(|r| text(&r.series).map(ByteArray::from)),
        );
        return column;
    }
    let mut seen: HashMap<&Series, Option<ByteArray>> = HashMap::new();
    for row in rows {
        let value = seen
            .entry(row.series.as_ref())
            .or_insert_with(|| text(&row.series).map(ByteArray::from));
        column.extend(value.clone());
    }
    column
}

/// The wide layout's schema for these columns.
fn wide_schema(columns: &WideColumns) -> ::parquet::errors::Result<Type> {
    const OPTIONAL: Repetition = Repetition::OPTIONAL;
    let mut fields = vec![
        timestamp_field("window_start"),
        timestamp_field("window_end"),
    ];
    for stem in &columns.stems {
        fields.push(field(&format!("count_{stem}"), Physical::INT64, OPTIONAL));
        for stat in &STATS[1..] {
            fields.push(field(&format!("{stat}_{stem}"), Physical::DOUBLE, OPTIONAL));
        }
    }
    Type::group_type_builder("edgespool")
        .with_fields(fields.into_iter().map(Arc::new).collect())
        .build()
}

/// The wide layout's columns of these rows (whole window starts).
fn wide_data(columns: &WideColumns, rows: &[WindowRow]) -> Result<Vec<Column>, String> {
    let rows = wide_rows(columns, rows)?;
    let mut data = vec![
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
    Ok(data)
}
