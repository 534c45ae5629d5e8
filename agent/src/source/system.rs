//! `kind = "system"`: what every Linux machine has.
//!
//! Fields: `cpu_temp` (°C, from the first thermal zone, when there is one), `load1`,
//! `load5`, `load15`, `mem_available` (bytes), `mem_used` (percent) and `spool_free`
//! (bytes free on the spool's filesystem). All paths are taken under `root`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::kept::{KeptFile, OpenBudget};
use super::{Batch, Series, Source, SourceError};
use crate::config;

pub struct SystemSource {
    /// /proc/loadavg, /proc/meminfo and the first thermal zone, kept open between ticks.
    files: Arc<Mutex<[KeptFile; 3]>>,
    spool_dir: PathBuf,
    cpu_temp: Arc<Series>,
    load: [Arc<Series>; 3],
    mem_available: Arc<Series>,
    mem_used: Arc<Series>,
    spool_free: Arc<Series>,
}

/// What one tick read from the files, parsed.
struct Readings {
    loads: Result<[f64; 3], SourceError>,
    memory: Result<Option<(f64, f64)>, SourceError>,
    /// `None`: there is no thermal zone.
    cpu_temp: Option<Result<f64, String>>,
}

impl SystemSource {
    pub fn new(name: &str, config: &config::SystemSource, spool_path: &Path) -> SystemSource {
        let series = |field: &str, unit: Option<&str>| {
            Arc::new(Series::new(format!("{name}.{field}"), unit))
        };
        let spool_dir = match spool_path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        };
        let budget = OpenBudget::shared();
        let file = |path: &str| KeptFile::new(config.root.join(path), Arc::clone(&budget));
        SystemSource {
            files: Arc::new(Mutex::new([
                file("proc/loadavg"),
                file("proc/meminfo"),
                file("sys/class/thermal/thermal_zone0/temp"),
            ])),
            spool_dir,
            cpu_temp: series("cpu_temp", Some("celsius")),
            load: [
                series("load1", None),
                series("load5", None),
                series("load15", None),
            ],
            mem_available: series("mem_available", Some("bytes")),
            mem_used: series("mem_used", Some("percent")),
            spool_free: series("spool_free", Some("bytes")),
        }
    }
}

fn read_files(files: &mut [KeptFile; 3]) -> Readings {
    let [loadavg, meminfo, thermal] = files;
    let mut bytes = Vec::with_capacity(2048);
    let loads = read(loadavg, &mut bytes).and_then(|text| {
        parse_loadavg(text).ok_or_else(|| SourceError::Parse {
            reason: format!("unexpected /proc/loadavg content {:?}", text.trim()),
        })
    });
    let memory = read(meminfo, &mut bytes).map(parse_meminfo);
    // Many virtual machines have no thermal zone: then the field is simply absent.
    let cpu_temp = thermal.read(&mut bytes).ok().map(|text| {
        text.trim()
            .parse::<f64>()
            .map_err(|_| format!("thermal_zone0/temp holds {:?}, not a number", text.trim()))
    });
    Readings {
        loads,
        memory,
        cpu_temp,
    }
}

#[async_trait::async_trait]
impl Source for SystemSource {
    async fn sample(&mut self, batch: &mut Batch) -> Result<(), SourceError> {
        let files = Arc::clone(&self.files);
        let readings = tokio::task::spawn_blocking(move || {
            read_files(
                &mut files
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            )
        })
        .await
        .map_err(|err| SourceError::Read {
            path: "/proc files".to_owned(),
            reason: err.to_string(),
        })?;

        for (series, value) in self.load.iter().zip(readings.loads?) {
            batch.push_now(series, value);
        }

        match readings.memory? {
            Some((total, available)) => {
                batch.push_now(&self.mem_available, available);
                if total > 0.0 {
                    batch.push_now(&self.mem_used, 100.0 * (total - available) / total);
                }
            }
            None => batch
                .invalid
                .push("/proc/meminfo lacks MemTotal or MemAvailable".to_owned()),
        }

        match readings.cpu_temp {
            Some(Ok(milli)) => batch.push_now(&self.cpu_temp, milli / 1000.0),
            Some(Err(reason)) => batch.invalid.push(reason),
            None => {}
        }

        match rustix::fs::statvfs(&self.spool_dir) {
            Ok(fs) => {
                let free = fs.f_bavail as f64 * fs.f_frsize as f64;
                batch.push_now(&self.spool_free, free);
            }
            Err(err) => batch.errors.push(format!(
                "cannot stat the spool's filesystem at {}: {err}",
                self.spool_dir.display()
            )),
        }
        Ok(())
    }
}

fn read<'b>(file: &mut KeptFile, bytes: &'b mut Vec<u8>) -> Result<&'b str, SourceError> {
    match file.read(bytes) {
        Ok(text) => Ok(text),
        Err(err) => Err(SourceError::Read {
            path: file.path().display().to_string(),
            reason: err.to_string(),
        }),
    }
}

/// The three load averages of `/proc/loadavg`.
fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut parts = text.split_ascii_whitespace().map(str::parse::<f64>);
    Some([
        parts.next()?.ok()?,
        parts.next()?.ok()?,
        parts.next()?.ok()?,
    ])
}

/// MemTotal and MemAvailable of `/proc/meminfo`, in bytes.
fn parse_meminfo(text: &str) -> Option<(f64, f64)> {
    let field = |key: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .map(|kib| kib * 1024.0)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        assert_eq!(
            parse_loadavg("0.52 0.58 0.59 1/467 12345\n"),
            Some([0.52, 0.58, 0.59])
        );
        assert_eq!(parse_loadavg("garbage"), None);
        let meminfo = "MemTotal:        1000 kB\nMemFree:  10 kB\nMemAvailable:     250 kB\n";
        assert_eq!(parse_meminfo(meminfo), Some((1_024_000.0, 256_000.0)));
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
    }

    #[tokio::test]
    async fn a_thermal_zone_reading_nan_makes_no_sample_and_is_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |path: &str, text: &str| {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().expect("a folder")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        };
        write("proc/loadavg", "0.52 0.58 0.59 1/467 12345\n");
        write("proc/meminfo", "MemTotal: 1000 kB\nMemAvailable: 250 kB\n");
        write("sys/class/thermal/thermal_zone0/temp", "NaN\n");
        let config = config::SystemSource {
            name: None,
            interval: std::time::Duration::from_secs(1),
            timeout: std::time::Duration::from_secs(1),
            root: dir.path().to_owned(),
        };
        let mut source = SystemSource::new("system", &config, &dir.path().join("spool.db"));
        let mut batch = Batch::default();
        source.sample(&mut batch).await.expect("samples");
        assert!(
            batch
                .samples
                .iter()
                .all(|s| s.series.name != "system.cpu_temp"),
            "{:?}",
            batch.samples
        );
        assert_eq!(batch.samples.len(), 6, "loads, memory, spool");
        assert_eq!((batch.not_finite, batch.nulls), (1, 0));
        assert!(batch.invalid.is_empty(), "{:?}", batch.invalid);
    }
}
