//! `http` listeners: the application speaks HTTP/1.1 or HTTP/2 in plain text (h2c,
//! by prior knowledge), and each request goes to the listener's upstream through
//! that upstream's connection [`pool`].
//!
//! Per request: hop-by-hop fields are dropped and `Via` is added ([`headers`]),
//! `Host` / `:authority` becomes the upstream's, and the bodies stream both ways
//! frame by frame (trailers included), never buffered whole. An upstream that cannot
//! be reached gives the app a 502 naming it; no response head within
//! `request_timeout` gives a 504. A malformed or oversized request head is answered
//! by hyper with 400 or 431 and ends that connection only.
//!
//! `X-Forwarded-For` is not added: the application is on loopback, so its address
//! tells the remote service nothing, and the ambassador acts for the application
//! rather than in front of a server.

mod fast;
pub mod headers;
mod hooks;
pub use hooks::apply_header_edits;
pub mod pool;
pub mod retry;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONNECTION, HOST, HeaderValue, UPGRADE};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::capture_connection;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::ambassador::Shared;
use crate::config::HttpVersion;
use crate::connect::{DialError, Handshake};
use crate::listener::ListenerState;
use crate::metrics::ShardedCounter;
use crate::metrics::{HttpRequestLabels, HttpRetryLabels};
use crate::upstream::Upstream;
use pool::{ConnInfo, PoolConnectError, SendError, UpBody};

/// Without `idle_timeout`, an HTTP/1.1 client gets this long to send each complete
/// request head. hyper starts this clock when it waits for the next request, so it
/// also closes keep-alive connections idle this long: long enough that client pools
/// rarely race a close, short enough to bound slowloris heads.
const HEAD_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest request head accepted; beyond it HTTP/1.1 clients get a 431.
const MAX_HEAD: usize = 64 * 1024;

/// What the app receives: the upstream's body, or a short local answer.
pub type Body = Either<pool::UpBody, Full<Bytes>>;

