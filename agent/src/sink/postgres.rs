//! The PostgreSQL sink: each part is loaded in one transaction, exactly once in effect.
//!
//! 1. `INSERT INTO edgespool_loads (…, partition, part)` with `ON CONFLICT DO NOTHING`:
//!    if the row was there already, this part was committed before (the acknowledgement
//!    was lost, or the agent died before recording the delivery) and nothing else is done.
//!    A later part moves its partition's record on to its number (one row per
//!    partition, however many flushes sent parts of it; see `load`).
//! 2. The rows are copied straight into the table: a part of the open partition (the
//!    sink gets each flush's windows, `deliver = "each_flush"`) or a partition's first
//!    part holds windows no earlier load holds. Should one be there (late rows of a
//!    window loaded before, a table fed by an earlier spool), the unique violation rolls
//!    the part back and it goes through staging:
//! 3. `COPY` into a temporary staging table, then `INSERT … SELECT` into the table; a
//!    row whose (device, series, window_start) exists is merged into it.
//! 4. `COMMIT`; only then does the uploader record the delivery in the spool.
//!
//! A connection lost anywhere before the commit (a server restart mid-COPY) rolls the
//! whole part back; the retry loads it whole.
//!
//! Unless `sslmode = "disable"` says plaintext is fine, the password never goes out
//! unencrypted in clear text or as an MD5 hash ([`plaintext`]); SCRAM proves it without
//! sending it and is allowed either way.
//!
//! Creating the tables (and the index on (series, window_start), added to a table made
//! by an earlier edgespool) takes an advisory lock first, so that agents starting together
//! against an empty database do not trip over each other's `CREATE … IF NOT EXISTS`.

mod plaintext;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use tokio::sync::Mutex;
use tokio_postgres::{Client, Config as PgConfig};

use super::encode::{LongCsv, long_csv};
use super::{Delivery, PartReader, Sink, SinkError};
use crate::clock;
use crate::config::{PostgresSink as PgSinkConfig, SslMode};
use crate::flow::WindowRow;
use crate::spool::PartPlan;

/// The table's columns, in order, with their SQL types as `information_schema` names them.
const COLUMNS: [(&str, &str); 18] = [
    ("device", "text"),
    ("series", "text"),
    ("unit", "text"),
    ("tags", "jsonb"),
    ("window_start", "timestamp with time zone"),
    ("window_seconds", "integer"),
    ("count", "bigint"),
    ("min", "double precision"),
    ("max", "double precision"),
    ("mean", "double precision"),
    ("stdev", "double precision"),
    ("median", "double precision"),
    ("first", "double precision"),
    ("last", "double precision"),
    ("first_time", "timestamp with time zone"),
    ("last_time", "timestamp with time zone"),
    ("mean_rest", "double precision"),
    ("loaded_at", "timestamp with time zone"),
];

/// Columns an earlier edgespool's table lacks, added to it under the setup lock.
const ADDED_COLUMNS: [&str; 3] = ["first_time", "last_time", "mean_rest"];

/// The table of loaded parts, beside the data table in the same schema.
const LOADS_TABLE: &str = "edgespool_loads";

pub struct PostgresSink {
    name: String,
    config: PgSinkConfig,
    /// Where, for log lines and errors: never the password.
    location: String,
    client: Mutex<Option<Client>>,
}

/// `host:port/dbname`, from the settings (the URL's password is not part of it).
pub fn location(config: &PgSinkConfig) -> String {
    match pg_config(config) {
        Ok(pg) => {
            let host = match pg.get_hosts().first() {
                Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                #[cfg(unix)]
                Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
                None => "localhost".to_owned(),
            };
            let port = pg.get_ports().first().copied().unwrap_or(5432);
            let db = pg.get_dbname().or(pg.get_user()).unwrap_or("?");
            format!("postgres://{host}:{port}/{db}")
        }
        Err(_) => "postgres (invalid url)".to_owned(),
    }
}

