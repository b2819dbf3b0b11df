//! Byte forwarding in both directions with half-close, an idle timeout and counters.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::metrics::ShardedCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::connect::UpstreamIo;
use crate::postgres::KeyWatcher;

/// Buffer per direction at first: small, so that a thousand quiet connections stay
/// cheap.
const BUF_START: usize = 16 * 1024;
/// A direction whose reads keep filling the buffer is bulk traffic; its buffer grows
/// up to this, so that bulk data moves in fewer, larger system calls.
const BUF_MAX: usize = 256 * 1024;

/// How a forwarded connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Both sides closed their sending half.
    Closed,
    /// Nothing moved in either direction for the idle timeout.
    Idle,
    /// The process stopped waiting for it (drain timeout).
    Stopped,
}

/// What passed through one connection.
#[derive(Debug)]
pub struct Totals {
    /// Bytes from the client to the upstream.
    pub to_upstream: u64,
    /// Bytes from the upstream to the client.
    pub to_client: u64,
    /// Why it ended.
    pub ending: Ending,
    /// The socket error that ended it, if one did.
    pub error: Option<io::Error>,
}

/// Counters a connection adds its bytes to.
#[derive(Debug, Clone)]
pub struct ByteCounters {
    /// Client to upstream.
    pub to_upstream: ShardedCounter,
    /// Upstream to client.
    pub to_client: ShardedCounter,
}

/// Copies bytes both ways until both sides have closed. A side that closes its
/// sending half has that half-close passed on while the other direction goes on; an
/// error on either side ends both.
///
/// With a plain-text upstream on Linux, a direction that carries bulk data moves it
/// with splice(2) through a pipe, socket to socket, without copying it through this
/// process; see [`Pump`].
pub async fn forward(
    mut client: TcpStream,
    upstream: UpstreamIo,
    idle_timeout: Option<Duration>,
    counters: ByteCounters,
    watcher: Option<KeyWatcher>,
    stop: CancellationToken,
) -> Totals {
    let shared = Shared {
        started: Instant::now(),
        last: AtomicU64::new(0),
    };
    let sent_up = AtomicU64::new(0);
    let sent_down = AtomicU64::new(0);
    let (cr, cw) = client.split();
    let both = async {
        match upstream {
            UpstreamIo::Plain(mut up) => {
                let (ur, uw) = up.split();
                tokio::try_join!(
                    Pump::new(&shared, &counters.to_upstream, &sent_up, None).run(cr, uw),
                    Pump::new(&shared, &counters.to_client, &sent_down, watcher).run(ur, cw),
                )
            }
            UpstreamIo::Tls(tls) => {
                let (ur, uw) = tokio::io::split(*tls);
                tokio::try_join!(
                    Pump::new(&shared, &counters.to_upstream, &sent_up, None).run(cr, uw),
                    Pump::new(&shared, &counters.to_client, &sent_down, watcher).run(ur, cw),
                )
            }
        }
    };
    let idle = async {
        match idle_timeout {
            None => std::future::pending::<()>().await,
            Some(limit) => loop {
                let quiet = shared
                    .started
                    .elapsed()
                    .saturating_sub(Duration::from_millis(shared.last.load(Ordering::Relaxed)));
                if quiet >= limit {
                    return;
                }
                tokio::time::sleep(limit - quiet).await;
            },
        }
    };
    let (ending, error) = tokio::select! {
        r = both => (Ending::Closed, r.err()),
        _ = idle => (Ending::Idle, None),
        _ = stop.cancelled() => (Ending::Stopped, None),
    };
    Totals {
        to_upstream: sent_up.load(Ordering::Relaxed),
        to_client: sent_down.load(Ordering::Relaxed),
        ending,
        error,
    }
}

/// What both directions of one connection share.
struct Shared {
    started: Instant,
    /// Milliseconds after `started` when bytes last moved, either way.
    last: AtomicU64,
}

/// The plain TCP socket under a half, for splice(2); `None` for TLS.
trait Socket {
    fn tcp(&self) -> Option<&TcpStream>;
}

impl Socket for tokio::net::tcp::ReadHalf<'_> {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

impl Socket for tokio::net::tcp::WriteHalf<'_> {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

impl<T> Socket for tokio::io::ReadHalf<T> {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

impl<T> Socket for tokio::io::WriteHalf<T> {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

/// One direction of a connection.
///
/// It starts with a small buffer, copied through user space: a quiet or chatty
/// connection costs little memory and no extra descriptors. A read that fills the
/// buffer marks bulk traffic; from then on, if both sides are plain TCP (and the
/// PostgreSQL key watcher, if any, has seen the session start), the direction moves
/// data with splice(2) through a pipe of its own. Otherwise the buffer grows, up to
/// [`BUF_MAX`], so that bulk data moves in fewer, larger system calls.
///
/// The splice loop is written here, over `rustix`, rather than taken from a crate:
/// the crates that offer one copy a whole stream and hide the chunks, and this loop
/// needs each chunk for the byte counters and the idle timeout, and must pass a
/// half-close on.
struct Pump<'a> {
    shared: &'a Shared,
    counter: &'a ShardedCounter,
    total: &'a AtomicU64,
    /// The session's cancel registration lives as long as this direction.
    watcher: Option<KeyWatcher>,
}

impl<'a> Pump<'a> {
    fn new(
        shared: &'a Shared,
        counter: &'a ShardedCounter,
        total: &'a AtomicU64,
        watcher: Option<KeyWatcher>,
    ) -> Self {
        Self {
            shared,
            counter,
            total,
            watcher,
        }
    }

