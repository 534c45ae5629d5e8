//! `edgespool sensors`: what this machine's sysfs exposes, with ready `[[sources]]` entries.
//!
//! It looks where the kernel puts sensors a Pi has: thermal zones, hwmon chips (with their
//! channel labels), IIO devices (BME280, SHT3x, ADCs: processed `_input` channels, and
//! `_raw` ones with their `_scale` and `_offset`) and 1-wire thermometers. Each is read
//! once, converted to its unit as a `sysfs` source would, and given a `[[sources.files]]`
//! entry with the scale and unit that conversion used.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::config::FileFormat;
use crate::source::parse_file;

/// One sensor file.
#[derive(Debug, Clone, PartialEq)]
pub struct Sensor {
    /// `thermal`, `hwmon`, `iio` or `w1`.
    pub class: &'static str,
    /// The field name its entry gets (unique among the sensors found).
    pub field: String,
    /// The file, as the device sees it (without `--root`).
    pub path: PathBuf,
    /// The file's format.
    pub format: FileFormat,
    /// Multiplies the raw number.
    pub scale: f64,
    /// Added after scaling.
    pub offset: f64,
    /// The unit after scaling.
    pub unit: Option<&'static str>,
    /// The current value (scaled), or why it could not be read.
    pub value: Result<f64, String>,
}

/// Finds the sensors under `root` (`/` on the device itself).
pub fn discover(root: &Path) -> Vec<Sensor> {
    let mut found = Vec::new();
    thermal(root, &mut found);
    hwmon(root, &mut found);
    iio(root, &mut found);
    w1(root, &mut found);
    unique_fields(&mut found);
    found
}

