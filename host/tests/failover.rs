//! Failover between two real TLS-only PostgreSQL 15 servers: a primary at priority 0
//! and a standby at priority 1, behind a `postgres` listener.
//!
//! A bounded stream of new connections runs while the primary is stopped and started
//! again; each connection asks the server for its port, so the test knows which
//! server answered. Active health checks move traffic to the standby and back;
//! connect retries hide the dead primary from new connections until the checks
//! notice. Passive ejection is checked on its own with slow active checks.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::process::{http_get, metric_value};
use support::{PgOptions, Pki, Postgres};
use tokio_postgres::NoTls;
use wasmbassador::{Ambassador, Config};

/// One new connection every this long.
const PACE: Duration = Duration::from_millis(25);
/// At most this many connections per run...
const MAX_CONNECTIONS: usize = 600;
/// ...and for at most this long.
const MAX_RUN: Duration = Duration::from_secs(15);
/// How many connections must have been seen in a phase before it is judged.
const PER_PHASE: usize = 8;
/// Generous limit for anything the test waits for.
const PATIENCE: Duration = Duration::from_secs(20);

const ACTIVE_HEALTH: &str = r#"{ check = "postgres", interval = "200ms", timeout = "500ms", unhealthy_after = 2, healthy_after = 2 }"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_primary_moves_new_connections_to_the_standby_and_back() {
    let pki = Pki::new();
    let primary = Arc::new(Postgres::start(PgOptions::tls_only(
        pki.server_cert(&["127.0.0.1", "localhost"]),
    )));
    let standby = Postgres::start(PgOptions::tls_only(pki.server_cert(&["127.0.0.1", "localhost"])));

    let with_retries = failover_run(&pki, &primary, &standby, 3).await;
    let without_retries = failover_run(&pki, &primary, &standby, 1).await;

    eprintln!("== failover: connections that failed while the primary was stopped and restarted ==");
    eprintln!("   with retry.attempts = 3: {}", with_retries.summary());
    eprintln!("   with retry.attempts = 1: {}", without_retries.summary());

    // With retries, a connection that starts once the primary is down never fails for
    // lack of an upstream: the retry goes to the standby until the checks notice.
    let after_stop = with_retries.started_after(with_retries.stopped);
    let no_upstream: Vec<_> = after_stop
        .iter()
        .filter(|a| matches!(a.outcome, Outcome::NoUpstream(_)))
        .collect();
    assert!(
        no_upstream.is_empty(),
        "with retries, connections started after the primary was stopped failed for lack of an upstream: {no_upstream:#?}"
    );
    // Nor does one fail while the primary is down or starting up again: a server
    // that turns a session away before authentication ("the database system is
    // starting up") is a failed connect attempt, retried on the standby.
    let failed_after_stop: Vec<_> = after_stop
        .iter()
        .filter(|a| !matches!(a.outcome, Outcome::Served(_)))
        .collect();
    assert!(
        failed_after_stop.is_empty(),
        "with retries, connections started after the primary was stopped failed: {failed_after_stop:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_eject_a_dead_endpoint_and_all_ejected_endpoints_are_still_tried() {
    let pki = Pki::new();
    let primary = Postgres::start(PgOptions::tls_only(pki.server_cert(&["127.0.0.1", "localhost"])));
    let standby = Postgres::start(PgOptions::tls_only(pki.server_cert(&["127.0.0.1", "localhost"])));
    // Active checks are slow (one at start, then none within the test), so only
    // passive ejection can notice a dead endpoint here; ejections last a minute.
    let amb = start(
        &pki,
        &primary,
        &standby,
        r#"{ attempts = 2, backoff = "10ms" }"#,
        r#"{ check = "postgres", interval = "60s", timeout = "2s" }"#,
        r#"eject = { after = 3, for = "60s" }"#,
    )
    .await;
    let addr = amb.listener_addr("orders").expect("listener orders is bound");
    let admin = amb.admin_addr();
    let p0 = format!("127.0.0.1:{}", primary.port());
    let p1 = format!("127.0.0.1:{}", standby.port());
    let ejections = |ep: &str| {
        metric(
            admin,
            format!(r#"wasmbassador_endpoint_ejections_total{{upstream="orders",endpoint="{ep}"}}"#),
        )
    };
    let attempts_on = |ep: &str| {
        metric(
            admin,
            format!(r#"wasmbassador_upstream_connect_attempts_total{{upstream="orders",endpoint="{ep}"}}"#),
        )
    };

    assert_eq!(one_connection(addr).await, Outcome::Served(primary.port()));

    // The primary dies. Each new connection fails on it once and is retried on the
    // standby, so clients notice nothing; after three such failures it is ejected.
    tokio::task::block_in_place(|| primary.stop());
    for _ in 0..3 {
        assert_eq!(one_connection(addr).await, Outcome::Served(standby.port()));
    }
    let primary_ejected_at = Instant::now();
    let status = endpoint_status(admin, &p0).await;
    assert_eq!(
        status["ejected"], true,
        "primary after 3 connect failures: {status:#}"
    );
    assert_eq!(
        status["healthy"], true,
        "the slow active check has not run, so ejection was passive: {status:#}"
    );
    assert_eq!(ejections(&p0).await, 1.0);

    // Ejected, the primary is skipped: new connections go straight to the standby.
    let before = attempts_on(&p0).await;
    for _ in 0..3 {
        assert_eq!(one_connection(addr).await, Outcome::Served(standby.port()));
    }
    assert_eq!(
        attempts_on(&p0).await,
        before,
        "no connect attempt on the ejected primary"
    );

    // The standby dies too: clients get a clear error, and it is ejected as well.
    tokio::task::block_in_place(|| standby.stop());
    for i in 0..3 {
        let outcome = one_connection(addr).await;
        assert!(
            matches!(outcome, Outcome::NoUpstream(_)),
            "connection {i} with both servers down: {outcome:?}"
        );
    }
    let status = endpoint_status(admin, &p1).await;
    assert_eq!(
        status["ejected"], true,
        "standby after 3 connect failures: {status:#}"
    );
    assert_eq!(ejections(&p1).await, 1.0);
    let status = endpoint_status(admin, &p0).await;
    assert_eq!(
        status["ejected"], true,
        "the primary's minute is not over: {status:#}"
    );

    // Every endpoint is ejected, yet they are still tried: the primary comes back
    // and the next connection reaches it without waiting out its ejection.
    tokio::task::block_in_place(|| primary.start_again());
    let status = endpoint_status(admin, &p0).await;
    assert_eq!(
        status["ejected"], true,
        "still within the primary's ejection: {status:#}"
    );
    assert_eq!(one_connection(addr).await, Outcome::Served(primary.port()));
    assert!(
        primary_ejected_at.elapsed() < Duration::from_secs(60),
        "the connection must not have waited out the 60 s ejection"
    );

    amb.shutdown().await;
}

// ---------------------------------------------------------------------------------
// Helpers

/// What one client connection got.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Connected and answered; the server's port says which one.
    Served(u16),
    /// wasmbassador found no upstream connection (its own ErrorResponse, 08006).
    NoUpstream(String),
    /// A server refused the startup (e.g. 57P03 "shutting down" / "starting up").
    ServerRefused(String),
    /// Anything else: connection lost (e.g. mid-query on the dying primary).
    Other(String),
}

/// One connection of a run: when it started and how it ended.
#[derive(Debug, Clone)]
struct Attempt {
    started: Instant,
    outcome: Outcome,
}

/// The record of one failover run.
struct Run {
    attempts_setting: u32,
    primary: u16,
    standby: u16,
    stop_began: Instant,
    stopped: Instant,
    detected: Instant,
    restart_began: Instant,
    back: Instant,
    attempts: Vec<Attempt>,
}

impl Run {
    fn started_between(&self, from: Instant, to: Instant) -> Vec<&Attempt> {
        self.attempts
            .iter()
            .filter(|a| a.started >= from && a.started < to)
            .collect()
    }

    fn started_after(&self, from: Instant) -> Vec<&Attempt> {
        self.attempts.iter().filter(|a| a.started >= from).collect()
    }

    fn failed(&self) -> Vec<&Attempt> {
        self.attempts
            .iter()
            .filter(|a| !matches!(a.outcome, Outcome::Served(_)))
            .collect()
    }

    fn summary(&self) -> String {
        let failed = self.failed();
        let count = |f: fn(&Outcome) -> bool| failed.iter().filter(|a| f(&a.outcome)).count();
        let on = |port| {
            self.attempts
                .iter()
                .filter(|a| a.outcome == Outcome::Served(port))
                .count()
        };
        format!(
            "{} of {} connections failed ({} no upstream, {} refused by a stopping/starting server, {} other); \
             served by primary {}, by standby {}; primary stop took {} ms, detection {} ms after it, \
             back on the primary {} ms after its restart began",
            failed.len(),
            self.attempts.len(),
            count(|o| matches!(o, Outcome::NoUpstream(_))),
            count(|o| matches!(o, Outcome::ServerRefused(_))),
            count(|o| matches!(o, Outcome::Other(_))),
            on(self.primary),
            on(self.standby),
            (self.stopped - self.stop_began).as_millis(),
            (self.detected - self.stopped).as_millis(),
            (self.back - self.restart_began).as_millis(),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_turns_sessions_away_before_authentication_is_retried_elsewhere() {
    let pki = Pki::new();
    let recovering = Postgres::start(PgOptions::tls_only(pki.server_cert(&["127.0.0.1", "localhost"])));
    recovering.hold_in_recovery();
    let standby = Postgres::start(PgOptions::tls_only(pki.server_cert(&["127.0.0.1", "localhost"])));
    // The recovering server still completes TLS, so active checks (TLS probe) call it
    // healthy and it stays first in line; ejection is off to keep it there.
    let health = r#"{ check = "postgres", interval = "60s", timeout = "2s" }"#;
    let no_eject = r#"eject = { after = 1000, for = "1s" }"#;
    let p0 = format!("127.0.0.1:{}", recovering.port());

    // Without a retry, the client sees the server's own refusal, untouched.
    let once = start(&pki, &recovering, &standby, "{ attempts = 1 }", health, no_eject).await;
    let addr = once.listener_addr("orders").expect("listener orders is bound");
    match one_connection(addr).await {
        Outcome::ServerRefused(text) => assert!(text.starts_with("57P03"), "{text}"),
        other => panic!("with one attempt the client should see 57P03, got {other:?}"),
    }
    once.shutdown().await;

    // With retries, each session goes on to the standby and the client notices
    // nothing; the refusals are counted as connect failures of the recovering server.
    let amb = start(
        &pki,
        &recovering,
        &standby,
        r#"{ attempts = 2, backoff = "10ms" }"#,
        health,
        no_eject,
    )
    .await;
    let addr = amb.listener_addr("orders").expect("listener orders is bound");
    for _ in 0..5 {
        assert_eq!(one_connection(addr).await, Outcome::Served(standby.port()));
    }
    let failures = metric(
        amb.admin_addr(),
        format!(r#"wasmbassador_upstream_connect_failures_total{{upstream="orders",endpoint="{p0}"}}"#),
    )
    .await;
    assert_eq!(failures, 5.0, "one refused attempt per session on {p0}");
    let status = endpoint_status(amb.admin_addr(), &p0).await;
    let last_error = status["last_error"].as_str().unwrap_or_default();
    assert!(
        last_error.contains("not accepting sessions") && last_error.contains("57P03"),
        "/upstreams names the reason: {status:#}"
    );
    amb.shutdown().await;
}

/// One failover run with `retry.attempts = attempts`: a fresh ambassador, a stream
/// of new connections, the primary stopped and started again. Checks what holds with
/// and without retries and returns the record; leaves the primary running.
async fn failover_run(pki: &Pki, primary: &Arc<Postgres>, standby: &Postgres, attempts: u32) -> Run {
    let amb = start(
        pki,
        primary,
        standby,
        &format!(r#"{{ attempts = {attempts}, backoff = "20ms" }}"#),
        ACTIVE_HEALTH,
        "",
    )
    .await;
    let addr = amb.listener_addr("orders").expect("listener orders is bound");
    let admin = amb.admin_addr();
    let primary_ep = format!("127.0.0.1:{}", primary.port());
    let (p0, p1) = (primary.port(), standby.port());
    let load = Load::start(addr);

    load.wait_for(
        PER_PHASE,
        Instant::now(),
        |o| *o == Outcome::Served(p0),
        "served by the primary",
    )
    .await;

    let stop_began = Instant::now();
    let pg = primary.clone();
    tokio::task::spawn_blocking(move || pg.stop())
        .await
        .expect("stopping the primary");
    let stopped = Instant::now();
    wait_health(admin, &primary_ep, false).await;
    let detected = Instant::now();
    load.wait_for(PER_PHASE, detected, |_| true, "after detection")
        .await;

    let restart_began = Instant::now();
    let pg = primary.clone();
    tokio::task::spawn_blocking(move || pg.start_again())
        .await
        .expect("starting the primary again");
    wait_health(admin, &primary_ep, true).await;
    let back = Instant::now();
    load.wait_for(PER_PHASE, back, |_| true, "after the primary is healthy again")
        .await;

    let attempts_record = load.finish().await;
    amb.shutdown().await;
    let run = Run {
        attempts_setting: attempts,
        primary: p0,
        standby: p1,
        stop_began,
        stopped,
        detected,
        restart_began,
        back,
        attempts: attempts_record,
    };

    let label = format!("retry.attempts = {}", run.attempts_setting);
    let before: Vec<_> = run
        .attempts
        .iter()
        .filter(|a| a.started < run.stop_began - Duration::from_secs(1))
        .collect();
    assert!(
        before.iter().all(|a| a.outcome == Outcome::Served(p0)),
        "{label}: before the stop every connection reaches the primary: {before:#?}"
    );
    let on_standby = run.started_between(run.detected, run.restart_began);
    assert!(
        on_standby.len() >= PER_PHASE,
        "{label}: too few connections after detection"
    );
    assert!(
        on_standby.iter().all(|a| a.outcome == Outcome::Served(p1)),
        "{label}: after the dead primary is detected every new connection reaches the standby: {on_standby:#?}"
    );
    let returned = run.started_after(run.back);
    assert!(
        returned.len() >= PER_PHASE,
        "{label}: too few connections after the return"
    );
    assert!(
        returned.iter().all(|a| a.outcome == Outcome::Served(p0)),
        "{label}: once the primary is healthy again new connections go back to it: {returned:#?}"
    );
    eprintln!("failover with {label}: {}", run.summary());
    for a in run.failed() {
        let at = a.started.saturating_duration_since(run.stop_began).as_millis() as i128
            - run.stop_began.saturating_duration_since(a.started).as_millis() as i128;
        eprintln!("   failed, started {at:+} ms from the stop: {:?}", a.outcome);
    }
    run
}

/// A bounded stream of new connections, one every [`PACE`], each recording which
/// server answered.
struct Load {
    started: Instant,
    results: Arc<Mutex<Vec<Attempt>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(addr: SocketAddr) -> Load {
        let results = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let (r, s) = (results.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut clients = Vec::new();
            let mut tick = tokio::time::interval(PACE);
            while clients.len() < MAX_CONNECTIONS && started.elapsed() < MAX_RUN && !s.load(Ordering::SeqCst)
            {
                tick.tick().await;
                let r = r.clone();
                clients.push(tokio::spawn(async move {
                    let started = Instant::now();
                    let outcome = one_connection(addr).await;
                    r.lock().expect("results lock").push(Attempt { started, outcome });
                }));
            }
            for c in clients {
                let _ = c.await;
            }
        });
        Load {
            started,
            results,
            stop,
            task,
        }
    }

    /// Waits until `n` connections that started at or after `since` have finished
    /// with an outcome matching `want`; panics if the stream ends or [`PATIENCE`]
    /// runs out first.
    async fn wait_for(&self, n: usize, since: Instant, want: impl Fn(&Outcome) -> bool, what: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let seen = self
                .results
                .lock()
                .expect("results lock")
                .iter()
                .filter(|a| a.started >= since && want(&a.outcome))
                .count();
            if seen >= n {
                return;
            }
            if Instant::now() >= deadline || self.task.is_finished() {
                panic!(
                    "only {seen} of {n} connections {what} (stream running for {:?}): {:#?}",
                    self.started.elapsed(),
                    self.results.lock().expect("results lock")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the stream, waits for its connections, and returns them in start order.
    async fn finish(self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::SeqCst);
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("the connection stream ends")
            .expect("the connection stream did not panic");
        let mut all = std::mem::take(&mut *self.results.lock().expect("results lock"));
        all.sort_by_key(|a| a.started);
        all
    }
}

/// Connects through the listener as `app` to `orders`, asks for the server's port,
/// and classifies the result.
async fn one_connection(addr: SocketAddr) -> Outcome {
    let conninfo = format!(
        "host={} port={} user=app dbname=orders connect_timeout=10",
        addr.ip(),
        addr.port()
    );
    let session = async {
        let (client, conn) = match tokio_postgres::connect(&conninfo, NoTls).await {
            Ok(c) => c,
            Err(e) => return classify_connect_error(&e),
        };
        tokio::spawn(conn);
        match client.query_one("select current_setting('port')::int", &[]).await {
            Ok(row) => {
                let port: i32 = row.get(0);
                Outcome::Served(u16::try_from(port).expect("a TCP port"))
            }
            Err(e) => Outcome::Other(format!("query: {e}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(15), session)
        .await
        .unwrap_or_else(|_| Outcome::Other("no answer within 15 s".into()))
}

fn classify_connect_error(e: &tokio_postgres::Error) -> Outcome {
    match e.as_db_error() {
        Some(db) if db.message().starts_with("wasmbassador: cannot reach upstream") => {
            Outcome::NoUpstream(db.message().to_owned())
        }
        Some(db) => Outcome::ServerRefused(format!("{}: {}", db.code().code(), db.message())),
        None => Outcome::Other(format!("connect: {e}")),
    }
}

/// Polls `/upstreams` until the endpoint's `healthy` is `want`.
async fn wait_health(admin: SocketAddr, endpoint: &str, want: bool) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let status = endpoint_status(admin, endpoint).await;
        if status["healthy"] == want {
            return;
        }
        if Instant::now() >= deadline {
            panic!("endpoint {endpoint} did not become healthy={want} within {PATIENCE:?}: {status:#}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Starts an in-process ambassador: a `postgres` listener `orders` in front of the
/// primary (priority 0) and the standby (priority 1), TLS verified against `pki`.
/// `retry` and `health` are TOML inline tables; `extra` more upstream keys.
async fn start(
    pki: &Pki,
    primary: &Postgres,
    standby: &Postgres,
    retry: &str,
    health: &str,
    extra: &str,
) -> Ambassador {
    let text = format!(
        r#"
[admin]
listen = "127.0.0.1:0"
drain_timeout = "2s"

[[listener]]
name = "orders"
listen = "127.0.0.1:0"
protocol = "postgres"
upstream = "orders"

[[upstream]]
name = "orders"
connect_timeout = "5s"
retry = {retry}
health = {health}
tls = {{ ca = "{ca}", server_name = "localhost" }}
{extra}

  [[upstream.endpoint]]
  address = "127.0.0.1:{p0}"
  priority = 0

  [[upstream.endpoint]]
  address = "127.0.0.1:{p1}"
  priority = 1
"#,
        ca = pki.ca_pem_path().display(),
        p0 = primary.port(),
        p1 = standby.port(),
    );
    let config = Config::parse(&text, "failover.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
    Ambassador::start(config).await.expect("starting wasmbassador")
}

/// The `/upstreams` entry of endpoint `address` of upstream `orders`.
async fn endpoint_status(admin: SocketAddr, address: &str) -> serde_json::Value {
    let (status, body) = http_get(admin, "/upstreams").await;
    assert_eq!(status, 200, "/upstreams: {body}");
    let all: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/upstreams is not JSON ({e}): {body}"));
    all.as_array()
        .into_iter()
        .flatten()
        .filter(|u| u["name"] == "orders")
        .flat_map(|u| u["endpoints"].as_array().cloned().unwrap_or_default())
        .find(|e| e["address"] == address)
        .unwrap_or_else(|| panic!("no endpoint {address} of upstream orders in /upstreams: {all:#}"))
}

/// The value of one `/metrics` sample (name and labels as exported), 0 when absent.
async fn metric(admin: SocketAddr, sample: String) -> f64 {
    let (status, body) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200, "/metrics: {body}");
    metric_value(&body, &sample)
}
