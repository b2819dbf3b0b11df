//! Test plugin: allocates memory without bound in `on_connect`, so only the host's memory
//! cap ends the call — as a failed `memory.grow` that Rust turns into an abort (a trap),
//! or as the host's own trap on growth past the cap. The pages are not written: growing
//! is what the cap limits, and it reaches a 16 MiB cap in well under a millisecond, so the
//! call fails on memory long before any deadline.
#![forbid(unsafe_code)]

use std::hint::black_box;

use wasmbassador_sdk::prelude::*;

struct Hog;

impl Plugin for Hog {
    fn on_connect(&self, _: &Connection) -> Verdict {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            // 1 MiB at a time; `black_box` keeps the allocation from being optimised away.
            hoard.push(black_box(Vec::with_capacity(1 << 20)));
            black_box(&hoard);
        }
    }
}

export_plugin!(Hog);
