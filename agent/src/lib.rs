//! edgespool: an edge agent that samples, aggregates, spools and uploads.
//!
//! The stages, in the order data flows through them (see DESIGN.md):
//!
//! 1. [`source`]: sensors, files and HTTP APIs, each in its own task, produce samples
//!    (and devices push them to a `listen` source's HTTP server);
//! 2. [`aggregate`]: tumbling windows, aligned to UTC, reduce samples to window rows;
//! 3. [`spool`]: one SQLite writer commits closed windows, one transaction per flush;
//! 4. [`sink`]: one uploader per sink sends closed partitions, then records delivery;
//!    a live feed (the `mqtt` sink) gets each flush's windows as they are committed;
//! 5. [`status`]: reads the spool read-only and tells a person what is going on.
//!
//! What the stages hand each other lives in [`flow`], which every stage may use and
//! which uses none of them: imports point upstream only. [`config`] reads the one TOML
//! file; [`run`] wires the stages and waits for shutdown.

pub mod aggregate;
pub mod broker;
pub mod cli;
pub mod clock;
pub mod config;
pub mod durable;
#[cfg(test)]
mod exact_tests;
pub mod failpoint;
pub mod flow;
#[doc(hidden)]
pub mod fuzzing;
#[cfg(test)]
mod heap_tests;
pub mod memory;
pub mod sensors;
pub mod sink;
pub mod source;
pub mod spool;
pub mod status;
pub mod systemd;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::aggregate::AggregateTask;
use crate::config::Config;
#[cfg(feature = "mqtt-sink")]
use crate::config::SinkKind;
#[cfg(feature = "listen")]
use crate::config::SourceKind;
use crate::flow::SourceStats;
#[cfg(feature = "mqtt-sink")]
use crate::flow::{LiveLink, LiveStats};
#[cfg(feature = "mqtt-sink")]
use crate::sink::MqttFeed;
use crate::sink::Uploader;
use crate::source::SourceTask;
use crate::spool::{Spool, SpoolHandle, SpoolOptions};

/// How long the stages get to finish after shutdown is asked for.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The spool could not be opened.
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
    /// A source could not be set up.
    #[error("source {name}: {source}")]
    Source {
        name: String,
        source: source::SourceError,
    },
    /// A sink could not be set up.
    #[error(transparent)]
    Sink(#[from] sink::SinkError),
    /// Another edgespool took the spool over while this one ran.
    #[error("another edgespool took the spool over, so this one stopped ({message})")]
    TakenOver { message: String },
}