fn pg_config(config: &PgSinkConfig) -> Result<PgConfig, String> {
    let mut pg = match &config.url {
        Some(url) => url
            .expose()
            .parse::<PgConfig>()
            .map_err(|e| format!("invalid url: {}", crate::with_causes(&e)))?,
        None => PgConfig::new(),
    };
    if let Some(host) = &config.host {
        pg.host(host);
    }
    if let Some(port) = config.port {
        pg.port(port);
    }
    if let Some(user) = &config.user {
        pg.user(user);
    }
    if let Some(db) = &config.dbname {
        pg.dbname(db);
    }
    let password = crate::config::one_secret("password", &config.password, &config.password_file)?;
    if let Some(password) = password {
        pg.password(password.expose());
    }
    pg.connect_timeout(config.connect_timeout);
    pg.application_name("edgespool");
    pg.ssl_mode(match config.sslmode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
    });
    Ok(pg)
}

impl PostgresSink {
    /// The sink a configuration entry describes; it connects at the first delivery.
    pub fn new(name: &str, config: &PgSinkConfig) -> PostgresSink {
        PostgresSink {
            name: name.to_owned(),
            config: config.clone(),
            location: location(config),
            client: Mutex::new(None),
        }
    }

    fn table(&self) -> String {
        format!("\"{}\".\"{}\"", self.config.schema, self.config.table)
    }

    fn setup(&self, reason: String) -> SinkError {
        SinkError::Setup {
            sink: self.name.clone(),
            reason: format!("{}: {reason}", self.location),
        }
    }

    async fn connect(&self) -> Result<Client, SinkError> {
        let pg = pg_config(&self.config).map_err(|e| self.setup(e))?;
        let fail = |e: tokio_postgres::Error| self.setup(crate::with_causes(&e));
        let mut client = if self.config.sslmode == SslMode::Disable {
            let (client, connection) = pg.connect(tokio_postgres::NoTls).await.map_err(fail)?;
            tokio::spawn(connection);
            client
        } else {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(
                self.tls_config().map_err(|e| self.setup(e))?,
            );
            plaintext::connect(&pg, tls)
                .await
                .map_err(|e| self.setup(e))?
        };
        let statement_timeout = self.config.connect_timeout.saturating_mul(6);
        client
            .batch_execute(&format!(
                "SET statement_timeout = {}",
                statement_timeout.as_millis()
            ))
            .await
            .map_err(fail)?;
        self.ensure_table(&mut client).await?;
        Ok(client)
    }

