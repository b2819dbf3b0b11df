//! Test plugin: allows every connection, and counts it in
//! `allow_all_connections_total{version}` so that a test can tell which version served
//! it (config key `version`, default `v0`). The twin of `deny-all`, for hot-swap tests
//! that alternate the two.
#![forbid(unsafe_code)]

use wasmbassador_sdk::prelude::*;

#[derive(Default)]
struct AllowAll {
    version: String,
    connections: Option<Counter>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    version: Option<String>,
}

impl Plugin for AllowAll {
    fn init(&mut self, config: &Config) -> Result<(), String> {
        let settings: Settings = config.parse()?;
        self.version = settings.version.unwrap_or_else(|| "v0".to_owned());
        self.connections = Some(Counter::define(
            "allow_all_connections_total",
            "Connections allowed by the allow-all test plugin, by its configured version.",
            &["version"],
        )?);
        Ok(())
    }

    fn on_connect(&self, _: &Connection) -> Verdict {
        if let Some(connections) = &self.connections {
            connections.inc(&[&self.version]);
        }
        Verdict::Allow
    }
}

export_plugin!(AllowAll::default());
