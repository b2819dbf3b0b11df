//! `http` listeners end to end: an application speaking plain HTTP/1.1 or h2c to
//! wasmbassador, real hyper HTTPS servers (certificates from the test CA) as
//! upstreams, with HTTP/1.1 or HTTP/2 chosen by ALPN. Covers header rewriting,
//! streamed bodies of 100 MiB both ways (checked by SHA-256), trailers, connection
//! reuse, failover between endpoints, 502/504 and bad input.

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use support::Pki;
use support::process::{http_get, metric_value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use wasmbassador::{Ambassador, Config};

/// Generous limit for anything one step waits for.
const PATIENCE: Duration = Duration::from_secs(60);
/// The name the test servers' certificates carry and wasmbassador verifies.
const SERVER_NAME: &str = "api.test.internal";
/// Size of each body in the large-body test.
const LARGE: usize = 100 * 1024 * 1024;
/// Chunk size of generated bodies.
const CHUNK: usize = 64 * 1024;

type TestBody = BoxBody<Bytes, Infallible>;

// ---------------------------------------------------------------- test upstream

/// A real HTTPS server (hyper over tokio-rustls) that offers `alpn` and counts the
/// TLS connections it accepted. Stopping it closes its listener and every open
/// connection.
struct Upstream {
    addr: SocketAddr,
    tls_connections: Arc<AtomicUsize>,
    hits: Hits,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start(pki: &Pki, name: &'static str, alpn: &[&[u8]]) -> Upstream {
        let acceptor = tls_acceptor(pki, alpn);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding upstream");
        let addr = listener.local_addr().expect("upstream address");
        let tls_connections = Arc::new(AtomicUsize::new(0));
        let counter = tls_connections.clone();
        let hits = Hits::default();
        let hits2 = hits.clone();
        let task = tokio::spawn(async move {
            // Connections live in this set, so aborting the accept task closes them.
            let mut conns = JoinSet::new();
            loop {
                let (tcp, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                };
                let acceptor = acceptor.clone();
                let counter = counter.clone();
                let hits = hits2.clone();
                conns.spawn(async move {
                    // Health checks connect and close without TLS: not counted.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    counter.fetch_add(1, Ordering::SeqCst);
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    serve_http(TokioIo::new(tls), h2, name, hits).await;
                });
            }
        });
        Upstream {
            addr,
            tls_connections,
            hits,
            task,
        }
    }

    /// A plain-text server: HTTP/1.1, or HTTP/2 by prior knowledge (h2c).
    async fn start_plain(name: &'static str, h2: bool) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding upstream");
        let addr = listener.local_addr().expect("upstream address");
        let hits = Hits::default();
        let hits2 = hits.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let (tcp, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                };
                conns.spawn(serve_http(TokioIo::new(tcp), h2, name, hits2.clone()));
            }
        });
        Upstream {
            addr,
            tls_connections: Arc::new(AtomicUsize::new(0)),
            hits,
            task,
        }
    }

    /// Requests seen for `path?query`.
    fn hits(&self, target: &str) -> usize {
        self.hits
            .0
            .lock()
            .map(|h| h.get(target).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn accepted(&self) -> usize {
        self.tls_connections.load(Ordering::SeqCst)
    }

    /// Closes the listener and every connection (the JoinSet is dropped with the task).
    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// A TLS acceptor with a certificate for [`SERVER_NAME`] from the test CA, offering
/// `alpn`.
fn tls_acceptor(pki: &Pki, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
    let cert = pki.server_cert(&[SERVER_NAME]);
    let chain = CertificateDer::pem_file_iter(&cert.cert)
        .expect("server certificate file")
        .collect::<Result<Vec<_>, _>>()
        .expect("server certificate");
    let key = PrivateKeyDer::from_pem_file(&cert.key).expect("server key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server TLS config");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

async fn serve_http<I>(io: I, h2: bool, name: &'static str, hits: Hits)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| handle(name, hits.clone(), req));
    if h2 {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, service)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .with_upgrades()
            .await;
    }
}

/// Requests seen per `path?query`.
#[derive(Clone, Default)]
struct Hits(Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>);

/// The upstream's routes:
/// - `GET /hello`: `x-server`, and what arrived: `x-seen-version`, `x-seen-host`
///   (Host or `:authority`), `x-seen-target` (the request target as parsed),
///   `x-seen-headers` (sorted names);
/// - `POST /upload`: hashes the body as it streams; answers `x-sha256`, `x-bytes` and
///   `x-trailer-checksum` (the request trailer `x-checksum`, if any);
/// - `GET /download?bytes=N&length=1`: N generated bytes, with `content-length` when
///   asked, else chunked / unsized; trailer `x-sha256` on HTTP/2;
/// - `/echo`: the request's header fields as sorted `name: value` lines;
/// - `/flaky-503?...`: 503 the first time, then 200; `/flaky-reset?...`: the first
///   time the request is reset (the service fails: HTTP/1.1 closes the connection,
///   HTTP/2 resets the stream), then 200; `/always-503`: 503.
async fn handle(
    name: &'static str,
    hits: Hits,
    req: Request<Incoming>,
) -> Result<Response<TestBody>, std::io::Error> {
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let seen = {
        let mut h = hits.0.lock().expect("hits");
        let n = h.entry(target).or_insert(0);
        *n += 1;
        *n
    };
    let version = format!("{:?}", req.version());
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let mut names: Vec<String> = req.headers().keys().map(|k| k.to_string()).collect();
    names.sort();
    names.dedup();
    let authorization = req.headers().get("authorization").cloned();
    let mut resp = Response::builder()
        .header("x-server", name)
        .header(
            "x-seen-authorization",
            authorization.unwrap_or(HeaderValue::from_static("")),
        )
        .header("x-seen-version", version.clone())
        .header("x-seen-host", host)
        .header("x-seen-target", req.uri().to_string())
        .header("x-seen-headers", names.join(","));
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let body: TestBody = match path.as_str() {
        "/upload" => {
            let mut body = req.into_body();
            let mut digest = Sha256::new();
            let mut bytes = 0usize;
            let mut trailer = None;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return Ok(text(StatusCode::BAD_REQUEST, "body broke off"));
                };
                match frame.into_data() {
                    Ok(d) => {
                        digest.update(&d);
                        bytes += d.len();
                    }
                    Err(f) => {
                        if let Ok(t) = f.into_trailers() {
                            trailer = t.get("x-checksum").cloned();
                        }
                    }
                }
            }
            resp = resp
                .header("x-sha256", hex(&digest.finalize()))
                .header("x-bytes", bytes.to_string());
            if let Some(t) = trailer {
                resp = resp.header("x-trailer-checksum", t);
            }
            Full::new(Bytes::from_static(b"stored\n")).boxed()
        }
        "/download" => {
            let params: BTreeMap<&str, &str> = query.split('&').filter_map(|kv| kv.split_once('=')).collect();
            let n: usize = params.get("bytes").and_then(|b| b.parse().ok()).unwrap_or(0);
            if params.get("length") == Some(&"1") {
                resp = resp.header("content-length", n.to_string());
            }
            let trailers = version == "HTTP/2.0";
            pattern_body(n, trailers)
        }
        "/flaky-503" | "/always-503" if seen == 1 || path == "/always-503" => {
            // Read the request body first, as a server that closes gracefully does:
            // answering while it still arrives makes the server close with unread
            // bytes, and the kernel's reset can then discard the 503 before the proxy
            // reads it (so the test would see a 502 now and then).
            let mut body = req.into_body();
            while let Some(Ok(_)) = body.frame().await {}
            return Ok(text(StatusCode::SERVICE_UNAVAILABLE, "try again\n"));
        }
        "/early-413" => {
            // Refuses the upload from its head alone, and drops the body in the
            // background, as nginx discards a refused body: a server that closed with
            // the body unread would reset the connection, and a reset can destroy
            // the answer before anyone reads it.
            let mut body = req.into_body();
            tokio::spawn(async move { while let Some(Ok(_)) = body.frame().await {} });
            return Ok(text(StatusCode::PAYLOAD_TOO_LARGE, "too large\n"));
        }
        "/ws" => return Ok(websocket_echo(name, req)),
        "/echo" => {
            let mut lines: Vec<String> = req
                .headers()
                .iter()
                .map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes())))
                .collect();
            lines.sort();
            Full::new(Bytes::from(lines.join("\n") + "\n")).boxed()
        }
        "/healthz" if name.starts_with("sick") => {
            return Ok(text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"));
        }
        "/flaky-reset" if seen == 1 => {
            return Err(std::io::Error::other("reset on purpose"));
        }
        _ => Full::new(Bytes::from(format!("hello from {name}\n"))).boxed(),
    };
    Ok(resp
        .body(body)
        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "bad response")))
}

/// Accepts a WebSocket handshake (RFC 6455) and echoes every text and binary message,
/// prefixed with the server's name; anything else on `/ws` gets a 400.
fn websocket_echo(name: &'static str, mut req: Request<Incoming>) -> Response<TestBody> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;

    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return text(StatusCode::BAD_REQUEST, "not a WebSocket handshake\n");
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                .await;
        while let Some(Ok(msg)) = ws.next().await {
            let answer = match msg {
                Message::Text(t) => Message::text(format!("{name}: {t}")),
                Message::Binary(b) => Message::binary(b),
                Message::Close(_) => break,
                _ => continue,
            };
            if ws.send(answer).await.is_err() {
                break;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
        .body(Empty::new().boxed())
        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "bad response"))
}

fn text(status: StatusCode, t: &'static str) -> Response<TestBody> {
    let mut r = Response::new(Full::new(Bytes::from_static(t.as_bytes())).boxed());
    *r.status_mut() = status;
    r
}

/// Chunk `i` of a generated body: bytes that differ by position, so a lost, doubled
/// or reordered chunk changes the digest.
fn chunk(i: usize, len: usize) -> Bytes {
    Bytes::from((0..len).map(|k| (i * 31 + k * 7) as u8).collect::<Vec<u8>>())
}

fn pattern_digest(n: usize) -> String {
    let mut d = Sha256::new();
    let mut i = 0;
    while i * CHUNK < n {
        d.update(chunk(i, CHUNK.min(n - i * CHUNK)));
        i += 1;
    }
    hex(&d.finalize())
}

