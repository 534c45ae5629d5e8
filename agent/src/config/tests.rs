//! The configuration tests: parsing, defaults, checks and located errors.

use std::time::Duration;

use super::secret::expand_env;
use super::*;

const MINIMAL: &str = r#"
[agent]
device_id = "pi-1"
spool = "/nonexistent/edgespool/spool.db"

[[sources]]
kind = "system"

[[sinks]]
kind = "local"
path = "/nonexistent/edgespool/out"
"#;

fn error_of(text: &str) -> String {
    Config::parse(text, Path::new("edgespool.toml"))
        .expect_err("this configuration must be rejected")
        .to_string()
}

fn with_sink(sink: &str) -> String {
    MINIMAL.replace(
        "[[sinks]]\nkind = \"local\"\npath = \"/nonexistent/edgespool/out\"\n",
        sink,
    )
}

#[cfg_attr(not(feature = "full"), ignore = "names kinds the lean set lacks")]
#[test]
fn an_s3_sink_gets_the_lake_defaults() {
    let text = with_sink("[[sinks]]\nkind = \"s3\"\nbucket = \"lake\"\n");
    let config = Config::parse(&text, Path::new("x.toml")).expect("valid");
    let sink = &config.sinks[0];
    assert_eq!(sink.name, "s3");
    let SinkKind::Object(object) = &sink.kind else {
        panic!("an object sink");
    };
    assert_eq!(
        (object.format, object.layout, object.compression),
        (Format::Parquet, Layout::Long, Compression::Zstd)
    );
    assert_eq!(object.keys, Keys::Unpadded);
    assert_eq!(object.part_size, 8 * 1024 * 1024);
    assert_eq!(object.timeout, Duration::from_secs(30));
    let Store::S3(s3) = &object.store else {
        panic!("an s3 store: {object:?}");
    };
    assert!(s3.path_style && s3.endpoint.is_none() && s3.access_key_id.is_none());
}

#[cfg_attr(not(feature = "full"), ignore = "names kinds the lean set lacks")]
#[test]
fn late_rows_wait_an_hour_by_default_and_late_grace_parses_like_other_durations() {
    let late = |sink: &str| {
        let config = Config::parse(&with_sink(sink), Path::new("x.toml")).expect("valid");
        config.sinks[0].kind.late_parts()
    };
    let local = "[[sinks]]\nkind = \"local\"\npath = \"/o\"\n";
    assert_eq!(
        late(local).map(|(grace, rows)| (grace.as_secs(), rows.get())),
        Some((3600, 10_000))
    );
    let short = format!("{local}late_grace = \"5s\"\nlate_max_rows = 50\n");
    assert_eq!(
        late(&short).map(|(grace, rows)| (grace, rows.get())),
        Some((Duration::from_secs(5), 50))
    );
    let off = format!("{local}late_grace = \"0s\"\n");
    assert_eq!(late(&off).map(|(grace, _)| grace), Some(Duration::ZERO));
    let pg = "[[sinks]]\nkind = \"postgres\"\nhost = \"db\"\n";
    assert_eq!(late(pg), None, "PostgreSQL merges late rows in place");
    assert_eq!(
        error_of(&with_sink(&format!("{local}late_grace = \"soon\"\n"))),
        "edgespool.toml:12:14: invalid duration \"soon\" (expected number at 0); write it like \
         \"500ms\", \"10s\", \"5m\" or \"1h\""
    );
    assert_eq!(
        error_of(&with_sink(&format!("{local}late_max_rows = 0\n"))),
        "edgespool.toml:12:17: invalid value: integer `0`, expected a nonzero u32"
    );
}

#[cfg_attr(not(feature = "full"), ignore = "names kinds the lean set lacks")]
#[test]
fn chunk_rows_defaults_to_ten_thousand_and_refuses_zero_at_its_line_and_column() {
    let chunk = |sink: &str| {
        let config = Config::parse(&with_sink(sink), Path::new("x.toml")).expect("valid");
        config.sinks[0].kind.chunk_rows().get()
    };
    let local = "[[sinks]]\nkind = \"local\"\npath = \"/o\"\n";
    assert_eq!(chunk(local), 10_000);
    assert_eq!(chunk(&format!("{local}chunk_rows = 2000\n")), 2_000);
    assert_eq!(
        chunk("[[sinks]]\nkind = \"postgres\"\nhost = \"db\"\n"),
        10_000,
        "PostgreSQL reads with the default (it has no such key)"
    );
    assert_eq!(
        error_of(&with_sink(&format!("{local}chunk_rows = 0\n"))),
        "edgespool.toml:12:14: invalid value: integer `0`, expected a nonzero u32"
    );
}

