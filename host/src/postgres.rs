//! The PostgreSQL preamble: the client's SSLRequest / GSSENCRequest (answered `N`
//! locally, since the application talks plain text to localhost), its startup
//! message or CancelRequest; the ErrorResponse sent to refuse a client; and the
//! BackendKeyData of each session, kept so that a CancelRequest reaches the server
//! that runs the session it names.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::upstream::Upstream;

/// An SSLRequest packet: length 8, code 80877103.
pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
const SSL_CODE: u32 = 80_877_103;
const GSSENC_CODE: u32 = 80_877_104;
const CANCEL_CODE: u32 = 80_877_102;
/// PostgreSQL's own limit on a startup packet.
const MAX_STARTUP: usize = 10_000;
/// Protocol 3.2 allows cancel keys up to 256 bytes.
const MAX_CANCEL_KEY: usize = 256;
/// A server's ErrorResponse during startup up to this size is read for the log.
const MAX_LOGGED_ERROR: usize = 4096;

/// What the client opened with, once encryption requests are answered.
#[derive(Debug)]
pub enum Preamble {
    /// A startup message: forward it upstream and relay the session.
    Startup {
        /// The packet as received, forwarded unchanged.
        packet: Vec<u8>,
        /// Its parameters (`user`, `database`, `application_name`, ...).
        params: Vec<(String, String)>,
    },
    /// A CancelRequest for the session with this process id and secret key.
    Cancel {
        /// The packet as received.
        packet: Vec<u8>,
        /// Backend process id.
        pid: u32,
        /// Secret key (4 bytes in protocol 3.0, up to 256 in 3.2).
        key: Vec<u8>,
    },
}

impl Preamble {
    /// A startup parameter by name.
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            Preamble::Startup { params, .. } => {
                params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
            }
            Preamble::Cancel { .. } => None,
        }
    }
}

/// Why a client's preamble was refused.
#[derive(Debug, thiserror::Error)]
pub enum PreambleError {
    /// The socket failed or closed early (a truncated packet lands here).
    #[error("client connection ended during the startup packet: {0}")]
    Io(#[from] io::Error),
    /// The bytes are not a PostgreSQL startup.
    #[error("not a PostgreSQL startup packet: {0}")]
    Malformed(String),
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Reads the client's preamble, answering SSLRequest and GSSENCRequest with `N`.
pub async fn read_preamble<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
) -> Result<Preamble, PreambleError> {
    // libpq sends at most GSSENCRequest then SSLRequest before its startup message.
    for _ in 0..3 {
        let mut head = [0u8; 8];
        client.read_exact(&mut head).await?;
        let len = be32(&head[..4]) as usize;
        let code = be32(&head[4..]);
        if !(8..=MAX_STARTUP).contains(&len) {
            return Err(PreambleError::Malformed(format!("length {len} is out of range")));
        }
        if code == SSL_CODE || code == GSSENC_CODE {
            if len != 8 {
                return Err(PreambleError::Malformed("encryption request with a body".into()));
            }
            client.write_all(b"N").await?;
            continue;
        }
        let mut packet = Vec::with_capacity(len);
        packet.extend_from_slice(&head);
        packet.resize(len, 0);
        client.read_exact(&mut packet[8..]).await?;
        if code == CANCEL_CODE {
            if !(16..=12 + MAX_CANCEL_KEY).contains(&len) {
                return Err(PreambleError::Malformed(format!("CancelRequest of length {len}")));
            }
            let pid = be32(&packet[8..12]);
            let key = packet[12..].to_vec();
            return Ok(Preamble::Cancel { packet, pid, key });
        }
        if code >> 16 != 3 {
            return Err(PreambleError::Malformed(format!(
                "protocol version {}.{} is not supported",
                code >> 16,
                code & 0xffff
            )));
        }
        let params = parse_params(&packet[8..])?;
        return Ok(Preamble::Startup { packet, params });
    }
    Err(PreambleError::Malformed("too many encryption requests".into()))
}

fn parse_params(mut body: &[u8]) -> Result<Vec<(String, String)>, PreambleError> {
    let mut out = Vec::new();
    let take = |body: &mut &[u8]| -> Result<String, PreambleError> {
        let end = body
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| PreambleError::Malformed("unterminated startup parameter".into()))?;
        let s = String::from_utf8_lossy(&body[..end]).into_owned();
        *body = &body[end + 1..];
        Ok(s)
    };
    loop {
        let key = take(&mut body)?;
        if key.is_empty() {
            break;
        }
        let value = take(&mut body)?;
        out.push((key, value));
    }
    if !out.iter().any(|(k, _)| k == "user") {
        return Err(PreambleError::Malformed("startup message without a user".into()));
    }
    Ok(out)
}

