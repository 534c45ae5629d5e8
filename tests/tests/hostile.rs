//! Servers that are hostile, or careless, and agents that get in each other's way: a
//! redirect to another host, a PostgreSQL server that asks for the password in the clear,
//! and agents creating the same table at once. The built binary against real servers.

use std::path::Path;
use std::time::Duration;

use edgespool_tests::hostile::{Answer, HttpStub, PgTap, pg_sink_via};
use edgespool_tests::{
    Agent, JsonServer, PG_PASSWORD, PgServer, find_source, minute, out_sink, sink_status,
    table_source, wait_for, write_agent_config, write_file,
};
use serde_json::Value;

/// The source `name` of a `status --json`.
fn source<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["sources"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no source {name} in {status}"))
}

/// An HTTP source `name` polling `url` every 100 ms for `/pm`, with `extra` keys.
fn http_source(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[sources]]\nkind = \"http\"\nname = \"{name}\"\nurl = \"{url}\"\ninterval = \"100ms\"\n\
         timeout = \"2s\"\n{extra}\n[[sources.fields]]\nname = \"pm\"\npointer = \"/pm\"\n\n"
    )
}

const API_KEY: &str = "header-secret-4711";
const TOKEN: &str = "query-secret-0815";

#[test]
fn a_redirect_to_another_host_is_refused_and_one_at_home_is_followed() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Another server on another loopback address: it must never see the key.
    let elsewhere = HttpStub::start("127.0.0.2", |path| {
        (path == "/data.json").then(|| Answer::Json(r#"{"pm": 2.5}"#.to_owned()))
    });
    let away = elsewhere.base.clone();
    let home = HttpStub::start("127.0.0.1", move |path| match path {
        // Sends the key's holder elsewhere, the query echoed as servers do.
        "/pa" => Some(Answer::Redirect(format!("{away}/stolen?api_key={TOKEN}"))),
        "/old" => Some(Answer::Redirect("/data.json".to_owned())),
        "/data.json" => Some(Answer::Json(r#"{"pm": 1.5}"#.to_owned())),
        "/roam" => Some(Answer::Redirect(format!("{away}/data.json"))),
        _ => None,
    });
    let secrets = format!(
        "query = {{ api_key = \"{TOKEN}\" }}\nheaders = {{ \"X-API-Key\" = \"{API_KEY}\" }}"
    );
    let sources = [
        http_source("pa", &format!("{}/pa", home.base), &secrets),
        http_source("moved", &format!("{}/old", home.base), &secrets),
        http_source(
            "roaming",
            &format!("{}/roam?page=1", home.base),
            "redirects = \"any\"\nheaders = { \"X-Roaming\" = \"not-a-secret\" }",
        ),
    ];
    let config = write_agent_config(
        dir.path(),
        &format!("{}\n{}", sources.concat(), out_sink(dir.path())),
    );
    let agent = Agent::start(&config, &dir.path().join("agent.log"));

    let status = wait_for(
        "pa failing twice, moved and roaming sampled",
        Duration::from_secs(60),
        || {
            // No source is listed before the agent has written its state: poll again.
            let status = agent.status();
            let count = |name: &str, counter: &str| {
                find_source(&status, name).and_then(|s| s[counter].as_u64())
            };
            (count("pa", "errors") >= Some(2)
                && count("moved", "samples") > Some(0)
                && count("roaming", "samples") > Some(0))
            .then_some(status)
        },
    );
    let pa = source(&status, "pa");
    assert_eq!(
        pa["last_error"].as_str().expect("pa has an error"),
        format!(
            "request failed: redirect to {}/stolen refused: it leaves {} (set redirects = \"any\" to follow it)",
            elsewhere.base, home.base
        )
    );
    assert_eq!(pa["samples"], 0, "{pa}");

    let away = elsewhere.received();
    assert!(
        away.iter().all(|r| !r.url.starts_with("/stolen")),
        "the other host was asked: {away:?}"
    );
    assert!(
        away.iter().all(|r| r.header("x-api-key").is_none()),
        "the key reached the other host: {away:?}"
    );
    // `redirects = "any"` went there, and carried no Referer with the first URL.
    let roamed: Vec<_> = away.iter().filter(|r| r.url == "/data.json").collect();
    assert!(!roamed.is_empty(), "{away:?}");
    assert!(
        roamed.iter().all(|r| r.header("referer").is_none()),
        "{roamed:?}"
    );
    assert_eq!(roamed[0].header("x-roaming"), Some("not-a-secret"));

    // At home, the redirect was followed with the key and the query's owner's headers
    // kept, and nothing carried a Referer.
    let at_home = home.received();
    let followed: Vec<_> = at_home.iter().filter(|r| r.url == "/data.json").collect();
    assert!(!followed.is_empty(), "{at_home:?}");
    assert_eq!(followed[0].header("x-api-key"), Some(API_KEY));
    assert!(
        at_home.iter().all(|r| r.header("referer").is_none()),
        "{at_home:?}"
    );

    let shown = format!("{status}\n{}", agent.log_text());
    for secret in [API_KEY, TOKEN] {
        assert!(!shown.contains(secret), "{secret} shown:\n{shown}");
    }
}

/// A configuration for device `device` in `dir`: the table source polling `url`, and
/// the PostgreSQL sink `db` through `port` with `extra` keys.
fn pg_agent_config(dir: &Path, device: &str, url: &str, port: u16, extra: &str) -> Agent {
    let password = write_file(dir, "credentials/pg", &format!("{PG_PASSWORD}\n"));
    let config = write_agent_config(
        dir,
        &format!(
            "{}\n{}",
            table_source(url, &["pm", "Temperature"]),
            pg_sink_via(port, "db", &password, extra)
        ),
    );
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace("device_id = \"e2e\"", &format!("device_id = \"{device}\"")),
    )
    .expect("config");
    Agent::start(&config, &dir.join("agent.log"))
}

/// Rows of `device` in the table; `None` while there is no table.
fn rows_of(pg: &PgServer, device: &str) -> Option<usize> {
    pg.try_psql(
        "postgres",
        &format!("SELECT count(*) FROM edgespool_windows WHERE device = '{device}'"),
    )
    .map(|n| n.parse().expect("a count"))
}

/// The sink's last error once it contains `part`; fails at once if a password or SASL
/// message went through `tap` meanwhile.
fn refusal_with(agent: &Agent, tap: &PgTap, part: &str) -> String {
    let outcome = wait_for(
        &format!("the sink failing with {part:?}"),
        Duration::from_secs(60),
        || {
            if tap.messages(b'p') > 0 {
                return Some(Err(tap.saw(PG_PASSWORD.as_bytes())));
            }
            let status = agent.status();
            let error = sink_status(&status, "db")["last_error"]
                .as_str()?
                .to_owned();
            error.contains(part).then_some(Ok(error))
        },
    );
    match outcome {
        Ok(error) => error,
        Err(clear) => panic!("the agent answered the server (the password in the clear: {clear})"),
    }
}

#[test]
fn a_server_that_asks_for_the_password_in_the_clear_gets_none_unless_sslmode_disable() {
    let pg = PgServer::start();
    pg.set_method("password", "scram-sha-256");
    let server = JsonServer::start(Vec::new(), minute(0));
    let (prefer_dir, disable_dir) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );

    // sslmode "prefer" (the default); the server declines TLS and wants the password.
    let prefer_tap = PgTap::start(pg.port);
    let prefer = pg_agent_config(
        prefer_dir.path(),
        "prefer",
        &server.url,
        prefer_tap.port,
        "",
    );
    let refusal = |how: &str| {
        format!(
            "db: postgres://127.0.0.1:{port}/postgres: the server at 127.0.0.1:{port} asked \
             for the password {how} over an unencrypted connection; refused (use TLS, or set \
             sslmode = \"disable\" to allow it)",
            port = prefer_tap.port
        )
    };
    assert_eq!(
        refusal_with(&prefer, &prefer_tap, "clear text"),
        refusal("in clear text")
    );
    assert_eq!(sink_status(&prefer.status(), "db")["state"], "retrying");

    // Said explicitly, plaintext is allowed: the same server loads.
    let disable_tap = PgTap::start(pg.port);
    let disable = pg_agent_config(
        disable_dir.path(),
        "disable",
        &server.url,
        disable_tap.port,
        "sslmode = \"disable\"",
    );
    wait_for("the disable agent's rows", Duration::from_secs(60), || {
        (rows_of(&pg, "disable") == Some(4)).then_some(())
    });
    assert!(
        disable_tap.saw(PG_PASSWORD.as_bytes()),
        "the tap sees a password sent in the clear"
    );
    disable.terminate();

    // The server now wants an MD5 hash, which can be replayed and broken offline.
    pg.set_method("md5", "md5");
    assert_eq!(
        refusal_with(&prefer, &prefer_tap, "MD5"),
        refusal("as an MD5 hash")
    );
    assert_eq!(rows_of(&pg, "prefer"), Some(0));
    assert_eq!(
        prefer_tap.messages(b'p'),
        0,
        "no password message went out over plaintext"
    );
    assert!(!prefer_tap.saw(PG_PASSWORD.as_bytes()));
    let log = prefer.log_text();
    assert!(log.contains("asked for the password"), "{log}");
    assert!(!log.contains(PG_PASSWORD), "{log}");

    // SCRAM proves the password without sending it: allowed without TLS.
    pg.set_method("scram-sha-256", "scram-sha-256");
    wait_for("the prefer agent's rows", Duration::from_secs(60), || {
        (rows_of(&pg, "prefer") == Some(4)).then_some(())
    });
    assert!(prefer_tap.messages(b'p') > 0, "SCRAM answered");
    assert!(!prefer_tap.saw(PG_PASSWORD.as_bytes()));
}

#[test]
fn agents_creating_the_same_table_at_once_all_succeed() {
    const AGENTS: usize = 4;
    let pg = PgServer::start();
    // Every DDL statement takes 0.3 s more before its transaction can commit, which
    // widens the window between `IF NOT EXISTS` looking and the commit from a few
    // milliseconds to a certain overlap. The database holds no table still.
    pg.psql(
        "postgres",
        "CREATE FUNCTION slow_ddl() RETURNS event_trigger LANGUAGE plpgsql
           AS $$ BEGIN PERFORM pg_sleep(0.3); END $$;
         CREATE EVENT TRIGGER slow_ddl ON ddl_command_end EXECUTE FUNCTION slow_ddl()",
    );
    // Holds the first CREATE TABLE until every agent sent one (or 3 s passed): without a
    // lock they all run at once; with it, only one gets that far while the others wait.
    let tap = PgTap::with_gate(pg.port, AGENTS, Duration::from_secs(3));
    let server = JsonServer::start(Vec::new(), minute(0));
    let dirs: Vec<_> = (0..AGENTS)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let agents: Vec<Agent> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| pg_agent_config(dir.path(), &format!("a{i}"), &server.url, tap.port, ""))
        .collect();

    let count = |sql: &str| -> Option<usize> {
        pg.try_psql("postgres", sql)
            .map(|n| n.parse().expect("a count"))
    };
    wait_for("every agent's rows", Duration::from_secs(90), || {
        (count("SELECT count(*) FROM edgespool_windows") == Some(4 * AGENTS)).then_some(())
    });
    assert!(tap.held() >= 1, "the gate saw the CREATE TABLE");
    for (i, agent) in agents.iter().enumerate() {
        let status = agent.status();
        let db = sink_status(&status, "db");
        assert!(db["last_error"].is_null(), "agent {i}: {db}");
        let log = agent.log_text();
        assert!(
            !log.contains("delivery failed") && !log.contains("duplicate key"),
            "agent {i}:\n{log}"
        );
    }
    assert_eq!(
        count(
            "SELECT count(*) FROM pg_tables WHERE tablename IN ('edgespool_windows', 'edgespool_loads')"
        ),
        Some(2)
    );
    assert_eq!(
        count("SELECT count(DISTINCT device) FROM edgespool_windows"),
        Some(AGENTS)
    );
}
