//! Shared setup for the host crate's integration tests.
//!
//! Each test file pulls this in with `mod support;` and gets:
//! - [`Pki`]: a throw-away certificate authority (rcgen) that writes PEM files;
//! - [`Postgres`]: a real PostgreSQL server (Debian 15 or the embedded 17+ build)
//!   on a free loopback port, optionally TLS-only;
//! - [`Redis`]: a real redis-server, TLS with client certificates or plain;
//! - small networking helpers ([`free_port`], [`wait_for_port`]);
//! - [`process::Process`]: the `wasmbassador` binary as a child process (async helpers);
//! - [`mount::KubeletVolume`]: a ConfigMap or Secret volume updated the kubelet's way.
//!
//! Everything here is blocking (std processes and sockets). Call it while setting a
//! test up, before the code under test starts; inside `#[tokio::test]` that briefly
//! blocks the runtime thread, which is fine for setup.
//!
//! Servers are started as child processes of the test and stopped in `Drop`, by
//! their own PID or `pg_ctl` on their own data folder; nothing is killed by name.
#![allow(dead_code, unused_imports)]

pub mod mount;
pub mod pg;
pub mod pki;
pub mod plugins;
pub mod process;
pub mod redis;
pub mod ticker;

pub use pg::{ClientCertMode, PgOptions, PgVersion, Postgres};
pub use pki::{CertFiles, Pki};
pub use redis::Redis;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is found by binding port 0 and dropping the listener, so another process
/// could in principle take it before the caller binds it; for tests that is rare
/// enough.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("reading the local address of a port-0 listener")
        .port()
}

/// Waits until a TCP connection to `addr` succeeds, or panics after `timeout`.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) {
    if let Err(e) = try_wait_for_port(addr, timeout) {
        panic!("{addr} did not accept a TCP connection within {timeout:?}: {e}");
    }
}

/// Like [`wait_for_port`], but returns the last connect error instead of panicking.
pub fn try_wait_for_port(addr: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(25)),
        }
    }
}

/// True when the tests run as root (effective UID 0).
///
/// Read from the owner of `/proc/self`, which Linux sets to the effective UID, so no
/// `unsafe` libc call is needed.
pub fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Runs `cmd`, and panics with its command line, exit status, stdout and stderr unless
/// it exits successfully. `what` says what the command was for.
pub fn run_ok(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: could not run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{what}: {cmd:?} failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
    }
    out
}

/// Reads a (log) file for a panic message; never panics itself.
pub(crate) fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("<could not read {}: {e}>", path.display()))
}

/// Sets the Unix permission bits of `path`.
pub(crate) fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// The quoted paths in `text` (a config) that start with `root/`: the files an
/// example config names, for a test to create under a temporary root.
pub fn quoted_paths_under(text: &str, root: &Path) -> Vec<PathBuf> {
    let prefix = format!("\"{}/", root.display());
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(&prefix) {
        let path = &rest[at + 1..];
        let end = path.find('"').expect("closing quote");
        out.push(PathBuf::from(&path[..end]));
        rest = &path[end..];
    }
    out
}
