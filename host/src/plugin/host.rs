//! What a plugin instance can reach: the `host` interface of the WIT world (logs,
//! metrics, a monotonic clock, granted files) and the memory limiter. Nothing else
//! is linked; see `load.rs` for the WASI imports Rust's std brings along.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use rustc_hash::FxHashMap;

use super::bindings::Level;
use super::bindings::wasmbassador::plugin::{host, http_types, types};
use crate::metrics::{ShardedCounter, ValueHistogram};

/// Longest log line kept; the rest is cut.
const MAX_LOG_LINE: usize = 4096;
/// Distinct label-value sets per plugin metric.
const MAX_SERIES: usize = 1000;
/// Bounds on what a plugin may declare, so that its metrics (kept for the life of the
/// process) cannot grow without end: metrics per plugin name, labels per metric,
/// buckets per histogram, and the length of a name, a label value and a help text.
const MAX_METRICS_PER_PLUGIN: usize = 64;
const MAX_LABELS: usize = 8;
const MAX_BUCKETS: usize = 64;
const MAX_NAME: usize = 128;
const MAX_LABEL_VALUE: usize = 256;
const MAX_HELP: usize = 1024;
/// Names of the host's own `wasmbassador_plugin_*` metrics, which plugins may not reuse.
const RESERVED: [&str; 6] = [
    "calls",
    "failures",
    "call_duration_seconds",
    "reloads",
    "denials",
    "metric_records_dropped",
];

/// What every instance of one plugin version shares.
#[derive(Debug)]
pub struct PluginContext {
    /// The configured name.
    pub name: String,
    /// Version counter of this plugin name (1 for the first load).
    pub generation: u64,
    /// Files the plugin may read, exactly as granted.
    pub grants: Vec<PathBuf>,
    /// Linear memory cap in bytes.
    pub memory: u64,
    /// Plugin-defined metrics of the whole process.
    pub metrics: Arc<PluginMetrics>,
    /// `plugin.log_lines_per_second` (0: no limit).
    log_limit: u32,
    /// The log rate window: the second it counts (of [`super::engine::coarse_ms`]) in
    /// the high half, the lines written in it in the low half; one atomic word, so
    /// that logging threads take no lock and read no clock.
    log_window: AtomicU64,
    /// Lines dropped since the last report.
    log_dropped: AtomicU64,
    /// Hooks this version declared it leaves at their default (`hook-unused`,
    /// `http-hook-unused`), by [`HOOK_ON_CONNECT`] and the other indices: the host skips
    /// calling them.
    pub unused: [AtomicBool; 4],
}

/// Index of `on-connect` in [`PluginContext::unused`].
pub const HOOK_ON_CONNECT: usize = 0;
/// Index of `on-close` in [`PluginContext::unused`].
pub const HOOK_ON_CLOSE: usize = 1;
/// Index of `on-request` in [`PluginContext::unused`].
pub const HOOK_ON_REQUEST: usize = 2;
/// Index of `on-response` in [`PluginContext::unused`].
pub const HOOK_ON_RESPONSE: usize = 3;

impl PluginContext {
    /// A context for one loaded version.
    pub fn new(
        name: &str,
        generation: u64,
        grants: Vec<PathBuf>,
        memory: u64,
        log_limit: u32,
        metrics: Arc<PluginMetrics>,
    ) -> Self {
        Self {
            name: name.to_string(),
            generation,
            grants,
            memory,
            metrics,
            log_limit,
            log_window: AtomicU64::new(0),
            log_dropped: AtomicU64::new(0),
            unused: Default::default(),
        }
    }
}

