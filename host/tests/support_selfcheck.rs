//! Checks the shared test helpers in `tests/support` by talking directly to the
//! servers they start (psql and redis-cli; no wasmbassador involved).

mod support;

use std::path::Path;
use std::process::Command;

use support::{ClientCertMode, PgOptions, PgVersion, Pki, Postgres, Redis, pg::psql_command};

/// The query that says whether the current connection uses TLS.
const SSL_QUERY: &str = "select ssl from pg_stat_ssl where pid = pg_backend_pid()";

/// Runs `SSL_QUERY` with psql over TCP to `port` as `app` in `orders`, with the
/// given `sslmode` (also set as `PGSSLMODE`) and extra conninfo, and returns
/// psql's output or its error.
fn psql_tcp(port: u16, sslmode: &str, extra: &str) -> Result<String, String> {
    let conninfo = format!(
        "host=127.0.0.1 port={port} user=app dbname=orders sslmode={sslmode} connect_timeout=10 {extra}"
    );
    let out = psql_command()
        .env("PGSSLMODE", sslmode)
        .args(["-X", "-A", "-t", "-d", &conninfo, "-c", SSL_QUERY])
        .output()
        .expect("running psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// `sslrootcert=<ca>` for a conninfo string.
fn rootcert(ca: &Path) -> String {
    format!("sslrootcert={}", ca.display())
}

/// Starts a hostssl-only server of `version` and checks that TLS with full
/// verification works and plain text is refused.
fn check_tls_only(version: PgVersion) -> Postgres {
    let pki = Pki::new();
    let pg =
        Postgres::start(PgOptions::tls_only(pki.server_cert(&["127.0.0.1", "localhost"])).version(version));

    let tls = psql_tcp(pg.port(), "verify-full", &rootcert(pki.ca_pem_path()));
    assert_eq!(tls.as_deref(), Ok("t"), "TLS connection to {version:?}");

    let plain = psql_tcp(pg.port(), "disable", "");
    let err = plain.expect_err("hostssl-only server must refuse a plain-text connection");
    assert!(
        err.contains("no pg_hba.conf entry") || err.contains("no encryption"),
        "unexpected error for plain text: {err}"
    );

    // The helper's own superuser access over the Unix socket works too.
    assert_eq!(
        pg.psql_in("orders", "select current_user || ' ' || current_database()"),
        "postgres orders"
    );
    assert_eq!(
        pg.psql("select rolname from pg_roles where rolname in ('app','other') order by 1"),
        "app\nother"
    );
    pg
}

#[test]
fn pg15_tls_hostssl_only_accepts_tls_and_refuses_plain_text() {
    let pg = check_tls_only(PgVersion::Debian15);
    let v = pg.server_version_num();
    assert!(
        (150000..160000).contains(&v),
        "Debian server is PostgreSQL 15, got {v}"
    );
}

#[test]
fn embedded_pg17_plus_tls_hostssl_only_accepts_tls_and_refuses_plain_text() {
    let pg = check_tls_only(PgVersion::Embedded17Plus);
    let v = pg.server_version_num();
    assert!(v >= 170000, "embedded server is PostgreSQL 17+, got {v}");
}

#[test]
fn pg_plain_server_accepts_plain_text() {
    let pg = Postgres::start(PgOptions::default());
    assert_eq!(psql_tcp(pg.port(), "disable", "").as_deref(), Ok("f"));
}

#[test]
fn pg_tls_rejects_expired_and_unknown_ca_certificates() {
    let pki = Pki::new();
    let expired = Postgres::start(PgOptions::tls_only(pki.expired_server_cert(&["127.0.0.1"])));
    let err = psql_tcp(expired.port(), "verify-full", &rootcert(pki.ca_pem_path()))
        .expect_err("an expired server certificate must fail verification");
    assert!(
        err.contains("certificate verify failed"),
        "unexpected error: {err}"
    );
    // libpq does not say why; OpenSSL confirms it is the expiry.
    let why = openssl_verify(pki.ca_pem_path(), &pki.expired_server_cert(&["127.0.0.1"]).cert);
    assert!(why.contains("certificate has expired"), "openssl verify: {why}");
    let ok = openssl_verify(pki.ca_pem_path(), &pki.server_cert(&["127.0.0.1"]).cert);
    assert!(ok.contains(": OK"), "openssl verify of a valid certificate: {ok}");

    let other = Pki::other();
    let unknown = Postgres::start(PgOptions::tls_only(other.server_cert(&["127.0.0.1"])));
    let err = psql_tcp(unknown.port(), "verify-full", &rootcert(pki.ca_pem_path()))
        .expect_err("a certificate from another CA must fail verification");
    assert!(
        err.contains("certificate verify failed"),
        "unexpected error: {err}"
    );
    let why = openssl_verify(pki.ca_pem_path(), &other.server_cert(&["127.0.0.1"]).cert);
    assert!(
        why.contains("unable to get local issuer certificate"),
        "openssl verify: {why}"
    );
}

/// `openssl verify -CAfile ca cert`, stdout and stderr together.
fn openssl_verify(ca: &Path, cert: &Path) -> String {
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(ca)
        .arg(cert)
        .output()
        .expect("running openssl verify");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn pg_client_certificates_verify_full() {
    let pki = Pki::new();
    let pg = Postgres::start(PgOptions {
        tls: Some(pki.server_cert(&["127.0.0.1"])),
        client_ca: Some(pki.ca_pem_path().to_path_buf()),
        client_cert: ClientCertMode::VerifyFull,
        hostssl_only: true,
        ..PgOptions::default()
    });
    let root = rootcert(pki.ca_pem_path());

    let app = pki.client_cert("app");
    let with_cert = format!(
        "{root} sslcert={} sslkey={}",
        app.cert.display(),
        app.key.display()
    );
    assert_eq!(psql_tcp(pg.port(), "verify-full", &with_cert).as_deref(), Ok("t"));

    let err = psql_tcp(pg.port(), "verify-full", &root)
        .expect_err("a TLS connection without a client certificate must be refused");
    assert!(err.contains("certificate"), "unexpected error: {err}");

    let wrong = pki.client_cert("other");
    let wrong_cert = format!(
        "{root} sslcert={} sslkey={}",
        wrong.cert.display(),
        wrong.key.display()
    );
    let err = psql_tcp(pg.port(), "verify-full", &wrong_cert)
        .expect_err("a client certificate for another user must be refused (user app)");
    assert!(err.contains("authentication failed"), "unexpected error: {err}");
}

#[test]
fn pg_stop_and_start_again_keeps_port_and_data() {
    let pki = Pki::new();
    let pg = Postgres::start(PgOptions::tls_only(pki.server_cert(&["127.0.0.1"])));
    pg.psql_in("orders", "create table t (x int); insert into t values (42)");
    let port = pg.port();

    pg.stop();
    assert!(!pg.is_running());
    let err = psql_tcp(port, "verify-full", &rootcert(pki.ca_pem_path()))
        .expect_err("a stopped server must refuse connections");
    assert!(err.contains("Connection refused"), "unexpected error: {err}");

    pg.start_again();
    assert!(pg.is_running());
    assert_eq!(pg.port(), port);
    assert_eq!(
        psql_tcp(port, "verify-full", &rootcert(pki.ca_pem_path())).as_deref(),
        Ok("t")
    );
    assert_eq!(pg.psql_in("orders", "select x from t"), "42");
}

/// Runs `redis-cli --tls ... PING` against `port` with the given extra arguments.
fn redis_cli_tls(port: u16, ca: &Path, extra: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--tls", "--cacert"])
        .arg(ca)
        .args(extra)
        .arg("PING")
        .output()
        .expect("running redis-cli");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text.trim().to_owned())
}

#[test]
fn redis_tls_requires_a_client_certificate() {
    let pki = Pki::new();
    let redis = Redis::start_tls(&pki);
    let client = pki.client_cert("redis-client");

    let (ok, out) = redis_cli_tls(
        redis.tls_port(),
        pki.ca_pem_path(),
        &[
            "--cert".as_ref(),
            client.cert.as_os_str(),
            "--key".as_ref(),
            client.key.as_os_str(),
        ],
    );
    assert!(ok && out == "PONG", "PING with a client certificate: {out}");

    // Without a client certificate the handshake fails; redis-cli may still exit 0
    // after printing the error, so check the output, not only the status.
    let (_, out) = redis_cli_tls(redis.tls_port(), pki.ca_pem_path(), &[]);
    assert_ne!(out, "PONG", "PING without a client certificate must fail");
    assert!(
        out.to_lowercase().contains("error") || out.contains("reset") || out.is_empty(),
        "unexpected output without a client certificate: {out}"
    );

    // A client certificate from another CA is refused as well.
    let stranger = Pki::other().client_cert("stranger");
    let (_, out) = redis_cli_tls(
        redis.tls_port(),
        pki.ca_pem_path(),
        &[
            "--cert".as_ref(),
            stranger.cert.as_os_str(),
            "--key".as_ref(),
            stranger.key.as_os_str(),
        ],
    );
    assert_ne!(
        out, "PONG",
        "PING with an unknown CA's client certificate must fail"
    );
}

#[test]
fn redis_plain_answers_ping() {
    let redis = Redis::start_plain();
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &redis.port().to_string(), "PING"])
        .output()
        .expect("running redis-cli");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "PONG");
}
