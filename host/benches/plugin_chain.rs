//! Benchmark of the plugin chain (issue 3), not a test: it asserts nothing about speed
//! and prints Markdown tables.
//!
//! (a) **Chain cost in-process**: the same [`Chain`] the listener builds for every
//!     connection, over 0, 1 and 3 real plugins (allow-list, route-by-database,
//!     access-log, built from `plugins/`), timing `Chain::new` + `on_connect` +
//!     `on_close` per connection with the production instance reuse; on one thread and
//!     on two threads at once. A last row runs the three plugins with the binary's log
//!     subscriber and writer, so that it pays for access-log's lines (the parts after
//!     it log the same way, into /dev/null).
//! (b) **New connections per second** through a running release `wasmbassador`
//!     (`tcp` listeners with 0, 1 and 3 plugins, in one process, one run) in front of
//!     a tokio echo server in this process, next to a direct connection; a fixed number
//!     of connections per round from a few concurrent client tasks, rounds interleaved.
//! (c) **Swap latency**: time from renaming a new `.wasm` over the old one in the
//!     watched folder to `/plugins` showing the new generation, and to the first new
//!     connection that shows the new behaviour (allow-all and deny-all alternate).
//! (d) **HTTP hooks in-process**: `on-request` and `on-response` per request for the
//!     http plugins of `bench/http.sh` (bearer-token, header-router, http-metrics),
//!     together and alone.
//! (e) **New connections through a `postgres` listener** to a real PostgreSQL 15 (the
//!     tests' throwaway server): each connection logs in as `app` to `orders`, runs
//!     `SELECT 1` and closes, as `pgbench -C -S` does; 0, 1 and 3 plugins (the
//!     plugins now see a user and a database) next to a direct connection.
//!
//! (f) **The runtime's floor**: wasmtime's own cost of calling a component export, on
//!     the host's engine, with no SDK and no host code: a function that returns a
//!     number, the same with a `post-return`, one that takes a 200-byte string (lowered
//!     through the guest's `cabi_realloc`, as every hook's text is), and that last one
//!     again right after 8 MiB of other memory was touched, as between two connections
//!     in a busy process.
//!
//! Parts (b) and (e) also run three `allow-all` plugins, the cheapest hooks there are
//! (answer allow, count once): what any three-plugin chain costs at the least.
//!
//! Run: `cargo bench -p wasmbassador --bench plugin_chain` (or `bash bench/plugins.sh`).
//! Knobs (environment): `CHAIN_CONNS` (per batch, default 20000), `LISTENER_CONNS`
//! (per round, default 2000), `LISTENER_ROUNDS` (default 9), `CLIENTS` (concurrent
//! client tasks, default 4), `SWAPS` (default 10), `CHAIN_ROWS` (only the rows of
//! part (a) whose label contains it, to profile one), `WASMBASSADOR_BIN` (another
//! binary for part (b), for an A/B), `ACCESS_LOG_CAPPED` (leave access-log at the
//! default log-line cap in part (b) instead of writing every line), `PG_CONNS` (per
//! round of part (e), default 300), `PG_ROUNDS` (default 7). A first argument `chain`,
//! `http`, `listener`, `swap`, `postgres` or `floor` runs only that part.

// The tests' throwaway PostgreSQL server, for part (e).
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::future::Future;
use std::hint::black_box;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::header::{HeaderMap, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wasmbassador::config::Config;
use wasmbassador::http::apply_header_edits;
use wasmbassador::metrics::Metrics;
use wasmbassador::plugin::chain::{Chain, ChainCache, Decision};
use wasmbassador::plugin::packed::{RequestArgs, RequestHead, ResponseArgs, ResponseHead};
use wasmbassador::plugin::{
    CloseInfo, ConnectInfo, Outcome, PluginMap, PluginShared, PostgresStartup, Protocol, RequestAction,
    ResponseSource, load_slot,
};

/// The release binary cargo built for this bench; `WASMBASSADOR_BIN` names another
/// (an older build, for an A/B of the running binary).
fn bin() -> String {
    std::env::var("WASMBASSADOR_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_wasmbassador").to_string())
}

/// Every part of the bench stops within these bounds even on a loaded machine.
const CHAIN_TIME_BOUND: Duration = Duration::from_secs(20);
const ROUND_TIME_BOUND: Duration = Duration::from_secs(30);
const SWAP_TIME_BOUND: Duration = Duration::from_secs(5);

const PING: &[u8; 8] = b"ping-42\n";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_path_buf()
}

/// Builds every plugin with the documented command and returns the output folder;
/// `PLUGIN_DIR=folder` skips the build and loads the `.wasm` files found there.
fn build_plugins() -> PathBuf {
    if let Some(dir) = std::env::var_os("PLUGIN_DIR") {
        return PathBuf::from(dir);
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => PathBuf::from(t).join("wasm-plugins"),
        None => repo().join("plugins/target"),
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("building the plugins (cargo build --target wasm32-wasip2 --release) ...");
    let status = Command::new(cargo)
        .arg("build")
        .arg("--manifest-path")
        .arg(repo().join("plugins/Cargo.toml"))
        .args(["--target", "wasm32-wasip2", "--release", "--locked", "--quiet"])
        .arg("--target-dir")
        .arg(&target)
        .current_dir(repo())
        .status()
        .expect("running cargo to build the plugins");
    assert!(
        status.success(),
        "building the plugins failed (rustup target add wasm32-wasip2?)"
    );
    target.join("wasm32-wasip2/release")
}

fn wasm(dir: &Path, name: &str) -> PathBuf {
    let f = dir.join(format!("{}.wasm", name.replace('-', "_")));
    assert!(f.is_file(), "{} was not built", f.display());
    f
}

fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e3)
}

// ---------------------------------------------------------------------------------
// (a) the chain in-process
// ---------------------------------------------------------------------------------

