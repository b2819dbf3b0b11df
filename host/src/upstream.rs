//! Upstream selection: endpoints by priority and weight, health state (active checks
//! and passive ejection), and connect retries with backoff.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{EndpointConfig, UpstreamConfig};
use crate::connect::{DialError, Handshake, UpstreamIo, dial};
use crate::metrics::{EndpointLabels, Metrics};
use crate::tls::{TlsClient, TlsError};

/// One endpoint of an upstream and what is known of its health.
#[derive(Debug)]
pub struct Endpoint {
    /// As configured.
    pub config: EndpointConfig,
    labels: EndpointLabels,
    /// Its `http_upstream_duration` series, looked up on first use rather than per
    /// request.
    http_duration: OnceLock<crate::metrics::DurationHistogram>,
    healthy: AtomicBool,
    check_streak: Mutex<(u32, u32)>,
    connect_failures: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
    ejections: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Endpoint {
    /// Whether it carries routing tag `tag`.
    pub fn carries(&self, tag: &str) -> bool {
        self.config.tags.iter().any(|t| t == tag)
    }

    fn new(config: EndpointConfig, upstream: &str) -> Self {
        Self {
            labels: EndpointLabels {
                upstream: upstream.to_string(),
                endpoint: config.address.clone(),
            },
            config,
            http_duration: OnceLock::new(),
            healthy: AtomicBool::new(true),
            check_streak: Mutex::new((0, 0)),
            connect_failures: AtomicU32::new(0),
            ejected_until: Mutex::new(None),
            ejections: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    /// Whether active health checks call it healthy.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether passive ejection currently skips it.
    pub fn ejected(&self) -> bool {
        match self.ejected_until.lock() {
            Ok(until) => until.is_some_and(|t| Instant::now() < t),
            Err(_) => false,
        }
    }

    fn available(&self) -> bool {
        self.healthy() && !self.ejected()
    }

    /// Metric labels of this endpoint.
    pub fn labels(&self) -> &EndpointLabels {
        &self.labels
    }

    /// Its series of `http_upstream_duration_seconds` in `metrics`.
    pub fn http_duration(&self, metrics: &Metrics) -> &crate::metrics::DurationHistogram {
        self.http_duration
            .get_or_init(|| metrics.http_upstream_duration.get_or_create(&self.labels).clone())
    }
}

/// A configured upstream with live endpoint state.
#[derive(Debug)]
pub struct Upstream {
    /// As configured.
    pub config: UpstreamConfig,
    /// Endpoints in file order.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// TLS client side, when `tls` is configured.
    pub tls: Option<TlsClient>,
    metrics: Arc<Metrics>,
    /// Pooled HTTP connections, made when an `http` listener first needs them: one
    /// pool per connection thread (slot 0 for connections off them), so that a
    /// request and the upstream connection that carries it run on the same thread.
    http_pools: Box<[OnceLock<Arc<crate::http::pool::Pool>>]>,
    /// Pools of the endpoints with one tag, for requests a plugin routed by tag, by
    /// connection thread slot and tag.
    http_tag_pools:
        std::sync::Mutex<std::collections::HashMap<(usize, String), Arc<crate::http::pool::Pool>>>,
    /// The retry budget of this upstream's HTTP requests, shared by its pools.
    pub http_budget: Arc<crate::http::retry::Budget>,
    /// This upstream speaks HTTP/2 (configured, or chosen by ALPN on a connection of
    /// an `http` pool): its requests go through hyper-util's shared client.
    pub http_h2: Arc<std::sync::atomic::AtomicBool>,
}

/// Every connect attempt for one client connection failed.
#[derive(Debug, thiserror::Error)]
#[error("upstream {upstream:?}: {attempts} connect attempt(s) failed; last: {last}")]
pub struct ConnectError {
    /// The upstream name.
    pub upstream: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last attempt's failure.
    pub last: DialError,
}

/// A ready upstream connection and where it goes.
#[derive(Debug)]
pub struct Connected {
    /// The stream, TLS already established where configured.
    pub io: UpstreamIo,
    /// The endpoint chosen.
    pub endpoint: Arc<Endpoint>,
    /// The socket address reached (what a CancelRequest must go back to).
    pub peer: SocketAddr,
    /// Bytes the upstream already sent, for the client before anything else: with a
    /// startup message, the start of the server's answer to it.
    pub first: Vec<u8>,
}

const BACKOFF_CAP: Duration = Duration::from_secs(2);

impl Upstream {
    /// Builds the upstream, reading its TLS files. `previous` carries endpoint health
    /// over a reload, so that an edit does not make a dead endpoint look healthy.
    pub fn new(
        config: UpstreamConfig,
        metrics: Arc<Metrics>,
        previous: Option<&Upstream>,
    ) -> Result<Self, TlsError> {
        let tls = config.tls.as_ref().map(TlsClient::new).transpose()?;
        let endpoints = config
            .endpoint
            .iter()
            .map(|e| {
                let ep = Endpoint::new(e.clone(), &config.name);
                if let Some(old) =
                    previous.and_then(|p| p.endpoints.iter().find(|o| o.config.address == e.address))
                {
                    ep.healthy.store(old.healthy(), Ordering::Relaxed);
                }
                metrics
                    .endpoint_healthy
                    .get_or_create(&ep.labels)
                    .set(ep.healthy() as i64);
                Arc::new(ep)
            })
            .collect();
        let http_budget = Arc::new(crate::http::retry::Budget::new(&config.http.retry));
        Ok(Self {
            config,
            endpoints,
            tls,
            metrics,
            http_pools: (0..=crate::workers::MAX_WORKERS)
                .map(|_| OnceLock::new())
                .collect(),
            http_tag_pools: Default::default(),
            http_budget,
            http_h2: Default::default(),
        })
    }

    /// The host metrics this upstream records into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The HTTP connection pool of this upstream, made on first use; with `tag`, the
    /// pool of the endpoints carrying that tag (its own connections, so that a request
    /// routed to a tag never reuses a connection to another endpoint).
    pub fn http_pool(self: &Arc<Self>, tag: Option<&str>) -> Arc<crate::http::pool::Pool> {
        let slot = crate::workers::current().map_or(0, |i| i + 1);
        let Some(tag) = tag else {
            return self.http_pools[slot]
                .get_or_init(|| Arc::new(crate::http::pool::Pool::new(self, None)))
                .clone();
        };
        let mut pools = self.http_tag_pools.lock().unwrap_or_else(|p| p.into_inner());
        pools
            .entry((slot, tag.to_string()))
            .or_insert_with(|| Arc::new(crate::http::pool::Pool::new(self, Some(tag.to_string()))))
            .clone()
    }

    /// Whether any endpoint carries `tag`.
    pub fn has_tag(&self, tag: &str) -> bool {
        self.endpoints.iter().any(|e| e.carries(tag))
    }

    /// Picks the next endpoint: the best priority that has an available endpoint not
    /// yet tried, spread by weight; when every endpoint is unhealthy or ejected, they
    /// are still tried in priority order rather than refusing everyone. With `tag`,
    /// only endpoints carrying that tag are candidates.
    pub fn pick(&self, tried: &[usize], tag: Option<&str>) -> Option<usize> {
        let eligible = |i: usize| tag.is_none_or(|t| self.endpoints[i].carries(t));
        let untried = |i: &usize| !tried.contains(i);
        let passes: [&dyn Fn(usize) -> bool; 4] = [
            &|i| eligible(i) && untried(&i) && self.endpoints[i].available(),
            &|i| eligible(i) && untried(&i),
            &|i| eligible(i) && self.endpoints[i].available(),
            &eligible,
        ];
        for pass in passes {
            let candidates: Vec<usize> = (0..self.endpoints.len()).filter(|i| pass(*i)).collect();
            let Some(best) = candidates
                .iter()
                .map(|i| self.endpoints[*i].config.priority)
                .min()
            else {
                continue;
            };
            let group: Vec<usize> = candidates
                .into_iter()
                .filter(|i| self.endpoints[*i].config.priority == best)
                .collect();
            return Some(self.weighted(&group));
        }
        None
    }

    fn weighted(&self, group: &[usize]) -> usize {
        let total: u64 = group
            .iter()
            .map(|i| self.endpoints[*i].config.weight as u64)
            .sum();
        let mut ticket = fastrand::u64(0..total.max(1));
        for i in group {
            let w = self.endpoints[*i].config.weight as u64;
            if ticket < w {
                return *i;
            }
            ticket -= w;
        }
        group[0]
    }

    /// Connects for one client connection: picks endpoints, retries with backoff
    /// within `retry.attempts`, and records passive health. With a PostgreSQL startup
    /// message, it is sent here and a server that turns the session away before
    /// authentication (shutting down, starting up) counts as a failed attempt. Only
    /// failures before the client has seen any byte happen here, so every retry is
    /// safe.
    pub async fn connect(
        &self,
        handshake: Handshake,
        tag: Option<&str>,
        startup: Option<&[u8]>,
    ) -> Result<Connected, ConnectError> {
        let mut tried = Vec::new();
        let attempts = self.config.retry.attempts.max(1);
        let mut last = None;
        let mut made = 0;
        for attempt in 1..=attempts {
            if attempt > 1 {
                tokio::time::sleep(self.backoff(attempt - 1)).await;
            }
            let Some(i) = self.pick(&tried, tag) else {
                last = Some(match tag {
                    Some(t) => DialError::NoTaggedEndpoint(t.to_string()),
                    None => DialError::NoEndpoint,
                });
                break;
            };
            if !tried.contains(&i) {
                tried.push(i);
            }
            made = attempt;
            let ep = &self.endpoints[i];
            self.metrics.connect_attempts.get_or_create(&ep.labels).inc();
            let started = Instant::now();
            let pg_mode = self.config.tls.as_ref().map(|t| t.postgres).unwrap_or_default();
            let attempt_once = async {
                let (mut io, peer) = dial(
                    &ep.config.address,
                    self.tls.as_ref(),
                    pg_mode,
                    handshake,
                    self.config.connect_timeout,
                )
                .await?;
                let first = match startup {
                    None => Vec::new(),
                    Some(packet) => tokio::time::timeout(
                        self.config.connect_timeout,
                        crate::postgres::start_session(&mut io, packet, peer),
                    )
                    .await
                    .map_err(|_| DialError::Timeout(self.config.connect_timeout))??,
                };
                Ok::<_, DialError>((io, peer, first))
            };
            match attempt_once.await {
                Ok((io, peer, first)) => {
                    self.metrics
                        .connect_duration
                        .get_or_create(&ep.labels)
                        .observe(started.elapsed().as_secs_f64());
                    ep.connect_failures.store(0, Ordering::Relaxed);
                    return Ok(Connected {
                        io,
                        endpoint: ep.clone(),
                        peer,
                        first,
                    });
                }
                Err(e) => {
                    tracing::warn!(
                        upstream = %self.config.name,
                        endpoint = %ep.config.address,
                        attempt,
                        of = attempts,
                        error = %e,
                        "upstream connect attempt failed"
                    );
                    self.connect_failed(ep, &e);
                    last = Some(e);
                }
            }
        }
        Err(ConnectError {
            upstream: self.config.name.clone(),
            attempts: made,
            last: last.unwrap_or(DialError::Timeout(self.config.connect_timeout)),
        })
    }

    /// Exponential backoff with equal jitter, capped at 2 s.
    fn backoff(&self, retry: u32) -> Duration {
        let base = self.config.retry.backoff;
        let full = base
            .saturating_mul(1u32 << retry.saturating_sub(1).min(16))
            .min(BACKOFF_CAP);
        let half = full / 2;
        half + half.mul_f64(fastrand::f64())
    }

    fn connect_failed(&self, ep: &Endpoint, e: &DialError) {
        self.metrics.connect_failures.get_or_create(&ep.labels).inc();
        if let Ok(mut last) = ep.last_error.lock() {
            *last = Some(e.to_string());
        }
        let n = ep.connect_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.config.eject.after && !ep.ejected() {
            if let Ok(mut until) = ep.ejected_until.lock() {
                *until = Some(Instant::now() + self.config.eject.duration);
            }
            ep.connect_failures.store(0, Ordering::Relaxed);
            ep.ejections.fetch_add(1, Ordering::Relaxed);
            self.metrics.ejections.get_or_create(&ep.labels).inc();
            tracing::warn!(
                upstream = %self.config.name,
                endpoint = %ep.config.address,
                failures = n,
                ejected_for = ?self.config.eject.duration,
                "endpoint ejected after consecutive connect failures"
            );
        }
    }

    /// Records one active health check result and flips the state after the
    /// configured number of consecutive results.
    pub fn record_check(&self, ep: &Endpoint, result: Result<(), String>) {
        let h = &self.config.health;
        let Ok(mut streak) = ep.check_streak.lock() else {
            return;
        };
        match &result {
            Ok(()) => *streak = (streak.0 + 1, 0),
            Err(_) => *streak = (0, streak.1 + 1),
        }
        let was = ep.healthy();
        let now = if was {
            streak.1 < h.unhealthy_after
        } else {
            streak.0 >= h.healthy_after
        };
        if now != was {
            ep.healthy.store(now, Ordering::Relaxed);
            self.metrics
                .endpoint_healthy
                .get_or_create(&ep.labels)
                .set(now as i64);
            if now {
                // A recovered endpoint starts with a clean slate.
                if let Ok(mut until) = ep.ejected_until.lock() {
                    *until = None;
                }
                tracing::info!(upstream = %self.config.name, endpoint = %ep.config.address, "endpoint healthy again");
            } else {
                tracing::warn!(
                    upstream = %self.config.name,
                    endpoint = %ep.config.address,
                    error = result.as_ref().err().map(String::as_str).unwrap_or(""),
                    "endpoint unhealthy"
                );
            }
        }
        if let Err(e) = result
            && let Ok(mut last) = ep.last_error.lock()
        {
            *last = Some(e);
        }
    }

    /// Refreshes the ejection gauges; called by the health loop.
    pub fn publish_ejections(&self) {
        for ep in &self.endpoints {
            self.metrics
                .endpoint_ejected
                .get_or_create(&ep.labels)
                .set(ep.ejected() as i64);
        }
    }

    /// Whether at least one endpoint is healthy and not ejected.
    pub fn any_available(&self) -> bool {
        self.endpoints.iter().any(|e| e.available())
    }

    /// JSON status for `/upstreams`.
    pub fn status(&self) -> UpstreamStatus {
        UpstreamStatus {
            name: self.config.name.clone(),
            tls: self.tls.is_some(),
            endpoints: self
                .endpoints
                .iter()
                .map(|e| EndpointStatus {
                    address: e.config.address.clone(),
                    priority: e.config.priority,
                    weight: e.config.weight,
                    tags: e.config.tags.clone(),
                    healthy: e.healthy(),
                    ejected: e.ejected(),
                    ejections: e.ejections.load(Ordering::Relaxed),
                    last_error: e.last_error.lock().ok().and_then(|l| l.clone()),
                })
                .collect(),
        }
    }
}

/// `/upstreams` entry.
#[derive(Debug, Serialize)]
pub struct UpstreamStatus {
    /// Upstream name.
    pub name: String,
    /// Whether TLS is used.
    pub tls: bool,
    /// Its endpoints.
    pub endpoints: Vec<EndpointStatus>,
}

/// `/upstreams` endpoint entry.
#[derive(Debug, Serialize)]
pub struct EndpointStatus {
    /// As configured.
    pub address: String,
    /// Lower is preferred.
    pub priority: u32,
    /// Share within its priority.
    pub weight: u32,
    /// Routing tags.
    pub tags: Vec<String>,
    /// Active health state.
    pub healthy: bool,
    /// Passive ejection state.
    pub ejected: bool,
    /// Ejections so far.
    pub ejections: u64,
    /// The last connect or check error.
    pub last_error: Option<String>,
}
