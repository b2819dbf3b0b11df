//! Active health checks: one task per upstream that probes every endpoint each
//! `health.interval`. The task holds only a weak reference, so it ends by itself
//! when a reload replaces or removes the upstream.

use std::sync::{Arc, Weak};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{HealthCheck, HttpVersion, PostgresTls};
use crate::connect::{Handshake, dial, resolve};
use crate::postgres::SSL_REQUEST;
use crate::upstream::{Endpoint, Upstream};

/// Starts the health loop of `upstream` on the current runtime.
pub fn spawn(upstream: &Arc<Upstream>) {
    let weak: Weak<Upstream> = Arc::downgrade(upstream);
    let interval = upstream.config.health.interval;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(up) = weak.upgrade() else { return };
            let probes = up.endpoints.iter().map(|ep| {
                let up = up.clone();
                let ep = ep.clone();
                async move {
                    let result = probe(&up, &ep).await;
                    up.record_check(&ep, result);
                }
            });
            futures_util::future::join_all(probes).await;
            up.publish_ejections();
        }
    });
}

async fn probe(up: &Upstream, ep: &Endpoint) -> Result<(), String> {
    let h = &up.config.health;
    let check = h.check;
    if check == HealthCheck::Http {
        return tokio::time::timeout(h.timeout, http_probe(up, ep))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", h.timeout)));
    }
    let address = ep.config.address.clone();
    let run = async move {
        let peer = resolve(&address).await.map_err(|e| e.to_string())?[0];
        let mut tcp = TcpStream::connect(peer)
            .await
            .map_err(|e| format!("TCP connect to {peer}: {e}"))?;
        if check == HealthCheck::Postgres {
            // A server that answers an SSLRequest with S or N is a live PostgreSQL
            // postmaster; no credentials needed, no backend started.
            tcp.write_all(&SSL_REQUEST).await.map_err(|e| e.to_string())?;
            let mut answer = [0u8; 1];
            tcp.read_exact(&mut answer)
                .await
                .map_err(|e| format!("no answer to SSLRequest: {e}"))?;
            if !matches!(answer[0], b'S' | b'N') {
                return Err(format!("unexpected SSLRequest answer {:#04x}", answer[0]));
            }
        }
        Ok(())
    };
    tokio::time::timeout(h.timeout, run)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", h.timeout)))
}

/// The most of a health answer's body that is read.
const HEALTH_BODY_LIMIT: usize = 64 * 1024;

/// `GET health.path` on one endpoint, over the upstream's TLS (verified like any
/// other connection to it) and with the `Host` that requests get; HTTP/2 when ALPN
/// (or `http.version = "http2"`) says so, else HTTP/1.1. A fresh connection each
/// time: the probe asks whether the endpoint accepts connections and answers, which
/// a pooled connection would not show.
async fn http_probe(up: &Upstream, ep: &Endpoint) -> Result<(), String> {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let h = &up.config.health;
    let version = up.config.http.version;
    let (io, _) = dial(
        &ep.config.address,
        up.tls.as_ref(),
        PostgresTls::default(),
        Handshake::Http(version),
        up.config.connect_timeout,
    )
    .await
    .map_err(|e| e.to_string())?;
    let h2 = io.alpn_h2() || version == HttpVersion::Http2;
    let authority = crate::http::headers::upstream_authority(&up.config)?;
    let request = |target: String| {
        hyper::Request::get(target)
            .header(hyper::header::HOST, authority.as_str())
            .header(hyper::header::USER_AGENT, "wasmbassador-health")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("health request: {e}"))
    };
    let response = if h2 {
        let scheme = if up.tls.is_some() { "https" } else { "http" };
        let req = request(format!("{scheme}://{authority}{}", h.path))?;
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        tokio::spawn(conn);
        send.send_request(req).await
    } else {
        let req = request(h.path.clone())?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
        tokio::spawn(conn);
        send.send_request(req).await
    }
    .map_err(|e| format!("GET {}: {e}", h.path))?;
    let status = response.status().as_u16();
    // Read the body so the connection ends cleanly; its content is not judged, and
    // past HEALTH_BODY_LIMIT (an endpoint streaming without end, say) it is dropped.
    let _ = http_body_util::Limited::new(response.into_body(), HEALTH_BODY_LIMIT)
        .collect()
        .await;
    let healthy = match h.expect {
        Some(want) => status == want,
        None => (200..300).contains(&status),
    };
    if healthy {
        Ok(())
    } else {
        let want = h.expect.map_or("a 2xx".to_string(), |w| w.to_string());
        Err(format!("GET {} answered {status}, expected {want}", h.path))
    }
}
