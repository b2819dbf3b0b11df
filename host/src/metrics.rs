//! Prometheus metrics of the host itself, all prefixed `wasmbassador_`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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
    pub bytes: Family<BytesLabels, Counter>,
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
    pub plugin_calls: Family<PluginHookLabels, Counter>,
    /// Failed plugin hook calls by kind.
    pub plugin_failures: Family<PluginResultLabels, Counter>,
    /// Plugin hook call latency, instance checkout included.
    pub plugin_call_duration: Family<PluginHookLabels, Histogram>,
    /// Plugin loads and hot swaps by result.
    pub plugin_reloads: Family<PluginLabels, Counter>,
    /// Connections refused by a plugin's deny (or its failure under `on_error = "deny"`).
    pub plugin_denials: Family<ListenerLabels, Counter>,
    /// HTTP requests answered per listener and status class (local 502/504 included).
    pub http_requests: Family<HttpRequestLabels, Counter>,
    /// Time from sending a request upstream to its response head, per endpoint.
    pub http_upstream_duration: Family<EndpointLabels, Histogram>,
    /// Upstream connections opened by HTTP pools (reuse shows as few of these).
    pub http_connections_opened: Family<HttpConnectionLabels, Counter>,
    /// Upstream connections of HTTP pools open now, idle or busy (the pool's size).
    pub http_connections_open: Family<HttpConnectionLabels, Gauge>,
    /// Retries of idempotent HTTP requests, and retries the budget refused.
    pub http_retries: Family<HttpRetryLabels, Counter>,
    /// Counters and histograms that plugins declare.
    pub plugin_metrics: std::sync::Arc<crate::plugin::host::PluginMetrics>,
}

fn plugin_histogram() -> Histogram {
    // 250 ns .. ~4 ms
    Histogram::new(exponential_buckets(0.000_000_25, 2.0, 15))
}

fn connect_histogram() -> Histogram {
    // 100 µs .. ~3.3 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
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
            http_upstream_duration: Family::new_with_constructor(connect_histogram),
            http_connections_opened: Family::default(),
            http_connections_open: Family::default(),
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
