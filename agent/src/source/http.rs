//! `kind = "http"`: polls a JSON API.
//!
//! Two shapes: an object whose fields are taken by JSON pointer, or a table — a header
//! of column names and rows of positional values, as PurpleAir's `data.json` returns —
//! where a key column makes one series per row. `null` (a channel the device lacks) and
//! NaN or ±Inf (as numeric strings) make no sample and are counted (`nulls`,
//! `not_finite`); anything else that is not a number is counted as invalid.
//!
//! The headers and the query may carry an API key, so by default a redirect is followed
//! only when it stays on the scheme, host and port of `url` (see [`Redirects`]), and no
//! request carries a `Referer`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::{Batch, Series, Source, SourceError, Stamp, parse_timestamp};
use crate::config::{self, JsonField, Redirects, TableConfig};

/// The largest response body read; a larger one is an error, not an allocation.
const MAX_BODY: usize = 8 * 1024 * 1024;

pub struct HttpSource {
    name: String,
    client: reqwest::Client,
    url: reqwest::Url,
    query: Vec<(String, String)>,
    headers: reqwest::header::HeaderMap,
    fields: Vec<(JsonField, Arc<Series>)>,
    timestamp: Option<String>,
    table: Option<TableConfig>,
    /// Series of table rows by (key value, column), made once.
    table_series: HashMap<(String, usize), Arc<Series>>,
    /// The most series the table may make.
    max_series: u32,
}

impl HttpSource {
    pub fn new(
        name: &str,
        config: &config::HttpSource,
        timeout: Duration,
    ) -> Result<HttpSource, SourceError> {
        let fail = |reason: String| SourceError::Http { reason };
        let url =
            reqwest::Url::parse(&config.url).map_err(|err| fail(format!("invalid url: {err}")))?;
        let mut headers = reqwest::header::HeaderMap::new();
        let given = config.headers.iter().map(|(k, v)| (k, v.expose()));
        let from_files = config
            .header_files
            .iter()
            .map(|(k, f)| (k, f.secret.expose()));
        for (key, value) in given.chain(from_files) {
            let name = reqwest::header::HeaderName::from_bytes(key.as_bytes())
                .map_err(|_| fail(format!("invalid header name {key:?}")))?;
            let mut value = reqwest::header::HeaderValue::from_str(value).map_err(|_| {
                fail(format!(
                    "header {key:?} has a value that is not valid in HTTP"
                ))
            })?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("edgespool/", env!("CARGO_PKG_VERSION")))
            // Design: a Referer would carry the URL, query and key included, to wherever
            // the server sends us.
            .referer(false)
            .redirect(redirect_policy(config.redirects, url.clone()))
            .build()
            .map_err(|err| fail(err.without_url().to_string()))?;
        let fields = config
            .fields
            .iter()
            .map(|f| {
                let series = Series::new(format!("{name}.{}", f.name), f.unit.as_deref());
                (f.clone(), Arc::new(series))
            })
            .collect();
        Ok(HttpSource {
            name: name.to_owned(),
            client,
            url,
            query: config
                .query
                .iter()
                .map(|(k, v)| (k.clone(), v.expose().to_owned()))
                .collect(),
            headers,
            fields,
            timestamp: config.timestamp.clone(),
            table: config.table.clone(),
            table_series: HashMap::new(),
            max_series: config.max_series.get(),
        })
    }

