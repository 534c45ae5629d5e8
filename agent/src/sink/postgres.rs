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

mod binary;
mod plaintext;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use tokio::sync::Mutex;
use tokio_postgres::{Client, Config as PgConfig};

use self::binary::CopyBinary;
use super::{PartReader, Sink, SinkError};
use crate::clock;
use crate::config::{PostgresSink as PgSinkConfig, SslMode};
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

    /// Loads the parts `parts` reads (of distinct partitions, read one at a time) in one
    /// transaction with one `COPY`; returns how many had not been loaded before, and how
    /// many had rows.
    ///
    /// `direct`: COPY straight into the table, tried first (most parts hold new windows
    /// only); a unique violation (late rows of a window loaded before, a table fed by an
    /// earlier spool) rolls back and the caller loads through staging instead.
    async fn load(
        &self,
        client: &mut Client,
        parts: &mut PartReader<'_>,
        direct: bool,
    ) -> Result<(usize, usize), LoadError> {
        let tx = client.transaction().await?;
        let schema = &self.config.schema;
        let device = parts.device().to_owned();
        // Design: the spool plans part N only once every earlier part of the sink is
        // recorded delivered (durably: the plan's commit syncs what came before), so no
        // earlier part of this partition is ever sent again, and a part whose partition
        // has a record of part N or later went in before (its acknowledgement was lost).
        // The records are read first, the rows of the parts not loaded before go in one
        // COPY, and then each part's record is written, in the same transaction: a
        // partition's record moves on to part N (rows adding up) instead of a row per
        // part, so one row per partition however many flushes sent parts of it. A
        // session that recorded one of these parts meanwhile makes the insert a unique
        // violation: the load starts over through staging, which reads the records again.
        let partitions: Vec<i64> = parts.plans().iter().map(|p| p.partition).collect();
        let recorded: HashMap<i64, i32> = tx
            .query(
                &format!(
                    "SELECT extract(epoch FROM partition_start)::bigint, max(part)
                     FROM \"{schema}\".{LOADS_TABLE}
                     WHERE target = $1 AND device = $2
                       AND partition_start IN (SELECT to_timestamp(unnest($3::bigint[])))
                     GROUP BY partition_start"
                ),
                &[&self.config.table, &device, &partitions],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
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
        let statement = format!("COPY {into} ({columns}) FROM STDIN WITH (FORMAT binary)");
        // Design: the parts are read from the spool (on a blocking thread) and encoded
        // while the pieces before them are sent: a bounded channel between the two, so
        // the server is not left waiting while the next part is read, and memory holds
        // one part's rows and at most PIECES_AHEAD pieces.
        let (pieces, mut to_send) = tokio::sync::mpsc::channel::<Bytes>(PIECES_AHEAD);
        let produce = async {
            let pieces = pieces;
            let mut loads: Vec<(PartPlan, usize)> = Vec::new();
            let mut with_rows = 0;
            let mut binary = CopyBinary::new(&device);
            let stopped = || LoadError::Other("the COPY stopped".to_owned());
            while let Some((plan, part)) = parts.next().await.map_err(LoadError::Other)? {
                if part.rows.is_empty() {
                    continue;
                }
                with_rows += 1;
                if recorded
                    .get(&plan.partition)
                    .is_some_and(|&done| i64::from(done) >= i64::from(plan.part))
                {
                    continue;
                }
                for row in &part.rows {
                    if let Some(piece) = binary.push(row) {
                        pieces.send(piece).await.map_err(|_| stopped())?;
                    }
                }
                binary.end_part();
                loads.push((plan, part.rows.len()));
            }
            let encoded = binary.rows();
            if !loads.is_empty() {
                pieces.send(binary.finish()).await.map_err(|_| stopped())?;
            }
            Ok::<_, LoadError>((loads, with_rows, encoded))
        };
        // The COPY starts with the first piece: a batch whose parts were all loaded
        // before makes none.
        let send = async {
            let mut copy = None;
            while let Some(piece) = to_send.recv().await {
                let copy = match &mut copy {
                    Some(copy) => copy,
                    None => {
                        if !direct {
                            tx.batch_execute(&format!(
                                "CREATE TEMP TABLE edgespool_staging (LIKE {} INCLUDING DEFAULTS) ON COMMIT DROP",
                                self.table()
                            ))
                            .await?;
                        }
                        copy.insert(Box::pin(tx.copy_in(&statement).await?))
                    }
                };
                copy.send(piece).await?;
            }
            Ok::<_, tokio_postgres::Error>(copy)
        };
        let (produced, sent) = futures_util::future::join(produce, send).await;
        // The server's error first: it says why the COPY stopped (a unique violation).
        let copy = sent?;
        let (loads, with_rows, encoded) = produced?;
        let Some(mut copy) = copy else {
            tx.commit().await?;
            return Ok((0, with_rows));
        };
        let copied = copy.as_mut().finish().await?;
        if copied != encoded as u64 {
            return Err(LoadError::Other(format!(
                "the server copied {copied} rows of {encoded}"
            )));
        }
        let move_on = tx
            .prepare(&format!(
                "UPDATE \"{schema}\".{LOADS_TABLE}
                 SET part = $4, rows = rows + $5, loaded_at = now()
                 WHERE target = $1 AND device = $2
                   AND partition_start = to_timestamp($3::bigint) AND part = $6"
            ))
            .await?;
        let insert = tx
            .prepare(&format!(
                "INSERT INTO \"{schema}\".{LOADS_TABLE} (target, device, partition_start, part, rows)
                 VALUES ($1, $2, to_timestamp($3::bigint), $4, $5)"
            ))
            .await?;
        let keys: Vec<(i64, i32, i32, Option<i32>)> = loads
            .iter()
            .map(|(plan, rows)| {
                (
                    plan.partition,
                    plan.part as i32,
                    *rows as i32,
                    recorded.get(&plan.partition).copied(),
                )
            })
            .collect();
        // The records go out together (pipelined on the connection), not a round trip each.
        let table = &self.config.table;
        let written =
            futures_util::future::try_join_all(keys.iter().map(|(partition, part, rows, done)| {
                let (tx, move_on, insert, device) = (&tx, &move_on, &insert, &device);
                async move {
                    match done {
                        Some(done) => {
                            tx.execute(move_on, &[table, device, partition, part, rows, done])
                                .await
                        }
                        None => {
                            tx.execute(insert, &[table, device, partition, part, rows])
                                .await
                        }
                    }
                }
            }))
            .await?;
        if written.iter().any(|&n| n != 1) {
            return Err(LoadError::Other(
                "a part's record in the loads table changed during the load".to_owned(),
            ));
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
        Ok((loads.len(), with_rows))
    }
}

/// How many pieces of COPY data wait to be sent, at most: the encoder's lead.
const PIECES_AHEAD: usize = 8;

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
    /// Loads the parts `parts` reads in one transaction, through staging if it must.
    async fn load_all(&self, parts: &mut PartReader<'_>) -> Result<String, SinkError> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = None;
            *guard = Some(self.connect().await?);
        }
        let client = guard.as_mut().expect("connected above");
        let what = match parts.plans() {
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
            match self.load(client, parts, true).await {
                Err(LoadError::Conflict) => {
                    parts.rewind();
                    self.load(client, parts, false).await
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

/// Design: the uploader hands a sink whose [`Sink::batch_limit`] takes more than one part
/// its parts through [`Sink::deliver_parts`] only, one transaction per batch (a live
/// part of the open partition is a batch of one).
#[async_trait::async_trait]
impl Sink for PostgresSink {
    fn batch_limit(&self) -> (usize, i64) {
        (usize::MAX, i64::from(self.config.transaction_rows.get()))
    }

    async fn deliver_parts(&self, parts: &mut PartReader<'_>) -> Result<String, SinkError> {
        self.load_all(parts).await
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
