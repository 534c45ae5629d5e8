//! A batch's record: the windows of one flush in one partition, as one postcard blob.
//!
//! ```text
//! version 3 (this edgespool):  0x00 0x03 varint(windows) window...
//! version 2:                   0x00 0x02 postcard(Vec<StoredWindow>)
//! version 1 (before):          postcard(Vec<StoredWindowV1>)
//!
//! a version 3 window, varints as postcard's (LEB128; i64 zigzag):
//!   series i64, offset u32, seconds u32, count u64, how u16 (below),
//!   [digits u8: if any statistic is decimal], min, max, median, first, last, mean,
//!   [mean_rest f64], [stdev f64], first_after i64, last_after i64
//! how, from bit 0: min 1 bit, max median first last 2 bits each, mean 1 bit, mean_rest
//!   1 bit, stdev 2 bits; a statistic is written as
//!   0 the same bits as min (min: decimal)  1 decimal: zigzag varint of value × 10^digits
//!   2 an f64, 8 bytes little-endian        (min's own integer; the others' less min's)
//!   (mean: 0 as min, 1 an f64; mean_rest: 0 zero, 1 an f64; stdev: 0 None, 1 zero, 2 an f64)
//! ```
//!
//! A version 1 record starts with the number of its windows, never 0, so a leading 0
//! marks a versioned record. Version 2 adds the times of `first` and `last` (as
//! milliseconds from the window's start) and the mean's rest
//! ([`Stats::mean_rest`]). A version 1 record, written by
//! an earlier edgespool and not yet delivered at the upgrade, reads with both times at
//! the window's start (unknown) and no rest. Version 3 holds the same values bit for bit,
//! written shorter (the spool's writes per flush, docs/benchmarks.md): a statistic equal
//! to the minimum is not repeated (a steady reading: min = max = median = first = last),
//! a reading with few decimals (23.437, from a sensor's integer and its scale) is an
//! integer of a few bytes, and a zero rest or stdev takes no byte. A window of varying
//! readings takes about 45 bytes where version 2 took 76; a steady one about 17.

use serde::{Deserialize, Serialize};

use crate::flow::Stats;

/// The version this edgespool writes.
const VERSION: u8 = 3;

/// One window as a batch stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct StoredWindow {
    /// `series.id`.
    pub(super) series: i64,
    /// Window start minus partition start, seconds.
    pub(super) offset: u32,
    /// Window length, seconds.
    pub(super) seconds: u32,
    /// The aggregates.
    stats: StoredStats,
}

/// [`Stats`] as a version 2 record holds them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StoredStats {
    count: u64,
    min: f64,
    max: f64,
    mean: f64,
    mean_rest: f64,
    stdev: Option<f64>,
    median: f64,
    first: f64,
    /// `first_ms` minus the window's start in ms.
    first_after: i64,
    last: f64,
    /// `last_ms` minus the window's start in ms.
    last_after: i64,
}

/// One window of a version 1 record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct StoredWindowV1 {
    pub(super) series: i64,
    pub(super) offset: u32,
    pub(super) seconds: u32,
    pub(super) stats: StatsV1,
}

/// The statistics of a version 1 record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct StatsV1 {
    pub(super) count: u64,
    pub(super) min: f64,
    pub(super) max: f64,
    pub(super) mean: f64,
    pub(super) stdev: Option<f64>,
    pub(super) median: f64,
    pub(super) first: f64,
    pub(super) last: f64,
}

impl StoredWindow {
    /// A window starting at `start` (Unix seconds) of partition `partition`.
    pub(super) fn new(
        series: i64,
        partition: i64,
        start: i64,
        seconds: u32,
        stats: &Stats,
    ) -> StoredWindow {
        let start_ms = start.saturating_mul(1000);
        StoredWindow {
            series,
            offset: (start - partition) as u32,
            seconds,
            stats: StoredStats {
                count: stats.count,
                min: stats.min,
                max: stats.max,
                mean: stats.mean,
                mean_rest: stats.mean_rest,
                stdev: stats.stdev,
                median: stats.median,
                first: stats.first,
                first_after: stats.first_ms.saturating_sub(start_ms),
                last: stats.last,
                last_after: stats.last_ms.saturating_sub(start_ms),
            },
        }
    }

