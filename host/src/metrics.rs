//! Prometheus metrics of the host itself, all prefixed `wasmbassador_`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// Shards of the hot metrics: each thread records into the shard of its index (the
/// connection thread's number, or a number taken once per other thread), so that two
/// connection threads never write the same cache line. Threads past this count share
/// shards, which costs only contention. Four keeps a many-label plugin histogram small
/// while covering the few connection threads of a sidecar.
pub(crate) const SHARDS: usize = 4;

/// The calling thread's index: a connection thread's number, or a number taken once
/// by any other thread. Callers take it modulo their count of slots ([`SHARDS`] here,
/// the idle lists in the plugin runtime).
pub fn thread_index() -> usize {
    use std::sync::atomic::AtomicUsize;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = crate::workers::current()
            .unwrap_or_else(|| NEXT.fetch_add(1, Ordering::Relaxed));
    }
    INDEX.with(|i| *i)
}

/// A cache line of counters.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Line([AtomicU64; 8]);

/// `width` counters per shard, each shard on cache lines of its own. A record is a
/// relaxed add in the calling thread's shard; a read adds the shards up. Written by
/// hand because the exporter is prometheus-client's, whose counter and histogram are
/// one shared atomic and a mutex: on every connection both connection threads wrote
/// the same cache line (the plugin call timings were the hottest spot of the chain
/// after the guest code itself).
#[derive(Debug)]
struct Cells {
    lines: Box<[Line]>,
    lines_per_shard: usize,
}

impl Cells {
    fn new(width: usize) -> Self {
        let lines_per_shard = width.div_ceil(8).max(1);
        Cells {
            lines: (0..lines_per_shard * SHARDS).map(|_| Line::default()).collect(),
            lines_per_shard,
        }
    }

    /// Counter `k` of the calling thread's shard.
    fn mine(&self, k: usize) -> &AtomicU64 {
        self.at(thread_index() % SHARDS, k)
    }

    fn at(&self, shard: usize, k: usize) -> &AtomicU64 {
        &self.lines[shard * self.lines_per_shard + k / 8].0[k % 8]
    }

