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
            let columns = match &self.wide {
                None => long_data(rows),
                Some(columns) => {
                    wide_data(columns, rows).map_err(::parquet::errors::ParquetError::General)?
                }
            };
            write_group(&mut self.writer, columns)?;
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

/// Writes one row group of `columns` (in schema leaf order).
fn write_group(
    writer: &mut SerializedFileWriter<Shared>,
    columns: Vec<Column>,
) -> ::parquet::errors::Result<()> {
    let mut group = writer.next_row_group()?;
    let mut columns = columns.into_iter();
    while let Some(mut column) = group.next_column()? {
        let Some(data) = columns.next() else {
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

/// The long layout's columns of these rows.
fn long_data(rows: &[WindowRow]) -> Vec<Column> {
    let n = rows.len();
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
    let (mut first_times, mut last_times) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut names: HashMap<&Series, (ByteArray, Option<ByteArray>)> = HashMap::new();
    for row in rows {
        let (name, unit) = names.entry(row.series.as_ref()).or_insert_with(|| {
            (
                ByteArray::from(row.series.name.as_str()),
                row.series.unit.as_deref().map(ByteArray::from),
            )
        });
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
        first_times.push(s.first_ms.saturating_mul(1000));
        last_times.push(s.last_ms.saturating_mul(1000));
    }
    let mut columns = vec![
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
    columns.push(Column::required(Leaf::Int64(first_times)));
    columns.push(Column::required(Leaf::Int64(last_times)));
    columns
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