/// Serves one application connection until it closes, the listener stops (then
/// gracefully: in-flight requests finish), `idle_timeout` passes without a byte
/// either way, or the drain timeout ends.
pub async fn serve(
    shared: Arc<Shared>,
    st: Arc<ListenerState>,
    sock: TcpStream,
    peer: SocketAddr,
    stop: CancellationToken,
) {
    let hard_stop = shared.hard_stop.clone();
    let idle = st.config.idle_timeout;
    let listener = st.config.name.clone();
    // Only an idle timeout needs to know when bytes last moved. An upgraded tunnel
    // runs on this same connection (hyper hands its I/O over), so it notes its
    // activity here too.
    let activity = idle.map(|_| Activity::new());
    let ctx = Arc::new(Ctx {
        shared,
        st,
        peer,
        client_addr: std::sync::OnceLock::new(),
        activity: activity.clone(),
        prepared: std::sync::Mutex::new(None),
    });
    let bytes = ctx.st.conn_metrics(&ctx.shared).bytes.clone();
    let service_ctx = ctx.clone();
    let service = hyper::service::service_fn(move |req| {
        let ctx = service_ctx.clone();
        async move { Ok::<_, Infallible>(ctx.proxy(req).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(idle.unwrap_or(HEAD_TIMEOUT))
        .max_buf_size(MAX_HEAD);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD as u32);
    let mut app = AppConn {
        sock,
        from_app: bytes.to_upstream,
        to_app: bytes.to_client,
        activity: activity.clone(),
        replay: bytes::BytesMut::new(),
    };
    // Requests take the fast path while they suit it; from the first one that does
    // not, hyper serves the connection.
    match ctx.serve_fast(&mut app, &stop, &hard_stop).await {
        fast::End::Closed => return,
        fast::End::Hyper(read) => app.replay = read,
    }
    let io = TokioIo::new(app);
    // Upgrades (WebSocket) hand the connection to `upgrade`, which then owns it.
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let stopped = stop.cancelled();
    let hard = hard_stop.cancelled();
    tokio::pin!(stopped, hard);
    let signals = Signals::new();
    let mut closing = false;
    loop {
        let idle_deadline = idle.zip(activity.as_ref()).map(|(d, a)| a.last() + d);
        let idle_wait = sleep_until(idle_deadline);
        tokio::pin!(idle_wait);
        let event = std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                return Poll::Ready(Event::Ended(r));
            }
            if let Some(mut scx) = signals.due(cx) {
                if hard.as_mut().poll(&mut scx).is_ready() {
                    return Poll::Ready(Event::HardStop);
                }
                if !closing && stopped.as_mut().poll(&mut scx).is_ready() {
                    return Poll::Ready(Event::Stop);
                }
            }
            if idle_wait.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Idle);
            }
            Poll::Pending
        })
        .await;
        match event {
            Event::Ended(r) => {
                if let Err(e) = r {
                    tracing::debug!(%listener, %peer, error = %e, "http connection ended with an error");
                }
                return;
            }
            Event::Stop => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            Event::HardStop => return,
            Event::Idle => {
                // Bytes may have moved while this slept: look again.
                if let Some(d) = idle
                    && let Some(a) = &activity
                    && a.last() + d <= Instant::now()
                {
                    if closing {
                        // Still nothing moving a whole idle_timeout after asking the
                        // connection to finish (a head that never completes, say):
                        // close it outright.
                        tracing::info!(%listener, %peer, "closing http connection that stayed idle while shutting down");
                        return;
                    }
                    tracing::info!(%listener, %peer, "closing idle http connection");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// What ended a wait of [`serve`]'s loop.
enum Event<E> {
    Ended(Result<(), E>),
    Stop,
    HardStop,
    Idle,
}

/// Polls the stop signals of a connection only when they have woken its task: each
/// poll of a cancellation future takes two locks, and a connection's task wakes
/// several times per request.
struct Signals {
    state: Arc<SignalWaker>,
    /// Wakes through `state`: sets `woke`, then wakes the task.
    waker: std::task::Waker,
}

struct SignalWaker {
    woke: std::sync::atomic::AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for SignalWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woke.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Signals {
    fn new() -> Self {
        let state = Arc::new(SignalWaker {
            // The first poll registers the signals' waker.
            woke: std::sync::atomic::AtomicBool::new(true),
            task: futures_util::task::AtomicWaker::new(),
        });
        let waker = std::task::Waker::from(state.clone());
        Signals { state, waker }
    }

    /// Notes the task's waker; a context to poll the signals with, when they are due.
    fn due(&self, cx: &Context<'_>) -> Option<Context<'_>> {
        self.state.task.register(cx.waker());
        self.state
            .woke
            .swap(false, Ordering::AcqRel)
            .then(|| Context::from_waker(&self.waker))
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

struct Ctx {
    shared: Arc<Shared>,
    st: Arc<ListenerState>,
    peer: SocketAddr,
    /// `peer` as text for the plugins, made once per connection.
    client_addr: std::sync::OnceLock<String>,
    /// When bytes last moved on the app connection (with an `idle_timeout` only).
    activity: Option<Activity>,
    /// A request whose hooks ran on the fast path before it handed the connection to
    /// hyper: hyper's first request, which must not meet the hooks again.
    prepared: std::sync::Mutex<Option<hooks::Prepared>>,
}

/// Where a request goes, after the plugins.
struct Plan<'a> {
    /// The upstream's name.
    upstream: &'a str,
    /// Only its endpoints with this tag.
    tag: Option<&'a str>,
    /// A plugin marked the request retryable.
    retryable: bool,
    /// The plugin that chose the target, for error texts.
    routed_by: Option<&'a str>,
}

/// What happened to a request on its way upstream (for `on-response`).
#[derive(Debug, Default)]
struct Trace {
    /// The endpoint that answered.
    endpoint: Option<Arc<crate::upstream::Endpoint>>,
    /// Tries sent.
    attempts: u32,
    /// The response is the upstream's (not a local one).
    from_upstream: bool,
}

impl Ctx {
    async fn proxy(&self, mut req: Request<Incoming>) -> Response<Body> {
        // Once, for the plugins and the upstream alike; an upgrade keeps its
        // `Connection` and `Upgrade` until `upgrade` sets up the next hop.
        if !headers::wants_upgrade(&req) {
            headers::strip_hop_by_hop(req.headers_mut(), true);
        }
        let resp = if self.st.config.plugins.is_empty() {
            let plan = Plan {
                upstream: &self.st.config.upstream,
                tag: None,
                retryable: false,
                routed_by: None,
            };
            self.forward(req, &plan, &mut Trace::default()).await
        } else {
            self.with_plugins(req).await
        };
        self.st.http_requests(&self.shared.metrics, resp.status()).inc();
        resp
    }

    /// Sends the request where `plan` says; its hop-by-hop fields are already gone
    /// (see `proxy`), unless it asks for an upgrade.
    async fn forward(&self, req: Request<Incoming>, plan: &Plan<'_>, trace: &mut Trace) -> Response<Body> {
        let name = plan.upstream;
        if req.method() == http::Method::CONNECT {
            // A tunnel would bypass everything this listener is for; the upstream is
            // fixed by configuration anyway.
            return local(
                StatusCode::METHOD_NOT_ALLOWED,
                "wasmbassador: CONNECT is not supported on http listeners\n".into(),
            );
        }
        let up = match self.upstream_for(name, plan.tag, plan.routed_by) {
            Ok(up) => up,
            Err((status, text)) => return local(status, text),
        };
        if headers::wants_upgrade(&req) {
            return self.upgrade(&up, req).await;
        }
        let pool = &up.http_pool(plan.tag);
        if let Err(e) = &pool.authority {
            return local(
                StatusCode::BAD_GATEWAY,
                format!("wasmbassador: upstream {name:?}: {e}\n"),
            );
        }
        let received = req.version();
        let (mut parts, body) = req.into_parts();
        // The pool's authority becomes `Host` (HTTP/1.1; the app's field is
        // overwritten in place, so the map does not grow for it) or `:authority`
        // (HTTP/2, where a `Host` from the app would contradict it).
        match pool.host() {
            Some(host) if !pool.is_h2() => {
                parts.headers.insert(HOST, host.clone());
            }
            _ => {
                parts.headers.remove(HOST);
            }
        }
        // Hop-by-hop fields went in `proxy`.
        headers::add_via(&mut parts.headers, received);
        // The target goes up in origin form, which HTTP/1.1 sends as it is; the pool
        // makes the absolute form only for an HTTP/2 connection. A request that came
        // in origin form (every HTTP/1.1 one from an app) keeps its URI untouched.
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            parts.uri = parts
                .uri
                .path_and_query()
                .cloned()
                .map_or_else(|| Uri::from_static("/"), Uri::from);
        }
        // The pool picks HTTP/1.1 or HTTP/2 per connection; a request marked HTTP/2
        // would be refused by an HTTP/1.1 connection.
        parts.version = Version::HTTP_11;
        let timeout = self.st.config.request_timeout();
        let deadline = Instant::now() + timeout;
        let empty = hyper::body::Body::is_end_stream(&body);
        let mut retryable = retry::retryable(&parts.method, empty) || (plan.retryable && empty);
        // A body is kept for more tries only when a plugin asked for them and its size,
        // known in advance, is within `buffer_body`.
        let mut kept = Bytes::new();
        let mut streamed = Some(body);
        if plan.retryable
            && !empty
            && let Some(len) = streamed
                .as_ref()
                .and_then(|b| hyper::body::Body::size_hint(b).exact())
            && len <= pool.retry.buffer_body
            && let Some(body) = streamed.take()
        {
            use http_body_util::BodyExt;
            kept = match tokio::time::timeout_at(deadline.into(), body.collect()).await {
                Ok(Ok(c)) => c.to_bytes(),
                Ok(Err(e)) => {
                    return local(
                        StatusCode::BAD_REQUEST,
                        format!("wasmbassador: cannot read the request body: {e}\n"),
                    );
                }
                Err(_) => {
                    return local(
                        StatusCode::REQUEST_TIMEOUT,
                        "wasmbassador: the request body did not arrive within request_timeout\n".into(),
                    );
                }
            };
            retryable = true;
        }
        pool.budget.deposit();
        let attempts = if retryable { pool.retry.attempts.max(1) } else { 1 };
        let mut try_no = 0;
        loop {
            try_no += 1;
            trace.attempts = try_no;
            let last_try = try_no >= attempts;
            let mut outbound = if retryable {
                let mut b = Request::builder()
                    .method(parts.method.clone())
                    .uri(parts.uri.clone())
                    .version(parts.version);
                if let Some(h) = b.headers_mut() {
                    *h = parts.headers.clone();
                }
                match b.body(Either::Right(Full::new(kept.clone()))) {
                    Ok(r) => r,
                    Err(e) => {
                        return local(
                            StatusCode::BAD_REQUEST,
                            format!("wasmbassador: unusable request: {e}\n"),
                        );
                    }
                }
            } else {
                let Some(body) = streamed.take() else {
                    // Unreachable: a streamed request has one try.
                    return local(StatusCode::BAD_GATEWAY, "wasmbassador: no body to send\n".into());
                };
                let mut r = Request::new(Either::Left(body));
                *r.method_mut() = parts.method.clone();
                *r.uri_mut() = parts.uri.clone();
                *r.version_mut() = parts.version;
                *r.headers_mut() = std::mem::take(&mut parts.headers);
                r
            };
            // Only a shared HTTP/2 connection is reached through this (to retire it past
            // `max_lifetime`); the pool's HTTP/1.1 connections check their age
            // themselves. It costs a channel and an extension map per request.
            let captured = pool.is_h2().then(|| capture_connection(&mut outbound));
            let left = deadline.saturating_duration_since(Instant::now());
            let this_try = pool.retry.per_try_timeout.map_or(left, |p| p.min(left));
            let sent = Instant::now();
            let reason = match tokio::time::timeout(this_try, pool.send(outbound)).await {
                Err(_) if last_try || Instant::now() >= deadline => {
                    tracing::warn!(listener = %self.st.config.name, upstream = %name, ?timeout, "no response head in time");
                    return local(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!("wasmbassador: upstream {name:?} did not answer within {this_try:?}\n"),
                    );
                }
                Err(_) => "timeout",
                // Connect failures were retried already, across endpoints, by the
                // connector (`upstream.retry`).
                Ok(Err(e)) if last_try || e.is_connect() => return self.failed(&up, &e),
                Ok(Err(e)) => {
                    tracing::debug!(listener = %self.st.config.name, upstream = %name, error = %e, "request reset upstream");
                    "reset"
                }
                Ok(Ok(resp)) if !last_try && retry::retry_status(resp.status()) => {
                    tracing::debug!(listener = %self.st.config.name, upstream = %name, status = %resp.status(), "upstream answered with a retryable status");
                    if !self.may_retry(pool, "status") {
                        return self.respond(pool, resp, captured.as_ref(), sent, received, trace);
                    }
                    // Dropping it unread gives up that connection; the next try may
                    // use another.
                    drop(resp);
                    retry_pause(&up, deadline).await;
                    continue;
                }
                Ok(Ok(resp)) => return self.respond(pool, resp, captured.as_ref(), sent, received, trace),
            };
            if !self.may_retry(pool, reason) {
                let (status, text) = budget_spent(name, reason);
                return local(status, text);
            }
        }
    }

    /// The upstream a request is sent to, or the 502 for one that is not configured
    /// or has no endpoint with `tag` (`routed_by`: the plugin that chose it).
    fn upstream_for(
        &self,
        name: &str,
        tag: Option<&str>,
        routed_by: Option<&str>,
    ) -> Result<Arc<Upstream>, (StatusCode, String)> {
        let by = || {
            routed_by
                .map(|p| format!(" (chosen by plugin {p:?})"))
                .unwrap_or_default()
        };
        let Some(up) = self.shared.upstream(name) else {
            tracing::warn!(listener = %self.st.config.name, upstream = %name, plugin = ?routed_by, "request for an upstream that is not configured");
            return Err((
                StatusCode::BAD_GATEWAY,
                format!("wasmbassador: no upstream named {name:?}{}\n", by()),
            ));
        };
        if let Some(tag) = tag
            && !up.has_tag(tag)
        {
            tracing::warn!(listener = %self.st.config.name, upstream = %name, %tag, plugin = ?routed_by, "request for a tag no endpoint carries");
            return Err((
                StatusCode::BAD_GATEWAY,
                format!(
                    "wasmbassador: no endpoint of upstream {name:?} has tag {tag:?}{}\n",
                    by()
                ),
            ));
        }
        Ok(up)
    }

    /// An HTTP/1.1 `Upgrade` (WebSocket): on a connection of its own, never pooled and
    /// never retried, offering only HTTP/1.1 (an upgrade cannot cross HTTP/2). The
    /// request goes up with its `Upgrade` and `Connection: upgrade`; if the upstream
    /// answers 101, both sides are switched and the bytes copied both ways until either
    /// closes or the drain timeout ends. Any other answer is passed on as it is.
    async fn upgrade(&self, up: &Arc<Upstream>, mut req: Request<Incoming>) -> Response<Body> {
        let name = &up.config.name;
        // The tunnel outlives this app connection's task (hyper hands the socket over
        // after the 101), so it holds a `max_connections` permit of its own.
        let Ok(permit) = self.st.limit.clone().try_acquire_owned() else {
            return local(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "wasmbassador: listener {:?} is at max_connections; no room for an upgraded connection\n",
                    self.st.config.name
                ),
            );
        };
        let authority = match headers::upstream_authority(&up.config) {
            Ok(a) => a,
            Err(e) => {
                return local(
                    StatusCode::BAD_GATEWAY,
                    format!("wasmbassador: upstream {name:?}: {e}\n"),
                );
            }
        };
        let connected = match up.connect(Handshake::Http(HttpVersion::Http1), None, None).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(listener = %self.st.config.name, upstream = %name, error = %e, "upgrade: no upstream connection");
                return local(
                    StatusCode::BAD_GATEWAY,
                    format!("wasmbassador: cannot reach upstream {name:?}: {}\n", e.last),
                );
            }
        };
        let (mut send, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(connected.io)).await {
            Ok(pair) => pair,
            Err(e) => {
                return local(
                    StatusCode::BAD_GATEWAY,
                    format!("wasmbassador: upstream {name:?}: {e}\n"),
                );
            }
        };
        tokio::spawn(conn.with_upgrades());
        let app_side = hyper::upgrade::on(&mut req);
        let received = req.version();
        let (mut parts, body) = req.into_parts();
        upgrade_hop(&mut parts.headers, received);
        parts.headers.insert(
            HOST,
            HeaderValue::from_str(authority.as_str()).unwrap_or(HeaderValue::from_static("localhost")),
        );
        parts.version = Version::HTTP_11;
        let outbound = Request::from_parts(parts, body);
        let timeout = self.st.config.request_timeout();
        let mut resp = match tokio::time::timeout(timeout, send.send_request(outbound)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                return local(
                    StatusCode::BAD_GATEWAY,
                    format!("wasmbassador: upstream {name:?}: {e}\n"),
                );
            }
            Err(_) => {
                return local(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "wasmbassador: upstream {name:?} did not answer the upgrade within {timeout:?}\n"
                    ),
                );
            }
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let (mut parts, body) = resp.into_parts();
            headers::strip_hop_by_hop(&mut parts.headers, false);
            headers::add_via(&mut parts.headers, parts.version);
            parts.version = received;
            return Response::from_parts(parts, Either::Left(UpBody::Shared(body)));
        }
        let upstream_side = hyper::upgrade::on(&mut resp);
        let listener = self.st.config.name.clone();
        let idle = self.st.config.idle_timeout;
        let activity = self.activity.clone();
        let hard_stop = self.shared.hard_stop.clone();
        // On the tracker, so that a drain waits for open tunnels like for connections.
        self.shared.tracker.spawn(async move {
            let _permit = permit;
            let (app, upstream) = match tokio::try_join!(app_side, upstream_side) {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!(%listener, error = %e, "upgrade did not complete");
                    return;
                }
            };
            // The listener's idle_timeout holds for the tunnel too: no byte either way
            // for that long closes it.
            let mut app = TokioIo::new(app);
            let mut upstream = TokioIo::new(upstream);
            let copy = tokio::io::copy_bidirectional(&mut app, &mut upstream);
            tokio::pin!(copy);
            loop {
                let deadline = idle.zip(activity.as_ref()).map(|(d, a)| a.last() + d);
                tokio::select! {
                    r = copy.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(%listener, error = %e, "upgraded connection ended with an error");
                        }
                        return;
                    }
                    _ = hard_stop.cancelled() => return,
                    _ = sleep_until(deadline), if deadline.is_some() => {
                        if let Some(d) = idle
                            && let Some(a) = &activity
                            && a.last() + d <= Instant::now()
                        {
                            tracing::info!(%listener, "closing idle upgraded connection");
                            return;
                        }
                    }
                }
            }
        });
        // The 101 goes back with the upstream's `Upgrade` and `Connection: upgrade`.
        let (mut parts, _) = resp.into_parts();
        upgrade_hop(&mut parts.headers, parts.version);
        Response::from_parts(parts, Either::Right(Full::new(Bytes::new())))
    }

    /// Asks the budget for one retry and counts the answer.
    fn may_retry(&self, pool: &pool::Pool, reason: &'static str) -> bool {
        let ok = pool.budget.withdraw();
        self.shared
            .metrics
            .http_retries
            .get_or_create(&HttpRetryLabels {
                listener: self.st.config.name.clone(),
                reason,
                outcome: if ok { "retried" } else { "budget_exhausted" },
            })
            .inc();
        ok
    }

    /// Passes an upstream response on: latency recorded, `max_lifetime` applied,
    /// hop-by-hop fields dropped, `Via` added.
    fn respond(
        &self,
        pool: &pool::Pool,
        resp: Response<UpBody>,
        captured: Option<&hyper_util::client::legacy::connect::CaptureConnection>,
        sent: Instant,
        received: Version,
        trace: &mut Trace,
    ) -> Response<Body> {
        trace.from_upstream = true;
        let info = resp
            .body()
            .conn_info()
            .or_else(|| resp.extensions().get::<ConnInfo>());
        if let Some(info) = info {
            trace.endpoint = Some(info.endpoint.clone());
            info.endpoint
                .http_duration(&self.shared.metrics)
                .observe(sent.elapsed());
            if info.opened.elapsed() >= pool.max_lifetime
                && let Some(captured) = captured
                && let Some(c) = captured.connection_metadata().as_ref()
            {
                c.poison();
            }
        }
        let (mut parts, body) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, false);
        headers::add_via(&mut parts.headers, parts.version);
        parts.version = received;
        Response::from_parts(parts, Either::Left(body))
    }

    /// The answer to a request the upstream did not answer: 504 when the connect
    /// attempts timed out, else 502, naming the upstream and the last reason.
    fn failed(&self, up: &Upstream, e: &SendError) -> Response<Body> {
        let (status, text) = self.failure(up, e);
        local(status, text)
    }

    /// The status and text of [`Ctx::failed`]'s answer (the fast path writes it
    /// itself).
    fn failure(&self, up: &Upstream, e: &SendError) -> (StatusCode, String) {
        let name = &up.config.name;
        let top: &(dyn std::error::Error + 'static) = match e {
            SendError::Connect(p) => p,
            SendError::Http(h) => h,
            SendError::Shared(l) => l,
            SendError::Target(t) => t,
            SendError::Io(i) => i,
        };
        let mut reason = top.to_string();
        let mut source = match e {
            SendError::Connect(_) => Some(top),
            _ => top.source(),
        };
        let mut status = StatusCode::BAD_GATEWAY;
        while let Some(s) = source {
            if let Some(p) = s.downcast_ref::<PoolConnectError>() {
                if let PoolConnectError::Upstream(c) = p
                    && matches!(c.last, DialError::Timeout(_))
                {
                    status = StatusCode::GATEWAY_TIMEOUT;
                }
                reason = p.to_string();
                break;
            }
            reason = format!("{reason}: {s}");
            source = s.source();
        }
        tracing::warn!(listener = %self.st.config.name, upstream = %name, %status, error = %reason, "upstream request failed");
        (
            status,
            format!("wasmbassador: cannot reach upstream {name:?}: {reason}\n"),
        )
    }
}

