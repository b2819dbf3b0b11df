//! Test plugin: `on-request` forwards every request unchanged and `on-response` edits
//! nothing, yet both are written out, so that the host calls them on every request
//! (a hook left at its default is not called again). Three of these in a chain are
//! what any three-plugin HTTP chain costs at the least: the floor that `bench/http.sh`
//! shows next to the real plugins.
#![forbid(unsafe_code)]

use wasmbassador_sdk::prelude::*;

struct HttpPass;

impl Plugin for HttpPass {
    fn on_request(&self, _: &Request) -> Action {
        Action::forward()
    }

    fn on_response(&self, _: &Response) -> Vec<HeaderEdit> {
        Vec::new()
    }
}

export_plugin!(HttpPass);
