//! Test plugin: makes the HTTP chain visible. `on_request` appends `x-chain: NAME` to
//! the request and `x-chain-seen-by-NAME: K`, K being how many `x-chain` fields it saw
//! (so earlier plugins' edits show); `on_response` appends `x-chain-response: NAME`
//! (responses pass the chain in reverse) and `x-source-NAME` (who made the response).
//!
//! Config: `name` (required); `respond` (optional status: answer locally with it,
//! body `NAME says STATUS\n`); `route_upstream` / `route_tag` (optional route);
//! `retryable` (optional bool: mark the request retryable); `set` (optional
//! `[name, value]` pair set on the request, to try fields the host manages).
#![forbid(unsafe_code)]

use wasmbassador_sdk::http::{Action, HeaderEdit, Request, Response};
use wasmbassador_sdk::prelude::{Config, Plugin, Route, export_plugin};

#[derive(Default)]
struct Stamp {
    s: Settings,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Settings {
    name: String,
    respond: Option<u16>,
    route_upstream: Option<String>,
    route_tag: Option<String>,
    #[serde(default)]
    retryable: bool,
    set: Option<(String, String)>,
}

impl Plugin for Stamp {
    fn init(&mut self, config: &Config) -> Result<(), String> {
        self.s = config.parse()?;
        if self.s.name.is_empty() {
            return Err("config.name: must not be empty".into());
        }
        Ok(())
    }

    fn on_request(&self, request: &Request) -> Action {
        let name = &self.s.name;
        if let Some(status) = self.s.respond {
            return Action::respond(status)
                .set_header("x-answered-by", name.as_bytes())
                .body(format!("{name} says {status}\n"));
        }
        let seen = request.headers().get_all("x-chain").count();
        let mut a = Action::forward()
            .append_header("x-chain", name.as_bytes())
            .set_header(format!("x-chain-seen-by-{name}"), seen.to_string());
        if let Some(u) = &self.s.route_upstream {
            a = a.route(Route::Upstream(u.clone()));
        }
        if let Some(t) = &self.s.route_tag {
            a = a.route(Route::Tag(t.clone()));
        }
        if self.s.retryable {
            a = a.retryable();
        }
        if let Some((n, v)) = &self.s.set {
            a = a.set_header(n.clone(), v.as_bytes());
        }
        a
    }

    fn on_response(&self, response: &Response) -> Vec<HeaderEdit> {
        let name = &self.s.name;
        vec![
            HeaderEdit::append("x-chain-response", name.as_bytes()),
            HeaderEdit::set(format!("x-source-{name}"), response.source().as_str()),
        ]
    }
}

export_plugin!(Stamp::default());