#[test]
#[cfg_attr(not(feature = "gcs"), ignore = "names kinds the lean set lacks")]
fn a_gcs_sink_takes_an_endpoint_and_no_credentials() {
    let text = with_sink(
        "[[sinks]]\nkind = \"gcs\"\nbucket = \"lake\"\nendpoint = \"http://127.0.0.1:4443\"\nanonymous = true\n",
    );
    let config = Config::parse(&text, Path::new("x.toml")).expect("valid");
    let SinkKind::Object(object) = &config.sinks[0].kind else {
        panic!("an object sink");
    };
    let Store::Gcs(gcs) = &object.store else {
        panic!("a gcs store: {object:?}");
    };
    assert_eq!(gcs.endpoint.as_deref(), Some("http://127.0.0.1:4443"));
    assert!(gcs.anonymous && gcs.service_account_key.is_none());
    let text = with_sink("[[sinks]]\nkind = \"gcs\"\nbucket = \"lake\"\n");
    let config = Config::parse(&text, Path::new("x.toml")).expect("valid");
    let SinkKind::Object(object) = &config.sinks[0].kind else {
        panic!("an object sink");
    };
    let Store::Gcs(gcs) = &object.store else {
        panic!("a gcs store: {object:?}");
    };
    assert!(
        gcs.endpoint.is_none() && !gcs.anonymous,
        "Google, with credentials"
    );
}

#[cfg_attr(not(feature = "full"), ignore = "names kinds the lean set lacks")]
#[test]
fn an_unknown_sink_key_lists_what_that_kind_accepts() {
    let text = with_sink("[[sinks]]\nkind = \"gcs\"\nbucket = \"b\"\n  region = \"x\"\n");
    assert_eq!(
        error_of(&text),
        "edgespool.toml:12:3: unknown key `region` for a sink of kind \"gcs\"; expected one of \
         `anonymous`, `bucket`, `chunk_rows`, `compression`, `endpoint`, `format`, `keys`, `late_grace`, `late_max_rows`, \
         `layout`, `name`, `part_size`, `prefix`, `retry_max`, `service_account_key`, \
         `service_account_key_file`, `timeout`"
    );
    let text = with_sink("[[sinks]]\nkind = \"local\"\npath = \"/o\"\ntimeout = \"1s\"\n");
    assert!(
        error_of(&text)
            .starts_with("edgespool.toml:12:1: unknown key `timeout` for a sink of kind \"local\""),
        "a local folder has no request timeout"
    );
}

#[cfg_attr(not(feature = "full"), ignore = "names kinds the lean set lacks")]
#[test]
fn sink_settings_that_cannot_work_are_refused() {
    let cases = [
        (
            "kind = \"s3\"\nbucket = \"b\"\nendpoint = \"minio:9000\"",
            "sink \"s3\": endpoint \"minio:9000\" must start with https:// or http://",
        ),
        (
            "kind = \"gcs\"\nbucket = \"b\"\nendpoint = \"127.0.0.1:4443\"",
            "sink \"gcs\": endpoint \"127.0.0.1:4443\" must start with https:// or http://",
        ),
        (
            "kind = \"gcs\"\nbucket = \"b\"\nanonymous = true\nservice_account_key = \"{}\"",
            "sink \"gcs\": anonymous = true sends no credentials; remove the service account key or anonymous",
        ),
        (
            "kind = \"s3\"\nbucket = \"b\"\naccess_key_id = \"a\"",
            "sink \"s3\": give both access_key_id and secret_access_key, or neither (to use the environment or the instance profile)",
        ),
        (
            "kind = \"azure\"\naccount = \"a\"\ncontainer = \"c\"\nclient_id = \"i\"",
            "sink \"azure\": a service principal needs client_id, client_secret and tenant_id",
        ),
        (
            "kind = \"s3\"\nbucket = \"b\"\npart_size = \"1 MiB\"",
            "sink \"s3\": part_size must be at least 5 MiB (the smallest part S3 accepts)",
        ),
    ];
    for (sink, message) in cases {
        let error = error_of(&with_sink(&format!("[[sinks]]\n{sink}\n")));
        assert!(error.ends_with(message), "{error}");
    }
}

#[cfg_attr(not(feature = "full"), ignore = "names kinds the lean set lacks")]
#[test]
fn text_formats_take_gzip_or_zstd_and_parquet_its_own_codecs() {
    let parse = |sink: &str| {
        let config = Config::parse(
            &with_sink(&format!("[[sinks]]\n{sink}\n")),
            Path::new("x.toml"),
        )
        .expect("valid");
        let SinkKind::Object(object) = &config.sinks[0].kind else {
            panic!("an object sink");
        };
        (object.format, object.compression, object.keys)
    };
    assert_eq!(
        parse("kind = \"local\"\npath = \"/o\""),
        (Format::Ndjson, Compression::None, Keys::Unpadded),
        "text is not compressed unless asked"
    );
    assert_eq!(
        parse(
            "kind = \"local\"\npath = \"/o\"\nformat = \"csv\"\ncompression = \"gzip\"\nkeys = \"padded\""
        ),
        (Format::Csv, Compression::Gzip, Keys::Padded)
    );
    assert_eq!(
        parse("kind = \"s3\"\nbucket = \"b\"\nformat = \"json_seq\"\ncompression = \"zstd\""),
        (Format::JsonSeq, Compression::Zstd, Keys::Unpadded)
    );
    assert_eq!(
        error_of(&with_sink(
            "[[sinks]]\nkind = \"local\"\npath = \"/o\"\ncompression = \"snappy\"\n"
        )),
        "edgespool.toml:12:15: compression \"snappy\" does not apply to format = \"ndjson\", \
         which takes \"gzip\", \"zstd\" or \"none\""
    );
    assert_eq!(
        error_of(&with_sink(
            "[[sinks]]\nkind = \"s3\"\nbucket = \"b\"\ncompression = \"gzip\"\n"
        )),
        "edgespool.toml:12:15: compression \"gzip\" does not apply to format = \"parquet\", \
         which takes \"zstd\", \"snappy\" or \"none\""
    );
    let keys = error_of(&with_sink(
        "[[sinks]]\nkind = \"local\"\npath = \"/o\"\nkeys = \"hive\"\n",
    ));
    assert!(
        keys.starts_with(
            "edgespool.toml:12:8: unknown variant `hive`, expected `unpadded` or `padded`"
        ),
        "{keys}"
    );
}

