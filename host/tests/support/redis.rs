//! A real `redis-server` per test, as a child process of the test: TLS-only with
//! required client certificates ([`Redis::start_tls`]) or plain text
//! ([`Redis::start_plain`]). Killed by its PID on drop.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{Pki, chmod, free_port, read_log};

/// How long a starting server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running redis-server owned by the test.
pub struct Redis {
    child: Child,
    dir: TempDir,
    log: PathBuf,
    port: u16,
    tls: bool,
}

impl Redis {
    /// Starts redis-server with only a TLS port (`port 0`, `tls-port` free), a
    /// server certificate for `127.0.0.1` and `localhost` from `pki`, and
    /// `tls-auth-clients yes`: clients must present a certificate issued by `pki`'s CA
    /// (see [`Pki::client_cert`]). No persistence.
    pub fn start_tls(pki: &Pki) -> Redis {
        let server = pki.server_cert(&["127.0.0.1", "localhost"]);
        let port = free_port();
        let settings = format!(
            "port 0\n\
             tls-port {port}\n\
             tls-cert-file {cert}\n\
             tls-key-file {key}\n\
             tls-ca-cert-file {ca}\n\
             tls-auth-clients yes\n",
            cert = server.cert.display(),
            key = server.key.display(),
            ca = pki.ca_pem_path().display(),
        );
        Redis::spawn(port, true, &settings)
    }

    /// Starts redis-server in plain text on a free port. No persistence.
    pub fn start_plain() -> Redis {
        let port = free_port();
        Redis::spawn(port, false, &format!("port {port}\n"))
    }

    /// The TLS port (panics for a plain-text server).
    pub fn tls_port(&self) -> u16 {
        assert!(self.tls, "tls_port() on a plain-text Redis; use port()");
        self.port
    }

    /// The port the server listens on (TLS or plain, as started).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's address, `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The server's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// The server's working folder (config and log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(port: u16, tls: bool, listen_settings: &str) -> Redis {
        let dir = tempfile::Builder::new()
            .prefix("wasmbassador-redis-")
            .tempdir()
            .expect("creating a temporary folder for redis-server");
        chmod(dir.path(), 0o755);
        let log = dir.path().join("redis.log");
        let conf = dir.path().join("redis.conf");
        let text = format!(
            "bind 127.0.0.1\n\
             {listen_settings}\
             save \"\"\n\
             appendonly no\n\
             daemonize no\n\
             dir {dir}\n\
             logfile {log}\n",
            dir = dir.path().display(),
            log = log.display(),
        );
        std::fs::write(&conf, text).unwrap_or_else(|e| panic!("writing {}: {e}", conf.display()));

        let child = Command::new("redis-server")
            .arg(&conf)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting redis-server (apt-get install -y redis-server): {e}"));
        let mut redis = Redis {
            child,
            dir,
            log,
            port,
            tls,
        };
        redis.wait_ready();
        redis
    }

    /// Waits until the port accepts TCP connections; panics with the log if the
    /// server exits or does not come up in time.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "redis-server exited with {status} while starting\n--- log ---\n{}",
                    self.log()
                );
            }
            if std::net::TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)).is_ok() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "redis-server did not accept connections on {} within {START_TIMEOUT:?}\n--- log ---\n{}",
                    self.addr(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        // Child::kill sends SIGKILL to this child's own PID only.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