/// An ErrorResponse with severity FATAL, the SQLSTATE `code` and `message`.
pub fn error_response(code: &str, message: &str) -> Vec<u8> {
    let mut fields = Vec::new();
    for (tag, value) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', code), (b'M', message)] {
        fields.push(tag);
        fields.extend_from_slice(value.replace('\0', " ").as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut out = Vec::with_capacity(fields.len() + 5);
    out.push(b'E');
    out.extend_from_slice(&((fields.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(&fields);
    out
}

/// Where a session lives, for its CancelRequests.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    /// The upstream (for its TLS settings).
    pub upstream: Arc<Upstream>,
    /// The endpoint address as configured (for SNI).
    pub address: String,
    /// The socket address the session was opened to.
    pub peer: SocketAddr,
}

type SessionKey = (u32, Vec<u8>);

/// Open sessions by BackendKeyData.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    sessions: Mutex<HashMap<SessionKey, CancelTarget>>,
}

/// Removes its session from the registry when the session ends.
#[derive(Debug)]
pub struct CancelGuard {
    registry: Arc<CancelRegistry>,
    key: SessionKey,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let Ok(mut s) = self.registry.sessions.lock() {
            s.remove(&self.key);
        }
    }
}

impl CancelRegistry {
    fn register(self: &Arc<Self>, key: SessionKey, target: CancelTarget) -> CancelGuard {
        if let Ok(mut s) = self.sessions.lock() {
            s.insert(key.clone(), target);
        }
        CancelGuard {
            registry: self.clone(),
            key,
        }
    }

    /// The target of the session named by a CancelRequest.
    pub fn lookup(&self, pid: u32, key: &[u8]) -> Option<CancelTarget> {
        self.sessions.lock().ok()?.get(&(pid, key.to_vec())).cloned()
    }

    /// Number of sessions known.
    pub fn len(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Whether no session is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Watches the server-to-client bytes of a session for its BackendKeyData, without
/// holding them back: the bytes are forwarded as they come, and this parser only
/// follows message boundaries until ReadyForQuery, after which it stops looking.
#[derive(Debug)]
pub struct KeyWatcher {
    registry: Arc<CancelRegistry>,
    target: Option<CancelTarget>,
    header: [u8; 5],
    have: usize,
    skip: usize,
    /// Message type, body so far, body length.
    capture: Option<(u8, Vec<u8>, usize)>,
    done: bool,
    guard: Option<CancelGuard>,
}

impl KeyWatcher {
    /// A watcher that registers the session with `target` once its key is seen.
    pub fn new(registry: Arc<CancelRegistry>, target: CancelTarget) -> Self {
        Self {
            registry,
            target: Some(target),
            header: [0; 5],
            have: 0,
            skip: 0,
            capture: None,
            done: false,
            guard: None,
        }
    }

    /// Whether the session is ready (or refused): later bytes need no look.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Feeds bytes the server sent; cheap once the session is ready.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !self.done && !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
            } else if let Some((kind, buf, want)) = &mut self.capture {
                let n = (*want - buf.len()).min(data.len());
                buf.extend_from_slice(&data[..n]);
                data = &data[n..];
                if buf.len() == *want {
                    let kind = *kind;
                    let body = std::mem::take(buf);
                    self.capture = None;
                    if kind == b'E' {
                        self.done = true;
                        self.log_refusal(&body);
                    } else if let Some(target) = self.target.take() {
                        let key = (be32(&body[..4]), body[4..].to_vec());
                        self.guard = Some(self.registry.register(key, target));
                    }
                }
            } else {
                let n = (5 - self.have).min(data.len());
                self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
                self.have += n;
                data = &data[n..];
                if self.have < 5 {
                    continue;
                }
                self.have = 0;
                let body = (be32(&self.header[1..]) as usize).saturating_sub(4);
                match self.header[0] {
                    b'K' if (8..=4 + MAX_CANCEL_KEY).contains(&body) => {
                        self.capture = Some((b'K', Vec::with_capacity(body), body));
                    }
                    // The server refused the session (authentication, pg_hba,
                    // client certificate): keep the reason for the log.
                    b'E' if (1..=MAX_LOGGED_ERROR).contains(&body) => {
                        self.capture = Some((b'E', Vec::with_capacity(body), body));
                    }
                    b'Z' | b'E' => self.done = true,
                    _ => self.skip = body,
                }
            }
        }
    }

    /// Logs the ErrorResponse with which the server ended the session's startup:
    /// the client receives it as sent, the operator sees it here.
    fn log_refusal(&self, body: &[u8]) {
        let (code, message) = error_fields(body);
        let (upstream, endpoint) = match &self.target {
            Some(t) => (t.upstream.config.name.as_str(), t.address.as_str()),
            None => ("", ""),
        };
        tracing::warn!(%upstream, %endpoint, %code, "upstream refused the session: {message}");
    }
}

