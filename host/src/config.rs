//! The TOML configuration: plain data with serde, plus validation that reports every
//! problem with its path and line.
//!
//! Loading happens in two passes so that one typo does not hide the next: the document
//! is first split into its `[admin]`, `[[listener]]`, `[[upstream]]` and `[[plugin]]`
//! tables (keeping each table's byte span), then every table is deserialized on its
//! own and checked, and all the problems found are returned together.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

/// A whole wasmbassador configuration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    /// The admin HTTP server and shutdown behaviour.
    pub admin: AdminConfig,
    /// Local ports, in file order.
    pub listeners: Vec<ListenerConfig>,
    /// Remote services, in file order.
    pub upstreams: Vec<UpstreamConfig>,
    /// WebAssembly plugins (loaded by the plugin runtime; accepted and checked here).
    pub plugins: Vec<PluginConfig>,
}

/// `[admin]`: the admin HTTP endpoint and drain timing.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin HTTP server; port 0 picks a free one.
    pub listen: SocketAddr,
    /// After SIGTERM, keep accepting new connections this long.
    #[serde(with = "duration")]
    pub drain_delay: Duration,
    /// Then wait this long for open connections before exiting.
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
    /// When true, `/ready` also requires every upstream to have a healthy endpoint.
    pub ready_requires_upstream: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9901)),
            drain_delay: Duration::ZERO,
            drain_timeout: Duration::from_secs(20),
            ready_requires_upstream: false,
        }
    }
}

/// How much a listener reads before it picks an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Raw bytes: nothing is read before connecting.
    #[default]
    Tcp,
    /// PostgreSQL: the SSLRequest and startup message are read first.
    Postgres,
    /// HTTP/1.1 and h2c from the application, one upstream request per request
    /// (see [`crate::http`]).
    Http,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Postgres => "postgres",
            Protocol::Http => "http",
        })
    }
}

/// `[[listener]]`: one local port.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Unique name, used in logs and metrics.
    pub name: String,
    /// Local address to accept on, such as `127.0.0.1:5432`.
    pub listen: String,
    /// `tcp`, `postgres` or `http`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Name of the `[[upstream]]` that receives the traffic.
    pub upstream: String,
    /// Plugin names, run in this order.
    #[serde(default)]
    pub plugins: Vec<String>,
    /// Beyond this many open connections, new ones are closed at once and counted.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Close a connection idle this long in both directions.
    #[serde(default, with = "opt_duration")]
    pub idle_timeout: Option<Duration>,
    /// `http` listeners only: how long one request may wait for the upstream's
    /// response head (connect and retries included) before the app gets a 504.
    /// Defaults to [`DEFAULT_REQUEST_TIMEOUT`].
    #[serde(default, with = "opt_duration")]
    pub request_timeout: Option<Duration>,
}

/// `listener.request_timeout` when left out.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The most `listener.max_connections` may be (far beyond what one process holds
/// open; the limit is a semaphore, which refuses more than `usize::MAX >> 3` permits).
pub const MAX_CONNECTIONS: usize = 1 << 24;

/// The most `plugin.timeout` may be.
pub const MAX_PLUGIN_TIMEOUT: Duration = Duration::from_secs(5);

fn default_max_connections() -> usize {
    10_000
}

impl ListenerConfig {
    /// The request timeout in force (`http` listeners).
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT)
    }

    /// The resolved local address. Validation guarantees this succeeds for a loaded config.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen.to_socket_addrs().ok()?.next()
    }
}

/// `[[upstream]]`: one remote service and its endpoints.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Unique name that listeners refer to.
    pub name: String,
    /// Timeout of one connect attempt (TCP and TLS handshake together).
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// Connect retries.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Active health checks.
    #[serde(default)]
    pub health: HealthConfig,
    /// Passive ejection after consecutive connect failures.
    #[serde(default)]
    pub eject: EjectConfig,
    /// TLS towards the upstream; absent means plain text.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// How `http` listeners talk to this upstream: protocol version, `Host`, pool.
    #[serde(default)]
    pub http: HttpUpstreamConfig,
    /// The endpoints, in any order (priority decides).
    #[serde(default)]
    pub endpoint: Vec<EndpointConfig>,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

/// `upstream.retry`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Total connect attempts for one client connection, across endpoints.
    pub attempts: u32,
    /// Base of the exponential backoff (with jitter, capped at 2 s).
    #[serde(with = "duration")]
    pub backoff: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            attempts: 3,
            backoff: Duration::from_millis(50),
        }
    }
}

