//! Loading one plugin file: read, digest, compile, check the world, instantiate and
//! run `init`. Every step that fails says which file and which step.
//!
//! Compilation is CPU work of tens of milliseconds, so callers on the async runtime
//! run this through `spawn_blocking`. Precompiled code is never read from the plugin
//! folder: only the `.wasm` component is accepted there.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, InstancePre, Linker, Val};

use super::bindings::{PackedPlugin, hooks, http_hooks, packed_hooks, packed_http_hooks};
use super::host::{HostState, PluginContext, PluginMetrics};
use crate::config::PluginConfig;

/// Why a plugin file was refused; the variant is the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("plugin {name:?}: cannot read {path}: {reason}")]
    Read {
        /// Plugin name.
        name: String,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// The file's SHA-256 is not the pinned one.
    #[error("plugin {name:?}: {path} has sha256 {actual}, but the config pins {expected}")]
    Digest {
        /// Plugin name.
        name: String,
        /// The file.
        path: PathBuf,
        /// `plugin.sha256`.
        expected: String,
        /// What the file has.
        actual: String,
    },
    /// Not a WebAssembly component wasmtime can compile.
    #[error("plugin {name:?}: {path} is not a usable WebAssembly component: {reason}")]
    Compile {
        /// Plugin name.
        name: String,
        /// The file.
        path: PathBuf,
        /// wasmtime's reason.
        reason: String,
    },
    /// A component, but not of the `wasmbassador:plugin/plugin` world.
    #[error("plugin {name:?}: {path} does not implement the wasmbassador:plugin world (0.1): {reason}")]
    World {
        /// Plugin name.
        name: String,
        /// The file.
        path: PathBuf,
        /// What is missing or mistyped.
        reason: String,
    },
    /// `init` returned an error, trapped or timed out.
    #[error("plugin {name:?}: {path}: init failed: {reason}")]
    Init {
        /// Plugin name.
        name: String,
        /// The file.
        path: PathBuf,
        /// The plugin's error text or the trap.
        reason: String,
    },
    /// The engine could not be created.
    #[error("plugin runtime unavailable: {0}")]
    Engine(String),
}

impl LoadError {
    /// The failed step, for metrics and `/plugins`.
    pub fn step(&self) -> &'static str {
        match self {
            LoadError::Read { .. } => "read",
            LoadError::Digest { .. } => "digest",
            LoadError::Compile { .. } => "compile",
            LoadError::World { .. } => "world",
            LoadError::Init { .. } => "init",
            LoadError::Engine(_) => "engine",
        }
    }
}

/// A compiled, checked plugin file, ready to instantiate.
pub struct Compiled {
    /// Hex SHA-256 of the file.
    pub sha256: String,
    /// Pre-linked instance template.
    pub pre: InstancePre<HostState>,
    /// Where the `hooks` exports are.
    pub hooks: hooks::GuestIndices,
    /// Where the `http-hooks` exports are, if the component has them (an
    /// `http-plugin`, which every plugin built with SDK 0.1.2 or later is).
    pub http_hooks: Option<http_hooks::GuestIndices>,
    /// Where the `packed-hooks` exports are, if the component has them (every plugin
    /// built with SDK 0.1.3 or later).
    pub packed_hooks: Option<packed_hooks::GuestIndices>,
    /// Where the `packed-http-hooks` exports are, if the component has them (every
    /// plugin built with SDK 0.1.4 or later).
    pub packed_http_hooks: Option<packed_http_hooks::GuestIndices>,
    /// Shared per-version context.
    pub ctx: Arc<PluginContext>,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled").field("sha256", &self.sha256).finish()
    }
}

/// Hex SHA-256 of a file's bytes.
pub fn digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a plugin file (the caller can compare its digest before compiling).
pub fn read(config: &PluginConfig) -> Result<Vec<u8>, LoadError> {
    std::fs::read(&config.path).map_err(|e| LoadError::Read {
        name: config.name.clone(),
        path: config.path.clone(),
        reason: e.to_string(),
    })
}

