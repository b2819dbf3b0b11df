//! TLS origination towards upstreams with rustls: verified by default, mTLS, and
//! certificate files that are re-read when they change.
//!
//! Kubernetes rotates Secret mounts by swapping a symlink, so instead of watching
//! each file the connector compares the files' modification stamps at most once a
//! second, on the connect path, and rebuilds its rustls config when they moved.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::TlsConnector;

use crate::config::{Roots, TlsConfig};

/// Why a TLS setting could not be turned into a working client config.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read or parsed.
    #[error("{what} {path}: {reason}")]
    File {
        /// Which setting (`tls.ca`, `tls.client_cert`, ...).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the combination (for example a key that does not match).
    #[error("tls settings refused by rustls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The name to verify is not a DNS name or IP address.
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
}

#[derive(Clone, PartialEq)]
struct Stamp(Option<(SystemTime, u64)>);

fn stamp(path: &Path) -> Stamp {
    Stamp(
        std::fs::metadata(path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len()))),
    )
}

struct Built {
    /// For plain TLS and SSLRequest-started PostgreSQL TLS.
    plain: TlsConnector,
    /// With ALPN `postgresql`, for PostgreSQL 17 direct TLS.
    direct_pg: TlsConnector,
    /// ALPN `h2`, `http/1.1`: the server picks.
    http_any: TlsConnector,
    /// ALPN `http/1.1`.
    http1: TlsConnector,
    /// ALPN `h2`.
    http2: TlsConnector,
    stamps: Vec<Stamp>,
}

/// The TLS client side of one upstream.
pub struct TlsClient {
    config: TlsConfig,
    built: ArcSwap<Built>,
    /// When the files were last looked at, and their stamps then (a broken rotation
    /// is reported once, not at every connect).
    seen: Mutex<(Instant, Vec<Stamp>)>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient").field("config", &self.config).finish()
    }
}

const RECHECK: Duration = Duration::from_secs(1);

impl TlsClient {
    /// Reads the files and builds the rustls configs; errors name the file.
    pub fn new(config: &TlsConfig) -> Result<Self, TlsError> {
        let built = build(config)?;
        let stamps = built.stamps.clone();
        Ok(Self {
            config: config.clone(),
            built: ArcSwap::from_pointee(built),
            seen: Mutex::new((Instant::now(), stamps)),
        })
    }

    fn files(config: &TlsConfig) -> impl Iterator<Item = &PathBuf> {
        [&config.ca, &config.client_cert, &config.client_key]
            .into_iter()
            .flatten()
    }

    /// The connector to use now; rebuilt first when a certificate file changed.
    pub fn connector(&self, direct_pg: bool) -> TlsConnector {
        self.connector_for(if direct_pg { Alpn::Postgres } else { Alpn::None })
    }

    /// The connector offering `alpn`; rebuilt first when a certificate file changed.
    pub fn connector_for(&self, alpn: Alpn) -> TlsConnector {
        self.refresh();
        let built = self.built.load();
        match alpn {
            Alpn::None => built.plain.clone(),
            Alpn::Postgres => built.direct_pg.clone(),
            Alpn::HttpAny => built.http_any.clone(),
            Alpn::Http1 => built.http1.clone(),
            Alpn::Http2 => built.http2.clone(),
        }
    }

    fn refresh(&self) {
        {
            let Ok(mut seen) = self.seen.lock() else {
                return;
            };
            if seen.0.elapsed() < RECHECK {
                return;
            }
            seen.0 = Instant::now();
            let now: Vec<Stamp> = Self::files(&self.config).map(|p| stamp(p)).collect();
            if now == seen.1 {
                return;
            }
            seen.1 = now;
        }
        match build(&self.config) {
            Ok(b) => {
                tracing::info!("tls: certificate files changed; reloaded");
                self.built.store(Arc::new(b));
            }
            Err(e) => {
                // A half-written rotation is common; keep serving with the old files.
                tracing::warn!(error = %e, "tls: certificate files changed but cannot be used; keeping the previous ones");
            }
        }
    }

