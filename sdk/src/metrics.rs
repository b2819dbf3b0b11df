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

use std::cell::RefCell;

use crate::__private::bindings::wasmbassador::plugin::host;

/// Label sets one metric handle remembers the host's series number for; past it the
/// handle records by name.
const REMEMBERED_SERIES: usize = 64;

/// The host's numbers for the series a handle recorded into (`host.series`), by label
/// values. A record by number passes no strings to the host; a metric is recorded into
/// with the same few label sets on every call, so a short list scanned in order is
/// enough.
#[derive(Debug, Clone, Default)]
struct SeriesNumbers(RefCell<Vec<(Vec<String>, Option<u32>)>>);

impl SeriesNumbers {
    /// The host's number for the series of `name` with `values`, asked for on the first
    /// record; `None` when the host has none (the record then goes by name, so the host
    /// counts a dropped record as it would anyway).
    fn get(&self, name: &str, values: &[&str]) -> Option<u32> {
        let mut known = self.0.borrow_mut();
        let same = |k: &Vec<String>| k.len() == values.len() && k.iter().zip(values).all(|(a, b)| a == b);
        if let Some((_, number)) = known.iter().find(|(k, _)| same(k)) {
            return *number;
        }
        if known.len() >= REMEMBERED_SERIES {
            return None;
        }
        let number = host::series(name, values);
        known.push((values.iter().map(|v| (*v).to_owned()).collect(), number));
        number
    }
}

/// A counter: a number that only goes up (connections, bytes, errors).
///
/// A handle remembers the host's number for each label set it records into, so that
/// later records pass no strings; keep the handle (in the plugin value) rather than
/// defining the counter again per call.
#[derive(Debug, Clone)]
pub struct Counter {
    name: String,
    numbers: SeriesNumbers,
}

impl PartialEq for Counter {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for Counter {}

impl Counter {
    /// Declares the counter `name` with a help text and label names (possibly none) and
    /// returns a handle to record with. `Err` names what the host refused (a bad name, or
    /// the same name declared earlier with another shape).
    pub fn define(name: &str, help: &str, label_names: &[&str]) -> Result<Counter, String> {
        host::define_counter(name, help, label_names)
            .map_err(|e| format!("cannot define counter {name:?}: {e}"))?;
        Ok(Counter {
            name: name.to_owned(),
            numbers: SeriesNumbers::default(),
        })
    }

    /// Adds `value` to the series with these label values, in the order of the declared
    /// label names.
    pub fn add(&self, label_values: &[&str], value: u64) {
        match self.numbers.get(&self.name, label_values) {
            Some(series) => host::series_add(series, value),
            None => host::counter_add(&self.name, label_values, value),
        }
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
/// Like [`Counter`], a handle remembers the host's number for each label set.
#[derive(Debug, Clone)]
pub struct Histogram {
    name: String,
    numbers: SeriesNumbers,
}

impl PartialEq for Histogram {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for Histogram {}

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
            numbers: SeriesNumbers::default(),
        })
    }

    /// Records one observation in the series with these label values, in the order of
    /// the declared label names. NaN is dropped.
    pub fn observe(&self, label_values: &[&str], value: f64) {
        match self.numbers.get(&self.name, label_values) {
            Some(series) => host::series_observe(series, value),
            None => host::histogram_observe(&self.name, label_values, value),
        }
    }

    /// The name it was declared with (without the host's prefix).
    pub fn name(&self) -> &str {
        &self.name
    }
}
