//! Object keys: Hive-style partitions from the window's own time, never the upload time.
//!
//! `{prefix}/device={id}/year=2026/month=1/day=5/hour=9/{id}-{YYYYMMDDTHHMM}-part-{NNNN}.{ext}`
//!
//! Design: the partition folders are plain integers by default (`keys = "unpadded"`), so
//! that readers that infer a partition column's type from the folder names (DuckDB,
//! pyarrow, polars, Spark) infer an integer on every date; a zero-padded `hour=09`
//! makes DuckDB infer text. `keys = "padded"` keeps the earlier `month=01/…/hour=09`
//! for lakes that already hold it. The file name stays zero-padded in both: it is no
//! column, and it sorts.

use chrono::{DateTime, Datelike, Timelike, Utc};

use crate::config::Keys;

/// The key of part `part` of the partition starting at `partition` (Unix seconds).
pub fn object_key(
    prefix: &str,
    device: &str,
    partition: i64,
    part: u32,
    extension: &str,
    keys: Keys,
) -> String {
    let t = DateTime::<Utc>::from_timestamp(partition, 0).unwrap_or_default();
    let prefix = prefix.trim_matches('/');
    let lead = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    let (year, month, day, hour) = (t.year(), t.month(), t.day(), t.hour());
    let folders = match keys {
        Keys::Unpadded => format!("year={year}/month={month}/day={day}/hour={hour}"),
        Keys::Padded => format!("year={year:04}/month={month:02}/day={day:02}/hour={hour:02}"),
    };
    format!(
        "{lead}device={device}/{folders}/{device}-{year:04}{month:02}{day:02}T{hour:02}{:02}-part-{part:04}.{extension}",
        t.minute(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rfc3339: &str) -> i64 {
        DateTime::parse_from_rfc3339(rfc3339)
            .expect("valid time")
            .timestamp()
    }

    #[test]
    fn the_last_second_of_a_year_stays_in_that_year() {
        let start = at("2026-12-31T23:59:59Z") / 3600 * 3600;
        assert_eq!(
            object_key("", "pi-1", start, 0, "ndjson", Keys::Unpadded),
            "device=pi-1/year=2026/month=12/day=31/hour=23/pi-1-20261231T2300-part-0000.ndjson"
        );
    }

    #[test]
    fn the_first_second_of_a_year_opens_the_next() {
        let start = at("2027-01-01T00:00:00Z");
        assert_eq!(
            object_key("lake/raw/", "pi-1", start, 12, "json-seq", Keys::Unpadded),
            "lake/raw/device=pi-1/year=2027/month=1/day=1/hour=0/pi-1-20270101T0000-part-0012.json-seq"
        );
        assert_eq!(
            object_key("lake/raw/", "pi-1", start, 12, "json-seq", Keys::Padded),
            "lake/raw/device=pi-1/year=2027/month=01/day=01/hour=00/pi-1-20270101T0000-part-0012.json-seq"
        );
    }

    #[test]
    fn partition_folders_are_plain_integers_and_the_file_name_stays_padded() {
        assert_eq!(
            object_key(
                "",
                "d",
                at("2026-02-28T23:00:00Z"),
                0,
                "ndjson",
                Keys::Unpadded
            ),
            "device=d/year=2026/month=2/day=28/hour=23/d-20260228T2300-part-0000.ndjson"
        );
        assert_eq!(
            object_key(
                "",
                "d",
                at("2026-11-23T09:07:00Z"),
                1,
                "ndjson.gz",
                Keys::Unpadded
            ),
            "device=d/year=2026/month=11/day=23/hour=9/d-20261123T0907-part-0001.ndjson.gz"
        );
    }

    #[test]
    fn padded_keys_zero_pad_month_day_and_hour() {
        assert_eq!(
            object_key(
                "",
                "d",
                at("2026-03-01T00:00:00Z"),
                0,
                "ndjson",
                Keys::Padded
            ),
            "device=d/year=2026/month=03/day=01/hour=00/d-20260301T0000-part-0000.ndjson"
        );
        assert_eq!(
            object_key(
                "",
                "d",
                at("2026-11-23T09:07:00Z"),
                1,
                "ndjson",
                Keys::Padded
            ),
            "device=d/year=2026/month=11/day=23/hour=09/d-20261123T0907-part-0001.ndjson"
        );
    }
}