/// Which HTTP version an `http` listener speaks to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HttpVersion {
    /// With TLS, offer `h2` and `http/1.1` by ALPN and use what the server picks;
    /// in plain text, HTTP/1.1.
    #[default]
    Auto,
    /// HTTP/1.1 only (ALPN `http/1.1`).
    Http1,
    /// HTTP/2 only: ALPN `h2` with TLS, prior knowledge (h2c) in plain text.
    Http2,
}

/// `upstream.http`: used by `http` listeners only.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpUpstreamConfig {
    /// `auto`, `http1` or `http2`.
    pub version: HttpVersion,
    /// `Host` / `:authority` sent upstream, as `name` or `name:port`; by default
    /// `tls.server_name`, else the first endpoint's host, with the first endpoint's
    /// port when it is not the scheme's default.
    pub host: Option<String>,
    /// Idle upstream connections kept per upstream (HTTP/2 multiplexes, so one is
    /// usually enough there).
    pub pool_max_idle: usize,
    /// An idle pooled connection is closed after this long.
    #[serde(with = "duration")]
    pub pool_idle_timeout: Duration,
    /// A pooled connection takes no new request once it is this old (so that DNS changes,
    /// rebalanced endpoints and rotated certificates take effect).
    #[serde(with = "duration")]
    pub max_lifetime: Duration,
    /// Retries of idempotent requests.
    pub retry: HttpRetryConfig,
}

/// `upstream.http.retry`: retries of GET, HEAD and OPTIONS requests without a body,
/// when the upstream resets the request, answers 502/503/504, or does not answer
/// within `per_try_timeout` — always before the app has seen any byte of a response.
/// Connect failures are retried by `upstream.retry` in any case.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpRetryConfig {
    /// Tries per request, the first included (1 = no retries).
    pub attempts: u32,
    /// Deadline of one try (response head); by default only `request_timeout`
    /// bounds the tries together.
    #[serde(with = "opt_duration")]
    pub per_try_timeout: Option<Duration>,
    /// Retries may add at most this percentage of the upstream's requests...
    pub budget_percent: f64,
    /// ...plus this many retries per second, so that a quiet upstream can still
    /// retry.
    pub min_retries_per_second: f64,
    /// A request that a plugin marked retryable may carry a body up to this size
    /// (`Content-Length` known in advance): it is read whole before the first try, so
    /// that it can be sent again. Larger bodies, or bodies of unknown length, stream and
    /// are never retried. 0 retries only requests without a body.
    #[serde(deserialize_with = "byte_size")]
    pub buffer_body: u64,
}

impl Default for HttpRetryConfig {
    fn default() -> Self {
        Self {
            attempts: 2,
            per_try_timeout: None,
            budget_percent: 20.0,
            min_retries_per_second: 10.0,
            buffer_body: 64 << 10,
        }
    }
}

impl Default for HttpUpstreamConfig {
    fn default() -> Self {
        Self {
            version: HttpVersion::Auto,
            host: None,
            pool_max_idle: 32,
            pool_idle_timeout: Duration::from_secs(90),
            max_lifetime: Duration::from_secs(600),
            retry: HttpRetryConfig::default(),
        }
    }
}

/// Which active health check an upstream uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheck {
    /// A TCP connect.
    #[default]
    Tcp,
    /// An SSLRequest probe: needs no credentials, proves a PostgreSQL server answers.
    Postgres,
    /// HTTP GET of `health.path` (over the upstream's TLS, HTTP/2 or HTTP/1.1 by
    /// ALPN), healthy on `health.expect` (any 2xx when not set).
    Http,
}

/// `upstream.health`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// The kind of probe.
    pub check: HealthCheck,
    /// Time between probes of one endpoint.
    #[serde(with = "duration")]
    pub interval: Duration,
    /// Timeout of one probe.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Consecutive failed probes before an endpoint is called unhealthy.
    pub unhealthy_after: u32,
    /// Consecutive good probes before an unhealthy endpoint is called healthy again.
    pub healthy_after: u32,
    /// `http` checks: the path (and query) to GET.
    pub path: String,
    /// `http` checks: the status that means healthy; any 2xx when not set.
    pub expect: Option<u16>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            check: HealthCheck::Tcp,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            unhealthy_after: 2,
            healthy_after: 2,
            path: "/".into(),
            expect: None,
        }
    }
}

/// `upstream.eject`: passive ejection.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EjectConfig {
    /// Consecutive connect failures that eject an endpoint.
    pub after: u32,
    /// How long an ejected endpoint is skipped.
    #[serde(rename = "for", with = "duration")]
    pub duration: Duration,
}

impl Default for EjectConfig {
    fn default() -> Self {
        Self {
            after: 5,
            duration: Duration::from_secs(10),
        }
    }
}

