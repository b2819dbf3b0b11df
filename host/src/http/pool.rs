//! Pooled upstream connections for `http` listeners: one pool per upstream, filled by
//! a connector that goes through the core's endpoint choice ([`Upstream::connect`]:
//! priorities, health, passive ejection, connect timeout and retries) and TLS
//! settings, with ALPN deciding HTTP/2 or HTTP/1.1 per connection.
//!
//! # HTTP/2 in hyper-util's pool, HTTP/1.1 in a list of our own
//! An HTTP/2 connection carries many requests at once. hyper-util's `legacy::Client`
//! shares it while it is open, notices when it is no longer ready, reaps it after
//! `pool_idle_timeout`, and sends again a request that never left because the server
//! had just closed the connection; it drives each connection from a task of its own.
//! What it lacks is a maximum lifetime, added here by poisoning a connection older
//! than `max_lifetime` after the response it is carrying.
//!
//! An HTTP/1.1 connection carries one request at a time, and the same client would
//! drive it from its own task too and spawn a further task per request to see it
//! become idle: three tasks woken per request. So HTTP/1.1 connections are kept here,
//! in a short list per pool (a pool belongs to one connection thread), and each
//! exchange runs in the app connection's task on hyper's connection-level client:
//! the request's future polls the connection until the response head is in, the
//! response body polls it while the app reads, and the connection goes back on the
//! list once the body has been read to its end. The rules are the same as hyper-util's
//! (at most `pool_max_idle` idle, closed after `pool_idle_timeout`, a request that
//! never left sent again on another connection), and a connection past
//! `max_lifetime` takes no new request. bb8 would have fitted this part, but each of
//! its checkouts is an async call with a timeout and bookkeeping of its own, the
//! kind of per-request work this path is meant to shed; the list is written here by
//! hand, in about a hundred lines.
//!
//! Whether an upstream speaks HTTP/2 is known from its configuration or learnt from
//! ALPN on the first connection; that connection is handed to the shared client.
//!
//! The fast path of HTTP/1.1 requests ([`super::fast`]) speaks HTTP/1.1 on
//! bare connections, kept in a second list with the same rules: hyper's connection
//! state cannot be taken off a connection once made, so each list keeps its own.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;

use crate::config::HttpVersion;
use crate::connect::{Handshake, UpstreamIo};
use crate::metrics::{HttpConnectionLabels, ShardedGauge};
use crate::upstream::{ConnectError, Endpoint, Upstream};

/// A request body as sent upstream: the app's, streamed, or for a request that may be
/// retried, empty or buffered (so that every try can send it again).
pub type OutBody = http_body_util::Either<Incoming, http_body_util::Full<bytes::Bytes>>;