/// Compiles `bytes` and checks them against the world and the pin.
pub fn compile(
    config: &PluginConfig,
    bytes: &[u8],
    generation: u64,
    metrics: Arc<PluginMetrics>,
) -> Result<Compiled, LoadError> {
    let name = config.name.clone();
    let path = config.path.clone();
    let sha256 = digest(bytes);
    if let Some(expected) = &config.sha256
        && !expected.eq_ignore_ascii_case(&sha256)
    {
        return Err(LoadError::Digest {
            name,
            path,
            expected: expected.clone(),
            actual: sha256,
        });
    }
    let engine = super::engine::engine().map_err(LoadError::Engine)?;
    let component = Component::new(engine, bytes).map_err(|e| LoadError::Compile {
        name: name.clone(),
        path: path.clone(),
        reason: first_line(&e),
    })?;
    let linker = linker(engine, &component).map_err(|e| LoadError::World {
        name: name.clone(),
        path: path.clone(),
        reason: format!("{e:#}"),
    })?;
    let world_err = |e: wasmtime::Error| LoadError::World {
        name: name.clone(),
        path: path.clone(),
        reason: format!("{e:#}"),
    };
    let pre = linker.instantiate_pre(&component).map_err(world_err)?;
    let hooks = hooks::GuestIndices::new(&pre).map_err(world_err)?;
    // Absent in a `plugin` component; present but mistyped is refused like a wrong world.
    let http_hooks = if exports(engine, &component, "http-hooks") {
        Some(http_hooks::GuestIndices::new(&pre).map_err(world_err)?)
    } else {
        None
    };
    let packed_hooks = if exports(engine, &component, "packed-hooks") {
        Some(packed_hooks::GuestIndices::new(&pre).map_err(world_err)?)
    } else {
        None
    };
    let packed_http_hooks = if exports(engine, &component, "packed-http-hooks") {
        Some(packed_http_hooks::GuestIndices::new(&pre).map_err(world_err)?)
    } else {
        None
    };
    let ctx = Arc::new(PluginContext::new(
        &config.name,
        generation,
        config.grants.files.clone(),
        config.memory,
        config.log_lines_per_second,
        metrics,
    ));
    Ok(Compiled {
        sha256,
        pre,
        hooks,
        http_hooks,
        packed_hooks,
        packed_http_hooks,
        ctx,
    })
}

/// Whether the component exports our interface `name` (any 0.1 version).
fn exports(engine: &wasmtime::Engine, component: &Component, name: &str) -> bool {
    let prefix = format!("wasmbassador:plugin/{name}@");
    component
        .component_type()
        .exports(engine)
        .any(|(export, _)| export.starts_with(&prefix))
}

fn first_line(e: &wasmtime::Error) -> String {
    let s = format!("{e:#}");
    s.lines().next().unwrap_or("").chars().take(300).collect()
}

/// The linker for one component: the `host` interface, and for the WASI imports that
/// Rust's standard library adds to every wasip2 component, nothing granted — an
/// empty environment, no arguments, no preopened directories — and a trap for every
/// other WASI function (stdio, files, clocks, sockets, random).
fn linker(engine: &wasmtime::Engine, component: &Component) -> wasmtime::Result<Linker<HostState>> {
    newer_interface(engine, component)?;
    let mut linker = Linker::new(engine);
    PackedPlugin::add_to_linker::<HostState, wasmtime::component::HasSelf<HostState>>(&mut linker, |s| s)?;
    stub_other_imports(&mut linker, engine, component)?;
    // The few WASI functions answered with "nothing", replacing their trap stubs.
    linker.allow_shadowing(true);
    let ty = component.component_type();
    for (import, _) in ty.imports(engine) {
        let empty_list = |_: wasmtime::StoreContextMut<'_, HostState>,
                          _: wasmtime::component::types::ComponentFunc,
                          _: &[Val],
                          out: &mut [Val]| answer(out, Val::List(Vec::new()));
        if import.starts_with("wasi:cli/environment@") {
            let mut i = linker.instance(import)?;
            i.func_new("get-environment", empty_list)?;
            i.func_new("get-arguments", empty_list)?;
            i.func_new("initial-cwd", |_, _, _, out| answer(out, Val::Option(None)))?;
        } else if import.starts_with("wasi:filesystem/preopens@") {
            // An empty list needs no descriptor, so none is ever created.
            linker.instance(import)?.func_new("get-directories", empty_list)?;
        }
    }
    linker.allow_shadowing(false);
    Ok(linker)
}