/// Loads every plugin of a config text, as the ambassador does at start.
fn load_plugins(text: &str) -> PluginMap {
    let config = Config::parse(text, "bench").expect("the bench config is valid");
    let metrics = Arc::new(Metrics::new());
    let shared = PluginShared {
        plugin_metrics: metrics.plugin_metrics.clone(),
        metrics,
    };
    config
        .plugins
        .iter()
        .map(|p| {
            let slot = load_slot(p, &shared, None).unwrap_or_else(|e| panic!("{e}"));
            (p.name.clone(), slot)
        })
        .collect()
}

/// The three real plugins, configured as for a `postgres` listener.
fn chain_plugins(dir: &Path) -> PluginMap {
    let text = format!(
        r#"
[[listener]]
name = "pg"
listen = "127.0.0.1:0"
protocol = "postgres"
upstream = "main"
plugins = ["allow-list", "route-by-database", "access-log"]

[[upstream]]
name = "main"
  [[upstream.endpoint]]
  address = "127.0.0.1:1"

[[upstream]]
name = "orders"
  [[upstream.endpoint]]
  address = "127.0.0.1:2"

[[plugin]]
name = "allow-list"
path = {allow}
timeout = "5ms"
config = {{ users = ["app"], clients = ["127.0.0.0/8", "::1/128"] }}

[[plugin]]
name = "route-by-database"
path = {route}
config = {{ routes = {{ orders = "orders", reporting = "tag:replica" }} }}

[[plugin]]
name = "access-log"
path = {log}
on_error = "allow"
log_lines_per_second = 0

[[plugin]]
name = "allow-all"
path = {all}
"#,
        all = toml_path(&wasm(dir, "allow-all")),
        allow = toml_path(&wasm(dir, "allow-list")),
        route = toml_path(&wasm(dir, "route-by-database")),
        log = toml_path(&wasm(dir, "access-log")),
    );
    load_plugins(&text)
}

/// One connection's worth of plugin work, as `listener.rs` does it: take the chain,
/// build the hook arguments, `on-connect`, and `on-close` after the session.
fn one_connection(
    cache: &ChainCache,
    plugins: &ArcSwap<PluginMap>,
    names: &[String],
    peer: SocketAddr,
) -> Decision {
    let mut chain = Chain::new(cache, plugins, names);
    if chain.is_empty() {
        return Decision::Allow { route: None };
    }
    let info = ConnectInfo {
        listener: "pg".to_string(),
        protocol: Protocol::Postgres,
        client_addr: wasmbassador::plugin::addr_text(peer),
        upstream: "main".to_string(),
        postgres: Some(PostgresStartup {
            user: Some("app".to_string()),
            database: Some("orders".to_string()),
            application_name: Some("bench".to_string()),
            parameters: vec![("client_encoding".to_string(), "UTF8".to_string())],
        }),
    };
    let decision = black_box(chain.on_connect(&info));
    // As in `listener.rs`, `on-close` gets the text fields of `on-connect`, moved.
    let (user, database) = info.postgres.map_or((None, None), |p| (p.user, p.database));
    let close = CloseInfo {
        listener: info.listener,
        client_addr: info.client_addr,
        upstream: Some("orders".to_string()),
        endpoint: Some("127.0.0.1:2".to_string()),
        bytes_to_upstream: 310,
        bytes_to_client: 5120,
        duration_ns: 12_345_678,
        outcome: Outcome::Completed,
        user,
        database,
    };
    chain.on_close(&close);
    decision
}

/// On-CPU nanoseconds of the calling thread (Linux schedstat). CPU time, unlike wall
/// time, does not grow when other processes share the cores.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// On-CPU nanoseconds of every (live) thread of process `pid`.
fn process_cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        if let Ok(s) = std::fs::read_to_string(path) {
            total += s.split_whitespace().next()?.parse::<u64>().ok()?;
        }
    }
    Some(total)
}

/// Per connection on one thread: wall and on-CPU nanoseconds (medians over batches)
/// and the lowest CPU figure of any batch.
#[derive(Clone, Copy)]
struct Cost {
    wall_ns: f64,
    cpu_ns: f64,
    cpu_min_ns: f64,
}

struct ChainRow {
    label: String,
    one_thread: Cost,
    two_threads: Cost,
}

/// Median cost per connection over batches of `per_batch` on `threads` threads at
/// once (each thread does `per_batch`; the figures are per connection on one thread).
fn time_chain(plugins: &Arc<ArcSwap<PluginMap>>, names: &[String], per_batch: usize, threads: usize) -> Cost {
    let peer: SocketAddr = "127.0.0.1:50412".parse().expect("address");
    // One listener's cache, shared by the threads as by a listener's connections.
    let cache = ChainCache::default();
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    let started = Instant::now();
    let mut per_batch = per_batch;
    for batch in 0..8 {
        let results: Vec<(f64, f64)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let t = Instant::now();
                        let c = thread_cpu_ns();
                        for _ in 0..per_batch {
                            if let Decision::Deny { plugin, reason } =
                                one_connection(&cache, plugins, names, peer)
                            {
                                panic!("the bench chain denied: {plugin}: {reason}");
                            }
                        }
                        let cpu = match (c, thread_cpu_ns()) {
                            (Some(a), Some(b)) => (b - a) as f64 / per_batch as f64,
                            _ => f64::NAN,
                        };
                        (t.elapsed().as_nanos() as f64 / per_batch as f64, cpu)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("bench thread"))
                .collect()
        });
        // The first batch warms caches and instance lists, and sizes the others to at
        // least ~100 ms: a thread's CPU time (schedstat) advances in scheduler ticks.
        if batch == 0 {
            let ns = results.iter().map(|r| r.0).fold(1.0, f64::max);
            per_batch = per_batch.max((100e6 / ns) as usize).min(5_000_000);
        } else {
            for (w, c) in results {
                wall.push(w);
                cpu.push(c);
            }
        }
        if started.elapsed() > CHAIN_TIME_BOUND {
            break;
        }
    }
    Cost {
        wall_ns: median(&mut wall),
        cpu_ns: median(&mut cpu),
        cpu_min_ns: cpu.iter().copied().fold(f64::INFINITY, f64::min),
    }
}

