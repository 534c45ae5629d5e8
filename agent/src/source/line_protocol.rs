//! InfluxDB line protocol, as Telegraf, ESPHome, Tasmota and the InfluxDB client
//! libraries write it: `measurement[,tag=value…] field=value[,field=value…] [timestamp]`.
//!
//! - Pure: a line in, a [`Point`] or the reason it is no point out; no I/O, no series.
//! - Escapes: `\,`, `\ ` and `\=` in the measurement, tag keys, tag values and field
//!   keys (`\\` is a backslash); `\"` and `\\` inside a string field. A backslash
//!   before any other character is kept as it is, as InfluxDB does.
//! - Field values: floats (`1`, `-1.5e3`), integers (`1i`), unsigned (`1u`), booleans
//!   (`t`, `T`, `true`, `True`, `TRUE` and the same for false) and strings (`"…"`).
//! - The timestamp is an integer in the request's [`Precision`], floored to the
//!   millisecond (towards the past: -1 ns is -1 ms).

use std::borrow::Cow;

/// The unit of the timestamps of a request (`precision=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Nanoseconds, the default.
    Nanoseconds,
    /// Microseconds.
    Microseconds,
    /// Milliseconds.
    Milliseconds,
    /// Seconds.
    Seconds,
    /// Minutes (InfluxDB 1).
    Minutes,
    /// Hours (InfluxDB 1).
    Hours,
}

impl Precision {
    /// Reads a `precision` query value: InfluxDB 2's `ns`, `us`, `ms`, `s` and
    /// InfluxDB 1's `n`, `u`, `µ`, `ms`, `s`, `m`, `h`.
    pub fn parse(text: &str) -> Result<Precision, String> {
        Ok(match text {
            "ns" | "n" => Precision::Nanoseconds,
            "us" | "u" | "µ" | "µs" => Precision::Microseconds,
            "ms" => Precision::Milliseconds,
            "s" => Precision::Seconds,
            "m" => Precision::Minutes,
            "h" => Precision::Hours,
            other => {
                return Err(format!(
                    "precision {other:?} is not one of ns, us, ms, s (InfluxDB 1 also n, u, m, h)"
                ));
            }
        })
    }

    /// A timestamp of this precision in Unix milliseconds, floored; `None` when it does
    /// not fit.
    pub fn to_ms(self, timestamp: i64) -> Option<i64> {
        match self {
            Precision::Nanoseconds => Some(timestamp.div_euclid(1_000_000)),
            Precision::Microseconds => Some(timestamp.div_euclid(1_000)),
            Precision::Milliseconds => Some(timestamp),
            Precision::Seconds => timestamp.checked_mul(1_000),
            Precision::Minutes => timestamp.checked_mul(60_000),
            Precision::Hours => timestamp.checked_mul(3_600_000),
        }
    }
}

/// The value of one field.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FieldValue {
    /// A float (no suffix).
    Float(f64),
    /// A signed integer (`i`).
    Integer(i64),
    /// An unsigned integer (`u`).
    Unsigned(u64),
    /// A boolean.
    Boolean(bool),
    /// A string: its text is not kept (edgespool records numbers).
    String,
}

/// One parsed line.
#[derive(Debug, Clone, PartialEq)]
pub struct Point<'a> {
    /// The measurement and the tags as written (escaped): what names the series apart
    /// from the field, without unescaping anything.
    pub key: &'a str,
    /// The measurement, unescaped.
    pub measurement: Cow<'a, str>,
    /// The tags, unescaped, in the order written.
    pub tags: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// The fields, unescaped keys, in the order written.
    pub fields: Vec<(Cow<'a, str>, FieldValue)>,
    /// The timestamp as written, in the request's precision.
    pub timestamp: Option<i64>,
}

/// Whether a line holds no point: empty, blank or a `#` comment.
pub fn is_blank(line: &str) -> bool {
    let line = line.trim_start();
    line.is_empty() || line.starts_with('#')
}