    /// The name sent as SNI and verified: `server_name` if set, else the endpoint host.
    pub fn server_name(&self, endpoint_host: &str) -> Result<ServerName<'static>, TlsError> {
        let name = self.config.server_name.as_deref().unwrap_or(endpoint_host);
        ServerName::try_from(name.to_string()).map_err(|_| TlsError::ServerName(name.to_string()))
    }

    /// Whether certificate verification is switched off.
    pub fn insecure(&self) -> bool {
        self.config.insecure_skip_verify
    }
}

/// Which application protocols the TLS handshake offers (ALPN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// No ALPN extension (raw TCP and SSLRequest-started PostgreSQL).
    None,
    /// `postgresql` (PostgreSQL 17 direct TLS).
    Postgres,
    /// `h2` then `http/1.1`: the server chooses.
    HttpAny,
    /// `http/1.1` only.
    Http1,
    /// `h2` only.
    Http2,
}

/// Reads each certificate and key file named in `config` on its own and returns
/// every one that cannot be used, as (`tls.ca` | `tls.client_cert` | `tls.client_key`,
/// reason). Used by config validation so that one missing file does not hide the next.
pub fn file_problems(config: &TlsConfig) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let certs = |what: &'static str, path: &Path| -> Option<(&'static str, String)> {
        let reason = match CertificateDer::pem_file_iter(path).map(|i| i.collect::<Result<Vec<_>, _>>()) {
            Err(e) | Ok(Err(e)) => e.to_string(),
            Ok(Ok(c)) if c.is_empty() => "no PEM certificate in the file".to_string(),
            Ok(Ok(_)) => return None,
        };
        Some((what, format!("{}: {reason}", path.display())))
    };
    if let Some(ca) = &config.ca {
        out.extend(certs("tls.ca", ca));
    }
    if let Some(cert) = &config.client_cert {
        out.extend(certs("tls.client_cert", cert));
    }
    if let Some(key) = &config.client_key
        && let Err(e) = PrivateKeyDer::from_pem_file(key)
    {
        out.push(("tls.client_key", format!("{}: {e}", key.display())));
    }
    out
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_err(what: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        what,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn build(config: &TlsConfig) -> Result<Built, TlsError> {
    let stamps = TlsClient::files(config).map(|p| stamp(p)).collect();
    let mut roots = RootCertStore::empty();
    if let Some(ca) = &config.ca {
        let certs = CertificateDer::pem_file_iter(ca)
            .map_err(|e| file_err("tls.ca", ca, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_err("tls.ca", ca, e))?;
        if certs.is_empty() {
            return Err(file_err("tls.ca", ca, "no PEM certificate in the file"));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| file_err("tls.ca", ca, format!("unusable CA certificate: {e}")))?;
        }
    }
    match config.roots {
        Some(Roots::Webpki) => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(Roots::System) => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "tls: problem reading the system certificate store");
            }
            roots.add_parsable_certificates(found.certs);
        }
        None => {}
    }
    let provider = provider();
    let builder =
        ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let builder = if config.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
    } else {
        builder.with_root_certificates(roots)
    };
    let mut client = match (&config.client_cert, &config.client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| file_err("tls.client_cert", cert, e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| file_err("tls.client_cert", cert, e))?;
            if chain.is_empty() {
                return Err(file_err(
                    "tls.client_cert",
                    cert,
                    "no PEM certificate in the file",
                ));
            }
            let key_der =
                PrivateKeyDer::from_pem_file(key).map_err(|e| file_err("tls.client_key", key, e))?;
            builder.with_client_auth_cert(chain, key_der)?
        }
        _ => builder.with_no_client_auth(),
    };
    client.resumption = rustls::client::Resumption::in_memory_sessions(256);
    let with_alpn = |protocols: &[&[u8]]| {
        let mut c = client.clone();
        c.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
        TlsConnector::from(Arc::new(c))
    };
    Ok(Built {
        direct_pg: with_alpn(&[b"postgresql"]),
        http_any: with_alpn(&[b"h2", b"http/1.1"]),
        http1: with_alpn(&[b"http/1.1"]),
        http2: with_alpn(&[b"h2"]),
        plain: TlsConnector::from(Arc::new(client)),
        stamps,
    })
}

/// Accepts any server certificate; only built when `insecure_skip_verify = true`
/// is written out. Handshake signatures are still checked so the session keys
/// belong to whoever sent the certificate.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