    async fn fetch(&self) -> Result<Value, SourceError> {
        // Design: errors are stripped of their URL, which may carry an API key in its query.
        let fail = |err: reqwest::Error| SourceError::Http {
            reason: match refusal(&err) {
                Some(refused) => refused.to_string(),
                None => crate::with_causes(&err.without_url()),
            },
        };
        let mut response = self
            .client
            .get(self.url.clone())
            .query(&self.query)
            .headers(self.headers.clone())
            .send()
            .await
            .map_err(fail)?;
        let status = response.status();
        if !status.is_success() {
            return Err(SourceError::Http {
                reason: format!("server answered {status}"),
            });
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(fail)? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(SourceError::Parse {
                    reason: format!("response body exceeds {MAX_BODY} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|err| SourceError::Parse {
            reason: format!("response is not valid JSON: {err}"),
        })
    }
}

#[async_trait::async_trait]
impl Source for HttpSource {
    async fn sample(&mut self, batch: &mut Batch) -> Result<(), SourceError> {
        let doc = self.fetch().await?;
        self.read(&doc, batch)
    }
}

impl HttpSource {
    /// Turns a response into samples.
    pub(crate) fn read(&mut self, doc: &Value, batch: &mut Batch) -> Result<(), SourceError> {
        let received = batch.now_ms;
        let stamp = match &self.timestamp {
            Some(pointer) => event_time(doc, pointer, received, batch),
            None => Stamp::Own(received),
        };
        for (field, series) in &self.fields {
            match doc.pointer(&field.pointer) {
                None => batch.invalid.push(format!("no value at {}", field.pointer)),
                Some(value) => {
                    if let Some(x) = number(value, &field.pointer, batch) {
                        batch.push(series, stamp, x * field.scale + field.offset);
                    }
                }
            }
        }
        if let Some(table) = &self.table {
            let series = TableSeries {
                cache: &mut self.table_series,
                max: self.max_series,
            };
            read_table(&self.name, table, doc, series, batch)?;
        }
        Ok(())
    }
}

/// Why a redirect was not followed. The URLs shown have no user, query or fragment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RedirectRefused {
    #[error("redirect to {to} refused: it leaves {origin} (set redirects = \"any\" to follow it)")]
    OtherOrigin { to: String, origin: String },
    #[error("redirect to {to} refused: the source has redirects = \"none\"")]
    NotFollowed { to: String },
    #[error("more than {max} redirects in a row")]
    TooMany { max: usize },
}

/// Whether to follow a redirect from `configured` (the source's `url`) to `next` after
/// `followed` redirects.
pub(crate) fn judge_redirect(
    mode: Redirects,
    configured: &reqwest::Url,
    next: &reqwest::Url,
    followed: usize,
) -> Result<(), RedirectRefused> {
    match mode {
        Redirects::None => Err(RedirectRefused::NotFollowed { to: shown(next) }),
        _ if followed >= Redirects::MAX => Err(RedirectRefused::TooMany {
            max: Redirects::MAX,
        }),
        Redirects::SameOrigin if next.origin() != configured.origin() => {
            Err(RedirectRefused::OtherOrigin {
                to: shown(next),
                origin: configured.origin().ascii_serialization(),
            })
        }
        Redirects::SameOrigin | Redirects::Any => Ok(()),
    }
}

fn redirect_policy(mode: Redirects, configured: reqwest::Url) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        // `previous` starts with the first request, which was no redirect.
        let followed = attempt.previous().len().saturating_sub(1);
        match judge_redirect(mode, &configured, attempt.url(), followed) {
            Ok(()) => attempt.follow(),
            Err(refused) => attempt.error(refused),
        }
    })
}

/// A URL as an error may show it: scheme, host, port and path.
fn shown(url: &reqwest::Url) -> String {
    let mut url = url.clone();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.set_fragment(None);
    url.to_string()
}

/// The refusal inside an error of a request, if a redirect was refused.
fn refusal(err: &reqwest::Error) -> Option<&RedirectRefused> {
    let mut cause = std::error::Error::source(err);
    while let Some(inner) = cause {
        if let Some(refused) = inner.downcast_ref::<RedirectRefused>() {
            return Some(refused);
        }
        cause = inner.source();
    }
    None
}

/// The sample time a pointer gives, or the receive time (counted invalid) when it is bad.
pub(super) fn event_time(doc: &Value, pointer: &str, received: i64, batch: &mut Batch) -> Stamp {
    match doc.pointer(pointer).map(parse_timestamp) {
        Some(Ok(ms)) => Stamp::Device(ms),
        Some(Err(why)) => {
            batch
                .invalid
                .push(format!("{why}; using the time received"));
            Stamp::Own(received)
        }
        None => {
            batch.invalid.push(format!(
                "no timestamp at {pointer}; using the time received"
            ));
            Stamp::Own(received)
        }
    }
}

