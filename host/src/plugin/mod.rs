//! WebAssembly plugins: compiled once, instantiated from a template, run with a
//! deadline and a memory cap, hot-swapped atomically.
//!
//! Instances are reused: a call takes an initialized instance of the plugin version
//! from a small idle list (or makes one and runs `init`), and puts it back after a
//! successful call. Each thread has its own list (by [`IDLE_SLOTS`]), so that
//! connection threads calling the same plugin do not contend for one lock. A trap, timeout or memory overrun throws the instance away. A
//! connection holds the versions it started with ([`chain::Chain`]), so a swap never
//! changes a connection midway.

mod bindings;
pub mod chain;
pub mod engine;
pub mod host;
pub mod load;
pub mod packed;
pub mod watch;

use std::cell::OnceCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;
use wasmtime::component::InstancePre;
use wasmtime::{Store, UpdateDeadline};

pub use bindings::{
    CloseInfo, ConnectInfo, Forward, Header, HeaderEdit, LocalResponse, Outcome, PostgresStartup, Protocol,
    RequestAction, RequestInfo, ResponseInfo, ResponseSource, RouteTarget, Verdict,
};
use bindings::{hooks, http_hooks, packed_hooks, packed_http_hooks};
use host::{HostState, PluginContext, PluginMetrics};
pub use load::LoadError;

use crate::config::{OnError, PluginConfig};
use crate::metrics::{DurationHistogram, Metrics, PluginHookLabels, PluginLabels, PluginResultLabels};

/// Idle lists per plugin version; a thread uses one of them (connection thread `i`
/// uses list `i % IDLE_SLOTS`).
const IDLE_SLOTS: usize = 8;
/// Initialized instances kept per idle list: a thread runs one call at a time, so a
/// few cover a reload racing a call.
const IDLE_PER_SLOT: usize = 4;

/// One idle list, on a cache line of its own.
#[derive(Default)]
#[repr(align(64))]
struct IdleSlot(Mutex<Vec<Warm>>);

/// The idle list of the calling thread.
fn idle_slot() -> usize {
    crate::metrics::thread_index() % IDLE_SLOTS
}

/// Why one hook call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HookError {
    /// The guest trapped (a Rust panic is a trap) or called a WASI function that is
    /// not granted.
    #[error("trap: {0}")]
    Trap(String),
    /// The call ran past `plugin.timeout`.
    #[error("timeout: no answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The guest tried to grow its memory past `plugin.memory`.
    #[error("memory limit of {0} bytes exceeded")]
    Memory(u64),
    /// A fresh instance could not be created or initialized.
    #[error("instance setup failed: {0}")]
    Setup(String),
}

impl HookError {
    /// A short word for the kind of failure (`trap`, `timeout`, `memory`, `setup`).
    pub fn kind(&self) -> &'static str {
        match self {
            HookError::Trap(_) => "trap",
            HookError::Timeout(_) => "timeout",
            HookError::Memory(_) => "memory",
            HookError::Setup(_) => "setup",
        }
    }
}

struct Warm {
    store: Store<HostState>,
    guests: Guests,
}

/// The exports of one instance.
struct Guests {
    hooks: hooks::Guest,
    /// Absent for a component of the `plugin` world.
    http: Option<http_hooks::Guest>,
    /// Absent for a component built before SDK 0.1.3.
    packed: Option<packed_hooks::Guest>,
    /// Absent for a component built before SDK 0.1.4.
    packed_http: Option<packed_http_hooks::Guest>,
}

/// The latency histogram of one hook of one plugin (whose `_count` is also the
/// `plugin_calls` counter), looked up once per loaded version: per call, a label
/// lookup (a `String` clone and two hashed family lookups) cost about as much as the
/// component call itself.
struct HookMetrics {
    duration: DurationHistogram,
}

impl HookMetrics {
    fn new(metrics: &Metrics, plugin: &str, hook: &'static str) -> Self {
        let labels = PluginHookLabels {
            plugin: plugin.to_string(),
            hook,
        };
        let duration = metrics.plugin_call_duration.get_or_create(&labels).clone();
        metrics.plugin_calls.get_or_create(&labels).follow(&duration);
        HookMetrics { duration }
    }
}

