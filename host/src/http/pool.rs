//! Pooled upstream connections for `http` listeners: one pool per upstream, filled by
//! a connector that goes through the core's endpoint choice ([`Upstream::connect`]:
//! priorities, health, passive ejection, connect timeout and retries) and TLS
//! settings, with ALPN deciding HTTP/2 or HTTP/1.1 per connection.
//!
//! # Why hyper-util's pool rather than bb8
//! bb8 hands out a connection to one user at a time. That fits HTTP/1.1 keep-alive,
//! but an HTTP/2 connection carries many requests at once, so bb8 would need a
//! second layer of our own to share it, to notice when a connection is no longer
//! ready, and to choose the protocol per connection. hyper-util's `legacy::Client`
//! already does all of that: HTTP/1.1 connections go back to the pool once their
//! response is read, HTTP/2 connections are shared while open, idle connections are
//! reaped after `pool_idle_timeout`, at most `pool_max_idle` stay idle, and a
//! request that never left because the server had just closed a pooled connection is
//! sent again on another one. What it lacks is a maximum lifetime; that is added here
//! by poisoning (not reusing) a connection older than `max_lifetime` after it served
//! a response.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;

use crate::config::HttpVersion;
use crate::connect::{Handshake, UpstreamIo};
use crate::metrics::HttpConnectionLabels;
use crate::upstream::{ConnectError, Endpoint, Upstream};

/// A request body as sent upstream: the app's, streamed, or for a request that may be
/// retried, empty or buffered (so that every try can send it again).
pub type OutBody = http_body_util::Either<Incoming, http_body_util::Full<bytes::Bytes>>;

/// The connection pool of one upstream, built on first use by an `http` listener.
#[derive(Debug)]
pub struct Pool {
    client: Client<Connector, OutBody>,
    /// `https` with TLS, else `http` (HTTP/2's `:scheme`).
    pub scheme: Scheme,
    /// What the upstream sees as `Host` / `:authority`, or why there is none.
    pub authority: Result<Authority, String>,
    /// `http.max_lifetime`.
    pub max_lifetime: Duration,
    /// `http.retry`.
    pub retry: crate::config::HttpRetryConfig,
    /// Retries left to this upstream's requests (one budget for all its pools).
    pub budget: Arc<super::retry::Budget>,
}

impl Pool {
    /// A pool for `upstream`. The connector holds the upstream weakly: the upstream
    /// owns its pool, and a reload that replaces the upstream drops both.
    pub fn new(upstream: &Arc<Upstream>, tag: Option<String>) -> Pool {
        let cfg = &upstream.config.http;
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(cfg.pool_max_idle);
        if cfg.version == HttpVersion::Http2 {
            builder.http2_only(true);
        }
        let client = builder.build(Connector {
            upstream: Arc::downgrade(upstream),
            version: cfg.version,
            tag,
        });
        Pool {
            client,
            scheme: if upstream.tls.is_some() {
                Scheme::HTTPS
            } else {
                Scheme::HTTP
            },
            authority: super::headers::upstream_authority(&upstream.config),
            max_lifetime: cfg.max_lifetime,
            retry: cfg.retry.clone(),
            budget: upstream.http_budget.clone(),
        }
    }

    /// The pooled client.
    pub fn client(&self) -> &Client<Connector, OutBody> {
        &self.client
    }
}

/// Why the pool could not open a connection.
#[derive(Debug, thiserror::Error)]
pub enum PoolConnectError {
    /// Every connect attempt failed (the core's retries and failover included).
    #[error(transparent)]
    Upstream(#[from] ConnectError),
    /// The upstream was removed by a reload while the request waited.
    #[error("the upstream was removed by a configuration reload")]
    Removed,
}

/// Opens upstream connections for the pool through [`Upstream::connect`].
#[derive(Debug, Clone)]
pub struct Connector {
    upstream: Weak<Upstream>,
    version: HttpVersion,
    /// Only endpoints with this tag (a plugin's route).
    tag: Option<String>,
}

/// What a response learns about the connection that carried it (set by the pool as a
/// response extension).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The endpoint reached.
    pub endpoint: Arc<Endpoint>,
    /// When the connection was opened (for `max_lifetime`).
    pub opened: Instant,
}

/// One pooled upstream connection.
#[derive(Debug)]
pub struct Conn {
    io: TokioIo<UpstreamIo>,
    /// `http_upstream_connections_open`, decremented when the pool drops the connection.
    open: Gauge,
    h2: bool,
    info: ConnInfo,
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = Conn;
    type Error = PoolConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, PoolConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        // The URI names the upstream as a whole; the endpoint is chosen here, per
        // connection, by the same code that serves `tcp` and `postgres` listeners.
        let upstream = self.upstream.clone();
        let version = self.version;
        let tag = self.tag.clone();
        Box::pin(async move {
            let up = upstream.upgrade().ok_or(PoolConnectError::Removed)?;
            let c = up.connect(Handshake::Http(version), tag.as_deref(), None).await?;
            let h2 = c.io.alpn_h2() || version == HttpVersion::Http2;
            let labels = HttpConnectionLabels {
                upstream: up.config.name.clone(),
                endpoint: c.endpoint.config.address.clone(),
                protocol: if h2 { "http2" } else { "http1" },
            };
            up.metrics().http_connections_opened.get_or_create(&labels).inc();
            let open = up.metrics().http_connections_open.get_or_create(&labels).clone();
            open.inc();
            tracing::debug!(upstream = %up.config.name, endpoint = %c.endpoint.config.address, h2, "pooled upstream connection opened");
            Ok(Conn {
                io: TokioIo::new(c.io),
                open,
                h2,
                info: ConnInfo {
                    endpoint: c.endpoint,
                    opened: Instant::now(),
                },
            })
        })
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        let c = Connected::new().extra(self.info.clone());
        if self.h2 { c.negotiated_h2() } else { c }
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}
