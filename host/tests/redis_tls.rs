//! A Redis client speaks plain text to a local `tcp` listener; wasmbassador carries
//! the traffic to a real redis-server that only listens on its `tls-port` and
//! requires a client certificate (mTLS).

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use redis::AsyncCommands;
use support::{CertFiles, Pki, Redis};
use wasmbassador::{Ambassador, Config};

/// The client's own timeouts: generous, so a loaded machine does not fail the test.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn set_get_and_a_large_value_round_trip_over_mtls() {
    let pki = Pki::new();
    let redis = Redis::start_tls(&pki);
    let client_cert = pki.client_cert("wasmbassador");
    let amb = start(&pki, &redis, Some(&client_cert)).await;
    let addr = amb.listener_addr("cache").expect("listener cache is bound");

    let mut con = connect(addr).await.expect("connecting through wasmbassador");
    let () = con.set("greeting", "hello over mTLS").await.expect("SET");
    let got: String = con.get("greeting").await.expect("GET");
    assert_eq!(got, "hello over mTLS");

    // 8 MiB of non-repeating bytes, so that a lost or reordered chunk shows.
    let big: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let () = con.set("big", &big).await.expect("SET of 8 MiB");
    let back: Vec<u8> = con.get("big").await.expect("GET of 8 MiB");
    assert_eq!(back.len(), big.len(), "length of the 8 MiB value read back");
    assert!(
        back == big,
        "the 8 MiB value read back differs from what was written"
    );

    // The value really is in the TLS-only server: it reports it with its own length.
    let len: usize = con.strlen("big").await.expect("STRLEN");
    assert_eq!(len, big.len());

    amb.shutdown().await;
}

#[tokio::test]
async fn several_concurrent_clients_each_see_their_own_data() {
    const CLIENTS: usize = 8;
    const ROUNDS: usize = 50;
    let pki = Pki::new();
    let redis = Redis::start_tls(&pki);
    let client_cert = pki.client_cert("wasmbassador");
    let amb = start(&pki, &redis, Some(&client_cert)).await;
    let addr = amb.listener_addr("cache").expect("listener cache is bound");

    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        tasks.push(tokio::spawn(async move {
            let mut con = connect(addr)
                .await
                .map_err(|e| format!("client {c}: connect: {e}"))?;
            for r in 0..ROUNDS {
                let key = format!("client{c}:round{r}");
                let value = format!("value {c}/{r} {}", "x".repeat(r * 40));
                let () = con
                    .set(&key, &value)
                    .await
                    .map_err(|e| format!("client {c}: SET {key}: {e}"))?;
                let got: String = con
                    .get(&key)
                    .await
                    .map_err(|e| format!("client {c}: GET {key}: {e}"))?;
                if got != value {
                    return Err(format!("client {c}: GET {key} returned another value: {got:?}"));
                }
            }
            let n: u64 = con
                .incr("shared-counter", 1)
                .await
                .map_err(|e| format!("client {c}: INCR: {e}"))?;
            Ok::<u64, String>(n)
        }));
    }
    let all = tokio::time::timeout(Duration::from_secs(120), futures_join(tasks))
        .await
        .expect("the concurrent clients finished within 120 s");
    let mut counts = Vec::new();
    for result in all {
        counts.push(
            result
                .expect("client task did not panic")
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    counts.sort_unstable();
    assert_eq!(
        counts,
        (1..=CLIENTS as u64).collect::<Vec<_>>(),
        "each client's INCR is counted once"
    );

    amb.shutdown().await;
}

#[tokio::test]
async fn without_a_client_certificate_the_command_fails_and_nothing_reaches_redis_in_plain_text() {
    let pki = Pki::new();
    let redis = Redis::start_tls(&pki);
    let amb = start(&pki, &redis, None).await;
    let addr = amb.listener_addr("cache").expect("listener cache is bound");

    let attempt = async {
        let mut con = connect(addr).await?;
        let () = con.set("leaked", "this must never be stored").await?;
        Ok::<(), redis::RedisError>(())
    };
    let outcome = tokio::time::timeout(Duration::from_secs(60), attempt)
        .await
        .expect("the client is answered (with an error) within 60 s");
    let err = outcome.expect_err("SET without a client certificate must fail");
    eprintln!("client error without a client certificate: {err}");

    // Redis refused the TLS handshake for want of a certificate: the bytes it got were
    // TLS, not a plain-text command (that would read as a bad TLS record instead).
    let log = wait_for_log(&redis, "peer did not return a certificate").await;
    for plain_text_sign in [
        "wrong version number",
        "http request",
        "packet length too long",
        "unknown protocol",
    ] {
        assert!(
            !log.contains(plain_text_sign),
            "redis saw something other than TLS ({plain_text_sign:?}):\n{log}"
        );
    }
    // And the command was never executed.
    let exists = redis_cli_direct(&pki, &redis, &["EXISTS", "leaked"]).await;
    assert_eq!(exists, "0", "the key of the refused client must not exist");

    amb.shutdown().await;
}

#[tokio::test]
async fn redis_cli_ping_through_the_listener_answers_pong() {
    let pki = Pki::new();
    let redis = Redis::start_tls(&pki);
    let client_cert = pki.client_cert("wasmbassador");
    let amb = start(&pki, &redis, Some(&client_cert)).await;
    let addr = amb.listener_addr("cache").expect("listener cache is bound");

    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &addr.port().to_string(), "PING"])
            .output(),
    )
    .await
    .expect("redis-cli finished within 30 s")
    .expect("running redis-cli");
    assert!(out.status.success(), "redis-cli failed: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "PONG");

    amb.shutdown().await;
}

