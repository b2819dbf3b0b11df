//! Plugin hot swap, driven the way an operator drives it: by replacing `.wasm` files in
//! the watched plugin folder — atomically (write beside, rename over), by a slow copy
//! that is half written for a moment, and by a Kubernetes ConfigMap `..data` swap —
//! while a bounded stream of new PostgreSQL connections runs through the listener.
//!
//! Every connection of a stream ends one of three ways: served (a query answered),
//! denied (an ErrorResponse with SQLSTATE 28000 and the plugin's reason), or failed
//! (anything else). No test tolerates a single failed connection. Each change is
//! followed by bounded polling (of `/plugins`, or of the plugin slots in process)
//! until it is active or refused, and every connection that started after that point
//! must show the expected behaviour.
//!
//! Real parts: a TLS-only PostgreSQL 15, `.wasm` files built from `plugins/` (the test
//! plugins `allow-all`, `deny-all`, `trap`, `spin`, `hog`, `wrong-world`), the
//! `wasmbassador` binary where a crash must show, certificates made at test time.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use support::mount::KubeletVolume;
use support::process::Process;
use support::ticker::Ticker;
use support::{PgOptions, Pki, Postgres, plugins};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;
use wasmbassador::{Ambassador, Config};

/// Upper bound of every wait for a change to take effect (the target is 0.5 s; the
/// machine is shared, so the bound is generous).
const PATIENCE: Duration = Duration::from_secs(30);

/// Each client of a stream pauses this long between two connections.
const PACE: Duration = Duration::from_millis(10);

/// Bounds of a stream, whatever happens: this many connections, this long.
const MAX_CONNECTIONS: usize = 6_000;
const MAX_RUN: Duration = Duration::from_secs(120);

/// The per-call deadline of plugins whose deadline is not under test. The deadline is
/// wall-clock time (epoch interruption), so on a busy machine a thread kept off the
/// CPU for longer than a few milliseconds makes even `allow-all` miss a 10 ms deadline;
/// tests of other behaviour must not depend on that timing.
const CALM_DEADLINE: &str = "timeout = \"2s\"\n";

/// The deadline of the fault tests' plugins, which `spin` must run into: short enough
/// to keep the test quick, long enough that a thread briefly kept off the CPU does not
/// turn a trap or a memory overrun into a timeout.
const FAULT_DEADLINE: &str = "timeout = \"100ms\"\n";

/// Connections (per listener) that must have started and finished after each change
/// is active before the next change begins.
const PER_PHASE: usize = 3;

/// How many times the first test swaps the plugin.
const SWAPS: u64 = 20;