/// Counters that survive swaps: one set per plugin name. (Calls are not here: the
/// `plugin_call_duration` series of the plugin's name count them across versions.)
#[derive(Debug, Default)]
pub struct Stats {
    errors: AtomicU64,
    timeouts: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Stats {
    fn set_error(&self, e: String) {
        if let Ok(mut l) = self.last_error.lock() {
            *l = Some(e);
        }
    }
}

/// One loaded version of a plugin.
pub struct Loaded {
    /// Its config entry.
    pub config: PluginConfig,
    /// Hex SHA-256 of the file.
    pub sha256: String,
    /// 1 for the first version loaded under this name, then +1 per swap.
    pub generation: u64,
    /// When it was swapped in.
    pub loaded_at: SystemTime,
    pre: InstancePre<HostState>,
    hooks: hooks::GuestIndices,
    http_hooks: Option<http_hooks::GuestIndices>,
    packed_hooks: Option<packed_hooks::GuestIndices>,
    packed_http_hooks: Option<packed_http_hooks::GuestIndices>,
    ctx: Arc<PluginContext>,
    config_json: String,
    idle: [IdleSlot; IDLE_SLOTS],
    stats: Arc<Stats>,
    metrics: Arc<Metrics>,
    on_connect_metrics: HookMetrics,
    on_close_metrics: HookMetrics,
    on_request_metrics: HookMetrics,
    on_response_metrics: HookMetrics,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("name", &self.config.name)
            .field("generation", &self.generation)
            .field("sha256", &self.sha256)
            .finish()
    }
}

impl Loaded {
    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The failure policy.
    pub fn on_error(&self) -> OnError {
        self.config.on_error
    }

    /// Hook calls under this plugin's name, every version included.
    fn calls(&self) -> u64 {
        [
            &self.on_connect_metrics,
            &self.on_close_metrics,
            &self.on_request_metrics,
            &self.on_response_metrics,
        ]
        .iter()
        .map(|m| m.duration.count())
        .sum()
    }

    fn deadline_ticks(&self) -> u64 {
        // In u64: a u128 division is a library call, and this runs on every hook call.
        let micros = u64::try_from(self.config.timeout.as_micros()).unwrap_or(u64::MAX);
        let ticks = micros.div_ceil(engine::TICK.as_micros().max(1) as u64);
        // The current tick is already partly over: one more keeps the deadline at or
        // past the configured time.
        ticks.max(1) + 1
    }