    fn tls_config(&self) -> Result<rustls::ClientConfig, String> {
        let builder = rustls::ClientConfig::builder();
        if self.config.sslmode != SslMode::VerifyFull {
            // libpq's "prefer" and "require": encrypted, the certificate not checked.
            return Ok(builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate::new()))
                .with_no_client_auth());
        }
        let roots = crate::ca_roots(self.config.ca_file.as_deref())
            .map_err(|e| format!("sslmode verify-full: {e}"))?;
        Ok(builder.with_root_certificates(roots).with_no_client_auth())
    }

    /// Creates the schema, the table, its index and the loads table when missing; an
    /// existing table of another shape is an error that says what differs.
    async fn ensure_table(&self, client: &mut Client) -> Result<(), SinkError> {
        let fail = |e: tokio_postgres::Error| self.setup(crate::with_causes(&e));
        let (schema, table) = (&self.config.schema, &self.config.table);
        // Design: `CREATE … IF NOT EXISTS` is no lock: two sessions that both see no table
        // both create one, and the second fails on a unique index of the catalog. One
        // advisory lock per schema (the loads table is shared by every table in it),
        // held to the end of this transaction, lets one agent create and the others
        // find what it made.
        let mut tx = client.transaction().await.map_err(fail)?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&setup_lock_key(schema)],
        )
        .await
        .map_err(fail)?;
        let found = tx
            .query(
                "SELECT column_name::text, data_type::text FROM information_schema.columns
                 WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
                &[schema, table],
            )
            .await
            .map_err(fail)?;
        if found.is_empty() {
            let columns: Vec<String> = COLUMNS
                .iter()
                .map(|(name, ty)| {
                    let not_null = match *name {
                        "unit" | "stdev" | "min" | "max" | "mean" | "median" | "first" | "last"
                        | "first_time" | "last_time" | "mean_rest" => "",
                        "tags" => " NOT NULL DEFAULT '{}'",
                        "loaded_at" => " NOT NULL DEFAULT now()",
                        _ => " NOT NULL",
                    };
                    format!("\"{name}\" {ty}{not_null}")
                })
                .collect();
            let mut sql = format!(
                "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
                 CREATE TABLE IF NOT EXISTS {t} ({}, PRIMARY KEY (device, series, window_start));
                 CREATE INDEX IF NOT EXISTS \"{table}_window_start\" ON {t} (window_start);",
                columns.join(", "),
                t = self.table(),
            );
            if self.config.timescaledb {
                sql.push_str(&format!(
                    "SELECT create_hypertable('{t}', 'window_start', if_not_exists => TRUE, migrate_data => TRUE);",
                    t = self.table().replace('\'', "''"),
                ));
            }
            tx.batch_execute(&sql).await.map_err(fail)?;
            tracing::info!(sink = %self.name, table = %self.table(), "created the table");
        } else {
            let found: Vec<(String, String)> = found.iter().map(|r| (r.get(0), r.get(1))).collect();
            let mut differences = Vec::new();
            let mut added = Vec::new();
            for (name, ty) in COLUMNS {
                match found.iter().find(|(n, _)| n == name) {
                    None if ADDED_COLUMNS.contains(&name) => added.push(name),
                    None => differences.push(format!("column {name} is missing")),
                    Some((_, t)) if t != ty => {
                        differences.push(format!("column {name} is {t}, expected {ty}"))
                    }
                    Some(_) => {}
                }
            }
            if !differences.is_empty() {
                return Err(self.setup(format!(
                    "table {schema}.{table} exists with another shape: {}",
                    differences.join("; ")
                )));
            }
            if !added.is_empty() {
                // A table made by an earlier edgespool: its rows keep NULL times.
                let columns: Vec<String> = added
                    .iter()
                    .filter_map(|name| COLUMNS.iter().find(|(n, _)| n == name))
                    .map(|(name, ty)| format!("ADD COLUMN IF NOT EXISTS \"{name}\" {ty}"))
                    .collect();
                tx.batch_execute(&format!(
                    "ALTER TABLE {} {}",
                    self.table(),
                    columns.join(", ")
                ))
                .await
                .map_err(fail)?;
                tracing::info!(sink = %self.name, table = %self.table(), columns = %added.join(", "), "added columns to the table");
            }
        }
        self.ensure_series_index(&mut tx).await?;
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS \"{schema}\".{LOADS_TABLE} (
                     target text NOT NULL,
                     device text NOT NULL,
                     partition_start timestamptz NOT NULL,
                     part integer NOT NULL,
                     rows integer NOT NULL,
                     loaded_at timestamptz NOT NULL DEFAULT now(),
                     PRIMARY KEY (target, device, partition_start, part))"
        ))
        .await
        .map_err(fail)?;
        tx.commit().await.map_err(fail)?;
        Ok(())
    }

    /// Adds the index on (series, window_start) when the table lacks it (a new table, or
    /// one made by an earlier edgespool), under the setup lock. A role that may not
    /// (it does not own the table) logs a warning and loads on without it.
    async fn ensure_series_index(
        &self,
        tx: &mut tokio_postgres::Transaction<'_>,
    ) -> Result<(), SinkError> {
        let fail = |e: tokio_postgres::Error| self.setup(crate::with_causes(&e));
        let (schema, table) = (&self.config.schema, &self.config.table);
        // PostgreSQL cuts names to 63 bytes; the table's name is ASCII (validated).
        let mut index = format!("{table}_series_window_start");
        index.truncate(63);
        let found = tx
            .query_opt(
                "SELECT 1 FROM pg_indexes WHERE schemaname = $1 AND tablename = $2 AND indexname = $3",
                &[schema, table, &index],
            )
            .await
            .map_err(fail)?;
        if found.is_some() {
            return Ok(());
        }
        let savepoint = tx.savepoint("edgespool_index").await.map_err(fail)?;
        let sql = format!(
            "CREATE INDEX IF NOT EXISTS \"{index}\" ON {} (series, window_start)",
            self.table()
        );
        match savepoint.batch_execute(&sql).await {
            Ok(()) => {
                savepoint.commit().await.map_err(fail)?;
                tracing::info!(sink = %self.name, table = %self.table(), index = %index, "added the index on (series, window_start)");
            }
            Err(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) =>
            {
                savepoint.rollback().await.map_err(fail)?;
                tracing::warn!(sink = %self.name, table = %self.table(), error = %crate::with_causes(&e),
                    "cannot add the index on (series, window_start), which queries of one series over all devices need; its owner can: {sql}");
            }
            Err(e) => return Err(fail(e)),
        }
        Ok(())
    }

    /// Loads the parts `source` gives (of distinct partitions, read one at a time) in one
    /// transaction; returns how many had not been loaded before, and how many had rows.
    ///
    /// `direct`: COPY straight into the table, tried first (most parts hold new windows
    /// only); a unique violation (late rows of a window loaded before, a table fed by an
    /// earlier spool) rolls back and the caller loads through staging instead.
    async fn load(
        &self,
        client: &mut Client,
        source: &mut Source<'_, '_>,
        direct: bool,
    ) -> Result<(usize, usize), LoadError> {
        let tx = client.transaction().await?;
        // Design: the spool plans part N only once every earlier part of the sink is
        // recorded delivered (durably: the plan's commit syncs what came before), so no
        // earlier part of this partition is ever sent again. Its record moves on to part
        // N (rows adding up) instead of a row per part: one row per partition however
        // many flushes sent parts of it, and no privilege beyond INSERT and UPDATE. A
        // batch holds one part per partition, so each part's record is its own row.
        // The statements are prepared once per transaction, not once per part.
        let schema = &self.config.schema;
        let move_on = tx
            .prepare(&format!(
                "UPDATE \"{schema}\".{LOADS_TABLE} l
                 SET part = $4, rows = l.rows + $5, loaded_at = now()
                 WHERE l.target = $1 AND l.device = $2
                   AND l.partition_start = to_timestamp($3::bigint)
                   AND l.part = (SELECT max(m.part) FROM \"{schema}\".{LOADS_TABLE} m
                                 WHERE m.target = $1 AND m.device = $2
                                   AND m.partition_start = to_timestamp($3::bigint))
                   AND l.part < $4"
            ))
            .await?;
        let insert = tx
            .prepare(&format!(
                "INSERT INTO \"{schema}\".{LOADS_TABLE} (target, device, partition_start, part, rows)
                 SELECT $1, $2, to_timestamp($3::bigint), $4, $5 WHERE $6
                 ON CONFLICT DO NOTHING"
            ))
            .await?;
        let names: Vec<String> = COLUMNS[..COLUMNS.len() - 1]
            .iter()
            .map(|(n, _)| format!("\"{n}\""))
            .collect();
        let columns = names.join(", ");
        let into = if direct {
            self.table()
        } else {
            "edgespool_staging".to_owned()
        };
        let mut copy_in = None;
        let (mut loaded, mut with_rows) = (0, 0);
        let device = source.device().to_owned();
        while let Some((plan, rows)) = source.next().await.map_err(LoadError::Other)? {
            if rows.is_empty() {
                continue;
            }
            with_rows += 1;
            let key: [&(dyn tokio_postgres::types::ToSql + Sync); 5] = [
                &self.config.table,
                &device,
                &plan.partition,
                &(plan.part as i32),
                &(rows.len() as i32),
            ];
            let moved_on = if plan.part > 0 {
                tx.execute(&move_on, &key).await?
            } else {
                0
            };
            let recorded = moved_on
                + tx.execute(
                    &insert,
                    &[key[0], key[1], key[2], key[3], key[4], &(moved_on == 0)],
                )
                .await?;
            if recorded == 0 {
                continue;
            }
            loaded += 1;
            let statement = match &copy_in {
                Some(statement) => statement,
                None => {
                    if !direct {
                        tx.batch_execute(&format!(
                            "CREATE TEMP TABLE edgespool_staging (LIKE {} INCLUDING DEFAULTS) ON COMMIT DROP",
                            self.table()
                        ))
                        .await?;
                    }
                    copy_in.insert(
                        tx.prepare(&format!(
                            "COPY {into} ({columns}) FROM STDIN WITH (FORMAT csv)"
                        ))
                        .await?,
                    )
                }
            };
            // A COPY per part: the loads record of the next goes between them.
            let copy = tx.copy_in(statement).await?;
            futures_util::pin_mut!(copy);
            let mut text = CopyText::new(&device);
            for row in rows.iter() {
                if let Some(body) = text.push(row)? {
                    copy.send(body).await?;
                }
            }
            if let Some(body) = text.finish()? {
                copy.send(body).await?;
            }
            copy.finish().await?;
        }
        if loaded == 0 {
            tx.commit().await?;
            return Ok((0, with_rows));
        }
        if !direct {
            let (mean, mean_rest, delta) = merge_sql();
            tx.batch_execute(&format!(
                "INSERT INTO {table} AS t ({columns}) SELECT {columns} FROM edgespool_staging
                 ON CONFLICT (device, series, window_start) DO UPDATE SET
                   count = t.count + EXCLUDED.count,
                   min = LEAST(t.min, EXCLUDED.min),
                   max = GREATEST(t.max, EXCLUDED.max),
                   mean = {mean},
                   mean_rest = {mean_rest},
                   stdev = sqrt(GREATEST(0,
                       coalesce(t.stdev, 0) ^ 2 * (t.count - 1)
                       + coalesce(EXCLUDED.stdev, 0) ^ 2 * (EXCLUDED.count - 1)
                       + {delta} ^ 2 * (t.count::float8 * EXCLUDED.count / (t.count + EXCLUDED.count)))
                       / (t.count + EXCLUDED.count - 1)),
                   median = (t.median * t.count + EXCLUDED.median * EXCLUDED.count) / (t.count + EXCLUDED.count),
                   first = CASE WHEN EXCLUDED.first_time < t.first_time THEN EXCLUDED.first ELSE t.first END,
                   first_time = CASE WHEN EXCLUDED.first_time < t.first_time THEN EXCLUDED.first_time ELSE t.first_time END,
                   last = CASE WHEN t.last_time IS NULL OR EXCLUDED.last_time >= t.last_time THEN EXCLUDED.last ELSE t.last END,
                   last_time = CASE WHEN t.last_time IS NULL OR EXCLUDED.last_time >= t.last_time THEN EXCLUDED.last_time ELSE t.last_time END,
                   loaded_at = now()",
                table = self.table(),
            ))
            .await?;
        }
        tx.commit().await?;
        Ok((loaded, with_rows))
    }
}