/// The wait before another try: the upstream's `retry.backoff`, cut short by the
/// request's deadline.
async fn retry_pause(up: &Upstream, deadline: Instant) {
    tokio::time::sleep(
        up.config
            .retry
            .backoff
            .min(deadline.saturating_duration_since(Instant::now())),
    )
    .await;
}

/// The answer when a try failed for `reason` and the budget allows no other.
fn budget_spent(upstream: &str, reason: &str) -> (StatusCode, String) {
    let status = if reason == "timeout" {
        StatusCode::GATEWAY_TIMEOUT
    } else {
        StatusCode::BAD_GATEWAY
    };
    let text = format!(
        "wasmbassador: upstream {upstream:?} failed the request ({reason}) and the retry budget is spent\n"
    );
    (status, text)
}

/// The header rules of one hop of an upgrade: hop-by-hop fields go, `Via` is added,
/// and `Upgrade` with `Connection: upgrade` are set again for the next hop.
fn upgrade_hop(h: &mut http::HeaderMap, received: Version) {
    let protocol = h.get(UPGRADE).cloned();
    headers::strip_hop_by_hop(h, false);
    headers::add_via(h, received);
    if let Some(p) = protocol {
        h.insert(UPGRADE, p);
        h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

fn local(status: StatusCode, text: String) -> Response<Body> {
    hooks::Early::text(status, text).into_response()
}

/// The status classes, in the order of [`ListenerState::http_requests`]'s counters.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn status_class(s: StatusCode) -> usize {
    (s.as_u16() / 100).clamp(1, 5) as usize - 1
}

impl ListenerState {
    /// This listener's `http_requests` counter for `status`'s class, looked up once
    /// per class rather than per request (a label `String` and a hashed lookup).
    fn http_requests(&self, metrics: &crate::metrics::Metrics, status: StatusCode) -> &ShardedCounter {
        let class = status_class(status);
        self.http_requests[class].get_or_init(|| {
            metrics
                .http_requests
                .get_or_create(&HttpRequestLabels {
                    listener: self.config.name.clone(),
                    class: STATUS_CLASSES[class],
                })
                .clone()
        })
    }
}

/// When bytes last moved on a connection, as milliseconds since it opened (one
/// atomic store per read or write, no lock).
#[derive(Clone)]
struct Activity {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// The app connection: its bytes go into `listener_bytes` (for an `http` listener,
/// `to_upstream` is what the app sent and `to_client` what it received, heads
/// included, as they travel on this connection), and every read or write is noted
/// as activity for `idle_timeout`.
struct AppConn {
    sock: TcpStream,
    from_app: ShardedCounter,
    to_app: ShardedCounter,
    /// With an `idle_timeout` only.
    activity: Option<Activity>,
    /// Bytes the fast path read and handed over to hyper, read again first.
    replay: bytes::BytesMut,
}

impl AppConn {
    fn wrote(&self, r: &Poll<io::Result<usize>>) {
        if let Poll::Ready(done) = r {
            if let Ok(n) = done {
                self.to_app.inc_by(*n as u64);
            }
            if let Some(a) = &self.activity {
                a.touch();
            }
        }
    }
}

impl tokio::io::AsyncRead for AppConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.replay.is_empty() {
            // Counted when they were read the first time.
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.sock).poll_read(cx, buf);
        if r.is_ready() {
            this.from_app.inc_by((buf.filled().len() - before) as u64);
            if let Some(a) = &this.activity {
                a.touch();
            }
        }
        r
    }
}

impl tokio::io::AsyncWrite for AppConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.sock).poll_write(cx, buf);
        this.wrote(&r);
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.sock).poll_write_vectored(cx, bufs);
        this.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.sock.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().sock).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().sock).poll_shutdown(cx)
    }
}
