//! Hot config reload, driven the way an operator drives it: by editing the file the
//! binary was started with (`wasmbassador run --config FILE`), by a Kubernetes
//! ConfigMap swap of the `..data` symlink, and by SIGHUP. Through all of it a
//! long-lived session keeps working and stays on the server it started on.
//!
//! Upstreams are real: two TLS-only PostgreSQL servers and a TLS-only Redis that
//! requires client certificates. Every wait is bounded polling of the admin API.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use support::process::{Process, wait_refused};
use support::ticker::Ticker;
use support::{CertFiles, PgOptions, Pki, Postgres, Redis};
use tokio_postgres::NoTls;

/// Upper bound of every wait for a reload to take effect.
const WAIT: Duration = Duration::from_secs(10);

const RELOAD_OK: &str = r#"wasmbassador_config_reloads_total{result="success"}"#;
const RELOAD_FAILED: &str = r#"wasmbassador_config_reloads_total{result="failure"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lived_session_survives_add_remove_change_broken_push_and_sighup() {
    let pki = Pki::new();
    let pg_a = Postgres::start(PgOptions::tls_only(pki.server_cert(&["127.0.0.1", "localhost"])));
    let pg_b = Postgres::start(PgOptions::tls_only(pki.server_cert(&["127.0.0.1", "localhost"])));
    let redis = Redis::start_tls(&pki);
    let t = Templates {
        ca: pki.ca_pem_path().to_path_buf(),
        client: pki.client_cert("wasmbassador"),
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("wasmbassador.toml");

    // 1. One postgres listener in front of server A. The app opens its session.
    let orders_a = t.pg_upstream("orders", pg_a.addr(), &t.ca);
    std::fs::write(
        &config,
        t.doc(&[&t.listener("orders", "postgres", "orders"), &orders_a]),
    )
    .expect("write");
    let mut wb = Process::run(&config).await;
    let orders = wb.wait_listener("orders", WAIT).await;
    let session = Arc::new(pg_connect(orders).await);
    let home = where_am_i(&session).await;
    assert_eq!(home.port, pg_a.port(), "the session starts on server A");
    assert!(home.ssl, "the upstream leg is TLS (pg_stat_ssl)");
    let ticker = Ticker::start(session.clone(), Duration::from_millis(100), WAIT);

    // 2. Add a listener: a Redis cache behind mTLS. It starts accepting.
    let cache_up = t.redis_upstream("cache", redis.addr());
    let cache_l = t.listener("cache", "tcp", "cache");
    let ok = wb.metric(RELOAD_OK).await;
    std::fs::write(
        &config,
        t.doc(&[
            &t.listener("orders", "postgres", "orders"),
            &cache_l,
            &orders_a,
            &cache_up,
        ]),
    )
    .expect("write");
    wb.wait_metric_above(RELOAD_OK, ok, WAIT).await;
    let cache = wb.wait_listener("cache", WAIT).await;
    let mut redis_conn = redis_connect(cache).await;
    assert_eq!(incr(&mut redis_conn).await, 1, "the new listener reaches Redis");
    assert_eq!(
        where_am_i(&session).await,
        home,
        "the session is untouched by an added listener"
    );

    // 3. Change the upstream: "orders" now points at server B. New connections go
    //    there; the open session stays on A, in the same backend.
    let orders_b = t.pg_upstream("orders", pg_b.addr(), &t.ca);
    let ok = wb.metric(RELOAD_OK).await;
    std::fs::write(
        &config,
        t.doc(&[
            &t.listener("orders", "postgres", "orders"),
            &cache_l,
            &orders_b,
            &cache_up,
        ]),
    )
    .expect("write");
    wb.wait_metric_above(RELOAD_OK, ok, WAIT).await;
    let fresh = pg_connect(orders).await;
    assert_eq!(
        where_am_i(&fresh).await.port,
        pg_b.port(),
        "a new connection goes to server B"
    );
    drop(fresh);
    assert_eq!(
        where_am_i(&session).await,
        home,
        "the open session stays on server A"
    );
    assert_eq!(incr(&mut redis_conn).await, 2);

    // 4. Remove the "orders" listener: its port stops accepting; the session that
    //    came through it keeps working.
    let ok = wb.metric(RELOAD_OK).await;
    std::fs::write(&config, t.doc(&[&cache_l, &orders_b, &cache_up])).expect("write");
    wb.wait_metric_above(RELOAD_OK, ok, WAIT).await;
    wait_refused(orders, WAIT, "the removed listener").await;
    assert_eq!(wb.listener("orders").await, None, "/listeners no longer shows it");
    assert_eq!(
        where_am_i(&session).await,
        home,
        "the session outlives its listener"
    );

    // 5. Push a broken file: a new listener plus a typo. It is refused whole, the
    //    log names the problem and its line, and the failure is counted.
    let again = t.listener("orders-again", "postgres", "orders");
    let typo = again.replace("upstream =", "max_conections = 100\nupstream =");
    let broken = t.doc(&[&cache_l, &typo, &orders_b, &cache_up]);
    let typo_line = line_of(&broken, "max_conections");
    let failed = wb.metric(RELOAD_FAILED).await;
    std::fs::write(&config, &broken).expect("write");
    wb.wait_metric_above(RELOAD_FAILED, failed, WAIT).await;
    let report = wb.wait_for_stderr("config reload refused", WAIT).await;
    assert!(report.contains("1 problem"), "{report}");
    let problem = wb
        .wait_for_stderr(
            &format!("line {typo_line}: listener \"orders-again\".max_conections"),
            WAIT,
        )
        .await;
    assert!(problem.contains("unknown field"), "{problem}");
    assert_eq!(
        wb.listener("orders-again").await,
        None,
        "nothing of a refused config applies"
    );
    assert_eq!(incr(&mut redis_conn).await, 3, "the old config keeps serving");
    assert_eq!(
        incr(&mut redis_connect(cache).await).await,
        4,
        "and keeps accepting"
    );
    assert_eq!(where_am_i(&session).await, home);

    // 6. A valid file whose new upstream names a CA file that is not there yet
    //    (a Secret not mounted yet) is refused with the file and its line. Once the
    //    file exists, SIGHUP applies the unchanged text: the watcher had no reason to.
    let secrets = tempfile::tempdir().expect("temp dir");
    let late_ca = secrets.path().join("late-ca.pem");
    let orders_late = t.pg_upstream("orders-late", pg_b.addr(), &late_ca);
    let waiting = t.doc(&[
        &cache_l,
        &t.listener("orders-again", "postgres", "orders-late"),
        &orders_b,
        &cache_up,
        &orders_late,
    ]);
    let ca_line = line_of(&waiting, &late_ca.display().to_string());
    let failed = wb.metric(RELOAD_FAILED).await;
    std::fs::write(&config, &waiting).expect("write");
    wb.wait_metric_above(RELOAD_FAILED, failed, WAIT).await;
    let problem = wb
        .wait_for_stderr(&format!("line {ca_line}: upstream \"orders-late\".tls.ca"), WAIT)
        .await;
    assert!(
        problem.contains("late-ca.pem"),
        "the problem names the file: {problem}"
    );
    assert_eq!(wb.listener("orders-again").await, None);

    std::fs::copy(&t.ca, &late_ca).expect("copy CA");
    let ok = wb.metric(RELOAD_OK).await;
    wb.signal("HUP");
    wb.wait_metric_above(RELOAD_OK, ok, WAIT).await;
    let again = wb.wait_listener("orders-again", WAIT).await;
    let fresh = pg_connect(again).await;
    let there = where_am_i(&fresh).await;
    assert_eq!(
        there.port,
        pg_b.port(),
        "the SIGHUP-applied listener reaches server B"
    );
    assert!(there.ssl);
    drop(fresh);

    // Through all of it the long-lived session never missed a query.
    let (queries, failures) = ticker.stop().await;
    println!(
        "long-lived session: {queries} background queries across 4 reloads and 2 refusals, {failures} failed"
    );
    assert_eq!(failures, 0, "background queries on the long-lived session failed");
    assert!(queries > 0, "the background ticker ran");
    assert_eq!(where_am_i(&session).await, home);
    assert_eq!(incr(&mut redis_conn).await, 5);

    drop(redis_conn);
    drop(session);
    wb.signal("TERM");
    let status = wb.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "exit after SIGTERM: {status}\n{}", wb.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_symlink_swap_is_picked_up_every_time() {
    let pki = Pki::new();
    let redis = Redis::start_tls(&pki);
    let t = Templates {
        ca: pki.ca_pem_path().to_path_buf(),
        client: pki.client_cert("wasmbassador"),
    };
    let cache_up = t.redis_upstream("cache", redis.addr());

    // The mount as the kubelet lays it out:
    //   wasmbassador.toml -> ..data/wasmbassador.toml
    //   ..data -> ..2026_11_22_10_00_00.000000001
    let mount = tempfile::tempdir().expect("temp dir");
    let mut configmap = ConfigMap::create(
        mount.path(),
        "..2026_11_22_10_00_00.000000001",
        &t.doc(&[&t.listener("cache", "tcp", "cache"), &cache_up]),
    );
    let wb = Process::run(&configmap.file()).await;
    let first = wb.wait_listener("cache", WAIT).await;
    let mut conn = redis_connect(first).await;
    assert_eq!(incr(&mut conn).await, 1);

    // `kubectl apply` of a new ConfigMap: a second listener appears.
    let ok = wb.metric(RELOAD_OK).await;
    configmap.update(
        "..2026_11_22_10_05_00.000000002",
        &t.doc(&[
            &t.listener("cache", "tcp", "cache"),
            &t.listener("cache-2", "tcp", "cache"),
            &cache_up,
        ]),
    );
    wb.wait_metric_above(RELOAD_OK, ok, WAIT).await;
    let second = wb.wait_listener("cache-2", WAIT).await;
    assert_eq!(incr(&mut redis_connect(second).await).await, 2);
    assert_eq!(incr(&mut conn).await, 3);

    // And again: the watch survives the swap (the old target folder is gone).
    let ok = wb.metric(RELOAD_OK).await;
    configmap.update(
        "..2026_11_22_10_10_00.000000003",
        &t.doc(&[&t.listener("cache-2", "tcp", "cache"), &cache_up]),
    );
    wb.wait_metric_above(RELOAD_OK, ok, WAIT).await;
    wait_refused(first, WAIT, "listener removed by the second ConfigMap update").await;
    assert_eq!(
        incr(&mut conn).await,
        4,
        "the connection through the removed listener goes on"
    );
    assert_eq!(incr(&mut redis_connect(second).await).await, 5);
    assert_eq!(
        wb.metric(RELOAD_FAILED).await,
        0.0,
        "no swap was ever read half-done"
    );
}

// ---------------------------------------------------------------------------------
// Helpers

/// Config text builders. Every listener binds 127.0.0.1:0; the tests ask
/// `/listeners` for the bound address.
struct Templates {
    ca: PathBuf,
    client: CertFiles,
}

impl Templates {
    fn doc(&self, parts: &[&str]) -> String {
        let mut text = String::from("[admin]\nlisten = \"127.0.0.1:0\"\ndrain_timeout = \"5s\"\n");
        for p in parts {
            text.push('\n');
            text.push_str(p);
        }
        text
    }

    fn listener(&self, name: &str, protocol: &str, upstream: &str) -> String {
        format!(
            "[[listener]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"{protocol}\"\nupstream = \"{upstream}\"\n"
        )
    }

    fn pg_upstream(&self, name: &str, addr: SocketAddr, ca: &Path) -> String {
        format!(
            "[[upstream]]\nname = \"{name}\"\nhealth = {{ check = \"postgres\", interval = \"1s\" }}\n\
             tls = {{ ca = \"{ca}\" }}\n[[upstream.endpoint]]\naddress = \"{addr}\"\n",
            ca = ca.display()
        )
    }

    fn redis_upstream(&self, name: &str, addr: SocketAddr) -> String {
        format!(
            "[[upstream]]\nname = \"{name}\"\n\
             tls = {{ ca = \"{ca}\", client_cert = \"{cert}\", client_key = \"{key}\" }}\n\
             [[upstream.endpoint]]\naddress = \"{addr}\"\n",
            ca = self.ca.display(),
            cert = self.client.cert.display(),
            key = self.client.key.display(),
        )
    }
}

/// The 1-based line of the first line of `text` that contains `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in the config:\n{text}"))
        + 1
}

