//! The glue behind [`export_plugin!`](crate::export_plugin): one plugin value per
//! component instance, built in `init` and used by the other hooks.

use std::cell::{Cell, RefCell};

use crate::__private::bindings::wasmbassador::plugin::types as wit;
use crate::log::{self, Level};
use crate::{Closed, Config, Connection, Plugin};

thread_local! {
    // A component instance is single-threaded: this is a plain global, without `Sync`
    // demands on the plugin type.
    static PLUGIN: RefCell<Option<Box<dyn Plugin>>> = const { RefCell::new(None) };
    static PANIC_HOOK: Cell<bool> = const { Cell::new(false) };
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
    let connection = Connection::from(info);
    PLUGIN.with_borrow(|plugin| match plugin {
        Some(plugin) => plugin.on_connect(&connection).into(),
        // Serving a connection with an unconfigured plugin could let through what its
        // config forbids; a trap makes the host apply the `on_error` policy instead.
        None => panic!("on-connect called before a successful init"),
    })
}

/// `on-close`.
pub fn on_close(info: wit::CloseInfo) {
    let closed = Closed::from(info);
    PLUGIN.with_borrow(|plugin| match plugin {
        Some(plugin) => plugin.on_close(&closed),
        None => panic!("on-close called before a successful init"),
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
