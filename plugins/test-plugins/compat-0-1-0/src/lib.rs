//! Test plugin: the `plugin` world of `wasmbassador:plugin@0.1.0`, from a frozen copy of
//! that version's WIT, so that the host's tests can check that plugins built against an
//! older 0.1.x interface still load and run, host calls included. It denies every
//! connection with a reason that names the version once a host call has answered, and
//! logs each `on-close`.

wit_bindgen::generate!({ path: "wit", world: "plugin" });

use exports::wasmbassador::plugin::hooks::Guest;
use wasmbassador::plugin::host;
use wasmbassador::plugin::types::{CloseInfo, ConnectInfo, Level, Verdict};

struct Component;

impl Guest for Component {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn on_connect(_info: ConnectInfo) -> Verdict {
        // A host call that the host failed to link would trap here, and the host would
        // answer with the `on_error` policy instead of this reason.
        let clock = if host::now_ns() > 0 { "ticking" } else { "zero" };
        Verdict::Deny(format!("built against 0.1.0; host clock {clock}"))
    }

    fn on_close(info: CloseInfo) {
        host::log(Level::Info, &format!("0.1.0 on-close for {}", info.listener));
    }
}

export!(Component);
