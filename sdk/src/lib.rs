//! Write [wasmbassador](https://example.invalid/wasmbassador) plugins in Rust.
//!
//! A plugin is a WebAssembly component that wasmbassador loads from a watched folder and
//! calls at fixed points in the life of every connection of the listeners that list it.
//! With this crate a plugin is one type that implements [`Plugin`] and one
//! [`export_plugin!`] line; the WIT interface underneath (`wit/plugin.wit` in this crate,
//! package `wasmbassador:plugin@0.1.4`) stays out of sight.
//!
//! # Hooks, in the order they run
//!
//! Every method of [`Plugin`] has a default, so a plugin implements only what it needs.
//! A hook left at its default costs nothing after the first connection: the default
//! body tells the host once, and the host stops calling it for that plugin version.
//!
//! | hook | when | may | default | on error or timeout |
//! |---|---|---|---|---|
//! | [`init`](Plugin::init) | once per instance, before anything else, with the plugin's `config` table | check and keep its [`Config`]; declare [`metrics`]; read [granted files](read_granted_file) | `Ok(())` | `Err`, a panic or a timeout refuses the plugin: a startup error at `run`, and during a hot swap the previous version keeps serving |
//! | [`on_connect`](Plugin::on_connect) | for each new connection, in the listener's `plugins` order, after the PostgreSQL startup message was read and before any upstream is contacted | return [`Verdict::Allow`], [`Verdict::deny`] or a route ([`Verdict::route_upstream`], [`Verdict::route_tag`]); log; count | [`Verdict::Allow`] (no objection) | a panic, a timeout or a memory overrun is answered by the plugin's `on_error` policy: `deny` refuses the connection, `allow` lets the chain go on |
//! | *the connection* | bytes flow between client and upstream; on `tcp` and `postgres` listeners plugins are not called | | | |
//! | [`on_request`](Plugin::on_request) | `http` listeners: for each request, in `plugins` order, once its head arrived and before any upstream is contacted | read method, path, [`Headers`](http::Headers); return [`Action::forward`](http::Action::forward) with header edits, a route or a retryable mark, or [`Action::respond`](http::Action::respond) with a local answer | forward unchanged | the `on_error` policy: `deny` answers 503 naming the plugin, `allow` forwards unchanged |
//! | [`on_response`](Plugin::on_response) | `http` listeners: for each response (the upstream's, a plugin's or the host's 502/503/504), in reverse `plugins` order, before its head goes to the application | observe status, [`Source`](http::Source), duration, attempts; return [`HeaderEdit`](http::HeaderEdit)s | no edits | counted and logged; the response goes on unchanged |
//! | [`on_close`](Plugin::on_close) | once per connection whose `on_connect` ran here, after both sides closed, off the byte path | log; count; observe durations | nothing | counted and logged; there is nothing to answer |
//!
//! Chain rules (from the host): the first `deny` ends the chain and refuses the
//! connection (a PostgreSQL client receives an ErrorResponse, SQLSTATE 28000, with the
//! reason); a route is recorded and the chain goes on, a later route replacing an earlier
//! one. PostgreSQL CancelRequests skip the chain. On `http` listeners the chain runs per
//! request instead (`on_connect` and `on_close` are not called there): each plugin sees
//! the header edits of those before it, the first local answer ends the chain, the last
//! route wins, and `on_response` runs for every plugin the request reached. Fields the
//! host manages (`host`, `content-length`, hop-by-hop fields) cannot be edited.
//!
//! Every call runs under the plugin's deadline (`timeout`, default 10 ms) and memory cap
//! (`memory`, default 16 MiB). After a panic or a timeout the host throws the instance
//! away; the next call goes to a fresh one, which runs `init` again. The host may keep
//! several instances of a plugin (one per worker thread), so a plugin may keep state in
//! `self` — through [`Cell`](std::cell::Cell) or [`RefCell`](std::cell::RefCell), since
//! hooks take `&self` — but must not rely on one instance seeing every connection.
//!
//! # What a plugin can reach
//!
//! Only what this crate offers: [`log`], [`metrics`], a monotonic clock ([`now`]) and the
//! files the operator granted ([`read_granted_file`]). The host gives a plugin no
//! filesystem, environment, network, stdio, randomness or clock of its own: `std::fs`
//! returns errors and `std::env::vars()` is empty, while `println!`, `eprintln!`,
//! `dbg!`, `std::time::{Instant, SystemTime}` and `HashMap`'s default hasher reach WASI
//! functions that trap. Use [`log`] and [`now`] instead, and `BTreeMap` (or a `HashMap`
//! with a fixed hasher). A panic is reported through the host log with its message, then
//! ends the call as a trap.
//!
//! # A complete plugin
//!
//! ```no_run
//! use std::cell::Cell;
//! use wasmbassador_sdk::prelude::*;
//!
//! /// Lets only the configured database users in.
//! #[derive(Default)]
//! struct OnlyUsers {
//!     users: Vec<String>,
//!     denied: Cell<u64>,
//! }
//!
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Settings {
//!     users: Vec<String>,
//! }
//!
//! impl Plugin for OnlyUsers {
//!     fn init(&mut self, config: &Config) -> Result<(), String> {
//!         let settings: Settings = config.parse()?;
//!         self.users = settings.users;
//!         log::info(format!("allowing {} users", self.users.len()));
//!         Ok(())
//!     }
//!
//!     fn on_connect(&self, c: &Connection) -> Verdict {
//!         match c.db_user() {
//!             Some(user) if self.users.iter().any(|u| u == user) => Verdict::Allow,
//!             Some(user) => {
//!                 self.denied.set(self.denied.get() + 1);
//!                 Verdict::deny(format!("user {user:?} may not connect"))
//!             }
//!             None => Verdict::deny("no user given"),
//!         }
//!     }
//! }
//!
//! export_plugin!(OnlyUsers::default());
//! ```
//!
//! With the host config
//!
//! ```toml
//! [[plugin]]
//! name = "only-users"
//! path = "/etc/wasmbassador/plugins/only_users.wasm"
//! config = { users = ["app", "report"] }
//! ```
//!
//! # Building
//!
//! The plugin crate has `crate-type = ["cdylib"]` and depends on this crate; then
//!
//! ```sh
//! cargo build --target wasm32-wasip2 --release
//! ```
//!
//! writes the component to `target/wasm32-wasip2/release/<crate_name>.wasm` (dashes in
//! the crate name become underscores). Recommended: link with a 64 KiB stack, which makes
//! a fresh instance about three times cheaper, by putting this in `.cargo/config.toml`
//! next to the plugin's `Cargo.toml`:
//!
//! ```toml
//! [target.wasm32-wasip2]
//! rustflags = ["-C", "link-arg=-zstack-size=65536"]
//! ```
//!
//! and a size-optimised release profile (`opt-level = "s"`, `lto = true`,
//! `codegen-units = 1`, `panic = "abort"`, `strip = true`); the crate's README has the
//! whole walk-through.
#![warn(missing_docs)]
#![deny(unsafe_code)]

// Lets the generated bindings name this crate by the path a plugin crate uses for it.
extern crate self as wasmbassador_sdk;

mod config;
mod connection;
mod files;
pub mod http;
pub mod log;
pub mod metrics;
mod plugin;
mod runtime;
mod time;
mod verdict;

pub use config::Config;
pub use connection::{Closed, Connection, Outcome, Protocol};
pub use files::read_granted_file;
pub use plugin::Plugin;
pub use time::now;
pub use verdict::{Route, Verdict};

/// Everything a plugin usually needs, for `use wasmbassador_sdk::prelude::*;`.
pub mod prelude {
    pub use crate::export_plugin;
    pub use crate::http::{Action, HeaderEdit, Headers, Request, Response, Source};
    pub use crate::log;
    pub use crate::metrics::{Counter, Histogram};
    pub use crate::{Closed, Config, Connection, Outcome, Plugin, Protocol, Route, Verdict};
    pub use crate::{now, read_granted_file};
}

/// Exports a plugin: the one line that turns a crate into a wasmbassador plugin.
///
/// The argument is an expression that builds the plugin value; for a unit struct that is
/// just its name (`export_plugin!(AllowApp);`), otherwise for example
/// `export_plugin!(MyPlugin::default());`. The expression is evaluated each time the host
/// calls `init` (once per instance); [`Plugin::init`] then runs on the new value with the
/// plugin's config, and the value serves every later hook of that instance.
///
/// Use it once per crate (it defines the component's exports). It works in a crate that
/// forbids `unsafe_code`: the export glue it expands to is this crate's, not the
/// plugin's.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:expr) => {
        // A `const` block rather than a module: its items see the caller's items, also
        // when the macro is used inside a function (as in a doctest).
        const _: () = {
            struct Exports;

            impl $crate::__private::Guest for Exports {
                fn init(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::init(config, || $plugin)
                }

                fn on_connect(info: $crate::__private::ConnectInfo) -> $crate::__private::WitVerdict {
                    $crate::__private::on_connect(info)
                }

                fn on_close(info: $crate::__private::CloseInfo) {
                    $crate::__private::on_close(info)
                }
            }

            impl $crate::__private::PackedGuest for Exports {
                fn on_connect(
                    text: ::std::string::String,
                    info: $crate::__private::ConnectSpans,
                ) -> $crate::__private::WitVerdict {
                    $crate::__private::on_connect_packed(text, info)
                }

                fn on_close(text: ::std::string::String, info: $crate::__private::CloseSpans) {
                    $crate::__private::on_close_packed(text, info)
                }
            }

            impl $crate::__private::PackedHttpGuest for Exports {
                fn on_request(
                    bytes: ::std::vec::Vec<u8>,
                    request: $crate::__private::RequestSpans,
                ) -> $crate::__private::RequestAction {
                    $crate::__private::on_request_packed(bytes, request)
                }

                fn on_response(
                    bytes: ::std::vec::Vec<u8>,
                    response: $crate::__private::ResponseSpans,
                ) -> ::std::vec::Vec<$crate::__private::WitHeaderEdit> {
                    $crate::__private::on_response_packed(bytes, response)
                }
            }

            impl $crate::__private::HttpGuest for Exports {
                fn on_request(info: $crate::__private::RequestInfo) -> $crate::__private::RequestAction {
                    $crate::__private::on_request(info)
                }

                fn on_response(
                    info: $crate::__private::ResponseInfo,
                ) -> ::std::vec::Vec<$crate::__private::WitHeaderEdit> {
                    $crate::__private::on_response(info)
                }
            }

    $crate::__private::export_hooks!(Exports with_types_in $crate::__private::bindings);
        };
    };
}

