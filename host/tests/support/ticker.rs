//! A background heartbeat on a long-lived PostgreSQL session: proves that a session
//! opened before some change (a reload, a plugin swap) keeps working through it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Runs `select 1` on a session every `every` in the background and counts failures.
pub struct Ticker {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<u64>,
}

impl Ticker {
    /// Starts ticking; a query that does not answer within `patience` counts as
    /// failed. Bounded: at most two minutes' worth of queries, whatever happens.
    pub fn start(client: Arc<tokio_postgres::Client>, every: Duration, patience: Duration) -> Ticker {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicU64::new(0));
        let (s, f) = (stop.clone(), failures.clone());
        let most = (Duration::from_secs(120).as_millis() / every.as_millis().max(1)) as u64;
        let task = tokio::spawn(async move {
            let mut queries = 0;
            while !s.load(Ordering::Relaxed) && queries < most {
                match tokio::time::timeout(patience, client.simple_query("select 1")).await {
                    Ok(Ok(_)) => {}
                    _ => {
                        f.fetch_add(1, Ordering::Relaxed);
                    }
                }
                queries += 1;
                tokio::time::sleep(every).await;
            }
            queries
        });
        Ticker { stop, failures, task }
    }

    /// Stops the ticker: (queries run, queries failed).
    pub async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let queries = self.task.await.expect("ticker task");
        (queries, self.failures.load(Ordering::Relaxed))
    }
}
