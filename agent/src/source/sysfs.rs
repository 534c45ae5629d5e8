//! `kind = "sysfs"`: numbers from files, as hwmon, thermal, IIO and 1-wire expose them.
//!
//! Each file is one field. A file that vanishes or cannot be read is an error of that
//! field only; the other files of the source are still read. Files stay open between
//! ticks and are read again from offset 0 ([`super::kept`]); those on another file
//! system than sysfs are watched for replacement with one inotify descriptor per source.

use std::path::Path;
use std::sync::{Arc, Mutex};

use super::kept::{KeptFile, LinkWatch, OpenBudget};
use super::{Batch, Series, Source, SourceError};
use crate::config::{self, FileFormat};

pub struct SysfsSource {
    files: Arc<Mutex<Files>>,
}

/// The source's files and what the kernel tells of their links.
struct Files {
    files: Vec<File>,
    watch: LinkWatch,
}

struct File {
    file: KeptFile,
    format: FileFormat,
    scale: f64,
    offset: f64,
    series: Arc<Series>,
}

impl SysfsSource {
    pub fn new(name: &str, config: &config::SysfsSource) -> SysfsSource {
        SysfsSource::with_budget(name, config, OpenBudget::shared())
    }

    fn with_budget(
        name: &str,
        config: &config::SysfsSource,
        budget: Arc<OpenBudget>,
    ) -> SysfsSource {
        let files = config
            .files
            .iter()
            .map(|f| {
                let relative = f.path.strip_prefix("/").unwrap_or(&f.path);
                let format = f.format.unwrap_or_else(|| {
                    if f.path.file_name().is_some_and(|n| n == "w1_slave") {
                        FileFormat::W1Slave
                    } else {
                        FileFormat::Number
                    }
                });
                File {
                    file: KeptFile::new(config.root.join(relative), Arc::clone(&budget)),
                    format,
                    scale: f.scale,
                    offset: f.offset,
                    series: Series::new(format!("{name}.{}", f.field), f.unit.as_deref()).shared(),
                }
            })
            .collect();
        SysfsSource {
            files: Arc::new(Mutex::new(Files {
                files,
                watch: LinkWatch::new(),
            })),
        }
    }
}

#[async_trait::async_trait]
impl Source for SysfsSource {
    async fn sample(&mut self, batch: &mut Batch) -> Result<(), SourceError> {
        // Design: one hand-off to the blocking pool per tick, not one per file; sysfs
        // reads of I2C and 1-wire sensors can block for milliseconds.
        let files = Arc::clone(&self.files);
        // A tick whose reads outlived its timeout still holds the files: the next one
        // waits for it in the blocking pool.
        let mut filled = std::mem::take(batch);
        *batch = tokio::task::spawn_blocking(move || {
            let mut files = files
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            read_all(&mut files, &mut filled);
            filled
        })
        .await
        .map_err(|err| SourceError::Read {
            path: "sysfs files".to_owned(),
            reason: err.to_string(),
        })?;
        Ok(())
    }
}

fn read_all(files: &mut Files, batch: &mut Batch) {
    let mut bytes = Vec::with_capacity(256);
    files.watch.poll();
    for file in &mut files.files {
        let text = match file.file.read_watched(&mut bytes, &files.watch) {
            Ok(text) => text,
            Err(err) => {
                batch
                    .errors
                    .push(format!("cannot read {}: {err}", file.file.path().display()));
                continue;
            }
        };
        match parse_file(text, file.format, file.file.path()) {
            Ok(raw) => batch.push_now(&file.series, raw * file.scale + file.offset),
            Err(reason) => batch.invalid.push(reason),
        }
    }
}

/// The raw number a file holds, before scale and offset.
pub(crate) fn parse_file(text: &str, format: FileFormat, path: &Path) -> Result<f64, String> {
    match format {
        FileFormat::Number => {
            let trimmed = text.trim();
            trimmed
                .parse::<f64>()
                .map_err(|_| format!("{} holds {trimmed:?}, not a number", path.display()))
        }
        FileFormat::W1Slave => {
            parse_w1_slave(text).map_err(|why| format!("{}: {why}", path.display()))
        }
    }
}

