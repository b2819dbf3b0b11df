//! `wasmbassador demo`: everything in one process for a first look. It makes a CA
//! and a server certificate, starts a small TLS-only HTTPS service as the upstream,
//! and puts a plain-text listener in front of it with verification on.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

use crate::config::Config;

/// The name in the demo upstream's certificate, and the name verified.
pub const DEMO_SERVER_NAME: &str = "demo.upstream.internal";

/// A demo upstream: its address and the CA file that verifies it.
#[derive(Debug)]
pub struct DemoUpstream {
    /// Where the TLS service listens.
    pub addr: SocketAddr,
}

/// Writes `ca.pem` into `dir` and returns the server's certificate chain and key.
pub fn make_pki(dir: &Path) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), rcgen::Error> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "wasmbassador demo CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec![DEMO_SERVER_NAME.to_string()])?.signed_by(&key, &issuer)?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).map_err(|e| rcgen::Error::PemError(e.to_string()))?;
    let key_der = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
        .map_err(|e| rcgen::Error::PemError(e.to_string()))?;
    Ok((vec![cert.der().clone()], key_der))
}

/// Starts the TLS-only HTTPS upstream on a free loopback port.
pub async fn start_upstream(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> std::io::Result<DemoUpstream> {
    let config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
            .map_err(std::io::Error::other)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((sock, peer)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let tls = match acceptor.accept(sock).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "demo upstream: refused a non-TLS or failed handshake");
                        return;
                    }
                };
                let (_, session) = tls.get_ref();
                let version = session.protocol_version().and_then(|v| v.as_str()).unwrap_or("?");
                let sni = session.server_name().unwrap_or("none").to_string();
                let body = format!(
                    "Hello from the demo upstream at {addr}.\n\
                     You reached me over {version} (SNI {sni}), verified against a CA made at startup;\n\
                     your app spoke plain text to wasmbassador.\n"
                );
                let service = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Ok(DemoUpstream { addr })
}

/// The ready-made plugins the demo loads when they are built.
pub const PLUGINS: [&str; 2] = ["allow_list.wasm", "access_log.wasm"];

/// The demo's configuration: a `tcp` listener on `listen` in front of the upstream,
/// with the allow-list and access-log plugins when `plugins` (their folder) is given.
pub fn config(
    listen: SocketAddr,
    admin: SocketAddr,
    upstream: SocketAddr,
    ca: &Path,
    plugins: Option<&Path>,
) -> Result<Config, crate::config::ConfigError> {
    let (chain, plugin_entries) = match plugins {
        None => (String::new(), String::new()),
        Some(dir) => (
            r#"plugins = ["allow-local", "access-log"]"#.to_string(),
            format!(
                r#"
[[plugin]]
name = "allow-local"
path = "{allow}"
config = {{ clients = ["127.0.0.0/8", "::1/128"] }}

[[plugin]]
name = "access-log"
path = "{log}"
on_error = "allow"
"#,
                allow = dir.join(PLUGINS[0]).display(),
                log = dir.join(PLUGINS[1]).display()
            ),
        ),
    };
    let text = format!(
        r#"
[admin]
listen = "{admin}"
drain_timeout = "2s"

[[listener]]
name = "demo"
listen = "{listen}"
protocol = "tcp"
upstream = "demo-https"
idle_timeout = "60s"
{chain}

[[upstream]]
name = "demo-https"
connect_timeout = "1s"
health = {{ check = "tcp", interval = "2s" }}
tls = {{ ca = "{ca}", server_name = "{DEMO_SERVER_NAME}" }}
  [[upstream.endpoint]]
  address = "{upstream}"
{plugin_entries}"#,
        ca = ca.display()
    );
    Config::parse(&text, "demo")
}