/// The connection pool of one upstream, built on first use by an `http` listener.
#[derive(Debug)]
pub struct Pool {
    /// HTTP/2 connections (and HTTP/1.1 ones while this upstream is known to offer
    /// HTTP/2), in hyper-util's pool: one connection carries many requests at once,
    /// driven by a task of its own.
    client: Client<Connector, OutBody>,
    /// Opens the HTTP/1.1 connections kept in `idle`.
    connector: Connector,
    /// This upstream negotiated or is configured for HTTP/2: requests take `client`.
    /// Shared by all the upstream's pools, so that one ALPN answer settles it.
    h2: Arc<AtomicBool>,
    /// HTTP/1.1 connections between requests, newest last.
    idle: Mutex<Vec<Idle>>,
    /// HTTP/1.1 connections of the fast path ([`super::fast`]) between requests,
    /// newest last: bare connections, with no hyper state.
    raw: Mutex<Vec<RawIdle>>,
    /// `http.pool_max_idle`.
    max_idle: usize,
    /// `http.pool_idle_timeout`.
    idle_timeout: Duration,
    /// A task reaps `idle` (see [`Pool::reap`]).
    reaping: AtomicBool,
    /// `https` with TLS, else `http` (HTTP/2's `:scheme`).
    pub scheme: Scheme,
    /// What the upstream sees as `Host` / `:authority`, or why there is none.
    pub authority: Result<Authority, String>,
    /// `authority` as a `Host` value, made once.
    host: Option<http::HeaderValue>,
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
        let connector = Connector {
            upstream: Arc::downgrade(upstream),
            version: cfg.version,
            tag,
            parked: Default::default(),
        };
        let client = builder.build(connector.clone());
        if cfg.version == HttpVersion::Http2 {
            upstream.http_h2.store(true, Ordering::Relaxed);
        }
        let authority = super::headers::upstream_authority(&upstream.config);
        let host = authority
            .as_ref()
            .ok()
            .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok());
        Pool {
            client,
            connector,
            host,
            h2: upstream.http_h2.clone(),
            idle: Mutex::new(Vec::new()),
            raw: Mutex::new(Vec::new()),
            max_idle: cfg.pool_max_idle,
            idle_timeout: cfg.pool_idle_timeout,
            reaping: AtomicBool::new(false),
            scheme: if upstream.tls.is_some() {
                Scheme::HTTPS
            } else {
                Scheme::HTTP
            },
            authority,
            max_lifetime: cfg.max_lifetime,
            retry: cfg.retry.clone(),
            budget: upstream.http_budget.clone(),
        }
    }

    /// Sends `req` (its target in origin form, with `Host` set from [`Pool::host`] for
    /// HTTP/1.1, which hyper's connection-level client leaves to its caller) on a
    /// pooled connection and returns the response head; its body
    /// streams from the upstream as the app reads it.
    ///
    /// An HTTP/1.1 exchange runs inside the caller's task: the pooled connection is
    /// polled by this future and then by the response body, and goes back to the pool
    /// when the body has been read to its end. hyper-util's client would drive it
    /// from a task of its own and spawn a further task per request to watch for the
    /// connection to become idle, so that each request woke three tasks; here it is
    /// one. HTTP/2 connections, shared by concurrent requests, stay in `client`.
    pub async fn send(self: &Arc<Self>, mut req: Request<OutBody>) -> Result<Response<UpBody>, SendError> {
        loop {
            if self.h2.load(Ordering::Relaxed) {
                self.absolute(&mut req)?;
                return match self.client.request(req).await {
                    Ok(r) => Ok(r.map(UpBody::Shared)),
                    Err(e) => Err(SendError::Shared(e)),
                };
            }
            let (mut conn, reused) = match self.checkout() {
                Some(c) => (c, true),
                None => {
                    let c = self.connector.open().await.map_err(SendError::Connect)?;
                    if c.h2 {
                        // The upstream chose HTTP/2 by ALPN: from now on its requests
                        // share connections, starting with this one.
                        self.h2.store(true, Ordering::Relaxed);
                        *self.connector.parked.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
                        continue;
                    }
                    (
                        Box::new(H1Conn::handshake(c).await.map_err(SendError::Http)?),
                        false,
                    )
                }
            };
            match conn.send(req).await {
                Ok(resp) => {
                    let pool = self.clone();
                    return Ok(resp.map(move |body| {
                        UpBody::Pooled(Pooled {
                            body,
                            conn: Some(conn),
                            pool,
                            ended: false,
                        })
                    }));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: a pooled connection that the upstream closed
                    // just before. Another connection takes it, whatever the method.
                    Some(r) if reused => req = r,
                    _ => return Err(SendError::Http(e.into_error())),
                },
            }
        }
    }

    /// `authority` as a `Host` value.
    pub fn host(&self) -> Option<&http::HeaderValue> {
        self.host.as_ref()
    }

    /// Whether requests go to the shared HTTP/2 client (the upstream is configured
    /// for HTTP/2 or chose it by ALPN).
    pub fn is_h2(&self) -> bool {
        self.h2.load(Ordering::Relaxed)
    }

    /// `req`'s target in the absolute form HTTP/2 sends (`:scheme`, `:authority`).
    fn absolute(&self, req: &mut Request<OutBody>) -> Result<(), SendError> {
        if req.uri().authority().is_some() {
            return Ok(());
        }
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = self.authority.as_ref().ok().cloned();
        parts.path_and_query = req.uri().path_and_query().cloned();
        *req.uri_mut() = http::Uri::from_parts(parts).map_err(SendError::Target)?;
        Ok(())
    }

    /// An idle HTTP/1.1 connection that can take a request, if there is one.
    fn checkout(&self) -> Option<Box<H1Conn>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(entry) = idle.pop() {
            let fresh = entry.since.elapsed() < self.idle_timeout;
            if let Some(mut conn) = entry.take()
                && fresh
                && conn.info.opened.elapsed() < self.max_lifetime
                && conn.settle()
            {
                return Some(conn);
            }
        }
        None
    }

    /// Takes a connection back after its response was read to the end; one that
    /// cannot carry another request, is past `max_lifetime`, or finds the pool full
    /// is closed instead.
    fn release(self: &Arc<Self>, mut conn: Box<H1Conn>) {
        if conn.info.opened.elapsed() >= self.max_lifetime || !conn.settle() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() >= self.max_idle {
            return;
        }
        idle.push(Idle::new(conn));
        drop(idle);
        self.reap_later();
    }

    /// An idle fast-path connection that can take a request, if there is one: not
    /// too old, and with nothing pending on it (a close from the upstream shows here,
    /// without a read: tokio notes a short read as the socket drained).
    pub(super) fn raw_checkout(&self) -> Option<Conn> {
        let mut raw = self.raw.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(entry) = raw.pop() {
            let fresh = entry.since.elapsed() < self.idle_timeout;
            if let Some(mut conn) = entry.take()
                && fresh
                && conn.info.opened.elapsed() < self.max_lifetime
                && conn.quiet()
            {
                return Some(conn);
            }
        }
        None
    }

    /// Opens a connection for the fast path; `Ok(None)` when the upstream chose
    /// HTTP/2 by ALPN, which from then on its requests take through the shared
    /// client (this connection first).
    pub(super) async fn raw_open(&self) -> Result<Option<Conn>, SendError> {
        let c = self.connector.open().await.map_err(SendError::Connect)?;
        if c.h2 {
            self.h2.store(true, Ordering::Relaxed);
            *self.connector.parked.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
            return Ok(None);
        }
        Ok(Some(c))
    }

    /// Takes a fast-path connection back after a complete exchange; one past
    /// `max_lifetime`, or finding the pool full, is closed instead.
    pub(super) fn raw_release(self: &Arc<Self>, conn: Conn) {
        if conn.info.opened.elapsed() >= self.max_lifetime {
            return;
        }
        let mut raw = self.raw.lock().unwrap_or_else(|p| p.into_inner());
        if raw.len() >= self.max_idle {
            return;
        }
        raw.push(RawIdle::new(conn));
        drop(raw);
        self.reap_later();
    }

    /// Starts the reaper unless it runs.
    fn reap_later(self: &Arc<Self>) {
        if !self.reaping.swap(true, Ordering::Relaxed) {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(Self::reap(Arc::downgrade(self)));
                }
                Err(_) => self.reaping.store(false, Ordering::Relaxed),
            }
        }
    }

    /// Closes idle connections once `pool_idle_timeout` has passed over them, for as
    /// long as any are idle (then it ends, and the next release starts another).
    async fn reap(pool: Weak<Pool>) {
        loop {
            let Some(wait) = pool.upgrade().map(|p| p.idle_timeout) else {
                return;
            };
            tokio::time::sleep(wait / 2).await;
            let Some(p) = pool.upgrade() else { return };
            let mut idle = p.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.retain(|i| i.since.elapsed() < p.idle_timeout);
            let mut raw = p.raw.lock().unwrap_or_else(|e| e.into_inner());
            raw.retain(|i| i.since.elapsed() < p.idle_timeout);
            if idle.is_empty() && raw.is_empty() {
                p.reaping.store(false, Ordering::Relaxed);
                return;
            }
        }
    }
}