/// `n` generated bytes, streamed chunk by chunk (never held whole), then, with
/// `trailers`, an `x-sha256` trailer of what was sent.
fn pattern_body(n: usize, trailers: bool) -> TestBody {
    let frames = stream::unfold(
        (0usize, Sha256::new(), false),
        move |(i, mut d, done)| async move {
            if done {
                return None;
            }
            if i * CHUNK < n {
                let c = chunk(i, CHUNK.min(n - i * CHUNK));
                d.update(&c);
                return Some((Ok::<_, Infallible>(Frame::data(c)), (i + 1, d, false)));
            }
            if !trailers {
                return None;
            }
            let mut t = HeaderMap::new();
            t.insert("x-sha256", HeaderValue::from_str(&hex(&d.finalize())).ok()?);
            Some((Ok(Frame::trailers(t)), (i, Sha256::new(), true)))
        },
    );
    StreamBody::new(frames).boxed()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------- wasmbassador

/// An upstream block for `config`: TLS verified against the test CA, server name
/// [`SERVER_NAME`], one endpoint per (address, priority).
fn upstream_block(pki: &Pki, name: &str, endpoints: &[(SocketAddr, u32)], extra: &str) -> String {
    let mut s = format!(
        r#"
[[upstream]]
name = "{name}"
connect_timeout = "2s"
retry = {{ attempts = 3, backoff = "10ms" }}
tls = {{ ca = "{ca}", server_name = "{SERVER_NAME}" }}
{extra}
"#,
        ca = pki.ca_pem_path().display()
    );
    for (addr, priority) in endpoints {
        s.push_str(&format!(
            "  [[upstream.endpoint]]\n  address = \"{addr}\"\n  priority = {priority}\n"
        ));
    }
    s
}

/// An upstream block like [`upstream_block`] whose endpoints (all priority 0) carry a
/// tag each (none when empty).
fn tagged_upstream(pki: &Pki, name: &str, endpoints: &[(SocketAddr, &str)]) -> String {
    let mut s = upstream_block(pki, name, &[], "");
    for (addr, tag) in endpoints {
        let tags = if tag.is_empty() { vec![] } else { vec![*tag] };
        s.push_str(&format!(
            "  [[upstream.endpoint]]\n  address = \"{addr}\"\n  tags = {tags:?}\n"
        ));
    }
    s
}

fn listener_block(name: &str, upstream: &str, extra: &str) -> String {
    format!(
        r#"
[[listener]]
name = "{name}"
listen = "127.0.0.1:0"
protocol = "http"
upstream = "{upstream}"
{extra}
"#
    )
}

async fn start(blocks: &[String]) -> Ambassador {
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ndrain_timeout = \"1s\"\n{}",
        blocks.concat()
    );
    let config = Config::parse(&text, "http-test").unwrap_or_else(|e| panic!("config refused: {e}\n{text}"));
    Ambassador::start(config).await.expect("ambassador starts")
}

/// An ambassador with the listener `api` in front of the upstream `api`, whose one
/// endpoint is `endpoint` (with the upstream's extra `settings`, TOML).
async fn start_api(pki: &Pki, endpoint: SocketAddr, settings: &str) -> Ambassador {
    start(&[
        listener_block("api", "api", ""),
        upstream_block(pki, "api", &[(endpoint, 0)], settings),
    ])
    .await
}

fn listener(amb: &Ambassador, name: &str) -> SocketAddr {
    amb.listener_addr(name).expect("listener bound")
}

fn metric(amb: &Ambassador, sample: &str) -> f64 {
    metric_value(&amb.shared().metrics.encode(), sample)
}

// ---------------------------------------------------------------- app side

/// A fresh HTTP/1.1 application connection.
async fn h1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<TestBody> {
    let tcp = TcpStream::connect(addr)
        .await
        .expect("connecting to the listener");
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    send
}

