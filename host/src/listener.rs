//! Listeners: accept on a local address, enforce `max_connections`, read the
//! protocol preamble, connect upstream and forward. Each connection is its own task;
//! whatever goes wrong in it is logged and closes that connection only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
    labels: ListenerLabels,
}

impl ListenerState {
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
        shared
            .tracker
            .spawn(async move { serve(shared2, st, sock, peer, permit).await });
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
    sock: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
    let m = &shared.metrics;
    m.connections.get_or_create(&st.labels).inc();
    let active = m.connections_active.get_or_create(&st.labels).clone();
    active.inc();
    let _ = sock.set_nodelay(true);
    match st.config.protocol {
        Protocol::Postgres => serve_postgres(&shared, &st, sock, peer).await,
        _ => serve_tcp(&shared, &st, sock, peer).await,
    }
    active.dec();
}

fn counters(shared: &Shared, st: &ListenerState) -> ByteCounters {
    let get = |direction| {
        shared
            .metrics
            .bytes
            .get_or_create(&BytesLabels {
                listener: st.config.name.clone(),
                direction,
            })
            .clone()
    };
    ByteCounters {
        to_upstream: get("to_upstream"),
        to_client: get("to_client"),
    }
}

async fn serve_tcp(shared: &Shared, st: &ListenerState, sock: TcpStream, peer: SocketAddr) {
    let Some(up) = shared.upstream(&st.config.upstream) else {
        reject(shared, st, "no_upstream");
        return;
    };
    let connected = match up.connect(Handshake::Raw).await {
        Ok(c) => c,
        Err(e) => {
            reject(shared, st, "upstream_unreachable");
            tracing::warn!(listener = %st.config.name, %peer, error = %e, "closing client: no upstream connection");
            return;
        }
    };
    finish(shared, st, sock, peer, connected, None).await;
}

async fn serve_postgres(shared: &Shared, st: &ListenerState, mut sock: TcpStream, peer: SocketAddr) {
    let preamble = match tokio::time::timeout(PREAMBLE_TIMEOUT, postgres::read_preamble(&mut sock)).await {
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
            return;
        }
        Err(_) => {
            reject(shared, st, "preamble_timeout");
            tracing::info!(listener = %st.config.name, %peer, "closing client: no startup packet within {PREAMBLE_TIMEOUT:?}");
            return;
        }
    };
    let packet = match preamble {
        Preamble::Cancel { packet, pid, key } => {
            cancel(shared, st, pid, &key, &packet).await;
            return;
        }
        Preamble::Startup { ref packet, .. } => packet.clone(),
    };
    let Some(up) = shared.upstream(&st.config.upstream) else {
        reject(shared, st, "no_upstream");
        return;
    };
    let mut connected = match up.connect(Handshake::Postgres).await {
        Ok(c) => c,
        Err(e) => {
            reject(shared, st, "upstream_unreachable");
            tracing::warn!(listener = %st.config.name, %peer, error = %e, "closing client: no upstream connection");
            let msg = format!(
                "wasmbassador: cannot reach upstream {:?}: {}",
                up.config.name, e.last
            );
            let _ = sock.write_all(&postgres::error_response("08006", &msg)).await;
            return;
        }
    };
    if let Err(e) = connected.io.write_all(&packet).await {
        tracing::warn!(listener = %st.config.name, %peer, error = %e, "upstream closed before the startup message");
        return;
    }
    let watcher = KeyWatcher::new(
        shared.cancels.clone(),
        CancelTarget {
            upstream: up.clone(),
            address: connected.endpoint.config.address.clone(),
            peer: connected.peer,
        },
    );
    finish(shared, st, sock, peer, connected, Some(watcher)).await;
}

async fn finish(
    shared: &Shared,
    st: &ListenerState,
    sock: TcpStream,
    peer: SocketAddr,
    connected: crate::upstream::Connected,
    watcher: Option<KeyWatcher>,
) {
    let endpoint = connected.endpoint.config.address.clone();
    tracing::debug!(listener = %st.config.name, %peer, %endpoint, tls = connected.io.tls_version().unwrap_or("off"), "connected");
    let result = forward(
        sock,
        connected.io,
        st.config.idle_timeout,
        counters(shared, st),
        watcher,
        shared.hard_stop.clone(),
    )
    .await;
    match result {
        Ok(t) if t.ending == Ending::Idle => {
            tracing::info!(listener = %st.config.name, %peer, %endpoint, "closed idle connection")
        }
        Ok(t) => {
            tracing::debug!(listener = %st.config.name, %peer, %endpoint, to_upstream = t.to_upstream, to_client = t.to_client, ending = ?t.ending, "connection closed")
        }
        Err(e) => {
            tracing::debug!(listener = %st.config.name, %peer, %endpoint, error = %e, "connection ended with an error")
        }
    }
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
