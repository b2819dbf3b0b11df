//! The command line as a user meets it: `validate` reports every problem of a config
//! with its path and line, accepts the shipped examples, `run` refuses a bad config
//! with the same report, `--version` and `--help` answer, and `demo` works end to
//! end on its own.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use support::Pki;
use support::process::{BIN, Process, http_get};

#[test]
fn validate_reports_every_problem_with_its_path_and_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (config, text) = write_bad_config(dir.path());

    let out = wasmbassador(&["validate", "--config", &config.display().to_string()]);
    assert!(!out.status.success(), "validate must fail on a bad config");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let missing_ca = dir.path().join("missing-ca.pem").display().to_string();
    let expected = [
        (
            line_of(&text, "\"soon\""),
            "admin.drain_timeout: \"soon\" is not a duration",
        ),
        (
            line_of(&text, "\"ordres\""),
            "listener \"orders-db\".upstream: no [[upstream]] is named \"ordres\"",
        ),
        (
            line_of(&text, "max_conections"),
            "listener \"cache\".max_conections: unknown field `max_conections`",
        ),
        (line_of(&text, "missing-ca.pem"), "upstream \"orders\".tls.ca: "),
        (
            line_of(&text, "attempts = 0"),
            "upstream \"cache\".retry.attempts: must be at least 1",
        ),
        (
            line_of(&text, "\"cache.internal\""),
            "upstream \"cache\".endpoint.address: endpoint[0] address \"cache.internal\" is not host:port",
        ),
    ];
    for (line, what) in expected {
        let want = format!("line {line}: {what}");
        assert!(
            stderr.contains(&want),
            "validate should report {want:?}; it said:\n{stderr}"
        );
    }
    assert!(
        stderr.contains(&format!("upstream \"orders\".tls.ca: {missing_ca}")),
        "the missing CA is named by its path:\n{stderr}"
    );
    assert!(stderr.contains("6 problems"), "{stderr}");
    assert_eq!(
        problem_lines(&stderr).len(),
        6,
        "exactly the six problems:\n{stderr}"
    );
}

#[test]
fn validate_accepts_every_example_config() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut configs: Vec<PathBuf> = std::fs::read_dir(&examples)
        .expect("examples folder")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    configs.sort();
    let names: Vec<_> = configs.iter().filter_map(|p| p.file_name()?.to_str()).collect();
    for wanted in [
        "design-example.toml",
        "http-service.toml",
        "quickstart.toml",
        "redis.toml",
    ] {
        assert!(
            names.contains(&wanted),
            "examples/{wanted} is missing; found {names:?}"
        );
    }

    // The examples name files under /etc/wasmbassador; validate reads TLS files, so
    // each copy points into a temp folder that holds freshly made ones.
    let pki = Pki::new();
    let client = pki.client_cert("wasmbassador");
    for config in &configs {
        let dir = tempfile::tempdir().expect("temp dir");
        let text = std::fs::read_to_string(config).expect("read example");
        let root = dir.path().join("etc");
        let text = text.replace("/etc/wasmbassador/", &format!("{}/", root.display()));
        for file in support::quoted_paths_under(&text, &root) {
            let contents = match file.extension().and_then(|x| x.to_str()) {
                Some("key") => client.key_pem(),
                Some("crt") => client.cert_pem(),
                Some("pem") => pki.ca_pem().to_string(),
                Some("wasm") => {
                    // validate compiles and initialises every plugin: use the real
                    // build of the one the example names.
                    let stem = file.file_stem().and_then(|s| s.to_str()).expect("plugin name");
                    std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
                    std::fs::copy(support::plugins::wasm(stem), &file).expect("copy plugin");
                    continue;
                }
                _ => continue,
            };
            std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
            std::fs::write(&file, contents).expect("write");
        }
        let copy = dir.path().join("config.toml");
        std::fs::write(&copy, &text).expect("write copy");
        let out = wasmbassador(&["validate", "--config", &copy.display().to_string()]);
        assert!(
            out.status.success(),
            "validate {} failed:\n{}",
            config.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(": ok ("), "{}: {stdout}", config.display());
    }
}

#[tokio::test]
async fn run_refuses_a_bad_config_with_the_same_report_and_binds_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (config, _) = write_bad_config(dir.path());
    let validate = wasmbassador(&["validate", "--config", &config.display().to_string()]);
    let validate_report = problem_lines(&String::from_utf8_lossy(&validate.stderr));

    let mut run = Process::spawn(["run", "--config", &config.display().to_string()]);
    let status = run.wait_exit(Duration::from_secs(20)).await;
    assert!(
        !status.success(),
        "run must refuse a bad config\n{}",
        run.output()
    );
    let stderr = run.stderr();
    assert_eq!(
        problem_lines(&stderr),
        validate_report,
        "run and validate report alike"
    );
    assert!(
        !stderr.contains("listening"),
        "nothing may be bound for a refused config:\n{stderr}"
    );
}

