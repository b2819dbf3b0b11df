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

use std::fmt::{self, Write as _};
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

/// The fields of a human-format line, as tracing-subscriber's `DefaultFields` writes
/// them (`message name=value ...`, control characters in the message escaped the same
/// way), but with the message escaped in runs instead of one character at a time.
///
/// Written by hand because the default's escaping writer hands the message to the line
/// buffer one `char` at a time: with an access-log plugin (a line of ~200 characters per
/// connection) that took a tenth of all samples in a profile of the plugin chain, the
/// largest single cost of the line (docs/benchmarks.md).
#[derive(Debug, Clone, Copy, Default)]
pub struct Fields;

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for Fields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        writer: tracing_subscriber::fmt::format::Writer<'w>,
        fields: R,
    ) -> fmt::Result {
        let mut visitor = FieldVisitor {
            ansi: writer.has_ansi_escapes(),
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct FieldVisitor<'w> {
    writer: tracing_subscriber::fmt::format::Writer<'w>,
    ansi: bool,
    first: bool,
    result: fmt::Result,
}

impl FieldVisitor<'_> {
    fn name(&mut self, name: &str) -> fmt::Result {
        if self.ansi {
            // Italic name, dimmed `=`: the default's colours on a terminal.
            write!(self.writer, "\x1b[3m{name}\x1b[0m\x1b[2m=\x1b[0m")
        } else {
            write!(self.writer, "{name}=")
        }
    }
}

impl tracing::field::Visit for FieldVisitor<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        // Fields of the `log` crate's records, already in the line's metadata.
        if name.starts_with("log.") {
            return;
        }
        if !std::mem::take(&mut self.first)
            && let Err(e) = self.writer.write_char(' ')
        {
            self.result = Err(e);
            return;
        }
        self.result = match name {
            "message" => write!(Escaping(&mut self.writer), "{value:?}"),
            name => self
                .name(name.strip_prefix("r#").unwrap_or(name))
                .and_then(|()| write!(self.writer, "{value:?}")),
        };
    }
}

/// Writes what it is given with the characters terminals act on (ESC, BEL, BS, FF,
/// DEL and the C1 controls) escaped as tracing-subscriber escapes them, and the runs
/// between them in one write each.
struct Escaping<'a, 'w>(&'a mut tracing_subscriber::fmt::format::Writer<'w>);

impl fmt::Write for Escaping<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        // Every character to escape is one of five ASCII bytes or, for U+0080..U+009F,
        // starts with the byte 0xC2: a byte scan finds the candidates.
        while let Some(at) = rest
            .bytes()
            .position(|b| matches!(b, 0x1b | 0x07 | 0x08 | 0x0c | 0x7f | 0xc2))
        {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            match c {
                '\x1b' => self.0.write_str("\\x1b")?,
                '\x07' => self.0.write_str("\\x07")?,
                '\x08' => self.0.write_str("\\x08")?,
                '\x0c' => self.0.write_str("\\x0c")?,
                '\x7f' => self.0.write_str("\\x7f")?,
                '\u{80}'..='\u{9f}' => write!(self.0, "\\u{{{:x}}}", c as u32)?,
                c => self.0.write_char(c)?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
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

    /// A shared buffer the subscribers of the format tests write into.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The same events, the lines of one subscriber.
    fn lines_of(ansi: bool, ours: bool) -> String {
        let out = Captured::default();
        let sink = out.clone();
        let builder = tracing_subscriber::fmt()
            .without_time()
            .with_ansi(ansi)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || sink.clone());
        let emit = || {
            let message = "connection closed listener=pg user=\"a b\" bytes=12";
            tracing::info!(target: "plugin", plugin = "access-log", "{message}");
            tracing::warn!(
                target: "plugin",
                plugin = "x",
                "tricks: \x1b[31mred\x1b[0m bell\x07 back\x08 feed\x0c del\x7f c1\u{85}\u{9f} nbsp\u{a0} é ü"
            );
            tracing::info!(count = 3, error = %"boom", r#type = "kind", "plain");
            tracing::debug!(list = ?vec![1, 2], text = "a\x1bb");
            tracing::info!(message = "a message field", extra = true);
        };
        if ours {
            tracing::subscriber::with_default(builder.fmt_fields(Fields).finish(), emit);
        } else {
            tracing::subscriber::with_default(builder.finish(), emit);
        }
        String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf8")
    }

    #[test]
    fn lines_read_as_tracing_subscribers_default_fields_write_them() {
        for ansi in [false, true] {
            let default = lines_of(ansi, false);
            let ours = lines_of(ansi, true);
            assert_eq!(default.lines().count(), 5, "{default}");
            assert_eq!(ours, default, "ansi {ansi}");
        }
        let plain = lines_of(false, true);
        assert!(
            plain.contains("tricks: \\x1b[31mred\\x1b[0m bell\\x07 back\\x08 feed\\x0c del\\x7f c1\\u{85}\\u{9f} nbsp\u{a0} é ü"),
            "control characters escaped, the rest as it was: {plain}"
        );
    }
}
