//! CSV, in the long and the wide layout.
//! (The module is named `csv`; the crate is spelled `::csv`.)

use std::collections::HashMap;

use crate::clock;
use crate::flow::{Series, WindowRow};

use super::{LONG_COLUMNS, STATS, WideColumns, stat, wide_rows};

fn csv_writer() -> ::csv::Writer<Vec<u8>> {
    ::csv::WriterBuilder::new()
        .terminator(::csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new())
}

/// The long layout's header line.
pub(super) fn long_header() -> Result<Vec<u8>, String> {
    let mut w = csv_writer();
    w.write_record(LONG_COLUMNS).map_err(|e| e.to_string())?;
    csv_finish(w)
}

fn csv_finish(writer: ::csv::Writer<Vec<u8>>) -> Result<Vec<u8>, String> {
    writer.into_inner().map_err(|e| e.to_string())
}

fn number(buffer: &mut ryu::Buffer, value: Option<f64>) -> &str {
    match value {
        Some(v) => buffer.format_finite(v),
        None => "",
    }
}

/// Long-layout rows as CSV lines, without the header; an empty field is a missing value,
/// and no tags are an empty field. Tags and window times are formatted once per series
/// and per window, not per row.
pub(super) fn long_csv_rows(rows: &[WindowRow]) -> Result<Vec<u8>, ::csv::Error> {
    let mut w = ::csv::WriterBuilder::new()
        .terminator(::csv::Terminator::Any(b'\n'))
        .from_writer(Vec::with_capacity(rows.len() * 160));
    let mut tags: HashMap<&Series, String> = HashMap::new();
    let mut window: Option<(i64, String, String)> = None;
    let mut floats: [ryu::Buffer; 7] = std::array::from_fn(|_| ryu::Buffer::new());
    let mut count = itoa::Buffer::new();
    for row in rows {
        let s = &row.stats;
        let tags = tags.entry(row.series.as_ref()).or_insert_with(|| {
            if row.series.tags.is_empty() {
                String::new()
            } else {
                serde_json::to_string(&row.series.tags).unwrap_or_else(|_| "{}".to_owned())
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
        w.write_record([
            row.series.name.as_str(),
            row.series.unit.as_deref().unwrap_or(""),
            tags.as_str(),
            start.as_str(),
            end.as_str(),
            count.format(s.count),
            f1.format_finite(s.min),
            f2.format_finite(s.max),
            f3.format_finite(s.mean),
            s.stdev.map_or("", |v| f4.format_finite(v)),
            f5.format_finite(s.median),
            f6.format_finite(s.first),
            f7.format_finite(s.last),
            &clock::rfc3339_ms(s.first_ms),
            &clock::rfc3339_ms(s.last_ms),
        ])?;
    }
    w.into_inner().map_err(|e| e.into_error().into())
}

/// The wide layout's header line.
pub(super) fn wide_header(columns: &WideColumns) -> Result<Vec<u8>, String> {
    let mut w = csv_writer();
    let mut header = vec!["window_start".to_owned(), "window_end".to_owned()];
    for stem in &columns.stems {
        header.extend(STATS.iter().map(|stat| format!("{stat}_{stem}")));
    }
    w.write_record(&header).map_err(|e| e.to_string())?;
    csv_finish(w)
}

/// The wide layout's lines of these rows (whole window starts).
pub(super) fn wide_rows_csv(columns: &WideColumns, rows: &[WindowRow]) -> Result<Vec<u8>, String> {
    let mut w = csv_writer();
    let mut record: Vec<String> = Vec::with_capacity(2 + columns.series.len() * STATS.len());
    let mut buffer = ryu::Buffer::new();
    for (start, end, cells) in wide_rows(columns, rows)? {
        record.clear();
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
