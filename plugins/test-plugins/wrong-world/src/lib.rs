//! Test plugin: a valid WebAssembly component that implements another world (it exports
//! a bare `run: func()`, see `wit/world.wit`) instead of `wasmbassador:plugin`. The host
//! must refuse it when loading, naming the missing `hooks` export.

wit_bindgen::generate!({ path: "wit", world: "command-like" });

struct Component;

impl Guest for Component {
    fn run() {}
}

export!(Component);