/// Refuses linear-memory growth past the plugin's cap and remembers that it did, so
/// that the resulting trap is reported as a memory overrun.
#[derive(Debug)]
pub struct MemoryLimiter {
    cap: usize,
    /// Set when a growth was refused during the current call.
    pub hit: bool,
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.cap {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// The store data of one plugin instance.
#[derive(Debug)]
pub struct HostState {
    /// Shared by every instance of this plugin version.
    pub ctx: Arc<PluginContext>,
    /// The memory cap.
    pub limiter: MemoryLimiter,
    /// The last error-level line the instance logged (a Rust panic message arrives
    /// this way just before the trap), to explain the trap in `/plugins`.
    pub last_error_log: Option<String>,
    /// Epoch ticks the current call may still be seen running (the per-call deadline).
    pub ticks_left: u64,
    /// Series this instance recorded into before, by metric name and label values. A
    /// plugin records into the same few series on every call; a hit skips the shared
    /// metric map, building the full label list, and the family's own lookup.
    series: FxHashMap<(String, Vec<String>), Series>,
    /// The series handed out by number (`host.series`), in order.
    ids: Vec<Series>,
}

/// Most series numbers one instance may hold (`host.series`); past it the plugin
/// records by name.
const MAX_SERIES_IDS: usize = 1024;

/// Most series one instance keeps in [`HostState::series`]; past it the cache starts
/// over (the shared metric map still has every series).
const CACHED_SERIES: usize = 256;

/// One series of a plugin metric.
#[derive(Debug, Clone)]
enum Series {
    Counter(ShardedCounter),
    Histogram(ValueHistogram),
}

impl HostState {
    /// State for a new instance.
    pub fn new(ctx: Arc<PluginContext>) -> Self {
        let cap = ctx.memory as usize;
        Self {
            ctx,
            limiter: MemoryLimiter { cap, hit: false },
            last_error_log: None,
            ticks_left: 0,
            series: FxHashMap::default(),
            ids: Vec::new(),
        }
    }
}

fn epoch() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

impl types::Host for HostState {}

impl http_types::Host for HostState {}

impl PluginContext {
    /// Whether one more log line fits in this second's window; counts and, once per
    /// window, reports the lines dropped.
    fn log_allowed(&self) -> bool {
        self.log_allowed_at(super::engine::coarse_ms() / 1000)
    }

    fn log_allowed_at(&self, second: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if self.log_limit == 0 {
            return true;
        }
        let mut new_window = false;
        let fits = self
            .log_window
            .fetch_update(Relaxed, Relaxed, |w| {
                new_window = w >> 32 != second;
                match (new_window, w & u64::from(u32::MAX)) {
                    (true, _) => Some(second << 32 | 1),
                    (false, n) if n < u64::from(self.log_limit) => Some(w + 1),
                    (false, _) => None,
                }
            })
            .is_ok();
        if !fits {
            self.log_dropped.fetch_add(1, Relaxed);
        } else if new_window {
            let dropped = self.log_dropped.swap(0, Relaxed);
            if dropped > 0 {
                tracing::warn!(plugin = %self.name, dropped, limit = self.log_limit, "plugin log lines dropped (plugin.log_lines_per_second)");
            }
        }
        fits
    }
}

impl HostState {
    fn record(&mut self, name: String, values: Vec<String>, what: Record) {
        let key = (name, values);
        if let Some(series) = self.series.get(&key) {
            match (series, what) {
                (Series::Counter(c), Record::Add(n)) => {
                    c.inc_by(n);
                    return;
                }
                (Series::Histogram(h), Record::Observe(v)) => {
                    h.observe(v);
                    return;
                }
                // A counter record for a histogram or the other way round: the shared
                // map counts it as dropped (and is not cached).
                _ => {}
            }
        }
        let (name, values) = key;
        if let Some(series) = self.ctx.metrics.record(&self.ctx, &name, values.clone(), what) {
            if self.series.len() >= CACHED_SERIES {
                self.series.clear();
            }
            self.series.insert((name, values), series);
        }
    }

    fn mark_unused(&self, index: usize) {
        // Every instance of the version says the same; the first one decides.
        if !self.ctx.unused[index].swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::debug!(plugin = %self.ctx.name, generation = self.ctx.generation, hook = index, "plugin leaves this hook at its default; no longer called");
        }
    }
}

impl host::Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        if !self.ctx.log_allowed() {
            return;
        }
        let mut message = message;
        if message.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        if matches!(level, Level::Error) {
            self.last_error_log = Some(message.chars().take(300).collect());
        }
        let name = self.ctx.name.as_str();
        match level {
            Level::Trace => tracing::trace!(target: "plugin", plugin = name, "{message}"),
            Level::Debug => tracing::debug!(target: "plugin", plugin = name, "{message}"),
            Level::Info => tracing::info!(target: "plugin", plugin = name, "{message}"),
            Level::Warn => tracing::warn!(target: "plugin", plugin = name, "{message}"),
            Level::Error => tracing::error!(target: "plugin", plugin = name, "{message}"),
        }
    }

    fn define_counter(&mut self, name: String, help: String, label_names: Vec<String>) -> Result<(), String> {
        self.ctx
            .metrics
            .define(&self.ctx, &name, &help, &label_names, None)
    }

    fn counter_add(&mut self, name: String, label_values: Vec<String>, value: u64) {
        self.record(name, label_values, Record::Add(value));
    }

    fn define_histogram(
        &mut self,
        name: String,
        help: String,
        label_names: Vec<String>,
        buckets: Vec<f64>,
    ) -> Result<(), String> {
        let buckets = if buckets.is_empty() {
            vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
        } else {
            buckets
        };
        if buckets.iter().any(|b| !b.is_finite()) || buckets.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!(
                "histogram {name:?}: buckets must be finite and strictly increasing"
            ));
        }
        self.ctx
            .metrics
            .define(&self.ctx, &name, &help, &label_names, Some(buckets))
    }

    fn histogram_observe(&mut self, name: String, label_values: Vec<String>, value: f64) {
        if !value.is_nan() {
            self.record(name, label_values, Record::Observe(value));
        }
    }

    fn hook_unused(&mut self, hook: host::Hook) {
        let index = match hook {
            host::Hook::OnConnect => HOOK_ON_CONNECT,
            host::Hook::OnClose => HOOK_ON_CLOSE,
        };
        self.mark_unused(index);
    }

    fn http_hook_unused(&mut self, hook: host::HttpHook) {
        let index = match hook {
            host::HttpHook::OnRequest => HOOK_ON_REQUEST,
            host::HttpHook::OnResponse => HOOK_ON_RESPONSE,
        };
        self.mark_unused(index);
    }

    fn series(&mut self, name: String, label_values: Vec<String>) -> Option<u32> {
        if self.ids.len() >= MAX_SERIES_IDS {
            return None;
        }
        let series = self.ctx.metrics.series(&self.ctx, &name, label_values, None)?;
        self.ids.push(series);
        u32::try_from(self.ids.len() - 1).ok()
    }

    fn series_add(&mut self, series: u32, value: u64) {
        match self.ids.get(series as usize) {
            Some(Series::Counter(c)) => {
                c.inc_by(value);
            }
            _ => {
                self.ctx.metrics.dropped.inc();
            }
        }
    }

    fn series_observe(&mut self, series: u32, value: f64) {
        match self.ids.get(series as usize) {
            Some(Series::Histogram(h)) if !value.is_nan() => h.observe(value),
            Some(Series::Histogram(_)) => {}
            _ => {
                self.ctx.metrics.dropped.inc();
            }
        }
    }

    fn now_ns(&mut self) -> u64 {
        epoch().elapsed().as_nanos() as u64
    }

    fn read_file(&mut self, path: String) -> Result<Vec<u8>, String> {
        let wanted = PathBuf::from(&path);
        if !self.ctx.grants.contains(&wanted) {
            return Err(format!(
                "{path}: not granted to plugin {:?} (grants.files)",
                self.ctx.name
            ));
        }
        let meta = std::fs::metadata(&wanted).map_err(|e| format!("{path}: {e}"))?;
        if meta.len() > self.ctx.memory {
            return Err(format!(
                "{path}: {} bytes is more than the plugin's memory cap",
                meta.len()
            ));
        }
        std::fs::read(&wanted).map_err(|e| format!("{path}: {e}"))
    }
}

