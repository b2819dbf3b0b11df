//! The ready-made plugins and the plugin chain, end to end: real `.wasm` files built
//! from `plugins/`, loaded by a running host, in front of real TLS-only PostgreSQL 15
//! servers, driven by a real client (tokio-postgres, or raw protocol bytes where the
//! exact byte count matters).
//!
//! - `allow-list` admits and refuses by user, database and client CIDR; a refusal is a
//!   FATAL ErrorResponse with SQLSTATE 28000 and the plugin's reason, it is counted,
//!   and the server never hears of the refused client.
//! - `route-by-database` sends a session to another upstream or to a tagged endpoint of
//!   the listener's upstream by the database asked for.
//! - `access-log` writes one line per closed connection and keeps its counters, in the
//!   binary's own log and `/metrics`; past `plugin.log_lines_per_second` its lines are
//!   dropped and reported in a warning while its counters stay exact.
//! - The chain: listener order, first deny wins, the last route wins, `on_error`.
//! - The sandbox: no files, no environment, and only the granted files via the host.
//! - `wasmbassador validate` accepts each plugin's `example.toml` and names the file and
//!   the step of a plugin it refuses.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::pg::error_text;
use support::plugins::wasm;
use support::process::{BIN, Process, metric_value};
use support::{PgOptions, Pki, Postgres};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};
use wasmbassador::{Ambassador, Config};

/// Generous bound for anything that should take well under a second.
const PATIENCE: Duration = Duration::from_secs(30);

