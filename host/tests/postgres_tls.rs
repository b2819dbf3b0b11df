//! PostgreSQL through wasmbassador with TLS upstream: the application speaks plain
//! text to a local `postgres` listener, wasmbassador speaks verified TLS (SSLRequest or
//! PostgreSQL 17+ direct TLS, optionally with a client certificate) to real servers
//! that accept TCP only over TLS. Also: every way a TLS upstream can be refused, with
//! a recording relay proving nothing leaks in plain text, and CancelRequests reaching
//! the server that runs the session across two endpoints.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::pg::error_text;
use support::{ClientCertMode, PgOptions, PgVersion, Pki, Postgres, pg::psql_command};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};
use wasmbassador::{Ambassador, Config};

/// The query that says whether the server sees the current session as TLS.
const SSL_QUERY: &str = "select ssl from pg_stat_ssl where pid = pg_backend_pid()";

/// The name in the servers' certificates; endpoints are addressed by IP, so the
/// upstream's `tls.server_name` is what makes verification succeed.
const DB_NAME: &str = "orders.db.internal";

/// An SSLRequest packet, as the first bytes of an upstream connection.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Generous bound for anything that should take well under a second.
const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_clients_reach_a_tls_only_postgres_15_over_verified_tls() {
    // A PostgreSQL 15 that accepts TCP only through `hostssl`, with a certificate
    // for a DNS name, not for the address wasmbassador dials.
    let pki = Pki::new();
    let pg = Postgres::start(PgOptions::tls_only(pki.server_cert(&[DB_NAME])));
    let tls = format!(
        "{{ ca = {}, server_name = {DB_NAME:?} }}",
        toml_path(pki.ca_pem_path())
    );
    let amb = start_in_process(&single_upstream_config(&[pg.addr()], &tls)).await;
    let listen = amb
        .listener_addr("orders-db")
        .expect("listener orders-db is bound");

    // tokio-postgres in plain text: queries work, and the server sees TLS.
    let client = connect_app(listen)
        .await
        .expect("tokio-postgres through wasmbassador");
    let row = client
        .query_one("select current_user::text, current_database()::text, 6 * 7", &[])
        .await
        .expect("a query through wasmbassador");
    assert_eq!(row.get::<_, String>(0), "app");
    assert_eq!(row.get::<_, String>(1), "orders");
    assert_eq!(row.get::<_, i32>(2), 42);
    assert!(
        ssl_in_use(&client).await,
        "the server must see the session encrypted"
    );
    drop(client);

    // The real psql, first refusing TLS itself, then with its default `prefer`: the
    // listener answers SSLRequest with N, and psql carries on in plain text.
    for sslmode in [Some("disable"), None] {
        let out = psql_through(listen, sslmode, SSL_QUERY).await;
        assert_eq!(
            out,
            Ok("t".to_owned()),
            "psql (sslmode {sslmode:?}) through wasmbassador must reach the server over TLS"
        );
    }

    amb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_reaches_an_embedded_postgres_18() {
    // PostgreSQL 17+ accepts a TLS ClientHello straight away (ALPN `postgresql`).
    // A recording relay in front of it shows which of the two ways was used.
    let pki = Pki::new();
    let pg =
        Postgres::start(PgOptions::tls_only(pki.server_cert(&[DB_NAME])).version(PgVersion::Embedded17Plus));
    let relay = Relay::start(pg.addr()).await;
    let tls = format!(
        "{{ ca = {}, server_name = {DB_NAME:?}, postgres = \"direct\" }}",
        toml_path(pki.ca_pem_path())
    );
    let amb = start_in_process(&single_upstream_config(&[relay.addr], &tls)).await;
    let listen = amb
        .listener_addr("orders-db")
        .expect("listener orders-db is bound");

    let client = connect_app(listen)
        .await
        .expect("tokio-postgres through wasmbassador");
    let version: i32 = client
        .query_one("select current_setting('server_version_num')::int", &[])
        .await
        .expect("a query through wasmbassador")
        .get(0);
    assert!(
        version >= 170000,
        "the server is PostgreSQL 17 or newer, got {version}"
    );
    assert!(
        ssl_in_use(&client).await,
        "the server must see the session encrypted"
    );
    drop(client);

    // The session's first byte upstream was a TLS handshake record, not an SSLRequest.
    let sessions: Vec<Vec<u8>> = relay
        .sent()
        .await
        .into_iter()
        .filter(|bytes| !bytes.is_empty())
        .collect();
    assert!(!sessions.is_empty(), "the session went through the relay");
    for bytes in &sessions {
        assert_eq!(bytes[0], 0x16, "direct TLS starts with a handshake record");
        assert_only_tls_records(bytes, "direct TLS session");
    }

    amb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_open_sessions_and_their_absence_refuses_them() {
    // A server that requires a client certificate whose common name is the user.
    let pki = Pki::new();
    let pg = Postgres::start(PgOptions {
        tls: Some(pki.server_cert(&[DB_NAME])),
        client_ca: Some(pki.ca_pem_path().to_path_buf()),
        client_cert: ClientCertMode::VerifyFull,
        hostssl_only: true,
        ..PgOptions::default()
    });
    let app_cert = pki.client_cert("app");
    let ca = toml_path(pki.ca_pem_path());
    let config = format!(
        "{ADMIN}\n\
         {with_cert}\n\
         {without_cert}",
        with_cert = listener_and_upstream(
            "with-cert",
            &[pg.addr()],
            &format!(
                "{{ ca = {ca}, server_name = {DB_NAME:?}, client_cert = {}, client_key = {} }}",
                toml_path(&app_cert.cert),
                toml_path(&app_cert.key)
            ),
        ),
        without_cert = listener_and_upstream(
            "without-cert",
            &[pg.addr()],
            &format!("{{ ca = {ca}, server_name = {DB_NAME:?} }}"),
        ),
    );
    let amb = start_in_process(&config).await;

    // With the certificate: the session opens, encrypted, authenticated as CN=app.
    let client = connect_app(amb.listener_addr("with-cert").expect("bound"))
        .await
        .expect("a session with a client certificate");
    let row = client
        .query_one(
            "select ssl, client_dn from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("a query through wasmbassador");
    assert!(row.get::<_, bool>(0), "the server must see the session encrypted");
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("/CN=app"));
    drop(client);

    // Without it: the client gets the server's refusal and no session starts.
    let err = connect_app(amb.listener_addr("without-cert").expect("bound"))
        .await
        .expect_err("a session without a client certificate must be refused");
    let text = error_text(&err);
    assert!(
        text.contains("certificate"),
        "the refusal names the missing certificate: {text}"
    );
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "refused at authentication: {text}"
    );
    let app_sessions = pg.psql("select count(*) from pg_stat_activity where usename = 'app'");
    assert_eq!(app_sessions, "0", "no session of app is open on the server");

    amb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refusals_reach_the_client_and_the_log_and_nothing_leaks_in_plain_text() {
    let pki = Pki::new();
    let stranger = Pki::other();
    // One server with a good certificate that also requires client certificates
    // (for the wrong-name and missing-certificate cases), one whose certificate comes
    // from a CA wasmbassador does not trust, and one with an expired certificate.
    let mtls = Postgres::start(PgOptions {
        tls: Some(pki.server_cert(&[DB_NAME])),
        client_ca: Some(pki.ca_pem_path().to_path_buf()),
        client_cert: ClientCertMode::VerifyFull,
        hostssl_only: true,
        ..PgOptions::default()
    });
    let unknown_ca = Postgres::start(PgOptions::tls_only(stranger.server_cert(&[DB_NAME])));
    let expired = Postgres::start(PgOptions::tls_only(pki.expired_server_cert(&[DB_NAME])));

    // Each case: a relay recording what wasmbassador sends, the TLS settings, and
    // what the log must say about it.
    let ca = toml_path(pki.ca_pem_path());
    let cases = [
        (
            "wrong-name",
            &mtls,
            format!("{{ ca = {ca}, server_name = \"payments.db.internal\" }}"),
            "certificate not valid for name \"payments.db.internal\"",
        ),
        (
            "unknown-ca",
            &unknown_ca,
            format!("{{ ca = {ca}, server_name = {DB_NAME:?} }}"),
            "invalid peer certificate: UnknownIssuer",
        ),
        (
            "expired",
            &expired,
            format!("{{ ca = {ca}, server_name = {DB_NAME:?} }}"),
            "invalid peer certificate: certificate expired",
        ),
        (
            "no-client-cert",
            &mtls,
            format!("{{ ca = {ca}, server_name = {DB_NAME:?} }}"),
            "connection requires a valid client certificate",
        ),
    ];
    let mut relays = Vec::new();
    let mut config = String::from(ADMIN);
    for (name, pg, tls, _) in &cases {
        let relay = Relay::start(pg.addr()).await;
        config.push_str(&listener_and_upstream(name, &[relay.addr], tls));
        relays.push(relay);
    }
    let amb = BinaryAmbassador::start(&config);

    for ((name, _, _, reason), relay) in cases.iter().zip(&relays) {
        // The application's connection gets an ErrorResponse, not a session.
        let err = connect_app(amb.listener_addr(name))
            .await
            .expect_err("a TLS refusal must refuse the client");
        let text = error_text(&err);
        assert!(
            err.as_db_error().is_some(),
            "{name}: the client gets a PostgreSQL ErrorResponse, got: {text}"
        );
        assert!(
            text.contains(reason),
            "{name}: the client's error says what failed ({reason:?}): {text}"
        );
        if *name != "no-client-cert" {
            // Refused by wasmbassador itself, before anything reached the server;
            // a missing client certificate is refused by the server, whose
            // ErrorResponse wasmbassador passes on.
            assert!(
                text.contains("wasmbassador: cannot reach upstream"),
                "{name}: the error comes from wasmbassador: {text}"
            );
        }

        // wasmbassador's log names the reason, for this upstream.
        let line = amb
            .wait_for_log(|line| line.contains(name) && line.contains(reason))
            .await
            .unwrap_or_else(|| panic!("{name}: no log line naming {reason:?}; log:\n{}", amb.log()));
        println!("{name}: log: {line}");

        // Upstream saw an SSLRequest, then TLS records only: never the startup text.
        let sent = relay.sent().await;
        let tried: Vec<&Vec<u8>> = sent.iter().filter(|b| !b.is_empty()).collect();
        assert!(
            !tried.is_empty(),
            "{name}: wasmbassador connected through the relay"
        );
        for bytes in tried {
            assert!(
                bytes.starts_with(&SSL_REQUEST),
                "{name}: an upstream connection must open with an SSLRequest, got {:02x?}",
                &bytes[..bytes.len().min(16)]
            );
            if bytes.len() > SSL_REQUEST.len() {
                assert_eq!(
                    bytes[SSL_REQUEST.len()],
                    0x16,
                    "{name}: after the SSLRequest comes a TLS handshake record"
                );
            }
            assert_only_tls_records(&bytes[SSL_REQUEST.len()..], name);
            assert!(
                !contains(bytes, b"user\0app") && !contains(bytes, b"database\0orders"),
                "{name}: the startup message must never travel in plain text"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_requests_reach_the_server_running_the_session_every_time() {
    // Two TLS-only servers at the same priority and weight behind one listener.
    let pki = Pki::new();
    let servers = [
        Postgres::start(PgOptions::tls_only(pki.server_cert(&[DB_NAME]))),
        Postgres::start(PgOptions::tls_only(pki.server_cert(&[DB_NAME]))),
    ];
    let tls = format!(
        "{{ ca = {}, server_name = {DB_NAME:?} }}",
        toml_path(pki.ca_pem_path())
    );
    let amb = start_in_process(&single_upstream_config(
        &[servers[0].addr(), servers[1].addr()],
        &tls,
    ))
    .await;
    let listen = amb
        .listener_addr("orders-db")
        .expect("listener orders-db is bound");
    let monitors = [monitor(&servers[0]).await, monitor(&servers[1]).await];

    // Open sessions until both servers serve some (10 at first, at most 30).
    let mut sessions: Vec<Session> = Vec::new();
    while sessions.len() < 10
        || !servers
            .iter()
            .all(|pg| sessions.iter().any(|s| s.port == pg.port()))
    {
        assert!(
            sessions.len() < 30,
            "30 sessions and still not spread over both servers"
        );
        sessions.push(Session::open(listen).await);
    }
    let on_first = sessions.iter().filter(|s| s.port == servers[0].port()).count();
    println!(
        "sessions: {} on server 1, {} on server 2",
        on_first,
        sessions.len() - on_first
    );
    let server_of = |s: &Session| usize::from(s.port == servers[1].port());

    // Twice over: every session runs pg_sleep(60); each is cancelled through the
    // listener with tokio-postgres' cancel token, and fails with query_canceled.
    let rounds = 2;
    for round in 1..=rounds {
        let running: Vec<_> = sessions.iter().map(Session::sleep).collect();
        for (s, query) in sessions.iter().zip(&running) {
            wait_until_sleeping(&monitors[server_of(s)], s.pid, query).await;
            s.client
                .cancel_token()
                .cancel_query(NoTls)
                .await
                .expect("sending a CancelRequest to the listener");
        }
        for (s, query) in sessions.iter().zip(running) {
            let result = tokio::time::timeout(PATIENCE, query)
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "round {round}: pg_sleep in session pid {} (port {}) was not cancelled",
                        s.pid, s.port
                    )
                })
                .expect("the query task");
            let err = result.expect_err("a cancelled pg_sleep(60) must fail");
            assert_eq!(
                err.code(),
                Some(&SqlState::QUERY_CANCELED),
                "round {round}, pid {}: {}",
                s.pid,
                error_text(&err)
            );
        }
        // PostgreSQL signals a cancelled backend twice (its pid, then its process
        // group), and on a loaded machine the second SIGINT can land in the next
        // query. The listener counts a cancel once the server has closed the cancel
        // connection, after both signals; wait for that before the next round.
        let sent = (round * sessions.len()) as u64;
        assert_eq!(
            wait_for_metric(&amb, "forwarded", sent).await,
            sent,
            "round {round}: every CancelRequest was forwarded once"
        );
    }
    let expected = (rounds * sessions.len()) as u64;

    // A CancelRequest naming no session is dropped: neither a made-up pid and key,
    // nor a real pid with a made-up key, cancels the running query.
    let victim = &sessions[0];
    let running = victim.sleep();
    wait_until_sleeping(&monitors[server_of(victim)], victim.pid, &running).await;
    send_raw_cancel(listen, 0x7fff_fff0, 0x1234_5678).await;
    send_raw_cancel(listen, victim.pid as u32, 0x0bad_cafe).await;
    assert_eq!(wait_for_metric(&amb, "unknown_session", 2).await, 2);
    let state = monitors[server_of(victim)]
        .query_one(
            "select state from pg_stat_activity where pid = $1",
            &[&victim.pid],
        )
        .await
        .expect("reading the victim's state")
        .get::<_, Option<String>>(0);
    assert_eq!(state.as_deref(), Some("active"), "the query must still run");
    assert_eq!(
        cancel_metric(&amb, "forwarded"),
        expected,
        "nothing more was forwarded"
    );
    // Its own token still cancels it.
    victim
        .client
        .cancel_token()
        .cancel_query(NoTls)
        .await
        .expect("sending a CancelRequest");
    let err = tokio::time::timeout(PATIENCE, running)
        .await
        .expect("the query is cancelled")
        .expect("the query task")
        .expect_err("a cancelled pg_sleep(60) must fail");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED));

    drop(sessions);
    amb.shutdown().await;
}

// --- helpers ---------------------------------------------------------------------

/// `[admin]` for every config here: a free port, and a short drain at shutdown.
const ADMIN: &str = "[admin]\nlisten = \"127.0.0.1:0\"\ndrain_timeout = \"2s\"\n";

/// A TOML string holding `path`.
fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// A `postgres` listener named `name` on a free port, and an upstream of the same
/// name with `tls` (an inline table) and `endpoints` at priority 0, weight 1.
fn listener_and_upstream(name: &str, endpoints: &[SocketAddr], tls: &str) -> String {
    let mut out = format!(
        "\n[[listener]]\nname = {name:?}\nlisten = \"127.0.0.1:0\"\nprotocol = \"postgres\"\nupstream = {name:?}\n\
         \n[[upstream]]\nname = {name:?}\nconnect_timeout = \"10s\"\ntls = {tls}\n"
    );
    for addr in endpoints {
        out.push_str(&format!(
            "  [[upstream.endpoint]]\n  address = \"{addr}\"\n  priority = 0\n  weight = 1\n"
        ));
    }
    out
}

/// A config with the listener and upstream `orders-db`.
fn single_upstream_config(endpoints: &[SocketAddr], tls: &str) -> String {
    format!("{ADMIN}{}", listener_and_upstream("orders-db", endpoints, tls))
}

/// Starts wasmbassador in this process; its log shows with a failing test's output.
async fn start_in_process(toml: &str) -> Ambassador {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("info")
        .try_init();
    let config = Config::parse(toml, "postgres_tls test config")
        .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{toml}"));
    Ambassador::start(config)
        .await
        .unwrap_or_else(|e| panic!("starting wasmbassador: {e}"))
}

/// Connects as the application would: user `app`, database `orders`, plain text.
async fn connect_app(listen: SocketAddr) -> Result<Client, tokio_postgres::Error> {
    let conninfo = format!(
        "host=127.0.0.1 port={} user=app dbname=orders connect_timeout=30",
        listen.port()
    );
    let (client, connection) = tokio_postgres::connect(&conninfo, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Whether the server sees the client's session as TLS.
async fn ssl_in_use(client: &Client) -> bool {
    client
        .query_one(SSL_QUERY, &[])
        .await
        .expect("reading pg_stat_ssl")
        .get(0)
}

/// Runs `sql` with the real psql through `listen` as `app`, with `sslmode` (None:
/// psql's default), and returns its output or its error output.
async fn psql_through(listen: SocketAddr, sslmode: Option<&str>, sql: &str) -> Result<String, String> {
    let mut conninfo = format!(
        "host=127.0.0.1 port={} user=app dbname=orders connect_timeout=30",
        listen.port()
    );
    if let Some(mode) = sslmode {
        conninfo.push_str(&format!(" sslmode={mode}"));
    }
    let mut cmd = psql_command();
    cmd.env_remove("PGSSLMODE")
        .env_remove("PGGSSENCMODE")
        .args(["-X", "-A", "-t", "-d", &conninfo, "-c", sql]);
    let out = tokio::time::timeout(PATIENCE, tokio::process::Command::from(cmd).output())
        .await
        .expect("psql finished")
        .expect("running psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// A superuser connection to `pg` over its Unix socket, to watch sessions.
async fn monitor(pg: &Postgres) -> Client {
    let conninfo = format!(
        "host={} port={} user=postgres dbname=postgres",
        pg.socket_dir().display(),
        pg.port()
    );
    let (client, connection) = tokio_postgres::connect(&conninfo, NoTls)
        .await
        .expect("monitor connection over the Unix socket");
    tokio::spawn(connection);
    client
}

/// A session through wasmbassador and where it runs.
struct Session {
    client: Arc<Client>,
    /// Backend process id.
    pid: i32,
    /// The port of the server running it.
    port: u16,
}

impl Session {
    async fn open(listen: SocketAddr) -> Session {
        let client = connect_app(listen).await.expect("a session through wasmbassador");
        let row = client
            .query_one("select pg_backend_pid(), inet_server_port()", &[])
            .await
            .expect("reading the backend pid and server port");
        let port: i32 = row.get(1);
        Session {
            pid: row.get(0),
            port: u16::try_from(port).expect("a TCP port"),
            client: Arc::new(client),
        }
    }

    /// Starts `select pg_sleep(60)` in the session.
    fn sleep(&self) -> tokio::task::JoinHandle<Result<(), tokio_postgres::Error>> {
        let client = self.client.clone();
        tokio::spawn(async move { client.batch_execute("select pg_sleep(60)").await })
    }
}

/// Waits until backend `pid` is running pg_sleep, so a cancel cannot arrive early.
/// `query` is the task running it: if it ends first, or the wait runs out, the panic
/// says what the backend was doing.
async fn wait_until_sleeping(
    monitor: &Client,
    pid: i32,
    query: &JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let row = monitor
            .query_opt(
                "select state, query, wait_event from pg_stat_activity where pid = $1",
                &[&pid],
            )
            .await
            .expect("reading pg_stat_activity");
        let seen = row.map(|r| {
            (
                r.get::<_, Option<String>>(0).unwrap_or_default(),
                r.get::<_, Option<String>>(1).unwrap_or_default(),
                r.get::<_, Option<String>>(2).unwrap_or_default(),
            )
        });
        if let Some((state, text, _)) = &seen
            && state == "active"
            && text.contains("pg_sleep")
        {
            return;
        }
        assert!(
            !query.is_finished() && tokio::time::Instant::now() < deadline,
            "backend {pid} never started pg_sleep (query task ended: {}; \
             pg_stat_activity state, query, wait_event: {seen:?})",
            query.is_finished()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends a hand-made CancelRequest to the listener and waits until it closes.
async fn send_raw_cancel(listen: SocketAddr, pid: u32, key: u32) {
    let mut packet = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
    packet.extend_from_slice(&pid.to_be_bytes());
    packet.extend_from_slice(&key.to_be_bytes());
    let mut sock = TcpStream::connect(listen)
        .await
        .expect("connecting to the listener");
    sock.write_all(&packet).await.expect("sending a CancelRequest");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, sock.read_to_end(&mut rest))
        .await
        .expect("the listener closes a CancelRequest connection");
    assert!(rest.is_empty(), "a CancelRequest gets no answer, got {rest:?}");
}

/// `wasmbassador_postgres_cancel_requests_total{result}`, 0 when absent.
fn cancel_metric(amb: &Ambassador, result: &str) -> u64 {
    let series = format!("wasmbassador_postgres_cancel_requests_total{{result=\"{result}\"}} ");
    amb.shared()
        .metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .map(|v| v.trim().parse::<f64>().expect("a metric value") as u64)
        .unwrap_or(0)
}

/// Waits (bounded) until the cancel counter for `result` reaches `want`; returns it.
async fn wait_for_metric(amb: &Ambassador, result: &str, want: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let now = cancel_metric(amb, result);
        if now >= want || tokio::time::Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Asserts that `bytes` is a sequence of whole TLS records (handshake, alert,
/// change_cipher_spec or application data), nothing else.
fn assert_only_tls_records(bytes: &[u8], what: &str) {
    let mut rest = bytes;
    while !rest.is_empty() {
        assert!(
            rest.len() >= 5 && (0x14..=0x17).contains(&rest[0]) && rest[1] == 0x03,
            "{what}: not a TLS record header: {:02x?}",
            &rest[..rest.len().min(8)]
        );
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        assert!(rest.len() >= 5 + len, "{what}: truncated TLS record");
        rest = &rest[5 + len..];
    }
}

/// The bytes one relayed connection carried from wasmbassador to the server.
type Recording = Arc<Mutex<Vec<u8>>>;

/// A TCP relay between wasmbassador and a server that records, per connection, the
/// bytes wasmbassador sent. Runs until the test's runtime ends.
struct Relay {
    addr: SocketAddr,
    sent: Arc<Mutex<Vec<Recording>>>,
    finished: Arc<AtomicUsize>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding the relay");
        let addr = listener.local_addr().expect("relay address");
        let sent: Arc<Mutex<Vec<Recording>>> = Arc::default();
        let finished = Arc::new(AtomicUsize::new(0));
        let (conns, done) = (sent.clone(), finished.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let record = Recording::default();
                conns.lock().expect("relay records").push(record.clone());
                let done = done.clone();
                tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(target).await {
                        let (mut from_amb, mut to_amb) = inbound.into_split();
                        let (mut from_pg, mut to_pg) = outbound.into_split();
                        let up = async {
                            let mut buf = [0u8; 16 * 1024];
                            while let Ok(n @ 1..) = from_amb.read(&mut buf).await {
                                record.lock().expect("relay record").extend_from_slice(&buf[..n]);
                                if to_pg.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                            let _ = to_pg.shutdown().await;
                        };
                        let down = async {
                            let _ = tokio::io::copy(&mut from_pg, &mut to_amb).await;
                            let _ = to_amb.shutdown().await;
                        };
                        tokio::join!(up, down);
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Relay { addr, sent, finished }
    }

    /// What wasmbassador sent on each connection so far, once every connection
    /// through the relay has ended (bounded wait).
    async fn sent(&self) -> Vec<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.finished.load(Ordering::SeqCst) < self.sent.lock().expect("relay records").len()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let conns = self.sent.lock().expect("relay records");
        conns
            .iter()
            .map(|r| r.lock().expect("relay record").clone())
            .collect()
    }
}

/// The `wasmbassador` binary running a config file, its stderr collected.
struct BinaryAmbassador {
    child: Child,
    log: Arc<Mutex<String>>,
    listeners: Vec<(String, SocketAddr)>,
    _dir: tempfile::TempDir,
}

impl BinaryAmbassador {
    /// Writes `toml` to a file, runs `wasmbassador run --config` on it and waits
    /// for the startup line of every listener.
    fn start(toml: &str) -> BinaryAmbassador {
        let dir = tempfile::tempdir().expect("a folder for the config");
        let path = dir.path().join("wasmbassador.toml");
        std::fs::write(&path, toml).expect("writing the config");
        let expected = toml.matches("[[listener]]").count();
        let mut child = Command::new(env!("CARGO_BIN_EXE_wasmbassador"))
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the wasmbassador binary");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = sink.lock().expect("log buffer");
                log.push_str(&strip_ansi(&line));
                log.push('\n');
            }
        });
        let mut amb = BinaryAmbassador {
            child,
            log,
            listeners: Vec::new(),
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            amb.listeners = amb.log().lines().filter_map(parse_listening).collect();
            if amb.listeners.len() >= expected {
                return amb;
            }
            if let Ok(Some(status)) = amb.child.try_wait() {
                panic!("wasmbassador exited with {status}; log:\n{}", amb.log());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "wasmbassador did not start its listeners; log:\n{}",
                amb.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The bound address of the listener whose upstream is `upstream`.
    fn listener_addr(&self, upstream: &str) -> SocketAddr {
        self.listeners
            .iter()
            .find(|(u, _)| u == upstream)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no listener for upstream {upstream:?}"))
    }

    fn log(&self) -> String {
        self.log.lock().expect("log buffer").clone()
    }

    /// Waits (bounded) for a log line matching `pred` and returns it.
    async fn wait_for_log(&self, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(line) = self.log().lines().find(|l| pred(l)) {
                return Some(line.to_owned());
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for BinaryAmbassador {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(upstream, address)` from a line `listening: ADDR (protocol) -> upstream "NAME"`.
fn parse_listening(line: &str) -> Option<(String, SocketAddr)> {
    let rest = line.split_once("listening: ")?.1;
    let (addr, rest) = rest.split_once(' ')?;
    let name = rest.split_once("-> upstream \"")?.1.split_once('"')?.0;
    Some((name.to_owned(), addr.parse().ok()?))
}

/// Removes ANSI colour sequences, in case the log is coloured anyway.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