/// `path` as the device names it, read under `root`.
fn under(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// The entries of a folder whose names start with `prefix`, sorted naturally
/// (`hwmon2` before `hwmon10`).
fn entries(dir: &Path, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    names.sort_by_key(|n| natural_key(n));
    names
}

fn natural_key(name: &str) -> (String, u64, String) {
    let digits_at = name
        .find(|c: char| c.is_ascii_digit())
        .unwrap_or(name.len());
    let (head, rest) = name.split_at(digits_at);
    let digits_end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let number = rest[..digits_end].parse().unwrap_or(0);
    (head.to_owned(), number, rest[digits_end..].to_owned())
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

/// Lower-case letters, digits and `_`: a field name that reads well in a series name.
fn field_name(parts: &[&str]) -> String {
    let mut name = String::new();
    for part in parts.iter().filter(|p| !p.is_empty()) {
        if !name.is_empty() {
            name.push('_');
        }
        for c in part.chars() {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() {
                name.push(c);
            } else if !name.ends_with('_') {
                name.push('_');
            }
        }
    }
    name.trim_matches('_').to_owned()
}

#[allow(clippy::too_many_arguments)]
fn push(
    found: &mut Vec<Sensor>,
    root: &Path,
    class: &'static str,
    field: String,
    path: String,
    format: FileFormat,
    (scale, offset): (f64, f64),
    unit: Option<&'static str>,
) {
    let full = under(root, &path);
    let value = std::fs::read_to_string(&full)
        .map_err(|e| e.to_string())
        .and_then(|text| parse_file(&text, format, Path::new(&path)))
        .map(|raw| raw * scale + offset);
    found.push(Sensor {
        class,
        field,
        path: PathBuf::from(path),
        format,
        scale,
        offset,
        unit,
        value,
    });
}

fn thermal(root: &Path, found: &mut Vec<Sensor>) {
    let base = "/sys/class/thermal";
    for zone in entries(&under(root, base), "thermal_zone") {
        let temp = format!("{base}/{zone}/temp");
        if !under(root, &temp).is_file() {
            continue;
        }
        let kind = read_trimmed(&under(root, &format!("{base}/{zone}/type")));
        let field = field_name(&[kind.as_deref().unwrap_or(&zone)]);
        let number = FileFormat::Number;
        push(
            found,
            root,
            "thermal",
            field,
            temp,
            number,
            (0.001, 0.0),
            Some("celsius"),
        );
    }
}

/// hwmon channel types: the file prefix, the scale to the unit, the unit.
const HWMON: &[(&str, f64, &str)] = &[
    ("temp", 0.001, "celsius"),
    ("in", 0.001, "volt"),
    ("curr", 0.001, "ampere"),
    ("power", 1e-6, "watt"),
    ("energy", 1e-6, "joule"),
    ("humidity", 0.001, "percent"),
    ("fan", 1.0, "rpm"),
];

fn hwmon(root: &Path, found: &mut Vec<Sensor>) {
    let base = "/sys/class/hwmon";
    for chip in entries(&under(root, base), "hwmon") {
        let dir = format!("{base}/{chip}");
        let name = read_trimmed(&under(root, &format!("{dir}/name"))).unwrap_or(chip.clone());
        for file in entries(&under(root, &dir), "") {
            let Some(channel) = file.strip_suffix("_input") else {
                continue;
            };
            let Some(&(_, scale, unit)) = HWMON.iter().find(|(prefix, _, _)| {
                channel
                    .strip_prefix(prefix)
                    .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
            }) else {
                continue;
            };
            let label = read_trimmed(&under(root, &format!("{dir}/{channel}_label")));
            let field = field_name(&[&name, label.as_deref().unwrap_or(channel)]);
            let path = format!("{dir}/{file}");
            let number = FileFormat::Number;
            push(
                found,
                root,
                "hwmon",
                field,
                path,
                number,
                (scale, 0.0),
                Some(unit),
            );
        }
    }
}

/// IIO channel types (after `in_`): the scale from the ABI's unit to ours, our unit.
const IIO: &[(&str, f64, Option<&str>)] = &[
    ("temp", 0.001, Some("celsius")),
    ("humidityrelative", 0.001, Some("percent")),
    ("pressure", 1.0, Some("kilopascal")),
    ("illuminance", 1.0, Some("lux")),
    ("intensity", 1.0, None),
    ("voltage", 0.001, Some("volt")),
    ("current", 0.001, Some("ampere")),
    ("concentration", 1.0, Some("percent")),
    ("resistance", 1.0, Some("ohm")),
    ("proximity", 1.0, None),
];

fn iio(root: &Path, found: &mut Vec<Sensor>) {
    let base = "/sys/bus/iio/devices";
    for device in entries(&under(root, base), "iio:device") {
        let dir = format!("{base}/{device}");
        let name = read_trimmed(&under(root, &format!("{dir}/name"))).unwrap_or(device.clone());
        let files = entries(&under(root, &dir), "in_");
        for file in &files {
            let (channel, raw) = match (file.strip_suffix("_input"), file.strip_suffix("_raw")) {
                (Some(channel), _) => (channel, false),
                (None, Some(channel)) => (channel, true),
                (None, None) => continue,
            };
            // A processed value is there: the raw one is not needed.
            if raw && files.contains(&format!("{channel}_input")) {
                continue;
            }
            let kind = channel.trim_start_matches("in_");
            let Some(&(_, to_unit, unit)) = IIO.iter().find(|(prefix, _, _)| {
                kind.strip_prefix(prefix).is_some_and(|rest| {
                    rest.is_empty() || rest.starts_with(|c: char| c.is_ascii_digit() || c == '_')
                })
            }) else {
                continue;
            };
            // (raw + offset) × scale in the ABI's unit, then to ours: the channel's own
            // `_scale`/`_offset`, or the type's shared one (`in_voltage_scale`).
            let (scale, offset) = if raw {
                let shared = kind.trim_end_matches(|c: char| c.is_ascii_digit());
                let number = |suffix: &str| {
                    [channel.to_owned(), format!("in_{shared}")]
                        .iter()
                        .find_map(|stem| {
                            read_trimmed(&under(root, &format!("{dir}/{stem}_{suffix}")))
                        })
                        .and_then(|t| t.parse::<f64>().ok())
                };
                let scale = number("scale").unwrap_or(1.0);
                let offset = number("offset").unwrap_or(0.0);
                (scale * to_unit, offset * scale * to_unit)
            } else {
                (to_unit, 0.0)
            };
            let field = field_name(&[&name, kind]);
            let path = format!("{dir}/{file}");
            push(
                found,
                root,
                "iio",
                field,
                path,
                FileFormat::Number,
                (scale, offset),
                unit,
            );
        }
    }
}

/// 1-wire families that are thermometers: DS18S20, DS1822, DS18B20, DS1825, DS28EA00.
const W1_THERMOMETERS: &[&str] = &["10-", "22-", "28-", "3b-", "42-"];

fn w1(root: &Path, found: &mut Vec<Sensor>) {
    let base = "/sys/bus/w1/devices";
    for device in entries(&under(root, base), "") {
        if !W1_THERMOMETERS.iter().any(|f| device.starts_with(f)) {
            continue;
        }
        let dir = format!("{base}/{device}");
        // Newer kernels have `temperature` (one number); every kernel has `w1_slave`.
        let (file, format) = if under(root, &format!("{dir}/temperature")).is_file() {
            ("temperature", FileFormat::Number)
        } else if under(root, &format!("{dir}/w1_slave")).is_file() {
            ("w1_slave", FileFormat::W1Slave)
        } else {
            continue;
        };
        let field = field_name(&["w1", &device]);
        let path = format!("{dir}/{file}");
        push(
            found,
            root,
            "w1",
            field,
            path,
            format,
            (0.001, 0.0),
            Some("celsius"),
        );
    }
}

/// Makes field names unique: the second `cpu_thermal` becomes `cpu_thermal_2`.
fn unique_fields(found: &mut [Sensor]) {
    let mut seen: Vec<String> = Vec::new();
    for sensor in found.iter_mut() {
        let base = sensor.field.clone();
        let mut n = 1;
        while seen.contains(&sensor.field) {
            n += 1;
            sensor.field = format!("{base}_{n}");
        }
        seen.push(sensor.field.clone());
    }
}

/// The listing and a `[[sources]]` entry to paste.
pub fn render(root: &Path, sensors: &[Sensor]) -> String {
    let mut out = String::new();
    if sensors.is_empty() {
        let _ = writeln!(
            out,
            "No sensors under {}: no thermal zones, hwmon inputs, IIO channels or 1-wire thermometers.",
            under(root, "/sys").display()
        );
        let _ = writeln!(
            out,
            "On a Pi, enable 1-wire or I2C sensors first (docs/raspberry-pi.md), then run this again."
        );
        return out;
    }
    let width = sensors.iter().map(|s| s.field.len()).max().unwrap_or(0);
    let _ = writeln!(out, "Sensors under {}:", root.display());
    for s in sensors {
        let value = match &s.value {
            Ok(v) => format!("{} {}", round(*v), s.unit.unwrap_or("")),
            Err(why) => format!("unreadable: {why}"),
        };
        let _ = writeln!(
            out,
            "  {:<7} {:<width$}  {:<22} {}",
            s.class,
            s.field,
            value.trim_end(),
            s.path.display()
        );
    }
    let _ = writeln!(
        out,
        "\n# Paste into the configuration (edgespool check-config tells if it is right);\n# keep the files you want."
    );
    let _ = writeln!(out, "[[sources]]\nkind = \"sysfs\"\nname = \"board\"");
    if root != Path::new("/") {
        let _ = writeln!(out, "root = {:?}", root.display().to_string());
    }
    out.push_str("interval = \"1s\"\n");
    for s in sensors {
        let now = match &s.value {
            Ok(v) => format!("{} {}", round(*v), s.unit.unwrap_or("")),
            Err(_) => "unreadable now".to_owned(),
        };
        let _ = writeln!(out, "\n# {} {}: {}", s.class, s.field, now.trim_end());
        let _ = writeln!(out, "[[sources.files]]");
        let _ = writeln!(out, "field = {:?}", s.field);
        let _ = writeln!(out, "path = {:?}", s.path.display().to_string());
        if s.format == FileFormat::W1Slave {
            let _ = writeln!(out, "format = \"w1_slave\"");
        }
        if s.scale != 1.0 {
            let _ = writeln!(out, "scale = {}", float(s.scale));
        }
        if s.offset != 0.0 {
            let _ = writeln!(out, "offset = {}", float(s.offset));
        }
        if let Some(unit) = s.unit {
            let _ = writeln!(out, "unit = {unit:?}");
        }
    }
    out
}

/// A value for a person: at most 3 decimals.
fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// A TOML float: always with a point or an exponent.
fn float(v: f64) -> String {
    let text = format!("{v:?}");
    if text.contains(['.', 'e', 'E']) {
        text
    } else {
        format!("{text}.0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = [
            ("sys/class/thermal/thermal_zone0/type", "cpu-thermal\n"),
            ("sys/class/thermal/thermal_zone0/temp", "48312\n"),
            ("sys/class/thermal/cooling_device0/type", "fan\n"),
            ("sys/class/hwmon/hwmon0/name", "cpu_thermal\n"),
            ("sys/class/hwmon/hwmon0/temp1_input", "48312\n"),
            ("sys/class/hwmon/hwmon2/name", "ina219\n"),
            ("sys/class/hwmon/hwmon2/in1_input", "5012\n"),
            ("sys/class/hwmon/hwmon2/in1_label", "VBUS\n"),
            ("sys/class/hwmon/hwmon2/power1_input", "2150000\n"),
            ("sys/class/hwmon/hwmon2/update_interval", "1000\n"),
            ("sys/bus/iio/devices/iio:device0/name", "bme280\n"),
            ("sys/bus/iio/devices/iio:device0/in_temp_input", "21370\n"),
            (
                "sys/bus/iio/devices/iio:device0/in_humidityrelative_input",
                "45123\n",
            ),
            (
                "sys/bus/iio/devices/iio:device0/in_pressure_input",
                "101.325\n",
            ),
            (
                "sys/bus/iio/devices/iio:device0/in_temp_oversampling_ratio",
                "2\n",
            ),
            ("sys/bus/iio/devices/iio:device1/name", "ads1015\n"),
            ("sys/bus/iio/devices/iio:device1/in_voltage0_raw", "1000\n"),
            ("sys/bus/iio/devices/iio:device1/in_voltage0_scale", "2.0\n"),
            (
                "sys/bus/w1/devices/28-0316a2790c2f/w1_slave",
                "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n",
            ),
            ("sys/bus/w1/devices/28-0516a27a1bff/temperature", "-1250\n"),
            ("sys/bus/w1/devices/w1_bus_master1/w1_master_slaves", "x\n"),
        ];
        for (path, text) in files {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        }
        dir
    }

    #[test]
    fn every_class_is_found_with_its_unit_and_value() {
        let dir = tree();
        let found = discover(dir.path());
        let summary: Vec<(&str, &str, Option<&str>, f64)> = found
            .iter()
            .map(|s| {
                (
                    s.class,
                    s.field.as_str(),
                    s.unit,
                    round(*s.value.as_ref().expect("readable")),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("thermal", "cpu_thermal", Some("celsius"), 48.312),
                ("hwmon", "cpu_thermal_temp1", Some("celsius"), 48.312),
                ("hwmon", "ina219_vbus", Some("volt"), 5.012),
                ("hwmon", "ina219_power1", Some("watt"), 2.15),
                ("iio", "bme280_humidityrelative", Some("percent"), 45.123),
                ("iio", "bme280_pressure", Some("kilopascal"), 101.325),
                ("iio", "bme280_temp", Some("celsius"), 21.37),
                ("iio", "ads1015_voltage0", Some("volt"), 2.0),
                ("w1", "w1_28_0316a2790c2f", Some("celsius"), 23.125),
                ("w1", "w1_28_0516a27a1bff", Some("celsius"), -1.25),
            ]
        );
        let w1 = &found[8];
        assert_eq!(w1.format, FileFormat::W1Slave);
        assert_eq!(
            w1.path,
            Path::new("/sys/bus/w1/devices/28-0316a2790c2f/w1_slave")
        );
    }

    #[test]
    fn the_snippet_is_a_valid_source_with_the_root() {
        let dir = tree();
        let found = discover(dir.path());
        let text = render(dir.path(), &found);
        let snippet = &text[text.find("[[sources]]").expect("a snippet")..];
        let config = format!(
            "[agent]\ndevice_id = \"t\"\nspool = \"/tmp/x.db\"\n\n{snippet}\n[[sinks]]\nkind = \"local\"\npath = \"/tmp/out\"\n"
        );
        let parsed = crate::config::Config::parse(&config, Path::new("t.toml"))
            .unwrap_or_else(|e| panic!("{e}\n{config}"));
        let crate::config::SourceKind::Sysfs(sysfs) = &parsed.sources[0].kind else {
            panic!("a sysfs source");
        };
        assert_eq!(sysfs.root, dir.path());
        assert_eq!(sysfs.files.len(), found.len());
        assert!(
            text.contains("# w1 w1_28_0316a2790c2f: 23.125 celsius\n"),
            "{text}"
        );
        assert!(text.contains("scale = 1e-6\n"), "{text}");
    }

    #[test]
    fn no_sensors_says_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = render(dir.path(), &discover(dir.path()));
        assert!(text.starts_with("No sensors under "), "{text}");
    }

    #[test]
    fn names_sort_naturally_and_read_well() {
        let mut names = vec!["hwmon10", "hwmon2", "hwmon1"];
        names.sort_by_key(|n| natural_key(n));
        assert_eq!(names, ["hwmon1", "hwmon2", "hwmon10"]);
        assert_eq!(field_name(&["coretemp", "Core 0"]), "coretemp_core_0");
        assert_eq!(field_name(&["cpu-thermal"]), "cpu_thermal");
    }
}
