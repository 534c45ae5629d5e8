//! The single writer thread: [`SpoolHandle`], the async face through which every task
//! reaches the one [`Spool`], and the commands it sends it.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::flow::{Commit, CommitFailed, Flush, LiveReport};

use super::{Batch, FileId, PartPlan, Plan, Spool, SpoolError};

enum Command {
    Commit(
        Box<Flush>,
        oneshot::Sender<Result<(), (SpoolError, Box<Flush>)>>,
    ),
    Plan(String, i64, oneshot::Sender<Result<Plan, SpoolError>>),
    Delivered(PartPlan, i64, oneshot::Sender<Result<(), SpoolError>>),
    PlanBatch(
        String,
        i64,
        usize,
        i64,
        oneshot::Sender<Result<Batch, SpoolError>>,
    ),
    DeliveredAll(Vec<PartPlan>, i64, oneshot::Sender<Result<(), SpoolError>>),
    Failed(String, String, i64, i64),
    Report(Vec<LiveReport>),
}

/// The async face of the single writer thread.
#[derive(Clone)]
pub struct SpoolHandle {
    commands: mpsc::Sender<Command>,
    commits: watch::Receiver<u64>,
    work: watch::Receiver<u64>,
    file: watch::Receiver<FileId>,
    taken_over: watch::Receiver<Option<String>>,
    path: PathBuf,
}

/// The writer thread; joining it closes the database cleanly.
pub struct SpoolThread(JoinHandle<()>);

impl SpoolThread {
    /// Waits for the writer to finish (all handles dropped).
    pub fn join(self) {
        if self.0.join().is_err() {
            warn!("the spool thread panicked");
        }
    }
}

impl SpoolHandle {
    /// Moves the spool onto its own thread.
    pub fn spawn(mut spool: Spool) -> (SpoolHandle, SpoolThread) {
        let (tx, mut rx) = mpsc::channel::<Command>(64);
        let (commits_tx, commits) = watch::channel(0u64);
        let (work_tx, work) = watch::channel(0u64);
        let (file_tx, file) = watch::channel(spool.file);
        let (taken_tx, taken_over) = watch::channel(None);
        let path = spool.path.clone();
        let thread = std::thread::Builder::new()
            .name("spool".into())
            .spawn(move || {
                let worked = |result: Result<(), SpoolError>| {
                    if result.is_ok() {
                        work_tx.send_modify(|n| *n += 1);
                    }
                    result
                };
                while let Some(command) = rx.blocking_recv() {
                    match command {
                        Command::Commit(flush, reply) => {
                            let result = match spool.commit(&flush) {
                                Ok(()) => {
                                    commits_tx.send_modify(|n| *n += 1);
                                    work_tx.send_modify(|n| *n += 1);
                                    Ok(())
                                }
                                Err(err) => {
                                    if let SpoolError::InUse { .. } = err {
                                        taken_tx.send_replace(Some(err.to_string()));
                                    }
                                    Err((err, flush))
                                }
                            };
                            // After a restore the readers must open the new file.
                            file_tx.send_if_modified(|id| {
                                std::mem::replace(id, spool.file) != spool.file
                            });
                            let _ = reply.send(result);
                        }
                        Command::Plan(sink, now, reply) => {
                            let _ = reply.send(spool.plan(&sink, now));
                        }
                        Command::PlanBatch(sink, now, parts, rows, reply) => {
                            let _ = reply.send(spool.plan_batch(&sink, now, parts, rows));
                        }
                        Command::DeliveredAll(plans, now, reply) => {
                            let _ = reply.send(worked(spool.delivered_all(&plans, now)));
                        }
                        Command::Delivered(plan, now, reply) => {
                            let _ = reply.send(worked(spool.delivered(&plan, now)));
                        }
                        Command::Report(reports) => {
                            if let Err(err) = spool.report(&reports) {
                                warn!(error = %err, "could not record a live feed's report");
                            }
                        }
                        Command::Failed(sink, error, now, next) => {
                            if let Err(err) = spool.failed(&sink, &error, now, next) {
                                warn!(error = %err, "could not record a sink failure");
                            }
                        }
                    }
                }
                if let Err(err) = spool.mark_stopped() {
                    warn!(error = %err, "could not mark the spool stopped");
                }
                info!(path = %spool.path.display(), "spool closed");
            })
            .expect("the OS lets us start one thread");
        (
            SpoolHandle {
                commands: tx,
                commits,
                work,
                file,
                taken_over,
                path,
            },
            SpoolThread(thread),
        )
    }

