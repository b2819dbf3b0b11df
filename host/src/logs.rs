//! The process's log output: formatted lines are appended to a shared buffer, and a
//! thread of its own writes the buffer out in batches, at most [`FLUSH_EVERY`] after
//! the first line of a batch, or as soon as [`FLUSH_AT`] bytes wait.
//!
//! Written by hand rather than with tracing-appender's non-blocking writer. That one
//! sends each line through a channel to its worker, which wakes for the line, writes
//! it and flushes once the channel is empty: under an access-log plugin (a line per
//! connection, one at a time) that is a wake-up, a context switch and a `write` per
//! line, and its worker spins on the channel between lines. Measured in process with
//! the access-log plugin: about 10 µs of CPU per line across the threads, twice the
//! whole plugin chain. Here a line costs a lock and a copy; the flusher wakes once per
//! batch.
//!
//! Lossless, as before: when [`BACKLOG`] bytes wait (the sink is slower than the
//! loggers), a logging thread waits for the flusher instead of dropping the line.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The longest a line waits in the buffer while the process runs.
pub const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// A batch this large is written without waiting for [`FLUSH_EVERY`].
pub const FLUSH_AT: usize = 64 << 10;
/// Waiting bytes at which loggers wait for the flusher.
pub const BACKLOG: usize = 8 << 20;

#[derive(Default)]
struct State {
    bytes: Vec<u8>,
    closed: bool,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    /// The flusher waits here for the first line of a batch, a full batch or the close.
    wake: Condvar,
    /// Loggers wait here while the backlog is full.
    room: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A logger that panicked mid-append leaves at worst a partial line: keep going.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn append(&self, line: &[u8]) {
        let mut state = self.lock();
        while state.bytes.len() >= BACKLOG {
            if state.closed {
                // Nobody will write it: a thread still logging after the guard is
                // dropped must not grow the buffer without end.
                return;
            }
            state = self.room.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        let first = state.bytes.is_empty();
        state.bytes.extend_from_slice(line);
        // The flusher sleeps until a batch starts, then gathers for `FLUSH_EVERY`: only
        // the first line of a batch and a full batch need to wake it.
        if first || state.bytes.len() >= FLUSH_AT {
            self.wake.notify_one();
        }
    }

    /// The flusher's loop: returns once closed and drained.
    fn flush_loop(&self, sink: &mut dyn Write) {
        let mut batch = Vec::new();
        loop {
            let mut state = self.lock();
            while state.bytes.is_empty() && !state.closed {
                state = self.wake.wait(state).unwrap_or_else(PoisonError::into_inner);
            }
            if state.bytes.is_empty() {
                return;
            }
            let deadline = Instant::now() + FLUSH_EVERY;
            while state.bytes.len() < FLUSH_AT && !state.closed {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                state = self
                    .wake
                    .wait_timeout(state, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            std::mem::swap(&mut state.bytes, &mut batch);
            drop(state);
            self.room.notify_all();
            // A failed write (stderr closed) cannot be reported anywhere better; the
            // lines are dropped and logging goes on.
            let _ = sink.write_all(&batch).and_then(|()| sink.flush());
            batch.clear();
            if batch.capacity() > 4 * FLUSH_AT {
                batch.shrink_to(FLUSH_AT);
            }
        }
    }
}

/// The `MakeWriter` of the log subscriber; cheap to clone.
#[derive(Clone)]
pub struct BatchWriter(Arc<Inner>);

/// Writes what is left and stops the flusher when dropped; keep it for the life of
/// the process.
pub struct FlushGuard {
    inner: Arc<Inner>,
    flusher: Option<JoinHandle<()>>,
}

/// Starts the flusher writing to `sink`.
pub fn batched(sink: impl Write + Send + 'static) -> std::io::Result<(BatchWriter, FlushGuard)> {
    let inner = Arc::new(Inner::default());
    let flusher = {
        let inner = inner.clone();
        let mut sink = sink;
        std::thread::Builder::new()
            .name("wb-log".into())
            .spawn(move || inner.flush_loop(&mut sink))?
    };
    Ok((
        BatchWriter(inner.clone()),
        FlushGuard {
            inner,
            flusher: Some(flusher),
        },
    ))
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.inner.lock().closed = true;
        self.inner.wake.notify_one();
        self.inner.room.notify_all();
        if let Some(flusher) = self.flusher.take() {
            let _ = flusher.join();
        }
    }
}

/// One event's writer: the fmt layer formats a whole line, then writes it once.
pub struct LineWriter<'a>(&'a Inner);

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::fmt::MakeWriter;

    /// A sink that keeps what it is given and can be made slow.
    #[derive(Clone, Default)]
    struct Sink {
        seen: Arc<Mutex<Vec<u8>>>,
        writes: Arc<Mutex<usize>>,
        delay: Duration,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            std::thread::sleep(self.delay);
            *self.writes.lock().expect("lock") += 1;
            self.seen.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn line(w: &BatchWriter, text: &str) {
        w.make_writer().write_all(text.as_bytes()).expect("append");
    }

    #[test]
    fn a_line_is_written_within_the_flush_period_and_lines_share_writes() {
        let sink = Sink::default();
        let (w, _guard) = batched(sink.clone()).expect("flusher");
        for i in 0..1000 {
            line(&w, &format!("line {i}\n"));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while sink.seen.lock().expect("lock").len() < 1000 * 7 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let text = String::from_utf8(sink.seen.lock().expect("lock").clone()).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1000, "every line arrives while the process runs");
        assert!(
            lines.iter().enumerate().all(|(i, l)| *l == format!("line {i}")),
            "in order"
        );
        let writes = *sink.writes.lock().expect("lock");
        assert!(
            writes < 100,
            "1000 lines written in {writes} writes: they should be batched"
        );
    }

    #[test]
    fn a_slow_sink_makes_loggers_wait_and_loses_nothing() {
        let sink = Sink {
            delay: Duration::from_millis(30),
            ..Sink::default()
        };
        let (w, guard) = batched(sink.clone()).expect("flusher");
        let chunk = "x".repeat(1 << 20) + "\n";
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let w = w.clone();
                let chunk = chunk.clone();
                std::thread::spawn(move || {
                    for _ in 0..12 {
                        line(&w, &chunk);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("logger thread");
        }
        drop(guard);
        let seen = sink.seen.lock().expect("lock");
        assert_eq!(
            seen.len(),
            24 * chunk.len(),
            "all 24 MiB arrive through an 8 MiB backlog"
        );
        assert_eq!(seen.iter().filter(|&&b| b == b'\n').count(), 24);
    }

    #[test]
    fn dropping_the_guard_writes_what_waits() {
        let sink = Sink::default();
        let (w, guard) = batched(sink.clone()).expect("flusher");
        line(&w, "last words\n");
        drop(guard);
        assert_eq!(&*sink.seen.lock().expect("lock"), b"last words\n");
    }
}