/// Why [`Pool::send`] got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be opened.
    #[error(transparent)]
    Connect(PoolConnectError),
    /// The pooled HTTP/1.1 connection failed the request.
    #[error(transparent)]
    Http(hyper::Error),
    /// The shared (HTTP/2) client failed the request.
    #[error(transparent)]
    Shared(hyper_util::client::legacy::Error),
    /// The request target and the upstream's authority make no HTTP/2 target.
    #[error("unusable request target: {0}")]
    Target(http::uri::InvalidUriParts),
    /// A fast-path connection failed the request.
    #[error(transparent)]
    Io(io::Error),
}

impl SendError {
    /// No upstream connection was reached (the connector's retries and failover are
    /// behind this already).
    pub fn is_connect(&self) -> bool {
        match self {
            SendError::Connect(_) => true,
            SendError::Http(_) | SendError::Target(_) | SendError::Io(_) => false,
            SendError::Shared(e) => e.is_connect(),
        }
    }
}

/// An idle pooled connection, counted in `http_upstream_connections_idle` from the
/// moment it is put in the list until it is taken out or dropped (reaped, closed, or
/// the pool gone).
#[derive(Debug)]
struct Idle {
    /// Always `Some` but inside [`Idle::take`].
    conn: Option<Box<H1Conn>>,
    since: Instant,
}

