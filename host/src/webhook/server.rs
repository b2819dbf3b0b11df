//! The thin HTTPS layer around [`super::review`]: TLS with a reloading certificate,
//! HTTP/1.1 with hyper, routing, body limits and the decision log.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::cert::{CertReloader, Refresh};
use super::review::{self, OptIn};
use super::{Settings, WebhookError};

/// The largest request body read. Kubernetes objects are at most 1.5 MiB (etcd's
/// limit) and an AdmissionReview carries at most two of them (`object`, `oldObject`);
/// anything larger is not from the API server.
pub const MAX_BODY: usize = 4 * 1024 * 1024;
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that has not sent a request's headers by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A request whose body has not arrived by then is answered 408.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed on accept. The API server opens a few;
/// the bound keeps any other peer on the cluster network from holding memory (up to
/// [`MAX_BODY`] each) without end.
const MAX_CONNECTIONS: usize = 256;
/// After shutdown, requests under way get this long to be answered.
const GRACE: Duration = Duration::from_secs(10);
/// Besides file events, the certificate files are re-read this often: some volume
/// types do not report changes.
const CERT_POLL: Duration = Duration::from_secs(10);

pub(super) async fn serve(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WebhookError> {
    let certs = Arc::new(CertReloader::load(&settings.cert, &settings.key)?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(WebhookError::Tls)?
        .with_no_client_auth()
        .with_cert_resolver(certs.clone());
    // Only HTTP/1.1 is served; the API server falls back to it.
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));

    let address = listener.local_addr().map_err(WebhookError::Listen)?;
    let stop = CancellationToken::new();
    // Stops the certificate watcher and the connections however this returns.
    let _stop_on_return = stop.clone().drop_guard();
    let watcher = watch_certs(certs, stop.clone())?;
    let options = Arc::new(settings.options);
    let tracker = TaskTracker::new();
    let room = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tracing::info!(%address, image = %options.image, "webhook listening");
    tokio::pin!(shutdown);
    loop {
        let (sock, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "webhook accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = room.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "webhook connection closed: {MAX_CONNECTIONS} already open");
            continue;
        };
        let served = connection(sock, peer, acceptor.clone(), options.clone(), stop.clone());
        tracker.spawn(async move {
            served.await;
            drop(permit);
        });
    }
    tracing::info!("webhook stopping: no new connections; answering requests under way");
    stop.cancel();
    tracker.close();
    if tokio::time::timeout(GRACE, tracker.wait()).await.is_err() {
        tracing::warn!("webhook: requests still under way after {GRACE:?}; closing them");
    }
    drop(watcher);
    Ok(())
}

/// Refreshes `certs` on every debounced change in the folders of its files, and every
/// [`CERT_POLL`]; logs what happened. Stops with `stop`.
fn watch_certs(
    certs: Arc<CertReloader>,
    stop: CancellationToken,
) -> Result<Vec<notify::RecommendedWatcher>, WebhookError> {
    let mut watchers = Vec::new();
    let (tx, mut changes) = tokio::sync::mpsc::channel(1);
    // reload::watch watches the folder of the file it is given.
    let mut files = vec![certs.cert_path().to_path_buf()];
    if certs.key_path().parent() != certs.cert_path().parent() {
        files.push(certs.key_path().to_path_buf());
    }
    for file in files {
        let (watcher, mut events) = crate::reload::watch(&file).map_err(WebhookError::Watch)?;
        watchers.push(watcher);
        let tx = tx.clone();
        tokio::spawn(async move {
            while events.recv().await.is_some() {
                let _ = tx.try_send(());
            }
        });
    }
    tokio::spawn(async move {
        let mut poll = tokio::time::interval(CERT_POLL);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = poll.tick() => {}
                Some(()) = changes.recv() => {}
            }
            match certs.refresh() {
                Refresh::Unchanged => {}
                Refresh::Reloaded => tracing::info!(
                    cert = %certs.cert_path().display(),
                    "webhook certificate changed; new handshakes use the new one"
                ),
                Refresh::Refused(e) => tracing::warn!(
                    error = %e,
                    "webhook certificate files changed but cannot be used; the previous certificate keeps serving"
                ),
            }
        }
    });
    Ok(watchers)
}

async fn connection(
    sock: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    options: Arc<crate::inject::InjectOptions>,
    stop: CancellationToken,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            // Most often an API server whose caBundle does not match the certificate.
            tracing::warn!(%peer, error = %e, "webhook TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "webhook TLS handshake timed out");
            return;
        }
    };
    let service = hyper::service::service_fn(move |req| {
        let options = options.clone();
        async move { Ok::<_, Infallible>(route(req, &options).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = stop.cancelled() => {
            // Finish the request under way, then close the kept-alive connection.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

const TEXT: &str = "text/plain; charset=utf-8";

async fn route(req: Request<Incoming>, options: &crate::inject::InjectOptions) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (req.method(), OptIn::from_path(path)) {
        (&Method::POST, Some(opt_in)) => admit(req, opt_in, options).await,
        (_, Some(_)) => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "admission paths take POST\n",
        ),
        (&Method::GET | &Method::HEAD, None) if path == "/healthz" => reply(StatusCode::OK, TEXT, "ok\n"),
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found; this webhook serves POST /mutate, POST /mutate-namespace and GET /healthz\n",
        ),
    }
}

async fn admit(
    req: Request<Incoming>,
    opt_in: OptIn,
    options: &crate::inject::InjectOptions,
) -> Response<Full<Bytes>> {
    let read = tokio::time::timeout(BODY_TIMEOUT, Limited::new(req.into_body(), MAX_BODY).collect());
    let body = match read.await {
        Ok(Ok(body)) => body.to_bytes(),
        Err(_) => {
            tracing::warn!(
                path = opt_in.path(),
                "webhook request refused: body not received within {BODY_TIMEOUT:?}"
            );
            return reply(
                StatusCode::REQUEST_TIMEOUT,
                TEXT,
                format!("the body did not arrive within {BODY_TIMEOUT:?}\n"),
            );
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            tracing::warn!(
                path = opt_in.path(),
                "webhook request refused: body over {MAX_BODY} bytes"
            );
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                TEXT,
                format!("the body is over {MAX_BODY} bytes; an AdmissionReview is never that large\n"),
            );
        }
        Ok(Err(e)) => {
            tracing::warn!(path = opt_in.path(), error = %e, "webhook request body unreadable");
            return reply(
                StatusCode::BAD_REQUEST,
                TEXT,
                format!("cannot read the body: {e}\n"),
            );
        }
    };
    match review::review(&body, opt_in, options) {
        Ok(a) => {
            // Names only: the pod spec may carry secrets in its environment. Quoted
            // (Debug): mutating admission runs before validation, so a name may hold
            // anything, a line break included.
            tracing::info!(
                path = opt_in.path(),
                namespace = ?a.namespace,
                pod = ?a.pod,
                uid = ?a.uid,
                dry_run = a.dry_run,
                decision = %a.decision,
                "admission"
            );
            match serde_json::to_vec(&a.response) {
                Ok(json) => reply(StatusCode::OK, "application/json", json),
                Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e}\n")),
            }
        }
        Err(e) => {
            tracing::warn!(path = opt_in.path(), error = %e, "webhook request is not an AdmissionReview");
            reply(StatusCode::BAD_REQUEST, TEXT, format!("{e}\n"))
        }
    }
}