/// A ConfigMap volume on disk, updated the way the kubelet's atomic writer does it.
struct ConfigMap {
    mount: PathBuf,
    current: String,
}

const KEY: &str = "wasmbassador.toml";

impl ConfigMap {
    fn create(mount: &Path, stamp: &str, text: &str) -> ConfigMap {
        std::fs::create_dir(mount.join(stamp)).expect("timestamped folder");
        std::fs::write(mount.join(stamp).join(KEY), text).expect("write");
        std::os::unix::fs::symlink(stamp, mount.join("..data")).expect("..data symlink");
        std::os::unix::fs::symlink(format!("..data/{KEY}"), mount.join(KEY)).expect("key symlink");
        ConfigMap {
            mount: mount.to_path_buf(),
            current: stamp.to_string(),
        }
    }

    /// The path the application is given: `mount/wasmbassador.toml`.
    fn file(&self) -> PathBuf {
        self.mount.join(KEY)
    }

    /// New timestamped folder, `..data_tmp` symlink to it renamed over `..data`
    /// (atomic), then the old folder removed.
    fn update(&mut self, stamp: &str, text: &str) {
        std::fs::create_dir(self.mount.join(stamp)).expect("timestamped folder");
        std::fs::write(self.mount.join(stamp).join(KEY), text).expect("write");
        std::os::unix::fs::symlink(stamp, self.mount.join("..data_tmp")).expect("..data_tmp symlink");
        std::fs::rename(self.mount.join("..data_tmp"), self.mount.join("..data")).expect("swap ..data");
        std::fs::remove_dir_all(self.mount.join(&self.current)).expect("remove the old folder");
        self.current = stamp.to_string();
    }
}

