//! Azure Blob Storage and Google Cloud Storage end to end: the built binary against
//! Azurite and gcp-storage-emulator (tests/src/cloud.rs), with the objects listed and
//! downloaded by clients we did not write and read back by DuckDB.
//!
//! Every test also writes to a local folder: the keys and bytes in the store must be the
//! ones the folder holds, so that nothing here spells out the key scheme. Without the
//! emulator a test fails under `scripts/test.sh` and says `SKIPPED` under a bare
//! `cargo test` (see tests/src/cloud.rs).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgespool_tests::cloud::{
    AZURITE_ACCOUNT, AZURITE_KEY, AzuriteServer, CloudObject, GcsEmulator,
};
use edgespool_tests::{
    Agent, JsonServer, T0, duckdb, find_sink, minute, ndjson_count, purpleair_body, read_tree,
    sink_status, table_source, wait_for, write_agent_config, write_file,
};
use serde_json::Value;

/// A configuration with the HTTP table source `pa` polling `url`, a local `archive`
/// (NDJSON) under `dir/archive`, and `sinks`; `{key_file}` in them is a file holding
/// Azurite's key.
fn write_config(dir: &Path, url: &str, sinks: &str) -> PathBuf {
    let key = write_file(dir, "credentials/azure-key", &format!("{AZURITE_KEY}\n"));
    let sinks = sinks.replace("{key_file}", &key.display().to_string());
    let archive = format!(
        "[[sinks]]\nkind = \"local\"\nname = \"archive\"\npath = \"{}\"\n",
        dir.join("archive").display()
    );
    write_agent_config(
        dir,
        &format!(
            "{}\n{archive}\n{sinks}",
            table_source(url, &["pm", "Temperature"])
        ),
    )
}

/// An `azure` sink on Azurite's container `lake`, plus `extra` keys.
fn azure_sink(azurite: &AzuriteServer, name: &str, extra: &str) -> String {
    format!(
        r#"
[[sinks]]
kind = "azure"
name = "{name}"
account = "{AZURITE_ACCOUNT}"
container = "lake"
endpoint = "{endpoint}"
access_key_file = "{{key_file}}"
retry_max = "1s"
timeout = "5s"
{extra}
"#,
        endpoint = azurite.endpoint
    )
}

/// A `gcs` sink on the emulator's bucket `lake`, plus `extra` keys.
fn gcs_sink(gcs: &GcsEmulator, name: &str, extra: &str) -> String {
    format!(
        r#"
[[sinks]]
kind = "gcs"
name = "{name}"
bucket = "lake"
endpoint = "{endpoint}"
anonymous = true
retry_max = "1s"
timeout = "5s"
{extra}
"#,
        endpoint = gcs.endpoint
    )
}

/// The archive's keys (NDJSON), each as a store's key under `prefix` ("" for none)
/// with extension `ext`.
fn archive_keys(dir: &Path, prefix: &str, ext: &str) -> Vec<String> {
    let lead = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    read_tree(&dir.join("archive"))
        .iter()
        .map(|f| {
            let stem = f.key.strip_suffix(".ndjson").expect("an NDJSON key");
            format!("{lead}{stem}.{ext}")
        })
        .collect()
}

fn keys_under<'a>(objects: &'a [CloudObject], prefix: &str) -> Vec<&'a str> {
    objects
        .iter()
        .map(|o| o.key.as_str())
        .filter(|k| k.starts_with(&format!("{prefix}/")))
        .collect()
}

/// Every (series, window start, count, mean) of the archive, sorted.
fn archive_rows(dir: &Path) -> Vec<(String, String, u64, f64)> {
    let mut rows: Vec<(String, String, u64, f64)> = read_tree(&dir.join("archive"))
        .iter()
        .flat_map(|f| &f.rows)
        .map(|r| {
            (
                r["series"].as_str().expect("series").to_owned(),
                r["window_start"].as_str().expect("start").to_owned(),
                r["count"].as_u64().expect("count"),
                r["mean"].as_f64().expect("mean"),
            )
        })
        .collect();
    rows.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    rows
}

