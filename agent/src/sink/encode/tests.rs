use std::sync::Arc;

use crate::config::{Compression, Format, Layout};
use crate::flow::{Series, Stats, WindowRow};

use super::{Encoding, Part, encode};

fn stats(count: u64, value: f64) -> Stats {
    Stats {
        count,
        min: value,
        max: value,
        mean: value,
        stdev: (count > 1).then_some(0.0),
        median: value,
        ..Stats::single(value)
    }
}

fn series(name: &str, unit: Option<&str>, tags: &[(&str, &str)]) -> Arc<Series> {
    let mut s = Series::new(name, unit);
    for (k, v) in tags {
        s.tags.insert(*k, *v);
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
            mean_rest: 0.0,
            stdev: Some(std::f64::consts::SQRT_2),
            median: 2.0,
            first: 1.0,
            first_ms: 1_795_269_900_250,
            last: 3.0,
            last_ms: 1_795_269_959_750,
        },
    }]
}

/// Plain text (or zstd Parquet).
fn encode_as(format: Format, layout: Layout, part: &Part<'_>) -> String {
    let encoding = Encoding {
        format,
        layout,
        compression: Compression::None,
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
        "{\"series\":\"pa.44071.pm\",\"unit\":\"ug/m3\",\"tags\":{\"id\":\"44071\"},\"window_start\":\"2026-11-21T14:05:00Z\",\"window_end\":\"2026-11-21T14:06:00Z\",\"count\":2,\"min\":1.0,\"max\":3.0,\"mean\":2.0,\"stdev\":1.4142135623730951,\"median\":2.0,\"first\":1.0,\"last\":3.0,\"first_time\":\"2026-11-21T14:05:00.250Z\",\"last_time\":\"2026-11-21T14:05:59.750Z\"}\n"
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
        stats: Stats {
            first_ms: 1_795_269_959_999,
            last_ms: 1_795_269_959_999,
            ..stats(1, 0.5)
        },
    });
    assert_eq!(
        encode_as(Format::Csv, Layout::Long, &part(&rows, &[])),
        "series,unit,tags,window_start,window_end,count,min,max,mean,stdev,median,first,last,first_time,last_time\n\
         pa.44071.pm,ug/m3,\"{\"\"id\"\":\"\"44071\"\"}\",2026-11-21T14:05:00Z,2026-11-21T14:06:00Z,2,1.0,3.0,2.0,1.4142135623730951,2.0,1.0,3.0,2026-11-21T14:05:00.250Z,2026-11-21T14:05:59.750Z\n\
         sys.load1,,,2026-11-21T14:05:00Z,2026-11-21T14:06:00Z,1,0.5,0.5,0.5,,0.5,0.5,0.5,2026-11-21T14:05:59.999Z,2026-11-21T14:05:59.999Z\n"
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
        "window_start,window_end,\
         count_hw_door,min_hw_door,max_hw_door,mean_hw_door,stdev_hw_door,median_hw_door,first_hw_door,last_hw_door,\
         count_hw_t_1,min_hw_t_1,max_hw_t_1,mean_hw_t_1,stdev_hw_t_1,median_hw_t_1,first_hw_t_1,last_hw_t_1,\
         count_hw_t_1_2,min_hw_t_1_2,max_hw_t_1_2,mean_hw_t_1_2,stdev_hw_t_1_2,median_hw_t_1_2,first_hw_t_1_2,last_hw_t_1_2"
    );
    assert_eq!(
        lines[1],
        "1970-01-01T00:01:00Z,1970-01-01T00:02:00Z,,,,,,,,,3,1.5,1.5,1.5,0.0,1.5,1.5,1.5,,,,,,,,"
    );
    assert_eq!(
        lines[2],
        "1970-01-01T00:02:00Z,1970-01-01T00:03:00Z,,,,,,,,,1,2.0,2.0,2.0,,2.0,2.0,2.0,2,7.0,7.0,7.0,0.0,7.0,7.0,7.0"
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
    assert!(
        first.get("device").is_none(),
        "the device is in the key: {first}"
    );
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
    assert!(
        text[0].ends_with(
            "first: 1.0, last: 3.0, first_time: 2026-11-21 14:05:00.250000 +00:00, last_time: 2026-11-21 14:05:59.750000 +00:00}"
        ),
        "{}",
        text[0]
    );
}

