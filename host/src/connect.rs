//! One connect attempt to one endpoint: resolve, TCP, then TLS when configured
//! (for PostgreSQL after the SSLRequest exchange, or direct TLS with ALPN).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::config::{HttpVersion, PostgresTls, split_host_port};
use crate::postgres::SSL_REQUEST;
use crate::tls::{Alpn, TlsClient};

/// How the upstream connection starts before bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// TLS (if configured) right after TCP connect.
    Raw,
    /// PostgreSQL: SSLRequest first, or direct TLS, per `tls.postgres`.
    Postgres,
    /// HTTP from an `http` listener: TLS (if configured) right after TCP connect,
    /// offering the ALPN protocols of the configured version.
    Http(HttpVersion),
}

/// A connected upstream stream, plain or TLS.
#[derive(Debug)]
pub enum UpstreamIo {
    /// Plain text.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl UpstreamIo {
    /// Whether TLS negotiated HTTP/2 by ALPN.
    pub fn alpn_h2(&self) -> bool {
        match self {
            UpstreamIo::Plain(_) => false,
            UpstreamIo::Tls(t) => t.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }

    /// The negotiated TLS version, when TLS is on.
    pub fn tls_version(&self) -> Option<&'static str> {
        match self {
            UpstreamIo::Plain(_) => None,
            UpstreamIo::Tls(t) => t.get_ref().1.protocol_version().and_then(|v| v.as_str()),
        }
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Why one connect attempt failed. Nothing of the client's was sent, so every
/// variant is safe to retry on another endpoint.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The host name did not resolve.
    #[error("cannot resolve {address}: {source}")]
    Resolve {
        /// The endpoint address.
        address: String,
        /// The resolver's error.
        source: io::Error,
    },
    /// TCP connect failed.
    #[error("TCP connect to {peer} failed: {source}")]
    Tcp {
        /// The address tried.
        peer: SocketAddr,
        /// The socket error.
        source: io::Error,
    },
    /// The attempt took longer than `connect_timeout`.
    #[error("no usable connection within {0:?}")]
    Timeout(Duration),
    /// The PostgreSQL server answered the SSLRequest with `N`; nothing is sent in plain text.
    #[error(
        "the server at {0} refused TLS (answered the SSLRequest with 'N'); refusing to continue in plain text"
    )]
    TlsRefused(SocketAddr),
    /// The TLS handshake failed (verification, client certificate, protocol).
    #[error("TLS handshake with {peer} failed: {source}")]
    Tls {
        /// The address tried.
        peer: SocketAddr,
        /// rustls' reason, such as an invalid peer certificate.
        source: io::Error,
    },
    /// The server broke the protocol during the preamble.
    #[error("upstream {peer} broke protocol: {reason}")]
    Protocol {
        /// The address tried.
        peer: SocketAddr,
        /// What was wrong.
        reason: String,
    },
    /// The PostgreSQL server turned the session away before authentication because it
    /// is shutting down, starting up or in recovery; the client has seen nothing.
    #[error("the PostgreSQL server at {peer} is not accepting sessions ({sqlstate}: {message})")]
    NotAccepting {
        /// The address tried.
        peer: SocketAddr,
        /// 57P01, 57P02 or 57P03.
        sqlstate: String,
        /// The server's message.
        message: String,
    },
    /// A plugin routed to an endpoint tag that no endpoint of the upstream carries.
    #[error("no endpoint carries the tag {0:?}")]
    NoTaggedEndpoint(String),
    /// The upstream has no endpoints.
    #[error("the upstream has no endpoints")]
    NoEndpoint,
    /// The TLS settings cannot produce a server name for this endpoint.
    #[error(transparent)]
    Settings(#[from] crate::tls::TlsError),
}

/// Resolves `address` afresh (DNS answers may change between attempts).
pub async fn resolve(address: &str) -> Result<Vec<SocketAddr>, DialError> {
    let found: Vec<SocketAddr> = tokio::net::lookup_host(address)
        .await
        .map_err(|source| DialError::Resolve {
            address: address.to_string(),
            source,
        })?
        .collect();
    if found.is_empty() {
        return Err(DialError::Resolve {
            address: address.to_string(),
            source: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
        });
    }
    Ok(found)
}

/// Connects to `address` (resolving it) within `timeout`, then starts TLS as configured.
/// Returns the stream and the socket address actually reached.
pub async fn dial(
    address: &str,
    tls: Option<&TlsClient>,
    pg_mode: PostgresTls,
    handshake: Handshake,
    timeout: Duration,
) -> Result<(UpstreamIo, SocketAddr), DialError> {
    tokio::time::timeout(timeout, async {
        let addrs = resolve(address).await?;
        let mut last = None;
        for peer in addrs {
            match dial_addr(peer, address, tls, pg_mode, handshake).await {
                Ok(io) => return Ok((io, peer)),
                Err(e @ DialError::Tcp { .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(DialError::Timeout(timeout)))
    })
    .await
    .map_err(|_| DialError::Timeout(timeout))?
}

/// Connects to one resolved address; `address` supplies the host for SNI.
pub async fn dial_addr(
    peer: SocketAddr,
    address: &str,
    tls: Option<&TlsClient>,
    pg_mode: PostgresTls,
    handshake: Handshake,
) -> Result<UpstreamIo, DialError> {
    let mut tcp = TcpStream::connect(peer)
        .await
        .map_err(|source| DialError::Tcp { peer, source })?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else {
        return Ok(UpstreamIo::Plain(tcp));
    };
    let direct = handshake == Handshake::Postgres && pg_mode == PostgresTls::Direct;
    if handshake == Handshake::Postgres && !direct {
        tcp.write_all(&SSL_REQUEST)
            .await
            .map_err(|source| DialError::Tcp { peer, source })?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer)
            .await
            .map_err(|e| DialError::Protocol {
                peer,
                reason: format!("no answer to SSLRequest: {e}"),
            })?;
        match answer[0] {
            b'S' => {}
            b'N' => return Err(DialError::TlsRefused(peer)),
            other => {
                return Err(DialError::Protocol {
                    peer,
                    reason: format!("unexpected answer {other:#04x} to SSLRequest"),
                });
            }
        }
    }
    let host = split_host_port(address).map(|(h, _)| h).unwrap_or(address);
    let name = tls.server_name(host)?;
    let alpn = match handshake {
        Handshake::Postgres if direct => Alpn::Postgres,
        Handshake::Http(HttpVersion::Auto) => Alpn::HttpAny,
        Handshake::Http(HttpVersion::Http1) => Alpn::Http1,
        Handshake::Http(HttpVersion::Http2) => Alpn::Http2,
        _ => Alpn::None,
    };
    let stream = tls
        .connector_for(alpn)
        .connect(name, tcp)
        .await
        .map_err(|source| DialError::Tls { peer, source })?;
    Ok(UpstreamIo::Tls(Box::new(stream)))
}
