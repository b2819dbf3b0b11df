//! Test plugin: denies every connection with a reason that lists every field of the
//! `Connection` it was given, so that a test can check what reaches a plugin (the host
//! packs the fields into one string for SDK plugins; this shows they unpack whole).
#![forbid(unsafe_code)]

use wasmbassador_sdk::prelude::*;

struct Echo;

impl Plugin for Echo {
    fn on_connect(&self, c: &Connection) -> Verdict {
        let startup: Vec<String> = c
            .startup_parameters()
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        Verdict::deny(format!(
            "listener={} protocol={} client_ip={} upstream={} startup=[{}]",
            c.listener(),
            c.protocol(),
            c.client_ip().map_or_else(|| "?".to_owned(), |ip| ip.to_string()),
            c.upstream(),
            startup.join(" "),
        ))
    }
}

export_plugin!(Echo);
