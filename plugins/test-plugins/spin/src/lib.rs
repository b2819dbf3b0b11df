//! Test plugin: loops forever in `on_connect`, so only the host's deadline (epoch
//! interruption) ends the call.
#![forbid(unsafe_code)]

use std::hint::black_box;

use wasmbassador_sdk::prelude::*;

struct Spin;

impl Plugin for Spin {
    fn on_connect(&self, _: &Connection) -> Verdict {
        let mut n: u64 = 0;
        // `black_box` keeps the optimiser from proving anything about the loop.
        loop {
            n = black_box(n.wrapping_add(1));
        }
    }
}

export_plugin!(Spin);