/// Where a load's parts come from: the spool, one at a time (a batch), or one part at
/// hand.
enum Source<'p, 'd> {
    Spool(&'p mut PartReader<'d>),
    One(&'p Delivery<'d>, &'p [WindowRow], bool),
}

impl Source<'_, '_> {
    fn device(&self) -> &str {
        match self {
            Source::Spool(parts) => parts.device(),
            Source::One(delivery, _, _) => delivery.device,
        }
    }

    fn plans(&self) -> &[PartPlan] {
        match self {
            Source::Spool(parts) => parts.plans(),
            Source::One(delivery, _, _) => std::slice::from_ref(delivery.plan),
        }
    }

    /// The next part and its rows.
    async fn next(&mut self) -> Result<Option<(PartPlan, Cow<'_, [WindowRow]>)>, String> {
        match self {
            Source::Spool(parts) => Ok(parts
                .next()
                .await?
                .map(|(plan, part)| (plan, Cow::Owned(part.rows)))),
            Source::One(delivery, rows, taken) => {
                if std::mem::replace(taken, true) {
                    return Ok(None);
                }
                Ok(Some((delivery.plan.clone(), Cow::Borrowed(*rows))))
            }
        }
    }

    fn rewind(&mut self) {
        match self {
            Source::Spool(parts) => parts.rewind(),
            Source::One(_, _, taken) => *taken = false,
        }
    }
}

/// How much COPY text is encoded before it is sent: what the load holds of it at once.
const COPY_BUFFER: usize = 128 * 1024;

/// How many rows are formatted together (a window's times and a series' tags are
/// formatted once per group).
const COPY_ROWS: usize = 256;

/// A part's rows as COPY text, made as they come: a window that appears twice in a row
/// (a window and its late rows, both spooled before the part was planned) is merged
/// into one row, and the text goes out in pieces of about [`COPY_BUFFER`] bytes.
struct CopyText<'a> {
    device: &'a str,
    /// The row being merged with those that follow for the same window.
    pending: Option<WindowRow>,
    /// Rows ready to format.
    rows: Vec<WindowRow>,
    /// Formatted text not sent yet.
    text: Vec<u8>,
}

