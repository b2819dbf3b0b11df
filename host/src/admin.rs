//! The admin HTTP server (hyper): probes, metrics and JSON status.
//!
//! | path | answers |
//! |---|---|
//! | `/healthz` | 200 while the process answers |
//! | `/startup` | 200 once config is loaded and listeners are bound |
//! | `/ready` | 200 when started and not draining (and, with `ready_requires_upstream`, every upstream has a healthy endpoint); the body reports upstream health either way |
//! | `/metrics` | Prometheus text |
//! | `/upstreams` | JSON: endpoints, health, ejections |
//! | `/listeners` | JSON: bound addresses and open connections (and `request_timeout` of `http` listeners) |
//! | `/plugins` | JSON: name, path, sha256, loaded_at, generation, calls, errors, timeouts, last_error |

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::ambassador::Shared;

/// A client gets this long to send each request head: a connection that trickles one
/// (or sits idle between requests) is closed rather than held open forever.
const ADMIN_HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves admin requests until `stop`.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let (sock, _) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(&shared, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(ADMIN_HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(sock), service)
                .await;
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => reply(StatusCode::OK, "application/json", body),
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
    }
}

fn route(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "only GET\n");
    }
    match req.uri().path() {
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n"),
        "/startup" if shared.started() => reply(StatusCode::OK, TEXT, "started\n"),
        "/startup" => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "starting\n"),
        "/ready" => ready(shared),
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics.encode(),
        ),
        "/upstreams" => {
            let ups = shared.upstreams.load();
            let mut list: Vec<_> = ups.values().map(|u| u.status()).collect();
            list.sort_by(|a, b| a.name.cmp(&b.name));
            json(&list)
        }
        "/listeners" => json(&shared.listener_status()),
        "/plugins" => json(&crate::plugin::status(&shared.plugins.load())),
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found; try /healthz /startup /ready /metrics /upstreams /listeners /plugins\n",
        ),
    }
}

fn ready(shared: &Shared) -> Response<Full<Bytes>> {
    let requires = shared.config.load().admin.ready_requires_upstream;
    let ups = shared.upstreams.load();
    let mut names: Vec<_> = ups.keys().collect();
    names.sort();
    let mut report = String::new();
    let mut all_up = true;
    for name in names {
        let u = &ups[name];
        let avail = u.endpoints.iter().filter(|e| e.healthy() && !e.ejected()).count();
        all_up &= avail > 0;
        report.push_str(&format!(
            "upstream {name}: {avail}/{} endpoints available\n",
            u.endpoints.len()
        ));
    }
    let (status, head) = if !shared.started() {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    } else if shared.draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if requires && !all_up {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: an upstream has no available endpoint\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    };
    reply(status, "text/plain; charset=utf-8", format!("{head}{report}"))
}
