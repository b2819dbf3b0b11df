//! Host-side bindings generated from the WIT world in `sdk/wit/` — the one
//! extension point shared with the SDK.
#![allow(missing_docs)]

wasmtime::component::bindgen!({
    path: "../sdk/wit",
    world: "plugin",
});

pub use self::wasmbassador::plugin::types::{
    CloseInfo, ConnectInfo, Level, Outcome, PostgresStartup, Protocol, RouteTarget, Verdict,
};