/// The same rows, as DuckDB reads them from the Parquet files below `root/parquet`.
fn parquet_rows(root: &Path) -> Vec<(String, String, u64, f64)> {
    duckdb(
        root,
        "SELECT series, strftime(window_start AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%SZ'), count, mean
         FROM read_parquet('{root}/parquet/**/*.parquet', hive_partitioning = true)
         ORDER BY series, window_start",
    )
    .into_iter()
    .map(|r| {
        (
            r[0].as_str().expect("series").to_owned(),
            r[1].as_str().expect("start").to_owned(),
            r[2].as_u64().expect("count"),
            r[3].as_f64().expect("mean"),
        )
    })
    .collect()
}

/// Every NDJSON file below `mirror/ndjson` has the bytes of the archive's file.
fn assert_same_bytes_as_the_archive(dir: &Path, mirror: &Path) {
    for file in read_tree(&dir.join("archive")) {
        let ours = fs::read(dir.join("archive").join(&file.key)).expect("the archive's file");
        let theirs = fs::read(mirror.join("ndjson").join(&file.key))
            .unwrap_or_else(|e| panic!("ndjson/{} was not downloaded: {e}", file.key));
        assert!(
            ours == theirs,
            "ndjson/{} differs from the archive",
            file.key
        );
    }
}

/// Waits until every sink of `agent` is `ok` with nothing pending, and returns status.
/// Minutes 0-2 in the store (six objects, Parquet and NDJSON) and in the local archive,
/// under the same keys. Returns the store's objects.
fn minutes_0_to_2(
    dir: &Path,
    store: &str,
    list: impl Fn() -> Option<Vec<CloudObject>>,
) -> Vec<CloudObject> {
    let before = wait_for(
        &format!("minutes 0-2 in the {store}"),
        Duration::from_secs(60),
        || list().filter(|objects| objects.len() == 6),
    );
    wait_for(
        "minutes 0-2 in the archive",
        Duration::from_secs(30),
        || (ndjson_count(&read_tree(&dir.join("archive"))) == 3).then_some(()),
    );
    assert_eq!(
        keys_under(&before, "parquet"),
        archive_keys(dir, "parquet", "parquet")
    );
    assert_eq!(
        keys_under(&before, "ndjson"),
        archive_keys(dir, "ndjson", "ndjson")
    );
    before
}

/// While the store is away: minutes 3-5 are served, the local archive gets them, and
/// both store sinks (`first` and `text`) retry with three partitions pending, `first`'s
/// last error naming the oldest of them. Returns that status.
fn minutes_3_to_5_wait(server: &JsonServer, agent: &Agent, dir: &Path, first: &str) -> Value {
    for i in 3..6 {
        server.push(minute(i));
    }
    let status = wait_for(
        &format!("the {first} and text sinks retrying with minutes 3-5 pending"),
        Duration::from_secs(60),
        || {
            let status = agent.try_status()?;
            [first, "text"]
                .iter()
                .all(|name| {
                    find_sink(&status, name)
                        .is_some_and(|s| s["state"] == "retrying" && s["pending_partitions"] == 3)
                })
                .then_some(status)
        },
    );
    wait_for(
        "minutes 3-5 in the archive",
        Duration::from_secs(30),
        || (ndjson_count(&read_tree(&dir.join("archive"))) == 6).then_some(()),
    );
    let oldest_pending = &archive_keys(dir, "parquet", "parquet")[3];
    let error = sink_status(&status, first)["last_error"]
        .as_str()
        .expect("a last error")
        .to_owned();
    assert!(
        error.starts_with(&format!("{first}: cannot write {oldest_pending}: ")),
        "the oldest pending part is retried first: {error}"
    );
    status
}

fn caught_up(agent: &Agent) -> Value {
    wait_for("every sink caught up", Duration::from_secs(60), || {
        let status = agent.try_status()?;
        status["sinks"]
            .as_array()?
            .iter()
            .all(|s| s["state"] == "ok" && s["pending_rows"] == 0)
            .then_some(status)
    })
}