#[test]
fn a_parquet_file_names_its_device_in_its_metadata_not_in_a_column() {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let (rows, known) = wide_fixture();
    for layout in [Layout::Long, Layout::Wide] {
        let encoding = Encoding {
            format: Format::Parquet,
            layout,
            compression: Compression::Zstd,
        };
        let bytes = encode(encoding, &part(&rows, &known)).expect("encodes");
        let reader = SerializedFileReader::new(bytes::Bytes::from(bytes)).expect("reads");
        let meta = reader.metadata().file_metadata();
        let names: Vec<&str> = meta
            .schema_descr()
            .root_schema()
            .get_fields()
            .iter()
            .map(|f| f.name())
            .collect();
        assert!(!names.contains(&"device"), "{layout:?}: {names:?}");
        let lead = match layout {
            Layout::Long => ["series", "unit"],
            Layout::Wide => ["window_start", "window_end"],
        };
        assert_eq!(names[..2], lead, "{layout:?}");
        let kv: Vec<(String, Option<String>)> = meta
            .key_value_metadata()
            .expect("key-value metadata")
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone()))
            .collect();
        assert!(
            kv.contains(&("edgespool.device".to_owned(), Some("pi-1".to_owned()))),
            "{layout:?}: {kv:?}"
        );
    }
}

fn decompress(codec: Compression, bytes: &[u8]) -> String {
    use std::io::Read;
    let mut text = String::new();
    match codec {
        Compression::Gzip => {
            flate2::read::GzDecoder::new(bytes)
                .read_to_string(&mut text)
                .expect("gunzips");
        }
        _ => {
            let raw = zstd::stream::decode_all(bytes).expect("unzstds");
            text = String::from_utf8(raw).expect("utf-8");
        }
    }
    text
}

#[test]
fn compressed_text_is_the_plain_text_compressed_the_same_way_every_time() {
    let (rows, known) = wide_fixture();
    for format in [Format::Ndjson, Format::JsonSeq, Format::Csv] {
        for layout in [Layout::Long, Layout::Wide] {
            let plain = encode_as(format, layout, &part(&rows, &known));
            for codec in [Compression::Gzip, Compression::Zstd] {
                let encoding = Encoding {
                    format,
                    layout,
                    compression: codec,
                };
                let one = encode(encoding, &part(&rows, &known)).expect("encodes");
                let two = encode(encoding, &part(&rows, &known)).expect("encodes");
                assert_eq!(one, two, "{format:?} {layout:?} {codec:?}: deterministic");
                assert_eq!(
                    decompress(codec, &one),
                    plain,
                    "{format:?} {layout:?} {codec:?}"
                );
                if codec == Compression::Gzip {
                    // ID1 ID2, deflate, no flags (no name), MTIME 0, XFL, OS unknown.
                    assert_eq!(one[..4], [0x1f, 0x8b, 8, 0]);
                    assert_eq!(one[4..8], [0, 0, 0, 0], "no time in the header");
                    assert_eq!(one[9], 255);
                } else {
                    assert_eq!(one[..4], [0x28, 0xb5, 0x2f, 0xfd], "a zstd frame");
                }
            }
        }
    }
}

