//! `kind = "system"`: what every Linux machine has.
//!
//! Fields: `cpu_temp` (°C, from the first thermal zone, when there is one), `load1`,
//! `load5`, `load15`, `mem_available` (bytes), `mem_used` (percent) and `spool_free`
//! (bytes free on the spool's filesystem). All paths are taken under `root`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Batch, Series, Source, SourceError};
use crate::config;

pub struct SystemSource {
    root: PathBuf,
    spool_dir: PathBuf,
    cpu_temp: Arc<Series>,
    load: [Arc<Series>; 3],
    mem_available: Arc<Series>,
    mem_used: Arc<Series>,
    spool_free: Arc<Series>,
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
        SystemSource {
            root: config.root.clone(),
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

    fn under_root(&self, path: &str) -> PathBuf {
        self.root.join(path)
    }
}

#[async_trait::async_trait]
impl Source for SystemSource {
    async fn sample(&mut self, batch: &mut Batch) -> Result<(), SourceError> {
        let loadavg = read(&self.under_root("proc/loadavg")).await?;
        let loads = parse_loadavg(&loadavg).ok_or_else(|| SourceError::Parse {
            reason: format!("unexpected /proc/loadavg content {:?}", loadavg.trim()),
        })?;
        for (series, value) in self.load.iter().zip(loads) {
            batch.push_now(series, value);
        }

        let meminfo = read(&self.under_root("proc/meminfo")).await?;
        match parse_meminfo(&meminfo) {
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

        // Many virtual machines have no thermal zone: then the field is simply absent.
        if let Ok(text) = read(&self.under_root("sys/class/thermal/thermal_zone0/temp")).await {
            match text.trim().parse::<f64>() {
                Ok(milli) => batch.push_now(&self.cpu_temp, milli / 1000.0),
                Err(_) => batch.invalid.push(format!(
                    "thermal_zone0/temp holds {:?}, not a number",
                    text.trim()
                )),
            }
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

async fn read(path: &Path) -> Result<String, SourceError> {
    tokio::fs::read_to_string(path)
        .await
        .map_err(|err| SourceError::Read {
            path: path.display().to_string(),
            reason: err.to_string(),
        })
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