#[tokio::test]
async fn workers_sets_the_number_of_serving_threads_and_zero_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("admin-only.toml");
    std::fs::write(&config, "[admin]\nlisten = \"127.0.0.1:0\"\n").expect("write config");
    let serving = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("the process's threads")
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|name| name.starts_with("wb-conn-"))
            .count()
    };
    for (args, expected) in [(vec!["--workers", "1"], 1), (vec!["--workers", "3"], 3)] {
        let mut p =
            Process::spawn(
                args.iter()
                    .copied()
                    .chain(["run", "--config", &config.display().to_string()]),
            );
        p.wait_for_stderr("admin listening", Duration::from_secs(20))
            .await;
        assert_eq!(serving(p.pid()), expected, "{args:?}");
        p.signal("TERM");
        assert!(p.wait_exit(Duration::from_secs(20)).await.success());
    }
    let zero = wasmbassador(&[
        "--workers",
        "0",
        "validate",
        "--config",
        &config.display().to_string(),
    ]);
    assert!(!zero.status.success());
    assert!(
        String::from_utf8_lossy(&zero.stderr).contains("invalid value '0' for '--workers"),
        "{}",
        String::from_utf8_lossy(&zero.stderr)
    );
}

#[test]
fn version_and_help() {
    let out = wasmbassador(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("wasmbassador {}", env!("CARGO_PKG_VERSION"))
    );

    let out = wasmbassador(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for command in ["run", "validate", "demo"] {
        assert!(
            help.lines().any(|l| l.split_whitespace().next() == Some(command)),
            "--help lists `{command}`:\n{help}"
        );
    }
}

#[tokio::test]
async fn demo_serves_a_tls_upstream_through_a_plain_listener_and_stops_on_sigterm() {
    let mut demo = Process::spawn(["demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]);
    let curl = demo
        .wait_for_stdout("curl http://", Duration::from_secs(30))
        .await;
    let listen = curl_address(&curl);
    let admin = curl_address(&demo.wait_for_stdout("/upstreams", Duration::from_secs(5)).await);
    assert_ne!(listen.port(), 0, "the printed address is the bound one: {curl}");

    let (status, body) = http_get(listen, "/").await;
    assert_eq!(status, 200, "{body}\n{}", demo.output());
    assert!(body.contains("over TLS"), "the upstream saw TLS: {body}");
    assert_eq!(http_get(admin, "/ready").await.0, 200);

    demo.signal("TERM");
    let status = demo.wait_exit(Duration::from_secs(20)).await;
    assert!(
        status.success(),
        "demo exit after SIGTERM: {status}\n{}",
        demo.output()
    );
}

// ---------------------------------------------------------------------------------
// Helpers

/// Runs the binary to completion (for commands that do not serve).
fn wasmbassador(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap_or_else(|e| panic!("running {BIN} {args:?}: {e}"))
}

/// A config with six problems in five tables; returns its path and text.
fn write_bad_config(dir: &Path) -> (PathBuf, String) {
    let text = format!(
        r#"[admin]
listen = "127.0.0.1:0"
drain_timeout = "soon"

[[listener]]
name = "orders-db"
listen = "127.0.0.1:0"
protocol = "postgres"
upstream = "ordres"

[[listener]]
name = "cache"
listen = "127.0.0.1:0"
upstream = "cache"
max_conections = 10

[[upstream]]
name = "orders"
tls = {{ ca = "{ca}" }}
  [[upstream.endpoint]]
  address = "127.0.0.1:5432"

[[upstream]]
name = "cache"
retry = {{ attempts = 0 }}
  [[upstream.endpoint]]
  address = "cache.internal"
"#,
        ca = dir.join("missing-ca.pem").display()
    );
    let path = dir.join("bad.toml");
    std::fs::write(&path, &text).expect("write config");
    (path, text)
}

/// The 1-based line of the first line of `text` that contains `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in:\n{text}"))
        + 1
}

/// The `line N: path: message` lines of a report.
fn problem_lines(report: &str) -> Vec<String> {
    report
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("line "))
        .map(str::to_string)
        .collect()
}

/// The `host:port` after `http://` in a printed curl command.
fn curl_address(line: &str) -> std::net::SocketAddr {
    line.split("http://")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
}