/// Parses one line (without its newline).
pub fn parse_line(line: &str) -> Result<Point<'_>, String> {
    let line = line.trim_end_matches(['\r', ' ', '\t']);
    let line = line.trim_start_matches([' ', '\t']);
    let bytes = line.as_bytes();
    // The series key: up to the first unescaped space.
    let key_end = find_unescaped(bytes, 0, b" ").unwrap_or(bytes.len());
    let key = &line[..key_end];
    let measurement_end = find_unescaped(bytes, 0, b",").filter(|&at| at < key_end);
    let measurement = &line[..measurement_end.unwrap_or(key_end)];
    if measurement.is_empty() {
        return Err("the measurement is missing".to_owned());
    }
    let mut tags = Vec::new();
    if let Some(at) = measurement_end {
        for pair in split_unescaped(&line[at + 1..key_end], b',') {
            let Some(eq) = find_unescaped(pair.as_bytes(), 0, b"=") else {
                return Err(format!("tag {:?} has no `=value`", clip(pair)));
            };
            let (k, v) = (&pair[..eq], &pair[eq + 1..]);
            if k.is_empty() || v.is_empty() {
                return Err(format!("tag {:?} has an empty key or value", clip(pair)));
            }
            tags.push((unescape(k), unescape(v)));
        }
    }
    let mut at = key_end;
    while at < bytes.len() && bytes[at] == b' ' {
        at += 1;
    }
    if at >= bytes.len() {
        return Err("no fields: a line needs at least one field=value".to_owned());
    }
    let mut fields = Vec::new();
    loop {
        let Some(eq) = find_unescaped(bytes, at, b"= ,") else {
            return Err(format!("field {:?} has no `=value`", clip(&line[at..])));
        };
        if bytes[eq] != b'=' {
            return Err(format!("field {:?} has no `=value`", clip(&line[at..eq])));
        }
        let name = &line[at..eq];
        if name.is_empty() {
            return Err("a field key is empty".to_owned());
        }
        let value_start = eq + 1;
        let (value, end) = if bytes.get(value_start) == Some(&b'"') {
            let close = string_end(bytes, value_start + 1)
                .ok_or_else(|| format!("field {:?}: the string is not closed", clip(name)))?;
            (FieldValue::String, close + 1)
        } else {
            let end = find_unescaped(bytes, value_start, b", ").unwrap_or(bytes.len());
            let text = &line[value_start..end];
            (
                field_value(text).map_err(|why| format!("field {:?}: {why}", clip(name)))?,
                end,
            )
        };
        fields.push((unescape(name), value));
        match bytes.get(end) {
            None => {
                at = end;
                break;
            }
            Some(b',') => at = end + 1,
            Some(b' ') => {
                at = end;
                break;
            }
            Some(_) => {
                return Err(format!(
                    "field {:?}: unexpected text after the value",
                    clip(name)
                ));
            }
        }
    }
    let rest = line[at..].trim_start_matches(' ');
    let timestamp = if rest.is_empty() {
        None
    } else {
        Some(
            rest.parse::<i64>()
                .map_err(|_| format!("timestamp {:?} is not an integer", clip(rest)))?,
        )
    };
    Ok(Point {
        key,
        measurement: unescape(measurement),
        tags,
        fields,
        timestamp,
    })
}

/// A field's value that is not a string.
fn field_value(text: &str) -> Result<FieldValue, String> {
    if text.is_empty() {
        return Err("the value is missing".to_owned());
    }
    let bad = || format!("{:?} is not a number, boolean or string", clip(text));
    match text {
        "t" | "T" | "true" | "True" | "TRUE" => return Ok(FieldValue::Boolean(true)),
        "f" | "F" | "false" | "False" | "FALSE" => return Ok(FieldValue::Boolean(false)),
        _ => {}
    }
    if let Some(digits) = text.strip_suffix('i') {
        return digits
            .parse::<i64>()
            .map(FieldValue::Integer)
            .map_err(|_| format!("{:?} is not a 64-bit integer", clip(text)));
    }
    if let Some(digits) = text.strip_suffix('u') {
        return digits
            .parse::<u64>()
            .map(FieldValue::Unsigned)
            .map_err(|_| format!("{:?} is not a 64-bit unsigned integer", clip(text)));
    }
    // Design: Rust also reads "inf" and "NaN"; line protocol has no such floats.
    if !text
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'))
    {
        return Err(bad());
    }
    text.parse::<f64>()
        .map(FieldValue::Float)
        .map_err(|_| bad())
}

/// The first of `stops` at or after `from` that no backslash escapes.
fn find_unescaped(bytes: &[u8], from: usize, stops: &[u8]) -> Option<usize> {
    let mut i = from;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\\' {
            i += 2;
            continue;
        }
        if stops.contains(&b) {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// The closing quote of a string field whose text starts at `from`.
fn string_end(bytes: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

fn split_unescaped(text: &str, sep: u8) -> impl Iterator<Item = &str> {
    let bytes = text.as_bytes();
    let mut start = 0;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        match find_unescaped(bytes, start, &[sep]) {
            Some(at) => {
                let part = &text[start..at];
                start = at + 1;
                Some(part)
            }
            None => {
                done = true;
                Some(&text[start..])
            }
        }
    })
}

