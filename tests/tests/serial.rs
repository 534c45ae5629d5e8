//! `kind = "serial"` against a real pseudo-terminal: the test opens a pty pair, links its
//! device at a fixed path (as udev links `/dev/serial/by-id/…`), and plays a recorded
//! pulse-oximeter session into it: readings with the probe off (`--`), a line cut by the
//! port opening, garbage at a wrong baud rate, a line longer than `max_line`, a line cut
//! by the unplugging. Then it unplugs the device (closes the pty and removes the link),
//! plugs it back (a new pty at the same link) and plays more. The windows land in a local
//! sink; their counts and means are checked against the session computed here, and the
//! counters and the problem against `status`.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgespool_tests::{
    Agent, T0, archive_sink, find_source, ndjson_totals, source_status, wait_for,
    write_agent_config,
};
use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
use rustix::termios::{self, ControlModes, OptionalActions};
use serde_json::Value;

/// One end of a pty pair: the test writes to the master; the agent reads the slave
/// through `link`. Dropping it is unplugging the device.
struct Device {
    master: File,
    /// The slave, held open by the test only to see what the agent has not read yet.
    slave: OwnedFd,
    link: PathBuf,
}

impl Device {
    /// A new pty whose slave `link` points to (replacing a stale link).
    fn plug(link: &Path) -> Device {
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
            .expect("a pty master");
        grantpt(&master).expect("grantpt");
        unlockpt(&master).expect("unlockpt");
        let name = ptsname(&master, Vec::new()).expect("the slave's name");
        let slave_path = PathBuf::from(name.to_str().expect("a UTF-8 pts path"));
        let slave = rustix::fs::open(
            &slave_path,
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .expect("the slave opens");
        // Raw from the start: nothing echoed back, no line editing of the session.
        let mut t = termios::tcgetattr(&slave).expect("termios");
        t.make_raw();
        termios::tcsetattr(&slave, OptionalActions::Now, &t).expect("raw");
        let _ = std::fs::remove_file(link);
        std::os::unix::fs::symlink(&slave_path, link).expect("the link");
        Device {
            master: File::from(master),
            slave,
            link: link.to_owned(),
        }
    }

    /// The line speed the slave is set to (the pty's default until the agent opens it).
    fn speed(&self) -> u32 {
        termios::tcgetattr(self.master.as_fd())
            .expect("termios of the pair")
            .output_speed()
    }

    /// Waits for the agent to open the port and set it up as configured.
    fn wait_for_agent(&self) {
        wait_for(
            "the agent to set the port to 9600 baud",
            Duration::from_secs(30),
            || (self.speed() == 9600).then_some(()),
        );
        let t = termios::tcgetattr(self.master.as_fd()).expect("termios");
        assert!(t.control_modes.contains(ControlModes::CS8), "{t:?}");
        assert!(!t.control_modes.contains(ControlModes::PARENB), "{t:?}");
        assert!(!t.local_modes.contains(termios::LocalModes::ECHO), "{t:?}");
    }

    /// Writes bytes and waits until the agent has read them all.
    fn play(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(512) {
            self.master
                .write_all(chunk)
                .expect("the pty takes the bytes");
            wait_for(
                "the agent to read what was written",
                Duration::from_secs(30),
                || (rustix::io::ioctl_fionread(&self.slave).ok()? == 0).then_some(()),
            );
        }
    }

    /// Writes bytes that make no line and waits until the agent has read them: it is
    /// stopped while the kernel takes them in (a hung-up tty drops what was not read, and
    /// the kernel hands a write to the reader a moment later), then let go.
    fn play_unterminated(&mut self, bytes: &[u8], agent: rustix::process::Pid) {
        use rustix::process::{Signal, kill_process};
        kill_process(agent, Signal::STOP).expect("the agent stops");
        self.master
            .write_all(bytes)
            .expect("the pty takes the bytes");
        let waiting = wait_for(
            "the kernel to queue the bytes",
            Duration::from_secs(30),
            || {
                let n = rustix::io::ioctl_fionread(&self.slave).ok()?;
                (n as usize == bytes.len()).then_some(n)
            },
        );
        kill_process(agent, Signal::CONT).expect("the agent goes on");
        assert_eq!(waiting as usize, bytes.len());
        wait_for(
            "the agent to read what was written",
            Duration::from_secs(30),
            || (rustix::io::ioctl_fionread(&self.slave).ok()? == 0).then_some(()),
        );
    }

    /// Unplugs: the agent's reads end; the link goes, as udev removes it.
    fn unplug(self) {
        let _ = std::fs::remove_file(&self.link);
        drop(self);
    }
}

/// The pulse oximeter's line at `T0 + 3600 + second` (2026-01-02T04:00:00Z + second,
/// UTC), with `None` for a reading it has not got.
fn oximeter_line(second: i64, spo2: Option<u32>, bpm: Option<u32>, pi: Option<f64>) -> String {
    let at = chrono::DateTime::from_timestamp(T0 + 3600 + second, 0).expect("a time");
    format!(
        "{} SN=0000012345 SPO2={}% BPM={} PI={}% SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+-- ALARM=0000 EXC=000000\r\n",
        at.format("%m/%d/%y %H:%M:%S"),
        spo2.map_or("---".to_owned(), |v| format!("{v:03}")),
        bpm.map_or("---".to_owned(), |v| format!("{v:03}")),
        pi.map_or("--.--".to_owned(), |v| format!("{v:05.2}")),
    )
}

/// What the session holds, computed here: per series, the count and sum of the values.
#[derive(Default)]
struct Expected {
    spo2: Vec<f64>,
    bpm: Vec<f64>,
    pi: Vec<f64>,
    missing: u64,
}

impl Expected {
    /// One line of the session, remembered.
    fn line(
        &mut self,
        second: i64,
        spo2: Option<u32>,
        bpm: Option<u32>,
        pi: Option<f64>,
    ) -> String {
        for (list, value) in [
            (&mut self.spo2, spo2.map(f64::from)),
            (&mut self.bpm, bpm.map(f64::from)),
            (&mut self.pi, pi),
        ] {
            match value {
                Some(v) => list.push(v),
                None => self.missing += 1,
            }
        }
        oximeter_line(second, spo2, bpm, pi)
    }