    /// The statistics, for a window of partition `partition`.
    pub(super) fn stats(&self, partition: i64) -> Stats {
        let start_ms = (partition + i64::from(self.offset)).saturating_mul(1000);
        let s = &self.stats;
        Stats {
            count: s.count,
            min: s.min,
            max: s.max,
            mean: s.mean,
            mean_rest: s.mean_rest,
            stdev: s.stdev,
            median: s.median,
            first: s.first,
            first_ms: start_ms.saturating_add(s.first_after),
            last: s.last,
            last_ms: start_ms.saturating_add(s.last_after),
        }
    }
}

impl From<StoredWindowV1> for StoredWindow {
    fn from(old: StoredWindowV1) -> StoredWindow {
        let s = old.stats;
        StoredWindow {
            series: old.series,
            offset: old.offset,
            seconds: old.seconds,
            stats: StoredStats {
                count: s.count,
                min: s.min,
                max: s.max,
                mean: s.mean,
                mean_rest: 0.0,
                stdev: s.stdev,
                median: s.median,
                first: s.first,
                first_after: 0,
                last: s.last,
                last_after: 0,
            },
        }
    }
}

/// The record of some windows.
pub(super) fn encode(windows: &[StoredWindow]) -> Vec<u8> {
    let mut out = Vec::with_capacity(3 + windows.len() * 48);
    out.extend([0, VERSION]);
    put_varint(&mut out, windows.len() as u64);
    for window in windows {
        encode_window(window, &mut out);
    }
    out
}

/// The windows of a record of any version.
pub(super) fn decode(record: &[u8]) -> Result<Vec<StoredWindow>, String> {
    match record {
        [0, VERSION, rest @ ..] => decode_v3(rest),
        [0, 2, rest @ ..] => postcard::from_bytes(rest).map_err(|e| e.to_string()),
        [0, version, ..] => Err(format!(
            "record version {version} is newer than this edgespool knows ({VERSION})"
        )),
        _ => postcard::from_bytes::<Vec<StoredWindowV1>>(record)
            .map(|old| old.into_iter().map(StoredWindow::from).collect())
            .map_err(|e| e.to_string()),
    }
}