/// The SQLSTATE and message of an ErrorResponse body.
fn error_fields(body: &[u8]) -> (&str, String) {
    let mut code = "";
    let mut message = String::new();
    for field in body.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        match field[0] {
            b'C' => code = std::str::from_utf8(&field[1..]).unwrap_or(""),
            b'M' => message = String::from_utf8_lossy(&field[1..]).into_owned(),
            _ => {}
        }
    }
    (code, message)
}

/// SQLSTATEs with which a server turns a session away before authentication because
/// of its own state, not the client's: shutting down (57P01 admin_shutdown, 57P02
/// crash_shutdown) or not accepting connections yet (57P03 cannot_connect_now: starting
/// up, in recovery). Another endpoint, or the same one a moment later, may take it.
const NOT_ACCEPTING: [&str; 3] = ["57P01", "57P02", "57P03"];

/// Sends the client's startup message and reads the header of the server's first
/// answer, so that a server that is not accepting sessions ([`NOT_ACCEPTING`]) is
/// a failed connect attempt, retried like one, rather than an error the client sees.
/// Any other answer is returned, to be sent to the client before anything else. The
/// client waits for this answer anyway, so reading it here adds no round trip.
pub async fn start_session<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    startup: &[u8],
    peer: SocketAddr,
) -> Result<Vec<u8>, crate::connect::DialError> {
    let io_err = |source| crate::connect::DialError::Tcp { peer, source };
    io.write_all(startup).await.map_err(io_err)?;
    io.flush().await.map_err(io_err)?;
    let mut first = vec![0u8; 5];
    io.read_exact(&mut first).await.map_err(io_err)?;
    let len = be32(&first[1..5]) as usize;
    // Only a small ErrorResponse is looked into; anything else goes on unread.
    if first[0] != b'E' || !(4..=MAX_LOGGED_ERROR).contains(&len) {
        return Ok(first);
    }
    first.resize(1 + len, 0);
    io.read_exact(&mut first[5..]).await.map_err(io_err)?;
    let (code, message) = error_fields(&first[5..]);
    if NOT_ACCEPTING.contains(&code) {
        return Err(crate::connect::DialError::NotAccepting {
            peer,
            sqlstate: code.to_string(),
            message,
        });
    }
    Ok(first)
}

