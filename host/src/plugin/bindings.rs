//! Host-side bindings generated from the WIT package in `sdk/wit/` — the one
//! extension point shared with the SDK. The `packed-plugin` world includes
//! `http-plugin`, which includes `plugin`, so these bindings cover all three; the
//! exports are looked up per interface, since a `plugin` component has no `http-hooks`,
//! only SDK 0.1.3 components and later have `packed-hooks`, and only 0.1.4 and later
//! `packed-http-hooks`.
#![allow(missing_docs)]

wasmtime::component::bindgen!({
    path: "../sdk/wit",
    world: "packed-plugin",
});

pub use self::exports::wasmbassador::plugin::{hooks, http_hooks, packed_hooks, packed_http_hooks};
pub use self::wasmbassador::plugin::http_types::{
    Forward, Header, HeaderEdit, LocalResponse, RequestAction, RequestInfo, ResponseInfo, ResponseSource,
};
pub use self::wasmbassador::plugin::types::{
    CloseInfo, ConnectInfo, Level, Outcome, PostgresStartup, Protocol, RouteTarget, Verdict,
};