impl<'a> CopyText<'a> {
    fn new(device: &'a str) -> CopyText<'a> {
        CopyText {
            device,
            pending: None,
            rows: Vec::with_capacity(COPY_ROWS),
            text: Vec::new(),
        }
    }

    /// Takes the next row (rows come ordered by window start and series); returns text
    /// to send once a buffer's worth is ready.
    fn push(&mut self, row: &WindowRow) -> Result<Option<Bytes>, LoadError> {
        match &mut self.pending {
            Some(last) if last.start == row.start && last.series == row.series => {
                last.stats = last.stats.merge(&row.stats);
                return Ok(None);
            }
            pending => {
                if let Some(done) = pending.replace(row.clone()) {
                    self.rows.push(done);
                }
            }
        }
        if self.rows.len() >= COPY_ROWS {
            self.format()?;
        }
        Ok((self.text.len() >= COPY_BUFFER).then(|| self.take()))
    }

    /// The rest of the text, if any.
    fn finish(mut self) -> Result<Option<Bytes>, LoadError> {
        if let Some(done) = self.pending.take() {
            self.rows.push(done);
        }
        self.format()?;
        Ok((!self.text.is_empty()).then(|| self.take()))
    }

    fn format(&mut self) -> Result<(), LoadError> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let body = long_csv(self.device, &self.rows, LongCsv::Copy)
            .map_err(|e| LoadError::Other(format!("cannot encode: {e}")))?;
        self.rows.clear();
        if self.text.is_empty() {
            self.text = body;
        } else {
            self.text.extend_from_slice(&body);
        }
        Ok(())
    }