#[cfg_attr(not(feature = "full"), ignore = "names kinds the lean set lacks")]
#[test]
fn an_mqtt_sink_is_a_live_feed_and_is_checked() {
    let local = "[[sinks]]\nkind = \"local\"\npath = \"/nonexistent/edgespool/out\"\n";
    let feed = "[[sinks]]\nkind = \"mqtt\"\nurl = \"mqtt://127.0.0.1\"\n";
    let config =
        Config::parse(&with_sink(&format!("{local}{feed}")), Path::new("x.toml")).expect("valid");
    let SinkKind::Mqtt(mqtt) = &config.sinks[1].kind else {
        panic!("an mqtt sink");
    };
    assert_eq!(config.sinks[1].name, "mqtt");
    assert!(config.sinks[1].kind.is_live() && !config.sinks[0].kind.is_live());
    assert_eq!(
        (mqtt.topic.as_str(), mqtt.availability_topic.as_str()),
        (
            "edgespool/{device}/{series}",
            "edgespool/{device}/availability"
        )
    );
    assert_eq!(
        (mqtt.qos, mqtt.retain, mqtt.max_age.as_secs()),
        (1, false, 600)
    );
    assert!(
        error_of(&with_sink(feed)).ends_with(
            "an mqtt sink is a live feed that keeps nothing: add a sink that keeps the windows, e.g. kind = \"local\""
        )
    );
    let cases = [
        (
            "topic = \"pi/{host}/{series}\"",
            "sink \"mqtt\": topic \"pi/{host}/{series}\": unknown {host}; use {device} or {series}",
        ),
        (
            "availability_topic = \"pi/{series}/up\"",
            "sink \"mqtt\": availability_topic \"pi/{series}/up\": unknown {series}; use {device}",
        ),
        (
            "topic = \"pi/+/{series}\"",
            "sink \"mqtt\": topic \"pi/+/{series}\": a topic to publish to has no wildcards",
        ),
        ("qos = 2", "sink \"mqtt\": qos must be 0 or 1"),
    ];
    for (keys, message) in cases {
        let error = error_of(&with_sink(&format!("{local}{feed}{keys}\n")));
        assert!(error.ends_with(message), "{error}");
    }
    let url = error_of(&with_sink(&format!(
        "{local}[[sinks]]\nkind = \"mqtt\"\nurl = \"tcp://broker\"\n"
    )));
    assert!(
        url.ends_with("sink \"mqtt\": url must be mqtt://host[:port] or mqtts://host[:port]"),
        "{url}"
    );
}

#[cfg_attr(not(feature = "full"), ignore = "names kinds the lean set lacks")]
#[test]
fn a_postgres_sink_is_checked() {
    let ok = with_sink("[[sinks]]\nkind = \"postgres\"\nurl = \"postgres://pi@db/sensors\"\n");
    let config = Config::parse(&ok, Path::new("x.toml")).expect("valid");
    let SinkKind::Postgres(pg) = &config.sinks[0].kind else {
        panic!("a postgres sink");
    };
    assert_eq!(
        (pg.schema.as_str(), pg.table.as_str(), pg.sslmode),
        ("public", "edgespool_windows", SslMode::Prefer)
    );
    let cases = [
        (
            "host = \"db\"\ntable = \"Windows\"",
            "table \"Windows\" must be a lower-case SQL name: letters, digits and _, not starting with a digit",
        ),
        ("dbname = \"x\"", "sink \"postgres\": give `url` or `host`"),
        (
            "host = \"db\"\nca_file = \"/ca.pem\"",
            "sink \"postgres\": ca_file is used only with sslmode = \"verify-full\"",
        ),
    ];
    for (keys, message) in cases {
        let error = error_of(&with_sink(&format!(
            "[[sinks]]\nkind = \"postgres\"\n{keys}\n"
        )));
        assert!(error.ends_with(message), "{error}");
    }
    let bad = with_sink("[[sinks]]\nkind = \"postgres\"\nhost = \"db\"\nsslmode = \"verify-ca\"\n");
    assert!(
        error_of(&bad).contains("unknown variant `verify-ca`"),
        "{}",
        error_of(&bad)
    );
}

