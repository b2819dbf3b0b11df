//! Active health checks: one task per upstream that probes every endpoint each
//! `health.interval`. The task holds only a weak reference, so it ends by itself
//! when a reload replaces or removes the upstream.

use std::sync::{Arc, Weak};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::HealthCheck;
use crate::connect::resolve;
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
