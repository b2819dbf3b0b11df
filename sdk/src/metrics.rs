//! Counters and histograms, exposed by the host at `/metrics`.
//!
//! Declare each metric in [`Plugin::init`](crate::Plugin::init) and keep the handle:
//!
//! ```no_run
//! use wasmbassador_sdk::metrics::Counter;
//! # fn init() -> Result<(), String> {
//! let denied = Counter::define("denied_total", "Connections denied.", &["listener"])?;
//! denied.add(&["orders-db"], 1);
//! # Ok(()) }
//! ```
//!
//! The host exposes a metric `NAME` as `wasmbassador_plugin_NAME`, with a first label
//! `plugin` holding the plugin's configured name and then the declared labels. Names and
//! label names match `[a-zA-Z_][a-zA-Z0-9_]*`; `plugin` is reserved as a label name.
//! Every instance of a plugin runs `init`, so declaring the same metric again with the
//! same shape is fine; a different shape is an error (a new version of the plugin may
//! change it).
//!
//! Label values must come from small, fixed sets — listener names, outcomes, a
//! direction — not from client input such as user names: the host caps the number of
//! label-value sets per metric and drops new sets past the cap. Recording with the wrong
//! number of label values is dropped and logged by the host, never a panic.

use crate::__private::bindings::wasmbassador::plugin::host;

/// A counter: a number that only goes up (connections, bytes, errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    name: String,
}

impl Counter {
    /// Declares the counter `name` with a help text and label names (possibly none) and
    /// returns a handle to record with. `Err` names what the host refused (a bad name, or
    /// the same name declared earlier with another shape).
    pub fn define(name: &str, help: &str, label_names: &[&str]) -> Result<Counter, String> {
        host::define_counter(name, help, label_names)
            .map_err(|e| format!("cannot define counter {name:?}: {e}"))?;
        Ok(Counter {
            name: name.to_owned(),
        })
    }

    /// Adds `value` to the series with these label values, in the order of the declared
    /// label names.
    pub fn add(&self, label_values: &[&str], value: u64) {
        host::counter_add(&self.name, label_values, value);
    }

    /// Adds one.
    pub fn inc(&self, label_values: &[&str]) {
        self.add(label_values, 1);
    }

    /// The name it was declared with (without the host's prefix).
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A histogram: a distribution of observed values (durations, sizes), in buckets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram {
    name: String,
}

impl Histogram {
    /// Bucket upper bounds for durations in seconds, 0.5 ms to 10 s — a good start for
    /// connection or hook timings.
    pub const SECONDS: &'static [f64] = &[
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];

    /// Declares the histogram `name` with a help text, label names and bucket upper bounds
    /// (finite, strictly increasing; empty for the host's defaults, which are Prometheus'
    /// defaults in seconds). `Err` names what the host refused.
    pub fn define(
        name: &str,
        help: &str,
        label_names: &[&str],
        buckets: &[f64],
    ) -> Result<Histogram, String> {
        host::define_histogram(name, help, label_names, buckets)
            .map_err(|e| format!("cannot define histogram {name:?}: {e}"))?;
        Ok(Histogram {
            name: name.to_owned(),
        })
    }

    /// Records one observation in the series with these label values, in the order of
    /// the declared label names. NaN is dropped.
    pub fn observe(&self, label_values: &[&str], value: f64) {
        host::histogram_observe(&self.name, label_values, value);
    }

    /// The name it was declared with (without the host's prefix).
    pub fn name(&self) -> &str {
        &self.name
    }
}
