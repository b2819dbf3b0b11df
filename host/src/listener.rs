//! Listeners: accept on a local address, enforce `max_connections`, read the
//! protocol preamble, connect upstream and forward. Each connection is its own task;
//! whatever goes wrong in it is logged and closes that connection only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::ambassador::Shared;
use crate::config::{ListenerConfig, Protocol};
use crate::connect::Handshake;
use crate::forward::{ByteCounters, Ending, forward};
use crate::metrics::{BytesLabels, ListenerLabels, RejectLabels, ResultLabels};
use crate::plugin::chain::{Chain, ChainCache, Decision};
use crate::plugin::{
    CloseInfo, ConnectInfo, Outcome, PostgresStartup, Protocol as PluginProtocol, RouteTarget,
};
use crate::postgres::{self, CancelTarget, KeyWatcher, Preamble, PreambleError};

/// A slow or silent client gets this long to send its PostgreSQL startup packet.
const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The live settings of one listener; replaced whole on reload.
#[derive(Debug)]
pub struct ListenerState {
    /// As configured.
    pub config: ListenerConfig,
    /// Open-connection limit (`max_connections`).
    pub limit: Arc<Semaphore>,
    /// The current versions of `config.plugins`, for each new connection or request.
    pub chain: ChainCache,
    /// `http_requests` counters by status class (see `http::serve`), looked up once.
    pub(crate) http_requests: [std::sync::OnceLock<crate::metrics::ShardedCounter>; 5],
    /// The series every connection records into, looked up once: per connection,
    /// four labelled lookups (hashed, under the families' locks, two with a `String`
    /// clone) cost more than the counting itself.
    conn_metrics: std::sync::OnceLock<ConnMetrics>,
    labels: ListenerLabels,
}

/// See [`ListenerState`]'s `conn_metrics`.
#[derive(Debug)]
pub(crate) struct ConnMetrics {
    connections: prometheus_client::metrics::counter::Counter,
    active: prometheus_client::metrics::gauge::Gauge,
    /// Bytes both ways; `http` listeners count them too.
    pub(crate) bytes: ByteCounters,
}

impl ListenerState {
    /// This listener's per-connection series (see `conn_metrics`).
    pub(crate) fn conn_metrics(&self, shared: &Shared) -> &ConnMetrics {
        self.conn_metrics.get_or_init(|| {
            let m = &shared.metrics;
            let bytes = |direction| {
                m.bytes
                    .get_or_create(&BytesLabels {
                        listener: self.config.name.clone(),
                        direction,
                    })
                    .clone()
            };
            ConnMetrics {
                connections: m.connections.get_or_create(&self.labels).clone(),
                active: m.connections_active.get_or_create(&self.labels).clone(),
                bytes: ByteCounters {
                    to_upstream: bytes("to_upstream"),
                    to_client: bytes("to_client"),
                },
            }
        })
    }

    /// Settings for `config`, keeping `previous`'s limit when it did not change, so
    /// that connections opened before a reload still count against it.
    pub fn new(config: ListenerConfig, previous: Option<&ListenerState>) -> Self {
        let limit = match previous {
            Some(p) if p.config.max_connections == config.max_connections => p.limit.clone(),
            _ => Arc::new(Semaphore::new(config.max_connections)),
        };
        Self {
            labels: ListenerLabels {
                listener: config.name.clone(),
            },
            config,
            limit,
            chain: ChainCache::default(),
            http_requests: Default::default(),
            conn_metrics: Default::default(),
        }
    }
}

/// A bound, running listener.
#[derive(Debug)]
pub struct ListenerHandle {
    /// Current settings.
    pub state: Arc<ArcSwap<ListenerState>>,
    /// The address actually bound.
    pub local_addr: SocketAddr,
    /// Stops accepting (open connections go on).
    pub stop: CancellationToken,
}