/// The DS18B20 `w1_slave` format: the first line ends in `YES` when the CRC is good, the
/// second ends in `t=` and millidegrees Celsius. Returns the millidegrees.
fn parse_w1_slave(text: &str) -> Result<f64, String> {
    let mut lines = text.lines();
    let crc = lines.next().map(str::trim).unwrap_or_default();
    let reading = lines.next().map(str::trim).unwrap_or_default();
    if crc.ends_with("NO") {
        return Err("CRC check failed (NO): reading discarded".to_owned());
    }
    if !crc.ends_with("YES") {
        return Err(format!("first line {crc:?} does not end in YES or NO"));
    }
    let (_, value) = reading
        .rsplit_once("t=")
        .ok_or_else(|| format!("second line {reading:?} has no t= value"))?;
    value
        .parse::<i64>()
        .map(|milli| milli as f64)
        .map_err(|_| format!("t={value:?} is not a whole number of millidegrees"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn w1_slave_with_good_crc_gives_millidegrees() {
        let text = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n";
        assert_eq!(parse_w1_slave(text), Ok(23125.0));
        let negative = "ff ff : crc=57 YES\nff ff t=-1250\n";
        assert_eq!(parse_w1_slave(negative), Ok(-1250.0));
    }

    #[test]
    fn w1_slave_with_bad_crc_is_discarded() {
        let text = "72 01 4b 46 7f ff 0e 10 57 : crc=00 NO\n72 01 4b 46 7f ff 0e 10 57 t=85000\n";
        assert_eq!(
            parse_w1_slave(text),
            Err("CRC check failed (NO): reading discarded".into())
        );
        assert!(parse_w1_slave("").is_err());
        assert!(parse_w1_slave("x YES\nno value here\n").is_err());
    }

    #[test]
    fn a_file_reading_nan_or_inf_makes_no_sample_and_is_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in [("a", "nan\n"), ("b", "-inf\n"), ("c", "21500\n")] {
            std::fs::write(dir.path().join(name), text).expect("write");
        }
        let config = config::SysfsSource {
            name: "s".into(),
            interval: std::time::Duration::from_secs(1),
            timeout: std::time::Duration::from_secs(1),
            root: dir.path().to_owned(),
            files: ["a", "b", "c"]
                .iter()
                .map(|f| config::SysfsFile {
                    field: (*f).into(),
                    path: PathBuf::from(format!("/{f}")),
                    format: None,
                    scale: 0.001,
                    offset: 0.0,
                    unit: None,
                })
                .collect(),
        };
        let source = SysfsSource::new("s", &config);
        let mut batch = Batch::default();
        read_all(&mut source.files.lock().expect("not poisoned"), &mut batch);
        let values: Vec<f64> = batch.samples.iter().map(|s| s.value).collect();
        assert_eq!(values, [21.5]);
        assert_eq!((batch.not_finite, batch.nulls), (2, 0));
        assert!(batch.invalid.is_empty(), "{:?}", batch.invalid);
    }

    fn source_of(dir: &Path, names: &[&str], budget: Arc<OpenBudget>) -> SysfsSource {
        let config = config::SysfsSource {
            name: "s".into(),
            interval: std::time::Duration::from_secs(1),
            timeout: std::time::Duration::from_secs(1),
            root: dir.to_owned(),
            files: names
                .iter()
                .map(|f| config::SysfsFile {
                    field: (*f).into(),
                    path: PathBuf::from(format!("/{f}")),
                    format: None,
                    scale: 1.0,
                    offset: 0.0,
                    unit: None,
                })
                .collect(),
        };
        SysfsSource::with_budget("s", &config, budget)
    }

    fn values(source: &SysfsSource) -> (Vec<f64>, Vec<String>) {
        let mut batch = Batch::default();
        read_all(&mut source.files.lock().expect("not poisoned"), &mut batch);
        (
            batch.samples.iter().map(|s| s.value).collect(),
            batch.errors,
        )
    }

    #[test]
    fn files_replaced_or_removed_and_made_again_are_read_with_their_new_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in [("a", "1\n"), ("b", "2\n"), ("c", "3\n")] {
            std::fs::write(dir.path().join(name), text).expect("write");
        }
        let budget = OpenBudget::new(16);
        let source = source_of(dir.path(), &["a", "b", "c"], Arc::clone(&budget));
        assert_eq!(values(&source), (vec![1.0, 2.0, 3.0], vec![]));
        assert_eq!(budget.kept(), 3, "every file is kept open");
        assert_eq!(values(&source), (vec![1.0, 2.0, 3.0], vec![]));
        let checks = |source: &SysfsSource| -> u64 {
            let files = source.files.lock().expect("not poisoned");
            files.files.iter().map(|f| f.file.link_checks()).sum()
        };
        assert_eq!(checks(&source), 0, "unchanged files: no link check");

        // a: rewritten in place; b: a new file renamed over it; c: removed.
        std::fs::write(dir.path().join("a"), "10\n").expect("rewrite");
        std::fs::write(dir.path().join("b.new"), "20\n").expect("write");
        std::fs::rename(dir.path().join("b.new"), dir.path().join("b")).expect("rename");
        std::fs::remove_file(dir.path().join("c")).expect("remove");
        let (read, errors) = values(&source);
        assert_eq!(read, [10.0, 20.0]);
        let gone = dir.path().join("c");
        assert_eq!(
            errors,
            [format!(
                "cannot read {}: No such file or directory (os error 2)",
                gone.display()
            )]
        );
        assert_eq!(budget.kept(), 2);
        assert_eq!(checks(&source), 2, "b and c, which the kernel told of");

        std::fs::write(dir.path().join("c"), "30\n").expect("made again");
        assert_eq!(values(&source), (vec![10.0, 20.0, 30.0], vec![]));
        assert_eq!(budget.kept(), 3);
    }

    #[test]
    fn files_beyond_the_budget_are_still_read_every_tick() {
        let dir = tempfile::tempdir().expect("tempdir");
        let names = ["a", "b", "c", "d"];
        for name in names {
            std::fs::write(dir.path().join(name), "1\n").expect("write");
        }
        let budget = OpenBudget::new(1);
        let source = source_of(dir.path(), &names, Arc::clone(&budget));
        assert_eq!(values(&source).0, [1.0; 4]);
        for (i, name) in names.iter().enumerate() {
            std::fs::write(dir.path().join(name), format!("{}\n", i + 5)).expect("write");
        }
        assert_eq!(values(&source).0, [5.0, 6.0, 7.0, 8.0]);
        assert_eq!(budget.kept(), 1);
    }

    #[test]
    fn number_files_are_trimmed() {
        let p = Path::new("/sys/x");
        assert_eq!(parse_file("48312\n", FileFormat::Number, p), Ok(48312.0));
        assert_eq!(
            parse_file("N/A\n", FileFormat::Number, p),
            Err("/sys/x holds \"N/A\", not a number".into())
        );
    }
}