#[test]
fn azure_gets_every_partition_once_through_an_outage_of_azurite() {
    if let Some(reason) = AzuriteServer::unavailable() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut azurite = AzuriteServer::start(&dir.path().join("azurite.log"));
    azurite.create_container("lake");
    let server = JsonServer::start((0..3).map(minute).collect(), purpleair_body(&[]));
    let sinks = [
        azure_sink(&azurite, "blob", "prefix = \"parquet\""),
        azure_sink(&azurite, "text", "prefix = \"ndjson\"\nformat = \"ndjson\""),
    ]
    .concat();
    let config = write_config(dir.path(), &server.url, &sinks);
    let agent = Agent::start(&config, &dir.path().join("agent.log"));

    // Minutes 0-2, in both formats, under the keys the local folder has.
    let before = minutes_0_to_2(dir.path(), "container", || azurite.try_list("lake"));
    let parquet = before.iter().find(|o| o.key.starts_with("parquet/"));
    assert_eq!(
        parquet.map(|o| o.content_type.as_str()),
        Some("application/vnd.apache.parquet"),
        "{before:?}"
    );
    assert!(
        before.iter().all(|o| o.blocks == 0),
        "small parts go up whole (one Put Blob): {before:?}"
    );

    // Azurite goes away; minutes 3-5 arrive meanwhile.
    azurite.stop();
    let status = minutes_3_to_5_wait(&server, &agent, dir.path(), "blob");
    assert_eq!(sink_status(&status, "archive")["state"], "ok");

    // Azurite comes back on the same port with the same data: the pending partitions
    // land, each once, beside those written before the outage.
    azurite.start_again();
    let status = caught_up(&agent);
    for name in ["blob", "text"] {
        assert_eq!(sink_status(&status, name)["delivered_parts"], 6, "{status}");
    }
    let after = azurite.list("lake");
    assert_eq!(
        keys_under(&after, "parquet"),
        archive_keys(dir.path(), "parquet", "parquet"),
        "each partition once, none lost in the outage"
    );
    assert_eq!(
        keys_under(&after, "ndjson"),
        archive_keys(dir.path(), "ndjson", "ndjson")
    );
    agent.terminate();

    let log = fs::read_to_string(dir.path().join("agent.log")).expect("log");
    assert!(!log.contains(AZURITE_KEY), "the key never shows in the log");

    // Read back: the NDJSON blobs are the archive's bytes; DuckDB reads the Parquet
    // blobs as the archive's rows.
    let mirror = dir.path().join("mirror");
    azurite.mirror("lake", &mirror);
    assert_same_bytes_as_the_archive(dir.path(), &mirror);
    let expected = archive_rows(dir.path());
    assert_eq!(
        expected.len(),
        6 * 4,
        "six minutes of two sensors, two columns"
    );
    assert_eq!(parquet_rows(&mirror), expected);
}