/// Accepts until `stop`; every connection runs on the shared task tracker.
pub async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    state: Arc<ArcSwap<ListenerState>>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let (sock, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Usually EMFILE: back off instead of spinning; the listener stays up.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let st = state.load_full();
        let Ok(permit) = st.limit.clone().try_acquire_owned() else {
            reject(&shared, &st, "max_connections");
            tracing::warn!(listener = %st.config.name, %peer, limit = st.config.max_connections, "max_connections reached; connection closed");
            drop(sock);
            continue;
        };
        let shared2 = shared.clone();
        let stop2 = stop.clone();
        let Some(workers) = &shared.workers else {
            shared
                .tracker
                .spawn(async move { serve(shared2, st, sock, peer, permit, stop2).await });
            continue;
        };
        // To a connection thread: the socket leaves this runtime's reactor and joins
        // that thread's.
        let sock = match sock.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(listener = %st.config.name, %peer, error = %e, "cannot hand the connection to a connection thread");
                continue;
            }
        };
        let (thread, assigned) = workers.pick();
        shared.tracker.spawn_on(
            async move {
                let _assigned = assigned;
                match TcpStream::from_std(sock) {
                    Ok(sock) => serve(shared2, st, sock, peer, permit, stop2).await,
                    Err(e) => {
                        tracing::warn!(listener = %st.config.name, %peer, error = %e, "cannot register the connection on its thread")
                    }
                }
            },
            thread,
        );
    }
}

fn reject(shared: &Shared, st: &ListenerState, reason: &str) {
    shared
        .metrics
        .connections_rejected
        .get_or_create(&RejectLabels {
            listener: st.config.name.clone(),
            reason: reason.to_string(),
        })
        .inc();
}

async fn serve(
    shared: Arc<Shared>,
    st: Arc<ListenerState>,
    mut sock: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
    stop: CancellationToken,
) {
    let cm = st.conn_metrics(&shared);
    cm.connections.inc();
    let active = &cm.active;
    active.inc();
    let _ = sock.set_nodelay(true);
    if st.config.protocol == Protocol::Http {
        // Requests, not connections, meet upstreams here: each goes through the
        // upstream's pool (and, later, the per-request plugin hooks).
        crate::http::serve(shared.clone(), st.clone(), sock, peer, stop).await;
        active.dec();
        return;
    }
    let started = Instant::now();
    let startup = match st.config.protocol {
        Protocol::Postgres => read_startup(&shared, &st, &mut sock, peer).await.map(Some),
        _ => Some(None),
    };
    if let Some(startup) = startup {
        let mut chain = Chain::new(&st.chain, &shared.plugins, &st.config.plugins);
        // Its text fields are moved in from the `on-connect` arguments when there is
        // a chain (see `session`), and stay empty (no allocation) when there is not.
        let mut close = CloseInfo {
            listener: String::new(),
            client_addr: String::new(),
            upstream: None,
            endpoint: None,
            bytes_to_upstream: 0,
            bytes_to_client: 0,
            duration_ns: 0,
            outcome: Outcome::Error,
            user: None,
            database: None,
        };
        close.outcome = session(&shared, &st, sock, peer, startup, &mut chain, &mut close).await;
        if !chain.is_empty() {
            close.duration_ns = started.elapsed().as_nanos() as u64;
            chain.on_close(&close);
        }
    }
    active.dec();
}

/// A PostgreSQL startup message, read and not yet forwarded.
struct Startup {
    packet: Vec<u8>,
    params: Vec<(String, String)>,
}

/// Reads the preamble of a `postgres` connection. `None` when the connection is
/// finished already: a CancelRequest (handled here), or a refused preamble.
async fn read_startup(
    shared: &Shared,
    st: &ListenerState,
    sock: &mut TcpStream,
    peer: SocketAddr,
) -> Option<Startup> {
    let preamble = match tokio::time::timeout(PREAMBLE_TIMEOUT, postgres::read_preamble(sock)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            reject(shared, st, "bad_preamble");
            tracing::info!(listener = %st.config.name, %peer, error = %e, "closing client: bad startup");
            if let PreambleError::Malformed(reason) = &e {
                let _ = sock
                    .write_all(&postgres::error_response(
                        "08P01",
                        &format!("wasmbassador: {reason}"),
                    ))
                    .await;
            }
            return None;
        }
        Err(_) => {
            reject(shared, st, "preamble_timeout");
            tracing::info!(listener = %st.config.name, %peer, "closing client: no startup packet within {PREAMBLE_TIMEOUT:?}");
            return None;
        }
    };
    match preamble {
        // A CancelRequest skips the plugin chain: it goes to the session's server.
        Preamble::Cancel { packet, pid, key } => {
            cancel(shared, st, pid, &key, &packet).await;
            None
        }
        Preamble::Startup { packet, params } => Some(Startup { packet, params }),
    }
}