    fn samples(&self) -> u64 {
        (self.spo2.len() + self.bpm.len() + self.pi.len()) as u64
    }
}

/// The tail of an oximeter line, as a port opened mid-line reads it.
const TAIL: &str = "SN=0000012345 SPO2=097% BPM=072 PI=01.23% SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+-- ALARM=0000 EXC=000000\r\n";

fn config(dir: &Path, link: &Path) -> PathBuf {
    write_agent_config(
        dir,
        &format!(
            r#"[[sources]]
kind = "serial"
name = "oxi"
port = "{}"
baud = 9600
interval = "200ms"
silence = "3s"
format = "regex"
regex = '^(?P<time>\d\d/\d\d/\d\d \d\d:\d\d:\d\d) SN=\d+ SPO2=(?P<spo2>[\d.+-]+)% BPM=(?P<bpm>[\d.+-]+) PI=(?P<pi>[\d.+-]+)%'
[sources.timestamp]
field = "time"
format = "%m/%d/%y %H:%M:%S"
[[sources.fields]]
name = "spo2"
unit = "%"
[[sources.fields]]
name = "pi"
unit = "%"

{}"#,
            link.display(),
            archive_sink(dir)
        ),
    )
}

fn oxi(agent: &Agent) -> Option<Value> {
    find_source(&agent.try_status()?, "oxi").cloned()
}

/// Waits until the source's counters in `status` reach `samples` and `invalid`.
fn wait_for_counts(agent: &Agent, samples: u64, invalid: u64) -> Value {
    wait_for(
        &format!("{samples} samples and {invalid} invalid in status"),
        Duration::from_secs(60),
        || {
            let s = oxi(agent)?;
            (s["samples"] == samples && s["invalid"] == invalid).then_some(s)
        },
    )
}

#[test]
fn an_oximeter_session_lands_through_a_pty_unplugged_and_plugged_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    let link = dir.path().join("usb-oximeter");
    let config = config(dir.path(), &link);
    let mut device = Device::plug(&link);
    let agent = Agent::start(&config, &dir.path().join("agent.log"));
    device.wait_for_agent();