#[test]
fn a_large_partition_goes_to_azure_as_a_block_list() {
    if let Some(reason) = AzuriteServer::unavailable() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let azurite = AzuriteServer::start(&dir.path().join("azurite.log"));
    azurite.create_container("lake");
    // 12,000 sensors, two columns each: 24,000 rows, about 7 MB of NDJSON.
    let rows: Vec<(u32, i64, f64, f64)> = (0..12_000)
        .map(|id| (id, T0, f64::from(id), 20.0))
        .collect();
    let server = JsonServer::start(vec![purpleair_body(&rows)], purpleair_body(&[]));
    let sinks = azure_sink(
        &azurite,
        "blob",
        "prefix = \"ndjson\"\nformat = \"ndjson\"\npart_size = \"5 MiB\"",
    );
    let config = write_config(dir.path(), &server.url, &sinks);
    // 24,000 series, above the default `max_series` of 1,000.
    let text = fs::read_to_string(&config).expect("the config");
    let text = text.replace("[sources.table]", "max_series = 24000\n[sources.table]");
    fs::write(&config, text).expect("write the config");
    let agent = Agent::start(&config, &dir.path().join("agent.log"));
    let status = wait_for("the large blob delivered", Duration::from_secs(180), || {
        let status = agent.try_status()?;
        (find_sink(&status, "blob")?["delivered_parts"] == 1
            && find_sink(&status, "archive")?["delivered_parts"] == 1)
            .then_some(status)
    });
    let objects = azurite.list("lake");
    assert_eq!(objects.len(), 1, "{objects:?} {status}");
    let blob = &objects[0];
    assert_eq!(
        blob.key,
        archive_keys(dir.path(), "ndjson", "ndjson")[0],
        "{objects:?}"
    );
    assert!(blob.size > 5 * 1024 * 1024, "{blob:?}");
    assert_eq!(
        (blob.blocks, blob.content_type.as_str()),
        (2, "application/x-ndjson"),
        "put as two blocks of at most 5 MiB, then the block list: {blob:?}"
    );
    agent.terminate();

    let mirror = dir.path().join("mirror");
    azurite.mirror("lake", &mirror);
    assert_same_bytes_as_the_archive(dir.path(), &mirror);
    let counted = duckdb(
        &mirror,
        "SELECT count(*), count(DISTINCT series), sum(mean) FROM read_json_auto('{root}/**/*.ndjson')",
    );
    let sum_of_ids: f64 = (0..12_000).map(f64::from).sum();
    assert_eq!(
        counted,
        vec![vec![
            Value::from(24_000),
            Value::from(24_000),
            Value::from(sum_of_ids + 20.0 * 12_000.0)
        ]]
    );
}

#[test]
fn a_missing_azure_container_is_named_in_status_and_filled_once_made() {
    if let Some(reason) = AzuriteServer::unavailable() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let azurite = AzuriteServer::start(&dir.path().join("azurite.log"));
    let server = JsonServer::start(vec![minute(0)], purpleair_body(&[]));
    let config = write_config(
        dir.path(),
        &server.url,
        &azure_sink(&azurite, "blob", "format = \"ndjson\""),
    );
    let agent = Agent::start(&config, &dir.path().join("agent.log"));
    let status = wait_for("the sink retrying", Duration::from_secs(60), || {
        let status = agent.try_status()?;
        (find_sink(&status, "blob")?["state"] == "retrying").then_some(status)
    });
    wait_for("minute 0 in the archive", Duration::from_secs(30), || {
        (ndjson_count(&read_tree(&dir.path().join("archive"))) == 1).then_some(())
    });
    let key = &archive_keys(dir.path(), "", "ndjson")[0];
    assert_eq!(
        sink_status(&status, "blob")["last_error"],
        format!(
            "blob: cannot write {key}: container \"lake\" does not exist in account \
             \"{AZURITE_ACCOUNT}\"; create it (edgespool does not create containers)"
        ),
        "{status}"
    );

    // Once the container is made, the pending partition lands without a restart.
    azurite.create_container("lake");
    let status = caught_up(&agent);
    assert_eq!(sink_status(&status, "blob")["delivered_parts"], 1);
    let objects = azurite.list("lake");
    assert_eq!(
        objects.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(),
        [key.as_str()]
    );
    agent.terminate();
}