    fn take(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.text))
    }
}

/// The merged mean and its rest, and the difference of the two means, in SQL: what
/// [`Stats::merge`](crate::flow::Stats::merge) computes, step by step (PostgreSQL's
/// `float8` is IEEE double, rounded the same way). Each mean is `mean + mean_rest`, the
/// NULL rest of an earlier edgespool's row taken as 0.
fn merge_sql() -> (String, String, String) {
    let delta =
        "((EXCLUDED.mean - t.mean) + (coalesce(EXCLUDED.mean_rest, 0) - coalesce(t.mean_rest, 0)))";
    // two_sum(a, b): the sum, and what its rounding left out.
    let a = "t.mean";
    let b = format!(
        "(coalesce(t.mean_rest, 0) + {delta} * (EXCLUDED.count::float8 / (t.count + EXCLUDED.count)))"
    );
    let sum = format!("({a} + {b})");
    let b_part = format!("({sum} - {a})");
    let rest = format!("(({a} - ({sum} - {b_part})) + ({b} - {b_part}))");
    (sum, rest, delta.to_owned())
}

/// The advisory lock that serialises creating tables in `schema`: the same for every
/// agent of every version (FNV-1a of a fixed prefix and the name), so that they all
/// wait for each other.
fn setup_lock_key(schema: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"edgespool setup\0".iter().chain(schema.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash as i64
}

/// Why a load failed.
#[derive(Debug)]
enum LoadError {
    /// A direct COPY met rows that are there already.
    Conflict,
    /// Anything else, spelled out.
    Other(String),
}

impl From<tokio_postgres::Error> for LoadError {
    fn from(e: tokio_postgres::Error) -> LoadError {
        if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
            LoadError::Conflict
        } else {
            LoadError::Other(crate::with_causes(&e))
        }
    }
}

