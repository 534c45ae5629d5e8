//! `kind = "serial"`: a device on a serial line (USB or the Pi's UART) printing lines.
//!
//! A background task owns the port: it opens the tty (non-blocking, no controlling
//! terminal), sets its speed, framing and flow control (raw: no echo, no line editing),
//! and waits on it through the runtime's reactor (`AsyncFd`), so no read ever blocks a
//! thread of the runtime or another source. Each read is cut into lines ([`lines`]),
//! each line parsed into samples ([`parse`]) stamped when it arrived (or with the time it
//! carries), and parked. Every tick, [`Source::sample`] hands what is parked to the
//! aggregator.
//!
//! The real world, each counted in `status`, never a crash:
//! - unplugged (the read ends, or fails): "port gone" is a read error of the source; the
//!   line it cut is dropped and counted invalid; the port is opened again with capped
//!   backoff (0.25 s doubling to 5 s) until the device is back;
//! - the first line after the port opens may be the tail of one the device was printing:
//!   when its first bytes come at once, it is dropped up to its newline (counted invalid);
//! - a line over `max_line` (garbage at a wrong baud rate holds no newline for long) is
//!   dropped up to its newline, counted invalid; a line that is not UTF-8 likewise;
//! - nothing printed for `silence` while the port is open: one error per silent spell.

mod lines;
mod parse;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::termios::{
    self, ControlModes, InputModes, OptionalActions, QueueSelector, SpecialCodeIndex,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

use super::{Batch, Source, SourceError};
use crate::clock;
use crate::config::{FlowControl, Parity, SerialSource as SerialConfig};
use lines::{Lines, Piece};
use parse::Parser;

/// The first wait before opening a port again; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// The longest wait between two attempts to open a port that is gone.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// First bytes that come this soon after the port opens were on their way already: the
/// line they start may be cut.
const SETTLE: Duration = Duration::from_millis(20);

/// What the port task has read and not yet handed over.
#[derive(Default)]
struct Parked {
    batch: Batch,
}

pub struct SerialSource {
    parked: Arc<Mutex<Parked>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SerialSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SerialSource {
    /// Starts reading in the background; must be called inside the runtime.
    pub fn new(name: &str, config: &SerialConfig) -> Result<SerialSource, SourceError> {
        let parser = Parser::new(name, config).map_err(|reason| SourceError::Parse { reason })?;
        let parked = Arc::new(Mutex::new(Parked::default()));
        let port = Port {
            source: name.to_owned(),
            path: config.port.clone(),
            settings: Settings::of(config),
            max_line: config.max_line.as_u64() as usize,
            silence: config.silence,
            parser,
            parked: Arc::clone(&parked),
        };
        let task = tokio::spawn(port.run());
        Ok(SerialSource { parked, task })
    }
}

#[async_trait::async_trait]
impl Source for SerialSource {
    async fn sample(&mut self, batch: &mut Batch) -> Result<(), SourceError> {
        let taken = {
            let Ok(mut parked) = self.parked.lock() else {
                return Err(SourceError::Parse {
                    reason: "the serial port task failed".into(),
                });
            };
            std::mem::take(&mut parked.batch)
        };
        batch.samples.extend(taken.samples);
        batch.invalid.extend(taken.invalid);
        batch.errors.extend(taken.errors);
        batch.series_dropped += taken.series_dropped;
        batch.nulls += taken.nulls;
        batch.not_finite += taken.not_finite;
        if batch.series_refused.is_none() {
            batch.series_refused = taken.series_refused;
        }
        Ok(())
    }
}

/// The line settings of a port.
#[derive(Debug, Clone, Copy)]
struct Settings {
    baud: u32,
    data_bits: u8,
    parity: Parity,
    stop_bits: u8,
    flow: FlowControl,
}

impl Settings {
    fn of(config: &SerialConfig) -> Settings {
        Settings {
            baud: config.baud.get(),
            data_bits: config.data_bits,
            parity: config.parity,
            stop_bits: config.stop_bits,
            flow: config.flow_control,
        }
    }
}

/// Why reading an open port ended.
enum Ended {
    /// The other end hung up (a USB adapter unplugged, a pty closed).
    HungUp,
    /// A read failed.
    Failed(std::io::Error),
}

/// The port task: opens, reads, and opens again.
struct Port {
    source: String,
    path: PathBuf,
    settings: Settings,
    max_line: usize,
    silence: Option<Duration>,
    parser: Parser,
    parked: Arc<Mutex<Parked>>,
}

impl Port {
    async fn run(mut self) {
        let mut failures: u32 = 0;
        let mut lines = Lines::new(self.max_line);
        loop {
            let file = match open(&self.path, self.settings) {
                Ok(file) => file,
                Err(err) => {
                    failures = failures.saturating_add(1);
                    let message = gone_or(&self.path, &err, "cannot open");
                    if failures == 1 {
                        tracing::warn!(source = %self.source, error = %message, "serial port not open; trying again");
                    }
                    self.park_error(message);
                    tokio::time::sleep(backoff(failures)).await;
                    continue;
                }
            };
            if failures > 0 {
                tracing::info!(source = %self.source, port = %self.path.display(), "serial port open again");
            }
            let ended = self.read(file, &mut lines).await;
            if let Some(piece) = lines.close() {
                self.park_piece(piece);
            }
            let message = match ended {
                Ended::HungUp => format!(
                    "port gone: {}: the device hung up (unplugged?)",
                    self.path.display()
                ),
                Ended::Failed(err) => gone_or(&self.path, &err, "read failed"),
            };
            tracing::warn!(source = %self.source, error = %message, "serial port closed; opening it again");
            self.park_error(message);
            failures = 1;
            tokio::time::sleep(backoff(failures)).await;
        }
    }