#[test]
fn a_write_only_shared_access_signature_is_enough_for_azure_and_never_shows() {
    if let Some(reason) = AzuriteServer::unavailable() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut azurite = AzuriteServer::start(&dir.path().join("azurite.log"));
    azurite.create_container("lake");
    // Create and write on the container, nothing else; given with its leading `?`.
    let sas = azurite.write_only_sas("lake");
    let sas_file = write_file(dir.path(), "credentials/azure-sas", &format!("?{sas}\n"));
    let sink = format!(
        r#"
[[sinks]]
kind = "azure"
name = "blob"
account = "{AZURITE_ACCOUNT}"
container = "lake"
endpoint = "{endpoint}"
sas_token_file = "{sas_file}"
format = "ndjson"
retry_max = "1s"
timeout = "5s"
"#,
        endpoint = azurite.endpoint,
        sas_file = sas_file.display()
    );
    let server = JsonServer::start(vec![minute(0)], purpleair_body(&[]));
    let config = write_config(dir.path(), &server.url, &sink);
    let agent = Agent::start(&config, &dir.path().join("agent.log"));
    caught_up_with(&agent, "blob", 1);
    // A failing request (Azurite away) is where a signature in a URL would show.
    azurite.stop();
    server.push(minute(1));
    let failing = wait_for("the sink retrying", Duration::from_secs(60), || {
        let status = agent.try_status()?;
        (find_sink(&status, "blob")?["state"] == "retrying").then_some(status)
    });
    azurite.start_again();
    let status = caught_up_with(&agent, "blob", 2);
    agent.terminate();
    let objects = azurite.list("lake");
    assert_eq!(
        objects.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(),
        archive_keys(dir.path(), "", "ndjson")
    );
    let mirror = dir.path().join("mirror");
    azurite.mirror("lake", &mirror.join("ndjson"));
    assert_same_bytes_as_the_archive(dir.path(), &mirror);
    // The signature is a credential: neither the log nor status shows it.
    let signature = sas
        .split('&')
        .find_map(|pair| pair.strip_prefix("sig="))
        .expect("a SAS has a signature");
    let log = fs::read_to_string(dir.path().join("agent.log")).expect("log");
    assert!(
        sink_status(&failing, "blob")["last_error"].is_string(),
        "{failing}"
    );
    for text in [log, failing.to_string(), status.to_string()] {
        assert!(!text.contains(signature), "the SAS shows: {text}");
    }
}

/// Waits until sink `name` has delivered `parts` parts and every sink is caught up.
fn caught_up_with(agent: &Agent, name: &str, parts: u64) -> Value {
    wait_for(
        &format!("{name} with {parts} parts delivered"),
        Duration::from_secs(60),
        || {
            let status = agent.try_status()?;
            let caught_up = status["sinks"]
                .as_array()?
                .iter()
                .all(|s| s["state"] == "ok" && s["pending_rows"] == 0);
            (caught_up && find_sink(&status, name)?["delivered_parts"] == parts).then_some(status)
        },
    )
}

#[test]
fn gcs_through_an_endpoint_gets_every_partition_once_through_an_outage() {
    if let Some(reason) = GcsEmulator::unavailable() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut gcs = GcsEmulator::start(&dir.path().join("gcs.log"), "lake");
    let server = JsonServer::start((0..3).map(minute).collect(), purpleair_body(&[]));
    let sinks = [
        gcs_sink(&gcs, "bucket", "prefix = \"parquet\""),
        gcs_sink(&gcs, "text", "prefix = \"ndjson\"\nformat = \"ndjson\""),
    ]
    .concat();
    let config = write_config(dir.path(), &server.url, &sinks);
    let agent = Agent::start(&config, &dir.path().join("agent.log"));

    let before = minutes_0_to_2(dir.path(), "bucket", || gcs.try_list());
    let types: std::collections::BTreeSet<&str> =
        before.iter().map(|o| o.content_type.as_str()).collect();
    assert_eq!(
        types,
        ["application/vnd.apache.parquet", "application/x-ndjson"]
            .into_iter()
            .collect()
    );

    // The emulator goes away; minutes 3-5 arrive meanwhile.
    gcs.stop();
    minutes_3_to_5_wait(&server, &agent, dir.path(), "bucket");

    // Back on the same port with the same data on disk.
    gcs.start_again();
    let status = caught_up(&agent);
    for name in ["bucket", "text"] {
        assert_eq!(sink_status(&status, name)["delivered_parts"], 6, "{status}");
    }
    let after = gcs.list();
    assert_eq!(
        keys_under(&after, "parquet"),
        archive_keys(dir.path(), "parquet", "parquet"),
        "each partition once, none lost in the outage"
    );
    assert_eq!(
        keys_under(&after, "ndjson"),
        archive_keys(dir.path(), "ndjson", "ndjson")
    );
    agent.terminate();

    let mirror = dir.path().join("mirror");
    gcs.mirror(&mirror);
    assert_same_bytes_as_the_archive(dir.path(), &mirror);
    let expected = archive_rows(dir.path());
    assert_eq!(
        expected.len(),
        6 * 4,
        "six minutes of two sensors, two columns"
    );
    assert_eq!(parquet_rows(&mirror), expected);
}