#[cfg_attr(not(feature = "full"), ignore = "names kinds the lean set lacks")]
#[test]
fn a_postgres_sink_delivers_each_flush_unless_told_hourly_and_object_stores_have_no_such_key() {
    let each = |keys: &str| {
        let text = with_sink(&format!(
            "[[sinks]]\nkind = \"postgres\"\nhost = \"db\"\n{keys}"
        ));
        let config = Config::parse(&text, Path::new("x.toml")).expect("valid");
        config.sinks[0].kind.delivers_each_flush()
    };
    assert!(each(""));
    assert!(each("deliver = \"each_flush\"\n"));
    assert!(!each("deliver = \"hourly\"\n"));
    let bad = with_sink("[[sinks]]\nkind = \"postgres\"\nhost = \"db\"\ndeliver = \"often\"\n");
    assert!(
        error_of(&bad).contains("unknown variant `often`, expected `each_flush` or `hourly`"),
        "{}",
        error_of(&bad)
    );
    let local = with_sink("[[sinks]]\nkind = \"local\"\npath = \"/o\"\n");
    let config = Config::parse(&local, Path::new("x.toml")).expect("valid");
    assert!(!config.sinks[0].kind.delivers_each_flush());
    let object =
        with_sink("[[sinks]]\nkind = \"local\"\npath = \"/o\"\ndeliver = \"each_flush\"\n");
    assert!(
        error_of(&object).contains("deliver"),
        "{}",
        error_of(&object)
    );
}

#[test]
fn mqtt_subscriptions_are_checked() {
    let source = |sub: &str| {
        MINIMAL.replace(
            "kind = \"system\"",
            &format!("kind = \"mqtt\"\nname = \"m\"\nurl = \"mqtt://127.0.0.1\"\n[[sources.subscriptions]]\n{sub}"),
        )
    };
    let ok =
        source("topic = \"tele/+/SENSOR\"\npayload = \"flatten\"\nseries = \"{topic.1}.{field}\"");
    Config::parse(&ok, Path::new("x.toml")).expect("valid");
    let cases = [
        (
            "topic = \"a/#/b\"\npayload = \"number\"",
            "topic filter \"a/#/b\": `+` must be a whole level and `#` the whole last level",
        ),
        (
            "topic = \"a/b+\"\npayload = \"number\"",
            "topic filter \"a/b+\": `+` must be a whole level and `#` the whole last level",
        ),
        (
            "topic = \"a\"\npayload = \"json\"",
            "topic \"a\": payload = \"json\" needs [[sources.subscriptions.fields]]",
        ),
        (
            "topic = \"a\"\npayload = \"number\"\nseries = \"{device}\"",
            "series \"{device}\": unknown {device}; use {topic}, {topic.N} or {field}",
        ),
    ];
    for (sub, message) in cases {
        let error = error_of(&source(sub));
        assert!(error.ends_with(message), "{error}");
    }
    let http = MINIMAL.replace(
        "kind = \"system\"",
        "kind = \"mqtt\"\nname = \"m\"\nurl = \"http://x\"\nsubscriptions = []",
    );
    assert!(error_of(&http).ends_with("url must be mqtt://host[:port] or mqtts://host[:port]"));
}

#[test]
fn an_mqtt_source_bounds_its_messages_and_series() {
    let source = |keys: &str| {
        MINIMAL.replace(
            "kind = \"system\"",
            &format!("kind = \"mqtt\"\nname = \"m\"\nurl = \"mqtt://127.0.0.1\"\n{keys}\n[[sources.subscriptions]]\ntopic = \"a/#\"\npayload = \"number\""),
        )
    };
    let mqtt_of = |text: &str| {
        let config = Config::parse(text, Path::new("x.toml")).expect("valid");
        match &config.sources[0].kind {
            SourceKind::Mqtt(mqtt) => (mqtt.max_packet_bytes(), mqtt.max_series.get()),
            other => panic!("an mqtt source, not {}", other.word()),
        }
    };
    assert_eq!(mqtt_of(&source("")), (1 << 20, 1000));
    assert_eq!(
        mqtt_of(&source("max_payload = \"1 MiB\"\nmax_series = 50")),
        (4 << 20, 50)
    );
    assert_eq!(
        mqtt_of(&source("max_packet = \"32 MiB\"")),
        (32 << 20, 1000)
    );
    let error = error_of(&source("max_payload = \"1 MiB\"\nmax_packet = \"64 KiB\""));
    assert!(
        error.ends_with("max_packet must be at least max_payload (1.0 MiB) and at most 256 MiB"),
        "{error}"
    );
    let error = error_of(&source("max_series = 0"));
    assert!(error.contains("nonzero"), "{error}");
    let error = error_of(&source("keep_alive = \"1s\""));
    assert!(
        error.ends_with("keep_alive must be between 5s and 65535s"),
        "{error}"
    );
}