/// Where trusted root certificates come from when no `ca` file is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Roots {
    /// The Mozilla root program, compiled in (webpki-roots).
    Webpki,
    /// The operating system's store.
    System,
}

/// How TLS starts on a `postgres` listener's upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PostgresTls {
    /// Send an SSLRequest, expect `S`, then handshake (every PostgreSQL version).
    #[default]
    Sslrequest,
    /// Handshake at once with ALPN `postgresql` (PostgreSQL 17 and newer).
    Direct,
}

/// `upstream.tls`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM bundle of trusted CAs.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Built-in or system roots, when no `ca` is given.
    #[serde(default)]
    pub roots: Option<Roots>,
    /// SNI and the name verified; defaults to each endpoint's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Client certificate chain (PEM) for mTLS.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM) for mTLS.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// SSLRequest or direct TLS for postgres listeners.
    #[serde(default)]
    pub postgres: PostgresTls,
    /// Skip certificate verification; warned about at startup.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// `[[upstream.endpoint]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// `host:port`; host names are resolved at each connect attempt.
    pub address: String,
    /// Lower is preferred.
    #[serde(default)]
    pub priority: u32,
    /// Within one priority, new connections spread by weight.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Names a plugin can route to.
    #[serde(default)]
    pub tags: Vec<String>,
}

fn default_weight() -> u32 {
    1
}

/// What a plugin failure (trap, timeout, memory overrun) means for the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Refuse the connection.
    #[default]
    Deny,
    /// Carry on as if the plugin had no objection.
    Allow,
}

/// `[[plugin]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Unique name that listeners refer to.
    pub name: String,
    /// The `.wasm` file; its folder is watched.
    pub path: PathBuf,
    /// Policy on trap, timeout or memory overrun.
    #[serde(default)]
    pub on_error: OnError,
    /// Deadline of one hook call.
    #[serde(default = "default_plugin_timeout", with = "duration")]
    pub timeout: Duration,
    /// Linear memory cap.
    #[serde(default = "default_plugin_memory", deserialize_with = "byte_size")]
    pub memory: u64,
    /// Log lines the plugin may write per second; past it lines are dropped and
    /// counted (0: no limit).
    #[serde(default = "default_plugin_log_lines")]
    pub log_lines_per_second: u32,
    /// Pin: a file with another SHA-256 digest (hex) is refused.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Capabilities granted to the plugin.
    #[serde(default)]
    pub grants: Grants,
    /// Handed to the plugin's `init`.
    #[serde(default)]
    pub config: toml::Table,
}

fn default_plugin_timeout() -> Duration {
    Duration::from_millis(10)
}

fn default_plugin_log_lines() -> u32 {
    1000
}

fn default_plugin_memory() -> u64 {
    16 << 20
}

/// `plugin.grants`.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    /// Files the plugin may read through the host.
    #[serde(default)]
    pub files: Vec<PathBuf>,
}

/// One thing wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where, as a path such as `upstream "orders".retry.attempts`.
    pub path: String,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}: {}", self.path, self.message),
            None => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

/// A configuration that was refused, with every problem found.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    /// The file (or `<string>`) the text came from.
    pub source_name: String,
    /// Every problem, in file order where lines are known.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} problem{}",
            self.source_name,
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

/// The top level, with each table kept as raw TOML plus its span.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDocument {
    #[serde(default)]
    admin: Option<toml::Spanned<toml::Value>>,
    #[serde(default)]
    listener: Vec<toml::Spanned<toml::Value>>,
    #[serde(default)]
    upstream: Vec<toml::Spanned<toml::Value>>,
    #[serde(default)]
    plugin: Vec<toml::Spanned<toml::Value>>,
}

impl Config {
    /// Reads and validates a configuration file, including the TLS files it names
    /// (see [`Config::parse_and_check_files`]).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: name.clone(),
            problems: vec![Problem {
                path: "file".into(),
                line: None,
                message: format!("cannot read: {e}"),
            }],
        })?;
        Self::parse_and_check_files(&text, &name)
    }

    /// Parses and validates TOML text; `source_name` only labels errors. Touches no
    /// files: see [`Config::parse_and_check_files`].
    pub fn parse(text: &str, source_name: &str) -> Result<Config, ConfigError> {
        Self::parse_inner(text, source_name, false)
    }

    /// Like [`Config::parse`], and also reads every TLS certificate and key file the
    /// text names, reporting each unusable one with its path and line among the other
    /// problems. `validate`, `run` and reloads of a config file use this.
    pub fn parse_and_check_files(text: &str, source_name: &str) -> Result<Config, ConfigError> {
        Self::parse_inner(text, source_name, true)
    }

    fn parse_inner(text: &str, source_name: &str, check_files: bool) -> Result<Config, ConfigError> {
        let mut checker = Checker {
            text,
            problems: Vec::new(),
            check_files,
        };
        let config = checker.parse();
        if let Some(config) = &config {
            checker.validate(config);
        }
        let mut problems = checker.problems;
        match config {
            Some(config) if problems.is_empty() => Ok(config.0),
            _ => {
                problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
                Err(ConfigError {
                    source_name: source_name.to_string(),
                    problems,
                })
            }
        }
    }

    /// The upstream named `name`.
    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}