/// `[admin]` for every config here: a free port, and a short drain at shutdown.
const ADMIN: &str = "[admin]\nlisten = \"127.0.0.1:0\"\ndrain_timeout = \"2s\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_admits_and_refuses_by_user_database_and_client_before_the_server_hears_of_it() {
    let pki = Pki::new();
    let pg = Postgres::start(PgOptions::tls_only(pki.server_cert(&["127.0.0.1"])));
    let allow_list = wasm("allow-list");
    let mut config = String::from(ADMIN);
    config.push_str(&pg_upstream("orders", &[(pg.addr(), 0, &[])], pki.ca_pem_path()));
    for (name, keys) in [
        ("by-user", r#"users = ["app"]"#),
        ("by-database", r#"databases = ["orders"]"#),
        ("pod-network", r#"clients = ["10.0.0.0/8"]"#),
        ("loopback", r#"clients = ["127.0.0.0/8"]"#),
    ] {
        config.push_str(&listener(name, "orders", &[name]));
        config.push_str(&plugin(name, &allow_list, &format!("config = {{ {keys} }}")));
    }
    let amb = start_in_process(&config).await;
    let addr = |name: &str| amb.listener_addr(name).expect("listener is bound");

    // users = ["app"]: app gets in and works; other is refused with the plugin's reason.
    let app = connect(addr("by-user"), "app", "orders", "admitted-user")
        .await
        .expect("app is on the user allow list");
    let row = app
        .query_one("select current_user::text, 6 * 7", &[])
        .await
        .expect("a query through the allow list");
    assert_eq!(row.get::<_, String>(0), "app");
    assert_eq!(row.get::<_, i32>(1), 42);
    drop(app);
    let (code, message) = refusal(addr("by-user"), "other", "orders", "refused-user").await;
    assert_eq!(code, SqlState::INVALID_AUTHORIZATION_SPECIFICATION, "{message}");
    assert_eq!(message, "user \"other\" is not in the allow list");

    // databases = ["orders"]: orders in, postgres out (user app both times).
    let orders = connect(addr("by-database"), "app", "orders", "admitted-database")
        .await
        .expect("orders is on the database allow list");
    assert_eq!(current_database(&orders).await, "orders");
    drop(orders);
    let (code, message) = refusal(addr("by-database"), "app", "postgres", "refused-database").await;
    assert_eq!(code, SqlState::INVALID_AUTHORIZATION_SPECIFICATION, "{message}");
    assert_eq!(message, "database \"postgres\" is not in the allow list");

    // clients: 127.0.0.1 is not in 10.0.0.0/8, and is in 127.0.0.0/8.
    let (code, message) = refusal(addr("pod-network"), "app", "orders", "refused-client").await;
    assert_eq!(code, SqlState::INVALID_AUTHORIZATION_SPECIFICATION, "{message}");
    assert_eq!(message, "client 127.0.0.1 is not in the allow list");
    let loopback = connect(addr("loopback"), "app", "orders", "admitted-client")
        .await
        .expect("127.0.0.1 is in 127.0.0.0/8");
    assert_eq!(current_database(&loopback).await, "orders");
    drop(loopback);

    // Each refusal is counted on its listener, each admission is not.
    let metrics = amb.shared().metrics.encode();
    for (name, denials) in [
        ("by-user", 1.0),
        ("by-database", 1.0),
        ("pod-network", 1.0),
        ("loopback", 0.0),
    ] {
        let sample = format!("wasmbassador_plugin_denials_total{{listener=\"{name}\"}}");
        assert_eq!(metric_value(&metrics, &sample), denials, "{sample}\n{metrics}");
    }

    // The server logged every admitted session (log_connections = on), and nothing
    // of the refused ones: the plugin refused them before any upstream was contacted.
    let log = pg.log();
    for admitted in ["admitted-user", "admitted-database", "admitted-client"] {
        assert!(
            log.contains(&format!("application_name={admitted}")),
            "the server log shows the admitted session {admitted}:\n{log}"
        );
    }
    for refused in ["refused-user", "refused-database", "refused-client"] {
        assert!(
            !log.contains(refused),
            "the server heard of the refused session {refused}:\n{log}"
        );
    }
    assert!(!log.contains("user=other"), "the server saw user other:\n{log}");
    assert_eq!(
        pg.psql("select count(*) from pg_stat_activity where usename = 'other'"),
        "0"
    );

    amb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_by_database_sends_sessions_to_another_upstream_or_a_tagged_endpoint() {
    let pki = Pki::new();
    let cert = pki.server_cert(&["127.0.0.1"]);
    let pg_a = Postgres::start(PgOptions::tls_only(cert.clone()));
    let pg_b = Postgres::start(PgOptions::tls_only(cert));
    for pg in [&pg_a, &pg_b] {
        pg.psql("CREATE DATABASE reporting");
    }
    // "main" prefers A (priority 0); B is its lower-priority replica. "orders-b" is B.
    let mut config = String::from(ADMIN);
    config.push_str(&listener("pg", "main", &["route-db"]));
    config.push_str(&pg_upstream(
        "main",
        &[(pg_a.addr(), 0, &["primary"]), (pg_b.addr(), 1, &["replica"])],
        pki.ca_pem_path(),
    ));
    config.push_str(&pg_upstream(
        "orders-b",
        &[(pg_b.addr(), 0, &[])],
        pki.ca_pem_path(),
    ));
    config.push_str(&plugin(
        "route-db",
        &wasm("route-by-database"),
        r#"config = { routes = { orders = "orders-b", reporting = "tag:replica", ghost = "nowhere" } }"#,
    ));
    let amb = start_in_process(&config).await;
    let listen = amb.listener_addr("pg").expect("listener pg is bound");

    // Several sessions each, so that landing on the right server is not a coin toss.
    for round in 0..3 {
        for (database, server, why) in [
            ("orders", pg_b.port(), "routes.orders names upstream orders-b"),
            (
                "postgres",
                pg_a.port(),
                "no route: the listener's upstream, best priority",
            ),
            (
                "reporting",
                pg_b.port(),
                "routes.reporting names the tag replica of main",
            ),
        ] {
            let client = connect(listen, "app", database, "route-test")
                .await
                .unwrap_or_else(|e| panic!("round {round}: a session to {database}: {}", error_text(&e)));
            let row = client
                .query_one("select inet_server_port(), current_database()::text", &[])
                .await
                .expect("a query through the route");
            assert_eq!(row.get::<_, i32>(0), i32::from(server), "{database}: {why}");
            assert_eq!(row.get::<_, String>(1), database);
        }
    }

    // A route to an upstream that does not exist refuses the session, naming the
    // target and the plugin that chose it.
    let (code, message) = refusal(listen, "app", "ghost", "route-test").await;
    assert_eq!(code, SqlState::CONNECTION_FAILURE, "{message}");
    assert!(
        message.contains("\"nowhere\"") && message.contains("route-db"),
        "the refusal names the target and the plugin: {message}"
    );

    amb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_writes_one_line_per_closed_connection_and_counts_them() {
    let pki = Pki::new();
    let pg = Postgres::start(PgOptions::tls_only(pki.server_cert(&["127.0.0.1"])));
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = String::from(ADMIN);
    // access-log first, so that it also sees what allow-app refuses.
    config.push_str(&listener("orders-db", "orders", &["access-log", "allow-app"]));
    config.push_str(&pg_upstream("orders", &[(pg.addr(), 0, &[])], pki.ca_pem_path()));
    config.push_str(&plugin("access-log", &wasm("access-log"), "on_error = \"allow\""));
    config.push_str(&plugin(
        "allow-app",
        &wasm("allow-list"),
        r#"config = { users = ["app"] }"#,
    ));
    let path = dir.path().join("wasmbassador.toml");
    std::fs::write(&path, &config).expect("write config");
    let wb = Process::run(&path).await;
    let listen = wb.wait_listener("orders-db", PATIENCE).await;

    // Three ordinary sessions, one with a large result, one in raw protocol bytes whose
    // exact size is known, and two refused ones: seven connections.
    for _ in 0..3 {
        let client = connect(listen, "app", "orders", "access-log-test")
            .await
            .unwrap_or_else(|e| panic!("{}\n{}", error_text(&e), wb.output()));
        client.simple_query("select 1").await.expect("select 1");
    }
    let big = connect(listen, "app", "postgres", "access-log-test")
        .await
        .expect("a session to postgres");
    let text: String = big
        .query_one("select repeat('x', 100000)", &[])
        .await
        .expect("a large result")
        .get(0);
    assert_eq!(text.len(), 100_000);
    drop(big);
    let raw = raw_session(listen, "app", "orders").await;
    for _ in 0..2 {
        let (code, _) = refusal(listen, "other", "orders", "access-log-test").await;
        assert_eq!(code, SqlState::INVALID_AUTHORIZATION_SPECIFICATION);
    }

    // One line per connection, once each has closed (on_close runs after both sides
    // are closed, so wait for the lines, boundedly).
    let completed = r#"wasmbassador_plugin_connections_total{plugin="access-log",listener="orders-db",outcome="completed"}"#;
    let denied =
        r#"wasmbassador_plugin_connections_total{plugin="access-log",listener="orders-db",outcome="denied"}"#;
    let wb_ref = &wb;
    wait_until(PATIENCE, "seven access-log lines and counts", || async move {
        let lines = access_lines(&wb_ref.stderr());
        let metrics = metrics_of(wb_ref).await;
        lines.len() >= 7 && metric_value(&metrics, completed) >= 5.0 && metric_value(&metrics, denied) >= 2.0
    })
    .await;
    let lines = access_lines(&wb.stderr());
    assert_eq!(lines.len(), 7, "one line per connection:\n{}", wb.output());
    let endpoint = pg.addr().to_string();
    let mut sum_up = 0;
    let mut sum_down = 0;
    for line in &lines {
        assert_eq!(kv(line, "listener"), "orders-db", "{line}");
        assert!(kv(line, "client").starts_with("127.0.0.1:"), "{line}");
        let up: u64 = kv(line, "bytes_to_upstream").parse().expect("a byte count");
        let down: u64 = kv(line, "bytes_to_client").parse().expect("a byte count");
        sum_up += up;
        sum_down += down;
        match kv(line, "outcome") {
            "completed" => {
                assert_eq!(kv(line, "user"), "app", "{line}");
                assert_eq!(kv(line, "upstream"), "orders", "{line}");
                assert_eq!(kv(line, "endpoint"), endpoint, "{line}");
                assert!(up > 0 && down > 0, "a completed session moved bytes: {line}");
            }
            "denied" => {
                assert_eq!(kv(line, "user"), "other", "{line}");
                assert_eq!(kv(line, "database"), "orders", "{line}");
                assert_eq!(
                    (kv(line, "upstream"), kv(line, "endpoint"), up, down),
                    ("-", "-", 0, 0),
                    "a refused connection reached no upstream: {line}"
                );
            }
            other => panic!("unexpected outcome {other}: {line}"),
        }
    }
    let outcomes = |o: &str| lines.iter().filter(|l| kv(l, "outcome") == o).count();
    assert_eq!((outcomes("completed"), outcomes("denied")), (5, 2), "{lines:#?}");

    // The large result shows in the to-client bytes of the session that asked for it.
    let big_line = lines
        .iter()
        .find(|l| kv(l, "database") == "postgres")
        .expect("the line of the session to postgres");
    let big_down: u64 = kv(big_line, "bytes_to_client").parse().expect("a byte count");
    assert!(big_down > 100_000, "the 100 kB result is counted: {big_line}");

    // The raw session's bytes are exactly what its client sent (startup message
    // included) and received.
    let raw_line = lines
        .iter()
        .find(|l| kv(l, "client") == raw.local.to_string())
        .unwrap_or_else(|| panic!("no line for the raw session from {}: {lines:#?}", raw.local));
    assert_eq!(kv(raw_line, "database"), "orders");
    assert_eq!(
        kv(raw_line, "bytes_to_upstream"),
        raw.sent.to_string(),
        "{raw_line}"
    );
    assert_eq!(
        kv(raw_line, "bytes_to_client"),
        raw.received.to_string(),
        "{raw_line}"
    );

    // The plugin's counters agree with its lines and with the host's own byte counts.
    let metrics = metrics_of(&wb).await;
    assert_eq!(metric_value(&metrics, completed), 5.0, "{metrics}");
    assert_eq!(metric_value(&metrics, denied), 2.0, "{metrics}");
    for (direction, sum) in [("to_upstream", sum_up), ("to_client", sum_down)] {
        let plugin = format!(
            "wasmbassador_plugin_bytes_total{{plugin=\"access-log\",listener=\"orders-db\",direction=\"{direction}\"}}"
        );
        let host =
            format!("wasmbassador_listener_bytes_total{{listener=\"orders-db\",direction=\"{direction}\"}}");
        assert_eq!(metric_value(&metrics, &plugin), sum as f64, "{plugin}\n{metrics}");
        assert_eq!(metric_value(&metrics, &host), sum as f64, "{host}\n{metrics}");
    }
    assert_eq!(
        metric_value(
            &metrics,
            r#"wasmbassador_plugin_denials_total{listener="orders-db"}"#
        ),
        2.0
    );
    println!("access-log line of the raw session: {raw_line}");
    println!(
        "access-log: 7 connections, {sum_up} bytes to upstream, {sum_down} bytes to client; raw session {} up / {} down",
        raw.sent, raw.received
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_past_the_plugins_cap_are_dropped_and_reported_while_its_counters_stay_exact() {
    let pki = Pki::new();
    let pg = Postgres::start(PgOptions::tls_only(pki.server_cert(&["127.0.0.1"])));
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = String::from(ADMIN);
    config.push_str(&listener("orders-db", "orders", &["access-log"]));
    config.push_str(&pg_upstream("orders", &[(pg.addr(), 0, &[])], pki.ca_pem_path()));
    config.push_str(&plugin(
        "access-log",
        &wasm("access-log"),
        "on_error = \"allow\"\nlog_lines_per_second = 2",
    ));
    let path = dir.path().join("wasmbassador.toml");
    std::fs::write(&path, &config).expect("write config");
    let wb = Process::run(&path).await;
    let listen = wb.wait_listener("orders-db", PATIENCE).await;

    // Twenty sessions: to keep every line, they would have to spread over ten seconds
    // (two lines a second); they take a fraction of that.
    const SESSIONS: usize = 20;
    for _ in 0..SESSIONS {
        let client = connect(listen, "app", "orders", "log-cap-test")
            .await
            .unwrap_or_else(|e| panic!("{}\n{}", error_text(&e), wb.output()));
        client.simple_query("select 1").await.expect("select 1");
    }
    let completed = r#"wasmbassador_plugin_connections_total{plugin="access-log",listener="orders-db",outcome="completed"}"#;
    let wb_ref = &wb;
    wait_until(PATIENCE, "every session counted", || async move {
        metric_value(&metrics_of(wb_ref).await, completed) >= SESSIONS as f64
    })
    .await;
    // The counters are exact; only lines are capped.
    assert_eq!(metric_value(&metrics_of(&wb).await, completed), SESSIONS as f64);
    let lines = access_lines(&wb.stderr()).len();
    assert!(
        (2..SESSIONS).contains(&lines),
        "{lines} of {SESSIONS} lines kept under a cap of 2 a second:\n{}",
        wb.output()
    );

    // The first line of a later second reports what the cap dropped.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let client = connect(listen, "app", "orders", "log-cap-test")
        .await
        .unwrap_or_else(|e| panic!("{}\n{}", error_text(&e), wb.output()));
    client.simple_query("select 1").await.expect("select 1");
    drop(client);
    wait_until(PATIENCE, "the dropped-lines warning", || async move {
        wb_ref.stderr().contains("plugin log lines dropped")
    })
    .await;
    let log = wb.stderr();
    let warning = log
        .lines()
        .find(|l| l.contains("plugin log lines dropped"))
        .expect("the warning");
    assert!(
        warning.contains("access-log") && warning.contains("dropped="),
        "{warning}"
    );
    println!("log cap: {lines} of {SESSIONS} lines kept; {warning}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_runs_in_listener_order_first_deny_wins_last_route_wins_and_on_error_applies() {
    let pki = Pki::new();
    let pg = Postgres::start(PgOptions::tls_only(pki.server_cert(&["127.0.0.1"])));
    let route = wasm("route-by-database");
    let trap = wasm("trap");
    let mut config = String::from(ADMIN);
    config.push_str(&pg_upstream("main", &[(pg.addr(), 0, &[])], pki.ca_pem_path()));
    for (name, chain) in [
        ("allow-then-deny", &["allow-all", "deny-all"][..]),
        ("deny-then-allow", &["deny-all", "allow-all"]),
        ("ghost-then-main", &["to-ghost", "to-main"]),
        ("main-then-ghost", &["to-main", "to-ghost"]),
        ("trap-allow", &["trap-allow", "allow-all"]),
        ("trap-deny", &["trap-deny", "allow-all"]),
    ] {
        config.push_str(&listener(name, "main", chain));
    }
    config.push_str(&plugin(
        "allow-all",
        &wasm("allow-all"),
        "config = { version = \"v1\" }",
    ));
    config.push_str(&plugin(
        "deny-all",
        &wasm("deny-all"),
        "config = { version = \"v1\" }",
    ));
    config.push_str(&plugin("to-ghost", &route, "config = { default = \"ghost\" }"));
    config.push_str(&plugin("to-main", &route, "config = { default = \"main\" }"));
    config.push_str(&plugin("trap-allow", &trap, "on_error = \"allow\""));
    config.push_str(&plugin("trap-deny", &trap, "on_error = \"deny\""));
    let amb = start_in_process(&config).await;
    let addr = |name: &str| amb.listener_addr(name).expect("listener is bound");
    let allowed_by_allow_all = || {
        metric_value(
            &amb.shared().metrics.encode(),
            r#"wasmbassador_plugin_allow_all_connections_total{plugin="allow-all",version="v1"}"#,
        )
    };

    // allow-all, then deny-all: allow is no objection, the deny refuses.
    let (code, message) = refusal(addr("allow-then-deny"), "app", "orders", "chain").await;
    assert_eq!(code, SqlState::INVALID_AUTHORIZATION_SPECIFICATION);
    assert_eq!(message, "deny-all v1");
    assert_eq!(allowed_by_allow_all(), 1.0, "allow-all ran before deny-all");

    // deny-all first: the chain ends there, allow-all never runs.
    let (code, message) = refusal(addr("deny-then-allow"), "app", "orders", "chain").await;
    assert_eq!(code, SqlState::INVALID_AUTHORIZATION_SPECIFICATION);
    assert_eq!(message, "deny-all v1");
    assert_eq!(allowed_by_allow_all(), 1.0, "the first deny ends the chain");

    // A later route replaces an earlier one, in either order.
    let client = connect(addr("ghost-then-main"), "app", "orders", "chain")
        .await
        .unwrap_or_else(|e| panic!("the later route to main wins: {}", error_text(&e)));
    assert_eq!(current_database(&client).await, "orders");
    drop(client);
    let (code, message) = refusal(addr("main-then-ghost"), "app", "orders", "chain").await;
    assert_eq!(code, SqlState::CONNECTION_FAILURE, "{message}");
    assert!(
        message.contains("\"ghost\"") && message.contains("to-ghost"),
        "the later route to ghost wins, and the refusal says who chose it: {message}"
    );

    // A trapping plugin under on_error = "allow": the connection goes through, and the
    // chain goes on to allow-all.
    let client = connect(addr("trap-allow"), "app", "orders", "chain")
        .await
        .unwrap_or_else(|e| panic!("on_error = allow lets it through: {}", error_text(&e)));
    assert_eq!(current_database(&client).await, "orders");
    drop(client);
    assert_eq!(allowed_by_allow_all(), 2.0, "the chain went on after the trap");

    // Under on_error = "deny": refused with the policy's reason, allow-all not run.
    let (code, message) = refusal(addr("trap-deny"), "app", "orders", "chain").await;
    assert_eq!(code, SqlState::INVALID_AUTHORIZATION_SPECIFICATION);
    assert!(
        message.starts_with("plugin trap-deny failed"),
        "the reason names the failed plugin: {message}"
    );
    assert_eq!(allowed_by_allow_all(), 2.0, "the failure ended the chain");

    // Both traps were counted and are shown at /plugins (their on_close calls, which
    // succeed, may still be running: only on_connect is counted exactly).
    let status = wasmbassador::plugin::status(&amb.shared().plugins.load());
    let metrics = amb.shared().metrics.encode();
    for name in ["trap-allow", "trap-deny"] {
        let s = status.iter().find(|s| s.name == name).expect("in /plugins");
        assert_eq!((s.errors, s.timeouts), (1, 0), "{name}");
        let last = s.last_error.as_deref().unwrap_or_default();
        assert!(
            last.contains("on_connect") && last.contains("trap"),
            "{name}: {last}"
        );
        for (series, want) in [
            (
                format!("wasmbassador_plugin_calls_total{{plugin=\"{name}\",hook=\"on_connect\"}}"),
                1.0,
            ),
            (
                format!(
                    "wasmbassador_plugin_failures_total{{plugin=\"{name}\",hook=\"on_connect\",kind=\"trap\"}}"
                ),
                1.0,
            ),
        ] {
            assert_eq!(metric_value(&metrics, &series), want, "{series}\n{metrics}");
        }
    }
    // The host kept serving.
    let client = connect(addr("ghost-then-main"), "app", "orders", "chain")
        .await
        .expect("still serving after the traps");
    assert_eq!(current_database(&client).await, "orders");

    amb.shutdown().await;
}

/// SDK plugins get the connection's text fields packed into one string (WIT 0.1.3
/// `packed-hooks`); the `echo` plugin answers with every field it unpacked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_field_reaches_an_sdk_plugin_whole() {
    let mut config = String::from(ADMIN);
    // Never contacted: echo refuses every connection.
    config.push_str(
        "\n[[upstream]]\nname = \"nowhere\"\n  [[upstream.endpoint]]\n  address = \"127.0.0.1:9\"\n",
    );
    config.push_str(&listener("echo", "nowhere", &["echo"]));
    config.push_str(&plugin("echo", &wasm("echo"), ""));
    let amb = start_in_process(&config).await;
    let listen = amb.listener_addr("echo").expect("listener is bound");
    let mut pg = tokio_postgres::Config::new();
    pg.host("127.0.0.1")
        .port(listen.port())
        .user("app")
        .dbname("orders")
        .application_name("ψ-echo")
        .options("-c search_path=echo")
        .connect_timeout(PATIENCE);
    let err = match pg.connect(NoTls).await {
        Ok(_) => panic!("echo refuses every connection"),
        Err(e) => e,
    };
    let message = err
        .as_db_error()
        .unwrap_or_else(|| panic!("the refusal is not an ErrorResponse: {}", error_text(&err)))
        .message()
        .to_string();
    let expected = "listener=echo protocol=postgres client_ip=127.0.0.1 upstream=nowhere \
                    startup=[user=app database=orders application_name=ψ-echo ";
    assert!(message.starts_with(expected), "{message}");
    // The other parameters follow in the order tokio-postgres sent them.
    for other in ["client_encoding=UTF8", "options=-c search_path=echo"] {
        assert!(message.contains(other), "{other} missing: {message}");
    }
    amb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_left_at_their_default_are_no_longer_called_and_a_0_1_0_plugin_still_runs() {
    let pki = Pki::new();
    let pg = Postgres::start(PgOptions::tls_only(pki.server_cert(&["127.0.0.1"])));
    let mut config = String::from(ADMIN);
    config.push_str(&pg_upstream("main", &[(pg.addr(), 0, &[])], pki.ca_pem_path()));
    // allow-all implements on_connect only, access-log on_close only; on close,
    // allow-all comes first, so once access-log has closed a connection, allow-all's
    // on_close for it has been called or skipped.
    config.push_str(&listener("pair", "main", &["allow-all", "access-log"]));
    config.push_str(&listener("old", "main", &["compat"]));
    config.push_str(&plugin("allow-all", &wasm("allow-all"), ""));
    config.push_str(&plugin("access-log", &wasm("access-log"), ""));
    config.push_str(&plugin("compat", &wasm("compat-0-1-0"), ""));
    let amb = start_in_process(&config).await;
    let addr = |name: &str| amb.listener_addr(name).expect("listener is bound");
    let calls = |plugin: &str, hook: &str| {
        metric_value(
            &amb.shared().metrics.encode(),
            &format!("wasmbassador_plugin_calls_total{{plugin=\"{plugin}\",hook=\"{hook}\"}}"),
        )
    };
    let session = |n: f64| {
        let listen = addr("pair");
        async move {
            let client = connect(listen, "app", "orders", "defaults")
                .await
                .unwrap_or_else(|e| panic!("session through allow-all and access-log: {}", error_text(&e)));
            assert_eq!(current_database(&client).await, "orders");
            drop(client);
            wait_until(PATIENCE, "access-log's on_close ran", || async {
                calls("access-log", "on_close") >= n
            })
            .await;
        }
    };

    // The first connection calls every hook; the SDK's default bodies tell the host.
    session(1.0).await;
    assert_eq!(calls("allow-all", "on_connect"), 1.0);
    assert_eq!(calls("allow-all", "on_close"), 1.0);
    assert_eq!(calls("access-log", "on_connect"), 1.0);
    // From then on only the implemented hooks are called.
    for n in 2..=6 {
        session(f64::from(n)).await;
    }
    assert_eq!(
        calls("allow-all", "on_connect"),
        6.0,
        "implemented: called every time"
    );
    assert_eq!(
        calls("access-log", "on_close"),
        6.0,
        "implemented: called every time"
    );
    assert_eq!(calls("allow-all", "on_close"), 1.0, "a default: no longer called");
    assert_eq!(
        calls("access-log", "on_connect"),
        1.0,
        "a default: no longer called"
    );

    // A plugin built against 0.1.0 of the interface loads in this host, and both its
    // hooks run for every connection (it never says a hook is unused).
    for n in 1..=2 {
        let (code, message) = refusal(addr("old"), "app", "orders", "compat").await;
        assert_eq!(code, SqlState::INVALID_AUTHORIZATION_SPECIFICATION);
        assert_eq!(message, "built against 0.1.0; host clock ticking");
        wait_until(PATIENCE, "the 0.1.0 plugin's on_close ran", || async {
            calls("compat", "on_close") >= f64::from(n)
        })
        .await;
    }
    assert_eq!(calls("compat", "on_connect"), 2.0);
    assert_eq!(calls("compat", "on_close"), 2.0);
    // Its on-close logs through the host (`host@0.1.0`, linked to this host's newer
    // 0.1.x): that call must not trap.
    let failures = amb.shared().metrics.encode();
    for hook in ["on_connect", "on_close"] {
        let sample =
            format!("wasmbassador_plugin_failures_total{{plugin=\"compat\",hook=\"{hook}\",kind=\"trap\"}}");
        assert_eq!(metric_value(&failures, &sample), 0.0, "{sample}\n{failures}");
    }

    amb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_gets_no_files_no_environment_and_only_the_files_it_was_granted() {
    assert!(
        std::env::vars().count() > 0,
        "the test process has an environment to leak"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let granted = dir.path().join("token");
    let secret = dir.path().join("secret");
    std::fs::write(&granted, "granted-token-123\n").expect("write token");
    std::fs::write(&secret, "do-not-read-me\n").expect("write secret");
    let snoop = wasm("snoop");
    let grants = format!("grants = {{ files = [{}] }}", toml_path(&granted));

    // Nothing listens at the upstream: snoop denies every connection before it is used.
    let nowhere: SocketAddr = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .expect("address");
    let mut config = String::from(ADMIN);
    config.push_str(&format!(
        "\n[[upstream]]\nname = \"nowhere\"\n  [[upstream.endpoint]]\n  address = \"{nowhere}\"\n"
    ));
    for (name, path) in [("granted", &granted), ("ungranted", &secret)] {
        config.push_str(&listener(name, "nowhere", &[name]));
        config.push_str(&plugin(
            name,
            &snoop,
            &format!("{grants}\nconfig = {{ path = {} }}", toml_path(path)),
        ));
    }
    let amb = start_in_process(&config).await;
    let addr = |name: &str| amb.listener_addr(name).expect("listener is bound");

    // The granted file, by its granted path: its bytes, through the host's read-file.
    let (code, report) = refusal(addr("granted"), "app", "orders", "snoop").await;
    assert_eq!(code, SqlState::INVALID_AUTHORIZATION_SPECIFICATION);
    assert_eq!(
        report,
        format!("fs=err env=none vars=0 files=ok:{}", "granted-token-123\n".len()),
        "std::fs and std::env get nothing; the granted file is read whole"
    );

    // Any other file, even one that exists and is readable by the host: refused, and
    // the refusal names the path (its content never reaches the plugin).
    let (_, report) = refusal(addr("ungranted"), "app", "orders", "snoop").await;
    let expected = format!(
        "fs=err env=none vars=0 files=err:{}: not granted",
        secret.display()
    );
    assert!(
        report.starts_with(&expected),
        "expected {expected:?}..., got {report:?}"
    );
    assert!(!report.contains("do-not-read-me"), "{report}");

    amb.shutdown().await;
}

#[test]
fn validate_accepts_each_plugin_example_and_names_the_file_and_step_of_a_bad_plugin() {
    let pki = Pki::new();
    let client = pki.client_cert("wasmbassador");
    let plugins = support::plugins::repo().join("plugins");
    for example in [
        "allow-list",
        "route-by-database",
        "access-log",
        "bearer-token",
        "header-router",
        "http-metrics",
    ] {
        let original = plugins.join(example).join("example.toml");
        let text = std::fs::read_to_string(&original).expect("read example.toml");
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("etc");
        let text = text.replace("/etc/wasmbassador/", &format!("{}/", root.display()));
        let files = support::quoted_paths_under(&text, &root);
        assert!(
            files.iter().any(|f| f.extension().is_some_and(|x| x == "wasm")),
            "{example}/example.toml names its .wasm under /etc/wasmbassador"
        );
        for file in files {
            std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
            match file.extension().and_then(|x| x.to_str()) {
                Some("wasm") => {
                    let stem = file.file_stem().and_then(|s| s.to_str()).expect("plugin name");
                    std::fs::copy(wasm(stem), &file).expect("copy plugin");
                }
                Some("key") => std::fs::write(&file, client.key_pem()).expect("write key"),
                Some("crt") => std::fs::write(&file, client.cert_pem()).expect("write cert"),
                Some("pem") => std::fs::write(&file, pki.ca_pem()).expect("write CA"),
                _ => {}
            }
        }
        let copy = dir.path().join("config.toml");
        std::fs::write(&copy, &text).expect("write copy");
        let out = wasmbassador(&["validate", "--config", &copy.display().to_string()]);
        assert!(
            out.status.success(),
            "validate {example}/example.toml failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let plugins_in_config = text.matches("[[plugin]]").count();
        assert!(
            stdout.contains(&format!("{plugins_in_config} plugin(s))")),
            "{example}: {stdout}"
        );
    }

    // Plugins that fail at different steps (a plugin built for a newer host among them):
    // every one is reported, each with its file and what failed.
    let dir = tempfile::tempdir().expect("temp dir");
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm but not really: a half-written upload").expect("write garbage");
    let wrong_world = dir.path().join("wrong_world.wasm");
    std::fs::copy(wasm("wrong-world"), &wrong_world).expect("copy plugin");
    let future = dir.path().join("future.wasm");
    std::fs::copy(wasm("future-0-1-9"), &future).expect("copy plugin");
    let allow_list = dir.path().join("allow_list.wasm");
    std::fs::copy(wasm("allow-list"), &allow_list).expect("copy plugin");
    let mut config = String::from(ADMIN);
    config.push_str(&listener(
        "pg",
        "pg",
        &["garbage", "wrong-world", "future", "bad-config"],
    ));
    config
        .push_str("\n[[upstream]]\nname = \"pg\"\n  [[upstream.endpoint]]\n  address = \"127.0.0.1:5432\"\n");
    config.push_str(&plugin("garbage", &garbage, ""));
    config.push_str(&plugin("wrong-world", &wrong_world, ""));
    config.push_str(&plugin("future", &future, ""));
    config.push_str(&plugin(
        "bad-config",
        &allow_list,
        r#"config = { clients = ["10.1.2.3/8"] }"#,
    ));
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, &config).expect("write config");
    let out = wasmbassador(&["validate", "--config", &path.display().to_string()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "validate must refuse:\n{stderr}");
    assert!(stderr.contains("4 plugin(s) refused"), "{stderr}");
    for (name, file, step) in [
        ("garbage", &garbage, "is not a usable WebAssembly component"),
        (
            "wrong-world",
            &wrong_world,
            "does not implement the wasmbassador:plugin world",
        ),
        (
            "future",
            &future,
            "built against wasmbassador:plugin@0.1.9, newer than the 0.1.4 this wasmbassador implements",
        ),
        ("bad-config", &allow_list, "init failed"),
    ] {
        let line = stderr
            .lines()
            .find(|l| l.contains(&format!("plugin {name:?}")))
            .unwrap_or_else(|| panic!("no line for plugin {name}:\n{stderr}"));
        assert!(
            line.contains(&file.display().to_string()) && line.contains(step),
            "plugin {name}: the line names {} and {step:?}: {line}",
            file.display()
        );
    }
    assert!(
        stderr.contains("did you mean \"10.0.0.0/8\""),
        "init's own reason is passed on:\n{stderr}"
    );
}

// ---------------------------------------------------------------------------------
// Helpers

/// A TOML string holding `path`.
fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// A `postgres` listener on a free port with `upstream` and the plugin chain `plugins`.
fn listener(name: &str, upstream: &str, plugins: &[&str]) -> String {
    format!(
        "\n[[listener]]\nname = {name:?}\nlisten = \"127.0.0.1:0\"\nprotocol = \"postgres\"\n\
         upstream = {upstream:?}\nplugins = {plugins:?}\n"
    )
}

/// A TLS upstream (verified against `ca`) with `(address, priority, tags)` endpoints.
fn pg_upstream(name: &str, endpoints: &[(SocketAddr, u32, &[&str])], ca: &Path) -> String {
    let mut out = format!(
        "\n[[upstream]]\nname = {name:?}\nconnect_timeout = \"10s\"\ntls = {{ ca = {} }}\n",
        toml_path(ca)
    );
    for (addr, priority, tags) in endpoints {
        out.push_str(&format!(
            "  [[upstream.endpoint]]\n  address = \"{addr}\"\n  priority = {priority}\n  tags = {tags:?}\n"
        ));
    }
    out
}

/// A `[[plugin]]` loading `path`, with further keys in `extra`. The deadline is
/// generous: the machine is shared, and no test here is about timeouts.
fn plugin(name: &str, path: &Path, extra: &str) -> String {
    format!(
        "\n[[plugin]]\nname = {name:?}\npath = {}\ntimeout = \"2s\"\n{extra}\n",
        toml_path(path)
    )
}

/// Starts wasmbassador in this process; its log shows with a failing test's output.
async fn start_in_process(toml: &str) -> Ambassador {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("info")
        .try_init();
    let config = Config::parse(toml, "plugins test config")
        .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{toml}"));
    Ambassador::start(config)
        .await
        .unwrap_or_else(|e| panic!("starting wasmbassador: {e}\n{toml}"))
}

/// A plain-text session through `listen`.
async fn connect(
    listen: SocketAddr,
    user: &str,
    database: &str,
    application: &str,
) -> Result<Client, tokio_postgres::Error> {
    let conninfo = format!(
        "host=127.0.0.1 port={} user={user} dbname={database} application_name={application} connect_timeout=30",
        listen.port()
    );
    let (client, connection) = tokio::time::timeout(PATIENCE, tokio_postgres::connect(&conninfo, NoTls))
        .await
        .unwrap_or_else(|_| panic!("connecting to {listen} took more than {PATIENCE:?}"))?;
    tokio::spawn(connection);
    Ok(client)
}

/// Connects and expects a refusal from the server side (an ErrorResponse): its
/// SQLSTATE and message.
async fn refusal(listen: SocketAddr, user: &str, database: &str, application: &str) -> (SqlState, String) {
    let err = match connect(listen, user, database, application).await {
        Ok(_) => panic!("{user}@{database} through {listen} must be refused"),
        Err(e) => e,
    };
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("the refusal is not an ErrorResponse: {}", error_text(&err)));
    assert_eq!(db.severity(), "FATAL", "{}", db.message());
    (db.code().clone(), db.message().to_string())
}

/// `current_database()` of a session.
async fn current_database(client: &Client) -> String {
    client
        .query_one("select current_database()::text", &[])
        .await
        .expect("select current_database()")
        .get(0)
}

/// What a [`raw_session`] sent and received.
struct RawSession {
    local: SocketAddr,
    sent: usize,
    received: usize,
}

/// A session in protocol bytes: startup message, wait for ReadyForQuery, Terminate,
/// read until the server closes. Returns the exact byte counts each way.
async fn raw_session(listen: SocketAddr, user: &str, database: &str) -> RawSession {
    let exchange = async {
        let mut sock = tokio::net::TcpStream::connect(listen).await.expect("connect");
        let local = sock.local_addr().expect("local address");
        let mut body = 196_608u32.to_be_bytes().to_vec(); // protocol 3.0
        for (k, v) in [("user", user), ("database", database)] {
            for s in [k, v] {
                body.extend_from_slice(s.as_bytes());
                body.push(0);
            }
        }
        body.push(0);
        let mut startup = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        startup.extend_from_slice(&body);
        sock.write_all(&startup).await.expect("send startup");
        let mut received = Vec::new();
        // Messages up to ReadyForQuery ('Z').
        loop {
            let mut head = [0u8; 5];
            sock.read_exact(&mut head).await.expect("read a message header");
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            let mut rest = vec![0u8; len - 4];
            sock.read_exact(&mut rest).await.expect("read a message body");
            assert_ne!(
                head[0],
                b'E',
                "the server refused: {}",
                String::from_utf8_lossy(&rest)
            );
            received.extend_from_slice(&head);
            received.extend_from_slice(&rest);
            if head[0] == b'Z' {
                break;
            }
        }
        let terminate = [b'X', 0, 0, 0, 4];
        sock.write_all(&terminate).await.expect("send Terminate");
        sock.read_to_end(&mut received).await.expect("read to the end");
        RawSession {
            local,
            sent: startup.len() + terminate.len(),
            received: received.len(),
        }
    };
    tokio::time::timeout(PATIENCE, exchange)
        .await
        .expect("the raw session finished in time")
}

/// The access-log lines in a log.
fn access_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("connection closed listener="))
        .map(str::to_string)
        .collect()
}

/// The value of `key=value` in a logfmt line (bare values only).
fn kv<'a>(line: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}=");
    line.split_whitespace()
        .find_map(|t| t.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

/// `/metrics` of a running binary.
async fn metrics_of(wb: &Process) -> String {
    let (status, body) = wb.get("/metrics").await;
    assert_eq!(status, 200, "/metrics: {body}");
    body
}

/// Polls `check` until it holds; panics after `timeout`.
async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the binary to completion (for commands that do not serve).
fn wasmbassador(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap_or_else(|e| panic!("running {BIN} {args:?}: {e}"))
}