#[cfg_attr(not(feature = "full"), ignore = "names kinds the lean set lacks")]
#[test]
fn a_secret_given_twice_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("key");
    std::fs::write(&file, "k\n").expect("write");
    let sink = format!(
        "[[sinks]]\nkind = \"azure\"\naccount = \"a\"\ncontainer = \"c\"\naccess_key = \"x\"\naccess_key_file = \"{}\"\n",
        file.display()
    );
    assert!(
        error_of(&with_sink(&sink)).ends_with("give `access_key` or `access_key_file`, not both")
    );
}

#[test]
fn a_minimal_config_gets_its_defaults() {
    let config = Config::parse(MINIMAL, Path::new("x.toml")).expect("valid");
    assert_eq!(config.agent.window.get(), 60);
    assert_eq!(config.agent.partition.get(), 3600);
    assert_eq!(config.agent.grace, Duration::from_secs(60));
    assert_eq!(config.agent.when_full, WhenFull::DropOldest);
    assert_eq!(config.sources[0].name, "system");
    assert_eq!(config.sources[0].interval, Duration::from_secs(1));
    assert_eq!(config.sinks[0].name, "local");
    assert_eq!(config.device_id(), "pi-1");
}

#[test]
fn the_shipped_example_is_valid() {
    let config = Config::parse(EXAMPLE, Path::new("quickstart.toml")).expect("valid");
    assert_eq!(config.agent.window.get(), 10);
    assert_eq!(config.agent.partition.get(), 60);
}

#[test]
fn an_unknown_key_names_file_line_and_column() {
    let text = MINIMAL.replace(
        "kind = \"system\"",
        "kind = \"system\"\n  intreval = \"2s\"",
    );
    assert_eq!(
        error_of(&text),
        "edgespool.toml:8:3: unknown field `intreval`, expected one of `name`, `interval`, `timeout`, `root`"
    );
}

#[test]
fn an_unknown_agent_key_is_located_too() {
    let text = MINIMAL.replace("device_id", "devise_id");
    let err = error_of(&text);
    assert!(
        err.starts_with("edgespool.toml:3:1: unknown field `devise_id`"),
        "{err}"
    );
}

#[test]
fn a_bad_duration_is_explained() {
    let text = MINIMAL.replace("spool =", "window = \"10 parsecs\"\nspool =");
    let err = error_of(&text);
    assert!(
        err.starts_with("edgespool.toml:4:10: invalid duration \"10 parsecs\""),
        "{err}"
    );
}

#[test]
fn a_window_must_be_whole_seconds() {
    let text = MINIMAL.replace("spool =", "window = \"1500ms\"\nspool =");
    assert_eq!(
        error_of(&text),
        "edgespool.toml:4:10: expected a whole number of seconds of at least 1s, got 1s 500ms"
    );
}

#[test]
fn a_partition_must_hold_whole_windows() {
    let text = MINIMAL.replace("spool =", "window = \"7s\"\nspool =");
    assert_eq!(
        error_of(&text),
        "edgespool.toml:2:1: agent.partition (3600s) must be a whole multiple of agent.window (7s)"
    );
}

#[test]
fn a_partition_is_a_whole_number_of_minutes() {
    let text = MINIMAL.replace("spool =", "window = \"10s\"\npartition = \"30s\"\nspool =");
    assert_eq!(
        error_of(&text),
        "edgespool.toml:2:1: agent.partition (30s) must be a whole number of minutes: object keys name partitions to the minute"
    );
}

#[test]
fn an_unknown_kind_points_at_the_kind() {
    let text = MINIMAL.replace("kind = \"system\"", "kind = \"sistem\"");
    assert_eq!(
        error_of(&text),
        "edgespool.toml:7:8: unknown source kind \"sistem\"; expected one of \"system\", \"sysfs\", \"http\", \"mqtt\", \"serial\", \"listen\""
    );
}

#[test]
fn a_missing_secret_file_is_an_error_naming_it() {
    let text = format!(
        "{MINIMAL}\n[[sources]]\nkind = \"http\"\nname = \"api\"\nurl = \"http://127.0.0.1:1/\"\nheader_files = {{ \"X-API-Key\" = \"/nonexistent/edgespool-key\" }}\n[[sources.fields]]\nname = \"a\"\npointer = \"/a\"\n"
    );
    let err = error_of(&text);
    assert!(
        err.starts_with(
            "edgespool.toml:17:32: cannot read secret file /nonexistent/edgespool-key: No such file"
        ),
        "{err}"
    );
}