const DENY_FAILED_TRAP: &str = "plugin gate failed (trap)";
const DENY_FAILED_TIMEOUT: &str = "plugin gate failed (timeout)";
const DENY_FAILED_MEMORY: &str = "plugin gate failed (memory)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_swaps_under_load_switch_every_new_connection_and_break_none() {
    let pki = Pki::new();
    let pg = Postgres::start(PgOptions::tls_only(pki.server_cert(&["127.0.0.1", "localhost"])));
    let allow = read(&plugins::wasm("allow-all"));
    let deny = read(&plugins::wasm("deny-all"));
    let folder = tempfile::tempdir().expect("plugin folder");
    let gate = folder.path().join("gate.wasm");
    std::fs::write(&gate, &allow).expect("write gate.wasm");

    let toml = doc(&[
        listener("orders", "gate"),
        upstream(pg.addr(), pki.ca_pem_path()),
        plugin(
            "gate",
            &gate,
            &format!("{CALM_DEADLINE}config = {{ version = \"hot\" }}\n"),
        ),
    ]);
    let amb = start_in_process(&toml).await;
    let addr = amb.listener_addr("orders").expect("listener orders is bound");
    let g0 = generation(&amb, "gate");

    // The long-lived session, opened before the first swap, queries throughout.
    let session = Arc::new(pg_connect(addr).await);
    let backend = backend_pid(&session).await;
    let ticker = Ticker::start(session.clone(), Duration::from_millis(50), PATIENCE);

    let stream = Stream::start(&[("orders", addr)], 3);
    let mut timeline = Timeline::default();
    let began = Instant::now();
    stream.wait_for(began, "before the first swap").await;
    timeline.open("allow-all, as started", began, vec![("orders", Outcome::Served)]);

    let denied = Outcome::Denied("deny-all hot".into());
    let mut latencies = Vec::new();
    for i in 1..=SWAPS {
        let (bytes, name, want) = if i % 2 == 1 {
            (&deny, "deny-all", denied.clone())
        } else {
            (&allow, "allow-all", Outcome::Served)
        };
        timeline.cut();
        let renamed = replace_atomically(&gate, bytes);
        let active = wait_generation(&amb, "gate", g0 + i).await;
        latencies.push(active - renamed);
        stream
            .wait_for(active, &format!("after swap {i} to {name}"))
            .await;
        timeline.open(&format!("swap {i}: {name}"), active, vec![("orders", want)]);
    }
    timeline.cut();
    let attempts = stream.finish().await;
    let (queries, failed_queries) = ticker.stop().await;

    // Every connection was served or denied by deny-all: none failed.
    let summary = summarize(&attempts);
    eprintln!("hot swap x{SWAPS}: {summary}");
    assert_none_failed(&attempts, &[&denied]);
    timeline.check(&attempts);

    // The session opened before the first swap never noticed any of them.
    assert_eq!(
        failed_queries, 0,
        "the long-lived session: {failed_queries} of {queries} queries failed"
    );
    assert!(
        queries >= SWAPS,
        "the long-lived session kept querying throughout ({queries} queries)"
    );
    assert_eq!(
        backend_pid(&session).await,
        backend,
        "the long-lived session is still the same server session"
    );

    // The host agrees: one allow-all call per served connection (plus the session),
    // one denial per denied connection, 20 swaps, no failure.
    let served = attempts.iter().filter(|a| a.outcome == Outcome::Served).count();
    let refused = attempts.iter().filter(|a| a.outcome == denied).count();
    let metrics = amb.shared().metrics.encode();
    assert_eq!(
        support::process::metric_value(
            &metrics,
            r#"wasmbassador_plugin_allow_all_connections_total{plugin="gate",version="hot"}"#
        ),
        (served + 1) as f64,
        "allow-all counted every served connection and the session"
    );
    assert_eq!(
        support::process::metric_value(
            &metrics,
            r#"wasmbassador_plugin_denials_total{listener="orders"}"#
        ),
        refused as f64,
        "every denial was deny-all's"
    );
    let status = wasmbassador::plugin::status(&amb.shared().plugins.load());
    let gate_status = status
        .iter()
        .find(|s| s.name == "gate")
        .expect("gate in /plugins");
    assert_eq!(gate_status.generation, g0 + SWAPS);
    assert_eq!(gate_status.sha256, sha256(&allow), "allow-all serves at the end");
    assert_eq!(gate_status.errors, 0);
    assert_eq!(gate_status.last_error, None, "no swap was refused");

    eprintln!(
        "hot swap x{SWAPS}: rename -> new generation serving: {}",
        spread(&mut latencies)
    );
    drop(session);
    amb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_plugins_never_take_the_binary_down_and_the_last_good_version_keeps_serving() {
    let pki = Pki::new();
    let pg = Postgres::start(PgOptions::tls_only(pki.server_cert(&["127.0.0.1", "localhost"])));
    let allow = read(&plugins::wasm("allow-all"));
    let deny = read(&plugins::wasm("deny-all"));
    let trap = read(&plugins::wasm("trap"));
    let spin = read(&plugins::wasm("spin"));
    let hog = read(&plugins::wasm("hog"));
    let wrong_world = read(&plugins::wasm("wrong-world"));
    let folder = tempfile::tempdir().expect("plugin folder");
    let gate = folder.path().join("gate.wasm");
    let pinned = folder.path().join("pinned.wasm");
    std::fs::write(&gate, &allow).expect("write gate.wasm");
    std::fs::write(&pinned, &allow).expect("write pinned.wasm");

    // One file, two policies: `gate` denies when the plugin fails, `gate-lenient`
    // allows. `gate-lenient` has a config key that `trap` does not accept (its
    // `init` refuses it); `spin` and `hog` ignore their config. `pinned` is pinned
    // to allow-all's digest.
    let limits = format!("{FAULT_DEADLINE}memory = \"16MiB\"\n");
    let parts = |pin: &str| {
        doc(&[
            listener("strict", "gate"),
            listener("lenient", "gate-lenient"),
            listener("pinned", "pinned"),
            upstream(pg.addr(), pki.ca_pem_path()),
            plugin("gate", &gate, &format!("on_error = \"deny\"\n{limits}")),
            plugin(
                "gate-lenient",
                &gate,
                &format!("on_error = \"allow\"\n{limits}config = {{ version = \"lenient\" }}\n"),
            ),
            plugin("pinned", &pinned, &format!("{CALM_DEADLINE}sha256 = \"{pin}\"\n")),
        ])
    };
    let config_dir = tempfile::tempdir().expect("config folder");
    let config = config_dir.path().join("wasmbassador.toml");
    std::fs::write(&config, parts(&sha256(&allow))).expect("write config");
    let mut wb = Process::run(&config).await;
    let targets = vec![
        ("strict", wb.wait_listener("strict", PATIENCE).await),
        ("lenient", wb.wait_listener("lenient", PATIENCE).await),
        ("pinned", wb.wait_listener("pinned", PATIENCE).await),
    ];
    let (g, gl) = (
        plugin_status(&wb, "gate").await["generation"]
            .as_u64()
            .expect("generation"),
        plugin_status(&wb, "gate-lenient").await["generation"]
            .as_u64()
            .expect("generation"),
    );

    let served = Outcome::Served;
    let denied = |reason: &str| Outcome::Denied(reason.to_string());
    let all = |o: &Outcome| {
        vec![
            ("strict", o.clone()),
            ("lenient", o.clone()),
            ("pinned", o.clone()),
        ]
    };
    // One client per listener: a spinning call holds a worker of the binary for the
    // whole deadline, and the stream must not pile up connections behind it.
    let stream = Stream::start(&targets, 1);
    let mut timeline = Timeline::default();
    let began = Instant::now();
    stream.wait_for(began, "with allow-all").await;
    timeline.open("allow-all, as started", began, all(&served));

    // 1. trap: `gate` loads it and every call traps (answered by deny); `gate-lenient`
    //    refuses it at init, and its allow-all keeps serving.
    timeline.cut();
    let lenient_refusals = reload_failures(&wb, "gate-lenient").await;
    replace_atomically(&gate, &trap);
    wait_generations(&wb, &[("gate", g + 1)]).await;
    wait_reload_failures(&wb, "gate-lenient", lenient_refusals).await;
    let active = Instant::now();
    stream.wait_for(active, "with trap").await;
    timeline.open(
        "trap",
        active,
        vec![
            ("strict", denied(DENY_FAILED_TRAP)),
            ("lenient", served.clone()),
            ("pinned", served.clone()),
        ],
    );
    let s = plugin_status(&wb, "gate").await;
    assert!(s["errors"].as_u64() > Some(0), "trap calls are counted: {s}");
    assert_last_error(&s, "on_connect: trap:");
    assert_last_error(&s, "panicking in on_connect");
    let s = plugin_status(&wb, "gate-lenient").await;
    assert_eq!(
        s["generation"].as_u64(),
        Some(gl),
        "gate-lenient kept allow-all: {s}"
    );
    assert_eq!(s["sha256"].as_str(), Some(sha256(&allow).as_str()));
    assert_last_error(&s, "init: ");
    assert_last_error(&s, "unknown field `version`");

    // 2. spin: every call runs into the deadline; deny answers for `gate`, allow
    //    for `gate-lenient` (which loads it: spin takes any config).
    timeline.cut();
    replace_atomically(&gate, &spin);
    let active = wait_generations(&wb, &[("gate", g + 2), ("gate-lenient", gl + 1)]).await;
    stream.wait_for(active, "with spin").await;
    timeline.open(
        "spin",
        active,
        vec![
            ("strict", denied(DENY_FAILED_TIMEOUT)),
            ("lenient", served.clone()),
            ("pinned", served.clone()),
        ],
    );
    for name in ["gate", "gate-lenient"] {
        let s = plugin_status(&wb, name).await;
        assert!(
            s["timeouts"].as_u64() > Some(0),
            "{name}: timeouts are counted: {s}"
        );
        assert_last_error(&s, "on_connect: timeout:");
    }

    // 3. hog: every call runs into the 16 MiB memory cap.
    timeline.cut();
    replace_atomically(&gate, &hog);
    let active = wait_generations(&wb, &[("gate", g + 3), ("gate-lenient", gl + 2)]).await;
    stream.wait_for(active, "with hog").await;
    timeline.open(
        "hog",
        active,
        vec![
            ("strict", denied(DENY_FAILED_MEMORY)),
            ("lenient", served.clone()),
            ("pinned", served.clone()),
        ],
    );
    for name in ["gate", "gate-lenient"] {
        let s = plugin_status(&wb, name).await;
        assert_last_error(&s, "on_connect: memory limit of 16777216 bytes exceeded");
    }

    // 4. allow-all again: the good version every later fault must leave in place.
    timeline.cut();
    replace_atomically(&gate, &allow);
    let active = wait_generations(&wb, &[("gate", g + 4), ("gate-lenient", gl + 3)]).await;
    stream.wait_for(active, "with allow-all again").await;
    timeline.open("allow-all again", active, all(&served));

    // 5-6. A component of another world, then garbage: both refused, no gap in
    //      service (the phase starts at the rename, not at the refusal).
    let garbage = garbage(64 << 10);
    for (what, bytes, step) in [
        ("wrong-world", &wrong_world, "world: "),
        ("garbage", &garbage, "compile: "),
    ] {
        let at = timeline.cut();
        let before = (
            reload_failures(&wb, "gate").await,
            reload_failures(&wb, "gate-lenient").await,
        );
        replace_atomically(&gate, bytes);
        wait_reload_failures(&wb, "gate", before.0).await;
        wait_reload_failures(&wb, "gate-lenient", before.1).await;
        stream
            .wait_for(Instant::now(), &format!("after {what} was refused"))
            .await;
        timeline.open(&format!("{what}, refused"), at, all(&served));
        for (name, generation) in [("gate", g + 4), ("gate-lenient", gl + 3)] {
            let s = plugin_status(&wb, name).await;
            assert_eq!(
                s["generation"].as_u64(),
                Some(generation),
                "{what} was not swapped in: {s}"
            );
            assert_eq!(s["sha256"].as_str(), Some(sha256(&allow).as_str()), "{what}: {s}");
            assert_last_error(&s, step);
            assert_last_error(&s, &gate.display().to_string());
        }
    }

    // 7. A slow copy of deny-all: the first half lands, is refused, and allow-all
    //    serves on; the rest lands a moment later and deny-all is picked up.
    let at = timeline.cut();
    let before = (
        reload_failures(&wb, "gate").await,
        reload_failures(&wb, "gate-lenient").await,
    );
    let half = deny.len() / 2;
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&gate).expect("truncate gate.wasm");
        f.write_all(&deny[..half]).expect("write the first half");
        f.sync_all().expect("sync");
    }
    wait_reload_failures(&wb, "gate", before.0).await;
    wait_reload_failures(&wb, "gate-lenient", before.1).await;
    stream.wait_for(Instant::now(), "with half a file").await;
    assert_last_error(&plugin_status(&wb, "gate").await, "compile: ");
    timeline.open("half of deny-all, refused", at, all(&served));
    timeline.cut();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&gate)
            .expect("open gate.wasm to append");
        f.write_all(&deny[half..]).expect("write the second half");
        f.sync_all().expect("sync");
    }
    let active = wait_generations(&wb, &[("gate", g + 5), ("gate-lenient", gl + 4)]).await;
    stream.wait_for(active, "with the completed deny-all").await;
    let deny_strict = denied("deny-all v0");
    let deny_lenient = denied("deny-all lenient");
    timeline.open(
        "deny-all, completed",
        active,
        vec![
            ("strict", deny_strict.clone()),
            ("lenient", deny_lenient.clone()),
            ("pinned", served.clone()),
        ],
    );
    assert_eq!(
        plugin_status(&wb, "gate").await["sha256"].as_str(),
        Some(sha256(&deny).as_str())
    );

    // 8. The pinned plugin's file is replaced by another: refused (digest), the
    //    pinned version serves on.
    let at = timeline.cut();
    let before = reload_failures(&wb, "pinned").await;
    replace_atomically(&pinned, &deny);
    wait_reload_failures(&wb, "pinned", before).await;
    stream
        .wait_for(Instant::now(), "after the pin refused a file")
        .await;
    let after_pin = vec![
        ("strict", deny_strict.clone()),
        ("lenient", deny_lenient.clone()),
        ("pinned", served.clone()),
    ];
    timeline.open("pinned file replaced, refused", at, after_pin.clone());
    let s = plugin_status(&wb, "pinned").await;
    assert_eq!(s["sha256"].as_str(), Some(sha256(&allow).as_str()), "{s}");
    assert_last_error(&s, "digest: ");
    assert_last_error(&s, &format!("{} has sha256 {}", pinned.display(), sha256(&deny)));

    // 9. A config whose pin matches no file is refused whole at load; everything
    //    serves on as before.
    let at = timeline.cut();
    let reloads = r#"wasmbassador_config_reloads_total{result="failure"}"#;
    let before = wb.metric(reloads).await;
    std::fs::write(&config, parts(&"0".repeat(64))).expect("write config");
    wb.wait_metric_above(reloads, before, PATIENCE).await;
    let line = wb.wait_for_stderr("config reload refused", PATIENCE).await;
    assert!(
        line.contains(&"0".repeat(64)) && line.contains("sha256"),
        "{line}"
    );
    stream
        .wait_for(Instant::now(), "after a config with a bad pin")
        .await;
    timeline.open("config with a wrong pin, refused", at, after_pin);
    timeline.cut();

    let attempts = stream.finish().await;
    let summary = summarize(&attempts);
    eprintln!("faults: {summary}");
    assert_none_failed(
        &attempts,
        &[
            &denied(DENY_FAILED_TRAP),
            &denied(DENY_FAILED_TIMEOUT),
            &denied(DENY_FAILED_MEMORY),
            &deny_strict,
            &deny_lenient,
        ],
    );
    timeline.check(&attempts);
    let spun: Vec<Duration> = timeline
        .attempts_in(&attempts, "spin", "strict")
        .map(|a| a.took)
        .collect();
    eprintln!(
        "faults: a connection refused because spin ran past its 100 ms deadline took {} end to end",
        spread(&mut spun.clone())
    );

    // Each kind of call failure is counted where Prometheus sees it.
    for kind in ["trap", "timeout", "memory"] {
        let sample =
            format!(r#"wasmbassador_plugin_failures_total{{plugin="gate",hook="on_connect",kind="{kind}"}}"#);
        assert!(wb.metric(&sample).await > 0.0, "{sample} counts the {kind} phase");
    }

    // The process is up and healthy, never panicked, and stops cleanly.
    let (code, body) = wb.get("/healthz").await;
    assert_eq!(code, 200, "/healthz: {body}");
    // (The trap plugin's own panics are logged as "plugin panicked"; a host thread's
    // would read "thread '...' panicked at".)
    assert!(!wb.stderr().contains("' panicked at"), "{}", wb.output());
    wb.signal("TERM");
    let status = wb.wait_exit(PATIENCE).await;
    assert!(status.success(), "exit after SIGTERM: {status}\n{}", wb.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_that_does_not_match_the_file_stops_run_and_validate() {
    let allow = plugins::wasm("allow-all");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("pinned.wasm");
    std::fs::copy(&allow, &path).expect("copy allow-all");
    let wrong = "ab".repeat(32);
    let config = dir.path().join("wasmbassador.toml");
    let endpoint = SocketAddr::from(([127, 0, 0, 1], support::free_port()));
    std::fs::write(
        &config,
        doc(&[
            listener("orders", "pinned"),
            format!("[[upstream]]\nname = \"orders\"\n[[upstream.endpoint]]\naddress = \"{endpoint}\"\n"),
            plugin("pinned", &path, &format!("sha256 = \"{wrong}\"\n")),
        ]),
    )
    .expect("write config");
    let actual = sha256(&read(&path));
    let expect = format!(
        "{} has sha256 {actual}, but the config pins {wrong}",
        path.display()
    );
    for command in ["run", "validate"] {
        let mut p = Process::spawn([command, "--config", &config.display().to_string()]);
        let status = p.wait_exit(PATIENCE).await;
        assert!(
            !status.success(),
            "{command} with a wrong pin must fail\n{}",
            p.output()
        );
        assert!(
            p.output().contains(&expect),
            "{command}: the error names the file and both digests ({expect})\n{}",
            p.output()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_update_of_the_plugin_folder_is_picked_up_and_fails_no_connection() {
    let pki = Pki::new();
    let pg = Postgres::start(PgOptions::tls_only(pki.server_cert(&["127.0.0.1", "localhost"])));
    let allow = read(&plugins::wasm("allow-all"));
    let deny = read(&plugins::wasm("deny-all"));

    // The mount as the kubelet lays it out:
    //   gate.wasm -> ..data/gate.wasm
    //   ..data -> ..2026_11_22_10_00_00.000000001
    let mount = tempfile::tempdir().expect("mount");
    let mut configmap =
        KubeletVolume::create(mount.path(), "..2026_11_22_10_00_00.000000001", &[(KEY, &allow)]);
    let config_dir = tempfile::tempdir().expect("config folder");
    let config = config_dir.path().join("wasmbassador.toml");
    std::fs::write(
        &config,
        doc(&[
            listener("orders", "gate"),
            upstream(pg.addr(), pki.ca_pem_path()),
            plugin(
                "gate",
                &configmap.file(KEY),
                &format!("{CALM_DEADLINE}config = {{ version = \"cm\" }}\n"),
            ),
        ]),
    )
    .expect("write config");
    let wb = Process::run(&config).await;
    let addr = wb.wait_listener("orders", PATIENCE).await;
    let g = plugin_status(&wb, "gate").await["generation"]
        .as_u64()
        .expect("generation");

    let stream = Stream::start(&[("orders", addr)], 3);
    let mut timeline = Timeline::default();
    let began = Instant::now();
    stream.wait_for(began, "with allow-all").await;
    timeline.open("allow-all, as mounted", began, vec![("orders", Outcome::Served)]);

    // Two `kubectl apply`s: deny-all, then allow-all again (the watch survives the
    // removal of the folder it first resolved to).
    let mut latencies = Vec::new();
    let denied = Outcome::Denied("deny-all cm".into());
    for (i, stamp, bytes, want) in [
        (1, "..2026_11_22_10_05_00.000000002", &deny, denied.clone()),
        (2, "..2026_11_22_10_10_00.000000003", &allow, Outcome::Served),
    ] {
        timeline.cut();
        let swapped = configmap.update(stamp, &[(KEY, bytes)]);
        let active = wait_generations(&wb, &[("gate", g + i)]).await;
        latencies.push(active - swapped);
        stream.wait_for(active, &format!("after update {i}")).await;
        timeline.open(&format!("update {i}"), active, vec![("orders", want)]);
        let s = plugin_status(&wb, "gate").await;
        assert_eq!(s["sha256"].as_str(), Some(sha256(bytes).as_str()), "{s}");
        assert_eq!(
            s["path"].as_str(),
            Some(configmap.file(KEY).display().to_string().as_str())
        );
    }
    timeline.cut();
    let attempts = stream.finish().await;
    eprintln!("configmap: {}", summarize(&attempts));
    assert_none_failed(&attempts, &[&denied]);
    timeline.check(&attempts);
    assert_eq!(
        reload_failures(&wb, "gate").await,
        0.0,
        "no update was ever read half done"
    );
    assert_eq!(
        plugin_status(&wb, "gate").await["last_error"],
        serde_json::Value::Null
    );
    eprintln!(
        "configmap: ..data swap -> new generation serving: {}",
        spread(&mut latencies)
    );
}

// ---------------------------------------------------------------------------------
// Config text

fn toml_str(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

fn doc(parts: &[String]) -> String {
    let mut text = String::from("[admin]\nlisten = \"127.0.0.1:0\"\ndrain_timeout = \"5s\"\n");
    for p in parts {
        text.push('\n');
        text.push_str(p);
    }
    text
}

/// A `postgres` listener on a free port in front of upstream `orders`.
fn listener(name: &str, plugin: &str) -> String {
    format!(
        "[[listener]]\nname = {name:?}\nlisten = \"127.0.0.1:0\"\nprotocol = \"postgres\"\n\
         upstream = \"orders\"\nplugins = [{plugin:?}]\n"
    )
}

/// Upstream `orders`: one TLS-only PostgreSQL, verified against `ca`.
fn upstream(pg: SocketAddr, ca: &Path) -> String {
    format!(
        "[[upstream]]\nname = \"orders\"\ntls = {{ ca = {} }}\n[[upstream.endpoint]]\naddress = \"{pg}\"\n",
        toml_str(ca)
    )
}

fn plugin(name: &str, path: &Path, extra: &str) -> String {
    format!("[[plugin]]\nname = {name:?}\npath = {}\n{extra}", toml_str(path))
}

async fn start_in_process(toml: &str) -> Ambassador {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("info")
        .try_init();
    let config = Config::parse(toml, "hot_swap test config")
        .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{toml}"));
    Ambassador::start(config)
        .await
        .unwrap_or_else(|e| panic!("starting wasmbassador: {e}"))
}

// ---------------------------------------------------------------------------------
// Plugin files

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Replaces `path` the way an atomic update does: the bytes go to a temporary file
/// in the same folder, which is then renamed over `path`. Returns when the rename
/// is done.
fn replace_atomically(path: &Path, bytes: &[u8]) -> Instant {
    let name = path.file_name().expect("a file name").to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("renaming over {}: {e}", path.display()));
    Instant::now()
}

/// Bytes that are no WebAssembly (a fixed xorshift sequence).
fn garbage(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The plugin's key in the ConfigMap mounted by [`KubeletVolume`].
const KEY: &str = "gate.wasm";

// ---------------------------------------------------------------------------------
// Watching the host

/// The generation serving for plugin `name` (in process).
fn generation(amb: &Ambassador, name: &str) -> u64 {
    amb.shared()
        .plugins
        .load()
        .get(name)
        .unwrap_or_else(|| panic!("no plugin {name:?}"))
        .current
        .load()
        .generation
}

/// Polls the in-process plugin slot every millisecond until generation `want`
/// serves; returns the moment it was seen. Fails if a generation is skipped.
async fn wait_generation(amb: &Ambassador, name: &str, want: u64) -> Instant {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let now = generation(amb, name);
        if now >= want {
            assert_eq!(now, want, "plugin {name}: one swap, one generation");
            return Instant::now();
        }
        if Instant::now() >= deadline {
            panic!(
                "plugin {name}: generation {want} not serving within {PATIENCE:?}: {:#?}",
                wasmbassador::plugin::status(&amb.shared().plugins.load())
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The `/plugins` entry of `name`.
async fn plugin_status(wb: &Process, name: &str) -> serde_json::Value {
    let (code, body) = wb.get("/plugins").await;
    assert_eq!(code, 200, "/plugins: {body}");
    let all: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/plugins is not JSON ({e}): {body}"));
    all.as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no plugin {name:?} in /plugins: {body}"))
}

/// Polls `/plugins` until every named plugin serves exactly the given generation;
/// returns the moment all were seen.
async fn wait_generations(wb: &Process, want: &[(&str, u64)]) -> Instant {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut done = true;
        for (name, generation) in want {
            let s = plugin_status(wb, name).await;
            let now = s["generation"].as_u64().expect("generation");
            assert!(
                now <= *generation,
                "plugin {name}: generation {now}, expected {generation}: {s}"
            );
            done &= now == *generation;
        }
        if done {
            return Instant::now();
        }
        if Instant::now() >= deadline {
            let (_, body) = wb.get("/plugins").await;
            panic!(
                "generations {want:?} not serving within {PATIENCE:?}: {body}\n{}",
                wb.output()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn reload_failures_sample(name: &str) -> String {
    format!(r#"wasmbassador_plugin_reloads_total{{plugin="{name}",result="failure"}}"#)
}

async fn reload_failures(wb: &Process, name: &str) -> f64 {
    wb.metric(&reload_failures_sample(name)).await
}

async fn wait_reload_failures(wb: &Process, name: &str, above: f64) {
    wb.wait_metric_above(&reload_failures_sample(name), above, PATIENCE)
        .await;
}

fn assert_last_error(status: &serde_json::Value, needle: &str) {
    let last = status["last_error"].as_str().unwrap_or("");
    assert!(
        last.contains(needle),
        "last_error of {} should contain {needle:?}: {status}",
        status["name"]
    );
}

// ---------------------------------------------------------------------------------
// The connection stream

/// How one connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Connected and answered a query.
    Served,
    /// Refused with SQLSTATE 28000 and this reason.
    Denied(String),
    /// Anything else.
    Failed(String),
}

#[derive(Debug, Clone)]
struct Attempt {
    listener: &'static str,
    started: Instant,
    took: Duration,
    outcome: Outcome,
}

/// A bounded stream of new connections: `clients` clients per listener, each opening
/// one connection after the other with [`PACE`] between them, every connection bounded
/// by a timeout.
struct Stream {
    began: Instant,
    listeners: Vec<&'static str>,
    results: Arc<Mutex<Vec<Attempt>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Stream {
    fn start(targets: &[(&'static str, SocketAddr)], clients: usize) -> Stream {
        let results = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicU64::new(0));
        let began = Instant::now();
        let listeners = targets.iter().map(|(l, _)| *l).collect();
        let all = targets.len() * clients;
        let mut tasks = Vec::new();
        for (i, (listener, addr)) in targets
            .iter()
            .flat_map(|t| std::iter::repeat_n(*t, clients))
            .enumerate()
        {
            let (r, s, opened) = (results.clone(), stop.clone(), opened.clone());
            tasks.push(tokio::spawn(async move {
                // Spread the clients over one pace.
                tokio::time::sleep(PACE * i as u32 / all as u32).await;
                while !s.load(Ordering::SeqCst)
                    && began.elapsed() < MAX_RUN
                    && opened.fetch_add(1, Ordering::SeqCst) < MAX_CONNECTIONS as u64
                {
                    let started = Instant::now();
                    let outcome = one_connection(addr).await;
                    let took = started.elapsed();
                    r.lock().expect("results lock").push(Attempt {
                        listener,
                        started,
                        took,
                        outcome,
                    });
                    tokio::time::sleep(PACE).await;
                }
            }));
        }
        let task = tokio::spawn(async move {
            for t in tasks {
                let _ = t.await;
            }
        });
        Stream {
            began,
            listeners,
            results,
            stop,
            task,
        }
    }

    /// Waits until, for every listener, [`PER_PHASE`] connections that started at or
    /// after `since` have finished; panics if the stream ends or [`PATIENCE`] runs out.
    async fn wait_for(&self, since: Instant, what: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let counts: Vec<usize> = {
                let results = self.results.lock().expect("results lock");
                self.listeners
                    .iter()
                    .map(|l| {
                        results
                            .iter()
                            .filter(|a| a.listener == *l && a.started >= since)
                            .count()
                    })
                    .collect()
            };
            if counts.iter().all(|c| *c >= PER_PHASE) {
                return;
            }
            if Instant::now() >= deadline || self.task.is_finished() {
                panic!(
                    "{what}: only {counts:?} connections to {:?} finished (stream running for {:?})",
                    self.listeners,
                    self.began.elapsed()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
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

/// Connects through the listener as `app` to `orders` and runs a query.
async fn one_connection(addr: SocketAddr) -> Outcome {
    let conninfo = format!(
        "host={} port={} user=app dbname=orders connect_timeout=10",
        addr.ip(),
        addr.port()
    );
    let session = async {
        let (client, conn) = match tokio_postgres::connect(&conninfo, NoTls).await {
            Ok(c) => c,
            Err(e) => {
                return match e.as_db_error() {
                    Some(db) if *db.code() == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
                        Outcome::Denied(db.message().to_string())
                    }
                    _ => Outcome::Failed(format!("connect: {e}")),
                };
            }
        };
        tokio::spawn(conn);
        match client.simple_query("select 1").await {
            Ok(_) => Outcome::Served,
            Err(e) => Outcome::Failed(format!("query: {e}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(15), session)
        .await
        .unwrap_or_else(|_| Outcome::Failed("no answer within 15 s".into()))
}

/// Asserts that every connection was served or denied with one of `denials`.
fn assert_none_failed(attempts: &[Attempt], denials: &[&Outcome]) {
    let bad: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.outcome != Outcome::Served && !denials.contains(&&a.outcome))
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {} connections failed or were refused for another reason: {bad:#?}",
        bad.len(),
        attempts.len()
    );
}

fn summarize(attempts: &[Attempt]) -> String {
    let served = attempts.iter().filter(|a| a.outcome == Outcome::Served).count();
    let denied = attempts
        .iter()
        .filter(|a| matches!(a.outcome, Outcome::Denied(_)))
        .count();
    format!(
        "{} connections: {served} served, {denied} denied by a plugin or its policy, {} failed",
        attempts.len(),
        attempts.len() - served - denied
    )
}

/// The phases of a test: from the moment a change was active (or, for a refused
/// change, made) to the moment the next change began, what each listener must do.
#[derive(Default)]
struct Timeline {
    phases: Vec<Phase>,
}

struct Phase {
    what: String,
    from: Instant,
    to: Option<Instant>,
    expect: Vec<(&'static str, Outcome)>,
}

impl Timeline {
    fn open(&mut self, what: &str, from: Instant, expect: Vec<(&'static str, Outcome)>) {
        self.phases.push(Phase {
            what: what.to_string(),
            from,
            to: None,
            expect,
        });
    }

    /// Ends the open phase now (a change begins); returns the moment.
    fn cut(&mut self) -> Instant {
        let now = Instant::now();
        if let Some(p) = self.phases.last_mut()
            && p.to.is_none()
        {
            p.to = Some(now);
        }
        now
    }

    fn attempts_in<'a>(
        &'a self,
        attempts: &'a [Attempt],
        what: &str,
        listener: &'a str,
    ) -> impl Iterator<Item = &'a Attempt> + 'a {
        let phase = self
            .phases
            .iter()
            .find(|p| p.what == what)
            .unwrap_or_else(|| panic!("no phase {what:?}"));
        let to = phase.to.expect("phase ended");
        attempts
            .iter()
            .filter(move |a| a.listener == listener && a.started >= phase.from && a.started < to)
    }

    /// Every connection that started within a phase behaved as that phase expects,
    /// and every phase saw at least [`PER_PHASE`] connections per listener.
    fn check(&self, attempts: &[Attempt]) {
        for p in &self.phases {
            for (listener, want) in &p.expect {
                let seen: Vec<&Attempt> = self.attempts_in(attempts, &p.what, listener).collect();
                assert!(
                    seen.len() >= PER_PHASE,
                    "{}: only {} connections to {listener}",
                    p.what,
                    seen.len()
                );
                let wrong: Vec<&&Attempt> = seen.iter().filter(|a| a.outcome != *want).collect();
                assert!(
                    wrong.is_empty(),
                    "{}: every connection to {listener} that started in this phase must end as {want:?}; \
                     {} of {} did not: {wrong:#?}",
                    p.what,
                    wrong.len(),
                    seen.len()
                );
            }
        }
    }
}

/// "min X ms, median Y ms, max Z ms (n samples)".
fn spread(samples: &mut [Duration]) -> String {
    assert!(!samples.is_empty(), "no samples");
    samples.sort();
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    format!(
        "min {}, median {}, max {} ({} samples)",
        ms(samples[0]),
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() - 1]),
        samples.len()
    )
}

// ---------------------------------------------------------------------------------
// The long-lived session

async fn pg_connect(addr: SocketAddr) -> tokio_postgres::Client {
    let conninfo = format!(
        "host={} port={} user=app dbname=orders connect_timeout=10",
        addr.ip(),
        addr.port()
    );
    let (client, connection) = tokio::time::timeout(PATIENCE, tokio_postgres::connect(&conninfo, NoTls))
        .await
        .unwrap_or_else(|_| panic!("connecting to {addr}: no answer within {PATIENCE:?}"))
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

async fn backend_pid(client: &tokio_postgres::Client) -> i32 {
    tokio::time::timeout(PATIENCE, client.query_one("select pg_backend_pid()", &[]))
        .await
        .expect("query within the patience")
        .expect("query through wasmbassador")
        .get(0)
}
