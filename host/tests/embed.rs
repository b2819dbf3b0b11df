//! The library embedded in a tokio program: `wasmbassador::run(config, shutdown)`
//! carries real traffic (a Redis over mTLS) and returns once the shutdown future
//! resolves. The example program under `examples/embed/` is built by
//! `cargo test --workspace`; running it here would only repeat this test slower.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::process::wait_refused;
use support::{Pki, Redis, free_port};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_carries_traffic_until_its_shutdown_future_resolves() {
    let pki = Pki::new();
    let redis = Redis::start_tls(&pki);
    let client = pki.client_cert("embedder");
    // `run` does not hand out bound addresses, so the listener gets a free port.
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = wasmbassador::Config::parse(
        &format!(
            r#"[admin]
listen = "127.0.0.1:0"
drain_timeout = "5s"

[[listener]]
name = "cache"
listen = "{listen}"
upstream = "cache"

[[upstream]]
name = "cache"
tls = {{ ca = "{ca}", client_cert = "{cert}", client_key = "{key}" }}
[[upstream.endpoint]]
address = "{redis}"
"#,
            ca = pki.ca_pem_path().display(),
            cert = client.cert.display(),
            key = client.key.display(),
            redis = redis.addr(),
        ),
        "embedded",
    )
    .expect("a valid config");

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(wasmbassador::run(config, async {
        let _ = stopped.await;
    }));

    // Traffic flows while the shutdown future is pending.
    let mut conn = redis_connect(listen).await;
    for n in 1..=3 {
        let got: i64 = redis::cmd("INCR")
            .arg("embedded")
            .query_async(&mut conn)
            .await
            .expect("INCR through the embedded ambassador");
        assert_eq!(got, n);
    }
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.expect("PING");
    assert_eq!(pong, "PONG");
    assert!(
        !running.is_finished(),
        "run returned before its shutdown future resolved"
    );
    drop(conn);

    // Resolve the future: run drains and returns Ok, and the port is closed.
    stop.send(()).expect("run is still waiting");
    let result = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("run returns after the shutdown future resolves")
        .expect("the run task did not panic");
    assert!(result.is_ok(), "run ended with {result:?}");
    wait_refused(listen, WAIT, "the listener after run returned").await;
}

#[tokio::test]
async fn run_returns_an_error_naming_the_listener_when_its_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let config = wasmbassador::Config::parse(
        &format!(
            r#"[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "busy"
listen = "{addr}"
upstream = "nowhere"

[[upstream]]
name = "nowhere"
[[upstream.endpoint]]
address = "127.0.0.1:9"
"#
        ),
        "embedded",
    )
    .expect("a valid config");
    let result = tokio::time::timeout(WAIT, wasmbassador::run(config, std::future::pending()))
        .await
        .expect("run fails at once instead of waiting for shutdown");
    let err = result.expect_err("the port is taken");
    let shown = err.to_string();
    assert!(
        shown.contains("listener \"busy\"") && shown.contains(&addr.to_string()),
        "the error names the listener and its address: {shown}"
    );
}

/// A plain-text Redis connection through the listener at `addr`.
async fn redis_connect(addr: SocketAddr) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(format!("redis://{addr}/")).expect("redis URL");
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(WAIT))
        .set_response_timeout(Some(WAIT));
    // The listener is bound by a spawned task: retry briefly until it accepts.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match client.get_multiplexed_async_connection_with_config(&config).await {
            Ok(c) => return c,
            Err(e) if std::time::Instant::now() >= deadline => {
                panic!("connecting to Redis through {addr}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