#[test]
fn secrets_expand_from_the_environment_and_never_print() {
    let lookup = |name: &str| (name == "API_KEY").then(|| "s3cr3t".to_owned());
    assert_eq!(
        expand_env("Bearer ${API_KEY}", lookup).as_deref(),
        Ok("Bearer s3cr3t")
    );
    assert_eq!(
        expand_env("cost $5 $${X}", lookup).as_deref(),
        Ok("cost $5 ${X}")
    );
    assert_eq!(
        expand_env("a ${MISSING}", lookup),
        Err((
            2,
            "environment variable MISSING is not set; set it for the agent (systemd: Environment= or EnvironmentFile=), or write $${ for a literal ${"
                .to_owned()
        ))
    );
    assert_eq!(format!("{:?}", Secret("s3cr3t".into())), "<secret>");
}

#[test]
fn a_broken_toml_file_is_located() {
    let err = error_of("[agent\ndevice_id = 1");
    assert!(err.starts_with("edgespool.toml:1:"), "{err}");
}

#[test]
fn two_sources_may_not_share_a_name() {
    let text = format!("{MINIMAL}\n[[sources]]\nkind = \"system\"\n");
    assert_eq!(
        error_of(&text),
        "edgespool.toml:13:1: two sources are named \"system\"; give each its own name"
    );
}

fn with_agent(keys: &str) -> String {
    MINIMAL.replace("spool = \"/nonexistent/edgespool/spool.db\"\n", keys)
}

#[test]
fn a_prefix_must_stay_inside_its_folder() {
    let rule = "a prefix is plain segments separated by '/', e.g. \"lake/raw\": no leading '/', \
                no empty, \".\" or \"..\" segment, no '\\' and no control characters";
    let text = format!("{MINIMAL}prefix = \"../../escape\"\n");
    assert_eq!(
        error_of(&text),
        format!(
            "edgespool.toml:12:10: sink \"local\": prefix \"../../escape\" has a \"..\" segment; {rule}"
        )
    );
    let cases = [
        ("/lake", "starts with '/'"),
        ("lake//raw", "has an empty segment (\"//\")"),
        ("lake/./raw", "has a \".\" segment"),
        ("lake\\\\raw", "holds a '\\'"),
        ("lake\\traw", "holds a control character"),
    ];
    for (prefix, why) in cases {
        let error = error_of(&format!("{MINIMAL}prefix = \"{prefix}\"\n"));
        assert!(
            error.starts_with("edgespool.toml:12:10: ") && error.contains(why),
            "{prefix}: {error}"
        );
    }
    for prefix in ["lake/raw", "lake/raw/", "", "année=2026/x.y"] {
        Config::parse(
            &format!("{MINIMAL}prefix = \"{prefix}\"\n"),
            Path::new("x.toml"),
        )
        .expect("a plain prefix");
    }
}