/// A parsed config plus the span of each of its tables, for validation messages.
struct Spanned {
    spans: BTreeMap<String, Range<usize>>,
}

struct Checker<'a> {
    text: &'a str,
    problems: Vec<Problem>,
    /// Whether TLS files are read and checked too.
    check_files: bool,
}

impl Checker<'_> {
    fn line_at(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .bytes()
            .filter(|b| *b == b'\n')
            .count()
            + 1
    }

    /// The line of `key = ` inside `span`, or the span's first line.
    fn line_of_key(&self, span: &Range<usize>, key: Option<&str>) -> usize {
        if let Some(key) = key {
            let body = &self.text[span.clone()];
            let mut search = 0;
            while let Some(found) = body[search..].find(key) {
                let at = search + found;
                let before = body[..at].chars().next_back();
                let after = body[at + key.len()..].trim_start();
                let starts_key = matches!(before, None | Some(' ' | '\t' | '\n' | '{' | ','));
                let quoted = matches!(before, Some('"')) && after.starts_with('"');
                if (starts_key && after.starts_with('=')) || quoted {
                    return self.line_at(span.start + at);
                }
                search = at + key.len();
            }
        }
        self.line_at(span.start)
    }

    fn problem(&mut self, path: String, line: Option<usize>, message: impl Into<String>) {
        self.problems.push(Problem {
            path,
            line,
            message: message.into(),
        });
    }

    /// Deserializes one table, recording the first problem inside it with its path.
    fn table<T: DeserializeOwned>(
        &mut self,
        label: &str,
        span: Range<usize>,
        value: toml::Value,
    ) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(t) => Some(t),
            Err(e) => {
                let inner = e.path().to_string();
                let message = e.into_inner().message().to_string();
                // serde names an unknown field in the message, not in the path.
                let key = unknown_field(&message)
                    .or_else(|| inner.rsplit('.').find(|s| !s.chars().all(|c| c.is_ascii_digit())))
                    .map(str::to_string);
                let path = if inner == "." || inner.is_empty() {
                    label.to_string()
                } else {
                    format!("{label}.{inner}")
                };
                let line = self.line_of_key(&span, key.as_deref());
                self.problem(path, Some(line), message);
                None
            }
        }
    }

    fn parse(&mut self) -> Option<(Config, Spanned)> {
        let raw: RawDocument = match toml::from_str(self.text) {
            Ok(raw) => raw,
            Err(e) => {
                let line = e.span().map(|s| self.line_at(s.start));
                self.problem("document".into(), line, e.message().trim().to_string());
                return None;
            }
        };
        let mut spans = BTreeMap::new();
        let mut ok = true;
        if let Some(v) = &raw.admin {
            spans.insert("admin".to_string(), v.span());
        }
        let mut tables = |kind: &str, items: Vec<toml::Spanned<toml::Value>>| {
            let mut out = Vec::new();
            for (i, v) in items.into_iter().enumerate() {
                let label = entry_label(kind, i, &v);
                spans.insert(label.clone(), v.span());
                out.push((label, v));
            }
            out
        };
        let listener_raw = tables("listener", raw.listener);
        let upstream_raw = tables("upstream", raw.upstream);
        let plugin_raw = tables("plugin", raw.plugin);
        // toml gives a table's header as its span; a table's keys run until the next
        // top-level table starts, so widen each span to that.
        let mut starts: Vec<usize> = spans.values().map(|s| s.start).collect();
        starts.sort_unstable();
        let end = self.text.len();
        for span in spans.values_mut() {
            span.end = starts.iter().copied().find(|s| *s > span.start).unwrap_or(end);
        }
        let widen =
            |items: Vec<(String, toml::Spanned<toml::Value>)>| -> Vec<(String, Range<usize>, toml::Value)> {
                items
                    .into_iter()
                    .map(|(label, v)| {
                        let span = spans.get(&label).cloned().unwrap_or_else(|| v.span());
                        (label, span, v.into_inner())
                    })
                    .collect()
            };
        // [admin] is read only now, with its widened span, so that its problems
        // carry the line of the key rather than the line of the header.
        let admin = match raw.admin {
            Some(v) => {
                let span = spans.get("admin").cloned().unwrap_or_else(|| v.span());
                self.table::<AdminConfig>("admin", span, v.into_inner())
            }
            None => Some(AdminConfig::default()),
        };
        ok &= admin.is_some();
        let listener_raw = widen(listener_raw);
        let upstream_raw = widen(upstream_raw);
        let plugin_raw = widen(plugin_raw);
        let mut listeners = Vec::new();
        for (label, span, v) in listener_raw {
            match self.table::<ListenerConfig>(&label, span, v) {
                Some(l) => listeners.push(l),
                None => ok = false,
            }
        }
        let mut upstreams = Vec::new();
        for (label, span, v) in upstream_raw {
            match self.table::<UpstreamConfig>(&label, span, v) {
                Some(u) => upstreams.push(u),
                None => ok = false,
            }
        }
        let mut plugins = Vec::new();
        for (label, span, v) in plugin_raw {
            match self.table::<PluginConfig>(&label, span, v) {
                Some(p) => plugins.push(p),
                None => ok = false,
            }
        }
        let config = Config {
            admin: admin.unwrap_or_default(),
            listeners,
            upstreams,
            plugins,
        };
        // Cross-references are still checked when some table failed to parse, so
        // that the user sees as much as possible in one run.
        let spanned = Spanned { spans };
        if !ok {
            self.validate(&(config, spanned));
            return None;
        }
        Some((config, spanned))
    }

    fn at(&self, doc: &Spanned, label: &str, key: Option<&str>) -> Option<usize> {
        let key = key.and_then(|k| k.rsplit('.').next());
        doc.spans.get(label).map(|s| self.line_of_key(s, key))
    }

    fn validate(&mut self, (config, doc): &(Config, Spanned)) {
        let check_files = self.check_files;
        let mut problems = Vec::new();
        let mut report = |label: &str, key: Option<&str>, message: String| {
            let path = match key {
                Some(k) => format!("{label}.{k}"),
                None => label.to_string(),
            };
            problems.push((label.to_string(), key.map(str::to_string), path, message));
        };

        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        let upstream_names: HashSet<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
        let plugin_names: HashSet<&str> = config.plugins.iter().map(|p| p.name.as_str()).collect();
        for l in &config.listeners {
            let label = format!("listener {:?}", l.name);
            if !names.insert(l.name.as_str()) {
                report(&label, Some("name"), "duplicate listener name".into());
            }
            match l.listen_addr() {
                Some(a) => {
                    // Port 0 picks a free port per listener, so it may repeat.
                    if a.port() != 0 && !addrs.insert(a) {
                        report(&label, Some("listen"), format!("{a} is used by another listener"));
                    }
                }
                None => report(
                    &label,
                    Some("listen"),
                    format!("{:?} is not a host:port address", l.listen),
                ),
            }
            if !upstream_names.contains(l.upstream.as_str()) {
                report(
                    &label,
                    Some("upstream"),
                    format!("no [[upstream]] is named {:?}", l.upstream),
                );
            }
            if l.protocol == Protocol::Http {
                if l.request_timeout.is_some_and(|d| d.is_zero()) {
                    report(&label, Some("request_timeout"), "must be more than 0s".into());
                }
            } else if l.request_timeout.is_some() {
                report(
                    &label,
                    Some("request_timeout"),
                    format!(
                        "only \"http\" listeners have requests; this one is {:?}",
                        l.protocol.to_string()
                    ),
                );
            }
            if l.max_connections == 0 || l.max_connections > MAX_CONNECTIONS {
                report(
                    &label,
                    Some("max_connections"),
                    format!("must be between 1 and {MAX_CONNECTIONS}"),
                );
            }
            for p in &l.plugins {
                if !plugin_names.contains(p.as_str()) {
                    report(&label, Some("plugins"), format!("no [[plugin]] is named {p:?}"));
                }
            }
        }
        let mut names = HashSet::new();
        for u in &config.upstreams {
            let label = format!("upstream {:?}", u.name);
            if !names.insert(u.name.as_str()) {
                report(&label, Some("name"), "duplicate upstream name".into());
            }
            if u.endpoint.is_empty() {
                report(&label, None, "needs at least one [[upstream.endpoint]]".into());
            }
            if u.retry.attempts == 0 {
                report(&label, Some("retry.attempts"), "must be at least 1".into());
            }
            if u.connect_timeout.is_zero() {
                report(&label, Some("connect_timeout"), "must be more than 0s".into());
            }
            if u.health.interval.is_zero() || u.health.timeout.is_zero() {
                report(
                    &label,
                    Some("health"),
                    "health.interval and health.timeout must be more than 0s".into(),
                );
            }
            if u.health.unhealthy_after == 0 || u.health.healthy_after == 0 {
                report(
                    &label,
                    Some("health"),
                    "health.unhealthy_after and healthy_after must be at least 1".into(),
                );
            }
            if u.health.check == HealthCheck::Http {
                if !u.health.path.starts_with('/') || u.health.path.parse::<http::Uri>().is_err() {
                    report(
                        &label,
                        Some("health.path"),
                        format!(
                            "{:?} is not a request path; write it like \"/healthz\"",
                            u.health.path
                        ),
                    );
                }
                if let Some(code) = u.health.expect
                    && !(100..=599).contains(&code)
                {
                    report(
                        &label,
                        Some("health.expect"),
                        format!("{code} is not an HTTP status (100 to 599)"),
                    );
                }
            } else if u.health.path != "/" || u.health.expect.is_some() {
                report(
                    &label,
                    Some("health.path"),
                    "health.path and health.expect apply to check = \"http\" only".into(),
                );
            }
            let h = &u.http;
            if h.pool_idle_timeout.is_zero() {
                report(
                    &label,
                    Some("http.pool_idle_timeout"),
                    "must be more than 0s".into(),
                );
            }
            if h.max_lifetime.is_zero() {
                report(&label, Some("http.max_lifetime"), "must be more than 0s".into());
            }
            if h.retry.attempts == 0 || h.retry.attempts > 10 {
                report(
                    &label,
                    Some("http.retry.attempts"),
                    "must be between 1 and 10".into(),
                );
            }
            if h.retry.per_try_timeout.is_some_and(|d| d.is_zero()) {
                report(
                    &label,
                    Some("http.retry.per_try_timeout"),
                    "must be more than 0s".into(),
                );
            }
            if !(0.0..=100.0).contains(&h.retry.budget_percent) {
                report(
                    &label,
                    Some("http.retry.budget_percent"),
                    "must be between 0 and 100".into(),
                );
            }
            if !(0.0..=10_000.0).contains(&h.retry.min_retries_per_second) {
                report(
                    &label,
                    Some("http.retry.min_retries_per_second"),
                    "must be between 0 and 10000".into(),
                );
            }
            if h.retry.buffer_body > 16 << 20 {
                report(
                    &label,
                    Some("http.retry.buffer_body"),
                    "must be at most 16MiB (each buffered body is held in memory for its tries)".into(),
                );
            }
            if let Some(host) = &h.host
                && (host.parse::<http::uri::Authority>().is_err() || host.contains('@'))
            {
                report(
                    &label,
                    Some("http.host"),
                    format!("{host:?} is not a host name or host:port"),
                );
            }
            if u.eject.after == 0 {
                report(&label, Some("eject.after"), "must be at least 1".into());
            }
            if let Some(tls) = &u.tls {
                if tls.ca.is_none() && tls.roots.is_none() && !tls.insecure_skip_verify {
                    report(
                        &label,
                        Some("tls"),
                        "tls needs `ca = \"file.pem\"` or `roots = \"webpki\"` / `\"system\"` (or insecure_skip_verify = true, written out)".into(),
                    );
                }
                if tls.client_cert.is_some() != tls.client_key.is_some() {
                    report(
                        &label,
                        Some("tls"),
                        "tls.client_cert and tls.client_key go together".into(),
                    );
                }
                if check_files {
                    for (key, message) in crate::tls::file_problems(tls) {
                        report(&label, Some(key), message);
                    }
                }
                if let Some(sn) = &tls.server_name
                    && rustls_pki_types::ServerName::try_from(sn.as_str()).is_err()
                {
                    report(
                        &label,
                        Some("tls.server_name"),
                        format!("{sn:?} is not a valid DNS name or IP address"),
                    );
                }
            }
            for (i, e) in u.endpoint.iter().enumerate() {
                if split_host_port(&e.address).is_none() {
                    report(
                        &label,
                        Some("endpoint.address"),
                        format!("endpoint[{i}] address {:?} is not host:port", e.address),
                    );
                }
                if e.weight == 0 {
                    report(
                        &label,
                        Some("endpoint.weight"),
                        format!("endpoint[{i}] weight must be at least 1"),
                    );
                }
            }
        }
        let mut names = HashSet::new();
        for p in &config.plugins {
            let label = format!("plugin {:?}", p.name);
            if !names.insert(p.name.as_str()) {
                report(&label, Some("name"), "duplicate plugin name".into());
            }
            if let Some(d) = &p.sha256
                && (d.len() != 64 || !d.chars().all(|c| c.is_ascii_hexdigit()))
            {
                report(&label, Some("sha256"), "must be 64 hex digits".into());
            }
            if p.timeout.is_zero() || p.timeout > MAX_PLUGIN_TIMEOUT {
                report(
                    &label,
                    Some("timeout"),
                    "must be more than 0s and at most 5s: a hook call holds up the other connections of its connection thread".into(),
                );
            }
            if p.memory < (1 << 20) || p.memory > crate::plugin::engine::MAX_PLUGIN_MEMORY {
                report(&label, Some("memory"), "must be between 1MiB and 1GiB".into());
            }
        }
        for (label, key, path, message) in problems {
            let line = self.at(doc, &label, key.as_deref());
            self.problem(path, line, message);
        }
    }
}

fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

fn entry_label(kind: &str, index: usize, value: &toml::Spanned<toml::Value>) -> String {
    match value.get_ref().get("name").and_then(|n| n.as_str()) {
        Some(name) => format!("{kind} {name:?}"),
        None => format!("{kind}[{index}]"),
    }
}

/// Splits `host:port` (or `[v6]:port`) into its parts.
pub fn split_host_port(address: &str) -> Option<(&str, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    Some((host, port))
}

/// Parses sizes such as `16MiB`, `512KiB`, `1GiB` or a plain number of bytes.
///
/// Written by hand: five units do not justify a dependency.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size like \"16MiB\""))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?} (use B, KiB, MiB, GiB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Int(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Int(n) => Ok(n),
        Size::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

/// The longest duration any key takes. Deadlines are `Instant + Duration`, which
/// overflows (a panic) for durations of centuries; nothing here needs more than a year.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

fn parse_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Err(e) => Err(format!("{s:?} is not a duration like \"250ms\" or \"5s\": {e}")),
        Ok(d) if d > MAX_DURATION => Err(format!(
            "{s:?} is longer than the most a duration may be (365 days)"
        )),
        Ok(d) => Ok(d),
    }
}

mod duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

mod opt_duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESIGN_EXAMPLE: &str = include_str!("../../examples/design-example.toml");

    #[test]
    fn design_example_loads_with_its_meaning() {
        let c = Config::parse(DESIGN_EXAMPLE, "example").expect("the design example must load");
        assert_eq!(c.admin.listen, "127.0.0.1:9901".parse().expect("addr"));
        assert_eq!(c.admin.drain_timeout, Duration::from_secs(20));
        let l = &c.listeners[0];
        assert_eq!(l.protocol, Protocol::Postgres);
        assert_eq!(l.plugins, vec!["allow-app", "access-log"]);
        assert_eq!(l.max_connections, 10_000);
        let u = &c.upstreams[0];
        assert_eq!(u.connect_timeout, Duration::from_secs(2));
        assert_eq!(u.retry.attempts, 3);
        assert_eq!(u.health.check, HealthCheck::Postgres);
        assert_eq!(u.health.interval, Duration::from_secs(2));
        assert_eq!(u.health.timeout, Duration::from_secs(1));
        let tls = u.tls.as_ref().expect("tls");
        assert_eq!(tls.server_name.as_deref(), Some("orders.db.internal"));
        assert!(!tls.insecure_skip_verify);
        assert_eq!(u.endpoint[0].priority, 0);
        assert_eq!(u.endpoint[1].priority, 1);
        assert_eq!(u.endpoint[1].weight, 1);
        assert_eq!(c.plugins[0].timeout, Duration::from_millis(5));
        assert_eq!(c.plugins[0].memory, 16 << 20);
        assert_eq!(c.plugins[1].on_error, OnError::Allow);
        assert_eq!(c.plugins[1].timeout, Duration::from_millis(10));
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let text = r#"
[[listener]]
name = "a"
listen = "127.0.0.1:5432"
upstream = "nope"
lisen = "x"

[[listener]]
name = "b"
listen = "127.0.0.1:5433"
upstream = "u"
idle_timeout = "forever"

[[upstream]]
name = "u"
retry = { attempts = 0 }
tls = { server_name = "x" }
  [[upstream.endpoint]]
  address = "no-port"
"#;
        let e = Config::parse(text, "t.toml").expect_err("must be refused");
        let shown = e.to_string();
        assert!(
            shown.contains("line 6: listener \"a\".lisen: unknown field `lisen`"),
            "{shown}"
        );
        assert!(shown.contains("line 12: listener \"b\".idle_timeout:"), "{shown}");
        assert!(
            shown.contains("line 16: upstream \"u\".retry.attempts: must be at least 1"),
            "{shown}"
        );
        assert!(
            shown.contains("line 17: upstream \"u\".tls: tls needs `ca"),
            "{shown}"
        );
        assert!(
            shown.contains("line 19: upstream \"u\".endpoint.address"),
            "{shown}"
        );
        assert_eq!(e.problems.len(), 5, "{shown}");
    }

    #[test]
    fn values_past_what_the_process_can_hold_are_refused_with_their_line() {
        let text = r#"
[[listener]]
name = "a"
listen = "127.0.0.1:5432"
upstream = "u"
max_connections = 9223372036854775807
plugins = ["p"]

[[listener]]
name = "b"
listen = "127.0.0.1:5433"
upstream = "u"
idle_timeout = "500years"

[[upstream]]
name = "u"
eject = { for = "100000days" }
  [[upstream.endpoint]]
  address = "127.0.0.1:1"

[[plugin]]
name = "p"
path = "p.wasm"
timeout = "6s"
"#;
        let shown = Config::parse(text, "t.toml")
            .expect_err("must be refused")
            .to_string();
        for want in [
            "line 6: listener \"a\".max_connections: must be between 1 and 16777216",
            "line 13: listener \"b\".idle_timeout: \"500years\" is longer than the most a duration may be",
            "line 17: upstream \"u\".eject.for: \"100000days\" is longer",
            "line 24: plugin \"p\".timeout: must be more than 0s and at most 5s",
        ] {
            assert!(shown.contains(want), "{want:?} missing from:\n{shown}");
        }
    }

    #[test]
    fn http_health_settings_are_checked() {
        let config = |health: &str| {
            format!(
                "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:1\"\nupstream = \"u\"\n\
                 [[upstream]]\nname = \"u\"\nhealth = {health}\n  [[upstream.endpoint]]\n  address = \"127.0.0.1:2\"\n"
            )
        };
        let ok = Config::parse(
            &config(r#"{ check = "http", path = "/healthz?full=1", expect = 204 }"#),
            "t",
        )
        .expect("a good http check");
        assert_eq!(ok.upstreams[0].health.path, "/healthz?full=1");
        assert_eq!(ok.upstreams[0].health.expect, Some(204));
        for (health, want) in [
            (
                r#"{ check = "http", path = "healthz" }"#,
                "health.path: \"healthz\" is not a request path",
            ),
            (
                r#"{ check = "http", expect = 700 }"#,
                "health.expect: 700 is not an HTTP status",
            ),
            (
                r#"{ check = "tcp", path = "/healthz" }"#,
                "apply to check = \"http\" only",
            ),
        ] {
            let shown = Config::parse(&config(health), "t").expect_err(health).to_string();
            assert!(shown.contains(want), "{health}: {shown}");
        }
    }

    #[test]
    fn http_settings_are_checked() {
        let text = r#"
[[listener]]
name = "api"
listen = "127.0.0.1:8080"
protocol = "http"
upstream = "u"
request_timeout = "0s"

[[listener]]
name = "raw"
listen = "127.0.0.1:8081"
upstream = "u"
request_timeout = "5s"

[[upstream]]
name = "u"
http = { version = "http3", pool_idle_timeout = "0s" }
  [[upstream.endpoint]]
  address = "api.example.com:443"
"#;
        let e = Config::parse(text, "t.toml").expect_err("must be refused");
        let shown = e.to_string();
        assert!(
            shown.contains("line 7: listener \"api\".request_timeout: must be more than 0s"),
            "{shown}"
        );
        assert!(
            shown.contains("line 13: listener \"raw\".request_timeout: only \"http\" listeners"),
            "{shown}"
        );
        assert!(shown.contains("upstream \"u\".http"), "{shown}");

        let good = r#"
[[listener]]
name = "api"
listen = "127.0.0.1:8080"
protocol = "http"
upstream = "u"

[[upstream]]
name = "u"
tls = { roots = "webpki" }
http = { host = "api.example.com", max_lifetime = "1m" }
  [[upstream.endpoint]]
  address = "api.example.com:443"
"#;
        let c = Config::parse(good, "t.toml").expect("valid");
        assert_eq!(c.listeners[0].request_timeout(), DEFAULT_REQUEST_TIMEOUT);
        let h = &c.upstreams[0].http;
        assert_eq!(h.version, HttpVersion::Auto);
        assert_eq!(h.pool_max_idle, 32);
        assert_eq!(h.max_lifetime, Duration::from_secs(60));
        assert_eq!(h.host.as_deref(), Some("api.example.com"));
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = Config::parse("[admin]\nlisten = \n", "t").expect_err("bad");
        assert_eq!(e.problems[0].line, Some(2), "{e}");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("16 parsecs").is_err());
    }
}
