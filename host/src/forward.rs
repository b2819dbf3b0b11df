//! Byte forwarding in both directions with half-close, an idle timeout and counters.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

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
    pub to_upstream: Counter,
    /// Upstream to client.
    pub to_client: Counter,
}

/// Copies bytes both ways until both sides have closed. A side that closes its
/// sending half has that half-close passed on while the other direction goes on; an
/// error on either side ends both.
pub async fn forward<C, U>(
    client: C,
    upstream: U,
    idle_timeout: Option<Duration>,
    counters: ByteCounters,
    watcher: Option<KeyWatcher>,
    stop: CancellationToken,
) -> Totals
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let last = AtomicU64::new(0);
    let sent_up = AtomicU64::new(0);
    let sent_down = AtomicU64::new(0);
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let up = pump(
        &mut cr,
        &mut uw,
        &counters.to_upstream,
        &sent_up,
        &last,
        started,
        None,
    );
    let down = pump(
        &mut ur,
        &mut cw,
        &counters.to_client,
        &sent_down,
        &last,
        started,
        watcher,
    );
    let both = async { tokio::try_join!(up, down) };
    let idle = async {
        match idle_timeout {
            None => std::future::pending::<()>().await,
            Some(limit) => loop {
                let quiet = started
                    .elapsed()
                    .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
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

async fn pump<R, W>(
    r: &mut R,
    w: &mut W,
    counter: &Counter,
    total: &AtomicU64,
    last: &AtomicU64,
    started: Instant,
    mut watcher: Option<KeyWatcher>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_START];
    // The watcher holds the session's cancel registration; it must live as long as
    // the session, so it is kept here until this direction ends.
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.shutdown().await?;
            drop(watcher);
            return Ok(());
        }
        if let Some(w) = watcher.as_mut() {
            w.feed(&buf[..n]);
        }
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        if n == buf.len() && buf.len() < BUF_MAX {
            buf.resize(buf.len() * 2, 0);
        }
        total.fetch_add(n as u64, Ordering::Relaxed);
        counter.inc_by(n as u64);
        last.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}