#[test]
fn a_spool_that_is_not_a_regular_file_is_refused() {
    let what = "not a regular file: the spool is an SQLite file (with -wal and -shm files beside \
                it); give a path that is a regular file or does not exist yet";
    assert_eq!(
        error_of(&with_agent("spool = \"/dev/null\"\n")),
        format!("edgespool.toml:4:9: agent.spool \"/dev/null\" is a character device, {what}")
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = dir.path().display().to_string();
    assert_eq!(
        error_of(&with_agent(&format!("spool = \"{folder}\"\n"))),
        format!(
            "edgespool.toml:4:9: agent.spool \"{folder}\" is a folder; give the path of a file in it, e.g. \"{folder}/spool.db\""
        )
    );
    let file = dir.path().join("plain");
    std::fs::write(&file, "").expect("write");
    let under = format!("{}/sub/spool.db", file.display());
    assert_eq!(
        error_of(&with_agent(&format!("spool = \"{under}\"\n"))),
        format!(
            "edgespool.toml:4:9: agent.spool \"{under}\" cannot be created: {} is a file, not a folder",
            file.display()
        )
    );
    assert!(
        error_of(&with_agent("spool = \"/var/lib/edgespool/\"\n"))
            .ends_with("agent.spool \"/var/lib/edgespool/\" names a folder; give the path of a file in it, e.g. \"/var/lib/edgespool/spool.db\"")
    );
    let fresh = dir.path().join("a/b/spool.db");
    Config::parse(
        &with_agent(&format!("spool = \"{}\"\n", fresh.display())),
        Path::new("x.toml"),
    )
    .expect("a spool that does not exist yet");
    assert!(!dir.path().join("a").exists(), "checking creates nothing");
}

#[test]
fn a_device_id_is_a_plain_name() {
    let rule = "must be 1 to 64 characters: letters, digits, '-', '_' and '.', starting with a \
                letter or digit";
    for id in ["..", ".", "", "a/b", "_pi", "pi 1"] {
        let text = MINIMAL.replace("\"pi-1\"", &format!("{id:?}"));
        assert_eq!(
            error_of(&text),
            format!("edgespool.toml:3:13: agent.device_id {id:?} {rule}")
        );
    }
    let long = "p".repeat(65);
    assert_eq!(
        error_of(&MINIMAL.replace("\"pi-1\"", &format!("{long:?}"))),
        format!(
            "edgespool.toml:3:13: agent.device_id \"{}\"… (65 characters) {rule}",
            "p".repeat(40)
        )
    );
}

#[test]
fn a_host_name_that_is_no_device_id_is_explained() {
    let text = MINIMAL.replace("device_id = \"pi-1\"\n", "");
    let err = Config::parse_as(&text, Path::new("edgespool.toml"), || "..".to_owned())
        .expect_err("refused")
        .to_string();
    assert_eq!(
        err,
        "edgespool.toml:2:1: agent.device_id is not set and the host name \"..\" cannot stand for \
         it: a device id must be 1 to 64 characters: letters, digits, '-', '_' and '.', starting \
         with a letter or digit; set agent.device_id"
    );
    let config = Config::parse_as(&text, Path::new("x.toml"), || "pi-7".to_owned()).expect("valid");
    assert_eq!(config.device_id(), "pi-7");
}

#[test]
fn a_disk_budget_is_within_what_the_spool_can_hold() {
    let bounds = "must be at least 1 MiB and at most 4 TiB (the most an SQLite spool of 1 KiB \
                  pages can hold)";
    let text =
        with_agent("spool = \"/nonexistent/edgespool/spool.db\"\ndisk_budget = \"16 EiB\"\n");
    assert_eq!(
        error_of(&text),
        format!("edgespool.toml:5:15: agent.disk_budget (16.0 EiB) {bounds}")
    );
    let text =
        with_agent("spool = \"/nonexistent/edgespool/spool.db\"\ndisk_budget = \"512 KiB\"\n");
    assert_eq!(
        error_of(&text),
        format!("edgespool.toml:5:15: agent.disk_budget (512.0 KiB) {bounds}")
    );
    let text = with_agent("spool = \"/nonexistent/edgespool/spool.db\"\ndisk_budget = \"4 TiB\"\n");
    Config::parse(&text, Path::new("x.toml")).expect("the largest budget");
}

#[test]
fn names_of_sources_and_sinks_are_short_and_plain() {
    let rule = "must be 1 to 64 characters: letters, digits, '-', '_' and '.', starting with a \
                letter or digit";
    let huge = "n".repeat(1 << 20);
    let text = format!("{MINIMAL}name = \"{huge}\"\n");
    assert_eq!(
        error_of(&text),
        format!(
            "edgespool.toml:12:8: sink name \"{}\"… (1048576 characters) {rule}",
            "n".repeat(40)
        )
    );
    let text = MINIMAL.replace("kind = \"system\"", "kind = \"system\"\nname = \"cpu/0\"");
    assert_eq!(
        error_of(&text),
        format!("edgespool.toml:8:8: source name \"cpu/0\" {rule}")
    );
}

#[test]
fn a_file_that_is_not_utf8_text_is_located() {
    let parse = |bytes: &[u8]| {
        Config::parse_bytes(bytes, Path::new("edgespool.toml"))
            .expect_err("refused")
            .to_string()
    };
    // "café" in Latin-1: the é is byte 0xE9, the 17th character of line 3.
    let mut latin1 = MINIMAL.replace("pi-1", "caf#").into_bytes();
    let at = latin1.iter().position(|&b| b == b'#').expect("a #");
    latin1[at] = 0xE9;
    assert_eq!(
        parse(&latin1),
        "edgespool.toml:3:17: invalid UTF-8 (byte 0xE9); save the file as UTF-8"
    );
    assert_eq!(
        parse(b"SQLite format 3\0\x10\x00"),
        "edgespool.toml:1:16: is not a text file (it holds a NUL byte here); give the path of the TOML file"
    );
    assert_eq!(
        parse(b"\xFF\xFE[\0a\0"),
        "edgespool.toml:1:1: the file is UTF-16 text; save it as UTF-8"
    );
    Config::parse_bytes(MINIMAL.as_bytes(), Path::new("x.toml")).expect("valid");
}

#[test]
fn a_folder_is_not_a_configuration() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = Config::load(dir.path()).expect_err("refused").to_string();
    assert_eq!(
        err,
        format!(
            "{}: is a folder; give the path of the TOML file",
            dir.path().display()
        )
    );
}

#[cfg_attr(not(feature = "full"), ignore = "names kinds the lean set lacks")]
#[test]
fn an_unset_variable_is_located_at_its_name() {
    let text = format!(
        "{MINIMAL}\n[[sources]]\nkind = \"http\"\nname = \"api\"\nurl = \"http://127.0.0.1:1/\"\nheaders = {{ Authorization = \"Bearer ${{EDGESPOOL_NEVER_SET_3F9}}\" }}\n[[sources.fields]]\nname = \"a\"\npointer = \"/a\"\n"
    );
    assert_eq!(
        error_of(&text),
        "edgespool.toml:17:37: environment variable EDGESPOOL_NEVER_SET_3F9 is not set; set it \
         for the agent (systemd: Environment= or EnvironmentFile=), or write $${ for a literal ${"
    );
    let sink = "[[sinks]]\nkind = \"s3\"\nbucket = \"b\"\naccess_key_id = \"${EDGESPOOL_NEVER_SET_3F9}\"\nsecret_access_key = \"k\"\n";
    let err = error_of(&with_sink(sink));
    assert!(
        err.starts_with("edgespool.toml:12:18: environment variable EDGESPOOL_NEVER_SET_3F9"),
        "{err}"
    );
}