/// Refuses a client: an ErrorResponse on `postgres` listeners, a close on `tcp`.
async fn refuse(sock: &mut TcpStream, startup: &Option<Startup>, sqlstate: &str, message: &str) {
    if startup.is_some() {
        let _ = sock.write_all(&postgres::error_response(sqlstate, message)).await;
    }
}

/// Plugins, upstream choice, connect and forward for one client connection. Fills in
/// `close` as it learns and returns how the connection ended.
async fn session(
    shared: &Shared,
    st: &ListenerState,
    mut sock: TcpStream,
    peer: SocketAddr,
    startup: Option<Startup>,
    chain: &mut Chain,
    close: &mut CloseInfo,
) -> Outcome {
    let mut upstream_name = st.config.upstream.clone();
    let mut tag = None;
    let mut routed_by = None;
    if !chain.is_empty() {
        let info = connect_info(st, peer, &startup);
        let decision = chain.on_connect(&info);
        // `on-close` gets the same listener, address, user and database.
        close.listener = info.listener;
        close.client_addr = info.client_addr;
        if let Some(pg) = info.postgres {
            close.user = pg.user;
            close.database = pg.database;
        }
        match decision {
            Decision::Deny { plugin, reason } => {
                shared.metrics.plugin_denials.get_or_create(&st.labels).inc();
                tracing::info!(listener = %st.config.name, %peer, %plugin, %reason, "connection denied by plugin");
                refuse(&mut sock, &startup, "28000", &reason).await;
                return Outcome::Denied;
            }
            Decision::Allow {
                route: Some((target, plugin)),
            } => {
                match target {
                    RouteTarget::Upstream(u) => upstream_name = u,
                    RouteTarget::Tag(t) => tag = Some(t),
                }
                routed_by = Some(plugin);
            }
            Decision::Allow { route: None } => {}
        }
    }
    let Some(up) = shared.upstream(&upstream_name) else {
        reject(shared, st, "no_upstream");
        let by = routed_by.as_deref().unwrap_or("the listener");
        tracing::warn!(listener = %st.config.name, %peer, upstream = %upstream_name, routed_by = by, "closing client: no such upstream");
        let msg = format!("wasmbassador: no upstream named {upstream_name:?} (chosen by {by})");
        refuse(&mut sock, &startup, "08006", &msg).await;
        return Outcome::Error;
    };
    close.upstream = Some(upstream_name);
    let handshake = if startup.is_some() {
        Handshake::Postgres
    } else {
        Handshake::Raw
    };
    let packet = startup.as_ref().map(|s| s.packet.as_slice());
    let connected = match up.connect(handshake, tag.as_deref(), packet).await {
        Ok(c) => c,
        Err(e) => {
            reject(shared, st, "upstream_unreachable");
            tracing::warn!(listener = %st.config.name, %peer, error = %e, "closing client: no upstream connection");
            // A server that turned the session away on every attempt: the client gets
            // the server's own SQLSTATE (57P03 and kin), which PostgreSQL clients know
            // to retry later, and its message.
            if let crate::connect::DialError::NotAccepting {
                sqlstate, message, ..
            } = &e.last
            {
                refuse(&mut sock, &startup, sqlstate, message).await;
                return Outcome::UpstreamUnreachable;
            }
            let msg = format!(
                "wasmbassador: cannot reach upstream {:?}: {}",
                up.config.name, e.last
            );
            refuse(&mut sock, &startup, "08006", &msg).await;
            return Outcome::UpstreamUnreachable;
        }
    };
    let endpoint = connected.endpoint.config.address.clone();
    close.endpoint = Some(endpoint.clone());
    let byte_counters = st.conn_metrics(shared).bytes.clone();
    let mut watcher = match &startup {
        None => None,
        Some(s) => {
            // The startup message is the client's, sent on by `connect`: it counts as
            // forwarded.
            let sent = s.packet.len() as u64;
            byte_counters.to_upstream.inc_by(sent);
            close.bytes_to_upstream = sent;
            Some(KeyWatcher::new(
                shared.cancels.clone(),
                CancelTarget {
                    upstream: up.clone(),
                    address: endpoint.clone(),
                    peer: connected.peer,
                },
            ))
        }
    };
    // What the server already answered goes to the client first.
    if !connected.first.is_empty() {
        if let Some(w) = watcher.as_mut() {
            w.feed(&connected.first);
        }
        if let Err(e) = sock.write_all(&connected.first).await {
            tracing::debug!(listener = %st.config.name, %peer, error = %e, "client gone before the server's first answer");
            return Outcome::Error;
        }
        let sent = connected.first.len() as u64;
        byte_counters.to_client.inc_by(sent);
        close.bytes_to_client = sent;
    }
    tracing::debug!(listener = %st.config.name, %peer, %endpoint, tls = connected.io.tls_version().unwrap_or("off"), "connected");
    let t = forward(
        sock,
        connected.io,
        st.config.idle_timeout,
        byte_counters,
        watcher,
        shared.hard_stop.clone(),
    )
    .await;
    close.bytes_to_upstream += t.to_upstream;
    close.bytes_to_client += t.to_client;
    match (&t.ending, &t.error) {
        (_, Some(e)) if upstream_tls_alert(e) => {
            // With TLS 1.3 the upstream checks a client certificate only after the
            // handshake has completed on our side, so a missing or refused one shows
            // up here, as an alert, rather than as a connect failure.
            tracing::warn!(listener = %st.config.name, %peer, %endpoint, error = %e, "closing client: the upstream ended the TLS session with an alert (is a client certificate required?)");
            Outcome::Error
        }
        (_, Some(e)) => {
            tracing::debug!(listener = %st.config.name, %peer, %endpoint, error = %e, "connection ended with an error");
            Outcome::Error
        }
        (Ending::Idle, None) => {
            tracing::info!(listener = %st.config.name, %peer, %endpoint, "closed idle connection");
            Outcome::IdleTimeout
        }
        (Ending::Stopped, None) => Outcome::Error,
        (Ending::Closed, None) => {
            tracing::debug!(listener = %st.config.name, %peer, %endpoint, to_upstream = t.to_upstream, to_client = t.to_client, "connection closed");
            Outcome::Completed
        }
    }
}

