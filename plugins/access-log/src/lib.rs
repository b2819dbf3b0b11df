//! `access-log`: an observability plugin. For every closed connection it writes one
//! structured log line through the host (key=value, logfmt style) and counts it:
//!
//! - `connections_total{listener, outcome}`: closed connections;
//! - `bytes_total{listener, direction}`: bytes forwarded, `direction` being `to_upstream`
//!   or `to_client`.
//!
//! (The host exposes them as `wasmbassador_plugin_connections_total` and
//! `wasmbassador_plugin_bytes_total`, with a leading `plugin` label.)
//!
//! Config (optional): `level`, the log level of the lines — `trace`, `debug`, `info`
//! (the default), `warn` or `error`.
#![forbid(unsafe_code)]

use std::fmt::Write as _;

use serde::Deserialize;
use wasmbassador_sdk::log::Level;
use wasmbassador_sdk::prelude::*;

struct AccessLog {
    level: Level,
    metrics: Option<Metrics>,
}

struct Metrics {
    connections: Counter,
    bytes: Counter,
}

impl Default for AccessLog {
    fn default() -> Self {
        AccessLog {
            level: Level::Info,
            metrics: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    level: Option<String>,
}

impl Plugin for AccessLog {
    fn init(&mut self, config: &Config) -> Result<(), String> {
        let settings: Settings = config.parse()?;
        if let Some(level) = settings.level {
            self.level = level.parse().map_err(|e| format!("config.level: {e}"))?;
        }
        self.metrics = Some(Metrics {
            connections: Counter::define(
                "connections_total",
                "Connections closed, by listener and outcome.",
                &["listener", "outcome"],
            )?,
            bytes: Counter::define(
                "bytes_total",
                "Bytes forwarded, by listener and direction (to_upstream, to_client).",
                &["listener", "direction"],
            )?,
        });
        Ok(())
    }

    fn on_close(&self, c: &Closed) {
        log::log(self.level, line(c));
        if let Some(m) = &self.metrics {
            m.connections.inc(&[c.listener(), c.outcome().as_str()]);
            m.bytes.add(&[c.listener(), "to_upstream"], c.bytes_to_upstream());
            m.bytes.add(&[c.listener(), "to_client"], c.bytes_to_client());
        }
    }
}

/// The log line: fixed keys in a fixed order, `-` for what is unknown. Built with
/// plain pushes: `core::fmt` (and float formatting above all) was most of the cost of
/// this hook.
fn line(c: &Closed) -> String {
    let mut out = String::with_capacity(256);
    out.push_str("connection closed");
    let mut field = |key: &str, value: Option<&str>| {
        out.push(' ');
        out.push_str(key);
        out.push('=');
        quote_into(&mut out, value);
    };
    field("listener", Some(c.listener()));
    field("client", Some(c.client_addr()));
    field("user", c.db_user());
    field("database", c.database());
    field("upstream", c.upstream());
    field("endpoint", c.endpoint());
    let mut digits = itoa::Buffer::new();
    out.push_str(" bytes_to_upstream=");
    out.push_str(digits.format(c.bytes_to_upstream()));
    out.push_str(" bytes_to_client=");
    out.push_str(digits.format(c.bytes_to_client()));
    // Milliseconds with three decimals, rounded to the nearest microsecond.
    // In u64: wasm has no 128-bit division, and the library routine showed in profiles.
    let nanos = u64::try_from(c.duration().as_nanos()).unwrap_or(u64::MAX);
    let micros = nanos.saturating_add(500) / 1000;
    out.push_str(" duration_ms=");
    out.push_str(digits.format(micros / 1000));
    out.push('.');
    let frac = (micros % 1000) as u32;
    for d in [frac / 100, frac / 10 % 10, frac % 10] {
        out.push(char::from(b'0' + d as u8));
    }
    out.push_str(" outcome=");
    out.push_str(c.outcome().as_str());
    out
}

/// Writes `value` bare when that is unambiguous, otherwise in double quotes with `"` and
/// `\` escaped (logfmt); `None` as `-`. User and database names come from clients, so
/// they must not be able to forge extra fields or lines.
fn quote_into(out: &mut String, value: Option<&str>) {
    let Some(value) = value else {
        out.push('-');
        return;
    };
    let bare = !value.is_empty()
        && value != "-"
        && value
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'=' && b != b'\\');
    if bare {
        out.push_str(value);
        return;
    }
    out.push('"');
    for ch in value.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ch if ch.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(ch));
            }
            ch => out.push(ch),
        }
    }
    out.push('"');
}

export_plugin!(AccessLog::default());

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn one_line_with_every_field() {
        let closed = Closed::new("orders-db", "127.0.0.1:50123", Outcome::Completed)
            .with_upstream("orders", Some("10.0.0.5:5432"))
            .with_bytes(310, 5120)
            .with_duration(Duration::from_micros(12_345))
            .with_postgres(Some("app"), Some("orders"));
        assert_eq!(
            line(&closed),
            "connection closed listener=orders-db client=127.0.0.1:50123 user=app database=orders \
             upstream=orders endpoint=10.0.0.5:5432 bytes_to_upstream=310 bytes_to_client=5120 \
             duration_ms=12.345 outcome=completed"
        );
    }

    #[test]
    fn unknown_fields_are_dashes_and_odd_values_are_quoted() {
        let closed = Closed::new("raw", "[::1]:9", Outcome::UpstreamUnreachable)
            .with_postgres(Some("bob smith\" x=1\nforged"), Some(""));
        assert_eq!(
            line(&closed),
            "connection closed listener=raw client=[::1]:9 user=\"bob smith\\\" x=1\\nforged\" database=\"\" \
             upstream=- endpoint=- bytes_to_upstream=0 bytes_to_client=0 duration_ms=0.000 \
             outcome=upstream_unreachable"
        );
    }
}
