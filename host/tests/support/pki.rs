//! A throw-away certificate authority for tests, built with rcgen at test time.
//!
//! All files live in the [`Pki`]'s own temporary folder, which is world-readable
//! (mode 0755, certificates 0644) so that servers running as another user (the
//! `postgres` user when tests run as root) can read certificates. Private keys are
//! 0600, owned by the test's user, because libpq refuses client keys that others can
//! read; the PostgreSQL server needs its key owned by the `postgres` user, so
//! [`super::pg`] copies it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, date_time_ymd,
};
use tempfile::TempDir;

use super::chmod;

/// A certificate and its private key, as PEM files on disk.
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// The leaf certificate (PEM, one `CERTIFICATE` block).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8 `PRIVATE KEY`, ECDSA P-256).
    pub key: PathBuf,
}

impl CertFiles {
    /// The certificate's PEM text.
    pub fn cert_pem(&self) -> String {
        std::fs::read_to_string(&self.cert)
            .unwrap_or_else(|e| panic!("reading certificate {}: {e}", self.cert.display()))
    }

    /// The private key's PEM text.
    pub fn key_pem(&self) -> String {
        std::fs::read_to_string(&self.key)
            .unwrap_or_else(|e| panic!("reading private key {}: {e}", self.key.display()))
    }
}

/// A test certificate authority: a self-signed CA certificate plus its key, and a
/// temporary folder where it writes the CA and every certificate it issues.
///
/// Issued certificates are valid from 2020-01-01 to 2040-01-01, except those from
/// [`Pki::expired_server_cert`].
pub struct Pki {
    dir: TempDir,
    name: String,
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    ca_path: PathBuf,
    counter: AtomicUsize,
}

impl Pki {
    /// Creates a new CA named "wasmbassador test CA".
    pub fn new() -> Pki {
        Pki::named("wasmbassador test CA")
    }

    /// Creates another, unrelated CA: certificates it issues do not chain to any
    /// other [`Pki`]'s CA (for "unknown CA" tests).
    pub fn other() -> Pki {
        Pki::named("unrelated test CA")
    }

    /// Creates a new CA whose certificate has the common name `name`.
    pub fn named(name: &str) -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("wasmbassador-pki-")
            .tempdir()
            .expect("creating a temporary folder for test certificates");
        chmod(dir.path(), 0o755);

        let mut params =
            CertificateParams::new(Vec::<String>::new()).expect("building CA certificate parameters");
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "wasmbassador tests");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2040, 1, 1);
        let key = KeyPair::generate().expect("generating the CA key pair");
        let cert = params.self_signed(&key).expect("self-signing the CA certificate");
        let ca_pem = cert.pem();
        let ca_path = dir.path().join("ca.pem");
        write_file(&ca_path, &ca_pem, 0o644);
        write_file(&dir.path().join("ca.key"), &key.serialize_pem(), 0o600);

        Pki {
            issuer: Issuer::new(params, key),
            dir,
            name: name.to_owned(),
            ca_pem,
            ca_path,
            counter: AtomicUsize::new(0),
        }
    }

    /// The CA certificate's PEM file.
    pub fn ca_pem_path(&self) -> &Path {
        &self.ca_path
    }

    /// The CA certificate's PEM text.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The folder holding this CA's files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA's common name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Issues a server certificate (serverAuth EKU) for `names`.
    ///
    /// Each name becomes a subject alternative name: IP addresses (`"127.0.0.1"`,
    /// `"::1"`) become IP SANs, everything else a DNS SAN. The first name is also the
    /// subject's common name.
    pub fn server_cert(&self, names: &[&str]) -> CertFiles {
        self.issue(
            "server",
            names,
            names.first().copied().unwrap_or("server"),
            ExtendedKeyUsagePurpose::ServerAuth,
            false,
        )
    }

    /// Issues a server certificate like [`Pki::server_cert`] that expired on
    /// 2021-01-01 (valid 2020-01-01 to 2021-01-01).
    pub fn expired_server_cert(&self, names: &[&str]) -> CertFiles {
        self.issue(
            "expired-server",
            names,
            names.first().copied().unwrap_or("server"),
            ExtendedKeyUsagePurpose::ServerAuth,
            true,
        )
    }

    /// Issues a client certificate (clientAuth EKU) with subject common name
    /// `common_name` and no SANs. PostgreSQL's `clientcert=verify-full` / `cert` auth
    /// compares this common name with the user name.
    pub fn client_cert(&self, common_name: &str) -> CertFiles {
        self.issue(
            "client",
            &[],
            common_name,
            ExtendedKeyUsagePurpose::ClientAuth,
            false,
        )
    }

    fn issue(
        &self,
        kind: &str,
        names: &[&str],
        common_name: &str,
        eku: ExtendedKeyUsagePurpose,
        expired: bool,
    ) -> CertFiles {
        let sans: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(sans)
            .unwrap_or_else(|e| panic!("building {kind} certificate parameters for {names:?}: {e}"));
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![eku];
        params.use_authority_key_identifier_extension = true;
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = if expired {
            date_time_ymd(2021, 1, 1)
        } else {
            date_time_ymd(2040, 1, 1)
        };

        let key = KeyPair::generate()
            .unwrap_or_else(|e| panic!("generating a key pair for a {kind} certificate: {e}"));
        let cert = params
            .signed_by(&key, &self.issuer)
            .unwrap_or_else(|e| panic!("signing the {kind} certificate for {names:?}: {e}"));

        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let stem: String = common_name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let files = CertFiles {
            cert: self.dir.path().join(format!("{kind}-{n}-{stem}.crt")),
            key: self.dir.path().join(format!("{kind}-{n}-{stem}.key")),
        };
        write_file(&files.cert, &cert.pem(), 0o644);
        write_file(&files.key, &key.serialize_pem(), 0o600);
        files
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

/// Writes `contents` to `path` with permission bits `mode`.
fn write_file(path: &Path, contents: &str, mode: u32) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    chmod(path, mode);
}
