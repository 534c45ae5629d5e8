//! The command line: `run`, `status`, `check-config`, `example-config` and `sensors`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::clock;
use crate::config::{self, Config, Format, Layout, SinkKind, SourceKind, Store};

/// Edge agent for the Raspberry Pi: samples sensors and APIs, aggregates them into
/// windows, spools them in SQLite and uploads closed partitions.
#[derive(Debug, Parser)]
#[command(name = "edgespool", version, about)]
pub struct Cli {
    /// Log filter, e.g. "info", "debug" or "edgespool=debug" (RUST_LOG overrides it).
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent until SIGTERM or SIGINT.
    Run {
        /// The configuration file.
        #[arg(long, short, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Show what the agent is doing, read from its spool (works with or without the daemon).
    Status {
        /// The configuration file, to find the spool.
        #[arg(long, short, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
        /// Read this spool file instead of the one the configuration names.
        #[arg(long)]
        spool: Option<PathBuf>,
        /// Print JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Validate the configuration and print what would run.
    CheckConfig {
        /// The configuration file.
        #[arg(long, short, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Print a commented example configuration.
    ExampleConfig,
    /// List the sensors this machine exposes (thermal zones, hwmon, IIO, 1-wire) with
    /// their values, and a `[[sources]]` entry to paste.
    Sensors {
        /// Look under this folder instead of `/` (a copy or fake of a device's /sys).
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
}

/// Parses the command line and runs the command; errors go to stderr with exit code 1
/// (2 for a bad command line, as clap does).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.log_level);
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config } => {
            let config = Config::load(&config)?;
            crate::memory::tune_allocator();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(async {
                let shutdown = shutdown_signal().context("cannot install signal handlers")?;
                crate::run(config, shutdown).await?;
                Ok(())
            })
        }
        Command::Status {
            config,
            spool,
            json,
        } => {
            let spool = match spool {
                Some(path) => path,
                None => Config::load(&config)?.agent.spool,
            };
            if !spool.exists() {
                anyhow::bail!(
                    "no spool at {}: the agent has not run with this configuration yet",
                    spool.display()
                );
            }
            let now = clock::now_ms();
            let status = crate::status::read(&spool, now)
                .with_context(|| format!("cannot read the spool {}", spool.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", crate::status::render(&status, now));
            }
            Ok(())
        }
        Command::CheckConfig { config: path } => {
            let config = Config::load(&path)?;
            print!("{}", describe(&config, &path));
            Ok(())
        }
        Command::ExampleConfig => {
            print!("{}", config::EXAMPLE);
            Ok(())
        }
        Command::Sensors { root } => {
            let found = crate::sensors::discover(&root);
            print!("{}", crate::sensors::render(&root, &found));
            Ok(())
        }
    }
}

/// One line per event on stderr, as journald wants it; no colours unless a terminal.
fn init_tracing(level: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    // Design: `Targets` reads "info,edgespool=debug" like RUST_LOG does, without the
    // regex engines of `EnvFilter`: a smaller binary, fewer resident pages on the Pi.
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<Targets>().ok());
    let filter = from_env
        .or_else(|| level.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    let format = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let _ = tracing_subscriber::registry()
        .with(format)
        .with(filter)
        .try_init();
}

/// Completes at the first SIGTERM or SIGINT.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

/// What `check-config` prints: what would run, secrets shown as `<secret>`.
pub fn describe(config: &Config, path: &Path) -> String {
    let a = &config.agent;
    let mut out = String::new();
    let _ = writeln!(out, "{}: configuration is valid", path.display());
    let _ = writeln!(out, "device     {}", config.device_id());
    let _ = writeln!(
        out,
        "spool      {} (budget {}, when full: {:?})",
        a.spool.display(),
        a.disk_budget.display().iec(),
        a.when_full
    );
    let _ = writeln!(
        out,
        "windows    {}s, partitions {}s, grace {}",
        a.window.get(),
        a.partition.get(),
        humantime::format_duration(a.grace)
    );
    for s in &config.sources {
        let every = humantime::format_duration(s.interval);
        let timeout = humantime::format_duration(s.timeout);
        let detail = match &s.kind {
            SourceKind::System(sys) => format!("root {}", sys.root.display()),
            SourceKind::Sysfs(sysfs) => {
                let files: Vec<String> = sysfs
                    .files
                    .iter()
                    .map(|f| {
                        format!(
                            "{}={}",
                            f.field,
                            sysfs
                                .root
                                .join(f.path.strip_prefix("/").unwrap_or(&f.path))
                                .display()
                        )
                    })
                    .collect();
                files.join(", ")
            }
            SourceKind::Serial(serial) => {
                let parity = match serial.parity {
                    crate::config::Parity::None => 'N',
                    crate::config::Parity::Odd => 'O',
                    crate::config::Parity::Even => 'E',
                };
                format!(
                    "{} at {} baud, {}{}{}, flow control {}, {} lines",
                    serial.port.display(),
                    serial.baud,
                    serial.data_bits,
                    parity,
                    serial.stop_bits,
                    format!("{:?}", serial.flow_control).to_lowercase(),
                    format!("{:?}", serial.format).to_lowercase()
                )
            }
            SourceKind::Mqtt(mqtt) => {
                let topics: Vec<&str> = mqtt
                    .subscriptions
                    .iter()
                    .map(|s| s.topic.as_str())
                    .collect();
                format!(
                    "{} as {}, QoS {}{}; topics {}",
                    mqtt.connection.url,
                    mqtt.connection
                        .client_id
                        .clone()
                        .unwrap_or_else(|| format!("edgespool-{}", s.name)),
                    mqtt.qos,
                    if mqtt.connection.password.is_some() || mqtt.connection.password_file.is_some()
                    {
                        ", password <secret>"
                    } else {
                        ""
                    },
                    topics.join(", ")
                )
            }
            SourceKind::Listen(listen) => {
                let detail = format!(
                    "serves http://{}/ (/api/v2/write, /write, /samples), token {}, max_body {}, max_lines {}",
                    listen.address,
                    if listen.token().is_some() {
                        "<secret>"
                    } else {
                        "none"
                    },
                    listen.max_body,
                    listen.max_lines
                );
                let _ = writeln!(out, "source     {} (listen): {detail}", s.name);
                continue;
            }
            SourceKind::Http(http) => {
                let mut d = format!("GET {}", http.url);
                let secrets: Vec<&String> = http
                    .query
                    .keys()
                    .chain(http.headers.keys())
                    .chain(http.header_files.keys())
                    .collect();
                if !secrets.is_empty() {
                    let names: Vec<String> =
                        secrets.iter().map(|k| format!("{k}=<secret>")).collect();
                    let _ = write!(d, " with {}", names.join(", "));
                }
                let fields = http.fields.len();
                match &http.table {
                    Some(t) => {
                        let _ = write!(
                            d,
                            "; table keyed by {:?}, columns {}",
                            t.key,
                            t.columns.join(", ")
                        );
                    }
                    None => {
                        let _ = write!(d, "; {fields} fields");
                    }
                }
                d
            }
        };
        let _ = writeln!(
            out,
            "source     {} ({}) every {every}, timeout {timeout}: {detail}",
            s.name,
            s.kind.word()
        );
    }
    for s in &config.sinks {
        let object = match &s.kind {
            SinkKind::Object(object) => object,
            SinkKind::Postgres(pg) => {
                #[cfg(feature = "postgres")]
                let at = crate::sink::postgres_location(pg);
                #[cfg(not(feature = "postgres"))]
                let at = "postgres (not in this build)".to_owned();
                let _ = writeln!(
                    out,
                    "sink       {} (postgres): {}.{} at {}, sslmode {:?}",
                    s.name, pg.schema, pg.table, at, pg.sslmode
                );
                continue;
            }
            SinkKind::Mqtt(mqtt) => {
                let _ = writeln!(
                    out,
                    "sink       {} (mqtt, live): {} to {} at qos {}{}, skipping windows older than {}",
                    s.name,
                    mqtt.connection.url,
                    mqtt.topic,
                    mqtt.qos,
                    if mqtt.retain { ", retained" } else { "" },
                    humantime::format_duration(mqtt.max_age)
                );
                continue;
            }
        };
        let place = match &object.store {
            Store::Local(local) => local.path.display().to_string(),
            Store::S3(s3) => match &s3.endpoint {
                Some(endpoint) => format!("s3://{} at {endpoint}", s3.bucket),
                None => format!("s3://{}", s3.bucket),
            },
            Store::Gcs(gcs) => format!("gs://{}", gcs.bucket),
            Store::Azure(azure) => format!("az://{}/{}", azure.account, azure.container),
        };
        let mut detail = format!(
            "{place} as {} ({} layout",
            object.format.word(),
            match object.layout {
                Layout::Long => "long",
                Layout::Wide => "wide",
            }
        );
        if object.format == Format::Parquet {
            let _ = write!(detail, ", {:?}", object.compression);
        } else if object.compression != config::Compression::None {
            let _ = write!(detail, ", {}", object.compression.word());
        }
        if object.keys == config::Keys::Padded {
            detail.push_str(", padded keys");
        }
        detail.push(')');
        if !object.prefix.is_empty() {
            let _ = write!(detail, ", prefix {}", object.prefix);
        }
        let _ = writeln!(out, "sink       {} ({}): {detail}", s.name, s.kind.word());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_config_names_a_text_codec_and_padded_keys() {
        let text = "[agent]\ndevice_id = \"pi-1\"\nspool = \"/nonexistent/edgespool/spool.db\"\n\n\
                    [[sources]]\nkind = \"system\"\n\n\
                    [[sinks]]\nkind = \"local\"\npath = \"/nonexistent/edgespool/out\"\ncompression = \"gzip\"\nkeys = \"padded\"\n\n\
                    [[sinks]]\nkind = \"local\"\nname = \"plain\"\npath = \"/nonexistent/edgespool/plain\"\n";
        let path = Path::new("x.toml");
        let config = Config::parse(text, path).expect("valid");
        let described = describe(&config, path);
        assert!(
            described
                .contains("/nonexistent/edgespool/out as ndjson (long layout, gzip, padded keys)"),
            "{described}"
        );
        assert!(
            described.contains("/nonexistent/edgespool/plain as ndjson (long layout)"),
            "{described}"
        );
    }
}