fn chain_bench(dir: &Path) -> Vec<ChainRow> {
    let plugins = Arc::new(ArcSwap::from_pointee(chain_plugins(dir)));
    let per_batch = env_usize("CHAIN_CONNS", 20_000);
    let chains: [(&str, &[&str]); 6] = [
        (
            "allow-all alone (on-connect answers allow, reads nothing)",
            &["allow-all"],
        ),
        ("0 plugins", &[]),
        ("1 plugin (allow-list)", &["allow-list"]),
        (
            "3 plugins (allow-list, route-by-database, access-log)",
            &["allow-list", "route-by-database", "access-log"],
        ),
        ("route-by-database alone", &["route-by-database"]),
        (
            "access-log alone (on-connect is the default pass)",
            &["access-log"],
        ),
    ];
    let measure = |label: &str, names: &[&str]| {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let row = ChainRow {
            label: label.to_string(),
            one_thread: time_chain(&plugins, &names, per_batch, 1),
            two_threads: time_chain(&plugins, &names, per_batch, 2),
        };
        eprintln!(
            "chain {label}: cpu {:.0} ns / {:.0} ns",
            row.one_thread.cpu_ns, row.two_threads.cpu_ns
        );
        row
    };
    // `CHAIN_ROWS=text` keeps only the rows whose label contains it (to profile one).
    let keep = |label: &str| std::env::var("CHAIN_ROWS").map_or(true, |k| label.contains(&k));
    let mut rows: Vec<ChainRow> = chains
        .iter()
        .filter(|(label, _)| keep(label))
        .map(|(label, names)| measure(label, names))
        .collect();
    log_to_dev_null();
    let logged =
        "3 plugins, access-log's lines formatted and written (the binary's log writer, to /dev/null)";
    if keep(logged) {
        rows.push(measure(
            logged,
            &["allow-list", "route-by-database", "access-log"],
        ));
    }
    rows
}

/// From here on, the process logs as the binary does (`wasmbassador::logs`, its format
/// and filter), into /dev/null; until here, with no subscriber, log calls are skipped.
/// Global rather than scoped to the row's threads: tracing keeps a callsite first hit
/// on a thread without a scoped subscriber disabled for scoped ones that come later.
fn log_to_dev_null() {
    static FLUSH: std::sync::OnceLock<wasmbassador::logs::FlushGuard> = std::sync::OnceLock::new();
    let sink = std::fs::File::create("/dev/null").expect("/dev/null");
    let (writer, flush) = wasmbassador::logs::batched(sink).expect("log writer");
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_ansi(false)
        .with_writer(writer)
        .fmt_fields(wasmbassador::logs::Fields)
        .finish();
    if tracing::subscriber::set_global_default(subscriber).is_ok() {
        let _ = FLUSH.set(flush);
    }
}

// ---------------------------------------------------------------------------------
// (d) the http hooks in-process
// ---------------------------------------------------------------------------------

/// The three http plugins of `bench/http.sh`, configured the same way.
fn http_plugins(dir: &Path, token: &Path) -> PluginMap {
    let text = format!(
        r#"
[[listener]]
name = "api"
listen = "127.0.0.1:0"
protocol = "http"
upstream = "api"
plugins = ["bearer-token", "header-router", "http-metrics"]

[[upstream]]
name = "api"
  [[upstream.endpoint]]
  address = "127.0.0.1:1"
  tags = ["beta"]

[[plugin]]
name = "bearer-token"
path = {bearer}
grants = {{ files = [{token}] }}
config = {{ token_file = {token} }}

[[plugin]]
name = "header-router"
path = {router}
config = {{ rules = [{{ header = "x-tenant", equals = "beta", route = {{ tag = "beta" }} }}] }}

[[plugin]]
name = "http-metrics"
path = {metrics}
config = {{ routes = [{{ name = "root", prefix = "/" }}] }}
"#,
        bearer = toml_path(&wasm(dir, "bearer-token")),
        router = toml_path(&wasm(dir, "header-router")),
        metrics = toml_path(&wasm(dir, "http-metrics")),
        token = toml_path(token),
    );
    load_plugins(&text)
}

/// A header map from `(name, value)` pairs.
fn header_map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(*name, HeaderValue::from_static(value));
    }
    map
}

/// One request's worth of plugin work, as `http/hooks.rs` does it: take the chain,
/// `on-request` in order, `on-response` in reverse, for the plugins that use them.
fn one_request(
    cache: &ChainCache,
    plugins: &ArcSwap<PluginMap>,
    names: &[String],
    client_addr: &str,
) -> usize {
    let chain = cache.current(plugins, names).unwrap_or_default();
    let mut headers = header_map(&[("user-agent", "curl/8.5.0"), ("accept", "*/*")]);
    let mut args = RequestArgs::default();
    let mut edits = 0;
    for p in chain.iter() {
        if !p.wants_requests() {
            continue;
        }
        let head = RequestHead {
            listener: "api",
            client_addr,
            method: "GET",
            path: "/hello.txt",
            authority: Some("127.0.0.1:8080"),
            headers: &headers,
            upstream: "api",
        };
        match p.on_request(&head, &mut args) {
            Ok(RequestAction::Forward(f)) => {
                if !f.headers.is_empty() {
                    edits += f.headers.len();
                    apply_header_edits(&mut headers, f.headers, p.name(), "request");
                    args.clear();
                }
            }
            Ok(RequestAction::Respond(_)) => panic!("plugin {} answered locally", p.name()),
            Err(e) => panic!("plugin {} failed: {e}", p.name()),
        }
    }
    if chain.iter().any(|p| p.wants_responses()) {
        let mut headers = header_map(&[
            ("server", "nginx/1.22.1"),
            ("date", "Sun, 22 Nov 2026 09:00:00 GMT"),
            ("content-type", "text/plain"),
            ("content-length", "128"),
            ("last-modified", "Sun, 22 Nov 2026 08:00:00 GMT"),
            ("etag", "\"6740c000-80\""),
            ("accept-ranges", "bytes"),
        ]);
        let mut args = ResponseArgs::default();
        for p in chain.iter().rev() {
            let head = ResponseHead {
                listener: "api",
                method: "GET",
                path: "/hello.txt",
                upstream: "api",
                endpoint: Some("127.0.0.1:1"),
                status: 200,
                headers: &headers,
                source: ResponseSource::Upstream,
                duration_ns: 180_000,
                attempts: 1,
            };
            let e = p.on_response(&head, &mut args);
            if !e.is_empty() {
                edits += e.len();
                apply_header_edits(&mut headers, e, p.name(), "response");
                args.clear();
            }
        }
    }
    edits
}

