//! A batch's rows in `COPY … (FORMAT binary)`: what the server stores, as it stores it.
//!
//! Design: the text format makes the server parse two timestamps, eight floats and the
//! integers of every row (and the agent format them); in the binary format each value
//! goes as the bytes of its type's wire form, and the server checks and copies them:
//! `float8` as the IEEE 754 double in network order (NaN and ±infinity included, as
//! they are), `timestamptz` as microseconds since 2000-01-01 UTC, `int4`/`int8` in
//! network order, `text` as UTF-8, `jsonb` as its version byte (1) and the JSON text
//! (the server still parses that, once per row; "{}" for a series without tags). A
//! missing value (no unit, no standard deviation of a single sample) is a field of
//! length -1: NULL.
//!
//! The layout (PostgreSQL's documentation of COPY, "Binary Format"): the signature
//! `PGCOPY\n\377\r\n\0`, a flags word and a header-extension length (both 0); per row
//! the field count (int16) and each field as its length (int32) and bytes; the trailer,
//! a field count of -1. Every column of the table is checked by name and type before a
//! load (`ensure_table`), which the binary format needs: the server reads each field
//! as the column's type.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use crate::flow::{Series, WindowRow};

/// The file header: the signature, flags 0, no header extension.
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// Seconds from the Unix epoch to PostgreSQL's, 2000-01-01 00:00:00 UTC.
const PG_EPOCH_SECONDS: i64 = 946_684_800;

/// The fields of a row: the table's columns but `loaded_at` (its default).
pub const FIELDS: i16 = 17;

/// How much is encoded before it is sent: what a load holds of it at once.
pub const PIECE_BYTES: usize = 128 * 1024;

/// Rows in COPY's binary format, made as they come: a window that appears twice in a
/// row (a window and its late rows, both spooled before the part was planned) is merged
/// into one row, and the bytes go out in pieces of about [`PIECE_BYTES`].
pub struct CopyBinary<'a> {
    device: &'a str,
    /// The row being merged with those that follow for the same window.
    pending: Option<WindowRow>,
    /// Encoded bytes not sent yet.
    out: BytesMut,
    /// Each tagged series' `jsonb` field (version byte and JSON), made once per series:
    /// by the address of its `Arc` (the spool reader shares one per series), which the
    /// entry holds so that no other series can take it.
    tags: HashMap<usize, (Arc<Series>, Vec<u8>)>,
    /// Rows encoded (merged rows once).
    rows: usize,
}