impl PostgresSink {
    /// Loads what `source` gives in one transaction, through staging if it must.
    async fn load_all(&self, mut source: Source<'_, '_>) -> Result<String, SinkError> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = None;
            *guard = Some(self.connect().await?);
        }
        let client = guard.as_mut().expect("connected above");
        let what = match source.plans() {
            [one] => format!(
                "{} part {} of {}",
                self.table(),
                one.part,
                clock::rfc3339(one.partition)
            ),
            plans => format!(
                "{} {} parts of {} to {}",
                self.table(),
                plans.len(),
                plans
                    .first()
                    .map_or_else(String::new, |p| clock::rfc3339(p.partition)),
                plans
                    .last()
                    .map_or_else(String::new, |p| clock::rfc3339(p.partition))
            ),
        };
        let limit = self.config.connect_timeout.saturating_mul(6) + Duration::from_secs(5);
        let attempt = async {
            match self.load(client, &mut source, true).await {
                Err(LoadError::Conflict) => {
                    source.rewind();
                    self.load(client, &mut source, false).await
                }
                other => other,
            }
        };
        let result = match tokio::time::timeout(limit, attempt).await {
            Ok(Ok(loaded)) => Ok(loaded),
            Ok(Err(LoadError::Conflict)) => Err("rows conflict with the table's".to_owned()),
            Ok(Err(LoadError::Other(reason))) => Err(reason),
            Err(_) => Err(format!("no answer within {limit:?}")),
        };
        match result {
            Ok((loaded, with_rows)) if loaded == with_rows => {
                Ok(format!("{} {what}", self.location))
            }
            Ok((0, _)) => Ok(format!("{} {what} (loaded before)", self.location)),
            Ok((loaded, with_rows)) => Ok(format!(
                "{} {what} ({} loaded before)",
                self.location,
                with_rows - loaded
            )),
            Err(reason) => {
                // Start over on a fresh connection: this one may be mid-transaction.
                *guard = None;
                Err(SinkError::Write {
                    sink: self.name.clone(),
                    key: what,
                    reason,
                })
            }
        }
    }
}

#[async_trait::async_trait]
impl Sink for PostgresSink {
    async fn deliver(&self, mut delivery: Delivery<'_>) -> Result<String, SinkError> {
        // Design: a part delivered alone (the live mode's parts of the open partition)
        // is gathered from the reader's chunks first; a backlog goes through
        // `deliver_parts`, a part at a time.
        let chunks = std::mem::replace(&mut delivery.rows, super::Chunks::of(Vec::new(), 1));
        let rows = chunks.collect().await.map_err(|reason| SinkError::Write {
            sink: self.name.clone(),
            key: format!(
                "part {} of {}",
                delivery.plan.part,
                clock::rfc3339(delivery.plan.partition)
            ),
            reason,
        })?;
        self.load_all(Source::One(&delivery, &rows, false)).await
    }