/// Powers of ten a decimal statistic is scaled by (`digits` indexes it).
const TEN_TO: [f64; 10] = [1.0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

/// A decimal integer is used only below this magnitude: its varint stays under 8 bytes.
const DECIMAL_LIMIT: i64 = 1 << 47;

const SAME: u16 = 0;
const DECIMAL: u16 = 1;
const RAW: u16 = 2;
const MEAN_RAW: u16 = 1 << 9;
const REST_BIT: u16 = 1 << 10;
const STDEV_SHIFT: u16 = 11;

/// Where statistic `i` (min, max, median, first, last) is written as `code` in `how`.
fn how_of(i: usize, code: u16) -> u16 {
    match i {
        0 => u16::from(code == RAW),
        _ => code << (2 * i - 1),
    }
}

/// How statistic `i` (min, max, median, first, last, mean) is written, from `how`.
fn code_of(how: u16, i: usize) -> u16 {
    match i {
        0 if how & 1 != 0 => RAW,
        0 => DECIMAL,
        5 if how & MEAN_RAW != 0 => RAW,
        5 => SAME,
        _ => (how >> (2 * i - 1)) & 3,
    }
}

/// `value` as an integer of `digits` decimals, if it reads back with the same bits.
fn decimal(value: f64, digits: usize) -> Option<i64> {
    let scaled = (value * TEN_TO[digits]).round();
    if scaled.is_nan() || scaled.abs() >= DECIMAL_LIMIT as f64 {
        return None;
    }
    let n = scaled as i64;
    (from_decimal(n, digits).to_bits() == value.to_bits()).then_some(n)
}

fn from_decimal(n: i64, digits: usize) -> f64 {
    n as f64 / TEN_TO[digits]
}

fn encode_window(window: &StoredWindow, out: &mut Vec<u8>) {
    let s = &window.stats;
    let values = [s.min, s.max, s.median, s.first, s.last, s.mean];
    // The fewest decimals that write the minimum and most of the others as integers
    // (the mean, a quotient, seldom is one).
    let digits = (0..TEN_TO.len())
        .filter(|&d| decimal(s.min, d).is_some())
        .max_by_key(|&d| {
            let decimals = values[1..5]
                .iter()
                .filter(|v| v.to_bits() != s.min.to_bits() && decimal(**v, d).is_some())
                .count();
            (decimals, std::cmp::Reverse(d))
        });
    let base = digits.and_then(|d| decimal(s.min, d));
    let mut how = 0u16;
    let mut fields: Vec<Field> = Vec::with_capacity(6);
    for (i, value) in values.iter().enumerate() {
        let field = if i > 0 && value.to_bits() == s.min.to_bits() {
            Field::Same
        } else {
            match (digits, base) {
                (Some(d), Some(b)) if i < 5 => match decimal(*value, d) {
                    Some(n) if (n - b).abs() < DECIMAL_LIMIT => {
                        Field::Decimal(if i == 0 { n } else { n - b })
                    }
                    _ => Field::Raw(*value),
                },
                _ => Field::Raw(*value),
            }
        };
        let code = match field {
            Field::Same => SAME,
            Field::Decimal(_) => DECIMAL,
            Field::Raw(_) => RAW,
        };
        how |= match i {
            5 if code == RAW => MEAN_RAW,
            5 => 0,
            _ => how_of(i, code),
        };
        fields.push(field);
    }
    if s.mean_rest.to_bits() != 0 {
        how |= REST_BIT;
    }
    how |= match s.stdev {
        None => 0,
        Some(v) if v.to_bits() == 0 => 1,
        Some(_) => 2,
    } << STDEV_SHIFT;
    put_varint(out, zigzag(window.series));
    put_varint(out, u64::from(window.offset));
    put_varint(out, u64::from(window.seconds));
    put_varint(out, s.count);
    put_varint(out, u64::from(how));
    if let Some(d) = digits.filter(|_| fields.iter().any(|f| matches!(f, Field::Decimal(_)))) {
        out.push(d as u8);
    }
    for field in &fields {
        match field {
            Field::Same => {}
            Field::Decimal(n) => put_varint(out, zigzag(*n)),
            Field::Raw(v) => out.extend(v.to_le_bytes()),
        }
    }
    if s.mean_rest.to_bits() != 0 {
        out.extend(s.mean_rest.to_le_bytes());
    }
    if let Some(v) = s.stdev.filter(|v| v.to_bits() != 0) {
        out.extend(v.to_le_bytes());
    }
    put_varint(out, zigzag(s.first_after));
    put_varint(out, zigzag(s.last_after));
}

/// How one statistic of a version 3 window is written.
enum Field {
    Same,
    Decimal(i64),
    Raw(f64),
}

fn decode_v3(bytes: &[u8]) -> Result<Vec<StoredWindow>, String> {
    let mut input = Input { bytes, at: 0 };
    let count = input.varint()?;
    // Each window takes at least 7 bytes: a count that claims more is damage.
    if count > (bytes.len() / 7) as u64 + 1 {
        return Err(format!(
            "a record of {} bytes cannot hold {count} windows",
            bytes.len()
        ));
    }
    let mut windows = Vec::with_capacity(count as usize);
    for _ in 0..count {
        windows.push(input.window()?);
    }
    if input.at != bytes.len() {
        return Err(format!(
            "{} bytes left over after {count} windows",
            bytes.len() - input.at
        ));
    }
    Ok(windows)
}

/// A version 3 record being read.
struct Input<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Input<'_> {
    fn byte(&mut self) -> Result<u8, String> {
        let b = *self
            .bytes
            .get(self.at)
            .ok_or_else(|| format!("the record ends early, at byte {}", self.at + 2))?;
        self.at += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(format!(
            "a varint longer than 10 bytes at byte {}",
            self.at + 2
        ))
    }

    fn small<T: TryFrom<u64>>(&mut self) -> Result<T, String> {
        let v = self.varint()?;
        T::try_from(v).map_err(|_| format!("{v} is out of range at byte {}", self.at + 2))
    }

    fn f64(&mut self) -> Result<f64, String> {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.byte()?;
        }
        Ok(f64::from_le_bytes(b))
    }

    fn window(&mut self) -> Result<StoredWindow, String> {
        let series = unzigzag(self.varint()?);
        let offset = self.small()?;
        let seconds = self.small()?;
        let count = self.varint()?;
        let how: u16 = self.small()?;
        let code = |i: usize| code_of(how, i);
        let digits = if (0..5).any(|i| code(i) == DECIMAL) {
            let d = usize::from(self.byte()?);
            if d >= TEN_TO.len() {
                return Err(format!("{d} decimals at byte {}", self.at + 2));
            }
            d
        } else {
            0
        };
        let mut values = [0f64; 6];
        let mut base = 0i64;
        for i in 0..6 {
            values[i] = match code(i) {
                SAME if i > 0 => values[0],
                DECIMAL if i < 5 => {
                    let n = unzigzag(self.varint()?);
                    if i == 0 {
                        base = n;
                        from_decimal(n, digits)
                    } else {
                        from_decimal(base.wrapping_add(n), digits)
                    }
                }
                RAW => self.f64()?,
                other => {
                    return Err(format!(
                        "statistic {i} written as {other} at byte {}",
                        self.at + 2
                    ));
                }
            };
        }
        let mean_rest = if how & REST_BIT != 0 {
            self.f64()?
        } else {
            0.0
        };
        let stdev = match (how >> STDEV_SHIFT) & 3 {
            0 => None,
            1 => Some(0.0),
            2 => Some(self.f64()?),
            other => return Err(format!("stdev written as {other} at byte {}", self.at + 2)),
        };
        let first_after = unzigzag(self.varint()?);
        let last_after = unzigzag(self.varint()?);
        let [min, max, median, first, last, mean] = values;
        Ok(StoredWindow {
            series,
            offset,
            seconds,
            stats: StoredStats {
                count,
                min,
                max,
                mean,
                mean_rest,
                stdev,
                median,
                first,
                first_after,
                last,
                last_after,
            },
        })
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> Stats {
        Stats {
            count: 3,
            min: 1.0,
            max: 3.0,
            mean: 1_700_000_000.123,
            mean_rest: 1.5e-8,
            stdev: Some(1.0),
            median: 2.0,
            first: 1.0,
            first_ms: 1_700_000_000_001,
            last: 3.0,
            last_ms: 1_700_000_059_999,
        }
    }

    #[test]
    fn a_record_keeps_the_times_of_first_and_last() {
        let window = StoredWindow::new(7, 1_699_999_200, 1_700_000_000, 60, &stats());
        let bytes = encode(std::slice::from_ref(&window));
        assert_eq!(&bytes[..2], &[0, 3]);
        let back = decode(&bytes).expect("decodes");
        assert_eq!(back, vec![window]);
        let s = back[0].stats(1_699_999_200);
        assert_eq!(
            (s.first_ms, s.last_ms),
            (1_700_000_000_001, 1_700_000_059_999)
        );
        assert_eq!(s.mean_rest, 1.5e-8);
    }

    #[test]
    fn a_record_of_the_previous_version_still_reads() {
        // What edgespool wrote before records had a version: postcard of the old shape.
        let old = vec![StoredWindowV1 {
            series: 3,
            offset: 120,
            seconds: 60,
            stats: StatsV1 {
                count: 2,
                min: 1.0,
                max: 3.0,
                mean: 2.0,
                stdev: Some(std::f64::consts::SQRT_2),
                median: 2.0,
                first: 1.0,
                last: 3.0,
            },
        }];
        let bytes = postcard::to_allocvec(&old).expect("encodes");
        assert_eq!(bytes[0], 1, "the old shape starts with its window count");
        let back = decode(&bytes).expect("an old record decodes");
        assert_eq!(
            (back[0].series, back[0].offset, back[0].seconds),
            (3, 120, 60)
        );
        let s = back[0].stats(3_600);
        assert_eq!((s.count, s.mean, s.first, s.last), (2, 2.0, 1.0, 3.0));
        assert_eq!((s.first_ms, s.last_ms), (3_720_000, 3_720_000));
    }

    #[test]
    fn a_record_of_a_newer_version_is_refused() {
        assert_eq!(
            decode(&[0, 9, 1]),
            Err("record version 9 is newer than this edgespool knows (3)".into())
        );
    }

    #[test]
    fn a_window_takes_at_most_88_bytes() {
        // Large ids and counts, a day-long window, every statistic present, none equal
        // to another and none decimal: one byte more than version 2's 87 (`how`).
        let third = 1.0 / 3.0;
        let mut s = stats();
        s.count = 1 << 40;
        (s.min, s.max, s.median, s.first, s.last) =
            (third, 5.0 * third, 2.0 * third, 4.0 * third, 7.0 * third);
        s.stdev = Some(third);
        s.first_ms = 1_700_000_000_000;
        s.last_ms = 1_700_000_000_000 + 86_399_999;
        let window = StoredWindow::new(1 << 40, 1_699_999_200, 1_700_000_000, 86_400, &s);
        let bytes = encode(std::slice::from_ref(&window));
        // The version (2 bytes), the count of windows (1), the window: 88.
        assert_eq!(bytes.len(), 2 + 1 + 88, "{} bytes", bytes.len());
        assert_eq!(decode(&bytes).expect("decodes"), vec![window]);
    }

    /// A minute of one reading per second: the statistics of `values`.
    fn minute(values: &[f64]) -> Stats {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0);
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let mid = sorted.len() / 2;
        Stats {
            count: values.len() as u64,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            mean,
            mean_rest: 0.0,
            stdev: (values.len() > 1).then(|| var.sqrt()),
            median: (sorted[mid] + sorted[(sorted.len() - 1) / 2]) / 2.0,
            first: values[0],
            first_ms: 1_700_000_000_000,
            last: values[values.len() - 1],
            last_ms: 1_700_000_000_000 + 1000 * (values.len() as i64 - 1),
        }
    }

    #[test]
    fn a_steady_reading_takes_under_a_quarter_of_version_2() {
        // A sysfs file holding 40001 millidegrees, scaled by 0.001, for a minute.
        let mut stats = minute(&[40001.0 * 0.001; 60]);
        // The aggregator's mean of equal readings is exact (its rest carries the error).
        (stats.mean, stats.stdev) = (stats.min, Some(0.0));
        let window = StoredWindow::new(57, 1_699_999_200, 1_700_000_040, 60, &stats);
        let v3 = encode(std::slice::from_ref(&window));
        let v2 = postcard::to_allocvec(std::slice::from_ref(&window)).expect("encodes");
        assert!(
            v3.len() - 3 <= 18,
            "{} bytes (version 2: {})",
            v3.len() - 3,
            v2.len() - 1
        );
        assert_eq!(decode(&v3).expect("decodes"), vec![window]);
    }

    #[test]
    fn a_varying_decimal_reading_takes_three_fifths_of_version_2() {
        let values: Vec<f64> = (0..60)
            .map(|i| f64::from(23_437 + (i * 7919) % 613 - 300) * 0.001)
            .collect();
        let stats = minute(&values);
        let window = StoredWindow::new(57, 1_699_999_200, 1_700_000_040, 60, &stats);
        let v3 = encode(std::slice::from_ref(&window));
        let v2 = postcard::to_allocvec(std::slice::from_ref(&window)).expect("encodes");
        assert!(
            v3.len() - 3 <= 45 && v2.len() > 70,
            "{} bytes (version 2: {})",
            v3.len() - 3,
            v2.len() - 1
        );
        assert_eq!(decode(&v3).expect("decodes"), vec![window]);
    }

    #[test]
    fn every_value_reads_back_with_the_same_bits() {
        let odd = [
            0.0,
            -0.0,
            f64::MIN_POSITIVE / 4.0,
            -1e300,
            1e300,
            1.0 / 3.0,
            40.001,
            40001.0 * 0.001,
            -273.15,
            1_700_000_000.123,
            0.5,
            123_456_789.987_654_3,
            9.999_999_999,
            140_737_488_355_328.0,
        ];
        let mut windows = Vec::new();
        for (i, &a) in odd.iter().enumerate() {
            for &b in &odd {
                let mut s = Stats::single_at(a, 1_700_000_000_000);
                s.max = b;
                s.median = (a + b) / 2.0;
                s.last = b;
                s.mean = b * 0.999;
                s.mean_rest = if i % 2 == 0 { 0.0 } else { 1e-17 * a };
                s.stdev = [None, Some(0.0), Some(-0.0), Some(b)][i % 4];
                s.last_ms = 1_700_000_000_000 - 5;
                windows.push(StoredWindow::new(i as i64 - 3, 0, 3_540, 60, &s));
            }
        }
        let back = decode(&encode(&windows)).expect("decodes");
        assert_eq!(back.len(), windows.len());
        for (a, b) in windows.iter().zip(&back) {
            let (x, y) = (&a.stats, &b.stats);
            let bits = |s: &StoredStats| {
                [
                    s.min,
                    s.max,
                    s.mean,
                    s.mean_rest,
                    s.median,
                    s.first,
                    s.last,
                    s.stdev.unwrap_or(f64::NAN),
                ]
                .map(f64::to_bits)
            };
            assert_eq!(bits(x), bits(y), "{a:?}");
            assert_eq!(
                (
                    a.series,
                    a.offset,
                    x.stdev.is_some(),
                    x.first_after,
                    x.last_after
                ),
                (
                    b.series,
                    b.offset,
                    y.stdev.is_some(),
                    y.first_after,
                    y.last_after
                )
            );
        }
    }

    #[test]
    fn a_record_of_version_2_still_reads() {
        let window = StoredWindow::new(7, 1_699_999_200, 1_700_000_000, 60, &stats());
        let mut bytes = vec![0, 2];
        bytes.extend(postcard::to_allocvec(std::slice::from_ref(&window)).expect("encodes"));
        assert_eq!(decode(&bytes).expect("decodes"), vec![window]);
    }

    #[test]
    fn a_damaged_record_is_an_error_not_a_panic() {
        let windows: Vec<StoredWindow> = (0..5)
            .map(|i| StoredWindow::new(i, 0, 60 * i, 60, &minute(&[1.5, 2.25, 1.0 / 3.0])))
            .collect();
        let bytes = encode(&windows);
        // (A record cut to its first byte reads as an empty version 1 record.)
        for cut in 2..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            decode(&long),
            Err("1 bytes left over after 5 windows".into())
        );
        assert_eq!(
            decode(&[0, 3, 0xff, 0xff, 0x7f]),
            Err("a record of 3 bytes cannot hold 2097151 windows".into())
        );
    }
}