/// Sends a CancelRequest to the server running the named session, over TLS when the
/// upstream uses TLS. Never to any other server: an unknown session is dropped.
pub async fn forward_cancel(target: &CancelTarget, packet: &[u8]) -> Result<(), crate::connect::DialError> {
    let up = &target.upstream;
    let pg_mode = up.config.tls.as_ref().map(|t| t.postgres).unwrap_or_default();
    let mut io = tokio::time::timeout(
        up.config.connect_timeout,
        crate::connect::dial_addr(
            target.peer,
            &target.address,
            up.tls.as_ref(),
            pg_mode,
            crate::connect::Handshake::Postgres,
        ),
    )
    .await
    .map_err(|_| crate::connect::DialError::Timeout(up.config.connect_timeout))??;
    let io_err = |source| crate::connect::DialError::Tcp {
        peer: target.peer,
        source,
    };
    io.write_all(packet).await.map_err(io_err)?;
    io.flush().await.map_err(io_err)?;
    // The server closes after reading the request; wait for that so the request is
    // processed before the client is told anything.
    let mut sink = [0u8; 16];
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), io.read(&mut sink)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session target on an upstream that is never dialled.
    fn target() -> CancelTarget {
        let config = crate::config::UpstreamConfig {
            name: "u".into(),
            connect_timeout: std::time::Duration::from_secs(1),
            retry: Default::default(),
            health: Default::default(),
            eject: Default::default(),
            tls: None,
            http: Default::default(),
            endpoint: vec![],
        };
        let metrics = Arc::new(crate::metrics::Metrics::new());
        CancelTarget {
            upstream: Arc::new(Upstream::new(config, metrics, None).expect("upstream")),
            address: "127.0.0.1:1".into(),
            peer: "127.0.0.1:1".parse().expect("addr"),
        }
    }

    #[test]
    fn watcher_finds_the_key_across_chunk_boundaries() {
        let mut stream = Vec::new();
        stream.extend_from_slice(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0]); // AuthenticationOk
        stream.extend_from_slice(&[b'S', 0, 0, 0, 6, b'a', 0]); // (truncated-ish) ParameterStatus
        stream.extend_from_slice(&[b'K', 0, 0, 0, 12, 0, 0, 0x30, 0x39, 1, 2, 3, 4]);
        stream.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
        for split in 1..stream.len() {
            let registry = Arc::new(CancelRegistry::default());
            let target = target();
            let mut w = KeyWatcher::new(registry.clone(), target);
            w.feed(&stream[..split]);
            w.feed(&stream[split..]);
            assert!(w.done);
            assert!(
                registry.lookup(12345, &[1, 2, 3, 4]).is_some(),
                "split at {split}"
            );
            drop(w);
            assert!(registry.is_empty());
        }
    }

    #[test]
    fn watcher_stops_at_a_startup_error_without_registering() {
        let registry = Arc::new(CancelRegistry::default());
        let target = target();
        let mut w = KeyWatcher::new(registry.clone(), target);
        let refusal = error_response("28000", "connection requires a valid client certificate");
        w.feed(&refusal[..7]);
        assert!(!w.done);
        w.feed(&refusal[7..]);
        assert!(w.done);
        // Bytes after the refusal are not parsed.
        w.feed(&[b'K', 0, 0, 0, 12, 0, 0, 0x30, 0x39, 1, 2, 3, 4]);
        assert!(registry.is_empty());
    }

    #[test]
    fn error_response_is_well_formed() {
        let e = error_response("28000", "denied");
        assert_eq!(e[0], b'E');
        assert_eq!(be32(&e[1..5]) as usize, e.len() - 1);
        assert!(e.windows(6).any(|w| w == b"denied"));
    }
}