/// Builds histograms with a metric's own buckets.
#[derive(Debug, Clone)]
pub struct Buckets(Vec<f64>);

impl MetricConstructor<ValueHistogram> for Buckets {
    fn new_metric(&self) -> ValueHistogram {
        ValueHistogram::new(self.0.iter().copied())
    }
}

type Labels = Vec<(String, String)>;

#[derive(Debug)]
enum Kind {
    Counter(Family<Labels, ShardedCounter>),
    Histogram(Family<Labels, ValueHistogram, Buckets>),
}

#[derive(Debug)]
struct PluginMetric {
    help: String,
    labels: Vec<String>,
    buckets: Option<Vec<f64>>,
    kind: Kind,
    /// (plugin, generation) that declared this shape.
    owner: (String, u64),
    series: std::sync::atomic::AtomicUsize,
}

/// What a record call does.
#[derive(Debug, Clone, Copy)]
pub enum Record {
    /// Counter add.
    Add(u64),
    /// Histogram observation.
    Observe(f64),
}

/// The counters and histograms plugins declare, exposed at `/metrics` as
/// `wasmbassador_plugin_<name>{plugin="…", …}`.
#[derive(Debug, Default)]
pub struct PluginMetrics {
    metrics: RwLock<BTreeMap<String, PluginMetric>>,
    /// Records dropped for an unknown name, a wrong label count or the series cap.
    pub dropped: Counter,
}

fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl PluginMetrics {
    fn define(
        &self,
        ctx: &PluginContext,
        name: &str,
        help: &str,
        labels: &[String],
        buckets: Option<Vec<f64>>,
    ) -> Result<(), String> {
        if !valid_name(name) || name.len() > MAX_NAME {
            return Err(format!(
                "metric name {name:?} must match [a-zA-Z_][a-zA-Z0-9_]* and be at most {MAX_NAME} characters"
            ));
        }
        if help.len() > MAX_HELP {
            return Err(format!("metric {name:?}: help is longer than {MAX_HELP} bytes"));
        }
        if labels.len() > MAX_LABELS {
            return Err(format!("metric {name:?}: more than {MAX_LABELS} labels"));
        }
        if buckets.as_ref().is_some_and(|b| b.len() > MAX_BUCKETS) {
            return Err(format!("histogram {name:?}: more than {MAX_BUCKETS} buckets"));
        }
        // These names are the host's own `wasmbassador_plugin_*` families.
        let base = name.strip_suffix("_total").unwrap_or(name);
        if RESERVED.contains(&base) {
            return Err(format!(
                "metric name {name:?} is reserved for the host's own plugin metrics ({RESERVED:?})"
            ));
        }
        for l in labels {
            if !valid_name(l) || l == "plugin" || l.len() > MAX_NAME {
                return Err(format!(
                    "label {l:?} of metric {name:?} must match [a-zA-Z_][a-zA-Z0-9_]* and not be \"plugin\""
                ));
            }
        }
        let mut all = self
            .metrics
            .write()
            .map_err(|_| "metrics lock poisoned".to_string())?;
        if let Some(m) = all.get(name) {
            let same = m.help == help && m.labels == labels && m.buckets == buckets;
            if same {
                return Ok(());
            }
            // A new version of the same plugin may reshape its own metric.
            let newer_self = m.owner.0 == ctx.name && m.owner.1 < ctx.generation;
            if !newer_self {
                return Err(format!(
                    "metric {name:?} is already declared with other help, labels or buckets (by plugin {:?})",
                    m.owner.0
                ));
            }
        } else if all.values().filter(|m| m.owner.0 == ctx.name).count() >= MAX_METRICS_PER_PLUGIN {
            return Err(format!(
                "metric {name:?}: plugin {:?} already declared {MAX_METRICS_PER_PLUGIN} metrics, the most one plugin may",
                ctx.name
            ));
        }
        let kind = match &buckets {
            None => Kind::Counter(Family::default()),
            Some(b) => Kind::Histogram(Family::new_with_constructor(Buckets(b.clone()))),
        };
        all.insert(
            name.to_string(),
            PluginMetric {
                help: help.to_string(),
                labels: labels.to_vec(),
                buckets,
                kind,
                owner: (ctx.name.clone(), ctx.generation),
                series: Default::default(),
            },
        );
        Ok(())
    }

    /// Records into the series of `name` with label `values`, creating it within the
    /// cap; returns the series, or `None` when the record was dropped.
    fn record(&self, ctx: &PluginContext, name: &str, values: Vec<String>, what: Record) -> Option<Series> {
        let series = self.series(ctx, name, values, Some(what))?;
        match (&series, what) {
            (Series::Counter(c), Record::Add(n)) => {
                c.inc_by(n);
            }
            (Series::Histogram(h), Record::Observe(v)) => h.observe(v),
            _ => {}
        }
        Some(series)
    }

    /// The series of `name` with label `values`, created within the cap; `None` (and a
    /// dropped record counted) for an unknown name, a wrong number of values, a record
    /// of the other kind (`what`), or past the cap.
    fn series(
        &self,
        ctx: &PluginContext,
        name: &str,
        values: Vec<String>,
        what: Option<Record>,
    ) -> Option<Series> {
        // A read lock: records from many workers go on in parallel (each family
        // locks per series itself); only declarations take the write lock.
        let all = self.metrics.read().ok()?;
        let Some(m) = all.get(name) else {
            self.dropped.inc();
            return None;
        };
        if values.len() != m.labels.len() || values.iter().any(|v| v.len() > MAX_LABEL_VALUE) {
            self.dropped.inc();
            return None;
        }
        if !matches!(
            (&m.kind, what),
            (_, None)
                | (Kind::Counter(_), Some(Record::Add(_)))
                | (Kind::Histogram(_), Some(Record::Observe(_)))
        ) {
            // A counter record for a histogram or the other way round.
            self.dropped.inc();
            return None;
        }
        let mut labels: Labels = Vec::with_capacity(values.len() + 1);
        labels.push(("plugin".to_string(), ctx.name.clone()));
        labels.extend(m.labels.iter().cloned().zip(values));
        let existing = match &m.kind {
            Kind::Counter(f) => f.get(&labels).map(|c| Series::Counter(c.clone())),
            Kind::Histogram(f) => f.get(&labels).map(|h| Series::Histogram(h.clone())),
        };
        let series = match existing {
            Some(s) => s,
            None => {
                // A new series, if the cap allows one more. Two workers creating the
                // same series at once may count it twice; the cap errs on the low side.
                use std::sync::atomic::Ordering;
                if m.series.fetch_add(1, Ordering::Relaxed) >= MAX_SERIES {
                    m.series.fetch_sub(1, Ordering::Relaxed);
                    self.dropped.inc();
                    return None;
                }
                match &m.kind {
                    Kind::Counter(f) => Series::Counter(f.get_or_create(&labels).clone()),
                    Kind::Histogram(f) => Series::Histogram(f.get_or_create(&labels).clone()),
                }
            }
        };
        Some(series)
    }
}

