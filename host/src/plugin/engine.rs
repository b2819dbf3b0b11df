//! The one wasmtime engine of the process: component model, pooling allocator,
//! epoch interruption with a 1 ms ticker. Shared by every plugin and every
//! `Ambassador` in the process, so the ticker thread exists once.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// One epoch tick; per-call deadlines are counted in ticks.
pub const TICK: Duration = Duration::from_millis(1);

/// The largest `plugin.memory` the pool can host.
pub const MAX_PLUGIN_MEMORY: u64 = 1 << 30;

/// Live plugin instances the pool can hold at once, across all plugins and versions.
/// (Each reserves address space, not memory; see `linear_memory_keep_resident`.)
pub const MAX_INSTANCES: u32 = 1024;

static ENGINE: OnceLock<Result<Engine, String>> = OnceLock::new();

/// Milliseconds since the engine started, as of the last tick.
static COARSE_MS: AtomicU64 = AtomicU64::new(0);

/// Milliseconds since the engine started, to a tick or so: a clock that costs one
/// load, for the per-second windows of hot paths (a plugin's log rate limit). 0 before
/// the engine exists.
pub fn coarse_ms() -> u64 {
    COARSE_MS.load(Ordering::Relaxed)
}

/// The process-wide engine, created (with its ticker) on first use.
pub fn engine() -> Result<&'static Engine, String> {
    ENGINE
        .get_or_init(|| {
            let engine = build().map_err(|e| format!("cannot create the wasmtime engine: {e:#}"))?;
            let ticker = engine.clone();
            let started = Instant::now();
            std::thread::Builder::new()
                .name("wasm-epoch".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(TICK);
                        ticker.increment_epoch();
                        COARSE_MS.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                    }
                })
                .map_err(|e| format!("cannot start the epoch ticker: {e}"))?;
            Ok(engine)
        })
        .as_ref()
        .map_err(Clone::clone)
}

fn build() -> wasmtime::Result<Engine> {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(MAX_INSTANCES)
        .total_core_instances(MAX_INSTANCES * 4)
        .total_memories(MAX_INSTANCES * 2)
        .total_tables(MAX_INSTANCES * 2)
        .max_memory_size(MAX_PLUGIN_MEMORY as usize)
        // A reused slot keeps its first pages mapped: instantiation stays in the
        // microseconds instead of faulting in a fresh stack every time.
        .linear_memory_keep_resident(256 << 10)
        .table_keep_resident(16 << 10);
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    // `perf` can then name the plugins' compiled functions (from /tmp/perf-PID.map).
    if std::env::var_os("WASMBASSADOR_PERF_MAP").is_some() {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    Engine::new(&config)
}