impl Idle {
    fn new(conn: Box<H1Conn>) -> Idle {
        conn.idle.inc();
        Idle {
            conn: Some(conn),
            since: Instant::now(),
        }
    }

    /// The connection, no longer counted as idle.
    fn take(mut self) -> Option<Box<H1Conn>> {
        let conn = self.conn.take();
        if let Some(c) = &conn {
            c.idle.dec();
        }
        conn
    }
}

impl Drop for Idle {
    fn drop(&mut self) {
        if let Some(c) = &self.conn {
            c.idle.dec();
        }
    }
}

/// An idle fast-path connection, counted in `http_upstream_connections_idle` like
/// [`Idle`].
#[derive(Debug)]
struct RawIdle {
    /// Always `Some` but inside [`RawIdle::take`].
    conn: Option<Conn>,
    since: Instant,
}

impl RawIdle {
    fn new(conn: Conn) -> RawIdle {
        if let Some(g) = &conn.idle {
            g.inc();
        }
        RawIdle {
            conn: Some(conn),
            since: Instant::now(),
        }
    }

    /// The connection, no longer counted as idle.
    fn take(mut self) -> Option<Conn> {
        let conn = self.conn.take();
        if let Some(g) = conn.as_ref().and_then(|c| c.idle.as_ref()) {
            g.dec();
        }
        conn
    }
}

impl Drop for RawIdle {
    fn drop(&mut self) {
        if let Some(g) = self.conn.as_ref().and_then(|c| c.idle.as_ref()) {
            g.dec();
        }
    }
}

/// One pooled HTTP/1.1 connection: hyper's client state machine, polled by whichever
/// request uses it.
struct H1Conn {
    send: hyper::client::conn::http1::SendRequest<OutBody>,
    conn: hyper::client::conn::http1::Connection<Conn, OutBody>,
    /// The connection future has completed (the connection is closed).
    done: bool,
    info: ConnInfo,
    /// Its series of `http_upstream_connections_idle`.
    idle: ShardedGauge,
}

impl std::fmt::Debug for H1Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Conn")
            .field("done", &self.done)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl H1Conn {
    async fn handshake(c: Conn) -> Result<H1Conn, hyper::Error> {
        let info = c.info.clone();
        let idle = c.idle.clone().unwrap_or_default();
        let (send, conn) = hyper::client::conn::http1::handshake(c).await?;
        Ok(H1Conn {
            send,
            conn,
            done: false,
            info,
            idle,
        })
    }

    /// Polls the connection (writing the request, reading the response head) until
    /// the response head is in.
    async fn send(
        &mut self,
        req: Request<OutBody>,
    ) -> Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<OutBody>>> {
        let answer = self.send.try_send_request(req);
        let mut answer = std::pin::pin!(answer);
        std::future::poll_fn(|cx| {
            self.drive(cx);
            answer.as_mut().poll(cx)
        })
        .await
    }

    /// Lets the connection make progress; once it has completed it is not polled again.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if !self.done && Pin::new(&mut self.conn).poll(cx).is_ready() {
            self.done = true;
        }
    }

    /// Whether the connection is open and ready for a request, after letting it
    /// catch up (a close that has arrived is read here). Its wakeups go nowhere: an
    /// idle connection is not watched.
    fn settle(&mut self) -> bool {
        self.drive(&mut Context::from_waker(std::task::Waker::noop()));
        !self.done && self.send.is_ready()
    }
}

/// A response body as it comes from upstream.
pub enum UpBody {
    /// From a pooled HTTP/1.1 connection, which goes back to the pool at its end.
    Pooled(Pooled),
    /// From the shared (HTTP/2) client, or an upgrade's own connection.
    Shared(Incoming),
}

impl UpBody {
    /// The pooled connection that carries this body (for a shared HTTP/2 connection,
    /// the response's extensions say it).
    pub fn conn_info(&self) -> Option<&ConnInfo> {
        match self {
            UpBody::Pooled(p) => p.conn.as_ref().map(|c| &c.info),
            UpBody::Shared(_) => None,
        }
    }
}