    fn moved(&self, n: usize) {
        self.total.fetch_add(n as u64, Ordering::Relaxed);
        self.counter.inc_by(n as u64);
        self.shared.last.store(
            self.shared.started.elapsed().as_millis() as u64,
            Ordering::Relaxed,
        );
    }

    async fn run<R, W>(mut self, mut r: R, mut w: W) -> io::Result<()>
    where
        R: AsyncRead + Socket + Unpin,
        W: AsyncWrite + Socket + Unpin,
    {
        let mut buf = vec![0u8; BUF_START];
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                w.shutdown().await?;
                return Ok(());
            }
            if let Some(watcher) = self.watcher.as_mut() {
                watcher.feed(&buf[..n]);
            }
            w.write_all(&buf[..n]).await?;
            w.flush().await?;
            self.moved(n);
            if n == buf.len() {
                #[cfg(target_os = "linux")]
                if let (Some(from), Some(to)) = (r.tcp(), w.tcp())
                    && self.watcher.as_ref().is_none_or(KeyWatcher::is_done)
                    && let Some(pipe) = splice::Pipe::new()
                {
                    drop(buf);
                    return self.splice(&pipe, from, to).await;
                }
                if buf.len() < BUF_MAX {
                    buf.resize(buf.len() * 2, 0);
                }
            }
        }
    }

    #[cfg(target_os = "linux")]
    async fn splice(&self, pipe: &splice::Pipe, from: &TcpStream, to: &TcpStream) -> io::Result<()> {
        loop {
            let n = pipe.fill(from).await?;
            if n == 0 {
                // `to` is the write half's socket: shut down only its sending side.
                splice::shutdown_write(to)?;
                return Ok(());
            }
            pipe.drain(to, n).await?;
            self.moved(n);
        }
    }
}

#[cfg(target_os = "linux")]
mod splice {
    use std::io;
    use std::os::fd::OwnedFd;

    use rustix::pipe::{PipeFlags, SpliceFlags};
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    /// How much a pipe is asked to hold: bigger chunks, fewer system calls. The
    /// kernel may give less (`/proc/sys/fs/pipe-max-size`, or a user over
    /// `pipe-user-pages-soft`); the loop works with whatever it gets.
    const PIPE_SIZE: usize = 1024 * 1024;

    /// A pipe between two sockets; it is always empty between chunks.
    pub(super) struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
    }

    impl Pipe {
        /// A new non-blocking pipe, or `None` if the process is out of descriptors
        /// (the caller then copies through user space, as before).
        pub(super) fn new() -> Option<Self> {
            let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).ok()?;
            let _ = rustix::pipe::fcntl_setpipe_size(&write, PIPE_SIZE);
            Some(Self { read, write })
        }

        /// Moves what `from` has (up to the pipe's size) into the pipe; 0 at end of
        /// stream. The pipe is empty, so "would block" can only mean `from` has
        /// nothing to read, which is what `try_io` needs to know.
        pub(super) async fn fill(&self, from: &TcpStream) -> io::Result<usize> {
            loop {
                from.readable().await?;
                match from.try_io(Interest::READABLE, || {
                    rustix::pipe::splice(from, None, &self.write, None, PIPE_SIZE, flags())
                        .map_err(io::Error::from)
                }) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    other => return other,
                }
            }
        }

        /// Moves all `n` bytes in the pipe to `to`. "Would block" means `to`'s send
        /// buffer is full.
        pub(super) async fn drain(&self, to: &TcpStream, mut n: usize) -> io::Result<()> {
            while n > 0 {
                to.writable().await?;
                match to.try_io(Interest::WRITABLE, || {
                    rustix::pipe::splice(&self.read, None, to, None, n, flags()).map_err(io::Error::from)
                }) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(m) => n -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        }
    }

    fn flags() -> SpliceFlags {
        SpliceFlags::NONBLOCK | SpliceFlags::MOVE
    }

    /// Passes a half-close on: no more bytes to `to`, while it may still send.
    pub(super) fn shutdown_write(to: &TcpStream) -> io::Result<()> {
        match rustix::net::shutdown(to, rustix::net::Shutdown::Write) {
            // The peer is already gone; the other direction will see that.
            Err(rustix::io::Errno::NOTCONN) => Ok(()),
            other => other.map_err(io::Error::from),
        }
    }
}