/// Encodes the plugin metrics as part of the host registry.
#[derive(Debug)]
pub struct PluginMetricsCollector(pub Arc<PluginMetrics>);

impl Collector for PluginMetricsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(all) = self.0.metrics.read() else {
            return Ok(());
        };
        for (name, m) in all.iter() {
            let full = format!("plugin_{name}");
            match &m.kind {
                Kind::Counter(f) => {
                    // The encoder appends `_total` to counters itself.
                    let base = full.strip_suffix("_total").unwrap_or(&full);
                    let e = encoder.encode_descriptor(base, &m.help, None, f.metric_type())?;
                    f.encode(e)?;
                }
                Kind::Histogram(f) => {
                    let e = encoder.encode_descriptor(&full, &m.help, None, f.metric_type())?;
                    f.encode(e)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn value(text: &str, sample: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn log_lines_past_the_limit_are_dropped_until_the_next_second() {
        use std::sync::atomic::Ordering::Relaxed;
        let metrics = Metrics::new();
        let ctx = PluginContext::new("p", 1, Vec::new(), 1 << 20, 3, metrics.plugin_metrics.clone());
        let seen: Vec<bool> = (0..5).map(|_| ctx.log_allowed_at(7)).collect();
        assert_eq!(seen, [true, true, true, false, false]);
        assert_eq!(ctx.log_dropped.load(Relaxed), 2);
        // A new second: lines pass again and the drop count is reported (reset).
        assert!(ctx.log_allowed_at(8));
        assert_eq!(ctx.log_dropped.load(Relaxed), 0);
        let unlimited = PluginContext::new("q", 1, Vec::new(), 1 << 20, 0, metrics.plugin_metrics.clone());
        assert!((0..5000).all(|_| unlimited.log_allowed_at(7)));
    }

    #[test]
    fn records_by_series_number_land_in_the_named_series_and_bad_numbers_are_dropped() {
        let metrics = Metrics::new();
        let ctx = Arc::new(PluginContext::new(
            "p",
            1,
            Vec::new(),
            1 << 20,
            0,
            metrics.plugin_metrics.clone(),
        ));
        let mut state = HostState::new(ctx);
        let host: &mut dyn host::Host = &mut state;
        host.define_counter("hits".into(), "Hits.".into(), vec!["route".into()])
            .expect("a counter");
        host.define_histogram("seconds".into(), "Time.".into(), vec![], vec![1.0])
            .expect("a histogram");
        let hits_a = host.series("hits".into(), vec!["a".into()]).expect("a series");
        let seconds = host.series("seconds".into(), vec![]).expect("a series");
        assert_ne!(hits_a, seconds);
        host.series_add(hits_a, 5);
        host.counter_add("hits".into(), vec!["a".into()], 2);
        host.series_observe(seconds, 0.5);
        // Unknown names, wrong label counts, numbers never handed out and records of
        // the other kind are dropped and counted.
        assert_eq!(host.series("nope".into(), vec![]), None);
        assert_eq!(host.series("hits".into(), vec![]), None);
        host.series_add(99, 1);
        host.series_add(seconds, 1);
        host.series_observe(hits_a, 1.0);

        let text = metrics.encode();
        assert_eq!(
            value(&text, "wasmbassador_plugin_hits_total{plugin=\"p\",route=\"a\"}"),
            Some(7.0),
            "{text}"
        );
        assert_eq!(
            value(&text, "wasmbassador_plugin_seconds_count{plugin=\"p\"}"),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            value(&text, "wasmbassador_plugin_metric_records_dropped_total"),
            Some(5.0),
            "{text}"
        );
    }
}
