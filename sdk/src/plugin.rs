//! The [`Plugin`] trait: the hooks a plugin implements.

use crate::http::{Action, HeaderEdit, Request, Response};
use crate::{Closed, Config, Connection, Verdict};

/// A wasmbassador plugin. Every method has a default that does nothing in the way, so a
/// plugin implements only the hooks it needs; [`export_plugin!`](crate::export_plugin)
/// makes the type the component's exports.
///
/// The hooks run in this order for one instance: [`init`](Plugin::init) once, then for
/// each connection [`on_connect`](Plugin::on_connect) and, after it closed,
/// [`on_close`](Plugin::on_close); on `http` listeners, between those two, for each
/// request [`on_request`](Plugin::on_request) and then [`on_response`](Plugin::on_response). See the [crate documentation](crate) for the table of
/// hooks and what the host does on errors and timeouts.
///
/// `on_connect` and `on_close` take `&self`: state that changes while serving
/// connections lives in a [`Cell`](std::cell::Cell) or [`RefCell`](std::cell::RefCell)
/// (a component instance is single-threaded, so nothing needs to be `Sync`).
pub trait Plugin: 'static {
    /// Runs once per instance, before any other hook, with the plugin's `config` table
    /// from the host config. Check it here (usually with [`Config::parse`]) and keep what
    /// the other hooks need; declare [metrics](crate::metrics) here too.
    ///
    /// Return `Err` with a reason that names the bad entry to refuse the plugin: at
    /// startup the host exits with that reason, during a hot swap it keeps the previous
    /// version and reports the reason in its log and at `/plugins`. A panic or a timeout
    /// counts the same as `Err`.
    ///
    /// Default: accepts any config and does nothing.
    fn init(&mut self, config: &Config) -> Result<(), String> {
        let _ = config;
        Ok(())
    }

    /// Runs for each new client connection on a listener that lists this plugin, in the
    /// listener's `plugins` order, after the protocol preamble (the PostgreSQL startup
    /// message) was read and before any upstream is contacted. Return
    ///
    /// - [`Verdict::Allow`] for no objection (the chain goes on),
    /// - [`Verdict::deny`] to refuse the connection (the chain stops; a PostgreSQL client
    ///   sees the reason, so keep secrets out of it),
    /// - [`Verdict::route_upstream`] or [`Verdict::route_tag`] to choose where it goes (the
    ///   chain goes on; a later route replaces this one).
    ///
    /// If it panics, runs past the plugin's `timeout` or exceeds its `memory`, the
    /// plugin's `on_error` policy answers instead (`deny` by default).
    ///
    /// Default: [`Verdict::Allow`]; the host then stops calling this hook for the
    /// plugin, since it costs a call and decides nothing.
    fn on_connect(&self, connection: &Connection) -> Verdict {
        let _ = connection;
        // Lets the host skip this hook from now on (see `host.hook-unused`).
        crate::runtime::default_hook_ran();
        Verdict::Allow
    }

    /// Runs once for each connection on which this instance's `on_connect` ran, whatever
    /// the verdict, after both sides closed: byte counts, duration, the endpoint used and
    /// the [`Outcome`](crate::Outcome). It runs off the byte path, so it may log and count
    /// freely. A panic or timeout here is counted and logged by the host; nothing else
    /// happens.
    ///
    /// Default: does nothing, and the host then stops calling this hook for the plugin.
    fn on_close(&self, closed: &Closed) {
        let _ = closed;
        crate::runtime::default_hook_ran();
    }

    /// Runs for each request on an `http` listener that lists this plugin, in the
    /// listener's `plugins` order, once the request head arrived and before any upstream
    /// is contacted (not for WebSocket upgrades, which pass through). Return
    ///
    /// - [`Action::forward`] to send it on, with header edits
    ///   ([`set_header`](Action::set_header), [`remove_header`](Action::remove_header)), a
    ///   [`route`](Action::route) or a [`retryable`](Action::retryable) mark; the chain
    ///   goes on, and the next plugin sees the edited headers;
    /// - [`Action::respond`] to answer the application at once (a local 401, say); the
    ///   chain stops and the upstream is not contacted.
    ///
    /// If it panics, runs past the plugin's `timeout` or exceeds its `memory`, the
    /// plugin's `on_error` policy answers instead: `deny` (the default) gives the
    /// application a 503, `allow` forwards the request unchanged.
    ///
    /// Default: [`Action::forward`] unchanged; the host then stops calling this hook for
    /// the plugin.
    fn on_request(&self, request: &Request) -> Action {
        let _ = request;
        crate::runtime::default_hook_ran();
        Action::forward()
    }

    /// Runs for each response to a request that reached this plugin in the chain (also
    /// when its [`on_request`](Plugin::on_request) is left at the default), in reverse
    /// chain order, before the response head goes to the
    /// application: the upstream's answer, a plugin's local one, or the host's 502/503/504
    /// ([`Response::source`] tells which). Return header edits for the response (none:
    /// an empty `Vec`); observe status and timings. The body streams afterwards and is not
    /// seen. A panic or timeout is counted and logged, and the response goes on unchanged.
    ///
    /// Default: no edits, and the host then stops calling this hook for the plugin.
    fn on_response(&self, response: &Response) -> Vec<HeaderEdit> {
        let _ = response;
        crate::runtime::default_hook_ran();
        Vec::new()
    }
}