/// Where a PostgreSQL session runs: server port, backend PID and whether the
/// server sees TLS.
#[derive(Debug, PartialEq, Eq)]
struct Place {
    port: u16,
    backend: i32,
    ssl: bool,
}

async fn where_am_i(client: &tokio_postgres::Client) -> Place {
    let row = tokio::time::timeout(
        WAIT,
        client.query_one(
            "select current_setting('port')::int, pg_backend_pid(), \
             (select ssl from pg_stat_ssl where pid = pg_backend_pid())",
            &[],
        ),
    )
    .await
    .expect("query within 10 s")
    .expect("query through wasmbassador");
    Place {
        port: u16::try_from(row.get::<_, i32>(0)).expect("port"),
        backend: row.get(1),
        ssl: row.get(2),
    }
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

/// A plain-text Redis connection through the listener at `addr`.
async fn redis_connect(addr: SocketAddr) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(format!("redis://{addr}/")).expect("redis URL");
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(WAIT))
        .set_response_timeout(Some(WAIT));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap_or_else(|e| panic!("connecting to Redis through {addr}: {e}"))
}

/// `INCR hits`: proves a round trip and which state the server has.
async fn incr(conn: &mut redis::aio::MultiplexedConnection) -> i64 {
    redis::cmd("INCR")
        .arg("hits")
        .query_async(conn)
        .await
        .expect("INCR through wasmbassador")
}