#[test]
fn extensions_and_encodings_follow_the_compression() {
    let of = |format, compression| {
        let encoding = Encoding {
            format,
            layout: Layout::Long,
            compression,
        };
        (
            super::extension(encoding),
            super::content_encoding(encoding),
        )
    };
    assert_eq!(of(Format::Ndjson, Compression::None), ("ndjson", None));
    assert_eq!(
        of(Format::Ndjson, Compression::Gzip),
        ("ndjson.gz", Some("gzip"))
    );
    assert_eq!(of(Format::Csv, Compression::Gzip), ("csv.gz", Some("gzip")));
    assert_eq!(
        of(Format::JsonSeq, Compression::Gzip),
        ("json-seq.gz", Some("gzip"))
    );
    assert_eq!(
        of(Format::JsonSeq, Compression::Zstd),
        ("json-seq.zst", Some("zstd"))
    );
    assert_eq!(
        of(Format::Csv, Compression::Zstd),
        ("csv.zst", Some("zstd"))
    );
    assert_eq!(of(Format::Parquet, Compression::Zstd), ("parquet", None));
    assert_eq!(
        super::content_type(Format::Csv),
        "text/csv; charset=utf-8; header=present"
    );
}

/// docs/benchmarks.md's "Output sizes": one hour of 100 series in 10 s windows (36,000
/// long rows) with seeded random readings to three decimals, in every format and codec.
/// `cargo test -p edgespool --lib sizes_of_one_hour -- --ignored --nocapture`
#[test]
#[ignore = "prints figures for docs/benchmarks.md"]
fn sizes_of_one_hour_in_every_format() {
    let names: Vec<Arc<Series>> = (0..100)
        .map(|i| series(&format!("hw.sensor{i}"), Some("celsius"), &[]))
        .collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut random = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f64 / (1u64 << 53) as f64
    };
    let reading = |v: f64| (v * 1000.0).round() / 1000.0;
    let mut rows = Vec::new();
    for w in 0..360 {
        for (i, s) in names.iter().enumerate() {
            let v = 20.0 + i as f64 * 0.37 + random();
            rows.push(WindowRow {
                series: Arc::clone(s),
                start: 1_795_269_600 + w * 10,
                seconds: 10,
                stats: Stats {
                    count: 10,
                    min: reading(v - random() * 0.2),
                    max: reading(v + random() * 0.2),
                    mean: v + (random() - 0.5) * 0.01,
                    mean_rest: 0.0,
                    stdev: Some(0.05 + random() * 0.05),
                    median: reading(v),
                    first: reading(v - 0.05),
                    last: reading(v + random() * 0.1),
                    first_ms: (1_795_269_600 + w * 10) * 1000 + 3,
                    last_ms: (1_795_269_600 + w * 10) * 1000 + 9_002,
                },
            });
        }
    }
    rows.sort_by(|a, b| (a.start, &a.series.name).cmp(&(b.start, &b.series.name)));
    for layout in [Layout::Long, Layout::Wide] {
        for format in [
            Format::Parquet,
            Format::Csv,
            Format::Ndjson,
            Format::JsonSeq,
        ] {
            let codecs: &[Compression] = if format == Format::Parquet {
                &[Compression::Zstd, Compression::Snappy]
            } else {
                &[Compression::None, Compression::Gzip, Compression::Zstd]
            };
            for &compression in codecs {
                let encoding = Encoding {
                    format,
                    layout,
                    compression,
                };
                let bytes = encode(encoding, &part(&rows, &names)).expect("encodes");
                println!(
                    "{layout:?} {format:?} {compression:?}: {} bytes",
                    bytes.len()
                );
            }
        }
    }
}

/// A file encoded chunk by chunk with [`super::Encoder`], the chunks cut after `cuts` rows.
fn encode_chunked(
    encoding: Encoding,
    rows: &[WindowRow],
    known: &[Arc<Series>],
    cuts: &[usize],
) -> Vec<u8> {
    let columns = super::part_series(&part(rows, known));
    let mut encoder = super::Encoder::new(encoding, "pi-1", &columns).expect("an encoder");
    let mut out = Vec::new();
    let mut from = 0;
    for &cut in cuts.iter().chain([&rows.len()]) {
        out.extend(encoder.push(&rows[from..cut]).expect("a chunk encodes"));
        from = cut;
    }
    out.extend(encoder.finish().expect("the file ends"));
    out
}