    /// Counter `k` over all shards.
    fn total(&self, k: usize) -> u64 {
        (0..SHARDS)
            .map(|s| self.at(s, k).load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }

    /// A histogram whose counts per bound (then `+Inf`) are counters `0..=bounds.len()`.
    fn encode_histogram(
        &self,
        mut encoder: MetricEncoder,
        bounds: &[f64],
        sum: f64,
    ) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .enumerate()
            .map(|(k, bound)| (bound, self.total(k)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    /// Counter `k` over all shards, each shard's value read as `f64` bits.
    fn total_f64(&self, k: usize) -> f64 {
        (0..SHARDS)
            .map(|s| f64::from_bits(self.at(s, k).load(Ordering::Relaxed)))
            .sum()
    }
}

/// A histogram of durations, for the series written on every hook call and every
/// HTTP request. Sharded ([`Cells`]) with an exact sum in whole nanoseconds, so a
/// record is two relaxed adds in the thread's own cache lines; `_count` is the sum of
/// the buckets.
#[derive(Debug, Clone)]
pub struct DurationHistogram(Arc<DurationBuckets>);

#[derive(Debug)]
struct DurationBuckets {
    /// Upper bounds in seconds, as exported.
    bounds: Box<[f64]>,
    /// The same in nanoseconds, for the comparison per observation.
    bounds_ns: Box<[u64]>,
    /// Per shard: one count per bound, then `+Inf`, then the sum in nanoseconds.
    cells: Cells,
}

impl DurationHistogram {
    /// A histogram with these upper bounds, in seconds and ascending.
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let bounds: Box<[f64]> = bounds.into_iter().collect();
        let bounds_ns = bounds.iter().map(|b| (b * 1e9) as u64).collect();
        let cells = Cells::new(bounds.len() + 2);
        DurationHistogram(Arc::new(DurationBuckets {
            bounds,
            bounds_ns,
            cells,
        }))
    }

    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let b = &self.0;
        // The first bound at or above `ns` (Prometheus buckets are `le`).
        let i = b.bounds_ns.partition_point(|&bound| bound < ns);
        let shard = thread_index() % SHARDS;
        b.cells.at(shard, i).fetch_add(1, Ordering::Relaxed);
        b.cells
            .at(shard, b.bounds.len() + 1)
            .fetch_add(ns, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        (0..=self.0.bounds.len()).map(|k| self.0.cells.total(k)).sum()
    }
}

/// A counter for series written per connection or request (bytes, HTTP requests,
/// the plugins' own counters), sharded like [`DurationHistogram`].
#[derive(Debug, Clone)]
pub struct ShardedCounter(Arc<Cells>);

impl Default for ShardedCounter {
    fn default() -> Self {
        ShardedCounter(Arc::new(Cells::new(1)))
    }
}

impl ShardedCounter {
    /// Adds one.
    pub fn inc(&self) {
        self.inc_by(1);
    }

    /// Adds `n`.
    pub fn inc_by(&self, n: u64) {
        self.0.mine(0).fetch_add(n, Ordering::Relaxed);
    }

    /// The value now.
    pub fn get(&self) -> u64 {
        self.0.total(0)
    }
}

impl TypedMetric for ShardedCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for ShardedCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A gauge moved up and down per request (idle pooled connections), sharded like
/// [`ShardedCounter`]: each shard counts with wrapping arithmetic, so a connection put
/// idle on one thread and taken on another still sums right.
#[derive(Debug, Clone)]
pub struct ShardedGauge(Arc<Cells>);

impl Default for ShardedGauge {
    fn default() -> Self {
        ShardedGauge(Arc::new(Cells::new(1)))
    }
}

impl ShardedGauge {
    /// Adds one.
    pub fn inc(&self) {
        self.0.mine(0).fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one away.
    pub fn dec(&self) {
        self.0.mine(0).fetch_sub(1, Ordering::Relaxed);
    }

    /// The value now.
    pub fn get(&self) -> i64 {
        self.0.total(0) as i64
    }
}

impl TypedMetric for ShardedGauge {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for ShardedGauge {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.get())
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A histogram of any values with the given bounds (the plugins' own histograms),
/// sharded like [`DurationHistogram`]. The sum is an `f64` per shard, added with a
/// compare-and-swap that only the shard's own threads contend for.
#[derive(Debug, Clone)]
pub struct ValueHistogram(Arc<ValueBuckets>);

#[derive(Debug)]
struct ValueBuckets {
    bounds: Box<[f64]>,
    /// Per shard: one count per bound, then `+Inf`, then the sum's bits.
    cells: Cells,
}

impl ValueHistogram {
    /// A histogram with these upper bounds, ascending.
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let bounds: Box<[f64]> = bounds.into_iter().collect();
        let cells = Cells::new(bounds.len() + 2);
        ValueHistogram(Arc::new(ValueBuckets { bounds, cells }))
    }

    /// Records one value; callers drop NaN first (it would poison the sum).
    pub fn observe(&self, v: f64) {
        let b = &self.0;
        let i = b.bounds.partition_point(|&bound| bound < v);
        let shard = thread_index() % SHARDS;
        b.cells.at(shard, i).fetch_add(1, Ordering::Relaxed);
        let sum = b.cells.at(shard, b.bounds.len() + 1);
        let _ = sum.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            Some((f64::from_bits(bits) + v).to_bits())
        });
    }
}

impl TypedMetric for ValueHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ValueHistogram {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let b = &self.0;
        b.cells
            .encode_histogram(encoder, &b.bounds, b.cells.total_f64(b.bounds.len() + 1))
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A counter whose value is the `_count` of one [`DurationHistogram`]: `plugin_calls`
/// reads the calls from `plugin_call_duration`, so that a hook call records into one
/// series instead of two. A new series follows nothing (and reads 0) until
/// [`follow`](CallCount::follow) is called.
#[derive(Debug, Clone, Default)]
pub struct CallCount(Arc<OnceLock<DurationHistogram>>);

impl CallCount {
    /// Counts the observations of `h` (the first call wins: one label set has one
    /// histogram).
    pub fn follow(&self, h: &DurationHistogram) {
        let _ = self.0.set(h.clone());
    }

    /// The count now.
    pub fn get(&self) -> u64 {
        self.0.get().map_or(0, DurationHistogram::count)
    }
}

impl TypedMetric for CallCount {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for CallCount {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

impl TypedMetric for DurationHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for DurationHistogram {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let b = &self.0;
        let sum = b.cells.total(b.bounds.len() + 1) as f64 / 1e9;
        b.cells.encode_histogram(encoder, &b.bounds, sum)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Labels of per-listener series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// Listener name.
    pub listener: String,
}

/// Labels of refused connections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    /// Listener name.
    pub listener: String,
    /// `max_connections`, `bad_preamble`, `no_upstream`, `draining`.
    pub reason: String,
}

/// Labels of byte counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    /// Listener name.
    pub listener: String,
    /// `to_upstream` or `to_client`.
    pub direction: &'static str,
}

/// Labels of per-endpoint series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// Upstream name.
    pub upstream: String,
    /// Endpoint address as configured.
    pub endpoint: String,
}

/// Labels of HTTP request counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpRequestLabels {
    /// Listener name.
    pub listener: String,
    /// Status class of the answer the app got: `1xx` .. `5xx`.
    pub class: &'static str,
}

/// Labels of HTTP request retries.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpRetryLabels {
    /// Listener name.
    pub listener: String,
    /// What prompted it: `reset`, `status` (502/503/504) or `timeout`.
    pub reason: &'static str,
    /// `retried`, or `budget_exhausted` when the retry budget refused it.
    pub outcome: &'static str,
}