fn connect_info(st: &ListenerState, peer: SocketAddr, startup: &Option<Startup>) -> ConnectInfo {
    let protocol = match st.config.protocol {
        Protocol::Tcp => PluginProtocol::Tcp,
        Protocol::Postgres => PluginProtocol::Postgres,
        Protocol::Http => PluginProtocol::Http,
    };
    ConnectInfo {
        listener: st.config.name.clone(),
        protocol,
        client_addr: crate::plugin::addr_text(peer),
        upstream: st.config.upstream.clone(),
        postgres: startup.as_ref().map(|s| {
            let get = |name: &str| s.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
            PostgresStartup {
                user: get("user"),
                database: get("database"),
                application_name: get("application_name"),
                // The three named fields are not repeated here (the SDK's contract).
                parameters: s
                    .params
                    .iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "user" | "database" | "application_name"))
                    .cloned()
                    .collect(),
            }
        }),
    }
}

/// Whether a forwarding error is a TLS alert from the upstream (rustls reports it
/// through tokio-rustls as an `io::Error`; the client side is plain TCP).
fn upstream_tls_alert(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| matches!(r, rustls::Error::AlertReceived(_)))
}

async fn cancel(shared: &Shared, st: &ListenerState, pid: u32, key: &[u8], packet: &[u8]) {
    let result = |r| ResultLabels { result: r };
    let Some(target) = shared.cancels.lookup(pid, key) else {
        shared
            .metrics
            .cancel_requests
            .get_or_create(&result("unknown_session"))
            .inc();
        tracing::info!(listener = %st.config.name, pid, "CancelRequest for an unknown session dropped");
        return;
    };
    match postgres::forward_cancel(&target, packet).await {
        Ok(()) => {
            shared
                .metrics
                .cancel_requests
                .get_or_create(&result("forwarded"))
                .inc();
            tracing::info!(listener = %st.config.name, pid, endpoint = %target.address, "CancelRequest forwarded");
        }
        Err(e) => {
            shared
                .metrics
                .cancel_requests
                .get_or_create(&result("failed"))
                .inc();
            tracing::warn!(listener = %st.config.name, pid, endpoint = %target.address, error = %e, "CancelRequest could not be delivered");
        }
    }
}
