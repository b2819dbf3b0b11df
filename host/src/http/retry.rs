//! When a request may be sent again, and the budget that keeps retries from
//! multiplying load on an upstream that is already failing.

use std::sync::Mutex;
use std::time::Instant;

use http::{Method, StatusCode};

use crate::config::HttpRetryConfig;
use crate::metrics::ShardedCounter;

/// Whether a request may be sent again: an idempotent method whose body is empty,
/// so that nothing of it is lost and repeating it changes nothing (RFC 9110 §9.2.2).
/// PUT and DELETE are idempotent too, but usually carry or cause more than a read;
/// they are left to a plugin's explicit say-so later.
pub fn retryable(method: &Method, body_empty: bool) -> bool {
    body_empty && retryable_name(method.as_str())
}

/// Whether requests with this method (as it is written on the wire) may be sent
/// again when their body is empty; see [`retryable`].
pub fn retryable_name(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS")
}

/// Statuses that say "this try failed in a gateway or overloaded server; another may
/// succeed".
pub fn retry_status(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    )
}

/// A token bucket per upstream: every first try deposits `budget_percent / 100` of a
/// token, time deposits `min_retries_per_second`, and every retry takes a whole
/// token. So retries add at most that share of load (plus the floor) however many
/// requests fail: when the upstream is down, requests fail fast instead of tripling.
///
/// First tries are only counted, per thread ([`ShardedCounter`]), and folded into the
/// bucket when a retry asks for a token: a deposit is on every request, from every
/// connection thread, and a shared lock there was a cache line bouncing between the
/// threads. Folding gives the same tokens as depositing one by one, because the cap
/// is a minimum over additions only.
#[derive(Debug)]
pub struct Budget {
    ratio: f64,
    per_second: f64,
    cap: f64,
    tries: ShardedCounter,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    /// When time's tokens were last added.
    at: Instant,
    /// First tries already turned into tokens.
    folded: u64,
}

impl Budget {
    /// A budget holding one second's floor of tokens, so that the first failures
    /// after a start can be retried too.
    pub fn new(config: &HttpRetryConfig) -> Self {
        // Bursts after a quiet spell stay bounded.
        let cap = 10.0 + config.min_retries_per_second;
        Self {
            ratio: config.budget_percent / 100.0,
            per_second: config.min_retries_per_second,
            cap,
            tries: ShardedCounter::default(),
            state: Mutex::new(Bucket {
                tokens: config.min_retries_per_second.min(cap),
                at: Instant::now(),
                folded: 0,
            }),
        }
    }

    /// Records a first try.
    pub fn deposit(&self) {
        self.tries.inc();
    }

    /// Takes a token for one retry; false when there is none.
    pub fn withdraw(&self) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        let tries = self.tries.get();
        let new_tries = tries.wrapping_sub(s.folded);
        s.folded = tries;
        let now = Instant::now();
        let earned = now.duration_since(s.at).as_secs_f64() * self.per_second;
        s.tokens = (s.tokens + new_tries as f64 * self.ratio + earned).min(self.cap);
        s.at = now;
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_allows_its_share_and_no_more() {
        let b = Budget::new(&HttpRetryConfig {
            budget_percent: 20.0,
            min_retries_per_second: 0.0,
            ..HttpRetryConfig::default()
        });
        let mut allowed = 0;
        for _ in 0..100 {
            b.deposit();
            if b.withdraw() {
                allowed += 1;
            }
        }
        assert!((19..=20).contains(&allowed), "{allowed}");
    }

    #[test]
    fn deposits_past_the_cap_are_not_kept() {
        let b = Budget::new(&HttpRetryConfig {
            budget_percent: 100.0,
            min_retries_per_second: 0.0,
            ..HttpRetryConfig::default()
        });
        // A thousand first tries earn a thousand tokens, but the bucket holds ten.
        for _ in 0..1000 {
            b.deposit();
        }
        let allowed = (0..1000).filter(|_| b.withdraw()).count();
        assert_eq!(allowed, 10);
    }

    #[test]
    fn only_bodiless_reads_are_retryable() {
        assert!(retryable(&Method::GET, true));
        assert!(!retryable(&Method::GET, false));
        assert!(!retryable(&Method::POST, true));
    }
}
