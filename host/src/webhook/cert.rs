//! The webhook's serving certificate, re-read when its files change.
//!
//! cert-manager renews the certificate by updating the Secret; the kubelet then swaps
//! the files in the mounted folder (a `..data` symlink renamed atomically). The
//! [`CertReloader`] is the rustls certificate resolver: every handshake takes the pair
//! in force, and [`CertReloader::refresh`] replaces that pair only with one that
//! parses and whose key matches the certificate. A broken pair is refused (once, with
//! the reason) and the previous one goes on serving.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why the certificate and key files cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read.
    #[error("cannot read the {what} {path}: {source}")]
    Read {
        /// `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file holds no usable PEM.
    #[error("the {what} {path}: {reason}")]
    Pem {
        /// `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the pair, most often because the key does not belong to the
    /// certificate (a rotation caught half-way).
    #[error("{cert} and {key} do not make a usable pair: {source}")]
    Pair {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' reason.
        source: rustls::Error,
    },
}

/// What [`CertReloader::refresh`] did.
#[derive(Debug)]
pub enum Refresh {
    /// The files hold what was last read: nothing to do.
    Unchanged,
    /// A new pair is in force from the next handshake on.
    Reloaded,
    /// The files changed but cannot be used; the previous pair stays in force.
    Refused(CertError),
}

/// A rustls server certificate resolver serving the pair in two PEM files.
pub struct CertReloader {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
    /// The file contents last tried, used or not, so a broken pair is reported once.
    seen: Mutex<(Vec<u8>, Vec<u8>)>,
}

// By hand: `seen` holds the private key's PEM, which must never reach a log line.
impl std::fmt::Debug for CertReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertReloader")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl CertReloader {
    /// Reads the pair; fails if it cannot serve.
    pub fn load(cert: &Path, key: &Path) -> Result<CertReloader, CertError> {
        let (cert_pem, key_pem) = read(cert, key)?;
        let pair = build(cert, key, &cert_pem, &key_pem)?;
        Ok(CertReloader {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: ArcSwap::from_pointee(pair),
            seen: Mutex::new((cert_pem, key_pem)),
        })
    }

    /// The certificate file.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }

    /// The key file.
    pub fn key_path(&self) -> &Path {
        &self.key
    }

    /// Re-reads the files and, when they changed and make a usable pair, puts it in
    /// force for the next handshakes (handshakes under way keep the pair they took).
    pub fn refresh(&self) -> Refresh {
        let (cert_pem, key_pem) = match read(&self.cert, &self.key) {
            Ok(files) => files,
            // Mid-swap a file can be missing for a moment; the next event retries.
            Err(e) => return Refresh::Refused(e),
        };
        {
            let Ok(mut seen) = self.seen.lock() else {
                return Refresh::Unchanged;
            };
            if seen.0 == cert_pem && seen.1 == key_pem {
                return Refresh::Unchanged;
            }
            *seen = (cert_pem.clone(), key_pem.clone());
        }
        match build(&self.cert, &self.key, &cert_pem, &key_pem) {
            Ok(pair) => {
                self.current.store(Arc::new(pair));
                Refresh::Reloaded
            }
            Err(e) => Refresh::Refused(e),
        }
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn read(cert: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>), CertError> {
    let read = |what, path: &Path| {
        std::fs::read(path).map_err(|source| CertError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })
    };
    Ok((read("certificate", cert)?, read("key", key)?))
}

fn build(cert: &Path, key: &Path, cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, CertError> {
    let pem_err = |what, path: &Path, reason: String| CertError::Pem {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err("certificate", cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_err(
            "certificate",
            cert,
            "no PEM certificate in the file".into(),
        ));
    }
    let private = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| pem_err("key", key, e.to_string()))?;
    CertifiedKey::from_der(chain, private, &rustls::crypto::ring::default_provider()).map_err(|source| {
        CertError::Pair {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            source,
        }
    })
}