/// Median on-CPU cost per request on one thread, like [`time_chain`].
fn time_requests(plugins: &ArcSwap<PluginMap>, names: &[String], per_batch: usize) -> Cost {
    // The app connection's address is formatted once per connection, not per request.
    let peer = "127.0.0.1:50412";
    let cache = ChainCache::default();
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    let started = Instant::now();
    let mut per_batch = per_batch;
    for batch in 0..8 {
        let t = Instant::now();
        let c = thread_cpu_ns();
        for _ in 0..per_batch {
            black_box(one_request(&cache, plugins, names, peer));
        }
        let ns = t.elapsed().as_nanos() as f64 / per_batch as f64;
        let c = match (c, thread_cpu_ns()) {
            (Some(a), Some(b)) => (b - a) as f64 / per_batch as f64,
            _ => f64::NAN,
        };
        if batch == 0 {
            per_batch = per_batch.max((100e6 / ns) as usize).min(5_000_000);
        } else {
            wall.push(ns);
            cpu.push(c);
        }
        if started.elapsed() > CHAIN_TIME_BOUND {
            break;
        }
    }
    Cost {
        wall_ns: median(&mut wall),
        cpu_ns: median(&mut cpu),
        cpu_min_ns: cpu.iter().copied().fold(f64::INFINITY, f64::min),
    }
}

fn http_bench(dir: &Path) -> Vec<(String, Cost)> {
    let tmp = tempfile::tempdir().expect("temp dir");
    let token = tmp.path().join("token");
    std::fs::write(&token, "bench-upstream-token\n").expect("write the token");
    let plugins = ArcSwap::from_pointee(http_plugins(dir, &token));
    let per_batch = env_usize("CHAIN_CONNS", 20_000);
    let chains: [(&str, &[&str]); 5] = [
        ("0 plugins", &[]),
        (
            "3 plugins (bearer-token, header-router, http-metrics)",
            &["bearer-token", "header-router", "http-metrics"],
        ),
        ("bearer-token alone (on-request)", &["bearer-token"]),
        ("header-router alone (on-request)", &["header-router"]),
        ("http-metrics alone (on-response)", &["http-metrics"]),
    ];
    chains
        .iter()
        .map(|(label, names)| {
            let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
            let cost = time_requests(&plugins, &names, per_batch);
            eprintln!("http {label}: cpu {:.0} ns", cost.cpu_ns);
            (label.to_string(), cost)
        })
        .collect()
}

// ---------------------------------------------------------------------------------
// (b) connections through a running ambassador, and (c) swaps
// ---------------------------------------------------------------------------------

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Reads 8 bytes, writes them back, closes (the server closes first, so no client
/// port lingers in TIME_WAIT).
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut buf = [0u8; 8];
                if s.read_exact(&mut buf).await.is_ok() {
                    let _ = s.write_all(&buf).await;
                }
            });
        }
    });
    addr
}

/// One client connection: connect, send 8 bytes, read until the close. `Ok(true)`
/// when the 8 bytes came back, `Ok(false)` when the connection was closed without
/// them (a plugin denied it).
async fn ping(addr: SocketAddr) -> std::io::Result<bool> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(PING).await?;
    let mut buf = Vec::with_capacity(16);
    match s.read_to_end(&mut buf).await {
        Ok(_) => Ok(buf == PING),
        // A denied connection may end with a reset rather than a FIN.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(false),
        Err(e) => Err(e),
    }
}

