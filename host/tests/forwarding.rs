//! Bytes through `tcp` listeners: bulk data to a plain-text upstream, both directions
//! at once, large enough that the data path switches from user-space copies to
//! splice(2), checked by digest, with a half-close passed on while the other direction
//! goes on, and byte counters that match what moved; and `examples/http-service.toml`
//! (an `http` listener) carrying plain HTTP from the app to a real HTTPS server.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use support::Pki;
use support::process::Process;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Generous limit for anything the test waits for.
const PATIENCE: Duration = Duration::from_secs(60);
/// Bytes each way: far beyond any buffer or pipe, so the bulk path carries most.
const CLIENT_BYTES: usize = 48 * 1024 * 1024;
const SERVER_BYTES: usize = 40 * 1024 * 1024;
/// Sent by the server after it has seen the client's half-close.
const AFTER_EOF: &[u8] = b"seen your end of stream\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_bytes_cross_a_tcp_listener_both_ways_intact_with_half_close_and_exact_counters() {
    // The upstream: reads everything the client sends while sending its own stream;
    // once the client's half-close arrives, it sends the digest of what it got, a
    // line, and closes. Connections that close before sending a byte are the
    // listener's health probes.
    let server = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding the upstream");
    let upstream = server.local_addr().expect("upstream address");
    let (done, mut served) = tokio::sync::mpsc::channel::<usize>(1);
    let accepting = tokio::spawn(async move {
        loop {
            let (sock, _) = server.accept().await.expect("accepting at the upstream");
            let done = done.clone();
            tokio::spawn(async move {
                let (mut r, mut w) = sock.into_split();
                let mut buf = vec![0u8; 64 * 1024];
                let first = r.read(&mut buf).await.unwrap_or(0);
                if first == 0 {
                    return;
                }
                let reading = tokio::spawn(async move {
                    let mut digest = Sha256::new();
                    digest.update(&buf[..first]);
                    let mut total = first;
                    loop {
                        let n = r.read(&mut buf).await.expect("upstream reading");
                        if n == 0 {
                            return (total, digest.finalize().to_vec());
                        }
                        digest.update(&buf[..n]);
                        total += n;
                    }
                });
                write_pattern(&mut w, 2, SERVER_BYTES).await;
                let (got, digest) = reading.await.expect("upstream reader");
                w.write_all(&digest).await.expect("upstream sending the digest");
                w.write_all(AFTER_EOF).await.expect("upstream sending after EOF");
                w.shutdown().await.expect("upstream closing");
                let _ = done.send(got).await;
            });
        }
    });

    let dir = tempfile::tempdir().expect("temporary folder");
    let config = dir.path().join("wasmbassador.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[admin]
listen = "127.0.0.1:0"
drain_timeout = "2s"

[[listener]]
name = "bulk"
listen = "127.0.0.1:0"
protocol = "tcp"
upstream = "plain"
idle_timeout = "30s"

[[upstream]]
name = "plain"

  [[upstream.endpoint]]
  address = "{upstream}"
"#
        ),
    )
    .expect("writing the config");
    let wb = Process::run(&config).await;
    let listen: SocketAddr = wb.wait_listener("bulk", PATIENCE).await;

    // The client sends its stream and half-closes, while it reads everything back.
    let sock = TcpStream::connect(listen)
        .await
        .expect("connecting to the listener");
    let (mut r, mut w) = sock.into_split();
    let sending = tokio::spawn(async move {
        write_pattern(&mut w, 1, CLIENT_BYTES).await;
        w.shutdown().await.expect("client half-close");
    });
    let mut received = Vec::with_capacity(SERVER_BYTES + 64);
    tokio::time::timeout(PATIENCE, r.read_to_end(&mut received))
        .await
        .expect("the transfer finished in time")
        .expect("client reading");
    sending.await.expect("client sender");
    let upstream_got = served.recv().await.expect("the upstream served the session");
    accepting.abort();

    // What the upstream got is exactly what the client sent (length and digest).
    assert_eq!(upstream_got, CLIENT_BYTES, "bytes that reached the upstream");
    let tail_len = 32 + AFTER_EOF.len();
    assert_eq!(
        received.len(),
        SERVER_BYTES + tail_len,
        "bytes that reached the client"
    );
    let (body, tail) = received.split_at(SERVER_BYTES);
    assert!(
        body == pattern(2, SERVER_BYTES).as_slice(),
        "the upstream's stream arrived changed"
    );
    assert_eq!(
        &tail[..32],
        Sha256::digest(pattern(1, CLIENT_BYTES)).as_slice(),
        "the upstream's digest of what it received"
    );
    // The upstream saw the client's half-close while its own direction was open.
    assert_eq!(&tail[32..], AFTER_EOF, "sent after the half-close");

    // The byte counters count every byte, once.
    let to_upstream = r#"wasmbassador_listener_bytes_total{listener="bulk",direction="to_upstream"}"#;
    let to_client = r#"wasmbassador_listener_bytes_total{listener="bulk",direction="to_client"}"#;
    assert_eq!(
        wb.wait_metric_above(to_upstream, CLIENT_BYTES as f64 - 1.0, PATIENCE)
            .await,
        CLIENT_BYTES as f64
    );
    assert_eq!(
        wb.wait_metric_above(to_client, (SERVER_BYTES + tail_len) as f64 - 1.0, PATIENCE)
            .await,
        (SERVER_BYTES + tail_len) as f64
    );
}