// ---------------------------------------------------------------------------------
// Helpers

/// Starts an in-process ambassador with a `tcp` listener `cache` in front of the TLS
/// port of `redis`, verified against `pki`'s CA under the name `localhost`, with the
/// client certificate `client` (or none).
async fn start(pki: &Pki, redis: &Redis, client: Option<&CertFiles>) -> Ambassador {
    let client_tls = client
        .map(|c| {
            format!(
                ", client_cert = {}, client_key = {}",
                toml_path(&c.cert),
                toml_path(&c.key)
            )
        })
        .unwrap_or_default();
    let text = format!(
        r#"
[admin]
listen = "127.0.0.1:0"
drain_timeout = "2s"

[[listener]]
name = "cache"
listen = "127.0.0.1:0"
protocol = "tcp"
upstream = "redis"

[[upstream]]
name = "redis"
connect_timeout = "10s"
tls = {{ ca = {ca}, server_name = "localhost"{client_tls} }}

  [[upstream.endpoint]]
  address = "127.0.0.1:{port}"
"#,
        ca = toml_path(pki.ca_pem_path()),
        port = redis.tls_port(),
    );
    let config = Config::parse(&text, "redis_tls.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
    Ambassador::start(config).await.expect("starting wasmbassador")
}

/// A path as a TOML string.
fn toml_path(p: &Path) -> String {
    toml_string(&p.display().to_string())
}

fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A multiplexed redis connection to `addr` in plain text, with generous timeouts.
async fn connect(addr: SocketAddr) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://{addr}/"))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CLIENT_TIMEOUT))
        .set_response_timeout(Some(CLIENT_TIMEOUT));
    client.get_multiplexed_async_connection_with_config(&config).await
}

/// Awaits every task, in order.
async fn futures_join<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<Result<T, tokio::task::JoinError>> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await);
    }
    out
}

/// Waits (up to 20 s) until the redis log contains `needle`, and returns the log.
async fn wait_for_log(redis: &Redis, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log = redis.log();
        if log.contains(needle) {
            return log;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("redis log does not mention {needle:?} within 20 s:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `redis-cli` directly against the TLS port (with its own client certificate,
/// bypassing wasmbassador) and returns its trimmed output.
async fn redis_cli_direct(pki: &Pki, redis: &Redis, args: &[&str]) -> String {
    let me = pki.client_cert("test-inspector");
    let out = tokio::process::Command::new("redis-cli")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &redis.tls_port().to_string(),
            "--tls",
            "--cacert",
        ])
        .arg(pki.ca_pem_path())
        .arg("--cert")
        .arg(&me.cert)
        .arg("--key")
        .arg(&me.key)
        .args(args)
        .output()
        .await
        .expect("running redis-cli");
    assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
