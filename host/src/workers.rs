//! Connection threads: a fixed set of threads, each with a single-threaded tokio
//! runtime of its own, that run the application connections (and, for `http`
//! listeners, their upstream connection pools).
//!
//! # Why not one multi-threaded runtime
//! A proxied request wakes several tasks in turn (the app connection, the pooled
//! upstream connection, the response body). On a work-stealing runtime those tasks
//! land on different threads, and each hand-over is a cross-thread wake-up: a futex
//! call and a context switch, which on two cores cost more than the request's own
//! work (docs/benchmarks.md). Here a connection and everything it spawns stay on one
//! thread, as in HAProxy, nginx or Envoy; the listeners accept on the control runtime
//! and hand each new socket to the thread with the fewest open connections.
//!
//! An embedding program that starts the ambassador without connection threads keeps
//! every connection on its own runtime, as before.

use std::cell::Cell;
use std::io;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// Upper bound on connection threads (and so on per-thread pool slots).
pub const MAX_WORKERS: usize = 256;

thread_local! {
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The connection thread this code runs on (0-based), or `None` off them.
pub fn current() -> Option<usize> {
    WORKER.with(Cell::get)
}

/// Where new connections go: the handles of the running connection threads.
#[derive(Debug)]
pub struct Workers {
    threads: Vec<Worker>,
}

#[derive(Debug)]
struct Worker {
    handle: Handle,
    /// Connections this thread serves now.
    open: Arc<AtomicUsize>,
}

/// Counts one connection on its thread until dropped.
#[derive(Debug)]
pub struct Assigned {
    open: Arc<AtomicUsize>,
}

impl Drop for Assigned {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Workers {
    /// The thread with the fewest open connections (the first of equals), and a
    /// guard that counts the connection there while it lives.
    pub fn pick(&self) -> (&Handle, Assigned) {
        let w = self
            .threads
            .iter()
            .min_by_key(|w| w.open.load(Ordering::Relaxed))
            .expect("at least one connection thread");
        w.open.fetch_add(1, Ordering::Relaxed);
        (&w.handle, Assigned { open: w.open.clone() })
    }
}

/// The running threads; dropping this stops them (tasks still on them are dropped,
/// which closes their sockets).
#[derive(Debug)]
pub struct WorkerThreads {
    /// Shared with the listeners.
    pub workers: Arc<Workers>,
    stops: Vec<oneshot::Sender<()>>,
    joins: Vec<JoinHandle<()>>,
}

impl WorkerThreads {
    /// Starts `n` connection threads (at most [`MAX_WORKERS`]).
    pub fn start(n: NonZeroUsize) -> io::Result<Self> {
        let n = n.get().min(MAX_WORKERS);
        let mut threads = Vec::with_capacity(n);
        let mut stops = Vec::with_capacity(n);
        let mut joins = Vec::with_capacity(n);
        let (ready, started) = std::sync::mpsc::channel::<()>();
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let ready = ready.clone();
            let join = std::thread::Builder::new()
                .name(format!("wb-conn-{i}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(Some(i)));
                    let _ = ready.send(());
                    drop(ready);
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                })?;
            threads.push(Worker {
                handle,
                open: Arc::new(AtomicUsize::new(0)),
            });
            stops.push(stop);
            joins.push(join);
        }
        // Returns once every thread runs (and carries its name).
        for _ in 0..n {
            let _ = started.recv();
        }
        Ok(Self {
            workers: Arc::new(Workers { threads }),
            stops,
            joins,
        })
    }
}

impl Drop for WorkerThreads {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        for join in self.joins.drain(..) {
            let _ = join.join();
        }
    }
}
