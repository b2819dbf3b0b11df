//! Bad clients against the `wasmbassador` binary: garbage, truncated and oversized
//! startup packets, half-open, slow and silent clients, bogus CancelRequests, too
//! many connections and idle ones. Each may close its own connection and nothing
//! else: a long-lived good session keeps working, new good sessions still work, the
//! process stays up, and its stderr never shows a panic.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::process::Process;
use support::{PgOptions, Pki, Postgres, Redis};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::NoTls;

/// wasmbassador gives a client this long to send its startup packet.
const PREAMBLE_LIMIT: Duration = Duration::from_secs(10);
/// Generous limit for anything the test waits for.
const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_on_a_postgres_listener_close_only_their_own_connection() {
    let pki = Pki::new();
    let pg = Postgres::start(PgOptions::tls_only(pki.server_cert(&["127.0.0.1", "localhost"])));
    let (sidecar, addr, _dir) = start_binary(
        &format!(
            r#"
[admin]
listen = "127.0.0.1:0"
drain_timeout = "2s"

[[listener]]
name = "pg"
listen = "127.0.0.1:0"
protocol = "postgres"
upstream = "pg"

[[upstream]]
name = "pg"
connect_timeout = "5s"
tls = {{ ca = "{ca}", server_name = "localhost" }}

  [[upstream.endpoint]]
  address = "127.0.0.1:{port}"
"#,
            ca = pki.ca_pem_path().display(),
            port = pg.port(),
        ),
        "pg",
    )
    .await;

    // A good, long-lived session that keeps running queries through all of it.
    let good = GoodSession::start(addr).await;

    // The slow and the silent client take seconds; they run alongside the rest.
    let slow = tokio::spawn(slow_client(addr));
    let silent = tokio::spawn(silent_client(addr));

    // Garbage instead of a startup packet: an HTTP request, a TLS ClientHello.
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"[..],
        &[
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0xaa, 0xbb,
        ][..],
    ] {
        let answer = exchange(addr, garbage, true).await;
        assert_protocol_error(&answer, "garbage");
    }
    good.check().await;

    // Garbage after a proper SSLRequest (answered 'N': the app speaks plain text).
    let mut sock = connect(addr).await;
    sock.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .expect("SSLRequest");
    let mut n = [0u8; 1];
    tokio::time::timeout(PATIENCE, sock.read_exact(&mut n))
        .await
        .expect("SSLRequest answered in time")
        .expect("SSLRequest answered");
    assert_eq!(&n, b"N");
    sock.write_all(b"hello, this is not PostgreSQL\n")
        .await
        .expect("garbage");
    assert_protocol_error(&read_until_closed(sock).await, "garbage after SSLRequest");

    // A truncated startup packet, then the client closes.
    let full = startup(&[("user", "app"), ("database", "orders")]);
    let answer = exchange(addr, &full[..full.len() / 2], true).await;
    assert!(
        answer.is_empty() || answer[0] == b'E',
        "a truncated startup gets nothing or an error: {answer:?}"
    );

    // A length field far beyond any startup packet.
    let answer = exchange(addr, &[0x7f, 0xff, 0xff, 0xff, 0x00, 0x03, 0x00, 0x00], false).await;
    assert_protocol_error(&answer, "oversized length");
    let answer = exchange(
        addr,
        &[0xff, 0xff, 0xff, 0xff, 0x00, 0x03, 0x00, 0x00, 1, 2, 3],
        false,
    )
    .await;
    assert_protocol_error(&answer, "negative length");
    good.check().await;

    // CancelRequests with garbage: too short, too long, and one naming the good
    // session's process with a made-up key while that session runs a query.
    let answer = exchange(addr, &cancel_request(0xdead_beef, &[]), false).await;
    assert_protocol_error(&answer, "short CancelRequest");
    let answer = exchange(addr, &cancel_request(1, &[0x5a; 300]), false).await;
    assert_protocol_error(&answer, "oversized CancelRequest");
    let answer = exchange(addr, &cancel_request(0xdead_beef, &[9, 9, 9, 9]), false).await;
    assert!(answer.is_empty(), "a CancelRequest is never answered: {answer:?}");
    let pid = good.backend_pid().await;
    let sleeper = good.sleep_then_answer(Duration::from_secs(1));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answer = exchange(addr, &cancel_request(pid, &[0xba, 0xd0, 0xca, 0xfe]), false).await;
    assert!(answer.is_empty(), "a CancelRequest is never answered: {answer:?}");
    sleeper
        .await
        .expect("the good session's query was not cancelled by a wrong key");

    // A half-open client: startup and a query, then it shuts down its sending half.
    // The session still answers the query, then closes cleanly.
    let mut sock = connect(addr).await;
    let mut request = startup(&[("user", "app"), ("database", "orders")]);
    request.extend_from_slice(&query_message("select 40 + 2"));
    sock.write_all(&request).await.expect("startup and query");
    sock.shutdown()
        .await
        .expect("shutting down the client's sending half");
    let answer = read_until_closed(sock).await;
    let messages = backend_messages(&answer);
    let types: Vec<u8> = messages.iter().map(|(t, _)| *t).collect();
    assert!(
        types.iter().filter(|t| **t == b'Z').count() >= 2,
        "ReadyForQuery after the startup and after the query: {:?}",
        String::from_utf8_lossy(&types)
    );
    assert!(
        messages
            .iter()
            .any(|(t, body)| *t == b'D' && body.ends_with(b"42")),
        "the half-open client's query was answered: {:?}",
        String::from_utf8_lossy(&answer)
    );
    good.check().await;

    // The slow client was served; the silent one was closed by the preamble limit.
    let slow_answer = tokio::time::timeout(PATIENCE, slow)
        .await
        .expect("the slow client finished")
        .expect("slow client task");
    assert_eq!(slow_answer, "slow but served");
    let silent_closed_after = tokio::time::timeout(PREAMBLE_LIMIT + PATIENCE, silent)
        .await
        .expect("the silent client was closed")
        .expect("silent client task");
    eprintln!("silent client closed by wasmbassador after {silent_closed_after:?}");

    // Afterwards: the good session is intact, a new one works, the process is alive
    // and never panicked, and the refusals were counted.
    let queries = good.finish().await;
    eprintln!("the good session ran {queries} queries while the bad clients came and went");
    let (fresh, conn) = tokio_postgres::connect(&conninfo(addr), NoTls)
        .await
        .expect("a new good session after the bad clients");
    tokio::spawn(conn);
    let row = fresh.query_one("select 'still fine'", &[]).await.expect("query");
    assert_eq!(row.get::<_, &str>(0), "still fine");
    assert_alive_without_panics(&sidecar).await;
    let rejected = |reason: &str| {
        format!(r#"wasmbassador_listener_connections_rejected_total{{listener="pg",reason="{reason}"}}"#)
    };
    let bad = sidecar.metric(&rejected("bad_preamble")).await;
    assert!(bad >= 8.0, "every bad preamble is counted: {bad}");
    let timed_out = sidecar.metric(&rejected("preamble_timeout")).await;
    assert_eq!(timed_out, 1.0, "the silent client is counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_connections_a_connection_is_closed_at_once_and_counted() {
    let redis = Redis::start_plain();
    let (sidecar, addr, _dir) = start_binary(
        &tcp_config("capped", "max_connections = 2", redis.port()),
        "capped",
    )
    .await;

    let mut first = connect(addr).await;
    let mut second = connect(addr).await;
    assert_eq!(ping(&mut first).await.as_deref(), Ok("+PONG"));
    assert_eq!(ping(&mut second).await.as_deref(), Ok("+PONG"));

    // The third concurrent connection is closed without being served.
    let mut third = connect(addr).await;
    let _ = third.write_all(b"PING\r\n").await;
    let answer = read_until_closed(third).await;
    assert!(
        answer.is_empty(),
        "the third connection got an answer: {answer:?}"
    );
    let rejected = sidecar
        .metric(
            r#"wasmbassador_listener_connections_rejected_total{listener="capped",reason="max_connections"}"#,
        )
        .await;
    assert_eq!(rejected, 1.0);

    // The two admitted connections are unaffected; once one closes, there is room.
    assert_eq!(ping(&mut second).await.as_deref(), Ok("+PONG"));
    drop(first);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut again = connect(addr).await;
        if ping(&mut again).await.as_deref() == Ok("+PONG") {
            break;
        }
        assert!(Instant::now() < deadline, "no room after a connection closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ping(&mut second).await.as_deref(), Ok("+PONG"));
    assert_alive_without_panics(&sidecar).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_while_an_active_one_stays_open() {
    let redis = Redis::start_plain();
    let (mut sidecar, addr, _dir) = start_binary(
        &tcp_config("idle", r#"idle_timeout = "500ms""#, redis.port()),
        "idle",
    )
    .await;

    let mut idle = connect(addr).await;
    let mut active = connect(addr).await;
    assert_eq!(ping(&mut idle).await.as_deref(), Ok("+PONG"));

    // The active one talks every 100 ms for well over the idle timeout.
    for i in 0..25 {
        assert_eq!(ping(&mut active).await.as_deref(), Ok("+PONG"), "active ping {i}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The idle one was closed by wasmbassador (redis itself has no timeout).
    let leftover = read_until_closed(idle).await;
    assert!(
        leftover.is_empty(),
        "unexpected bytes on the idle connection: {leftover:?}"
    );
    assert_eq!(ping(&mut active).await.as_deref(), Ok("+PONG"));
    sidecar.wait_for_stderr("closed idle connection", PATIENCE).await;
    assert_alive_without_panics(&sidecar).await;
}

// ---------------------------------------------------------------------------------
// Helpers

/// Writes `config` to a temporary folder and runs the binary on it; returns once
/// the listener `listener` is bound, with its address. Keep the folder alive.
async fn start_binary(config: &str, listener: &str) -> (Process, SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temporary folder for the config");
    let path = dir.path().join("wasmbassador.toml");
    std::fs::write(&path, config).expect("writing the config");
    let process = Process::run(&path).await;
    let addr = process.wait_listener(listener, PATIENCE).await;
    (process, addr, dir)
}

/// The process still answers `/healthz` and its stderr never showed a panic.
async fn assert_alive_without_panics(process: &Process) {
    let (status, _) = process.get("/healthz").await;
    assert_eq!(status, 200, "wasmbassador is not alive:\n{}", process.output());
    let log = process.stderr();
    assert!(!log.contains("panicked"), "wasmbassador panicked:\n{log}");
}

/// A config with one `tcp` listener `name` (plus `setting`) in front of a plain
/// redis-server on `port`.
fn tcp_config(name: &str, setting: &str, port: u16) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"
drain_timeout = "2s"

[[listener]]
name = "{name}"
listen = "127.0.0.1:0"
protocol = "tcp"
upstream = "redis"
{setting}

[[upstream]]
name = "redis"
connect_timeout = "5s"

  [[upstream.endpoint]]
  address = "127.0.0.1:{port}"
"#
    )
}

/// A long-lived tokio-postgres session that keeps running queries in the background.
struct GoodSession {
    client: Arc<tokio_postgres::Client>,
    stop: Arc<AtomicBool>,
    background: tokio::task::JoinHandle<Result<u64, String>>,
}

impl GoodSession {
    async fn start(addr: SocketAddr) -> GoodSession {
        let (client, conn) = tokio_postgres::connect(&conninfo(addr), NoTls)
            .await
            .expect("the good session connects");
        tokio::spawn(conn);
        let client = Arc::new(client);
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (client.clone(), stop.clone());
        let background = tokio::spawn(async move {
            // Bounded: at most 2,000 queries and 120 s, one every 50 ms.
            let started = Instant::now();
            let mut done = 0u64;
            while !s.load(Ordering::SeqCst) && done < 2_000 && started.elapsed() < Duration::from_secs(120) {
                let n = done as i64;
                let row = c
                    .query_one("select $1::int8 * 2", &[&n])
                    .await
                    .map_err(|e| format!("good session query {done} failed: {e}"))?;
                let doubled: i64 = row.get(0);
                if doubled != n * 2 {
                    return Err(format!("good session query {done}: wrong answer {doubled}"));
                }
                done += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(done)
        });
        GoodSession {
            client,
            stop,
            background,
        }
    }

    /// One query on the good session, answered correctly.
    async fn check(&self) {
        let row = tokio::time::timeout(PATIENCE, self.client.query_one("select 'good'", &[]))
            .await
            .expect("the good session answers in time")
            .expect("the good session still works");
        assert_eq!(row.get::<_, &str>(0), "good");
        assert!(
            !self.background.is_finished(),
            "the good session's query loop ended early"
        );
    }

    async fn backend_pid(&self) -> u32 {
        let row = self
            .client
            .query_one("select pg_backend_pid()", &[])
            .await
            .expect("pg_backend_pid");
        u32::try_from(row.get::<_, i32>(0)).expect("a process id")
    }

    /// Runs `pg_sleep(d)` on the good session in the background.
    fn sleep_then_answer(&self, d: Duration) -> tokio::task::JoinHandle<()> {
        let c = self.client.clone();
        tokio::spawn(async move {
            let row = c
                .query_one("select pg_sleep($1::float8)::text || 'woke'", &[&d.as_secs_f64()])
                .await
                .expect("the sleeping query finishes without being cancelled");
            assert_eq!(row.get::<_, &str>(0), "woke");
        })
    }

    /// Stops the query loop; returns how many queries it ran (panics on its error).
    async fn finish(self) -> u64 {
        self.check().await;
        self.stop.store(true, Ordering::SeqCst);
        tokio::time::timeout(PATIENCE, self.background)
            .await
            .expect("the query loop stops")
            .expect("the query loop did not panic")
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

fn conninfo(addr: SocketAddr) -> String {
    format!(
        "host={} port={} user=app dbname=orders connect_timeout=10",
        addr.ip(),
        addr.port()
    )
}

/// Sends its startup packet one byte every 200 ms (within the 10 s limit), then a
/// query; returns the query's answer.
async fn slow_client(addr: SocketAddr) -> String {
    let mut sock = connect(addr).await;
    let packet = startup(&[("user", "app"), ("database", "orders")]);
    assert!(
        packet.len() as u32 * 200 < PREAMBLE_LIMIT.as_millis() as u32,
        "the slow startup fits in the preamble limit"
    );
    for byte in &packet {
        sock.write_all(std::slice::from_ref(byte))
            .await
            .expect("slow byte");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sock.write_all(&query_message("select 'slow but served'"))
        .await
        .expect("query");
    sock.write_all(&[b'X', 0, 0, 0, 4]).await.expect("Terminate");
    let answer = read_until_closed(sock).await;
    let messages = backend_messages(&answer);
    let row = messages.iter().find(|(t, _)| *t == b'D').unwrap_or_else(|| {
        panic!(
            "no DataRow for the slow client: {:?}",
            String::from_utf8_lossy(&answer)
        )
    });
    // DataRow: column count (2), length (4), value.
    String::from_utf8_lossy(&row.1[6..]).into_owned()
}

/// Connects and sends nothing; returns how long until wasmbassador closed it.
async fn silent_client(addr: SocketAddr) -> Duration {
    let started = Instant::now();
    let sock = connect(addr).await;
    let answer = tokio::time::timeout(PREAMBLE_LIMIT + PATIENCE, read_until_closed(sock))
        .await
        .expect("the silent client is closed");
    assert!(answer.is_empty(), "the silent client got bytes: {answer:?}");
    started.elapsed()
}

async fn connect(addr: SocketAddr) -> TcpStream {
    tokio::time::timeout(PATIENCE, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect to the listener")
}

/// Connects, sends `bytes` (then shuts down the sending half when `half_close`),
/// and returns whatever comes back until wasmbassador closes the connection.
async fn exchange(addr: SocketAddr, bytes: &[u8], half_close: bool) -> Vec<u8> {
    let mut sock = connect(addr).await;
    sock.write_all(bytes).await.expect("sending the bad bytes");
    if half_close {
        sock.shutdown().await.expect("half-close");
    }
    read_until_closed(sock).await
}

/// Reads until the other side closes (EOF or reset); panics if it stays open for
/// [`PATIENCE`].
async fn read_until_closed(mut sock: TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, sock.read(&mut buf)).await {
            Err(_) => panic!(
                "the connection is still open after {PATIENCE:?}; got so far: {:?}",
                String::from_utf8_lossy(&out)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// The answer is one ErrorResponse with SQLSTATE 08P01 (protocol violation).
fn assert_protocol_error(answer: &[u8], what: &str) {
    let messages = backend_messages(answer);
    assert!(
        matches!(messages.as_slice(), [(b'E', body)] if body.windows(7).any(|w| w == b"C08P01\0")),
        "{what}: expected one ErrorResponse 08P01, got {:?}",
        String::from_utf8_lossy(answer)
    );
}

/// Splits backend bytes into (type, body) messages; a trailing partial message is
/// kept as is.
fn backend_messages(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while bytes.len() >= 5 {
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        let end = (1 + len).min(bytes.len());
        out.push((bytes[0], bytes[5.min(end)..end].to_vec()));
        bytes = &bytes[end..];
    }
    out
}

/// A protocol 3.0 StartupMessage with `params`.
fn startup(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = vec![0, 3, 0, 0];
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    with_length(body)
}

/// A CancelRequest for `pid` with secret `key` (any length, to make bad ones).
fn cancel_request(pid: u32, key: &[u8]) -> Vec<u8> {
    let mut body = 80_877_102u32.to_be_bytes().to_vec();
    body.extend_from_slice(&pid.to_be_bytes());
    body.extend_from_slice(key);
    with_length(body)
}

/// A simple Query message.
fn query_message(sql: &str) -> Vec<u8> {
    let mut out = vec![b'Q'];
    out.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
    out.extend_from_slice(sql.as_bytes());
    out.push(0);
    out
}

fn with_length(body: Vec<u8>) -> Vec<u8> {
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// `PING` in RESP over a raw socket; the first reply line, or why there is none.
async fn ping(sock: &mut TcpStream) -> Result<String, String> {
    sock.write_all(b"PING\r\n").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(PATIENCE, sock.read(&mut buf))
        .await
        .map_err(|_| "no reply".to_owned())?
        .map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("closed".into());
    }
    Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned())
}
