//! Test plugin: denies every connection with the reason `deny-all VERSION`, VERSION being
//! the config key `version` (default `v0`), so that a test can tell which version of the
//! plugin served a connection. The twin of `allow-all`, for hot-swap tests.
#![forbid(unsafe_code)]

use wasmbassador_sdk::prelude::*;

#[derive(Default)]
struct DenyAll {
    reason: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    version: Option<String>,
}

impl Plugin for DenyAll {
    fn init(&mut self, config: &Config) -> Result<(), String> {
        let settings: Settings = config.parse()?;
        self.reason = format!("deny-all {}", settings.version.as_deref().unwrap_or("v0"));
        Ok(())
    }

    fn on_connect(&self, _: &Connection) -> Verdict {
        Verdict::deny(self.reason.clone())
    }
}

export_plugin!(DenyAll::default());
