//! Real `.wasm` plugins for the tests, built from `plugins/` (the ready-made ones and
//! the test plugins) once per test binary, with the same command a user runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::run_ok;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_path_buf()
}

/// The folder holding every built plugin (`allow_list.wasm`, `deny_all.wasm`, ...).
pub fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Under CI the host builds into $CARGO_TARGET_DIR; keep the plugins beside it
        // so that reruns are incremental there too.
        let target = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(t) => PathBuf::from(t).join("wasm-plugins"),
            None => repo().join("plugins/target"),
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        run_ok(
            Command::new(cargo)
                .arg("build")
                .arg("--manifest-path")
                .arg(repo().join("plugins/Cargo.toml"))
                .args(["--target", "wasm32-wasip2", "--release", "--locked", "--quiet"])
                .arg("--target-dir")
                .arg(&target)
                // The stack-size flag lives in the repository's .cargo/config.toml.
                .current_dir(repo()),
            "building the plugins (needs `rustup target add wasm32-wasip2`)",
        );
        target.join("wasm32-wasip2/release")
    })
}

/// One built plugin by crate name, with dashes or underscores (`allow-list`).
pub fn wasm(name: &str) -> PathBuf {
    let file = dir().join(format!("{}.wasm", name.replace('-', "_")));
    assert!(file.is_file(), "{} was not built", file.display());
    file
}
