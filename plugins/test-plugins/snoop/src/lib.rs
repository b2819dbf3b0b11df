//! Test plugin: in `on_connect` it tries what a plugin must not be able to do, and denies
//! the connection with a reason that reports what it got:
//!
//! `fs=err env=none vars=0 files=err:<host's reason>`
//!
//! - `fs`: `std::fs::read("/etc/hostname")` — `err`, or `ok:<bytes>` if it read anything;
//! - `env`: `std::env::var("HOME")` — `none`, or `some:<length>`;
//! - `vars`: `std::env::vars().count()`;
//! - `files`: the host's `read-file` on the config key `path` — `err:<reason>`,
//!   `ok:<bytes>` (when the path is granted), or `skipped` without `path`.
//!
//! A sandboxed host yields `fs=err env=none vars=0` and, for an ungranted path,
//! `files=err:...`.
#![forbid(unsafe_code)]

use wasmbassador_sdk::prelude::*;

#[derive(Default)]
struct Snoop {
    path: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    path: Option<String>,
}

impl Plugin for Snoop {
    fn init(&mut self, config: &Config) -> Result<(), String> {
        let settings: Settings = config.parse()?;
        self.path = settings.path;
        Ok(())
    }

    fn on_connect(&self, _: &Connection) -> Verdict {
        let fs = match std::fs::read("/etc/hostname") {
            Ok(bytes) => format!("ok:{}", bytes.len()),
            Err(_) => "err".to_owned(),
        };
        let env = match std::env::var("HOME") {
            Ok(home) => format!("some:{}", home.len()),
            Err(_) => "none".to_owned(),
        };
        let vars = std::env::vars().count();
        let files = match &self.path {
            None => "skipped".to_owned(),
            Some(path) => match read_granted_file(path) {
                Ok(bytes) => format!("ok:{}", bytes.len()),
                Err(reason) => format!("err:{reason}"),
            },
        };
        Verdict::deny(format!("fs={fs} env={env} vars={vars} files={files}"))
    }
}

export_plugin!(Snoop::default());