struct Ambassador {
    child: Child,
    admin: SocketAddr,
    listeners: HashMap<&'static str, SocketAddr>,
    swap_file: PathBuf,
    staging: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Ambassador {
    fn drop(&mut self) {
        // Our own child, by its PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// Starts the release binary with `tcp` listeners to `echo`: `p0`, `p1`, `p3` (0, 1, 3
/// plugins), `a3` (three allow-all) and `swap` (one plugin whose file the swap part
/// replaces); with `pg`, also `postgres` listeners to it: `pg0`, `pg1`, `pg3`, `pga3`.
async fn start_ambassador(dir: &Path, echo: SocketAddr, pg: Option<SocketAddr>) -> Ambassador {
    let tmp = tempfile::tempdir().expect("tempdir");
    let chain_dir = tmp.path().join("chain");
    let swap_dir = tmp.path().join("swap");
    let staging = tmp.path().join("staging");
    for d in [&chain_dir, &swap_dir, &staging] {
        std::fs::create_dir(d).expect("mkdir");
    }
    for p in ["allow-list", "route-by-database", "access-log", "allow-all"] {
        let src = wasm(dir, p);
        std::fs::copy(&src, chain_dir.join(src.file_name().expect("name"))).expect("copy plugin");
    }
    let swap_file = swap_dir.join("swap.wasm");
    std::fs::copy(wasm(dir, "allow-all"), &swap_file).expect("copy plugin");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut listeners = HashMap::new();
    let mut listener_toml = String::new();
    const P3: &str = r#"["allow-list", "route-by-database", "access-log"]"#;
    const A3: &str = r#"["allow-all-1", "allow-all-2", "allow-all-3"]"#;
    const PG3: &str = r#"["pg-allow-list", "pg-route-by-database", "access-log"]"#;
    let mut wanted = vec![
        ("p0", "tcp", "echo", "[]"),
        ("p1", "tcp", "echo", r#"["allow-list"]"#),
        ("p3", "tcp", "echo", P3),
        ("a3", "tcp", "echo", A3),
        ("swap", "tcp", "echo", r#"["swap"]"#),
    ];
    if pg.is_some() {
        wanted.extend([
            ("pg0", "postgres", "pg", "[]"),
            ("pg1", "postgres", "pg", r#"["pg-allow-list"]"#),
            ("pg3", "postgres", "pg", PG3),
            ("pga3", "postgres", "pg", A3),
        ]);
    }
    for (name, protocol, upstream, plugins) in wanted {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        listeners.insert(name, addr);
        listener_toml.push_str(&format!(
            "[[listener]]\nname = \"{name}\"\nlisten = \"{addr}\"\nprotocol = \"{protocol}\"\nupstream = \"{upstream}\"\nplugins = {plugins}\n\n"
        ));
    }
    if let Some(pg) = pg {
        listener_toml.push_str(&format!(
            "[[upstream]]\nname = \"pg\"\n  [[upstream.endpoint]]\n  address = \"{pg}\"\n\n"
        ));
    }
    let all = toml_path(&chain_dir.join("allow_all.wasm"));
    let config = format!(
        r#"
[admin]
listen = "{admin}"

{listener_toml}
[[upstream]]
name = "echo"
  [[upstream.endpoint]]
  address = "{echo}"

# On a tcp listener there is no user or database: allow-list checks the client address
# and route-by-database applies its default (the same upstream), so each plugin runs
# its real code path and the connection still reaches the echo server.
[[plugin]]
name = "allow-list"
path = {allow}
timeout = "5ms"
config = {{ clients = ["127.0.0.0/8", "::1/128"] }}

[[plugin]]
name = "route-by-database"
path = {route}
config = {{ routes = {{ orders = "orders" }}, default = "echo" }}

# The same two on a postgres listener, where they check the user and the database
# (the connections of part (e) log in as app to orders).
[[plugin]]
name = "pg-allow-list"
path = {allow}
timeout = "5ms"
config = {{ users = ["app"], databases = ["orders"], clients = ["127.0.0.0/8", "::1/128"] }}

[[plugin]]
name = "pg-route-by-database"
path = {route}
config = {{ routes = {{ orders = "pg", reporting = "tag:replica" }} }}

[[plugin]]
name = "access-log"
path = {log}
on_error = "allow"
{log_limit}

[[plugin]]
name = "allow-all-1"
path = {all}

[[plugin]]
name = "allow-all-2"
path = {all}

[[plugin]]
name = "allow-all-3"
path = {all}

[[plugin]]
name = "swap"
path = {swap}
config = {{ version = "bench" }}
"#,
        allow = toml_path(&chain_dir.join("allow_list.wasm")),
        route = toml_path(&chain_dir.join("route_by_database.wasm")),
        log = toml_path(&chain_dir.join("access_log.wasm")),
        // Every connection's line is written, as an access log must (the default cap
        // would drop most of them at these rates). `ACCESS_LOG_CAPPED=1` leaves the
        // key out, for a binary older than the key.
        log_limit = if std::env::var_os("ACCESS_LOG_CAPPED").is_some() {
            ""
        } else {
            "log_lines_per_second = 0"
        },
        swap = toml_path(&swap_file),
    );
    let config_path = tmp.path().join("wasmbassador.toml");
    std::fs::write(&config_path, config).expect("write config");
    // The access log goes to a real file, as it would in production (to a pipe).
    let log = std::fs::File::create(tmp.path().join("wasmbassador.log")).expect("log file");
    let bin = bin();
    let child = Command::new(&bin)
        .arg("run")
        .arg("--config")
        .arg(&config_path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
    let amb = Ambassador {
        child,
        admin,
        listeners,
        swap_file,
        staging,
        _dir: tmp,
    };
    let started = Instant::now();
    loop {
        if let Ok((200, _)) = http_get(admin, "/startup").await {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "wasmbassador did not start; its log:\n{}",
            std::fs::read_to_string(amb._dir.path().join("wasmbassador.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    amb
}

struct Round {
    conns: usize,
    failed: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

/// `n` connections to `addr` from `clients` concurrent tasks (bounded in count and
/// time), each one `op` (`Ok(true)`: it did what a client wanted).
async fn round<F, Fut>(addr: SocketAddr, n: usize, clients: usize, op: F) -> Round
where
    F: Fn(SocketAddr) -> Fut + Copy + Send + 'static,
    Fut: Future<Output = std::io::Result<bool>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + ROUND_TIME_BOUND;
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let next = next.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(n / clients + 1);
                let mut failed = 0;
                while next.fetch_add(1, Ordering::Relaxed) < n && Instant::now() < deadline {
                    let t = Instant::now();
                    match tokio::time::timeout(Duration::from_secs(5), op(addr)).await {
                        Ok(Ok(true)) => lat.push(t.elapsed()),
                        _ => failed += 1,
                    }
                }
                (lat, failed)
            })
        })
        .collect();
    let mut out = Round {
        conns: 0,
        failed: 0,
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
    };
    for t in tasks {
        let (lat, failed) = t.await.expect("client task");
        out.latencies.extend(lat);
        out.failed += failed;
    }
    out.elapsed = started.elapsed();
    out.conns = out.latencies.len();
    out
}

/// One `pgbench -C -S`-like session: log in as `app` to `orders` (no TLS, trust),
/// `SELECT 1`, close.
async fn pg_session(addr: SocketAddr) -> std::io::Result<bool> {
    let conninfo = format!(
        "host={} port={} user=app dbname=orders application_name=bench",
        addr.ip(),
        addr.port()
    );
    let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .map_err(std::io::Error::other)?;
    let driver = tokio::spawn(conn);
    let rows = client
        .simple_query("SELECT 1")
        .await
        .map_err(std::io::Error::other)?;
    drop(client);
    let _ = driver.await;
    Ok(rows
        .iter()
        .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("1"))))
}

struct ListenerRow {
    label: &'static str,
    rate: f64,
    /// Median over rounds of this rate over the 0-plugin rate of the same round: a
    /// paired ratio, which drift between rounds moves less than a ratio of medians.
    vs_p0: f64,
    /// On-CPU time of the wasmbassador process per connection (all its threads).
    cpu_us: Option<f64>,
    p50: Duration,
    p99: Duration,
    failed: usize,
    conns: usize,
}

/// Rounds of `n` connections (`op` each) to every target in turn, the order rotating
/// between rounds. Target 0 is the direct connection, target 1 the 0-plugin listener
/// that the `vs_p0` ratios are paired with.
async fn listener_bench<F, Fut>(
    amb: &Ambassador,
    targets: &[(&'static str, SocketAddr)],
    n: usize,
    rounds: usize,
    op: F,
) -> Vec<ListenerRow>
where
    F: Fn(SocketAddr) -> Fut + Copy + Send + 'static,
    Fut: Future<Output = std::io::Result<bool>> + Send,
{
    let clients = env_usize("CLIENTS", 4).max(1);
    // Warm-up: instances, allocator, page cache.
    for (_, addr) in targets {
        round(*addr, n / 4, clients, op).await;
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let mut lats: Vec<Vec<Duration>> = vec![Vec::new(); targets.len()];
    let mut failed = vec![0; targets.len()];
    let mut conns = vec![0; targets.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let pid = amb.child.id();
    for r in 0..rounds {
        // Interleaved, and the order rotates, so drift on a shared machine hits all.
        for k in 0..targets.len() {
            let i = (k + r) % targets.len();
            let before = process_cpu_ns(pid);
            let res = round(targets[i].1, n, clients, op).await;
            if let (Some(a), Some(b)) = (before, process_cpu_ns(pid))
                && i > 0
                && res.conns > 0
            {
                cpu[i].push((b - a) as f64 / 1e3 / res.conns as f64);
            }
            rates[i].push(res.conns as f64 / res.elapsed.as_secs_f64());
            lats[i].extend(res.latencies);
            failed[i] += res.failed;
            conns[i] += res.conns;
        }
        eprintln!("round {}/{rounds} done", r + 1);
    }
    let mut paired: Vec<Vec<f64>> = (0..targets.len())
        .map(|i| rates[i].iter().zip(&rates[1]).map(|(r, p0)| r / p0).collect())
        .collect();
    targets
        .iter()
        .enumerate()
        .map(|(i, (label, _))| {
            lats[i].sort();
            ListenerRow {
                label,
                vs_p0: median(&mut paired[i]),
                rate: median(&mut rates[i]),
                cpu_us: (!cpu[i].is_empty()).then(|| median(&mut cpu[i])),
                p50: percentile(&lats[i], 0.5),
                p99: percentile(&lats[i], 0.99),
                failed: failed[i],
                conns: conns[i],
            }
        })
        .collect()
}

/// Appends a table of [`listener_bench`] rows (the first is the direct connection).
fn listener_table(report: &mut String, rows: &[ListenerRow]) {
    let direct = rows[0].rate;
    report.push_str(
        "| target | connections/s | vs direct | vs 0 plugins | wasmbassador CPU µs/conn | CPU added vs 0 plugins, µs | p50 µs | p99 µs | failed |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let p0_cpu = rows.get(1).and_then(|r| r.cpu_us);
    for (i, r) in rows.iter().enumerate() {
        let dash = || "—".to_string();
        let added = match (i, r.cpu_us, p0_cpu) {
            (2.., Some(c), Some(p0)) => format!("{:+.1}", c - p0),
            _ => dash(),
        };
        report.push_str(&format!(
            "| {} | {:.0} | {:.2} | {} | {} | {} | {} | {} | {} of {} |\n",
            r.label,
            r.rate,
            r.rate / direct,
            if i == 0 { dash() } else { format!("{:.3}", r.vs_p0) },
            r.cpu_us.map(|c| format!("{c:.1}")).unwrap_or_else(dash),
            added,
            us(r.p50),
            us(r.p99),
            r.failed,
            r.conns + r.failed
        ));
    }
    report.push('\n');
}

async fn swap_generation(admin: SocketAddr) -> Option<u64> {
    let (code, body) = http_get(admin, "/plugins").await.ok()?;
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let list = v
        .as_array()
        .or_else(|| v.get("plugins").and_then(|p| p.as_array()))?;
    list.iter()
        .find(|p| p["name"] == "swap")
        .and_then(|p| p["generation"].as_u64())
}

struct SwapResult {
    to_generation: Vec<Duration>,
    to_serving: Vec<Duration>,
    missed: usize,
}

async fn swap_bench(amb: &Ambassador, dir: &Path) -> SwapResult {
    let swaps = env_usize("SWAPS", 10);
    let allow = std::fs::read(wasm(dir, "allow-all")).expect("read allow-all");
    let deny = std::fs::read(wasm(dir, "deny-all")).expect("read deny-all");
    let addr = amb.listeners["swap"];
    let mut out = SwapResult {
        to_generation: Vec::new(),
        to_serving: Vec::new(),
        missed: 0,
    };
    let mut generation = swap_generation(amb.admin)
        .await
        .expect("/plugins lists the swap plugin");
    assert!(
        ping(addr).await.expect("swap listener"),
        "allow-all serves at first"
    );
    for i in 0..swaps {
        // Even swaps bring deny-all, odd ones allow-all back.
        let (bytes, allowed_after) = if i % 2 == 0 {
            (&deny, false)
        } else {
            (&allow, true)
        };
        let staged = amb.staging.join("swap.wasm");
        std::fs::write(&staged, bytes).expect("stage");
        // Let any earlier events settle (debounce is 100 ms).
        tokio::time::sleep(Duration::from_millis(400)).await;
        let t0 = Instant::now();
        std::fs::rename(&staged, &amb.swap_file).expect("rename over the plugin");
        let (mut seen_gen, mut seen_serving) = (None, None);
        while (seen_gen.is_none() || seen_serving.is_none()) && t0.elapsed() < SWAP_TIME_BOUND {
            let allowed = matches!(ping(addr).await, Ok(true));
            if seen_serving.is_none() && allowed == allowed_after {
                seen_serving = Some(t0.elapsed());
            }
            if seen_gen.is_none() && swap_generation(amb.admin).await.is_some_and(|g| g > generation) {
                seen_gen = Some(t0.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        match (seen_gen, seen_serving) {
            (Some(g), Some(s)) => {
                out.to_generation.push(g);
                out.to_serving.push(s);
                generation += 1;
            }
            _ => {
                out.missed += 1;
                generation = swap_generation(amb.admin).await.unwrap_or(generation);
            }
        }
        eprintln!(
            "swap {}/{swaps}: generation {seen_gen:?}, serving {seen_serving:?}",
            i + 1
        );
    }
    out
}

// ---------------------------------------------------------------------------------

/// A component with the least a hook can be: no SDK, no host imports. `f` returns a
/// number; `fp` is `f` with a `post-return` (as every hook whose result holds text
/// has); `g` takes a string, which the host lowers through `realloc` into the guest's
/// memory (a bump allocator here).
const FLOOR_WAT: &str = r#"
(component
  (core module $m
    (memory (export "mem") 1)
    (func (export "f") (result i32) i32.const 1)
    (func (export "g") (param i32 i32) (result i32) local.get 1)
    (func (export "realloc") (param i32 i32 i32 i32) (result i32) i32.const 1024)
    (func (export "post") (param i32)))
  (core instance $i (instantiate $m))
  (func (export "f") (result u32) (canon lift (core func $i "f")))
  (func (export "fp") (result u32) (canon lift (core func $i "f") (post-return (core func $i "post"))))
  (func (export "g") (param "s" string) (result u32)
    (canon lift (core func $i "g") (memory (core memory $i "mem")) (realloc (core func $i "realloc")))))
"#;

/// Part (f): ns per call, warm (median of 7 batches, wall time, one thread) and, for
/// `g`, the median of single calls each made after touching 8 MiB.
fn floor_bench() -> Vec<(&'static str, f64)> {
    use wasmtime::component::{Component, Linker, TypedFunc};
    let engine = wasmbassador::plugin::engine::engine().expect("engine");
    let bytes = wat::parse_str(FLOOR_WAT).expect("the floor component parses");
    let component = Component::new(engine, bytes).expect("the floor component compiles");
    let mut store = wasmtime::Store::new(engine, ());
    store.set_epoch_deadline(u64::MAX / 2);
    let instance = Linker::<()>::new(engine)
        .instantiate(&mut store, &component)
        .expect("instantiate");
    let f: TypedFunc<(), (u32,)> = instance.get_typed_func(&mut store, "f").expect("f");
    let fp: TypedFunc<(), (u32,)> = instance.get_typed_func(&mut store, "fp").expect("fp");
    let g: TypedFunc<(&str,), (u32,)> = instance.get_typed_func(&mut store, "g").expect("g");
    let text = "x".repeat(200);
    let per_batch = env_usize("CHAIN_CONNS", 20000) * 5;
    let mut warm = |call: &mut dyn FnMut(&mut wasmtime::Store<()>)| {
        let mut batches = Vec::new();
        let started = Instant::now();
        while batches.len() < 7 && started.elapsed() < CHAIN_TIME_BOUND {
            let t = Instant::now();
            for _ in 0..per_batch {
                call(&mut store);
            }
            batches.push(t.elapsed().as_nanos() as f64 / per_batch as f64);
        }
        median(&mut batches)
    };
    let mut rows = vec![
        (
            "`f() -> u32`: call, no `post-return`",
            warm(&mut |st| {
                black_box(f.call(&mut *st, ()).expect("f"));
            }),
        ),
        (
            "`f() -> u32` with a `post-return`",
            warm(&mut |st| {
                black_box(fp.call(&mut *st, ()).expect("fp"));
            }),
        ),
        (
            "`g(200-byte string) -> u32` (`realloc` + copy)",
            warm(&mut |st| {
                black_box(g.call(&mut *st, (&text,)).expect("g"));
            }),
        ),
    ];
    let mut other = vec![0u8; 8 << 20];
    let mut cold = Vec::new();
    let started = Instant::now();
    while cold.len() < 2000 && started.elapsed() < CHAIN_TIME_BOUND {
        for i in (0..other.len()).step_by(64) {
            other[i] = other[i].wrapping_add(1);
        }
        black_box(&other);
        let t = Instant::now();
        black_box(g.call(&mut store, (&text,)).expect("g"));
        cold.push(t.elapsed().as_nanos() as f64);
    }
    rows.push((
        "`g(200-byte string)` after 8 MiB of other memory was touched",
        median(&mut cold),
    ));
    rows
}

fn main() {
    // `cargo bench` passes `--bench`; a bare word selects one part.
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let run = |part: &str| only.as_deref().is_none_or(|o| o == part);
    let dir = build_plugins();
    let mut report = String::new();

    if run("chain") {
        let rows = chain_bench(&dir);
        report.push_str("### (a) Chain cost per connection, in-process\n\n");
        report.push_str(
            "`Chain::new` + hook arguments + `on-connect` + `on-close` per connection, reused \
             instances, a postgres-style connection (user `app`, database `orders`); ns per \
             connection on one thread, median of 7 batches (each at least `CHAIN_CONNS` \
             connections and ~100 ms); best batch = lowest CPU figure. CPU = the thread's on-CPU \
             time (schedstat), which other load inflates less than wall time (caches and, in a \
             VM, the host's cores are still shared). Two threads = two threads running the same chain at once (shared instance \
             lists and metrics).\n\n",
        );
        report.push_str(
            "| chain | CPU ns, 1 thread | best batch | wall ns, 1 thread | CPU ns, 2 threads | wall ns, 2 threads |\n\
             |---|---:|---:|---:|---:|---:|\n",
        );
        for r in &rows {
            report.push_str(&format!(
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
                r.label,
                r.one_thread.cpu_ns,
                r.one_thread.cpu_min_ns,
                r.one_thread.wall_ns,
                r.two_threads.cpu_ns,
                r.two_threads.wall_ns
            ));
        }
        report.push('\n');
    }

    if run("floor") {
        let rows = floor_bench();
        report.push_str("### (f) The runtime's floor: one call into a component export\n\n");
        report.push_str(
            "wasmtime's own cost per call on the host's engine (pooling allocator, epoch \
             interruption), no SDK and no host code; warm = median of 7 batches on one thread \
             (wall ns); the last row is the median of 2,000 single calls, each right after \
             touching 8 MiB of other memory. A hook is at least a `realloc` for its text, the \
             call and a `post-return`.\n\n| call | ns |\n|---|---:|\n",
        );
        for (label, ns) in &rows {
            report.push_str(&format!("| {label} | {ns:.0} |\n"));
        }
        report.push('\n');
    }

    if run("http") {
        let rows = http_bench(&dir);
        report.push_str(
            "### (d) HTTP hooks per request, in-process

",
        );
        report.push_str(
            "The chain of an `http` listener per request, as `http/hooks.rs` runs it: \
             `on-request` in order (two request fields), `on-response` in reverse (seven \
             response fields), for the plugins that use each hook; reused instances, one \
             thread; medians as in (a).\n\n",
        );
        report.push_str("| chain | CPU ns | best batch | wall ns |\n|---|---:|---:|---:|\n");
        for (label, c) in &rows {
            report.push_str(&format!(
                "| {label} | {:.0} | {:.0} | {:.0} |\n",
                c.cpu_ns, c.cpu_min_ns, c.wall_ns
            ));
        }
        report.push('\n');
    }

    if run("listener") || run("swap") || run("postgres") {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        // Blocking setup (initdb, pg_ctl), before the runtime's work starts.
        let pg = run("postgres").then(|| support::Postgres::start(support::PgOptions::default()));
        rt.block_on(async {
            let echo = echo_server().await;
            let amb = start_ambassador(&dir, echo, pg.as_ref().map(|p| p.addr())).await;
            let l = &amb.listeners;
            if run("listener") {
                let (n, rounds) = (env_usize("LISTENER_CONNS", 2000), env_usize("LISTENER_ROUNDS", 9));
                let targets = [
                    ("direct (no proxy)", echo),
                    ("wasmbassador, 0 plugins", l["p0"]),
                    ("wasmbassador, 1 plugin", l["p1"]),
                    ("wasmbassador, 3 plugins", l["p3"]),
                    ("wasmbassador, 3 × allow-all (the cheapest hooks)", l["a3"]),
                ];
                let rows = listener_bench(&amb, &targets, n, rounds, ping).await;
                report.push_str(&format!(
                    "### (b) New connections through a running wasmbassador (tcp listener, release build)\n\n\
                     {rounds} rounds × {n} connections per target, {} concurrent clients, rounds interleaved; \
                     each connection: connect, 8 bytes each way, close. Rate = median of rounds; \
                     vs 0 plugins = median of each round's rate over the 0-plugin rate of that round; \
                     CPU = on-CPU time of all wasmbassador threads per connection, median of rounds; \
                     latency = connect to close, over all rounds. Client, echo server and \
                     wasmbassador share the machine's cores.\n\n",
                    env_usize("CLIENTS", 4).max(1),
                ));
                listener_table(&mut report, &rows);
            }
            if let Some(pg) = &pg {
                let (n, rounds) = (env_usize("PG_CONNS", 300), env_usize("PG_ROUNDS", 7));
                let targets = [
                    ("direct (no proxy)", pg.addr()),
                    ("wasmbassador, 0 plugins", l["pg0"]),
                    ("wasmbassador, 1 plugin (allow-list: user, database, client)", l["pg1"]),
                    ("wasmbassador, 3 plugins (allow-list, route-by-database, access-log)", l["pg3"]),
                    ("wasmbassador, 3 × allow-all (the cheapest hooks)", l["pga3"]),
                ];
                let rows = listener_bench(&amb, &targets, n, rounds, pg_session).await;
                report.push_str(&format!(
                    "### (e) New connections through a postgres listener to PostgreSQL {} (release build)\n\n\
                     {rounds} rounds × {n} connections per target, {} concurrent clients, rounds interleaved; \
                     each connection: startup as `app` to `orders` (trust, no TLS), `SELECT 1`, Terminate, \
                     as `pgbench -C -S` does. Columns as in (b); the server forks a backend for every \
                     connection, which is most of each connection's time.\n\n",
                    pg.server_version_num() / 10000,
                    env_usize("CLIENTS", 4).max(1),
                ));
                listener_table(&mut report, &rows);
            }
            if run("swap") {
                let mut s = swap_bench(&amb, &dir).await;
                s.to_generation.sort();
                s.to_serving.sort();
                report.push_str(&format!(
                    "### (c) Hot swap latency ({} swaps, allow-all ⇄ deny-all, renamed into the watched folder)\n\n",
                    s.to_generation.len() + s.missed
                ));
                report.push_str("| from rename to | min ms | median ms | max ms |\n|---|---:|---:|---:|\n");
                for (label, v) in [
                    ("`/plugins` shows the new generation", &s.to_generation),
                    ("a new connection gets the new behaviour", &s.to_serving),
                ] {
                    report.push_str(&format!(
                        "| {label} | {} | {} | {} |\n",
                        ms(percentile(v, 0.0)),
                        ms(percentile(v, 0.5)),
                        ms(percentile(v, 1.0))
                    ));
                }
                if s.missed > 0 {
                    report.push_str(&format!("\n{} swap(s) not seen within {:?}.\n", s.missed, SWAP_TIME_BOUND));
                }
                report.push('\n');
            }
            drop(amb);
        });
    }
    println!("{report}");
}
