//! Test plugin: the `http-plugin` world of `wasmbassador:plugin@0.1.3`, from a frozen
//! copy of that version's WIT, so that the host's tests can check that plugins built
//! before the packed HTTP hooks (0.1.4) still get every field of a request and a
//! response. It stamps requests and responses like `http-stamp` (see the README).

wit_bindgen::generate!({ path: "wit", world: "http-plugin" });

use exports::wasmbassador::plugin::hooks::Guest;
use exports::wasmbassador::plugin::http_hooks::Guest as HttpGuest;
use wasmbassador::plugin::http_types::{
    Forward, Header, HeaderEdit, RequestAction, RequestInfo, ResponseInfo,
};
use wasmbassador::plugin::types::{CloseInfo, ConnectInfo, Verdict};

struct Component;

fn append(name: &str, value: String) -> HeaderEdit {
    HeaderEdit::Append(Header {
        name: name.to_string(),
        value: value.into_bytes(),
    })
}

impl Guest for Component {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn on_connect(_info: ConnectInfo) -> Verdict {
        Verdict::Allow
    }

    fn on_close(_info: CloseInfo) {}
}

impl HttpGuest for Component {
    fn on_request(request: RequestInfo) -> RequestAction {
        let seen = request.headers.iter().filter(|h| h.name == "x-chain").count();
        let saw = format!(
            "{} {} {} {}",
            request.method,
            request.path,
            request.authority.as_deref().unwrap_or("-"),
            request.upstream
        );
        RequestAction::Forward(Forward {
            headers: vec![
                append("x-chain", "compat".into()),
                append("x-chain-seen-by-compat", seen.to_string()),
                append("x-compat-saw", saw),
            ],
            route: None,
            retryable: false,
        })
    }

    fn on_response(_response: ResponseInfo) -> Vec<HeaderEdit> {
        vec![append("x-chain-response", "compat".into())]
    }
}

export!(Component);