#[test]
fn text_encoded_in_chunks_is_byte_identical_to_the_whole_part_compressed_or_not() {
    let (rows, known) = wide_fixture();
    // Cut between window starts (the wide layout needs a start's rows in one chunk).
    let cuts: Vec<usize> = (1..rows.len())
        .filter(|&i| rows[i].start != rows[i - 1].start)
        .collect();
    assert!(!cuts.is_empty(), "the fixture spans several window starts");
    for format in [Format::Ndjson, Format::JsonSeq, Format::Csv] {
        for layout in [Layout::Long, Layout::Wide] {
            for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
                let encoding = Encoding {
                    format,
                    layout,
                    compression,
                };
                let whole = encode(encoding, &part(&rows, &known)).expect("encodes");
                let chunked = encode_chunked(encoding, &rows, &known, &cuts);
                assert_eq!(
                    chunked, whole,
                    "{format:?} {layout:?} {compression:?}: the same bytes however chunked"
                );
            }
        }
    }
}

#[test]
fn parquet_in_chunks_writes_a_row_group_per_chunk_with_every_row() {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let (rows, known) = wide_fixture();
    let cuts: Vec<usize> = (1..rows.len())
        .filter(|&i| rows[i].start != rows[i - 1].start)
        .collect();
    for layout in [Layout::Long, Layout::Wide] {
        let encoding = Encoding {
            format: Format::Parquet,
            layout,
            compression: Compression::Zstd,
        };
        let whole = encode(encoding, &part(&rows, &known)).expect("encodes");
        let chunked = encode_chunked(encoding, &rows, &known, &cuts);
        assert_eq!(
            chunked,
            encode_chunked(encoding, &rows, &known, &cuts),
            "{layout:?}: the same chunks give the same bytes"
        );
        let read = |bytes: Vec<u8>| {
            let reader = SerializedFileReader::new(bytes::Bytes::from(bytes)).expect("reads");
            let groups = reader.metadata().num_row_groups();
            let text: Vec<String> = reader
                .get_row_iter(None)
                .expect("rows")
                .map(|r| r.expect("row").to_string())
                .collect();
            (groups, text)
        };
        let (one_group, whole_rows) = read(whole);
        let (groups, chunked_rows) = read(chunked);
        assert_eq!(one_group, 1);
        assert_eq!(groups, cuts.len() + 1, "{layout:?}: a row group per chunk");
        assert_eq!(
            chunked_rows, whole_rows,
            "{layout:?}: the same rows and values"
        );
    }
}

#[test]
fn a_wide_row_of_a_series_with_no_column_is_an_error_not_a_lost_value() {
    let (rows, _) = wide_fixture();
    let encoding = Encoding {
        format: Format::Csv,
        layout: Layout::Wide,
        compression: Compression::None,
    };
    let mut encoder = super::Encoder::new(encoding, "pi-1", &[]).expect("an encoder");
    let err = encoder
        .push(&rows)
        .expect_err("no column for the rows' series");
    assert!(err.ends_with("has no column in this file"), "{err}");
}

#[test]
fn a_parquet_row_group_is_built_a_column_at_a_time() {
    // A chunk of one window of 10,000 series, as a drain of hourly partitions reads it.
    let rows: Vec<WindowRow> = (0..10_000)
        .map(|i| WindowRow {
            series: series(&format!("hw.t{i}"), Some("celsius"), &[]),
            start: 1_767_225_600,
            seconds: 60,
            stats: stats(60, f64::from(i) / 7.0),
        })
        .collect();
    let encoding = Encoding {
        format: Format::Parquet,
        layout: Layout::Long,
        compression: Compression::Zstd,
    };
    let mut encoder = super::Encoder::new(encoding, "pi-1", &[]).expect("an encoder");
    let (bytes, peak) =
        crate::heap_tests::peak_of(|| encoder.push(&rows).expect("the chunk encodes"));
    assert!(!bytes.is_empty(), "a row group was written");
    // All sixteen columns built before the row group was written: 4.1 MB here (debug
    // build); one at a time: 1.5 MB.
    assert!(
        peak < 1_800_000,
        "encoding 10,000 rows held up to {peak} bytes beside them"
    );
}
