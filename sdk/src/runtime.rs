//! The glue behind [`export_plugin!`](crate::export_plugin): one plugin value per
//! component instance, built in `init` and used by the other hooks.

use std::cell::{Cell, RefCell};

use crate::__private::bindings::exports::wasmbassador::plugin::packed_hooks::{CloseSpans, ConnectSpans};
use crate::__private::bindings::exports::wasmbassador::plugin::packed_http_hooks::{
    RequestSpans, ResponseSpans,
};
use crate::__private::bindings::wasmbassador::plugin::host;
use crate::__private::bindings::wasmbassador::plugin::http_types as wit_http;
use crate::__private::bindings::wasmbassador::plugin::types as wit;
use crate::http::{Request, Response};
use crate::log::{self, Level};
use crate::{Closed, Config, Connection, Plugin};

thread_local! {
    // A component instance is single-threaded: this is a plain global, without `Sync`
    // demands on the plugin type.
    static PLUGIN: RefCell<Option<Box<dyn Plugin>>> = const { RefCell::new(None) };
    static PANIC_HOOK: Cell<bool> = const { Cell::new(false) };
    // Set by the default body of a hook; the glue then tells the host that the hook
    // is unused, once per hook and instance.
    static DEFAULT_RAN: Cell<bool> = const { Cell::new(false) };
    static REPORTED: Cell<[bool; 4]> = const { Cell::new([false; 4]) };
}

/// Called from the default bodies of [`Plugin::on_connect`] and [`Plugin::on_close`]:
/// plain Rust state, so a plugin's native unit tests may call those defaults.
pub(crate) fn default_hook_ran() {
    DEFAULT_RAN.set(true);
}

/// Runs `hook` and, if it turned out to be a default body, tells the host (once) that
/// the plugin leaves it unused, so the host can stop calling it.
fn watching_default<R>(which: Unused, hook: impl FnOnce() -> R) -> R {
    DEFAULT_RAN.set(false);
    let result = hook();
    if DEFAULT_RAN.replace(false) {
        let index = which as usize;
        let mut reported = REPORTED.get();
        if !reported[index] {
            reported[index] = true;
            REPORTED.set(reported);
            match which {
                Unused::Connect => host::hook_unused(host::Hook::OnConnect),
                Unused::Close => host::hook_unused(host::Hook::OnClose),
                Unused::Request => host::http_hook_unused(host::HttpHook::OnRequest),
                Unused::Response => host::http_hook_unused(host::HttpHook::OnResponse),
            }
        }
    }
    result
}

/// The hooks with a default body, in the order of `REPORTED`.
#[derive(Clone, Copy)]
enum Unused {
    Connect = 0,
    Close = 1,
    Request = 2,
    Response = 3,
}

/// `init`: builds a fresh plugin value and lets it read its config. Only a value whose
/// `init` succeeded serves the other hooks.
pub fn init<P: Plugin>(config: String, make: impl FnOnce() -> P) -> Result<(), String> {
    install_panic_hook();
    PLUGIN.with_borrow_mut(|slot| *slot = None);
    let mut plugin = make();
    plugin.init(&Config::new(config))?;
    PLUGIN.with_borrow_mut(|slot| *slot = Some(Box::new(plugin)));
    Ok(())
}

/// `on-connect`.
pub fn on_connect(info: wit::ConnectInfo) -> wit::Verdict {
    connect(Connection::from(info))
}

fn connect(connection: Connection) -> wit::Verdict {
    PLUGIN.with_borrow(|plugin| match plugin {
        Some(plugin) => watching_default(Unused::Connect, || plugin.on_connect(&connection)).into(),
        // Serving a connection with an unconfigured plugin could let through what its
        // config forbids; a trap makes the host apply the `on_error` policy instead.
        None => panic!("on-connect called before a successful init"),
    })
}

/// `packed-hooks.on-connect`: the same hook, its text fields unpacked first.
pub fn on_connect_packed(text: String, spans: ConnectSpans) -> wit::Verdict {
    connect(crate::connection::unpack_connect(text, &spans))
}

/// `packed-hooks.on-close`.
pub fn on_close_packed(text: String, spans: CloseSpans) {
    close(crate::connection::unpack_close(text, &spans))
}

/// `on-close`.
pub fn on_close(info: wit::CloseInfo) {
    close(Closed::from(info))
}

fn close(closed: Closed) {
    PLUGIN.with_borrow(|plugin| match plugin {
        Some(plugin) => watching_default(Unused::Close, || plugin.on_close(&closed)),
        None => panic!("on-close called before a successful init"),
    })
}

/// `on-request`.
pub fn on_request(info: wit_http::RequestInfo) -> wit_http::RequestAction {
    request(Request::from(info))
}

/// `packed-http-hooks.on-request`: the same hook, its fields read in place.
pub fn on_request_packed(bytes: Vec<u8>, spans: RequestSpans) -> wit_http::RequestAction {
    request(crate::http::unpack_request(bytes, &spans))
}

fn request(request: Request) -> wit_http::RequestAction {
    PLUGIN.with_borrow(|plugin| match plugin {
        Some(plugin) => watching_default(Unused::Request, || plugin.on_request(&request)).into(),
        None => panic!("on-request called before a successful init"),
    })
}

/// `on-response`.
pub fn on_response(info: wit_http::ResponseInfo) -> Vec<wit_http::HeaderEdit> {
    response(Response::from(info))
}

/// `packed-http-hooks.on-response`.
pub fn on_response_packed(bytes: Vec<u8>, spans: ResponseSpans) -> Vec<wit_http::HeaderEdit> {
    response(crate::http::unpack_response(bytes, &spans))
}

fn response(response: Response) -> Vec<wit_http::HeaderEdit> {
    PLUGIN.with_borrow(|plugin| match plugin {
        Some(plugin) => watching_default(Unused::Response, || plugin.on_response(&response))
            .into_iter()
            .map(Into::into)
            .collect(),
        None => panic!("on-response called before a successful init"),
    })
}

/// Sends panic messages to the host log: the host grants no stderr, so the default hook's
/// output would be lost and the host would only see an anonymous trap.
fn install_panic_hook() {
    if !PANIC_HOOK.replace(true) {
        std::panic::set_hook(Box::new(|info| {
            log::log(Level::Error, format!("plugin panicked: {info}"))
        }));
    }
}