/// Runs the agent until `shutdown` completes, then flushes the open windows and stops.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    // rustls needs one process-wide crypto provider; ring builds for every Pi.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Sources keep the files they read every tick open (within a bound): room for them.
    if let Some(open_files) = source::raise_open_file_limit() {
        tracing::debug!(open_files, "open-file limit");
    }
    let device = config.device_id();
    let agent = &config.agent;
    let options = SpoolOptions {
        device: device.clone(),
        window_seconds: agent.window.get(),
        partition_seconds: agent.partition.get(),
        // The last window of a partition is flushed SETTLE_MS after the partition's end;
        // the grace period for stragglers starts once it is in the spool.
        grace_ms: agent.grace.as_millis() as i64 + aggregate::SETTLE_MS + 1_000,
        budget_bytes: agent.disk_budget.as_u64(),
        when_full: agent.when_full,
        sources: config
            .sources
            .iter()
            .map(|s| (s.name.clone(), s.kind.word()))
            .collect(),
        sinks: config
            .sinks
            .iter()
            .filter(|s| !s.kind.is_live())
            .map(|s| (s.name.clone(), s.kind.word()))
            .collect(),
        live: config
            .sinks
            .iter()
            .filter(|s| s.kind.is_live())
            .map(|s| (s.name.clone(), s.kind.word()))
            .collect(),
        late: config
            .sinks
            .iter()
            .filter_map(|s| {
                let (grace, max_rows) = s.kind.late_parts()?;
                let late = spool::LateParts {
                    grace_ms: grace.as_millis().min(i64::MAX as u128) as i64,
                    max_rows: i64::from(max_rows.get()),
                };
                Some((s.name.clone(), late))
            })
            .collect(),
        each_flush: config
            .sinks
            .iter()
            .filter(|s| s.kind.delivers_each_flush())
            .map(|s| s.name.clone())
            .collect(),
    };
    let opened = Spool::open(&agent.spool, options)?;
    let marks = opened.marks()?;
    let (spool, spool_thread) = SpoolHandle::spawn(opened);

    let (stop, stopping) = watch::channel(false);
    let (samples_tx, samples_rx) = mpsc::channel(1024);
    let mut tasks = JoinSet::new();
    let mut stats = Vec::new();
    for source_config in &config.sources {
        #[cfg(feature = "listen")]
        if let SourceKind::Listen(listen) = &source_config.kind {
            let source_stats = Arc::new(SourceStats::new(&source_config.name, "listen"));
            stats.push(Arc::clone(&source_stats));
            let server = source::listen::ListenServer::bind(
                &source_config.name,
                listen,
                source_stats,
                samples_tx.clone(),
                stopping.clone(),
            )
            .map_err(|source| RunError::Source {
                name: source_config.name.clone(),
                source,
            })?;
            tasks.spawn(server.run());
            continue;
        }
        let built =
            source::build(source_config, &agent.spool).map_err(|source| RunError::Source {
                name: source_config.name.clone(),
                source,
            })?;
        let source_stats = Arc::new(SourceStats::new(
            &source_config.name,
            source_config.kind.word(),
        ));
        stats.push(Arc::clone(&source_stats));
        let task = SourceTask::new(
            source_config,
            built,
            source_stats,
            samples_tx.clone(),
            stopping.clone(),
        );
        tasks.spawn(task.run());
    }
    drop(samples_tx);
    #[cfg_attr(not(feature = "mqtt-sink"), allow(unused_mut))]
    let mut live = Vec::new();
    for sink_config in &config.sinks {
        let name = &sink_config.name;
        match (sink::build(sink_config), &sink_config.kind) {
            (Some(built), _) => {
                let uploader =
                    Uploader::new(sink_config, &device, built, spool.clone(), stopping.clone());
                tasks.spawn(uploader.run());
            }
            #[cfg(feature = "mqtt-sink")]
            (None, SinkKind::Mqtt(mqtt)) => {
                let stats = Arc::new(LiveStats::new(name, sink_config.kind.word()));
                let (link, rows) = LiveLink::new(Arc::clone(&stats));
                let feed = MqttFeed::new(name, mqtt, &device, stats, rows, spool.clone())?;
                tasks.spawn(feed.run());
                live.push(link);
            }
            // Only a live feed is built here; a kind this build lacks was refused by
            // the configuration already.
            (None, kind) => {
                return Err(RunError::Sink(sink::SinkError::Setup {
                    sink: name.clone(),
                    reason: format!("kind {:?} is not in this build of edgespool", kind.word()),
                }));
            }
        }
    }
    let aggregator = AggregateTask::new(
        agent.window.get(),
        clock::ClockWatch::new(agent.clock, agent.clock_wait),
        samples_rx,
        Box::new(spool.clone()),
        stats,
        live,
        stopping,
    )
    .restore_marks(marks);
    tasks.spawn(aggregator.run());
    let commits = spool.commits();
    let work = spool.work();
    let mut taken_over = spool.taken_over();
    drop(spool);
    info!(
        device = %device,
        spool = %agent.spool.display(),
        sources = config.sources.len(),
        sinks = config.sinks.len(),
        "edgespool started"
    );
    // Once start-up is over, give back the code pages only it used, and again after each
    // flush and delivery: their pages and those of a reconnection, which the sampling
    // loop does not run, and the allocator's free pages (detached: shutdown does not
    // wait for it).
    tokio::spawn(memory::trim_after_commits(work, {
        let mut trimmer = memory::CodeTrimmer::default();
        move || {
            let mappings = trimmer.trim();
            // The flush's rows and encodings are freed by now: their pages go back too.
            let released = memory::release_free_memory();
            let smaps_reads = trimmer.smaps_reads();
            tracing::debug!(mappings, smaps_reads, released, "code pages trimmed");
        }
    }));

    systemd::ready(&format!(
        "sampling: {} sources, {} sinks",
        config.sources.len(),
        config.sinks.len()
    ));
    // The spool commits once per window: two windows and a margin without one is stuck.
    let stale_after = Duration::from_secs(2 * u64::from(agent.window.get()) + 10);
    let watchdog = tokio::spawn(systemd::watchdog(commits, stale_after));

    // Another edgespool that took the spool's lock (its lock file deleted under this one)
    // owns the spool now: this agent, which can no longer commit, stops.
    let taken_over = async move {
        match taken_over.wait_for(Option::is_some).await {
            Ok(message) => message.clone(),
            Err(_) => std::future::pending().await,
        }
    };
    let lost = tokio::select! {
        () = shutdown => None,
        message = taken_over => message,
    };
    systemd::stopping();
    info!("shutting down: flushing open windows");
    let _ = stop.send(true);
    let finished = tokio::time::timeout(STOP_TIMEOUT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        warn!(timeout = ?STOP_TIMEOUT, "some stages did not stop in time");
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    // Every handle is gone now: the spool thread closes the database and ends.
    let _ = tokio::task::spawn_blocking(move || spool_thread.join()).await;
    watchdog.abort();
    info!("edgespool stopped");
    match lost {
        Some(message) => Err(RunError::TakenOver { message }),
        None => Ok(()),
    }
}

/// An error and its causes, "error sending request: connection refused", since the
/// outer message of a client library alone seldom says what went wrong.
pub fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(inner) = cause {
        let part = inner.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = inner.source();
    }
    text
}

/// Trusted CA certificates: those of a PEM file, or the system's; never empty.
pub fn ca_roots(ca_file: Option<&std::path::Path>) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            use rustls_pki_types::pem::PemObject;
            let bad = |e: &dyn std::fmt::Display| format!("ca_file {}: {e}", path.display());
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?;
            for cert in certs {
                roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    if roots.is_empty() {
        return Err("no CA certificates found".to_owned());
    }
    Ok(roots)
}