    fn fresh(&self) -> Result<Warm, HookError> {
        let engine = engine::engine().map_err(HookError::Setup)?;
        let mut store = Store::new(engine, HostState::new(self.ctx.clone()));
        store.limiter(|s| &mut s.limiter);
        // The deadline counts the ticks in which the guest is seen running: a call that
        // is only preempted (a busy node, a CPU-throttled pod) sees the epoch move once
        // when it resumes, and is not timed out for time it did not run.
        store.epoch_deadline_callback(|mut cx| {
            let left = &mut cx.data_mut().ticks_left;
            *left = left.saturating_sub(1);
            Ok(if *left == 0 {
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::Continue(1)
            })
        });
        store.data_mut().ticks_left = self.deadline_ticks();
        store.set_epoch_deadline(1);
        let instance = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| self.classify(&store, e, "instantiate"))?;
        let guests = self
            .hooks
            .load(&mut store, &instance)
            .and_then(|hooks| {
                let http = match &self.http_hooks {
                    Some(h) => Some(h.load(&mut store, &instance)?),
                    None => None,
                };
                let packed = match &self.packed_hooks {
                    Some(h) => Some(h.load(&mut store, &instance)?),
                    None => None,
                };
                let packed_http = match &self.packed_http_hooks {
                    Some(h) => Some(h.load(&mut store, &instance)?),
                    None => None,
                };
                Ok(Guests {
                    hooks,
                    http,
                    packed,
                    packed_http,
                })
            })
            .map_err(|e| HookError::Setup(format!("{e:#}")))?;
        match guests.hooks.call_init(&mut store, &self.config_json) {
            Ok(Ok(())) => Ok(Warm { store, guests }),
            Ok(Err(reason)) => Err(HookError::Setup(format!("init returned an error: {reason}"))),
            Err(e) => Err(self.classify(&store, e, "init")),
        }
    }

    fn classify(&self, store: &Store<HostState>, e: wasmtime::Error, _what: &str) -> HookError {
        if store.data().limiter.hit {
            return HookError::Memory(self.config.memory);
        }
        if let Some(wasmtime::Trap::Interrupt) = e.downcast_ref::<wasmtime::Trap>() {
            return HookError::Timeout(self.config.timeout);
        }
        let text = format!("{e:#}");
        let what = text.lines().next().unwrap_or("").to_string();
        match &store.data().last_error_log {
            Some(logged) => HookError::Trap(format!("{logged} ({what})")),
            None => HookError::Trap(text.lines().take(3).collect::<Vec<_>>().join(" | ")),
        }
    }

    /// Runs one hook on an instance of this version, with the deadline and memory
    /// cap; counts, times and logs the outcome.
    fn call<R>(
        &self,
        hook: &'static str,
        metrics: &HookMetrics,
        f: impl FnOnce(&mut Store<HostState>, &Guests) -> wasmtime::Result<R>,
    ) -> Result<R, HookError> {
        let started = Instant::now();
        let idle = &self.idle[idle_slot()].0;
        let warm = idle.lock().ok().and_then(|mut v| v.pop());
        let result = match warm.map(Ok).unwrap_or_else(|| self.fresh()) {
            Err(e) => Err(e),
            Ok(mut w) => {
                w.store.data_mut().limiter.hit = false;
                w.store.data_mut().last_error_log = None;
                w.store.data_mut().ticks_left = self.deadline_ticks();
                w.store.set_epoch_deadline(1);
                match f(&mut w.store, &w.guests) {
                    Ok(r) => {
                        if let Ok(mut idle) = idle.lock()
                            && idle.len() < IDLE_PER_SLOT
                        {
                            idle.push(w);
                        }
                        Ok(r)
                    }
                    Err(e) => Err(self.classify(&w.store, e, hook)),
                }
            }
        };
        metrics.duration.observe(started.elapsed());
        if let Err(e) = &result {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            if matches!(e, HookError::Timeout(_)) {
                self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
            }
            self.metrics
                .plugin_failures
                .get_or_create(&PluginResultLabels {
                    plugin: self.config.name.clone(),
                    hook,
                    kind: e.kind(),
                })
                .inc();
            let text = format!("{hook}: {e}");
            tracing::warn!(plugin = %self.config.name, generation = self.generation, "plugin call failed: {text}");
            self.stats.set_error(text);
        }
        result
    }

    /// `on-connect`; `Err` means the call failed and the policy decides. `packed` is
    /// `info` packed for `packed-hooks`, made by the first plugin of the chain that
    /// exports them and reused by the others.
    pub fn on_connect(
        &self,
        info: &ConnectInfo,
        packed: &OnceCell<Option<packed::PackedConnect>>,
    ) -> Result<Verdict, HookError> {
        // A hook the plugin left at its default answers `allow` without a call.
        if self.ctx.unused[host::HOOK_ON_CONNECT].load(Ordering::Relaxed) {
            return Ok(Verdict::Allow);
        }
        let packed = match self.packed_hooks {
            Some(_) => packed.get_or_init(|| packed::connect(info)).as_ref(),
            None => None,
        };
        self.call("on_connect", &self.on_connect_metrics, |store, g| {
            match (&g.packed, packed) {
                (Some(h), Some(p)) => h.call_on_connect(store, &p.text, p.spans),
                _ => g.hooks.call_on_connect(store, info),
            }
        })
    }

    /// `on-close`; failures are counted and logged, nothing else. `packed` as for
    /// [`on_connect`](Loaded::on_connect).
    pub fn on_close(&self, info: &CloseInfo, packed: &OnceCell<Option<packed::PackedClose>>) {
        if self.ctx.unused[host::HOOK_ON_CLOSE].load(Ordering::Relaxed) {
            return;
        }
        let packed = match self.packed_hooks {
            Some(_) => packed.get_or_init(|| packed::close(info)).as_ref(),
            None => None,
        };
        let _ = self.call("on_close", &self.on_close_metrics, |store, g| {
            match (&g.packed, packed) {
                (Some(h), Some(p)) => h.call_on_close(store, &p.text, p.spans),
                _ => g.hooks.call_on_close(store, info),
            }
        });
    }

    /// Whether `on-request` is worth calling: the component has the http hooks, and
    /// the plugin did not leave it at its default.
    pub fn wants_requests(&self) -> bool {
        self.http_hooks.is_some() && !self.ctx.unused[host::HOOK_ON_REQUEST].load(Ordering::Relaxed)
    }

    /// `on-request`; `Err` means the call failed and the policy decides. Only for a
    /// plugin that [`wants_requests`](Loaded::wants_requests). `args` holds the
    /// argument in the forms made so far for `head`; this makes the one the plugin
    /// takes.
    pub fn on_request(
        &self,
        head: &packed::RequestHead,
        args: &mut packed::RequestArgs,
    ) -> Result<RequestAction, HookError> {
        let packed = match self.packed_http_hooks {
            Some(_) => args.packed(|| packed::request(head)),
            None => None,
        };
        if let Some(p) = packed {
            return self.call("on_request", &self.on_request_metrics, |store, g| {
                match &g.packed_http {
                    Some(h) => h.call_on_request(store, &p.bytes, p.spans),
                    None => Ok(forward_unchanged()),
                }
            });
        }
        let info = args.plain(|| packed::plain_request(head));
        self.call("on_request", &self.on_request_metrics, |store, g| match &g.http {
            Some(h) => h.call_on_request(store, info),
            None => Ok(forward_unchanged()),
        })
    }

    /// Whether `on-response` is worth calling (as [`wants_requests`](Loaded::wants_requests)).
    pub fn wants_responses(&self) -> bool {
        self.http_hooks.is_some() && !self.ctx.unused[host::HOOK_ON_RESPONSE].load(Ordering::Relaxed)
    }

    /// `on-response`: the header edits; a failure is counted and logged, and edits
    /// nothing. `args` as for [`on_request`](Loaded::on_request).
    pub fn on_response(
        &self,
        head: &packed::ResponseHead,
        args: &mut packed::ResponseArgs,
    ) -> Vec<HeaderEdit> {
        if !self.wants_responses() {
            return Vec::new();
        }
        let packed = match self.packed_http_hooks {
            Some(_) => args.packed(|| packed::response(head)),
            None => None,
        };
        let result = match packed {
            Some(p) => self.call("on_response", &self.on_response_metrics, |store, g| {
                match &g.packed_http {
                    Some(h) => h.call_on_response(store, &p.bytes, p.spans),
                    None => Ok(Vec::new()),
                }
            }),
            None => {
                let info = args.plain(|| packed::plain_response(head));
                self.call("on_response", &self.on_response_metrics, |store, g| {
                    match &g.http {
                        Some(h) => h.call_on_response(store, info),
                        None => Ok(Vec::new()),
                    }
                })
            }
        };
        result.unwrap_or_default()
    }
}

