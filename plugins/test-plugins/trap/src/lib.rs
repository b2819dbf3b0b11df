//! Test plugin: panics — a trap for the host — in `on_connect` (by default), or in the
//! hook named by the optional config key `at`: `"init"`, `"on_connect"`, `"on_close"`,
//! `"on_request"` or `"on_response"`.
#![forbid(unsafe_code)]

use wasmbassador_sdk::http;
use wasmbassador_sdk::prelude::*;

#[derive(Default)]
struct Trap {
    at: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    at: Option<String>,
}

impl Plugin for Trap {
    fn init(&mut self, config: &Config) -> Result<(), String> {
        let settings: Settings = config.parse()?;
        self.at = settings.at.unwrap_or_else(|| "on_connect".to_owned());
        match self.at.as_str() {
            "init" => panic!("trap plugin: panicking in init as configured"),
            "on_connect" | "on_close" | "on_request" | "on_response" => Ok(()),
            other => Err(format!(
                "config.at: {other:?} is not init, on_connect, on_close, on_request or on_response"
            )),
        }
    }

    fn on_connect(&self, _: &Connection) -> Verdict {
        if self.at == "on_connect" {
            panic!("trap plugin: panicking in on_connect as configured");
        }
        Verdict::Allow
    }

    fn on_close(&self, _: &Closed) {
        if self.at == "on_close" {
            panic!("trap plugin: panicking in on_close as configured");
        }
    }

    fn on_request(&self, _: &http::Request) -> http::Action {
        if self.at == "on_request" {
            panic!("trap plugin: panicking in on_request as configured");
        }
        http::Action::forward()
    }

    fn on_response(&self, _: &http::Response) -> Vec<http::HeaderEdit> {
        if self.at == "on_response" {
            panic!("trap plugin: panicking in on_response as configured");
        }
        Vec::new()
    }
}

export_plugin!(Trap::default());
