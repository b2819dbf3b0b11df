//! `wasmbassador probe` as the kubelet runs it (an exec probe): exit 0 with one line
//! while the endpoint answers 200, exit 1 with the reason once it does not — readiness
//! fails as soon as a drain starts while liveness still passes, and a stopped process
//! fails every probe. The admin address comes from `--admin` or from the config file.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use support::process::{BIN, Process};

fn probe(args: &[&str]) -> Output {
    std::process::Command::new(BIN)
        .arg("probe")
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run wasmbassador probe")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs the probe against `admin` and asserts its exit status and one-line output.
fn assert_probe(kind: &str, admin: SocketAddr, ok: bool, needle: &str) {
    let out = probe(&[kind, "--admin", &admin.to_string()]);
    let said = text(&out);
    assert_eq!(out.status.success(), ok, "probe {kind} against {admin}: {said}");
    assert_eq!(out.status.code(), Some(if ok { 0 } else { 1 }), "{said}");
    assert_eq!(
        said.trim_end().lines().count(),
        1,
        "one line for the pod events: {said:?}"
    );
    assert!(
        said.contains(needle),
        "probe {kind} should say {needle:?}: {said}"
    );
}

fn write_config(dir: &Path, admin: &str, drain_delay: &str) -> std::path::PathBuf {
    let path = dir.join("wasmbassador.toml");
    std::fs::write(
        &path,
        format!(
            "[admin]\nlisten = \"{admin}\"\ndrain_delay = \"{drain_delay}\"\ndrain_timeout = \"1s\"\n\n\
             [[listener]]\nname = \"db\"\nlisten = \"127.0.0.1:0\"\nupstream = \"db\"\n\n\
             [[upstream]]\nname = \"db\"\n  [[upstream.endpoint]]\n  address = \"127.0.0.1:9\"\n"
        ),
    )
    .expect("write config");
    path
}

#[tokio::test]
async fn probes_follow_startup_drain_and_exit() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A long drain_delay keeps the process alive, draining, while the probes run.
    let config = write_config(dir.path(), "127.0.0.1:0", "30s");
    let mut run = Process::run(&config).await;
    let admin = run.admin();
    run.wait_listener("db", support::process::START_TIMEOUT).await;

    // The upstream (port 9, discard) is not a database: startup and readiness must
    // not wait on it.
    assert_probe("startup", admin, true, "/startup: started");
    assert_probe("ready", admin, true, "/ready: ready");
    assert_probe("healthz", admin, true, "/healthz: ok");

    // The admin address can come from the config file, as in the Kubernetes examples.
    let probe_config = dir.path().join("probe.toml");
    std::fs::write(&probe_config, format!("[admin]\nlisten = \"{admin}\"\n")).expect("write");
    let out = probe(&["ready", "--config", &probe_config.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    // An unspecified address (admin bound on every interface) is probed on loopback.
    let any = SocketAddr::from(([0, 0, 0, 0], admin.port()));
    assert_probe("healthz", any, true, "ok");

    run.signal("TERM");
    // Readiness fails once the drain starts, liveness does not: the kubelet stops
    // sending traffic but does not restart the container.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = probe(&["ready", "--admin", &admin.to_string()]);
        if !out.status.success() {
            let said = text(&out);
            assert!(said.contains("/ready answered 503"), "{said}");
            assert_eq!(out.status.code(), Some(1));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/ready still passes 10 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_probe("healthz", admin, true, "ok");

    run.signal("KILL");
    let _ = run.wait_exit(Duration::from_secs(10)).await;
    assert_probe("healthz", admin, false, "cannot reach the admin server");
}

#[test]
fn probe_refuses_what_it_cannot_ask() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), "127.0.0.1:0", "0s");
    let out = probe(&["ready", "--config", &config.display().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("port 0"), "{}", text(&out));

    let out = probe(&["ready", "--config", "/nonexistent/wasmbassador.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("/nonexistent/wasmbassador.toml"),
        "{}",
        text(&out)
    );

    // Not an admin server: a port that accepts and answers something else.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 512];
        let _ = s.read(&mut buf);
        let _ = s.write_all(b"+PONG\r\n");
    });
    let out = probe(&["healthz", "--admin", &addr.to_string(), "--timeout", "2s"]);
    server.join().expect("server thread");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("no valid answer"), "{}", text(&out));
}