/// `addr` as the hooks get it (`127.0.0.1:50412`, `[::1]:50412`). An IPv4 address is
/// written digit by digit: through `core::fmt` it cost a tenth of a three-plugin
/// chain, once per connection.
pub fn addr_text(addr: std::net::SocketAddr) -> String {
    let std::net::SocketAddr::V4(v4) = addr else {
        return addr.to_string();
    };
    let mut out = String::with_capacity(21);
    let mut digits = itoa::Buffer::new();
    for (i, octet) in v4.ip().octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        out.push_str(digits.format(octet));
    }
    out.push(':');
    out.push_str(digits.format(v4.port()));
    out
}

/// What a plugin without the http hooks answers: go on, unchanged.
fn forward_unchanged() -> RequestAction {
    RequestAction::Forward(Forward {
        headers: Vec::new(),
        route: None,
        retryable: false,
    })
}

/// A plugin name's current version and its load history.
#[derive(Debug)]
pub struct Slot {
    /// The version new connections get.
    pub current: ArcSwap<Loaded>,
    stats: Arc<Stats>,
    generation: AtomicU64,
    swap_lock: Mutex<()>,
    /// Digest of the last file refused, so that unrelated events in the folder do
    /// not retry (and re-log) the same bad bytes.
    refused: Mutex<Option<String>>,
}