/// A JSON number (or numeric string) as f64; `null` is counted in `batch.nulls`,
/// anything else that is no number is invalid. (NaN and ±Inf are counted as the sample
/// is pushed.)
pub(super) fn number(value: &Value, place: &str, batch: &mut Batch) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::Null => {
            batch.nulls += 1;
            None
        }
        Value::String(s) => match s.trim().parse::<f64>() {
            Ok(x) => Some(x),
            Err(_) => {
                batch
                    .invalid
                    .push(format!("{place} holds {s:?}, not a number"));
                None
            }
        },
        other => {
            batch
                .invalid
                .push(format!("{place} holds {other}, not a number"));
            None
        }
    }
}

/// The series a table has made, and how many it may make.
struct TableSeries<'a> {
    cache: &'a mut HashMap<(String, usize), Arc<Series>>,
    max: u32,
}

fn read_table(
    source: &str,
    table: &TableConfig,
    doc: &Value,
    series: TableSeries<'_>,
    batch: &mut Batch,
) -> Result<(), SourceError> {
    let TableSeries { cache, max } = series;
    let parse = |reason: String| SourceError::Parse { reason };
    let header = doc
        .pointer(&table.fields_pointer)
        .and_then(Value::as_array)
        .ok_or_else(|| {
            parse(format!(
                "no array of column names at {}",
                table.fields_pointer
            ))
        })?;
    let column = |name: &str| {
        header
            .iter()
            .position(|h| h.as_str() == Some(name))
            .ok_or_else(|| {
                parse(format!(
                    "column {name:?} is not in the header at {}",
                    table.fields_pointer
                ))
            })
    };
    let key_at = column(&table.key)?;
    let columns: Vec<usize> = table
        .columns
        .iter()
        .map(|c| column(c))
        .collect::<Result<_, _>>()?;
    let time_at = table.timestamp_column.as_deref().map(column).transpose()?;
    let rows = doc
        .pointer(&table.rows_pointer)
        .and_then(Value::as_array)
        .ok_or_else(|| parse(format!("no array of rows at {}", table.rows_pointer)))?;
    let tag = table.key.to_ascii_lowercase();

    for (index, row) in rows.iter().enumerate() {
        let Some(cells) = row.as_array() else {
            batch.invalid.push(format!("row {index} is not an array"));
            continue;
        };
        let key = match cells.get(key_at) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            other => {
                let shown = other.map_or("nothing".to_owned(), Value::to_string);
                batch.invalid.push(format!(
                    "row {index} has {shown} in key column {:?}",
                    table.key
                ));
                continue;
            }
        };
        let stamp = match time_at.and_then(|at| cells.get(at)) {
            None => Stamp::Own(batch.now_ms),
            Some(value) => match parse_timestamp(value) {
                Ok(ms) => Stamp::Device(ms),
                Err(why) => {
                    batch
                        .invalid
                        .push(format!("row {key}: {why}; using the time received"));
                    Stamp::Own(batch.now_ms)
                }
            },
        };
        for (&at, name) in columns.iter().zip(&table.columns) {
            let Some(cell) = cells.get(at) else {
                batch
                    .invalid
                    .push(format!("row {key} is shorter than the header"));
                break;
            };
            let place = format!("row {key} column {name:?}");
            let Some(x) = number(cell, &place, batch) else {
                continue;
            };
            let id = (key.clone(), at);
            if cache.len() >= max as usize && !cache.contains_key(&id) {
                batch.refuse(max, || format!("{source}.{key}.{name}"));
                continue;
            }
            let series = cache.entry(id).or_insert_with(|| {
                let mut series = Series::new(
                    format!("{source}.{key}.{name}"),
                    table.units.get(name).map(String::as_str),
                );
                series.tags.insert(tag.clone(), key.clone());
                series.shared()
            });
            batch.push(series, stamp, x);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PURPLEAIR: &str = include_str!("../../testdata/purpleair-table.json");

    fn table() -> TableConfig {
        TableConfig {
            fields_pointer: "/fields".into(),
            rows_pointer: "/data".into(),
            key: "ID".into(),
            columns: vec!["pm".into(), "Temperature".into(), "Voc".into()],
            units: [("pm".to_owned(), "ug/m3".to_owned())].into(),
            timestamp_column: None,
        }
    }

    #[test]
    fn a_purpleair_table_makes_one_series_per_sensor_and_column() {
        let doc: Value = serde_json::from_str(PURPLEAIR).expect("sample is JSON");
        let mut batch = Batch {
            now_ms: 1000,
            ..Batch::default()
        };
        read_table(
            "pa",
            &table(),
            &doc,
            unlimited(&mut HashMap::new()),
            &mut batch,
        )
        .expect("table reads");
        let got: Vec<(String, f64)> = batch
            .samples
            .iter()
            .map(|s| (s.series.name.clone(), s.value))
            .collect();
        assert_eq!(
            got,
            vec![
                ("pa.44071.pm".to_owned(), 0.7),
                ("pa.44071.Temperature".to_owned(), 79.0),
                ("pa.59873.pm".to_owned(), 88.9),
                ("pa.59873.Temperature".to_owned(), 88.0),
            ]
        );
        assert_eq!(batch.samples[0].series.tags["id"], "44071");
        assert_eq!(batch.samples[0].series.unit.as_deref(), Some("ug/m3"));
        assert!(
            batch.invalid.is_empty(),
            "null Voc is a missing channel: {:?}",
            batch.invalid
        );
        assert_eq!(
            (batch.nulls, batch.not_finite),
            (2, 0),
            "the null Voc cells"
        );
    }

    #[test]
    fn null_nan_and_infinity_make_no_sample_and_are_counted_alike() {
        let text = "[agent]\nspool = \"/x.db\"\n[[sources]]\nkind = \"http\"\nname = \"h\"\nurl = \"http://127.0.0.1/\"\n[[sources.fields]]\nname = \"a\"\npointer = \"/a\"\n[[sources.fields]]\nname = \"b\"\npointer = \"/b\"\n[[sources.fields]]\nname = \"c\"\npointer = \"/c\"\n[[sources.fields]]\nname = \"d\"\npointer = \"/d\"\n[[sources.fields]]\nname = \"e\"\npointer = \"/e\"\nscale = 1e300\n[[sinks]]\nkind = \"local\"\npath = \"/x\"\n";
        let config =
            crate::config::Config::parse(text, std::path::Path::new("t.toml")).expect("valid");
        let crate::config::SourceKind::Http(http) = &config.sources[0].kind else {
            panic!("an http source");
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut source = HttpSource::new("h", http, Duration::from_secs(1)).expect("a source");
        let doc = serde_json::json!({"a": null, "b": "NaN", "c": "-inf", "d": 4.5, "e": 1e10});
        let mut batch = Batch::default();
        source.read(&doc, &mut batch).expect("reads");
        let got: Vec<(&str, f64)> = batch
            .samples
            .iter()
            .map(|s| (s.series.name.as_str(), s.value))
            .collect();
        assert_eq!(got, [("h.d", 4.5)]);
        // e: 1e10 scaled by 1e300 is infinite.
        assert_eq!((batch.nulls, batch.not_finite), (1, 3));
        assert!(batch.invalid.is_empty(), "{:?}", batch.invalid);
    }

    fn unlimited(cache: &mut HashMap<(String, usize), Arc<Series>>) -> TableSeries<'_> {
        TableSeries {
            cache,
            max: u32::MAX,
        }
    }

    #[test]
    fn rows_beyond_max_series_are_dropped_and_counted_but_known_series_go_on() {
        let doc: Value = serde_json::from_str(PURPLEAIR).expect("sample is JSON");
        let mut cache = HashMap::new();
        let mut batch = Batch::default();
        let limited = |cache| TableSeries { cache, max: 3 };
        read_table("pa", &table(), &doc, limited(&mut cache), &mut batch).expect("reads");
        let limited = |cache| TableSeries { cache, max: 3 };
        let names: Vec<&str> = batch
            .samples
            .iter()
            .map(|s| s.series.name.as_str())
            .collect();
        assert_eq!(
            names,
            ["pa.44071.pm", "pa.44071.Temperature", "pa.59873.pm"]
        );
        assert_eq!(batch.series_dropped, 1);
        assert_eq!(
            batch.series_refused.as_deref(),
            Some("max_series (3) reached: pa.59873.Temperature and other new series are not made")
        );
        // The next response: the three known series are sampled again, the fourth not.
        let mut batch = Batch::default();
        read_table("pa", &table(), &doc, limited(&mut cache), &mut batch).expect("reads");
        assert_eq!((batch.samples.len(), batch.series_dropped), (3, 1));
    }

    #[test]
    fn a_missing_column_is_a_clear_error() {
        let doc: Value = serde_json::from_str(PURPLEAIR).expect("sample is JSON");
        let mut config = table();
        config.columns.push("pm25_cf1".into());
        let err = read_table(
            "pa",
            &config,
            &doc,
            unlimited(&mut HashMap::new()),
            &mut Batch::default(),
        )
        .expect_err("unknown column");
        assert_eq!(
            err.to_string(),
            "column \"pm25_cf1\" is not in the header at /fields"
        );
    }

    fn url(text: &str) -> reqwest::Url {
        reqwest::Url::parse(text).expect("a valid URL")
    }

    #[test]
    fn a_redirect_elsewhere_is_refused_without_showing_the_query() {
        let configured = url("http://127.0.0.1:8080/data.json?api_key=s3cret");
        let judge = |mode, next: &str, followed| {
            judge_redirect(mode, &configured, &url(next), followed).map_err(|e| e.to_string())
        };
        assert_eq!(
            judge(
                Redirects::SameOrigin,
                "http://127.0.0.2:8080/x?api_key=s3cret",
                0
            ),
            Err(
                "redirect to http://127.0.0.2:8080/x refused: it leaves http://127.0.0.1:8080 \
                 (set redirects = \"any\" to follow it)"
                    .to_owned()
            )
        );
        // Another port, another scheme, a user in the URL: all leave the origin.
        for next in [
            "http://127.0.0.1:8081/data.json",
            "https://127.0.0.1:8080/data.json",
            "http://user:pw@evil.example/",
        ] {
            let refused = judge(Redirects::SameOrigin, next, 0).expect_err(next);
            assert!(
                !refused.contains("pw") && !refused.contains("s3cret"),
                "{refused}"
            );
        }
        assert_eq!(
            judge(Redirects::SameOrigin, "http://127.0.0.1:8080/v2/data", 0),
            Ok(())
        );
        assert_eq!(
            judge(Redirects::SameOrigin, "http://127.0.0.1:8080/v2/data", 5),
            Err("more than 5 redirects in a row".to_owned())
        );
        assert_eq!(judge(Redirects::Any, "http://127.0.0.2:9/", 4), Ok(()));
        assert_eq!(
            judge(Redirects::None, "http://127.0.0.1:8080/v2?k=s3cret", 0),
            Err(
                "redirect to http://127.0.0.1:8080/v2 refused: the source has redirects = \"none\""
                    .to_owned()
            )
        );
    }

    #[test]
    fn the_purpleair_glitch_is_not_json() {
        let glitch = r#"{"fields":["ID"],"data":[],[44071]]}"#;
        let err = serde_json::from_str::<Value>(glitch).expect_err("broken");
        assert!(
            err.to_string()
                .contains("key must be a string at line 1 column 28"),
            "{err}"
        );
    }
}