    let mut expected = Expected::default();
    let mut session = String::new();
    // Opened mid-line: the tail of a line (dropped as cut, or not matching: invalid).
    session.push_str(TAIL);
    for i in 0..30 {
        let probe_off = (5..8).contains(&i);
        let (spo2, bpm, pi) = if probe_off {
            (None, None, None)
        } else {
            (
                Some(94 + (i % 5) as u32),
                (i != 12).then_some(66 + (i % 9) as u32),
                Some(1.0 + i as f64 * 0.07),
            )
        };
        session.push_str(&expected.line(i, spo2, bpm, pi));
    }
    device.play(session.as_bytes());
    // Garbage at a wrong baud rate: not UTF-8, then a run with no newline past max_line.
    let mut garbage = vec![0xf0, 0x9f, 0x00, 0xff, 0xfe, b'\r', b'\n'];
    garbage.extend(std::iter::repeat_n(0xaa, 5000));
    garbage.push(b'\n');
    device.play(&garbage);
    device.play(expected.line(30, Some(99), Some(60), Some(2.5)).as_bytes());
    let status = wait_for_counts(&agent, expected.samples(), 3);
    assert_eq!(status["nulls"], expected.missing, "{status}");

    // Unplugged in the middle of a line.
    let pid = agent.status()["daemon"]["pid"]
        .as_i64()
        .expect("the agent's pid");
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
    device.play_unterminated(b"01/02/26 04:00:31 SN=0000012345 SPO2=09", pid);
    device.unplug();
    let status = wait_for(
        "status to say the port is gone",
        Duration::from_secs(60),
        || {
            let s = oxi(&agent)?;
            // The reopening fails while the device is away.
            let problem = s["last_error"].as_str()?;
            (problem.ends_with("No such file or directory (os error 2)") && s["invalid"] == 4)
                .then_some(s)
        },
    );
    let want = format!(
        "port gone: {}: No such file or directory (os error 2)",
        link.display()
    );
    assert_eq!(status["last_error"], want.as_str(), "{status}");
    let log = agent.log_text();
    assert!(log.contains("the device hung up (unplugged?)"), "{log}");

    // Plugged back: a new pty at the same link; the agent opens it again.
    let mut device = Device::plug(&link);
    device.wait_for_agent();
    let mut session = String::from(TAIL);
    for i in 40..50 {
        session.push_str(&expected.line(i, Some(90 + (i % 3) as u32), Some(80), Some(0.5)));
    }
    device.play(session.as_bytes());
    let status = wait_for_counts(&agent, expected.samples(), 5);
    assert_eq!(status["nulls"], expected.missing, "{status}");

    // Nothing printed for `silence`: one error, said in status.
    let status = wait_for("the silence warning", Duration::from_secs(30), || {
        let s = oxi(&agent)?;
        s["last_error"]
            .as_str()?
            .starts_with("silence: no line from ")
            .then_some(s)
    });
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.ends_with("for 3s")),
        "{status}"
    );

    // Every window landed: counts and means against the session.
    let want = |series: &str, values: &[f64]| {
        let sum: f64 = values.iter().sum();
        (series.to_owned(), values.len() as u64, sum)
    };
    let wanted = [
        want("oxi.bpm", &expected.bpm),
        want("oxi.pi", &expected.pi),
        want("oxi.spo2", &expected.spo2),
    ];
    let totals = wait_for(
        "every window in the archive",
        Duration::from_secs(60),
        || {
            let totals = ndjson_totals(&dir.path().join("archive"));
            let rows: Vec<(String, u64, f64)> = totals
                .lines()
                .map(|l| {
                    let mut parts = l.split('|');
                    (
                        parts.next().unwrap_or_default().to_owned(),
                        parts.next().and_then(|n| n.parse().ok()).unwrap_or(0),
                        parts
                            .next()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(f64::NAN),
                    )
                })
                .collect();
            let counts: Vec<u64> = rows.iter().map(|r| r.1).collect();
            (counts == wanted.iter().map(|w| w.1).collect::<Vec<_>>()).then_some(rows)
        },
    );
    for ((series, n, sum), (want_series, want_n, want_sum)) in totals.iter().zip(&wanted) {
        assert_eq!((series, n), (want_series, want_n));
        assert!(
            (sum - want_sum).abs() < 1e-9 * want_sum.abs().max(1.0),
            "{series}: sum of means × counts {sum}, the session's {want_sum}"
        );
    }
    let status = source_status(&agent.status(), "oxi").clone();
    assert_eq!(status["kind"], "serial", "{status}");
    assert_eq!(status["repeats"], 0, "{status}");
    let log = agent.log_text();
    assert!(log.contains("serial port open again"), "{log}");
    agent.terminate();
}