    /// Reads the open port until it closes or fails.
    async fn read(&mut self, file: File, lines: &mut Lines) -> Ended {
        // SAFETY: the `File` owns its descriptor, and the `AsyncFd` owns the `File` until
        // it is dropped at the end of this function: the descriptor stays open and the same.
        let fd = match unsafe { AsyncFd::register_with_interest(file, Interest::READABLE) } {
            Ok(fd) => fd,
            Err(err) => return Ended::Failed(err.into()),
        };
        let opened = Instant::now();
        let mut first = true;
        let mut last_line = Instant::now();
        let mut silent = false;
        let mut buf = vec![0u8; 4096];
        loop {
            let ready = match self.silence {
                Some(silence) if !silent => {
                    match tokio::time::timeout_at(last_line + silence, fd.readable()).await {
                        Ok(ready) => ready,
                        Err(_) => {
                            silent = true;
                            self.park_error(format!(
                                "silence: no line from {} for {}",
                                self.path.display(),
                                humantime::format_duration(silence)
                            ));
                            continue;
                        }
                    }
                }
                _ => fd.readable().await,
            };
            let mut guard = match ready {
                Ok(guard) => guard,
                Err(err) => return Ended::Failed(err),
            };
            let read = guard.try_io(|inner| inner.get_ref().read(&mut buf));
            let n = match read {
                Err(_would_block) => continue,
                Ok(Ok(0)) => return Ended::HungUp,
                Ok(Ok(n)) => n,
                Ok(Err(err)) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Ok(Err(err)) => return Ended::Failed(err),
            };
            if first {
                first = false;
                if opened.elapsed() < SETTLE {
                    lines.skip_first();
                }
            }
            let now_ms = clock::now_ms();
            let Ok(mut parked) = self.parked.lock() else {
                return Ended::Failed(std::io::Error::other("the hand-over lock is poisoned"));
            };
            let batch = &mut parked.batch;
            let parser = &mut self.parser;
            let mut took_line = false;
            lines.feed(&buf[..n], |piece| match piece {
                Piece::Line(line) => {
                    took_line = true;
                    parser.read(line, now_ms, batch);
                }
                other => batch.invalid.push(describe(&other, self.max_line)),
            });
            if took_line {
                last_line = Instant::now();
                silent = false;
            }
        }
    }

    fn park_error(&self, message: String) {
        if let Ok(mut parked) = self.parked.lock() {
            parked.batch.errors.push(message);
        }
    }