/// A deterministic, incompressible-looking byte stream, different per `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `pattern(seed, len)` in uneven pieces.
async fn write_pattern<W: AsyncWriteExt + Unpin>(w: &mut W, seed: u64, len: usize) {
    let data = pattern(seed, len);
    let mut at = 0;
    let mut piece = 1000;
    while at < data.len() {
        let end = (at + piece).min(data.len());
        w.write_all(&data[at..end]).await.expect("writing the stream");
        at = end;
        piece = piece * 3 % 300_007 + 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_service_example_carries_plain_http_to_an_https_server() {
    // A real HTTPS server with a certificate for api.internal from the test CA; it
    // answers with what it saw: the method, the Host header and the body's length.
    let pki = Pki::new();
    let cert = pki.server_cert(&["api.internal"]);
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_file(&cert.cert).expect("certificate PEM")],
            PrivateKeyDer::from_pem_file(&cert.key).expect("key PEM"),
        )
        .expect("server TLS config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let server = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding the HTTPS server");
    let https = server.local_addr().expect("server address");
    let serving = tokio::spawn(async move {
        loop {
            let (sock, _) = server.accept().await.expect("accepting");
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // Health probes connect and close without a handshake.
                let Ok(tls) = acceptor.accept(sock).await else {
                    return;
                };
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let method = req.method().to_string();
                    let host = req
                        .headers()
                        .get(hyper::header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    let body = req.into_body().collect().await?.to_bytes();
                    let answer = format!("{method} host={host} body={} over TLS", body.len());
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(answer))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });

    // The example as shipped, pointed at this machine: its first endpoint at a port
    // where nothing listens (so the connect retry moves on), its second at the server.
    let dead = support::free_port();
    let example = std::fs::read_to_string(support::plugins::repo().join("examples/http-service.toml"))
        .expect("reading examples/http-service.toml");
    let config = example
        .replace(
            "/etc/wasmbassador/tls/ca.pem",
            &pki.ca_pem_path().display().to_string(),
        )
        .replace("127.0.0.1:9901", "127.0.0.1:0")
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("api-a.internal:443", &format!("127.0.0.1:{dead}"))
        .replace("api-b.internal:443", &https.to_string());
    assert!(
        !config.contains(".internal:443"),
        "every endpoint of the example was pointed at this machine:\n{config}"
    );
    let dir = tempfile::tempdir().expect("temporary folder");
    let path = dir.path().join("http-service.toml");
    std::fs::write(&path, &config).expect("writing the config");
    let wb = Process::run(&path).await;
    let listen = wb.wait_listener("api", PATIENCE).await;

    // Plain HTTP/1.1 from the app, two requests on one keep-alive connection; the
    // first endpoint is dead, so the pool's connect moves on to the second.
    let sock = TcpStream::connect(listen)
        .await
        .expect("connecting to the listener");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(sock))
        .await
        .expect("HTTP handshake with the listener");
    tokio::spawn(conn);
    for (method, body) in [("GET", ""), ("POST", "order 42")] {
        let req = Request::builder()
            .method(method)
            .uri("/health")
            // The app names the local address; the service sees its own name.
            .header(hyper::header::HOST, "localhost:8080")
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        // The connection takes the next request only once it has finished the last.
        sender
            .ready()
            .await
            .expect("the keep-alive connection stays open");
        let resp = tokio::time::timeout(PATIENCE, sender.send_request(req))
            .await
            .expect("an answer in time")
            .unwrap_or_else(|e| panic!("{method} through the listener: {e}\n{}", wb.output()));
        assert_eq!(resp.status(), 200);
        let text = resp
            .into_body()
            .collect()
            .await
            .expect("response body")
            .to_bytes();
        assert_eq!(
            String::from_utf8_lossy(&text),
            // The service's name from `tls.server_name`; with the example's endpoints on
            // port 443 that is all, here the first endpoint's port comes with it.
            format!("{method} host=api.internal:{dead} body={} over TLS", body.len())
        );
    }
    serving.abort();
}