/// Labels of upstream HTTP connections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpConnectionLabels {
    /// Upstream name.
    pub upstream: String,
    /// Endpoint address as configured.
    pub endpoint: String,
    /// `http1` or `http2`, as negotiated.
    pub protocol: &'static str,
}

/// Labels of outcome counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `success` or `failure` (or a more specific word).
    pub result: &'static str,
}

/// Labels of per-plugin, per-hook series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginHookLabels {
    /// Plugin name.
    pub plugin: String,
    /// `on_connect` or `on_close`.
    pub hook: &'static str,
}

/// Labels of plugin call failures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginResultLabels {
    /// Plugin name.
    pub plugin: String,
    /// `on_connect` or `on_close`.
    pub hook: &'static str,
    /// `trap`, `timeout`, `memory` or `setup`.
    pub kind: &'static str,
}

/// Labels of plugin reloads.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    /// Plugin name.
    pub plugin: String,
    /// `success` or `failure`.
    pub result: &'static str,
}

/// Every metric the host exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Open client connections per listener.
    pub connections_active: Family<ListenerLabels, Gauge>,
    /// Accepted client connections per listener.
    pub connections: Family<ListenerLabels, Counter>,
    /// Client connections closed without being served, by reason.
    pub connections_rejected: Family<RejectLabels, Counter>,
    /// Bytes forwarded per listener and direction.
    pub bytes: Family<BytesLabels, ShardedCounter>,
    /// Connect attempts per endpoint.
    pub connect_attempts: Family<EndpointLabels, Counter>,
    /// Failed connect attempts (TCP, TLS or protocol) per endpoint.
    pub connect_failures: Family<EndpointLabels, Counter>,
    /// Time to a usable upstream connection (TCP + TLS), per endpoint.
    pub connect_duration: Family<EndpointLabels, Histogram>,
    /// 1 when the active health check calls the endpoint healthy.
    pub endpoint_healthy: Family<EndpointLabels, Gauge>,
    /// 1 while the endpoint is passively ejected.
    pub endpoint_ejected: Family<EndpointLabels, Gauge>,
    /// Passive ejections per endpoint.
    pub ejections: Family<EndpointLabels, Counter>,
    /// Configuration reloads by result.
    pub config_reloads: Family<ResultLabels, Counter>,
    /// PostgreSQL CancelRequests by result (`forwarded`, `unknown_session`, `failed`).
    pub cancel_requests: Family<ResultLabels, Counter>,
    /// Plugin hook calls.
    pub plugin_calls: Family<PluginHookLabels, CallCount>,
    /// Failed plugin hook calls by kind.
    pub plugin_failures: Family<PluginResultLabels, Counter>,
    /// Plugin hook call latency, instance checkout included.
    pub plugin_call_duration: Family<PluginHookLabels, DurationHistogram>,
    /// Plugin loads and hot swaps by result.
    pub plugin_reloads: Family<PluginLabels, Counter>,
    /// Connections refused by a plugin's deny (or its failure under `on_error = "deny"`).
    pub plugin_denials: Family<ListenerLabels, Counter>,
    /// HTTP requests answered per listener and status class (local 502/504 included).
    pub http_requests: Family<HttpRequestLabels, ShardedCounter>,
    /// Time from sending a request upstream to its response head, per endpoint.
    pub http_upstream_duration: Family<EndpointLabels, DurationHistogram>,
    /// Upstream connections opened by HTTP pools (reuse shows as few of these).
    pub http_connections_opened: Family<HttpConnectionLabels, Counter>,
    /// Upstream connections of HTTP pools open now, idle or busy (the pool's size).
    pub http_connections_open: Family<HttpConnectionLabels, Gauge>,
    /// HTTP/1.1 upstream connections waiting in their pool for a request.
    pub http_connections_idle: Family<HttpConnectionLabels, ShardedGauge>,
    /// Retries of idempotent HTTP requests, and retries the budget refused.
    pub http_retries: Family<HttpRetryLabels, Counter>,
    /// Counters and histograms that plugins declare.
    pub plugin_metrics: std::sync::Arc<crate::plugin::host::PluginMetrics>,
}

