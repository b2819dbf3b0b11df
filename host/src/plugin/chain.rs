//! The plugin chain of one connection, following the listener's `plugins` order:
//! `allow` goes on, the first `deny` ends it, a later `route` replaces an earlier one.
//! A failed call is answered by that plugin's `on_error` policy.

use std::cell::OnceCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::{ArcSwap, ArcSwapOption};

use super::{CloseInfo, ConnectInfo, Loaded, PluginMap, RouteTarget, Verdict};
use crate::config::OnError;
use crate::metrics::{SHARDS, thread_index};

/// Counts plugin swaps, so that a [`ChainCache`] can tell its list is out of date.
static SWAPS: AtomicU64 = AtomicU64::new(0);

/// Marks every cached chain out of date; called after a new version is stored.
pub(super) fn swapped() {
    SWAPS.fetch_add(1, Ordering::Release);
}

/// The current versions of one listener's plugins, kept between connections and
/// requests. Looking each plugin up by name and loading its current version cost
/// about as much as a hook call that does nothing; with the cache, a connection pays
/// one atomic load and one reference count. Each thread shard keeps a list of its own,
/// so that the reference count a connection takes and drops is not a cache line the
/// other connection threads write too. A list is made again after any swap (a global
/// counter moves) or when the plugin map is replaced by a reload. The price: a replaced
/// version stays alive (with its idle instances) until each shard's next connection on
/// the listener, not only until its last connection closes.
#[derive(Debug, Default)]
pub struct ChainCache([CacheSlot; SHARDS]);

/// One shard's list, on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(64))]
struct CacheSlot(ArcSwapOption<Cached>);

#[derive(Debug)]
struct Cached {
    /// `SWAPS` when the list was made; read before the versions were loaded, so a
    /// list can only be newer than its count says, never older.
    swaps: u64,
    /// The map the list was made from; held, so that its address is not reused.
    map: Arc<PluginMap>,
    plugins: Arc<[Arc<Loaded>]>,
}

impl ChainCache {
    /// The current versions of `names` (names are validated against the config, so a
    /// missing one can only appear mid-reload and is skipped); `None` for no names,
    /// without touching any shared count.
    pub fn current(&self, plugins: &ArcSwap<PluginMap>, names: &[String]) -> Option<Arc<[Arc<Loaded>]>> {
        if names.is_empty() {
            return None;
        }
        let slot = &self.0[thread_index() % SHARDS].0;
        let swaps = SWAPS.load(Ordering::Acquire);
        let map = plugins.load();
        if let Some(c) = &*slot.load()
            && c.swaps == swaps
            && Arc::ptr_eq(&c.map, &map)
        {
            return Some(c.plugins.clone());
        }
        let map = arc_swap::Guard::into_inner(map);
        let list: Arc<[Arc<Loaded>]> = names
            .iter()
            .filter_map(|n| map.get(n).map(|s| s.current.load_full()))
            .collect();
        slot.store(Some(Arc::new(Cached {
            swaps,
            map,
            plugins: list.clone(),
        })));
        Some(list)
    }
}

/// The plugin versions a connection started with.
#[derive(Debug, Default)]
pub struct Chain {
    plugins: Option<Arc<[Arc<Loaded>]>>,
    /// How many plugins' `on-connect` ran (they, and only they, get `on-close`).
    ran: usize,
}

/// What the chain decided.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Go ahead, to `route` if a plugin chose one, else the listener's upstream.
    Allow {
        /// The last route chosen, and the plugin that chose it.
        route: Option<(RouteTarget, String)>,
    },
    /// Refuse the connection.
    Deny {
        /// The plugin that refused.
        plugin: String,
        /// Its reason (or the failure, under `on_error = "deny"`).
        reason: String,
    },
}

impl Chain {
    /// The current versions of `names`, through the listener's `cache`.
    pub fn new(cache: &ChainCache, plugins: &ArcSwap<PluginMap>, names: &[String]) -> Self {
        Chain {
            plugins: cache.current(plugins, names),
            ran: 0,
        }
    }

    /// Whether there is nothing to run.
    pub fn is_empty(&self) -> bool {
        self.list().is_empty()
    }

    fn list(&self) -> &[Arc<Loaded>] {
        self.plugins.as_deref().unwrap_or_default()
    }

    /// Runs `on-connect` through the chain.
    pub fn on_connect(&mut self, info: &ConnectInfo) -> Decision {
        let mut route = None;
        let packed = OnceCell::new();
        let Some(plugins) = &self.plugins else {
            return Decision::Allow { route };
        };
        for p in plugins.iter() {
            self.ran += 1;
            let verdict = match p.on_connect(info, &packed) {
                Ok(v) => v,
                Err(e) => match p.on_error() {
                    OnError::Allow => Verdict::Allow,
                    OnError::Deny => {
                        return Decision::Deny {
                            plugin: p.name().to_string(),
                            reason: format!("plugin {} failed ({})", p.name(), e.kind()),
                        };
                    }
                },
            };
            match verdict {
                Verdict::Allow => {}
                Verdict::Deny(reason) => {
                    return Decision::Deny {
                        plugin: p.name().to_string(),
                        reason,
                    };
                }
                Verdict::Route(target) => route = Some((target, p.name().to_string())),
            }
        }
        Decision::Allow { route }
    }

    /// Runs `on-close` for every plugin whose `on-connect` ran.
    pub fn on_close(&self, info: &CloseInfo) {
        let packed = OnceCell::new();
        for p in &self.list()[..self.ran] {
            p.on_close(info, &packed);
        }
    }
}
