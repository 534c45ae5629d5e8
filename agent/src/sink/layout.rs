//! Object keys: Hive-style partitions from the window's own time, never the upload time.
//!
//! `{prefix}/device={id}/year=YYYY/month=MM/day=DD/hour=HH/{id}-{YYYYMMDDTHHMM}-part-{NNNN}.{ext}`

use chrono::{DateTime, Datelike, Timelike, Utc};

/// The key of part `part` of the partition starting at `partition` (Unix seconds).
pub fn object_key(
    prefix: &str,
    device: &str,
    partition: i64,
    part: u32,
    extension: &str,
) -> String {
    let t = DateTime::<Utc>::from_timestamp(partition, 0).unwrap_or_default();
    let prefix = prefix.trim_matches('/');
    let lead = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    format!(
        "{lead}device={device}/year={:04}/month={:02}/day={:02}/hour={:02}/{device}-{:04}{:02}{:02}T{:02}{:02}-part-{part:04}.{extension}",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
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
            object_key("", "pi-1", start, 0, "ndjson"),
            "device=pi-1/year=2026/month=12/day=31/hour=23/pi-1-20261231T2300-part-0000.ndjson"
        );
    }

    #[test]
    fn the_first_second_of_a_year_opens_the_next() {
        assert_eq!(
            object_key(
                "lake/raw/",
                "pi-1",
                at("2027-01-01T00:00:00Z"),
                12,
                "json-seq"
            ),
            "lake/raw/device=pi-1/year=2027/month=01/day=01/hour=00/pi-1-20270101T0000-part-0012.json-seq"
        );
    }

    #[test]
    fn month_and_day_edges_are_zero_padded() {
        assert_eq!(
            object_key("", "d", at("2026-02-28T23:00:00Z"), 0, "ndjson"),
            "device=d/year=2026/month=02/day=28/hour=23/d-20260228T2300-part-0000.ndjson"
        );
        assert_eq!(
            object_key("", "d", at("2026-03-01T00:00:00Z"), 0, "ndjson"),
            "device=d/year=2026/month=03/day=01/hour=00/d-20260301T0000-part-0000.ndjson"
        );
        assert_eq!(
            object_key("", "d", at("2026-11-23T09:07:00Z"), 1, "ndjson"),
            "device=d/year=2026/month=11/day=23/hour=09/d-20261123T0907-part-0001.ndjson"
        );
    }
}