    fn park_piece(&self, piece: Piece<'_>) {
        if let Ok(mut parked) = self.parked.lock() {
            parked.batch.invalid.push(describe(&piece, self.max_line));
        }
    }
}

/// Reads bytes from a port as the source would (for the fuzz targets): cut into lines
/// of at most `max_line` bytes, each parsed, the port closed at the end.
pub(crate) fn read_bytes(name: &str, config: &SerialConfig, chunks: &[&[u8]]) -> Batch {
    let mut batch = Batch::default();
    let Ok(mut parser) = Parser::new(name, config) else {
        return batch;
    };
    let max_line = config.max_line.as_u64() as usize;
    let mut lines = Lines::new(max_line);
    for chunk in chunks {
        lines.feed(chunk, |piece| match piece {
            Piece::Line(line) => parser.read(line, 1_767_322_800_000, &mut batch),
            other => batch.invalid.push(describe(&other, max_line)),
        });
    }
    if let Some(piece) = lines.close() {
        batch.invalid.push(describe(&piece, max_line));
    }
    batch
}

/// What a dropped piece of a line was, for `status`.
fn describe(piece: &Piece<'_>, max_line: usize) -> String {
    match piece {
        Piece::Line(_) => String::new(),
        Piece::TooLong(n) => {
            format!(
                "line over max_line ({max_line} bytes) dropped up to its newline ({n} bytes seen; a wrong baud rate?)"
            )
        }
        Piece::Cut(n) => format!("line cut by the port closing or opening dropped ({n} bytes)"),
    }
}

/// The wait before attempt `failures + 1` to open a port.
fn backoff(failures: u32) -> Duration {
    let doubled = FIRST_BACKOFF.saturating_mul(1 << failures.saturating_sub(1).min(16));
    doubled.min(MAX_BACKOFF)
}

/// An error of opening or reading a port: "port gone" when the device is not there.
fn gone_or(path: &Path, err: &std::io::Error, what: &str) -> String {
    let gone = matches!(
        err.raw_os_error(),
        Some(libc::ENOENT | libc::ENODEV | libc::ENXIO | libc::EIO)
    );
    if gone {
        format!("port gone: {}: {err}", path.display())
    } else {
        format!("{what} {}: {err}", path.display())
    }
}

/// Opens a port and sets it up: raw, the configured speed and framing, input that
/// waited from before dropped.
fn open(path: &Path, settings: Settings) -> std::io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)?;
    let mut t = termios::tcgetattr(&file).map_err(|err| {
        if err == rustix::io::Errno::NOTTY {
            std::io::Error::other("not a serial port (not a tty)")
        } else {
            err.into()
        }
    })?;
    t.make_raw();
    t.control_modes -= ControlModes::CSIZE | ControlModes::PARENB | ControlModes::PARODD;
    t.control_modes -= ControlModes::CSTOPB | ControlModes::CRTSCTS;
    t.control_modes |= ControlModes::CREAD | ControlModes::CLOCAL;
    t.control_modes |= match settings.data_bits {
        5 => ControlModes::CS5,
        6 => ControlModes::CS6,
        7 => ControlModes::CS7,
        _ => ControlModes::CS8,
    };
    match settings.parity {
        Parity::None => {}
        Parity::Odd => t.control_modes |= ControlModes::PARENB | ControlModes::PARODD,
        Parity::Even => t.control_modes |= ControlModes::PARENB,
    }
    if settings.stop_bits == 2 {
        t.control_modes |= ControlModes::CSTOPB;
    }
    t.input_modes -= InputModes::IXON | InputModes::IXOFF | InputModes::IXANY;
    match settings.flow {
        FlowControl::None => {}
        FlowControl::Software => t.input_modes |= InputModes::IXON | InputModes::IXOFF,
        FlowControl::Hardware => t.control_modes |= ControlModes::CRTSCTS,
    }
    t.special_codes[SpecialCodeIndex::VMIN] = 1;
    t.special_codes[SpecialCodeIndex::VTIME] = 0;
    t.set_speed(settings.baud)?;
    // Design: what waited in the driver was read before the speed was right.
    termios::tcflush(&file, QueueSelector::IFlush)?;
    termios::tcsetattr(&file, OptionalActions::Now, &t)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopening_backs_off_from_a_quarter_second_to_five() {
        let waits: Vec<u64> = (1..=8).map(|n| backoff(n).as_millis() as u64).collect();
        assert_eq!(waits, [250, 500, 1000, 2000, 4000, 5000, 5000, 5000]);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn a_missing_port_is_gone_a_forbidden_one_is_not() {
        let gone = open(Path::new("/nonexistent/ttyUSB9"), settings()).expect_err("no such port");
        assert_eq!(
            gone_or(Path::new("/nonexistent/ttyUSB9"), &gone, "cannot open"),
            "port gone: /nonexistent/ttyUSB9: No such file or directory (os error 2)"
        );
        let file = tempfile::NamedTempFile::new().expect("a temp file");
        let err = open(file.path(), settings()).expect_err("a plain file is no port");
        assert_eq!(err.to_string(), "not a serial port (not a tty)");
    }

    fn settings() -> Settings {
        Settings {
            baud: 9600,
            data_bits: 8,
            parity: Parity::None,
            stop_bits: 1,
            flow: FlowControl::None,
        }
    }
}