    fn batch_limit(&self) -> (usize, i64) {
        (usize::MAX, i64::from(self.config.transaction_rows.get()))
    }

    async fn deliver_parts(&self, parts: &mut PartReader<'_>) -> Result<String, SinkError> {
        self.load_all(Source::Spool(parts)).await
    }
}

/// A verifier that accepts any certificate: libpq's `sslmode=require` encrypts without
/// authenticating the server.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl AnyCertificate {
    fn new() -> AnyCertificate {
        let provider = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
        AnyCertificate(provider)
    }
}

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{Series, Stats};

    fn row(series: &Arc<Series>, start: i64, value: f64, ms: i64) -> WindowRow {
        WindowRow {
            series: Arc::clone(series),
            start,
            seconds: 60,
            stats: Stats::single_at(value, ms),
        }
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
        let text = String::from_utf8(copy_text("pi", &rows).concat()).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(
            lines[0],
            "pi,hw.t,,{},1970-01-01T00:00:00Z,60,2,1.0,3.0,2.0,1.4142135623730951,2.0,3.0,1.0,1970-01-01T00:00:10.000Z,1970-01-01T00:00:30.000Z,0.0"
        );
        assert!(lines[1].starts_with("pi,hw.t,,{},1970-01-01T00:01:00Z,60,1,5.0,5.0,5.0,"));
    }

    /// The pieces of COPY text a part's rows make.
    fn copy_text(device: &str, rows: &[WindowRow]) -> Vec<Vec<u8>> {
        let mut text = CopyText::new(device);
        let mut pieces: Vec<Vec<u8>> = Vec::new();
        for row in rows {
            if let Some(piece) = text.push(row).expect("encodes") {
                pieces.push(piece.to_vec());
            }
        }
        if let Some(piece) = text.finish().expect("encodes") {
            pieces.push(piece.to_vec());
        }
        pieces
    }

    #[test]
    fn a_large_part_goes_out_in_bounded_pieces_of_copy_text() {
        let series: Vec<Arc<Series>> = (0..100)
            .map(|i| Arc::new(Series::new(format!("hw.sensor_{i}"), None)))
            .collect();
        // A day of 100 series: 144,000 rows, some 20 MB of text.
        let rows: Vec<WindowRow> = (0..1440)
            .flat_map(|w| {
                series
                    .iter()
                    .map(move |s| row(s, w * 60, w as f64, w * 60_000 + 1))
            })
            .collect();
        let pieces = copy_text("pi", &rows);
        let lines: usize = pieces
            .iter()
            .map(|p| p.iter().filter(|&&b| b == b'\n').count())
            .sum();
        assert_eq!(lines, rows.len(), "each row once");
        let largest = pieces.iter().map(Vec::len).max().expect("some text");
        // A piece is sent once it reaches the buffer's size: at most one group of rows over.
        assert!(
            largest < COPY_BUFFER + COPY_ROWS * 200,
            "a piece of {largest} bytes"
        );
        assert!(pieces.len() > 100, "{} pieces", pieces.len());
        assert_eq!(
            pieces.concat(),
            long_csv("pi", &rows, LongCsv::Copy).expect("csv"),
            "the same text as one encoding of the whole part"
        );
    }

    #[test]
    fn the_setup_lock_is_per_schema_and_never_changes() {
        // Agents of different versions must agree on it: a changed key is a race again.
        assert_eq!(setup_lock_key("public"), setup_lock_key("public"));
        assert_ne!(setup_lock_key("public"), setup_lock_key("lake"));
        assert_eq!(setup_lock_key("public"), 6_977_781_110_670_214_159);
    }

    #[test]
    fn the_location_never_shows_the_password() {
        let config: crate::config::PostgresSink = toml::from_str(
            "url = \"postgres://pi:hunter2@db.lan:5433/sensors\"\nsslmode = \"require\"",
        )
        .expect("parses");
        assert_eq!(location(&config), "postgres://db.lan:5433/sensors");
    }
}
