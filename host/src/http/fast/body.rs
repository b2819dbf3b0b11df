//! The request body on its way up while the upstream is heard, and what is done with
//! the rest of a body that is not sent: read and dropped, or left behind a lingering
//! close.

use super::*;

/// The rest of a request body on its way from the app to the upstream, which is
/// listened to all along.
pub(super) struct Upload {
    chunk: Vec<u8>,
    /// Bytes of `chunk` read from the app, and of those, written upstream.
    filled: usize,
    written: usize,
    /// Bytes still to read from the app.
    left: u64,
    /// The upstream's final response head is in: it is not listened to any more (its
    /// body waits in the socket until the upload is done).
    pub(super) deaf: bool,
}

impl Upload {
    pub(super) fn new(left: u64) -> Self {
        Upload {
            chunk: vec![0u8; READ_CHUNK],
            filled: 0,
            written: 0,
            left,
            deaf: false,
        }
    }

    /// Reads what the upstream says meanwhile, unless [`Upload::deaf`].
    fn listen(
        &self,
        io: &mut UpstreamIo,
        cx: &mut std::task::Context<'_>,
        heard: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        if self.deaf {
            return Poll::Pending;
        }
        tokio_util::io::poll_read_buf(Pin::new(io), cx, heard)
    }

    /// Goes on with the upload: `Ok(true)` when the body is all sent and flushed,
    /// `Ok(false)` when the upstream said something first (it is in `heard`), to be
    /// called again unless that is a final answer.
    pub(super) async fn run(
        &mut self,
        app: &mut AppConn,
        io: &mut UpstreamIo,
        heard: &mut BytesMut,
    ) -> Result<bool, TryError> {
        std::future::poll_fn(|cx| {
            loop {
                heard.reserve(READ_CHUNK);
                match self.listen(io, cx, heard) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(TryError::Reset(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed during the request body",
                        ))));
                    }
                    Poll::Ready(Ok(_)) => return Poll::Ready(Ok(false)),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(TryError::Reset(e))),
                    Poll::Pending => {}
                }
                if self.written < self.filled {
                    match Pin::new(&mut *io).poll_write(cx, &self.chunk[self.written..self.filled]) {
                        Poll::Ready(Ok(0)) => {
                            return Poll::Ready(Err(TryError::Reset(io::ErrorKind::WriteZero.into())));
                        }
                        Poll::Ready(Ok(n)) => {
                            self.written += n;
                            continue;
                        }
                        Poll::Ready(Err(e)) => {
                            // An upstream that answered and closed: its answer may
                            // still be waiting to be read.
                            return match self.listen(io, cx, heard) {
                                Poll::Ready(Ok(n)) if n > 0 => Poll::Ready(Ok(false)),
                                _ => Poll::Ready(Err(TryError::Reset(e))),
                            };
                        }
                        Poll::Pending => return Poll::Pending,
                    }
                }
                if self.left == 0 {
                    return Pin::new(&mut *io)
                        .poll_flush(cx)
                        .map(|r| r.map(|()| true).map_err(TryError::Reset));
                }
                let want = self.left.min(READ_CHUNK as u64) as usize;
                let mut buf = tokio::io::ReadBuf::new(&mut self.chunk[..want]);
                match Pin::new(&mut *app).poll_read(cx, &mut buf) {
                    Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                        self.filled = buf.filled().len();
                        self.written = 0;
                        self.left -= self.filled as u64;
                    }
                    Poll::Ready(_) => return Poll::Ready(Err(TryError::AppGone)),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await
    }
}

/// The most of an unread request body that is read and dropped to keep the app
/// connection after a local answer, and how long that may take.
pub(super) const SKIP_LIMIT: u64 = 64 << 10;
const SKIP_TIME: Duration = Duration::from_secs(1);

/// Reads and drops the next `left` bytes of the app connection (`read` first);
/// whether they all came within [`SKIP_TIME`].
pub(super) async fn skip(app: &mut AppConn, read: &mut BytesMut, left: u64) -> bool {
    let left = left as usize;
    let all = tokio::time::timeout(SKIP_TIME, fill(app, read, left)).await;
    if all.unwrap_or(false) {
        read.advance(left);
        return true;
    }
    false
}

/// Reads from the app connection until `read` holds `want` bytes; false when it
/// closes or fails first.
pub(super) async fn fill(app: &mut AppConn, read: &mut BytesMut, want: usize) -> bool {
    while read.len() < want {
        read.reserve(READ_CHUNK);
        match tokio::io::AsyncReadExt::read_buf(app, read).await {
            Ok(n) if n > 0 => {}
            _ => return false,
        }
    }
    true
}

/// How long, at most, the unread rest of a request body is read and dropped after
/// an early answer, and how long each read may wait.
const LINGER: Duration = Duration::from_secs(5);
const LINGER_READ: Duration = Duration::from_secs(1);

/// Closes an app connection whose request body was not read to its end: the write
/// side first, then what the app still sends is read and dropped for a while.
/// Closing at once, with bytes unread, would make the kernel reset the connection,
/// and a reset can destroy the answer before the app reads it (a lingering close,
/// as nginx and Apache do it).
pub(super) async fn linger(app: &mut AppConn) {
    if app.shutdown().await.is_err() {
        return;
    }
    let until = Instant::now() + LINGER;
    let mut sink = vec![0u8; READ_CHUNK];
    while Instant::now() < until {
        match tokio::time::timeout(LINGER_READ, tokio::io::AsyncReadExt::read(app, &mut sink)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
}
