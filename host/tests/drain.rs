//! Graceful drain of the binary on SIGTERM, with real PostgreSQL sessions open
//! through it: readiness fails at once while liveness holds, new connections are
//! taken for `drain_delay` and refused after, open sessions finish their work, and
//! the process exits 0 — as soon as they close, or at `drain_timeout` with whatever
//! is left closed.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use support::process::{Process, wait_refused};
use support::{PgOptions, Pki, Postgres};
use tokio_postgres::NoTls;

/// Upper bound of every wait.
const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_readiness_drains_open_sessions_and_exits_zero_when_they_close() {
    let pki = Pki::new();
    let pg = Postgres::start(PgOptions::tls_only(pki.server_cert(&["127.0.0.1"])));
    // A drain_timeout far beyond the test's own bounds: the exit must come from
    // the sessions closing, not from the timeout.
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), pg.addr(), pki.ca_pem_path(), "2s", "60s");
    let mut wb = Process::run(&config).await;
    let orders = wb.wait_listener("orders", WAIT).await;

    let session = pg_connect(orders).await;
    assert_eq!(count(&session, 3).await, 3);
    assert_eq!(wb.get("/ready").await.0, 200, "ready before SIGTERM");

    wb.signal("TERM");
    let (status, body) = wait_for_status(&wb, "/ready", 503).await;
    assert_eq!(status, 503);
    assert!(body.starts_with("draining"), "/ready says why: {body}");
    assert_eq!(wb.get("/healthz").await.0, 200, "still alive while draining");

    // Within drain_delay a new connection is still accepted and served.
    let late = pg_connect(orders).await;
    assert_eq!(
        count(&late, 2).await,
        2,
        "a connection made during drain_delay is served"
    );

    // After the delay the listener stops accepting...
    wait_refused(orders, WAIT, "listener after drain_delay").await;
    // ...while both open sessions still do their work, a slow query included.
    assert_eq!(count(&session, 5).await, 5);
    session
        .simple_query("select pg_sleep(0.5)")
        .await
        .expect("a query that runs across the drain");
    assert_eq!(count(&late, 4).await, 4);
    assert_eq!(wb.get("/healthz").await.0, 200);

    // The app closes its sessions; the process exits 0 without waiting for the timeout.
    drop(session);
    drop(late);
    let status = wb.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "exit status after drain: {status}\n{}",
        wb.output()
    );
    let log = wb.stderr();
    assert!(
        !log.contains("drain timeout reached"),
        "the process waited for the timeout although the sessions had closed:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_still_open_at_drain_timeout_is_closed_and_the_exit_is_still_zero() {
    let pki = Pki::new();
    let pg = Postgres::start(PgOptions::tls_only(pki.server_cert(&["127.0.0.1"])));
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), pg.addr(), pki.ca_pem_path(), "0s", "1s");
    let mut wb = Process::run(&config).await;
    let orders = wb.wait_listener("orders", WAIT).await;
    let session = pg_connect(orders).await;
    assert_eq!(count(&session, 3).await, 3);

    // The app never closes its session.
    wb.signal("TERM");
    let status = wb.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "exit status after the drain timeout: {status}\n{}",
        wb.output()
    );
    assert!(
        wb.stderr().contains("drain timeout reached"),
        "the log says the timeout cut the session:\n{}",
        wb.output()
    );

    // The session was closed, not left dangling: its next query fails.
    let after = tokio::time::timeout(WAIT, session.simple_query("select 1"))
        .await
        .expect("the closed session answers at once");
    assert!(after.is_err(), "the session outlived the process: {after:?}");
    assert!(session.is_closed(), "the client sees its connection closed");
    // The server side ended too (no session left behind on the upstream).
    let left = wait_for_no_sessions(&pg).await;
    assert_eq!(left, 0, "sessions of user app still open on the server");
}

// ---------------------------------------------------------------------------------
// Helpers

fn write_config(
    dir: &Path,
    upstream: SocketAddr,
    ca: &Path,
    delay: &str,
    timeout: &str,
) -> std::path::PathBuf {
    let text = format!(
        r#"[admin]
listen = "127.0.0.1:0"
drain_delay = "{delay}"
drain_timeout = "{timeout}"

[[listener]]
name = "orders"
listen = "127.0.0.1:0"
protocol = "postgres"
upstream = "orders"

[[upstream]]
name = "orders"
tls = {{ ca = "{ca}" }}
[[upstream.endpoint]]
address = "{upstream}"
"#,
        ca = ca.display()
    );
    let path = dir.join("wasmbassador.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// Polls `path` on the admin server until it answers `want` (up to 10 s).
async fn wait_for_status(wb: &Process, path: &str, want: u16) -> (u16, String) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = wb.get(path).await;
        if status == want || Instant::now() >= deadline {
            return (status, body);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `select count(*) from generate_series(1, n)`: a round trip that returns `n`.
async fn count(client: &tokio_postgres::Client, n: i64) -> i64 {
    let row = tokio::time::timeout(
        WAIT,
        client.query_one("select count(*) from generate_series(1, $1::bigint)", &[&n]),
    )
    .await
    .expect("query within 10 s")
    .expect("query through wasmbassador");
    row.get(0)
}

/// A plain-text session through the listener at `addr`, as user `app` in `orders`.
async fn pg_connect(addr: SocketAddr) -> tokio_postgres::Client {
    let conninfo = format!(
        "host={} port={} user=app dbname=orders connect_timeout=10",
        addr.ip(),
        addr.port()
    );
    let (client, connection) = tokio::time::timeout(WAIT, tokio_postgres::connect(&conninfo, NoTls))
        .await
        .unwrap_or_else(|_| panic!("connecting to {addr}: no answer within 10 s"))
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Polls `pg_stat_activity` (over the server's Unix socket) until user `app` has no
/// session left, up to 10 s; returns how many were left.
async fn wait_for_no_sessions(pg: &Postgres) -> usize {
    let deadline = Instant::now() + WAIT;
    loop {
        let n: usize = pg
            .psql("select count(*) from pg_stat_activity where usename = 'app'")
            .parse()
            .expect("a count");
        if n == 0 || Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