    /// The spool file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file the writer has open; a [`super::SpoolReader`] on another one (the path
    /// was deleted or replaced under the agent) must be opened again.
    pub fn file(&self) -> FileId {
        *self.file.borrow()
    }

    /// Becomes `Some(message)` when another edgespool took the spool's lock (its lock
    /// file deleted, then taken): this agent writes no more and should stop.
    pub fn taken_over(&self) -> watch::Receiver<Option<String>> {
        self.taken_over.clone()
    }

    /// Increments at every successful commit.
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.commits.clone()
    }

    /// Increments at every successful commit and every delivery recorded: the ends of
    /// the work that maps code the sampling loop does not run, which the agent's trim
    /// follows ([`crate::memory::trim_after_commits`]).
    pub fn work(&self) -> watch::Receiver<u64> {
        self.work.clone()
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, SpoolError>>) -> Command,
    ) -> Result<T, SpoolError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| SpoolError::Stopped)?;
        rx.await.map_err(|_| SpoolError::Stopped)?
    }

    /// Plans the next part of a sink.
    pub async fn plan(&self, sink: &str, now_ms: i64) -> Result<Plan, SpoolError> {
        self.ask(|tx| Command::Plan(sink.to_owned(), now_ms, tx))
            .await
    }

    /// Records a delivery.
    pub async fn delivered(&self, plan: &PartPlan, now_ms: i64) -> Result<(), SpoolError> {
        self.ask(|tx| Command::Delivered(plan.clone(), now_ms, tx))
            .await
    }

    /// Plans the next parts of a sink that loads several at once (see
    /// [`Spool::plan_batch`]).
    pub async fn plan_batch(
        &self,
        sink: &str,
        now_ms: i64,
        max_parts: usize,
        max_rows: i64,
    ) -> Result<Batch, SpoolError> {
        self.ask(|tx| Command::PlanBatch(sink.to_owned(), now_ms, max_parts, max_rows, tx))
            .await
    }

    /// Records the delivery of several parts, in one transaction.
    pub async fn delivered_all(&self, plans: &[PartPlan], now_ms: i64) -> Result<(), SpoolError> {
        self.ask(|tx| Command::DeliveredAll(plans.to_vec(), now_ms, tx))
            .await
    }

    /// Records live feeds' final reports (fire and forget).
    pub async fn report(&self, reports: Vec<LiveReport>) {
        let _ = self.commands.send(Command::Report(reports)).await;
    }

    /// Records a failed attempt (fire and forget).
    pub async fn failed(&self, sink: &str, error: &str, now_ms: i64, next_attempt_ms: i64) {
        let command = Command::Failed(sink.to_owned(), error.to_owned(), now_ms, next_attempt_ms);
        let _ = self.commands.send(command).await;
    }
}

#[async_trait::async_trait]
impl Commit for SpoolHandle {
    /// Commits a flush; on failure gives it back (unless the spool thread is gone).
    async fn commit(&self, flush: Flush) -> Result<(), CommitFailed> {
        let failed = |error: SpoolError, flush: Option<Flush>| CommitFailed {
            error: Box::new(error),
            flush,
        };
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError(command)) = self
            .commands
            .send(Command::Commit(Box::new(flush), tx))
            .await
        {
            let flush = match command {
                Command::Commit(flush, _) => Some(*flush),
                _ => None,
            };
            return Err(failed(SpoolError::Stopped, flush));
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err((err, flush))) => Err(failed(err, Some(*flush))),
            Err(_) => Err(failed(SpoolError::Stopped, None)),
        }
    }
}