/// A key, tag value or measurement without its escapes.
fn unescape(text: &str) -> Cow<'_, str> {
    if !text.contains('\\') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(next @ (',' | ' ' | '=' | '\\')) => out.push(next),
                Some(other) => {
                    out.push('\\');
                    out.push(other);
                }
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// The first 40 characters of a text an error quotes.
fn clip(text: &str) -> Cow<'_, str> {
    match text.char_indices().nth(40) {
        Some((at, _)) => Cow::Owned(format!("{}…", &text[..at])),
        None => Cow::Borrowed(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(line: &str) -> Vec<(String, FieldValue)> {
        parse_line(line)
            .expect("a valid line")
            .fields
            .into_iter()
            .map(|(k, v)| (k.into_owned(), v))
            .collect()
    }

    #[test]
    fn a_telegraf_line_has_its_measurement_tags_fields_and_time() {
        let p =
            parse_line("cpu,host=pi4,cpu=cpu0 usage_idle=98.5,usage_user=1.25 1700000000123456789")
                .expect("valid");
        assert_eq!(p.key, "cpu,host=pi4,cpu=cpu0");
        assert_eq!(p.measurement, "cpu");
        assert_eq!(
            p.tags,
            vec![("host".into(), "pi4".into()), ("cpu".into(), "cpu0".into())]
        );
        assert_eq!(
            p.fields,
            vec![
                ("usage_idle".into(), FieldValue::Float(98.5)),
                ("usage_user".into(), FieldValue::Float(1.25))
            ]
        );
        assert_eq!(p.timestamp, Some(1_700_000_000_123_456_789));
        let bare = parse_line("spo2 value=97").expect("valid");
        assert_eq!((bare.key, bare.timestamp), ("spo2", None));
        assert!(bare.tags.is_empty());
    }

    #[test]
    fn escapes_in_names_tags_and_strings() {
        let p = parse_line(
            r#"my\ room\,2,loc\=x=a\ b\,c\=d t\ 1=21.5,note="say \"hi\", a\\b=c",x\=y=1i"#,
        )
        .expect("valid");
        assert_eq!(p.measurement, "my room,2");
        assert_eq!(p.tags, vec![("loc=x".into(), "a b,c=d".into())]);
        assert_eq!(
            p.fields,
            vec![
                ("t 1".into(), FieldValue::Float(21.5)),
                ("note".into(), FieldValue::String),
                ("x=y".into(), FieldValue::Integer(1)),
            ]
        );
        // `=` needs no escape in a measurement; other backslashes stay.
        let p = parse_line(r"a=b\d v=1").expect("valid");
        assert_eq!(p.measurement, r"a=b\d");
        // A string with spaces, commas and an equals sign, then a timestamp.
        let p = parse_line(r#"m s="a b,c=d",v=2 5"#).expect("valid");
        assert_eq!(p.fields.len(), 2);
        assert_eq!(p.timestamp, Some(5));
    }

    #[test]
    fn field_types_read_as_numbers_booleans_and_strings() {
        assert_eq!(
            fields("m a=1,b=-1.5e3,c=-7i,d=18446744073709551615u,e=t,f=FALSE,g=\"x\",h=True"),
            vec![
                ("a".into(), FieldValue::Float(1.0)),
                ("b".into(), FieldValue::Float(-1500.0)),
                ("c".into(), FieldValue::Integer(-7)),
                ("d".into(), FieldValue::Unsigned(u64::MAX)),
                ("e".into(), FieldValue::Boolean(true)),
                ("f".into(), FieldValue::Boolean(false)),
                ("g".into(), FieldValue::String),
                ("h".into(), FieldValue::Boolean(true)),
            ]
        );
    }

    #[test]
    fn bad_lines_say_why() {
        let cases = [
            ("cpu", "no fields: a line needs at least one field=value"),
            ("cpu ", "no fields: a line needs at least one field=value"),
            (",t=1 v=1", "the measurement is missing"),
            ("cpu,host value=1", "tag \"host\" has no `=value`"),
            (
                "cpu,host= value=1",
                "tag \"host=\" has an empty key or value",
            ),
            ("cpu value", "field \"value\" has no `=value`"),
            ("cpu value=", "field \"value\": the value is missing"),
            (
                "cpu value=abc",
                "field \"value\": \"abc\" is not a number, boolean or string",
            ),
            (
                "cpu value=NaN",
                "field \"value\": \"NaN\" is not a number, boolean or string",
            ),
            (
                "cpu value=1.5i",
                "field \"value\": \"1.5i\" is not a 64-bit integer",
            ),
            (
                "cpu value=-1u",
                "field \"value\": \"-1u\" is not a 64-bit unsigned integer",
            ),
            ("cpu s=\"open", "field \"s\": the string is not closed"),
            ("cpu v=1 12:00", "timestamp \"12:00\" is not an integer"),
            ("cpu v=1 1 2", "timestamp \"1 2\" is not an integer"),
            ("cpu =1", "a field key is empty"),
            (
                "cpu s=\"a\"x",
                "field \"s\": unexpected text after the value",
            ),
        ];
        for (line, why) in cases {
            assert_eq!(parse_line(line), Err(why.to_owned()), "{line:?}");
        }
    }

    #[test]
    fn blank_lines_and_comments_hold_no_point() {
        assert!(is_blank(""));
        assert!(is_blank("   "));
        assert!(is_blank("# a comment"));
        assert!(!is_blank("m v=1"));
        // A carriage return (Windows line ends) is not part of the timestamp.
        assert_eq!(parse_line("m v=1 7\r").expect("valid").timestamp, Some(7));
    }

    /// A name or tag value escaped as a writer escapes it.
    fn escaped(text: &str, measurement: bool) -> String {
        let mut out = String::new();
        for c in text.chars() {
            if c == ',' || c == ' ' || (c == '=' && !measurement) {
                out.push('\\');
            }
            out.push(c);
        }
        out
    }

    proptest::proptest! {
        #[test]
        fn any_text_is_a_point_or_a_reason_never_a_panic(line in "\\PC{0,60}") {
            let _ = parse_line(&line);
        }

        #[test]
        fn escaped_names_and_values_read_back_as_written(
            measurement in "[a-z][a-z ,=é]{0,7}",
            tag in "[a-z][a-z ,=]{0,5}",
            value in "[a-z0-9 ,=]{1,6}",
            field in "[a-z][a-z ,=]{0,5}",
            x in -1e9f64..1e9,
            text in "[a-z ,=\"\\\\]{0,8}",
            timestamp in proptest::option::of(proptest::num::i64::ANY),
        ) {
            let string = text.replace('\\', "\\\\").replace('"', "\\\"");
            let mut line = format!(
                "{},{}={} {}={x:?},s=\"{string}\"",
                escaped(&measurement, true),
                escaped(&tag, false),
                escaped(&value, false),
                escaped(&field, false),
            );
            if let Some(t) = timestamp {
                line.push_str(&format!(" {t}"));
            }
            let point = parse_line(&line).map_err(|why| {
                proptest::test_runner::TestCaseError::fail(format!("{line:?}: {why}"))
            })?;
            proptest::prop_assert_eq!(point.measurement.as_ref(), measurement.as_str());
            proptest::prop_assert_eq!(
                point.tags,
                vec![(Cow::Owned(tag), Cow::Owned(value))]
            );
            proptest::prop_assert_eq!(
                point.fields,
                vec![
                    (Cow::Owned(field), FieldValue::Float(x)),
                    (Cow::Borrowed("s"), FieldValue::String)
                ]
            );
            proptest::prop_assert_eq!(point.timestamp, timestamp);
        }
    }

    #[test]
    fn precision_floors_timestamps_to_the_millisecond() {
        let p = |text| Precision::parse(text).expect("a precision");
        assert_eq!(
            p("ns").to_ms(1_700_000_000_123_999_999),
            Some(1_700_000_000_123)
        );
        assert_eq!(p("n").to_ms(-1), Some(-1), "-1 ns is in the ms before 0");
        assert_eq!(
            p("us").to_ms(1_700_000_000_123_999),
            Some(1_700_000_000_123)
        );
        assert_eq!(p("u").to_ms(-1_001), Some(-2));
        assert_eq!(p("ms").to_ms(1_700_000_000_123), Some(1_700_000_000_123));
        assert_eq!(p("s").to_ms(1_700_000_000), Some(1_700_000_000_000));
        assert_eq!(p("m").to_ms(2), Some(120_000));
        assert_eq!(p("h").to_ms(1), Some(3_600_000));
        assert_eq!(p("s").to_ms(i64::MAX), None);
        assert_eq!(
            Precision::parse("sec"),
            Err(
                "precision \"sec\" is not one of ns, us, ms, s (InfluxDB 1 also n, u, m, h)".into()
            )
        );
    }
}