fn plugin_histogram() -> DurationHistogram {
    // 250 ns .. ~4 ms
    DurationHistogram::new(exponential_buckets(0.000_000_25, 2.0, 15))
}

/// 100 µs .. ~3.3 s: connect times and HTTP response heads.
fn connect_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0001, 2.0, 16)
}

fn connect_histogram() -> Histogram {
    Histogram::new(connect_buckets())
}

fn http_histogram() -> DurationHistogram {
    DurationHistogram::new(connect_buckets())
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wasmbassador");
        let m = Metrics {
            connections_active: Family::default(),
            connections: Family::default(),
            connections_rejected: Family::default(),
            bytes: Family::default(),
            connect_attempts: Family::default(),
            connect_failures: Family::default(),
            connect_duration: Family::new_with_constructor(connect_histogram),
            endpoint_healthy: Family::default(),
            endpoint_ejected: Family::default(),
            ejections: Family::default(),
            config_reloads: Family::default(),
            cancel_requests: Family::default(),
            plugin_calls: Family::default(),
            plugin_failures: Family::default(),
            plugin_call_duration: Family::new_with_constructor(plugin_histogram),
            plugin_reloads: Family::default(),
            plugin_denials: Family::default(),
            http_requests: Family::default(),
            http_upstream_duration: Family::new_with_constructor(http_histogram),
            http_connections_opened: Family::default(),
            http_connections_open: Family::default(),
            http_connections_idle: Family::default(),
            http_retries: Family::default(),
            plugin_metrics: Default::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "listener_connections_active",
            "Open client connections",
            m.connections_active.clone(),
        );
        r.register(
            "listener_connections",
            "Accepted client connections",
            m.connections.clone(),
        );
        r.register(
            "listener_connections_rejected",
            "Client connections closed without being served",
            m.connections_rejected.clone(),
        );
        r.register("listener_bytes", "Bytes forwarded", m.bytes.clone());
        r.register(
            "upstream_connect_attempts",
            "Upstream connect attempts",
            m.connect_attempts.clone(),
        );
        r.register(
            "upstream_connect_failures",
            "Failed upstream connect attempts",
            m.connect_failures.clone(),
        );
        r.register(
            "upstream_connect_duration_seconds",
            "Time to a usable upstream connection, TLS included",
            m.connect_duration.clone(),
        );
        r.register(
            "endpoint_healthy",
            "1 when active health checks call the endpoint healthy",
            m.endpoint_healthy.clone(),
        );
        r.register(
            "endpoint_ejected",
            "1 while the endpoint is passively ejected",
            m.endpoint_ejected.clone(),
        );
        r.register("endpoint_ejections", "Passive ejections", m.ejections.clone());
        r.register(
            "config_reloads",
            "Configuration reloads",
            m.config_reloads.clone(),
        );
        r.register(
            "postgres_cancel_requests",
            "PostgreSQL CancelRequests",
            m.cancel_requests.clone(),
        );
        r.register("plugin_calls", "Plugin hook calls", m.plugin_calls.clone());
        r.register(
            "plugin_failures",
            "Plugin hook calls that trapped, timed out or overran memory",
            m.plugin_failures.clone(),
        );
        r.register(
            "plugin_call_duration_seconds",
            "Plugin hook call latency",
            m.plugin_call_duration.clone(),
        );
        r.register(
            "plugin_reloads",
            "Plugin loads and hot swaps",
            m.plugin_reloads.clone(),
        );
        r.register(
            "plugin_denials",
            "Connections refused by a plugin",
            m.plugin_denials.clone(),
        );
        r.register(
            "http_requests",
            "HTTP requests answered, by status class",
            m.http_requests.clone(),
        );
        r.register(
            "http_upstream_request_duration_seconds",
            "Time from sending an HTTP request upstream to its response head",
            m.http_upstream_duration.clone(),
        );
        r.register(
            "http_upstream_connections_opened",
            "Upstream connections opened by HTTP connection pools",
            m.http_connections_opened.clone(),
        );
        r.register(
            "http_upstream_connections_open",
            "Upstream connections of HTTP connection pools open now, idle or busy",
            m.http_connections_open.clone(),
        );
        r.register(
            "http_upstream_connections_idle",
            "HTTP/1.1 upstream connections waiting in their pool for a request (HTTP/2 connections are shared by requests and not counted)",
            m.http_connections_idle.clone(),
        );
        r.register(
            "http_retries",
            "Retries of idempotent HTTP requests (outcome budget_exhausted: refused by the retry budget)",
            m.http_retries.clone(),
        );
        r.register(
            "plugin_metric_records_dropped",
            "Plugin metric records dropped (undeclared, wrong labels, or over the series cap)",
            m.plugin_metrics.dropped.clone(),
        );
        r.register_collector(Box::new(crate::plugin::host::PluginMetricsCollector(
            m.plugin_metrics.clone(),
        )));
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_histogram_exports_cumulative_buckets_count_and_exact_sum() {
        let mut registry = Registry::default();
        let h = DurationHistogram::new([0.001, 0.01]);
        registry.register("took", "Durations", h.clone());
        h.observe(Duration::from_micros(500));
        // On a bound: Prometheus buckets are "less than or equal".
        h.observe(Duration::from_millis(1));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(2));
        assert_eq!(h.count(), 4);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for line in [
            "took_bucket{le=\"0.001\"} 2",
            "took_bucket{le=\"0.01\"} 3",
            "took_bucket{le=\"+Inf\"} 4",
            "took_count 4",
            "took_sum 2.0065",
            "# TYPE took histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
        }
    }

    #[test]
    fn plugin_calls_are_the_count_of_the_call_latency_histogram() {
        let m = Metrics::new();
        let labels = PluginHookLabels {
            plugin: "audit".into(),
            hook: "on_connect",
        };
        let h = m.plugin_call_duration.get_or_create(&labels).clone();
        m.plugin_calls.get_or_create(&labels).follow(&h);
        for _ in 0..3 {
            h.observe(Duration::from_micros(2));
        }
        let text = m.encode();
        let line = "wasmbassador_plugin_calls_total{plugin=\"audit\",hook=\"on_connect\"} 3";
        assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
        assert!(
            text.contains("# TYPE wasmbassador_plugin_calls counter"),
            "{text}"
        );
    }

    #[test]
    fn records_from_many_threads_add_up_across_shards() {
        let mut registry = Registry::default();
        let counter = ShardedCounter::default();
        let values = ValueHistogram::new([1.0, 10.0]);
        let durations = DurationHistogram::new([0.001]);
        registry.register("hits", "Hits", counter.clone());
        registry.register("sizes", "Sizes", values.clone());
        // More threads than shards, so that some share one.
        std::thread::scope(|s| {
            for _ in 0..(SHARDS + 3) {
                s.spawn(|| {
                    for _ in 0..1000 {
                        counter.inc_by(2);
                        values.observe(0.5);
                        values.observe(4.0);
                        durations.observe(Duration::from_micros(10));
                    }
                });
            }
        });
        let threads = (SHARDS + 3) as u64;
        assert_eq!(counter.get(), threads * 2000);
        assert_eq!(durations.count(), threads * 1000);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        let n = threads * 1000;
        for line in [
            format!("hits_total {}", 2 * n),
            format!("sizes_bucket{{le=\"1.0\"}} {n}"),
            format!("sizes_bucket{{le=\"10.0\"}} {}", 2 * n),
            format!("sizes_bucket{{le=\"+Inf\"}} {}", 2 * n),
            format!("sizes_count {}", 2 * n),
            format!("sizes_sum {:.1}", 4.5 * n as f64),
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
        }
    }
}