#[test]
fn an_http_source_follows_only_redirects_that_stay_home_unless_told() {
    let http = |extra: &str| {
        MINIMAL.replace(
            "kind = \"system\"\n",
            &format!(
                "kind = \"http\"\nname = \"pa\"\nurl = \"http://10.0.0.9/json\"\n{extra}\
                 [[sources.fields]]\nname = \"pm\"\npointer = \"/pm\"\n"
            ),
        )
    };
    let redirects = |text: &str| {
        let config = Config::parse(text, Path::new("x.toml")).expect("valid");
        match &config.sources[0].kind {
            SourceKind::Http(http) => http.redirects,
            other => panic!("an http source: {other:?}"),
        }
    };
    assert_eq!(redirects(&http("")), Redirects::SameOrigin);
    assert_eq!(redirects(&http("redirects = \"any\"\n")), Redirects::Any);
    assert_eq!(redirects(&http("redirects = \"none\"\n")), Redirects::None);
    let err = error_of(&http("redirects = \"sometimes\"\n"));
    assert!(
        err.contains("unknown variant `sometimes`, expected one of `same_origin`, `none`, `any`"),
        "{err}"
    );
}

#[test]
fn repeats_are_dropped_unless_a_source_keeps_them() {
    let http = |extra: &str| {
        MINIMAL.replace(
            "kind = \"system\"\n",
            &format!(
                "kind = \"http\"\nname = \"pa\"\nurl = \"http://10.0.0.9/json\"\n{extra}\
                 [[sources.fields]]\nname = \"pm\"\npointer = \"/pm\"\n"
            ),
        )
    };
    let repeats = |text: &str| {
        Config::parse(text, Path::new("x.toml"))
            .expect("valid")
            .sources[0]
            .repeats
    };
    assert_eq!(repeats(&http("")), Repeats::Drop);
    assert_eq!(repeats(&http("repeats = \"keep\"\n")), Repeats::Keep);
    assert_eq!(repeats(&http("repeats = \"drop\"\n")), Repeats::Drop);
    assert_eq!(repeats(MINIMAL), Repeats::Drop, "a system source");
    let err = error_of(&http("repeats = \"once\"\n"));
    assert!(
        err.starts_with("edgespool.toml:10:11: ")
            && err.contains("unknown variant `once`, expected `drop` or `keep`"),
        "{err}"
    );
    // A source that stamps its own samples has none to keep.
    let err = error_of(&MINIMAL.replace(
        "kind = \"system\"\n",
        "kind = \"system\"\nrepeats = \"keep\"\n",
    ));
    assert!(
        err.starts_with("edgespool.toml:") && err.contains("unknown field `repeats`"),
        "{err}"
    );
}

/// What a lean build (`--no-default-features --features pi`, as `deploy/build-pi.sh`
/// makes) lacks is refused where the file names it, with the feature to build with.
#[cfg(not(any(
    feature = "s3",
    feature = "postgres",
    feature = "serial",
    feature = "parquet"
)))]
#[test]
fn a_kind_this_build_lacks_is_refused_where_the_file_names_it() {
    let s3 = with_sink("[[sinks]]\nkind = \"s3\"\nbucket = \"lake\"\n");
    assert_eq!(
        error_of(&s3),
        "edgespool.toml:10:8: sink kind \"s3\" is not in this build of edgespool (built without \
         the \"s3\" feature); build with `--features s3` or use the full build (the .deb, or \
         `deploy/build-pi.sh --full`)"
    );
    let pg = with_sink("[[sinks]]\nkind = \"postgres\"\nurl = \"postgres://pi@db/lake\"\n");
    assert!(
        error_of(&pg).starts_with(
            "edgespool.toml:10:8: sink kind \"postgres\" is not in this build of edgespool (built without the \"postgres\" feature)"
        ),
        "{}",
        error_of(&pg)
    );
    let serial = MINIMAL.replace(
        "kind = \"system\"",
        "kind = \"serial\"\nname = \"ox\"\nport = \"/dev/ttyUSB0\"",
    );
    assert!(
        error_of(&serial).starts_with(
            "edgespool.toml:7:8: source kind \"serial\" is not in this build of edgespool (built without the \"serial\" feature)"
        ),
        "{}",
        error_of(&serial)
    );
    let parquet = with_sink(
        "[[sinks]]\nkind = \"local\"\npath = \"/nonexistent/edgespool/out\"\nformat = \"parquet\"\n",
    );
    assert!(
        error_of(&parquet).starts_with(
            "edgespool.toml:12:10: format \"parquet\" is not in this build of edgespool (built without the \"parquet\" feature)"
        ),
        "{}",
        error_of(&parquet)
    );
    // What the lean build holds still loads.
    Config::parse(MINIMAL, Path::new("edgespool.toml")).expect("local sink, system source");
}