/// Puts `value` in the one result of a WASI function answered by the host. A component
/// that declares such an import with no result gets an error at the call, not a host
/// panic.
fn answer(out: &mut [Val], value: Val) -> wasmtime::Result<()> {
    match out.first_mut() {
        Some(slot) => {
            *slot = value;
            Ok(())
        }
        None => wasmtime::bail!("a WASI import declared with no result"),
    }
}

/// Defines every function of every imported instance outside our own package as a
/// function that traps, and every imported resource type as an opaque host type.
///
/// By hand rather than `Linker::define_unknown_imports_as_traps`: that one also stubs
/// an import of our own package at an older patch version (`host@0.1.2` in a plugin
/// built with SDK 0.1.2) under its exact name, and an exact name wins over the
/// semver-compatible definition (`host@0.1.3`), so every host call of such a plugin
/// would trap. Our package's imports are left to the version matching.
fn stub_other_imports(
    linker: &mut Linker<HostState>,
    engine: &wasmtime::Engine,
    component: &Component,
) -> wasmtime::Result<()> {
    use wasmtime::component::ResourceType;
    use wasmtime::component::types::ComponentItem;
    for (import, item) in component.component_type().imports(engine) {
        if import.starts_with("wasmbassador:plugin/") {
            continue;
        }
        let ComponentItem::ComponentInstance(instance) = item.ty else {
            // A bare function or other item: not defined, so instantiation refuses
            // the component (a wrong world).
            continue;
        };
        let mut stubs = linker.instance(import)?;
        for (name, export) in instance.exports(engine) {
            match export.ty {
                ComponentItem::ComponentFunc(_) => {
                    let what = format!("{import}#{name}");
                    stubs.func_new(name, move |_, _, _, _| {
                        wasmtime::bail!("{what} is not granted to plugins")
                    })?;
                }
                ComponentItem::Resource(_) => {
                    stubs.resource(name, ResourceType::host::<()>(), |_, _| Ok(()))?;
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// The version of the `wasmbassador:plugin` package this host implements (the WIT file
/// in `sdk/wit/`).
pub const WIT_VERSION: (u64, u64, u64) = (0, 1, 4);

/// Refuses a component built against a newer version of our package than this host
/// implements. wasmtime links such an import to the older interface of the same track,
/// and the stubs for unknown imports would then answer every host call with a trap, so
/// the plugin would fail at its first call with nothing to say why.
fn newer_interface(engine: &wasmtime::Engine, component: &Component) -> wasmtime::Result<()> {
    for (import, _) in component.component_type().imports(engine) {
        let Some(rest) = import.strip_prefix("wasmbassador:plugin/") else {
            continue;
        };
        let Some((_, version)) = rest.split_once('@') else {
            continue;
        };
        let mut parts = version
            .split(['.', '-', '+'])
            .map(|p| p.parse::<u64>().unwrap_or(u64::MAX));
        let theirs = (
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
        );
        if theirs > WIT_VERSION {
            let (a, b, c) = WIT_VERSION;
            wasmtime::bail!(
                "it was built against wasmbassador:plugin@{version}, newer than the {a}.{b}.{c} this \
                 wasmbassador implements (it imports {import}): rebuild it with a wasmbassador-sdk of \
                 {a}.{b}.{c} or upgrade wasmbassador"
            );
        }
    }
    Ok(())
}

/// Whether `path` names the file configured for a plugin (after resolving symlinks,
/// as a ConfigMap mount has them).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wit_version_is_the_package_version_of_the_wit_file() {
        let wit = include_str!("../../../sdk/wit/plugin.wit");
        let line = wit
            .lines()
            .find_map(|l| l.strip_prefix("package wasmbassador:plugin@"))
            .expect("a package line");
        let (a, b, c) = WIT_VERSION;
        assert_eq!(line, format!("{a}.{b}.{c};"), "bump WIT_VERSION with the package");
    }
}
