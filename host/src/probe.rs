//! `wasmbassador probe`: a Kubernetes exec probe against the admin server.
//!
//! The admin server binds `127.0.0.1` by default, where the kubelet's `httpGet` probes
//! cannot reach it (they connect to the pod IP). Binding admin to `0.0.0.0` would also
//! expose `/metrics`, `/plugins` and `/upstreams` to anything that can reach the pod.
//! An exec probe runs inside the container's network namespace instead: it asks
//! `127.0.0.1` and turns the answer into an exit code (0 on HTTP 200, 1 otherwise)
//! and one line of output, which the kubelet records in the pod's events.
//!
//! The request is a plain blocking HTTP/1.1 GET with a short timeout: the probe is a
//! one-shot process and needs no async runtime.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

/// Which admin endpoint to ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// `/startup`: config and plugins loaded, listeners bound. Never waits on upstreams.
    Startup,
    /// `/ready`: started and not draining (and upstreams, if the config requires them).
    Ready,
    /// `/healthz`: the process answers.
    Healthz,
}

impl Probe {
    /// The admin path this probe asks.
    pub fn path(self) -> &'static str {
        match self {
            Probe::Startup => "/startup",
            Probe::Ready => "/ready",
            Probe::Healthz => "/healthz",
        }
    }
}

/// Why a probe failed. Every variant means "exit 1"; the message is what the kubelet
/// shows in the pod's events.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The config named for the admin address could not be read or parsed.
    #[error("cannot read the admin address from {path}: {reason}")]
    Config {
        /// The config file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The admin address has port 0 (a free port picked at startup) and cannot be probed.
    #[error("admin address {0} has port 0; probe needs a fixed admin port (pass --admin ADDR)")]
    PortZero(SocketAddr),
    /// Nothing accepted a connection on the admin address (not started, or exited).
    #[error("cannot reach the admin server at {addr}: {source}")]
    Connect {
        /// The address tried.
        addr: SocketAddr,
        /// The connect error.
        source: std::io::Error,
    },
    /// The connection broke or timed out, or the answer was not HTTP.
    #[error("no valid answer from {addr}{path}: {reason}")]
    BadResponse {
        /// The address asked.
        addr: SocketAddr,
        /// The path asked.
        path: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The admin server answered with a status other than 200.
    #[error("{path} answered {status}: {message}")]
    NotOk {
        /// The path asked.
        path: &'static str,
        /// The HTTP status code.
        status: u16,
        /// The first line of the body.
        message: String,
    },
}

/// The admin address to probe: `--admin` if given, else `admin.listen` from the config
/// file, else the default `127.0.0.1:9901`. An unspecified address (`0.0.0.0`, `::`)
/// is probed on loopback, where it also listens.
pub fn admin_address(admin: Option<SocketAddr>, config: Option<&Path>) -> Result<SocketAddr, ProbeError> {
    let addr = match (admin, config) {
        (Some(addr), _) => addr,
        (None, Some(path)) => {
            let config_error = |reason: String| ProbeError::Config {
                path: path.display().to_string(),
                reason,
            };
            let text = std::fs::read_to_string(path).map_err(|e| config_error(e.to_string()))?;
            // Only the admin table matters here: parse that much, so a config with a
            // problem elsewhere (or files not mounted yet) still lets the probe run.
            let table: toml::Table = toml::from_str(&text).map_err(|e| config_error(e.to_string()))?;
            match table.get("admin").and_then(|a| a.get("listen")) {
                None => crate::config::AdminConfig::default().listen,
                Some(listen) => listen
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| config_error(format!("admin.listen = {listen} is not host:port")))?,
            }
        }
        (None, None) => crate::config::AdminConfig::default().listen,
    };
    if addr.port() == 0 {
        return Err(ProbeError::PortZero(addr));
    }
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Ok(SocketAddr::new(ip, addr.port()))
}

/// Asks `probe`'s endpoint at `addr`; `Ok` carries the first line of a 200 answer.
pub fn check(probe: Probe, addr: SocketAddr, timeout: Duration) -> Result<String, ProbeError> {
    let path = probe.path();
    let bad = |reason: String| ProbeError::BadResponse { addr, path, reason };
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|source| ProbeError::Connect { addr, source })?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| bad(e.to_string()))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| bad(e.to_string()))?;
    // The admin answers are a few hundred bytes; 64 KiB bounds a misbehaving server.
    let mut response = Vec::new();
    stream
        .take(64 * 1024)
        .read_to_end(&mut response)
        .map_err(|e| bad(e.to_string()))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("the answer has no complete HTTP head".into()))?;
    let status_line = head.lines().next().unwrap_or_default();
    let status: u16 = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| bad(format!("not an HTTP status line: {status_line:?}")))?;
    let message = body.lines().next().unwrap_or_default().trim().to_string();
    if status == 200 {
        Ok(message)
    } else {
        Err(ProbeError::NotOk {
            path,
            status,
            message,
        })
    }
}