impl<'a> CopyBinary<'a> {
    /// An encoder whose first piece starts with the header.
    pub fn new(device: &'a str) -> CopyBinary<'a> {
        let mut out = BytesMut::with_capacity(PIECE_BYTES + 4096);
        out.put_slice(HEADER);
        CopyBinary {
            device,
            pending: None,
            out,
            tags: HashMap::new(),
            rows: 0,
        }
    }

    /// Rows encoded so far (a merged window counts once).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Takes the next row (rows come ordered by window start and series); returns bytes
    /// to send once a piece's worth is ready.
    pub fn push(&mut self, row: &WindowRow) -> Option<Bytes> {
        match &mut self.pending {
            Some(last) if last.start == row.start && last.series == row.series => {
                last.stats = last.stats.merge(&row.stats);
                return None;
            }
            pending => {
                if let Some(done) = pending.replace(row.clone()) {
                    self.encode(&done);
                }
            }
        }
        (self.out.len() >= PIECE_BYTES).then(|| self.out.split().freeze())
    }

    /// Ends a part: its last row is encoded (the next part's rows are of another
    /// partition, never of the same window).
    pub fn end_part(&mut self) {
        if let Some(done) = self.pending.take() {
            self.encode(&done);
        }
    }

    /// The rest of the bytes, with the trailer.
    pub fn finish(mut self) -> Bytes {
        self.end_part();
        self.out.put_i16(-1);
        self.out.split().freeze()
    }

    fn encode(&mut self, row: &WindowRow) {
        let s = &row.stats;
        let out = &mut self.out;
        out.put_i16(FIELDS);
        text(out, self.device);
        text(out, &row.series.name);
        match &row.series.unit {
            Some(unit) => text(out, unit),
            None => out.put_i32(-1),
        }
        if row.series.tags.is_empty() {
            out.put_i32(3);
            out.put_slice(b"\x01{}");
        } else {
            let key = Arc::as_ptr(&row.series) as usize;
            let (_, field) = self.tags.entry(key).or_insert_with(|| {
                let mut field = vec![1u8];
                // A map of strings always serialises.
                field.extend(
                    serde_json::to_vec(&row.series.tags).unwrap_or_else(|_| b"{}".to_vec()),
                );
                (Arc::clone(&row.series), field)
            });
            out.put_i32(field.len() as i32);
            out.put_slice(field);
        }
        timestamp(
            out,
            row.start
                .saturating_sub(PG_EPOCH_SECONDS)
                .saturating_mul(1_000_000),
        );
        out.put_i32(4);
        out.put_u32(row.seconds);
        out.put_i32(8);
        out.put_i64(i64::try_from(s.count).unwrap_or(i64::MAX));
        float(out, s.min);
        float(out, s.max);
        float(out, s.mean);
        match s.stdev {
            Some(v) => float(out, v),
            None => out.put_i32(-1),
        }
        float(out, s.median);
        float(out, s.first);
        float(out, s.last);
        let micros = |ms: i64| {
            ms.saturating_sub(PG_EPOCH_SECONDS * 1000)
                .saturating_mul(1000)
        };
        timestamp(out, micros(s.first_ms));
        timestamp(out, micros(s.last_ms));
        float(out, s.mean_rest);
        self.rows += 1;
    }
}

fn text(out: &mut BytesMut, value: &str) {
    out.put_i32(value.len() as i32);
    out.put_slice(value.as_bytes());
}

fn float(out: &mut BytesMut, value: f64) {
    out.put_i32(8);
    out.put_f64(value);
}

fn timestamp(out: &mut BytesMut, micros: i64) {
    out.put_i32(8);
    out.put_i64(micros);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::Stats;

    /// A field as the test reads it back.
    #[derive(Debug, PartialEq)]
    enum Field {
        Null,
        Bytes(Vec<u8>),
    }

    /// Reads COPY's binary format back: the rows' fields, checking header and trailer.
    fn decode(bytes: &[u8]) -> Vec<Vec<Field>> {
        assert_eq!(&bytes[..HEADER.len()], HEADER, "the header");
        let mut at = HEADER.len();
        let mut take = |n: usize| {
            let slice = &bytes[at..at + n];
            at += n;
            slice.to_vec()
        };
        let mut rows = Vec::new();
        loop {
            let count = i16::from_be_bytes(take(2).try_into().expect("2 bytes"));
            if count == -1 {
                break;
            }
            assert_eq!(count, FIELDS);
            let row = (0..count)
                .map(|_| {
                    let len = i32::from_be_bytes(take(4).try_into().expect("4 bytes"));
                    if len < 0 {
                        Field::Null
                    } else {
                        Field::Bytes(take(len as usize))
                    }
                })
                .collect();
            rows.push(row);
        }
        assert_eq!(at, bytes.len(), "nothing after the trailer");
        rows
    }

    fn f64_of(field: &Field) -> f64 {
        match field {
            Field::Bytes(b) => f64::from_be_bytes(b.as_slice().try_into().expect("8 bytes")),
            Field::Null => panic!("NULL"),
        }
    }

    fn i64_of(field: &Field) -> i64 {
        match field {
            Field::Bytes(b) => i64::from_be_bytes(b.as_slice().try_into().expect("8 bytes")),
            Field::Null => panic!("NULL"),
        }
    }

    fn encode_all(device: &str, rows: &[WindowRow]) -> Vec<u8> {
        let mut copy = CopyBinary::new(device);
        let mut out = Vec::new();
        for row in rows {
            if let Some(piece) = copy.push(row) {
                out.extend_from_slice(&piece);
            }
        }
        out.extend_from_slice(&copy.finish());
        out
    }

    fn row(series: &Arc<Series>, start: i64, value: f64, ms: i64) -> WindowRow {
        WindowRow {
            series: Arc::clone(series),
            start,
            seconds: 60,
            stats: Stats::single_at(value, ms),
        }
    }

    #[test]
    fn every_column_goes_in_its_types_wire_form_with_nulls_and_non_finite_values_as_they_are() {
        let mut tagged = Series::new("hw.t", Some("°C"));
        tagged
            .tags
            .insert("room".to_owned(), "k\"itchen".to_owned());
        let tagged = Arc::new(tagged);
        let plain = Arc::new(Series::new("hw.p", None));
        let mut stats = Stats::single_at(f64::NAN, 1_767_323_045_123);
        stats.min = f64::NEG_INFINITY;
        stats.max = f64::INFINITY;
        stats.mean_rest = -0.0;
        stats.count = 3;
        stats.stdev = Some(5e-324);
        let rows = vec![
            WindowRow {
                series: Arc::clone(&tagged),
                start: 1_767_323_040,
                seconds: 60,
                stats,
            },
            row(&plain, 946_684_799, 2.5, 946_684_799_999),
        ];
        let decoded = decode(&encode_all("pi-1", &rows));
        assert_eq!(decoded.len(), 2);
        let [a, b] = [&decoded[0], &decoded[1]];
        assert_eq!(a[0], Field::Bytes(b"pi-1".to_vec()));
        assert_eq!(a[1], Field::Bytes(b"hw.t".to_vec()));
        assert_eq!(a[2], Field::Bytes("°C".as_bytes().to_vec()));
        assert_eq!(
            a[3],
            Field::Bytes(b"\x01{\"room\":\"k\\\"itchen\"}".to_vec())
        );
        // 2026-01-02 03:04:00 UTC.
        assert_eq!(i64_of(&a[4]), (1_767_323_040 - 946_684_800) * 1_000_000);
        assert_eq!(a[5], Field::Bytes(60u32.to_be_bytes().to_vec()));
        assert_eq!(i64_of(&a[6]), 3);
        assert_eq!(f64_of(&a[7]), f64::NEG_INFINITY);
        assert_eq!(f64_of(&a[8]), f64::INFINITY);
        assert!(f64_of(&a[9]).is_nan());
        assert_eq!(f64_of(&a[10]), 5e-324, "a subnormal, exactly");
        assert_eq!(
            i64_of(&a[14]),
            (1_767_323_045_123 - 946_684_800_000) * 1000,
            "milliseconds kept"
        );
        assert_eq!(f64_of(&a[16]).to_bits(), (-0.0f64).to_bits());
        assert_eq!(b[2], Field::Null, "no unit");
        assert_eq!(b[3], Field::Bytes(b"\x01{}".to_vec()), "no tags");
        assert_eq!(b[10], Field::Null, "no standard deviation of one sample");
        assert_eq!(i64_of(&b[4]), -1_000_000, "a second before 2000");
        assert_eq!(i64_of(&b[14]), -1000);
        assert_eq!(f64_of(&b[12]), 2.5);
    }

    #[test]
    fn a_window_twice_in_one_part_is_loaded_as_one_row() {
        let s = Arc::new(Series::new("hw.t", None));
        // The late row (spooled second) is earlier in time: it holds `first`.
        let rows = vec![
            row(&s, 0, 1.0, 30_000),
            row(&s, 0, 3.0, 10_000),
            row(&s, 60, 5.0, 60_000),
        ];
        let decoded = decode(&encode_all("pi", &rows));
        assert_eq!(decoded.len(), 2);
        let merged = &decoded[0];
        assert_eq!(i64_of(&merged[6]), 2, "count");
        assert_eq!(
            [7, 8, 9, 11, 12, 13].map(|i| f64_of(&merged[i])),
            [1.0, 3.0, 2.0, 2.0, 3.0, 1.0],
            "min, max, mean, median, first, last"
        );
        assert_eq!(f64_of(&merged[10]), 2f64.sqrt());
        assert_eq!(i64_of(&decoded[1][6]), 1);
    }

    #[test]
    fn a_large_batch_goes_out_in_bounded_pieces() {
        let series: Vec<Arc<Series>> = (0..100)
            .map(|i| Arc::new(Series::new(format!("hw.sensor_{i}"), None)))
            .collect();
        // A day of 100 series: 144,000 rows.
        let rows: Vec<WindowRow> = (0..1440)
            .flat_map(|w| {
                series
                    .iter()
                    .map(move |s| row(s, w * 60, w as f64, w * 60_000 + 1))
            })
            .collect();
        let mut copy = CopyBinary::new("pi");
        let mut pieces = Vec::new();
        for row in &rows {
            pieces.extend(copy.push(row));
        }
        assert_eq!(
            copy.rows() + 1,
            rows.len(),
            "the last row waits for a merge"
        );
        pieces.push(copy.finish());
        let largest = pieces.iter().map(Bytes::len).max().expect("some bytes");
        assert!(largest < PIECE_BYTES + 512, "a piece of {largest} bytes");
        assert!(pieces.len() > 100, "{} pieces", pieces.len());
        assert_eq!(decode(&pieces.concat()).len(), rows.len(), "each row once");
    }
}