/// A fresh h2c (prior knowledge) application connection.
async fn h2c(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<TestBody> {
    let tcp = TcpStream::connect(addr)
        .await
        .expect("connecting to the listener");
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .expect("h2c handshake");
    tokio::spawn(conn);
    send
}

fn empty() -> TestBody {
    Empty::new().boxed()
}

fn header(r: &Response<Incoming>, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// Reads a response body to its end: (bytes, SHA-256, trailers).
async fn drain(body: Incoming) -> (usize, String, Option<HeaderMap>) {
    let mut body = body;
    let mut d = Sha256::new();
    let mut n = 0;
    let mut trailers = None;
    while let Some(frame) = tokio::time::timeout(PATIENCE, body.frame())
        .await
        .expect("the body kept flowing")
    {
        let frame = frame.expect("response body frame");
        match frame.into_data() {
            Ok(data) => {
                n += data.len();
                d.update(&data);
            }
            Err(f) => trailers = f.into_trailers().ok(),
        }
    }
    (n, hex(&d.finalize()), trailers)
}

async fn body_text(body: Incoming) -> String {
    let bytes = tokio::time::timeout(PATIENCE, body.collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn get(path: &str) -> Request<TestBody> {
    Request::get(path)
        .header("host", "localhost")
        .body(empty())
        .expect("request")
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_post_reach_http1_and_http2_upstreams_with_their_host_and_without_hop_by_hop_headers() {
    let pki = Pki::new();
    let one = Upstream::start(&pki, "one", &[b"http/1.1"]).await;
    let two = Upstream::start(&pki, "two", &[b"h2", b"http/1.1"]).await;
    let amb = start(&[
        listener_block("h1", "one", ""),
        listener_block("h2", "two", ""),
        upstream_block(&pki, "one", &[(one.addr, 0)], ""),
        upstream_block(&pki, "two", &[(two.addr, 0)], ""),
    ])
    .await;

    for (listener_name, server, version) in [("h1", &one, "HTTP/1.1"), ("h2", &two, "HTTP/2.0")] {
        let addr = listener(&amb, listener_name);
        let mut app = h1(addr).await;
        let req = Request::get("/hello")
            .header("host", "localhost:8080")
            .header("connection", "x-drop-me, keep-alive")
            .header("x-drop-me", "hop")
            .header("keep-alive", "timeout=5")
            .header("proxy-authorization", "Basic c2VjcmV0")
            .header("x-end-to-end", "kept")
            .body(empty())
            .expect("request");
        let resp = app.send_request(req).await.expect("GET through wasmbassador");
        assert_eq!(resp.status(), StatusCode::OK, "{listener_name}");
        assert_eq!(
            header(&resp, "x-seen-version"),
            version,
            "{listener_name}: upstream protocol (ALPN)"
        );
        assert_eq!(
            header(&resp, "x-seen-host"),
            format!("{SERVER_NAME}:{}", server.addr.port()),
            "{listener_name}: the upstream sees its own name, not the app's Host"
        );
        let seen = header(&resp, "x-seen-headers");
        let seen: Vec<&str> = seen.split(',').collect();
        for gone in ["connection", "x-drop-me", "keep-alive", "proxy-authorization"] {
            assert!(
                !seen.contains(&gone),
                "{listener_name}: {gone} reached the upstream: {seen:?}"
            );
        }
        assert!(seen.contains(&"x-end-to-end"), "{listener_name}: {seen:?}");
        assert!(seen.contains(&"via"), "{listener_name}: {seen:?}");
        if version == "HTTP/1.1" {
            // Origin form with `Host`, as RFC 9112 asks of a request to an origin
            // server (nginx, for one, closes the connection after an absolute-form one).
            assert_eq!(header(&resp, "x-seen-target"), "/hello", "{listener_name}");
            assert!(seen.contains(&"host"), "{listener_name}: {seen:?}");
        }
        assert!(header(&resp, "via").contains("wasmbassador"), "{listener_name}");
        assert_eq!(
            body_text(resp.into_body()).await,
            format!(
                "hello from {}\n",
                if listener_name == "h1" { "one" } else { "two" }
            )
        );

        // A POST on the same app connection: the body arrives whole.
        let payload = Bytes::from_static(b"{\"order\": 42}");
        let req = Request::post("/upload")
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(payload.clone()).boxed())
            .expect("request");
        app.ready().await.expect("app connection ready again");
        let resp = app.send_request(req).await.expect("POST through wasmbassador");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "x-bytes"), payload.len().to_string());
        assert_eq!(header(&resp, "x-sha256"), hex(&Sha256::digest(&payload)));
    }

    // The same from an h2c application.
    let mut app = h2c(listener(&amb, "h1")).await;
    let req = Request::get(format!("http://{}/hello", listener(&amb, "h1")))
        .body(empty())
        .expect("request");
    let resp = app.send_request(req).await.expect("h2c GET");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    assert_eq!(header(&resp, "x-seen-version"), "HTTP/1.1");

    let shown = amb.shared().metrics.encode();
    assert!(
        metric_value(
            &shown,
            &format!(
                "wasmbassador_http_upstream_connections_opened_total{{upstream=\"two\",endpoint=\"{}\",protocol=\"http2\"}}",
                two.addr
            )
        ) >= 1.0,
        "{shown}"
    );
    assert!(
        metric_value(
            &shown,
            "wasmbassador_http_requests_total{listener=\"h1\",class=\"2xx\"}"
        ) >= 3.0,
        "{shown}"
    );
    assert!(
        shown.contains("wasmbassador_http_upstream_request_duration_seconds_count{upstream=\"one\""),
        "{shown}"
    );

    let (status, listeners) = http_get(amb.admin_addr(), "/listeners").await;
    assert_eq!(status, 200);
    let listeners: serde_json::Value = serde_json::from_str(&listeners).expect("JSON");
    assert_eq!(listeners[0]["name"], "h1");
    assert_eq!(listeners[0]["protocol"], "http");
    assert_eq!(listeners[0]["request_timeout"], "1m");
    amb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_with_digests_and_trailers() {
    let pki = Pki::new();
    let one = Upstream::start(&pki, "one", &[b"http/1.1"]).await;
    let two = Upstream::start(&pki, "two", &[b"h2"]).await;
    let amb = start(&[
        listener_block("h1", "one", "request_timeout = \"120s\""),
        listener_block("h2", "two", "request_timeout = \"120s\""),
        upstream_block(&pki, "one", &[(one.addr, 0)], ""),
        upstream_block(&pki, "two", &[(two.addr, 0)], ""),
    ])
    .await;
    let expected = pattern_digest(LARGE);

    // HTTP/1.1 all the way: upload with content-length, download chunked.
    let mut app = h1(listener(&amb, "h1")).await;
    let req = Request::post("/upload")
        .header("host", "localhost")
        .header("content-length", LARGE.to_string())
        .body(pattern_body(LARGE, false))
        .expect("request");
    let resp = tokio::time::timeout(PATIENCE, app.send_request(req))
        .await
        .expect("upload in time")
        .expect("upload");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-bytes"), LARGE.to_string());
    assert_eq!(
        header(&resp, "x-sha256"),
        expected,
        "upload digest at the upstream"
    );
    body_text(resp.into_body()).await;
    app.ready().await.expect("app connection ready again");
    let resp = app
        .send_request(get(&format!("/download?bytes={LARGE}")))
        .await
        .expect("download");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("content-length").is_none(), "chunked download");
    let (n, digest, _) = drain(resp.into_body()).await;
    assert_eq!(
        (n, digest),
        (LARGE, expected.clone()),
        "download digest at the app"
    );

    // h2c to HTTP/2: upload unsized with a trailer, download with content-length and
    // the upstream's digest as a trailer.
    let mut app = h2c(listener(&amb, "h2")).await;
    let mut frames = Vec::new();
    let mut t = HeaderMap::new();
    t.insert("x-checksum", HeaderValue::from_static("sha256-of-everything"));
    frames.push(Ok::<_, Infallible>(Frame::trailers(t)));
    let body = pattern_body(LARGE, false).chain_trailers(frames);
    let base = format!("http://{}", listener(&amb, "h2"));
    let req = Request::post(format!("{base}/upload"))
        .body(body)
        .expect("request");
    let resp = tokio::time::timeout(PATIENCE, app.send_request(req))
        .await
        .expect("upload in time")
        .expect("h2 upload");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-seen-version"), "HTTP/2.0");
    assert_eq!(header(&resp, "x-bytes"), LARGE.to_string());
    assert_eq!(
        header(&resp, "x-sha256"),
        expected,
        "h2 upload digest at the upstream"
    );
    assert_eq!(
        header(&resp, "x-trailer-checksum"),
        "sha256-of-everything",
        "request trailer reached the upstream"
    );
    body_text(resp.into_body()).await;
    let req = Request::get(format!("{base}/download?bytes={LARGE}&length=1"))
        .body(empty())
        .expect("request");
    let resp = app.send_request(req).await.expect("h2 download");
    assert_eq!(header(&resp, "content-length"), LARGE.to_string());
    let (n, digest, trailers) = drain(resp.into_body()).await;
    assert_eq!(
        (n, digest.as_str()),
        (LARGE, expected.as_str()),
        "h2 download digest at the app"
    );
    let trailers = trailers.expect("the upstream's trailers reached the app");
    assert_eq!(
        trailers.get("x-sha256").and_then(|v| v.to_str().ok()),
        Some(expected.as_str())
    );
    // The app connections' bytes are counted per listener, both ways: each listener
    // carried one large upload and one large download.
    for listener in ["h1", "h2"] {
        for direction in ["to_upstream", "to_client"] {
            let sample = format!(
                "wasmbassador_listener_bytes_total{{listener=\"{listener}\",direction=\"{direction}\"}}"
            );
            let bytes = metric(&amb, &sample);
            assert!(
                bytes >= LARGE as f64 && bytes < 2.0 * LARGE as f64,
                "{sample} = {bytes}"
            );
        }
    }
    amb.shutdown().await;
}

/// Adds trailers after a body's data (a small helper body, so the test can send a
/// streamed body followed by trailers).
trait ChainTrailers {
    fn chain_trailers(self, trailers: Vec<Result<Frame<Bytes>, Infallible>>) -> TestBody;
}

impl ChainTrailers for TestBody {
    fn chain_trailers(self, trailers: Vec<Result<Frame<Bytes>, Infallible>>) -> TestBody {
        use futures_util::StreamExt;
        let data = http_body_util::BodyStream::new(self);
        BodyExt::boxed(StreamBody::new(data.chain(stream::iter(trailers))))
    }
}

/// On-CPU nanoseconds of each of this process's connection threads (`wb-conn-N`).
fn connection_threads() -> BTreeMap<String, u64> {
    std::fs::read_dir("/proc/self/task")
        .expect("this process's threads")
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let name = std::fs::read_to_string(dir.join("comm")).ok()?.trim().to_string();
            let cpu = std::fs::read_to_string(dir.join("schedstat")).ok()?;
            let cpu = cpu.split_whitespace().next()?.parse().ok()?;
            name.starts_with("wb-conn-").then_some((name, cpu))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_threads_share_the_app_connections_pool_upstream_connections_and_stop_with_it() {
    let pki = Pki::new();
    let one = Upstream::start(&pki, "one", &[b"http/1.1"]).await;
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ndrain_timeout = \"1s\"\n{}{}",
        listener_block("h1", "one", ""),
        upstream_block(&pki, "one", &[(one.addr, 0)], "")
    );
    let config = Config::parse(&text, "threads-test").expect("config");
    let amb = Ambassador::start_with_threads(config, std::num::NonZeroUsize::new(2))
        .await
        .expect("ambassador starts");
    let before = connection_threads();
    assert_eq!(before.len(), 2, "two connection threads: {before:?}");
    let addr = listener(&amb, "h1");
    // Eight app connections open at once, 150 requests each.
    let mut apps = JoinSet::new();
    for c in 0..8 {
        let mut app = h1(addr).await;
        apps.spawn(async move {
            for i in 0..150 {
                let resp = app
                    .send_request(get(&format!("/hello?c={c}&i={i}")))
                    .await
                    .expect("request");
                assert_eq!(resp.status(), StatusCode::OK, "connection {c}, request {i}");
                assert_eq!(body_text(resp.into_body()).await, "hello from one\n");
            }
        });
    }
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(r) = apps.join_next().await {
            r.expect("an app connection's requests");
        }
    })
    .await
    .expect("1,200 requests finished");
    assert_eq!(
        metric(
            &amb,
            "wasmbassador_http_requests_total{listener=\"h1\",class=\"2xx\"}"
        ),
        1200.0
    );
    // Both threads did a fair share of the work: four app connections each.
    let after = connection_threads();
    let worked: Vec<u64> = after
        .iter()
        .map(|(name, cpu)| cpu - before.get(name).copied().unwrap_or(0))
        .collect();
    let total: u64 = worked.iter().sum();
    assert!(
        worked.iter().all(|w| *w * 5 >= total),
        "each connection thread did at least a fifth of the work: {worked:?} ns"
    );
    // Each thread pools its own upstream connections: about one per app connection in
    // flight on it (hyper's pool may race a connect against a connection coming back),
    // each reused for many requests.
    let opened = one.accepted();
    assert!(
        (2..=16).contains(&opened),
        "1,200 requests over 8 app connections opened {opened} upstream TLS connections"
    );
    amb.shutdown().await;
    assert!(
        connection_threads().is_empty(),
        "the connection threads stop with the ambassador: {:?}",
        connection_threads()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_new_app_connections_reuse_a_handful_of_upstream_connections() {
    let pki = Pki::new();
    let one = Upstream::start(&pki, "one", &[b"http/1.1"]).await;
    let two = Upstream::start(&pki, "two", &[b"h2"]).await;
    let amb = start(&[
        listener_block("h1", "one", ""),
        listener_block("h2", "two", ""),
        upstream_block(&pki, "one", &[(one.addr, 0)], ""),
        upstream_block(&pki, "two", &[(two.addr, 0)], ""),
    ])
    .await;
    for (name, server) in [("h1", &one), ("h2", &two)] {
        let addr = listener(&amb, name);
        let loop_ = async {
            for i in 0..1000 {
                let mut app = h1(addr).await;
                let resp = app.send_request(get("/hello")).await.expect("request");
                assert_eq!(resp.status(), StatusCode::OK, "{name}: request {i}");
                body_text(resp.into_body()).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(120), loop_)
            .await
            .expect("1,000 requests finished");
        let opened = server.accepted();
        assert!(
            (1..=4).contains(&opened),
            "{name}: 1,000 requests on new app connections opened {opened} upstream TLS connections"
        );
        let sum = |metric: &str| -> f64 {
            amb.shared()
                .metrics
                .encode()
                .lines()
                .filter(|l| l.starts_with(metric) && l.contains(&server.addr.to_string()))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        let counted = sum("wasmbassador_http_upstream_connections_opened_total{");
        assert_eq!(
            counted as usize, opened,
            "{name}: the pool metric counts what the server saw"
        );
        // Still pooled (idle, within pool_idle_timeout): the pool's size.
        let open = sum("wasmbassador_http_upstream_connections_open{");
        assert!(
            open >= 1.0 && open <= counted,
            "{name}: {open} pooled connections open of {counted} opened"
        );
        // Every response was read to its end, so each HTTP/1.1 connection is back in
        // its pool, waiting; HTTP/2 connections are shared, not counted as idle.
        let idle = sum("wasmbassador_http_upstream_connections_idle{");
        if name == "h1" {
            assert!(
                idle >= 1.0 && idle <= open,
                "{name}: {idle} idle of {open} open pooled connections"
            );
        } else {
            assert_eq!(idle, 0.0, "{name}: HTTP/2 connections counted idle");
        }
        // Reuse: requests per connection, from the per-endpoint latency histogram.
        let requests = sum("wasmbassador_http_upstream_request_duration_seconds_count{");
        assert!(
            requests / counted >= 250.0,
            "{name}: {requests} requests over {counted} connections"
        );
    }
    assert_eq!(
        metric(
            &amb,
            "wasmbassador_http_requests_total{listener=\"h1\",class=\"2xx\"}"
        ),
        1000.0
    );
    amb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fail_over_to_the_second_endpoint_when_the_first_stops() {
    let pki = Pki::new();
    let first = Upstream::start(&pki, "first", &[b"h2", b"http/1.1"]).await;
    let second = Upstream::start(&pki, "second", &[b"h2", b"http/1.1"]).await;
    let amb = start(&[
        listener_block("api", "api", ""),
        upstream_block(&pki, "api", &[(first.addr, 0), (second.addr, 1)], ""),
    ])
    .await;
    let addr = listener(&amb, "api");
    let ask = || async move {
        let mut app = h1(addr).await;
        let resp = app.send_request(get("/hello")).await.expect("request");
        let status = resp.status();
        let server = header(&resp, "x-server");
        let body = body_text(resp.into_body()).await;
        (status, server, body)
    };
    for i in 0..20 {
        let (status, server, body) = ask().await;
        assert_eq!(
            (status, server.as_str()),
            (StatusCode::OK, "first"),
            "request {i}: {body}"
        );
    }
    // No pause after the stop: a GET that meets a pooled connection the stopped
    // server just closed is retried, and its new connection fails over.
    first.stop().await;
    for i in 0..20 {
        let (status, server, body) = ask().await;
        assert_eq!(
            (status, server.as_str()),
            (StatusCode::OK, "second"),
            "request {i} after the stop: {body}"
        );
    }
    assert!(second.accepted() >= 1);
    amb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_a_502_naming_it_and_a_silent_one_a_504() {
    let pki = Pki::new();
    // Nothing listens on `dead`; `silent` accepts TCP and never answers.
    let dead = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let dead_addr = dead.local_addr().expect("addr");
    drop(dead);
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let holding = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let amb = start(&[
        listener_block("dead", "dead", ""),
        listener_block("silent", "silent", "request_timeout = \"300ms\""),
        upstream_block(&pki, "dead", &[(dead_addr, 0)], ""),
        // Plain text, so that the TCP connect succeeds and the request waits.
        format!("[[upstream]]\nname = \"silent\"\n  [[upstream.endpoint]]\n  address = \"{silent_addr}\"\n"),
    ])
    .await;

    let mut app = h1(listener(&amb, "dead")).await;
    let resp = app.send_request(get("/hello")).await.expect("an answer");
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let text = body_text(resp.into_body()).await;
    assert!(text.contains("upstream \"dead\""), "{text}");
    assert!(text.contains("connect attempt"), "{text}");
    // Pipelined on one connection: each request is answered once, the answer to HEAD
    // without its text.
    let mut s = TcpStream::connect(listener(&amb, "dead")).await.expect("connect");
    s.write_all(
        b"HEAD /one HTTP/1.1\r\nHost: x\r\n\r\nPOST /two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("write");
    let got = until_closed(&mut s, "the connection closes after the second answer").await;
    assert_eq!(got.matches("HTTP/1.1 502").count(), 2, "{got}");
    assert_eq!(got.matches("cannot reach upstream").count(), 1, "{got}");

    let mut app = h1(listener(&amb, "silent")).await;
    let resp = app.send_request(get("/hello")).await.expect("an answer");
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    let text = body_text(resp.into_body()).await;
    assert!(text.contains("upstream \"silent\""), "{text}");
    assert_eq!(
        metric(
            &amb,
            "wasmbassador_http_requests_total{listener=\"silent\",class=\"5xx\"}"
        ),
        1.0
    );
    holding.abort();
    amb.shutdown().await;
}

/// What comes back on `s` until the server closes it (a reset counts as a close);
/// fails with `closed` as the expectation if that takes longer than `PATIENCE`.
async fn until_closed(s: &mut TcpStream, closed: &str) -> String {
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut got))
        .await
        .expect(closed)
        .ok();
    String::from_utf8_lossy(&got).into_owned()
}

/// Sends raw bytes on a fresh connection and returns what comes back until the
/// server closes, a whole response head has arrived, or 4 KiB.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(PATIENCE, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                if got.len() >= 4096 || got.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(_) => panic!("no answer and no close within {PATIENCE:?}"),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_one_app_connection_leaves_the_others_alone() {
    let pki = Pki::new();
    let one = Upstream::start(&pki, "one", &[b"http/1.1"]).await;
    let amb = start_api(&pki, one.addr, "").await;
    let addr = listener(&amb, "api");

    // A keep-alive app connection, used before and after the bad ones.
    let mut good = h1(addr).await;
    let resp = good.send_request(get("/hello")).await.expect("good request");
    assert_eq!(resp.status(), StatusCode::OK);
    body_text(resp.into_body()).await;

    // A slowloris head that never ends stays open beside everything else.
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .expect("write");

    let malformed = raw(addr, b"THIS IS NOT HTTP\r\n\r\n").await;
    assert!(malformed.starts_with("HTTP/1.1 400"), "{malformed:?}");

    let mut huge = b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 100 * 1024));
    huge.extend_from_slice(b"\r\n\r\n");
    let oversized = raw(addr, &huge).await;
    assert!(oversized.starts_with("HTTP/1.1 431"), "{oversized:?}");

    let connect = raw(
        addr,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    )
    .await;
    assert!(connect.starts_with("HTTP/1.1 405"), "{connect:?}");

    let bad_h2 = raw(
        addr,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04\x99garbage-frame",
    )
    .await;
    assert!(!bad_h2.contains("hello from"), "{bad_h2:?}");

    for _ in 0..3 {
        good.ready().await.expect("the good connection is still open");
        let resp = good
            .send_request(get("/hello"))
            .await
            .expect("good request after bad input");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body_text(resp.into_body()).await, "hello from one\n");
        let mut fresh = h1(addr).await;
        let resp = fresh.send_request(get("/hello")).await.expect("fresh request");
        assert_eq!(resp.status(), StatusCode::OK);
        body_text(resp.into_body()).await;
    }
    drop(slow);
    amb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_app_connections_close_and_a_drain_ends_keep_alive_connections_gracefully() {
    let pki = Pki::new();
    let one = Upstream::start(&pki, "one", &[b"http/1.1"]).await;
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ndrain_timeout = \"10m\"\n{}{}{}",
        listener_block("idle", "api", "idle_timeout = \"300ms\""),
        listener_block("api", "api", ""),
        upstream_block(&pki, "api", &[(one.addr, 0)], ""),
    );
    let amb = Ambassador::start(Config::parse(&text, "t").expect("config"))
        .await
        .expect("start");

    // After one request, an idle keep-alive connection is closed by wasmbassador.
    let mut s = TcpStream::connect(listener(&amb, "idle")).await.expect("connect");
    s.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut got))
        .await
        .expect("the idle connection was closed")
        .expect("read");
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.starts_with("HTTP/1.1 200") && got.contains("hello from one"),
        "{got}"
    );

    // A head that never ends is cut off too (slowloris), here after idle_timeout.
    let mut slow = TcpStream::connect(listener(&amb, "idle")).await.expect("connect");
    slow.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .expect("write");
    let got = until_closed(&mut slow, "the partial head's connection was closed").await;
    assert!(!got.contains("hello from"), "{got}");

    // A keep-alive connection does not hold up a drain: it is closed between
    // requests, long before the ten-minute drain timeout. Read on a raw socket, so
    // that what is asserted is wasmbassador's close and not a client's bookkeeping.
    let mut app = TcpStream::connect(listener(&amb, "api")).await.expect("connect");
    app.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // The test upstream answers with a content-length body, so the message is whole
    // once the body's last byte is in.
    while !got.ends_with(b"hello from one\n") {
        let n = tokio::time::timeout(PATIENCE, app.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(
            n > 0,
            "closed before the answer: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(
        head.starts_with("http/1.1 200") && head.contains("content-length: 15"),
        "{head}"
    );
    tokio::time::timeout(PATIENCE, amb.shutdown())
        .await
        .expect("drain finished without waiting for the drain timeout");
    let rest = tokio::time::timeout(PATIENCE, app.read(&mut buf))
        .await
        .expect("the keep-alive connection was closed by the drain");
    assert!(
        matches!(rest, Ok(0) | Err(_)),
        "the app connection was closed, not sent more: {rest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_closes_a_connection_whose_head_never_ends_and_keeps_answering() {
    let amb = start(&[]).await;
    let admin = amb.admin_addr();
    let mut slow = TcpStream::connect(admin).await.expect("connect");
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .expect("write");
    // Others are served while it trickles.
    let (status, _) = http_get(admin, "/listeners").await;
    assert_eq!(status, 200);
    let started = Instant::now();
    let got = until_closed(
        &mut slow,
        "the admin server closed the connection of a head that never ends",
    )
    .await;
    assert!(!got.contains("200 OK"), "{got}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    amb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_requests_are_retried_after_a_reset_or_503_and_posts_are_not() {
    let pki = Pki::new();
    let one = Upstream::start(&pki, "one", &[b"http/1.1"]).await;
    let two = Upstream::start(&pki, "two", &[b"h2"]).await;
    let amb = start(&[
        listener_block("h1", "one", ""),
        listener_block("h2", "two", ""),
        upstream_block(&pki, "one", &[(one.addr, 0)], ""),
        upstream_block(&pki, "two", &[(two.addr, 0)], ""),
    ])
    .await;
    for (name, server) in [("h1", &one), ("h2", &two)] {
        let addr = listener(&amb, name);
        for path in ["/flaky-503?get", "/flaky-reset?get"] {
            let mut app = h1(addr).await;
            let resp = app.send_request(get(path)).await.expect("request");
            assert_eq!(resp.status(), StatusCode::OK, "{name} GET {path}");
            assert_eq!(
                body_text(resp.into_body()).await,
                format!("hello from {}\n", if name == "h1" { "one" } else { "two" })
            );
            assert_eq!(
                server.hits(path),
                2,
                "{name} GET {path}: one failed try, one retry"
            );
        }
        for (path, status) in [
            ("/flaky-503?post", StatusCode::SERVICE_UNAVAILABLE),
            ("/flaky-reset?post", StatusCode::BAD_GATEWAY),
        ] {
            let mut app = h1(addr).await;
            let req = Request::post(path)
                .header("host", "localhost")
                .body(Full::new(Bytes::from_static(b"once only")).boxed())
                .expect("request");
            let resp = app.send_request(req).await.expect("request");
            assert_eq!(resp.status(), status, "{name} POST {path}");
            body_text(resp.into_body()).await;
            assert_eq!(server.hits(path), 1, "{name} POST {path} is never sent twice");
        }
    }
    let shown = amb.shared().metrics.encode();
    for reason in ["status", "reset"] {
        assert!(
            metric_value(
                &shown,
                &format!(
                    "wasmbassador_http_retries_total{{listener=\"h2\",reason=\"{reason}\",outcome=\"retried\"}}"
                )
            ) >= 1.0,
            "{shown}"
        );
    }
    amb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_passes_through_to_an_https_upstream_and_echoes() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let pki = Pki::new();
    // The upstream offers h2 first: the upgrade must still go over HTTP/1.1.
    let one = Upstream::start(&pki, "one", &[b"h2", b"http/1.1"]).await;
    let amb = start(&[
        listener_block("api", "api", ""),
        listener_block("quiet", "api", "idle_timeout = \"500ms\""),
        upstream_block(&pki, "api", &[(one.addr, 0)], ""),
    ])
    .await;
    let addr = listener(&amb, "api");
    let open_ws = |addr: SocketAddr| async move {
        let tcp = TcpStream::connect(addr)
            .await
            .expect("connecting to the listener");
        tokio::time::timeout(
            PATIENCE,
            tokio_tungstenite::client_async(format!("ws://{addr}/ws"), tcp),
        )
        .await
        .expect("the handshake in time")
        .expect("a WebSocket handshake through the listener")
    };
    // Sends `message` and returns the upstream's answer.
    async fn round_trip<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, message: Message) -> Message
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        ws.send(message).await.expect("sending");
        tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("an answer in time")
            .expect("the stream is open")
            .expect("a message")
    }
    let (mut ws, resp) = open_ws(addr).await;
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..20 {
        let answer = round_trip(&mut ws, Message::text(format!("ping {i}"))).await;
        assert_eq!(answer, Message::text(format!("one: ping {i}")));
    }
    // A large binary message comes back whole.
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let answer = round_trip(&mut ws, Message::binary(big.clone())).await;
    assert_eq!(answer.into_data().as_ref(), big.as_slice());
    ws.close(None).await.expect("closing");
    assert_eq!(one.hits("/ws"), 1, "one handshake reached the upstream");

    // The listener's idle_timeout holds for a tunnel too: a WebSocket that stays
    // silent is closed, while one that keeps talking past the same time stays open.
    let quiet_addr = listener(&amb, "quiet");
    let mut silent = open_ws(quiet_addr).await.0;
    let mut chatty = open_ws(quiet_addr).await.0;
    for i in 0..8 {
        let answer = round_trip(&mut chatty, Message::text(format!("still here {i}"))).await;
        assert_eq!(answer, Message::text(format!("one: still here {i}")));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ended = tokio::time::timeout(PATIENCE, silent.next())
        .await
        .expect("the silent tunnel was closed");
    assert!(
        !matches!(ended, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{ended:?}"
    );

    // Ordinary requests on new app connections still work beside it.
    let mut app = h1(addr).await;
    let resp = app.send_request(get("/hello")).await.expect("request");
    assert_eq!(resp.status(), StatusCode::OK);
    amb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_health_check_takes_an_endpoint_that_answers_503_out_of_rotation() {
    let pki = Pki::new();
    // The preferred endpoint accepts connections but its /healthz answers 503.
    let sick = Upstream::start(&pki, "sick", &[b"h2", b"http/1.1"]).await;
    let well = Upstream::start(&pki, "well", &[b"http/1.1"]).await;
    let amb = start(&[
        listener_block("api", "api", ""),
        upstream_block(
            &pki,
            "api",
            &[(sick.addr, 0), (well.addr, 1)],
            r#"health = { check = "http", path = "/healthz", expect = 200, interval = "100ms", timeout = "2s", unhealthy_after = 1, healthy_after = 1 }"#,
        ),
    ])
    .await;
    let sick_endpoint = sick.addr.to_string();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let status = loop {
        let up = amb.shared().upstream("api").expect("upstream api");
        let ep = up
            .status()
            .endpoints
            .into_iter()
            .find(|e| e.address == sick_endpoint)
            .expect("the sick endpoint in the status");
        if !ep.healthy {
            break ep;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sick endpoint never became unhealthy: {ep:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let reason = status.last_error.unwrap_or_default();
    assert!(
        reason.contains("GET /healthz answered 503, expected 200"),
        "the reason: {reason}"
    );
    // Both endpoints were probed over TLS (HTTP/2 to one, HTTP/1.1 to the other).
    assert!(sick.hits("/healthz") >= 1 && well.hits("/healthz") >= 1);

    // Requests now go to the healthy endpoint; the sick one sees none of them.
    let mut app = h1(listener(&amb, "api")).await;
    for _ in 0..5 {
        app.ready().await.expect("app connection ready");
        let resp = app.send_request(get("/hello")).await.expect("request");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "x-server"), "well");
        body_text(resp.into_body()).await;
    }
    assert_eq!(
        sick.hits("/hello"),
        0,
        "no request reached the unhealthy endpoint"
    );
    amb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_health_check_reads_only_the_start_of_an_endless_body() {
    let pki = Pki::new();
    let endless = Upstream::start(&pki, "endless", &[b"http/1.1"]).await;
    // A terabyte, generated as it is read: no probe could read it in time.
    let path = "/download?bytes=1000000000000";
    let amb = start_api(&pki, endless.addr, &format!(
                r#"health = {{ check = "http", path = "{path}", expect = 200, interval = "100ms", timeout = "2s", unhealthy_after = 1, healthy_after = 1 }}"#
            )).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while endless.hits(path) < 4 {
        assert!(tokio::time::Instant::now() < deadline, "probes did not complete");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Each probe judged the status and let the body go, within its timeout.
    let up = amb.shared().upstream("api").expect("upstream api");
    let ep = up.status().endpoints.into_iter().next().expect("the endpoint");
    assert!(ep.healthy && ep.last_error.is_none(), "{ep:?}");
    amb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_stops_a_retry_storm() {
    let pki = Pki::new();
    let one = Upstream::start(&pki, "one", &[b"h2"]).await;
    let amb = start_api(
        &pki,
        one.addr,
        "http = { retry = { attempts = 3, budget_percent = 10, min_retries_per_second = 0 } }",
    )
    .await;
    let addr = listener(&amb, "api");
    let mut app = h2c(addr).await;
    for i in 0..100 {
        let req = Request::get(format!("http://{addr}/always-503"))
            .body(empty())
            .expect("request");
        let resp = app.send_request(req).await.expect("request");
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE, "request {i}");
        body_text(resp.into_body()).await;
    }
    let tries = one.hits("/always-503");
    // 100 first tries; retries at most 10 % of them, where three tries each would
    // have made 300.
    assert!((101..=110).contains(&tries), "{tries} tries reached the upstream");
    assert!(
        metric(
            &amb,
            "wasmbassador_http_retries_total{listener=\"api\",reason=\"status\",outcome=\"budget_exhausted\"}"
        ) >= 80.0
    );
    amb.shutdown().await;
}

/// `GET /hello` on a new HTTP/1.1 app connection, answered 200 and read to its end
/// (so that the upstream connection goes back to its pool).
async fn hello_on_a_new_connection(addr: SocketAddr) {
    let mut app = h1(addr).await;
    let resp = app.send_request(get("/hello")).await.expect("request");
    assert_eq!(resp.status(), StatusCode::OK);
    body_text(resp.into_body()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_refuses_an_upload_midway_gets_its_answer_to_the_app() {
    let pki = Pki::new();
    let one = Upstream::start(&pki, "one", &[b"http/1.1"]).await;
    let amb = start_api(&pki, one.addr, "").await;
    let addr = listener(&amb, "api");
    // The app announces 64 MiB, sends 256 KiB of it, and waits: the upstream's 413
    // must reach it now, not a 502 or a 504 after a body that never comes.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"POST /early-413 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 67108864\r\n\r\n")
        .await
        .expect("head");
    s.write_all(&vec![b'x'; 256 << 10])
        .await
        .expect("part of the body");
    let answer = until_closed(&mut s, "the answer and a close, with the body unsent").await;
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    for part in [
        "via: 1.1 wasmbassador\r\n",
        "connection: close\r\n",
        "\r\n\r\ntoo large\n",
    ] {
        assert!(answer.contains(part), "{part:?} missing:\n{answer}");
    }
    assert_eq!(one.hits("/early-413"), 1);
    // The upstream connection that carried half a body is not used again.
    hello_on_a_new_connection(addr).await;
    amb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_past_max_lifetime_takes_no_further_requests() {
    let pki = Pki::new();
    let one = Upstream::start(&pki, "one", &[b"http/1.1"]).await;
    let amb = start_api(&pki, one.addr, "http = { max_lifetime = \"300ms\" }").await;
    let addr = listener(&amb, "api");
    let ask = || hello_on_a_new_connection(addr);
    // Two requests in a row share a connection; after a pause longer than
    // max_lifetime the next two need a new one. Without retirement one connection
    // would serve all four.
    ask().await;
    ask().await;
    assert_eq!(one.accepted(), 1, "a young connection is reused");
    tokio::time::sleep(Duration::from_millis(400)).await;
    ask().await;
    ask().await;
    assert_eq!(
        one.accepted(),
        2,
        "the old connection was retired, its successor reused"
    );
    amb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooled_connections_are_closed_after_pool_idle_timeout_and_leave_the_gauges() {
    let pki = Pki::new();
    let one = Upstream::start(&pki, "one", &[b"http/1.1"]).await;
    let amb = start_api(&pki, one.addr, "http = { pool_idle_timeout = \"400ms\" }").await;
    let addr = listener(&amb, "api");
    for _ in 0..3 {
        hello_on_a_new_connection(addr).await;
    }
    let series = |metric: &str| {
        metric_value(
            &amb.shared().metrics.encode(),
            &format!(
                "{metric}{{upstream=\"api\",endpoint=\"{}\",protocol=\"http1\"}}",
                one.addr
            ),
        )
    };
    assert_eq!(one.accepted(), 1, "three requests in a row share a connection");
    assert_eq!(series("wasmbassador_http_upstream_connections_open"), 1.0);
    assert_eq!(series("wasmbassador_http_upstream_connections_idle"), 1.0);
    // The reaper looks every half pool_idle_timeout; give it a few rounds.
    let deadline = Instant::now() + Duration::from_secs(5);
    while series("wasmbassador_http_upstream_connections_open") > 0.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        series("wasmbassador_http_upstream_connections_open"),
        0.0,
        "the idle connection was closed"
    );
    assert_eq!(series("wasmbassador_http_upstream_connections_idle"), 0.0);
    // The next request opens a new one.
    hello_on_a_new_connection(addr).await;
    assert_eq!(one.accepted(), 2);
    amb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_upstreams_get_http1_by_default_h2c_when_configured_and_a_configured_host() {
    let h1_server = Upstream::start_plain("plain1", false).await;
    let h2_server = Upstream::start_plain("plain2", true).await;
    let amb = start(&[
        listener_block("a", "plain1", ""),
        listener_block("b", "plain2", ""),
        format!("[[upstream]]\nname = \"plain1\"\n  [[upstream.endpoint]]\n  address = \"{}\"\n", h1_server.addr),
        format!(
            "[[upstream]]\nname = \"plain2\"\nhttp = {{ version = \"http2\", host = \"orders.internal\" }}\n  [[upstream.endpoint]]\n  address = \"{}\"\n",
            h2_server.addr
        ),
    ])
    .await;
    let mut app = h1(listener(&amb, "a")).await;
    let resp = app.send_request(get("/hello")).await.expect("request");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-seen-version"), "HTTP/1.1");
    assert_eq!(header(&resp, "x-seen-host"), h1_server.addr.to_string());
    body_text(resp.into_body()).await;

    let mut app = h1(listener(&amb, "b")).await;
    let resp = app.send_request(get("/hello")).await.expect("request");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-seen-version"), "HTTP/2.0");
    assert_eq!(header(&resp, "x-seen-host"), "orders.internal");
    assert_eq!(body_text(resp.into_body()).await, "hello from plain2\n");
    amb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_moves_the_upstream_takes_effect_on_open_app_connections() {
    let pki = Pki::new();
    let old = Upstream::start(&pki, "old", &[b"h2"]).await;
    let new = Upstream::start(&pki, "new", &[b"h2"]).await;
    let config = |to: SocketAddr| {
        let text = format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n{}{}",
            listener_block("api", "api", ""),
            upstream_block(&pki, "api", &[(to, 0)], ""),
        );
        Config::parse(&text, "t").expect("config")
    };
    let amb = Ambassador::start(config(old.addr)).await.expect("start");
    let mut app = h1(listener(&amb, "api")).await;
    let resp = app.send_request(get("/hello")).await.expect("request");
    assert_eq!(header(&resp, "x-server"), "old");
    body_text(resp.into_body()).await;

    let summary = amb.reload(config(new.addr)).await.expect("reload");
    assert!(
        summary.changed.is_empty() && summary.added.is_empty(),
        "{summary:?}"
    );
    // The same keep-alive app connection: the next request uses the new upstream's pool.
    app.ready().await.expect("the app connection survived the reload");
    let resp = app.send_request(get("/hello")).await.expect("request");
    assert_eq!(header(&resp, "x-server"), "new");
    body_text(resp.into_body()).await;
    assert_eq!(new.accepted(), 1);
    amb.shutdown().await;
}

// ---------------------------------------------------------------- plugins

/// A `[[plugin]]` block for a plugin built from `plugins/`.
fn plugin_block(name: &str, crate_name: &str, extra: &str) -> String {
    format!(
        "\n[[plugin]]\nname = \"{name}\"\npath = \"{}\"\n{extra}\n",
        support::plugins::wasm(crate_name).display()
    )
}

/// Every value of a header field, in order.
fn all(h: &HeaderMap, name: &str) -> Vec<String> {
    h.get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap_or("?").to_string())
        .collect()
}

/// One request on a fresh application connection: status, header fields, body text.
async fn send(addr: SocketAddr, req: Request<TestBody>) -> (StatusCode, HeaderMap, String) {
    let mut app = h1(addr).await;
    let resp = tokio::time::timeout(PATIENCE, app.send_request(req))
        .await
        .expect("answer in time")
        .expect("response");
    let (parts, body) = resp.into_parts();
    (parts.status, parts.headers, body_text(body).await)
}

fn post(path: &str, body: TestBody) -> Request<TestBody> {
    Request::post(path)
        .header("host", "localhost")
        .body(body)
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_plugins_run_in_order_see_earlier_edits_route_answer_locally_and_fail_by_policy() {
    let pki = Pki::new();
    let one = Upstream::start(&pki, "one", &[b"http/1.1"]).await;
    let two = Upstream::start(&pki, "two", &[b"h2"]).await;
    let stamp =
        |name: &str, config: &str| plugin_block(name, "http-stamp", &format!("config = {{ {config} }}"));
    let trap = |name: &str, at: &str, on_error: &str| {
        plugin_block(
            name,
            "trap",
            &format!("on_error = \"{on_error}\"\nconfig = {{ at = \"{at}\" }}"),
        )
    };
    let amb = start(&[
        listener_block("chain", "one", r#"plugins = ["a", "b", "c"]"#),
        listener_block("mixed", "one", r#"plugins = ["a", "compat", "c"]"#),
        listener_block("local", "one", r#"plugins = ["a", "answer", "c"]"#),
        listener_block("lost", "one", r#"plugins = ["to-ghost"]"#),
        listener_block("tagged", "pair", r#"plugins = ["to-canary"]"#),
        listener_block("reserved", "one", r#"plugins = ["set-host"]"#),
        listener_block("trap-deny", "one", r#"plugins = ["trap-request-deny", "c"]"#),
        listener_block("trap-allow", "one", r#"plugins = ["trap-request-allow"]"#),
        listener_block("trap-response", "one", r#"plugins = ["trap-response", "c"]"#),
        listener_block("pass", "one", r#"plugins = ["pass-1", "pass-2", "pass-3"]"#),
        listener_block("local-204", "one", r#"plugins = ["answer-204"]"#),
        upstream_block(&pki, "one", &[(one.addr, 0)], ""),
        upstream_block(&pki, "two", &[(two.addr, 0)], ""),
        tagged_upstream(&pki, "pair", &[(one.addr, ""), (two.addr, "canary")]),
        stamp("a", r#"name = "a""#),
        stamp("b", r#"name = "b", route_upstream = "two""#),
        stamp("c", r#"name = "c""#),
        plugin_block("compat", "compat-0-1-3", ""),
        stamp("answer", r#"name = "answer", respond = 401"#),
        stamp("answer-204", r#"name = "answer-204", respond = 204"#),
        stamp("to-ghost", r#"name = "lost", route_upstream = "ghost""#),
        stamp("to-canary", r#"name = "tagged", route_tag = "canary""#),
        stamp("set-host", r#"name = "sh", set = ["host", "evil.example"]"#),
        trap("trap-request-deny", "on_request", "deny"),
        trap("trap-request-allow", "on_request", "allow"),
        trap("trap-response", "on_response", "deny"),
        plugin_block("pass-1", "http-pass", ""),
        plugin_block("pass-2", "http-pass", ""),
        plugin_block("pass-3", "http-pass", ""),
    ])
    .await;

    // In order; each sees the edits before it; the last route wins; responses pass
    // the chain in reverse.
    let (status, h, body) = send(listener(&amb, "chain"), get("/echo")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        header_of(&h, "x-server"),
        "two",
        "plugin b routed to upstream two"
    );
    for line in [
        "x-chain: a",
        "x-chain: b",
        "x-chain: c",
        "x-chain-seen-by-a: 0",
        "x-chain-seen-by-b: 1",
        "x-chain-seen-by-c: 2",
    ] {
        assert!(body.lines().any(|l| l == line), "upstream saw {line:?}:\n{body}");
    }
    assert_eq!(all(&h, "x-chain-response"), ["c", "b", "a"]);
    assert_eq!(header_of(&h, "x-source-a"), "upstream");
    // Upstream two speaks HTTP/2, which the fast path hands to hyper after the hooks
    // ran: they ran once, not again on hyper's side.
    let shown = amb.shared().metrics.encode();
    let b_calls = r#"wasmbassador_plugin_calls_total{plugin="b",hook="on_request"}"#;
    assert_eq!(metric_value(&shown, b_calls), 1.0, "{shown}");

    // SDK plugins get the packed request and response (WIT 0.1.4); a plugin built
    // against 0.1.3 gets the plain ones, with the same fields and earlier edits, and
    // its edits reach the packed plugins after it.
    let (status, h, body) = send(listener(&amb, "mixed"), get("/echo")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for line in [
        "x-chain: a",
        "x-chain: compat",
        "x-chain: c",
        "x-chain-seen-by-compat: 1",
        "x-chain-seen-by-c: 2",
        "x-compat-saw: GET /echo localhost one",
    ] {
        assert!(body.lines().any(|l| l == line), "upstream saw {line:?}:\n{body}");
    }
    assert_eq!(all(&h, "x-chain-response"), ["c", "compat", "a"]);

    // A local answer stops the chain; the plugins before it still see the response.
    let hits_before = one.hits("/echo");
    let (status, h, body) = send(listener(&amb, "local"), get("/echo")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, "answer says 401\n");
    assert_eq!(header_of(&h, "x-answered-by"), "answer");
    assert_eq!(
        all(&h, "x-chain-response"),
        ["answer", "a"],
        "c was never reached"
    );
    assert_eq!(header_of(&h, "x-source-a"), "plugin");
    assert_eq!(one.hits("/echo"), hits_before, "the upstream never heard of it");

    // A refusal of a POST whose small body came with its head leaves the connection
    // usable; a local 204 carries no body, whatever the plugin gave it, so the next
    // answer on the connection is read whole.
    let mut app = h1(listener(&amb, "local")).await;
    let hi = || Full::new(Bytes::from_static(b"hi")).boxed();
    for req in [post("/echo", hi()), get("/echo")] {
        app.ready().await.expect("the connection stays open");
        let resp = app
            .send_request(req)
            .await
            .expect("answered on the same connection");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(body_text(resp.into_body()).await, "answer says 401\n");
    }
    let mut app = h1(listener(&amb, "local-204")).await;
    for _ in 0..2 {
        app.ready().await.expect("the connection stays open");
        let resp = app
            .send_request(get("/echo"))
            .await
            .expect("answered on the same connection");
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        assert_eq!(header(&resp, "content-length"), "");
        assert_eq!(body_text(resp.into_body()).await, "");
    }

    // A route to an upstream that does not exist: 502 naming the plugin.
    let (status, h, body) = send(listener(&amb, "lost"), get("/echo")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(
        body.contains("\"ghost\"") && body.contains("chosen by plugin \"to-ghost\""),
        "{body}"
    );
    assert_eq!(header_of(&h, "x-source-lost"), "host");

    // A route by tag reaches only the tagged endpoint, every time.
    for _ in 0..10 {
        let (status, h, _) = send(listener(&amb, "tagged"), get("/hello")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(header_of(&h, "x-server"), "two");
    }

    // Fields the host manages are not the plugins' to set.
    let (status, h, _) = send(listener(&amb, "reserved"), get("/hello")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        header_of(&h, "x-seen-host"),
        format!("{SERVER_NAME}:{}", one.addr.port())
    );

    // A trapping on-request: 503 naming the plugin under `deny`, unchanged under `allow`;
    // a trapping on-response leaves the response alone.
    let (status, h, body) = send(listener(&amb, "trap-deny"), get("/hello")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("plugin trap-request-deny failed (trap)"), "{body}");
    assert!(all(&h, "x-chain-response").is_empty(), "c was never reached");
    let (status, _, body) = send(listener(&amb, "trap-allow"), get("/hello")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "hello from one\n"));
    let (status, h, body) = send(listener(&amb, "trap-response"), get("/hello")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "hello from one\n"));
    assert_eq!(all(&h, "x-chain-response"), ["c"]);

    // Plugins that change nothing leave the exchange as it was, and each of their
    // hooks runs once per request, three requests on one app connection.
    let mut app = h1(listener(&amb, "pass")).await;
    for _ in 0..3 {
        app.ready().await.expect("connection open");
        let resp = app.send_request(get("/hello")).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "x-server"), "one");
        assert_eq!(body_text(resp.into_body()).await, "hello from one\n");
    }
    let shown = amb.shared().metrics.encode();
    for plugin in ["pass-1", "pass-2", "pass-3"] {
        for hook in ["on_request", "on_response"] {
            let sample = format!("wasmbassador_plugin_calls_total{{plugin=\"{plugin}\",hook=\"{hook}\"}}");
            assert_eq!(metric_value(&shown, &sample), 3.0, "{sample}\n{shown}");
        }
    }

    for (plugin, hook) in [
        ("a", "on_request"),
        ("a", "on_response"),
        ("trap-response", "on_response"),
    ] {
        let sample = format!("wasmbassador_plugin_calls_total{{plugin=\"{plugin}\",hook=\"{hook}\"}}");
        assert!(metric_value(&shown, &sample) >= 1.0, "{sample}\n{shown}");
    }
    let status = wasmbassador::plugin::status(&amb.shared().plugins.load());
    let failed = status
        .iter()
        .find(|p| p.name == "trap-request-deny")
        .expect("listed");
    assert!(
        failed.errors >= 1
            && failed
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("on_request"))
    );
    amb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_a_plugin_marks_retryable_is_retried_with_its_buffered_body_and_a_large_one_is_not() {
    let pki = Pki::new();
    let one = Upstream::start(&pki, "one", &[b"http/1.1"]).await;
    let amb = start(&[
        listener_block("marked", "one", r#"plugins = ["mark"]"#),
        listener_block("plain", "one", ""),
        upstream_block(
            &pki,
            "one",
            &[(one.addr, 0)],
            "http = { retry = { buffer_body = \"4KiB\" } }",
        ),
        plugin_block(
            "mark",
            "http-stamp",
            r#"config = { name = "m", retryable = true }"#,
        ),
    ])
    .await;
    let marked = listener(&amb, "marked");
    let small = || Full::new(Bytes::from_static(b"small and buffered")).boxed();
    let (status, _, _) = send(marked, post("/flaky-503?small", small())).await;
    assert_eq!(status, StatusCode::OK, "retried");
    assert_eq!(one.hits("/flaky-503?small"), 2);
    // So is one whose body comes a while after its head.
    let mut s = TcpStream::connect(marked).await.expect("connect");
    s.write_all(b"POST /flaky-503?late HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        .await
        .expect("head");
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(b"hello").await.expect("body");
    let mut answer = [0u8; 12];
    tokio::time::timeout(PATIENCE, s.read_exact(&mut answer))
        .await
        .expect("answer in time")
        .expect("status line");
    assert_eq!(&answer, b"HTTP/1.1 200", "retried");
    assert_eq!(one.hits("/flaky-503?late"), 2);
    // The buffered body goes up whole.
    let (status, h, _) = send(marked, post("/upload", small())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        header_of(&h, "x-sha256"),
        hex(&Sha256::digest(b"small and buffered"))
    );
    // Over buffer_body, or of unknown length: streamed, so never sent twice.
    let big = Full::new(Bytes::from(vec![7u8; 5000])).boxed();
    let (status, _, _) = send(marked, post("/flaky-503?big", big)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(one.hits("/flaky-503?big"), 1);
    let unsized_body = StreamBody::new(stream::iter([Ok::<_, Infallible>(Frame::data(
        Bytes::from_static(b"chunked"),
    ))]))
    .boxed();
    let (status, _, _) = send(marked, post("/flaky-503?chunked", unsized_body)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(one.hits("/flaky-503?chunked"), 1);
    // Without the mark, a POST is not retried.
    let (status, _, _) = send(listener(&amb, "plain"), post("/flaky-503?unmarked", small())).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(one.hits("/flaky-503?unmarked"), 1);
    amb.shutdown().await;
}

fn header_of(h: &HeaderMap, name: &str) -> String {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

// ---------------------------------------------------------------- gRPC

/// A gRPC server (tonic's `grpc.health.v1.Health`: a unary `Check` and a
/// server-streaming `Watch`) over TLS with ALPN `h2`, as a remote gRPC service runs.
async fn start_grpc(
    pki: &Pki,
) -> (
    SocketAddr,
    tonic_health::server::HealthReporter,
    tokio::task::JoinHandle<()>,
) {
    let acceptor = tls_acceptor(pki, &[b"h2"]);
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding gRPC server");
    let addr = listener.local_addr().expect("gRPC server address");
    let (reporter, service) = tonic_health::server::health_reporter();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let (tcp, _) = tokio::select! {
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            };
            let acceptor = acceptor.clone();
            let service = service.clone();
            conns.spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                // tonic's generated servers are always ready, so `call` needs no
                // `poll_ready` first.
                let svc = hyper::service::service_fn(move |req| {
                    let mut s = service.clone();
                    tower_service::Service::call(&mut s, req)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, reporter, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_server_streaming_calls_pass_to_an_https_upstream_with_their_trailers() {
    use tonic_health::ServingStatus;
    use tonic_health::pb::health_check_response::ServingStatus as Wire;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let pki = Pki::new();
    let (addr, reporter, server) = start_grpc(&pki).await;
    reporter
        .set_service_status("orders.v1.Orders", ServingStatus::Serving)
        .await;
    let amb = start(&[
        listener_block("grpc", "orders", ""),
        upstream_block(&pki, "orders", &[(addr, 0)], ""),
    ])
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", listener(&amb, "grpc")))
        .expect("endpoint")
        .connect()
        .await
        .expect("h2c connection to the listener");
    let mut client = HealthClient::new(channel);
    let ask = |service: &str| {
        tonic::Request::new(HealthCheckRequest {
            service: service.to_string(),
        })
    };

    // Unary: the answer, and a gRPC error status, which travels in trailers only.
    let answer = client
        .check(ask("orders.v1.Orders"))
        .await
        .expect("Check answered")
        .into_inner();
    assert_eq!(answer.status(), Wire::Serving);
    let refused = client
        .check(ask("no.such.Service"))
        .await
        .expect_err("unknown service");
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");

    // Server streaming: each change reaches the client as the server sends it.
    let mut watch = client
        .watch(ask("orders.v1.Orders"))
        .await
        .expect("Watch started")
        .into_inner();
    let mut next = async || {
        tokio::time::timeout(PATIENCE, watch.message())
            .await
            .expect("a message in time")
            .expect("stream intact")
            .expect("stream open")
            .status()
    };
    assert_eq!(next().await, Wire::Serving);
    reporter
        .set_service_status("orders.v1.Orders", ServingStatus::NotServing)
        .await;
    assert_eq!(next().await, Wire::NotServing);
    reporter
        .set_service_status("orders.v1.Orders", ServingStatus::Serving)
        .await;
    assert_eq!(next().await, Wire::Serving);

    server.abort();
    amb.shutdown().await;
}

// ---------------------------------------------------------------- ready-made plugins

fn with_header(mut req: Request<TestBody>, name: &'static str, value: &str) -> Request<TestBody> {
    req.headers_mut()
        .insert(name, HeaderValue::from_str(value).expect("header value"));
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_injects_a_token_rotated_while_requests_flow_and_answers_a_local_401() {
    let pki = Pki::new();
    let one = Upstream::start(&pki, "one", &[b"h2"]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let token = dir.path().join("token");
    let clients = dir.path().join("clients");
    std::fs::write(&token, "first-token\n").expect("token");
    std::fs::write(&clients, "# apps allowed in\nclient-a\n\nclient-b\n").expect("clients");
    let amb = start(&[
        listener_block("inject", "one", r#"plugins = ["auth"]"#),
        listener_block("guarded", "one", r#"plugins = ["guard"]"#),
        upstream_block(&pki, "one", &[(one.addr, 0)], ""),
        plugin_block(
            "auth",
            "bearer-token",
            &format!(
                "grants = {{ files = [{t:?}] }}\nconfig = {{ token_file = {t:?}, refresh_ms = 50 }}",
                t = token.display().to_string()
            ),
        ),
        plugin_block(
            "guard",
            "bearer-token",
            &format!(
                "grants = {{ files = [{t:?}, {c:?}] }}\nconfig = {{ token_file = {t:?}, client_tokens_file = {c:?}, refresh_ms = 50 }}",
                t = token.display().to_string(),
                c = clients.display().to_string()
            ),
        ),
    ])
    .await;

    // Requests flow, each on a new app connection, while the Secret rotates (written
    // aside and renamed in, as an atomic writer does).
    let addr = listener(&amb, "inject");
    let done = Arc::new(AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let flow = tokio::spawn({
        let (done, stop) = (done.clone(), stop.clone());
        async move {
            let mut seen = Vec::new();
            let until = tokio::time::Instant::now() + PATIENCE;
            while !stop.is_cancelled() && seen.len() < 5000 && tokio::time::Instant::now() < until {
                let (status, h, _) = send(addr, get("/hello")).await;
                seen.push((status, header_of(&h, "x-seen-authorization")));
                done.fetch_add(1, Ordering::SeqCst);
            }
            seen
        }
    });
    let wait_for = |n: usize| {
        let done = done.clone();
        async move {
            let until = tokio::time::Instant::now() + PATIENCE;
            while done.load(Ordering::SeqCst) < n {
                assert!(tokio::time::Instant::now() < until, "requests stalled");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_for(20).await;
    let aside = dir.path().join("token.new");
    std::fs::write(&aside, "second-token\n").expect("new token");
    std::fs::rename(&aside, &token).expect("rotate");
    let rotated_at = done.load(Ordering::SeqCst);
    // Well past refresh_ms, then enough requests to see the new token settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = done.load(Ordering::SeqCst);
    wait_for(after + 30).await;
    stop.cancel();
    let seen = flow.await.expect("request flow");
    assert!(
        seen.iter().all(|(s, _)| *s == StatusCode::OK),
        "every request succeeded"
    );
    assert_eq!(seen[0].1, "Bearer first-token");
    assert!(
        seen.iter()
            .all(|(_, a)| a == "Bearer first-token" || a == "Bearer second-token"),
        "the upstream only ever saw one of the two tokens"
    );
    assert!(
        seen[after..].iter().all(|(_, a)| a == "Bearer second-token"),
        "requests after the refresh carry the rotated token (rotated after request {rotated_at})"
    );

    // The guarded listener: an app without an accepted token gets a local 401, and the
    // upstream never sees the request.
    let guarded = listener(&amb, "guarded");
    for req in [
        get("/hello?guarded"),
        with_header(get("/hello?guarded"), "authorization", "Bearer not-on-the-list"),
    ] {
        let (status, h, body) = send(guarded, req).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(header_of(&h, "www-authenticate"), "Bearer realm=\"wasmbassador\"");
        assert_eq!(body, "missing or unknown bearer token\n");
    }
    assert_eq!(one.hits("/hello?guarded"), 0);
    let (status, h, _) = send(
        guarded,
        with_header(get("/hello?guarded"), "authorization", "Bearer client-b"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        header_of(&h, "x-seen-authorization"),
        "Bearer second-token",
        "the app's token is swapped for the upstream's"
    );
    assert_eq!(
        metric(
            &amb,
            "wasmbassador_plugin_bearer_token_requests_total{plugin=\"guard\",outcome=\"rejected_client\"}"
        ),
        2.0
    );
    amb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_router_routes_by_header_splits_by_weight_and_keeps_sticky_users_on_one_side() {
    let pki = Pki::new();
    let stable = Upstream::start(&pki, "stable", &[b"h2"]).await;
    let canary = Upstream::start(&pki, "canary", &[b"h2"]).await;
    let beta = Upstream::start(&pki, "beta", &[b"http/1.1"]).await;
    let amb = start(&[
        listener_block("api", "api", r#"plugins = ["router"]"#),
        tagged_upstream(&pki, "api", &[(stable.addr, "stable"), (canary.addr, "canary")]),
        upstream_block(&pki, "beta-api", &[(beta.addr, 0)], ""),
        plugin_block(
            "router",
            "header-router",
            r#"
  [[plugin.config.rules]]
  header = "x-tenant"
  equals = "beta"
  route = { upstream = "beta-api" }
  [[plugin.config.rules]]
  header = "x-canary"
  present = true
  route = { tag = "canary" }
  [plugin.config.split]
  sticky_header = "x-user-id"
  [[plugin.config.split.targets]]
  route = { tag = "stable" }
  weight = 80
  [[plugin.config.split.targets]]
  route = { tag = "canary" }
  weight = 20
"#,
        ),
    ])
    .await;
    let addr = listener(&amb, "api");
    let server = |h: &HeaderMap| header_of(h, "x-server");
    for _ in 0..10 {
        let (_, h, _) = send(addr, with_header(get("/hello"), "x-tenant", "beta")).await;
        assert_eq!(server(&h), "beta");
        let (_, h, _) = send(addr, with_header(get("/hello"), "x-canary", "yes")).await;
        assert_eq!(server(&h), "canary");
    }
    // The split: about one in five to the canary.
    let mut to_canary = 0;
    for _ in 0..100 {
        let (status, h, _) = send(addr, get("/hello")).await;
        assert_eq!(status, StatusCode::OK);
        to_canary += usize::from(server(&h) == "canary");
    }
    assert!(
        (10..=30).contains(&to_canary),
        "{to_canary} of 100 went to the canary"
    );
    // Sticky: each user stays on one side, and both sides have users.
    let mut sides = BTreeMap::new();
    for user in 0..40 {
        for _ in 0..3 {
            let (_, h, _) = send(
                addr,
                with_header(get("/hello"), "x-user-id", &format!("user-{user}")),
            )
            .await;
            let side = server(&h);
            let first = sides.entry(user).or_insert_with(|| side.clone());
            assert_eq!(*first, side, "user-{user} moved");
        }
    }
    let on_canary = sides.values().filter(|s| *s == "canary").count();
    assert!(
        (1..40).contains(&on_canary),
        "{on_canary} of 40 users on the canary"
    );
    assert_eq!(
        metric(
            &amb,
            "wasmbassador_plugin_header_router_routed_total{plugin=\"router\",target=\"upstream:beta-api\"}"
        ),
        10.0
    );
    amb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_metrics_counts_requests_errors_and_latency_per_route_behind_a_three_plugin_chain() {
    let pki = Pki::new();
    let one = Upstream::start(&pki, "one", &[b"h2"]).await;
    let dead = support::free_port();
    let dir = tempfile::tempdir().expect("temp dir");
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken\n").expect("token");
    let amb = start(&[
        listener_block("api", "one", r#"plugins = ["auth", "router", "metrics"]"#),
        upstream_block(&pki, "one", &[(one.addr, 0)], ""),
        upstream_block(&pki, "gone", &[(format!("127.0.0.1:{dead}").parse().expect("addr"), 0)], ""),
        plugin_block(
            "auth",
            "bearer-token",
            &format!(
                "grants = {{ files = [{t:?}] }}\nconfig = {{ token_file = {t:?} }}",
                t = token.display().to_string()
            ),
        ),
        plugin_block(
            "router",
            "header-router",
            r#"config = { rules = [{ header = "x-tenant", equals = "gone", route = { upstream = "gone" } }] }"#,
        ),
        plugin_block(
            "metrics",
            "http-metrics",
            r#"config = { routes = [{ name = "hello", prefix = "/hello" }, { name = "flaky", prefix = "/always-503" }] }"#,
        ),
    ])
    .await;
    let addr = listener(&amb, "api");
    for _ in 0..5 {
        let (status, h, _) = send(addr, get("/hello?x=1")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(header_of(&h, "x-seen-authorization"), "Bearer t0ken");
    }
    for _ in 0..2 {
        let (status, _, _) = send(addr, get("/always-503")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let (status, _, _) = send(addr, with_header(get("/hello"), "x-tenant", "gone")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    for _ in 0..3 {
        let (status, _, _) = send(addr, get("/elsewhere")).await;
        assert_eq!(status, StatusCode::OK);
    }
    let shown = amb.shared().metrics.encode();
    let value = |name: &str, labels: &str| {
        metric_value(
            &shown,
            &format!("wasmbassador_plugin_{name}{{plugin=\"metrics\",listener=\"api\",{labels}}}"),
        )
    };
    for (labels, expected) in [
        (r#"route="hello",method="GET",status_class="2xx""#, 5.0),
        (r#"route="hello",method="GET",status_class="5xx""#, 1.0),
        (r#"route="flaky",method="GET",status_class="5xx""#, 2.0),
        (r#"route="other",method="GET",status_class="2xx""#, 3.0),
    ] {
        assert_eq!(
            value("http_requests_total", labels),
            expected,
            "{labels}\n{shown}"
        );
    }
    assert_eq!(
        value(
            "http_request_errors_total",
            r#"route="flaky",kind="upstream_5xx""#
        ),
        2.0
    );
    assert_eq!(
        value("http_request_errors_total", r#"route="hello",kind="host""#),
        1.0
    );
    assert_eq!(
        value(
            "http_request_duration_seconds_count",
            r#"route="hello",status_class="2xx""#
        ),
        5.0,
        "{shown}"
    );
    amb.shutdown().await;
}

/// The fast path (listeners without plugins, plain HTTP/1.1 requests) hands a
/// connection to hyper at the first request it does not take: every request on it is
/// answered, in order, whichever side served it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_app_connection_mixes_fast_path_requests_pipelining_and_a_chunked_upload() {
    let pki = Pki::new();
    let one = Upstream::start(&pki, "one", &[b"http/1.1"]).await;
    let amb = start_api(&pki, one.addr, "").await;
    let addr = listener(&amb, "api");

    // One connection: two plain requests, a chunked download, then a chunked upload
    // (hyper's from here on) and one more request after it.
    let mut app = h1(addr).await;
    for path in ["/first", "/second"] {
        let resp = app.send_request(get(path)).await.expect("plain request");
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        assert_eq!(header(&resp, "x-seen-target"), path);
        assert_eq!(header(&resp, "via"), "1.1 wasmbassador");
        assert_eq!(body_text(resp.into_body()).await, "hello from one\n");
        app.ready().await.expect("ready again");
    }
    let n = 300_000;
    let resp = app
        .send_request(get(&format!("/download?bytes={n}")))
        .await
        .expect("download");
    assert_eq!(header(&resp, "transfer-encoding"), "chunked");
    assert_eq!(drain(resp.into_body()).await.0, n);
    app.ready().await.expect("ready again");
    let req = Request::post("/upload")
        .header("host", "localhost")
        .body(pattern_body(n, false))
        .expect("request");
    let resp = app.send_request(req).await.expect("chunked upload");
    assert_eq!(header(&resp, "x-bytes"), n.to_string());
    assert_eq!(header(&resp, "x-sha256"), pattern_digest(n));
    body_text(resp.into_body()).await;
    app.ready().await.expect("ready again");
    let resp = app
        .send_request(get("/after"))
        .await
        .expect("request after the upload");
    assert_eq!(header(&resp, "x-seen-target"), "/after");
    assert_eq!(body_text(resp.into_body()).await, "hello from one\n");

    // Pipelined in one write: both answered in order, and `Connection: close` on the
    // last ends the connection after its answer.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        b"GET /p1 HTTP/1.1\r\nHost: x\r\n\r\nPOST /p2 HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbodyGET /p3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("write");
    let got = until_closed(&mut s, "the connection closes after the last answer").await;
    let at = |t: &str| got.find(t).unwrap_or_else(|| panic!("no {t:?} in {got}"));
    assert!(at("x-seen-target: /p1") < at("x-seen-target: /p2"));
    assert!(at("x-seen-target: /p2") < at("x-seen-target: /p3"));
    assert_eq!(got.matches("HTTP/1.1 200").count(), 3, "{got}");
    assert_eq!(got.matches("hello from one\n").count(), 3, "{got}");
    assert!(got.to_ascii_lowercase().contains("connection: close"), "{got}");
}