/// Not public API: the generated bindings and the glue [`export_plugin!`] expands to.
#[doc(hidden)]
pub mod __private {
    pub use crate::runtime::{
        init, on_close, on_close_packed, on_connect, on_connect_packed, on_request, on_request_packed,
        on_response, on_response_packed,
    };
    pub use bindings::exports::wasmbassador::plugin::hooks::Guest;
    pub use bindings::exports::wasmbassador::plugin::http_hooks::Guest as HttpGuest;
    pub use bindings::exports::wasmbassador::plugin::packed_hooks::{
        CloseSpans, ConnectSpans, Guest as PackedGuest,
    };
    pub use bindings::exports::wasmbassador::plugin::packed_http_hooks::{
        Guest as PackedHttpGuest, RequestSpans, ResponseSpans,
    };
    pub use bindings::wasmbassador::plugin::http_types::{
        HeaderEdit as WitHeaderEdit, RequestAction, RequestInfo, ResponseInfo,
    };
    pub use bindings::wasmbassador::plugin::types::{CloseInfo, ConnectInfo, Verdict as WitVerdict};

    #[allow(missing_docs, unsafe_code, clippy::all)]
    pub mod bindings {
        wit_bindgen::generate!({
            path: "wit",
            world: "packed-plugin",
            // Imports take borrowed arguments (`&str`, `&[&str]`), so host calls need no
            // copies on the guest side.
            ownership: Borrowing { duplicate_if_necessary: false },
            export_macro_name: "export_hooks",
            pub_export_macro: true,
            default_bindings_module: "wasmbassador_sdk::__private::bindings",
            runtime_path: "wasmbassador_sdk::__private::wit_bindgen::rt",
        });
    }

    pub use bindings::export_hooks;
    pub use wit_bindgen;
}