impl std::fmt::Debug for UpBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpBody::Pooled(_) => f.write_str("UpBody::Pooled"),
            UpBody::Shared(_) => f.write_str("UpBody::Shared"),
        }
    }
}

/// The body of a response on a pooled HTTP/1.1 connection; reading it drives the
/// connection, and dropping it after its end returns the connection to the pool.
pub struct Pooled {
    body: Incoming,
    /// Boxed: the connection state is large, and the body moves between futures.
    conn: Option<Box<H1Conn>>,
    pool: Arc<Pool>,
    /// The last frame has been read.
    ended: bool,
}

impl hyper::body::Body for UpBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        match self.get_mut() {
            UpBody::Shared(b) => Pin::new(b).poll_frame(cx),
            UpBody::Pooled(p) => {
                if let Some(c) = p.conn.as_mut() {
                    c.drive(cx);
                }
                let r = Pin::new(&mut p.body).poll_frame(cx);
                match &r {
                    Poll::Ready(None) => p.ended = true,
                    Poll::Ready(Some(Ok(_))) => p.ended = p.body.is_end_stream(),
                    _ => {}
                }
                r
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Shared(b) => b.is_end_stream(),
            UpBody::Pooled(p) => p.ended || p.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            UpBody::Shared(b) => b.size_hint(),
            UpBody::Pooled(p) => p.body.size_hint(),
        }
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        // A body left unread would leave its bytes on the connection: then it closes.
        if (self.ended || hyper::body::Body::is_end_stream(&self.body))
            && let Some(conn) = self.conn.take()
        {
            self.pool.release(conn);
        }
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
    /// An HTTP/2 connection opened for a pooled HTTP/1.1 request, which learnt that
    /// way that the upstream speaks HTTP/2: the shared client's next connection.
    parked: Arc<Mutex<Option<Conn>>>,
}

/// What a response learns about the connection that carried it: from the body of a
/// pooled HTTP/1.1 response ([`UpBody::conn_info`]), else a response extension set by
/// hyper-util from [`Connection::connected`].
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
    /// `http_upstream_connections_idle`, for an HTTP/1.1 connection.
    idle: Option<ShardedGauge>,
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
        // The URI names the upstream as a whole; the endpoint is chosen per
        // connection, by the same code that serves `tcp` and `postgres` listeners.
        let this = self.clone();
        Box::pin(async move {
            if let Some(c) = this.parked.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return Ok(c);
            }
            this.open().await
        })
    }
}

impl Connector {
    /// Opens a connection to one of the upstream's endpoints.
    async fn open(&self) -> Result<Conn, PoolConnectError> {
        let version = self.version;
        let up = self.upstream.upgrade().ok_or(PoolConnectError::Removed)?;
        let c = up
            .connect(Handshake::Http(version), self.tag.as_deref(), None)
            .await?;
        let h2 = c.io.alpn_h2() || version == HttpVersion::Http2;
        let labels = HttpConnectionLabels {
            upstream: up.config.name.clone(),
            endpoint: c.endpoint.config.address.clone(),
            protocol: if h2 { "http2" } else { "http1" },
        };
        up.metrics().http_connections_opened.get_or_create(&labels).inc();
        let open = up.metrics().http_connections_open.get_or_create(&labels).clone();
        open.inc();
        let idle = (!h2).then(|| up.metrics().http_connections_idle.get_or_create(&labels).clone());
        tracing::debug!(upstream = %up.config.name, endpoint = %c.endpoint.config.address, h2, "pooled upstream connection opened");
        Ok(Conn {
            io: TokioIo::new(c.io),
            open,
            idle,
            h2,
            info: ConnInfo {
                endpoint: c.endpoint,
                opened: Instant::now(),
            },
        })
    }
}

impl Conn {
    /// The connection's byte stream (for the fast path, which speaks HTTP/1.1 on it
    /// itself).
    pub(super) fn io(&mut self) -> &mut UpstreamIo {
        self.io.inner_mut()
    }

    /// Which endpoint it reached, and when.
    pub(super) fn info(&self) -> &ConnInfo {
        &self.info
    }

    /// Nothing has arrived on the idle connection: no close, no stray bytes. Its
    /// wakeups go nowhere: an idle connection is not watched.
    fn quiet(&mut self) -> bool {
        let mut byte = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        tokio::io::AsyncRead::poll_read(Pin::new(self.io.inner_mut()), &mut cx, &mut buf).is_pending()
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
