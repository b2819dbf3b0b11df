//! Test plugin: the `plugin` world of a made-up `wasmbassador:plugin@0.1.9` whose `host`
//! interface has a function (`future-call`) that no wasmbassador implements. `init`
//! calls it, so a host that accepted this component would fail at the first call.

wit_bindgen::generate!({ path: "wit", world: "plugin" });

use exports::wasmbassador::plugin::hooks::Guest;
use wasmbassador::plugin::host;
use wasmbassador::plugin::types::{CloseInfo, ConnectInfo, Verdict};

struct Component;

impl Guest for Component {
    fn init(_config: String) -> Result<(), String> {
        host::future_call();
        Ok(())
    }

    fn on_connect(_info: ConnectInfo) -> Verdict {
        Verdict::Allow
    }

    fn on_close(_info: CloseInfo) {}
}

export!(Component);