impl Slot {
    fn was_refused(&self, digest: &str) -> bool {
        self.refused
            .lock()
            .map(|r| r.as_deref() == Some(digest))
            .unwrap_or(false)
    }

    fn mark_refused(&self, digest: String) {
        if let Ok(mut r) = self.refused.lock() {
            *r = Some(digest);
        }
    }

    /// Loads a new version from `config` (blocking: compile and init) and swaps it
    /// in if every step passes; otherwise the current version stays and the error is
    /// recorded. `bytes` may be given when the caller already read the file.
    pub fn reload(&self, config: &PluginConfig, shared: &PluginShared) -> Result<Arc<Loaded>, LoadError> {
        let _one_at_a_time = self.swap_lock.lock();
        let generation = self.generation.load(Ordering::Relaxed) + 1;
        let result = build(config, generation, self.stats.clone(), shared);
        let label = |result| PluginLabels {
            plugin: config.name.clone(),
            result,
        };
        match result {
            Ok(loaded) => {
                let loaded = Arc::new(loaded);
                self.current.store(loaded.clone());
                chain::swapped();
                // Published last: `/plugins` reports this generation, and a client that
                // sees it must find every chain cache already out of date. Reported
                // from `current`, a version showed before the caches were told, and
                // a new connection could still get the old chain.
                self.generation.store(generation, Ordering::Release);
                shared
                    .metrics
                    .plugin_reloads
                    .get_or_create(&label("success"))
                    .inc();
                tracing::info!(
                    plugin = %config.name,
                    generation,
                    sha256 = %loaded.sha256,
                    "plugin version loaded"
                );
                Ok(loaded)
            }
            Err(e) => {
                shared
                    .metrics
                    .plugin_reloads
                    .get_or_create(&label("failure"))
                    .inc();
                tracing::error!(plugin = %config.name, step = e.step(), "plugin refused; the previous version keeps serving: {e}");
                // `/plugins` shows the failed step first, as the log's `step` field does.
                self.stats.set_error(format!("{}: {e}", e.step()));
                Err(e)
            }
        }
    }
}

/// What loading needs from the host.
#[derive(Debug, Clone)]
pub struct PluginShared {
    /// Host metrics.
    pub metrics: Arc<Metrics>,
    /// Plugin-defined metrics.
    pub plugin_metrics: Arc<PluginMetrics>,
}

fn build(
    config: &PluginConfig,
    generation: u64,
    stats: Arc<Stats>,
    shared: &PluginShared,
) -> Result<Loaded, LoadError> {
    let bytes = load::read(config)?;
    let compiled = load::compile(config, &bytes, generation, shared.plugin_metrics.clone())?;
    let config_json = serde_json::to_string(&config.config).unwrap_or_else(|_| "{}".into());
    let loaded = Loaded {
        config: config.clone(),
        sha256: compiled.sha256,
        generation,
        loaded_at: SystemTime::now(),
        pre: compiled.pre,
        hooks: compiled.hooks,
        http_hooks: compiled.http_hooks,
        packed_hooks: compiled.packed_hooks,
        packed_http_hooks: compiled.packed_http_hooks,
        ctx: compiled.ctx,
        config_json,
        idle: Default::default(),
        stats,
        metrics: shared.metrics.clone(),
        on_connect_metrics: HookMetrics::new(&shared.metrics, &config.name, "on_connect"),
        on_close_metrics: HookMetrics::new(&shared.metrics, &config.name, "on_close"),
        on_request_metrics: HookMetrics::new(&shared.metrics, &config.name, "on_request"),
        on_response_metrics: HookMetrics::new(&shared.metrics, &config.name, "on_response"),
    };
    // Instantiate and init once now: a plugin that cannot start is refused here,
    // not on the first connection.
    let warm = loaded.fresh().map_err(|e| LoadError::Init {
        name: config.name.clone(),
        path: config.path.clone(),
        reason: e.to_string(),
    })?;
    if let Ok(mut idle) = loaded.idle[idle_slot()].0.lock() {
        idle.push(warm);
    }
    Ok(loaded)
}

/// Loads a plugin into a new slot (blocking). With `previous` (the entry's config
/// changed on reload), the version counter and the call statistics carry on.
pub fn load_slot(
    config: &PluginConfig,
    shared: &PluginShared,
    previous: Option<&Slot>,
) -> Result<Arc<Slot>, LoadError> {
    let stats = previous.map(|p| p.stats.clone()).unwrap_or_default();
    let generation = previous
        .map(|p| p.generation.load(Ordering::Relaxed))
        .unwrap_or(0)
        + 1;
    let loaded = build(config, generation, stats.clone(), shared)?;
    tracing::info!(plugin = %config.name, generation, sha256 = %loaded.sha256, path = %config.path.display(), "plugin loaded");
    Ok(Arc::new(Slot {
        current: ArcSwap::from_pointee(loaded),
        stats,
        generation: AtomicU64::new(generation),
        swap_lock: Mutex::new(()),
        refused: Mutex::new(None),
    }))
}

/// Every configured plugin by name.
pub type PluginMap = HashMap<String, Arc<Slot>>;

/// `/plugins` entry.
#[derive(Debug, Serialize)]
pub struct PluginStatus {
    /// Configured name.
    pub name: String,
    /// The file.
    pub path: String,
    /// Digest of the version serving.
    pub sha256: String,
    /// When that version was loaded (RFC 3339).
    pub loaded_at: String,
    /// Version counter.
    pub generation: u64,
    /// Hook calls, all versions.
    pub calls: u64,
    /// Failed hook calls (traps, timeouts, memory overruns).
    pub errors: u64,
    /// Of which timeouts.
    pub timeouts: u64,
    /// The last failure: of a call, or of a reload that was refused.
    pub last_error: Option<String>,
}

/// Status of every plugin, sorted by name.
pub fn status(plugins: &PluginMap) -> Vec<PluginStatus> {
    let mut out: Vec<PluginStatus> = plugins
        .values()
        .map(|slot| {
            let cur = slot.current.load();
            let s = &slot.stats;
            PluginStatus {
                name: cur.config.name.clone(),
                path: cur.config.path.display().to_string(),
                sha256: cur.sha256.clone(),
                loaded_at: humantime::format_rfc3339_millis(cur.loaded_at).to_string(),
                generation: slot.generation.load(Ordering::Acquire),
                calls: cur.calls(),
                errors: s.errors.load(Ordering::Relaxed),
                timeouts: s.timeouts.load(Ordering::Relaxed),
                last_error: s.last_error.lock().ok().and_then(|l| l.clone()),
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[cfg(test)]
mod tests {
    use super::addr_text;

    #[test]
    fn client_addresses_read_as_their_display_form() {
        for text in [
            "127.0.0.1:50412",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.2.30.4:5432",
            "[::1]:9",
            "[fe80::1%2]:80",
        ] {
            let addr: std::net::SocketAddr = match text.parse() {
                Ok(a) => a,
                // A scope id does not parse on every platform; the others must.
                Err(_) if text.contains('%') => continue,
                Err(e) => panic!("{text}: {e}"),
            };
            assert_eq!(addr_text(addr), addr.to_string(), "{text}");
            assert_eq!(addr_text(addr), text);
        }
    }
}
