//! The running ambassador: shared state, start, reload and drain.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::listener::{ListenerHandle, ListenerState, accept_loop};
use crate::metrics::{Metrics, ResultLabels};
use crate::postgres::CancelRegistry;
use crate::upstream::Upstream;
use crate::workers::WorkerThreads;

/// Why the ambassador could not start or a new configuration could not be applied.
/// In both cases nothing changed: what ran before keeps running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration itself is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The connection threads could not be started.
    #[error("cannot start the connection threads: {0}")]
    Threads(std::io::Error),
    /// A listener or the admin server could not bind its address.
    #[error("{what} cannot listen on {addr}: {source}")]
    Bind {
        /// `listener "name"` or `admin`.
        what: String,
        /// The address.
        addr: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// A plugin could not be loaded (the error names the file and the step).
    #[error(transparent)]
    Plugin(#[from] crate::plugin::LoadError),
    /// An upstream's TLS files cannot be used.
    #[error("upstream {upstream:?}: {source}")]
    Tls {
        /// The upstream name.
        upstream: String,
        /// What is wrong with its TLS settings.
        source: crate::tls::TlsError,
    },
}

/// State shared by listeners, connections and the admin server.
#[derive(Debug)]
pub struct Shared {
    /// Host metrics.
    pub metrics: Arc<Metrics>,
    /// Upstreams by name; swapped whole on reload.
    pub upstreams: ArcSwap<HashMap<String, Arc<Upstream>>>,
    /// PostgreSQL sessions by BackendKeyData.
    pub cancels: Arc<CancelRegistry>,
    /// The configuration in force.
    pub config: ArcSwap<Config>,
    /// Loaded plugins by name; each slot swaps its own version on hot swap.
    pub plugins: Arc<ArcSwap<crate::plugin::PluginMap>>,
    plugin_watcher: Mutex<Option<crate::plugin::watch::PluginWatcher>>,
    /// Every connection task, so that drain can wait for them.
    pub tracker: TaskTracker,
    /// The connection threads new connections go to; `None`: the caller's runtime.
    pub workers: Option<Arc<crate::workers::Workers>>,
    /// Cancelled when the drain timeout ends: remaining connections close.
    pub hard_stop: CancellationToken,
    started: AtomicBool,
    draining: AtomicBool,
    listeners: Mutex<HashMap<String, ListenerHandle>>,
    reload_lock: tokio::sync::Mutex<()>,
}

impl Shared {
    /// The upstream named `name`.
    pub fn upstream(&self, name: &str) -> Option<Arc<Upstream>> {
        self.upstreams.load().get(name).cloned()
    }

    /// `/startup`: configuration loaded and listeners bound.
    pub fn started(&self) -> bool {
        self.started.load(Ordering::Relaxed)
    }

    /// Whether SIGTERM (or a drain) has begun.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Name, bound address, protocol, upstream and open connections of each listener.
    pub fn listener_status(&self) -> Vec<serde_json::Value> {
        let Ok(ls) = self.listeners.lock() else {
            return Vec::new();
        };
        let mut out: Vec<_> = ls
            .values()
            .map(|h| {
                let st = h.state.load();
                let c = &st.config;
                let mut entry = serde_json::json!({
                    "name": c.name,
                    "listen": h.local_addr.to_string(),
                    "protocol": c.protocol.to_string(),
                    "upstream": c.upstream,
                    "max_connections": c.max_connections,
                    "open_connections": c.max_connections - st.limit.available_permits().min(c.max_connections),
                });
                if c.protocol == crate::config::Protocol::Http {
                    entry["request_timeout"] = humantime::format_duration(c.request_timeout())
                        .to_string()
                        .into();
                }
                entry
            })
            .collect();
        out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        out
    }
}

/// A running ambassador. Dropping it does not stop it; call [`Ambassador::shutdown`].
#[derive(Debug)]
pub struct Ambassador {
    shared: Arc<Shared>,
    admin_addr: SocketAddr,
    admin_stop: CancellationToken,
    /// The connection threads, when the ambassador runs its own.
    threads: Option<WorkerThreads>,
}

/// What a reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadSummary {
    /// Listeners started.
    pub added: Vec<String>,
    /// Listeners stopped (their open connections go on).
    pub removed: Vec<String>,
    /// Listeners whose settings changed.
    pub changed: Vec<String>,
}

impl Ambassador {
    /// Binds the admin server and every listener, starts health checks, and returns
    /// once the ambassador accepts connections (`/startup` then answers 200).
    pub async fn start(config: Config) -> Result<Self, Error> {
        Self::start_with_threads(config, None).await
    }

    /// As [`start`](Ambassador::start), but with `threads` connection threads of the
    /// ambassador's own (see [`crate::workers`]) serving the connections instead of the
    /// caller's runtime. The CLI starts one per CPU. They stop with the ambassador.
    pub async fn start_with_threads(config: Config, threads: Option<NonZeroUsize>) -> Result<Self, Error> {
        let threads = threads
            .map(WorkerThreads::start)
            .transpose()
            .map_err(Error::Threads)?;
        let metrics = Arc::new(Metrics::new());
        let shared = Arc::new(Shared {
            metrics,
            upstreams: ArcSwap::from_pointee(HashMap::new()),
            cancels: Arc::new(CancelRegistry::default()),
            config: ArcSwap::from_pointee(Config::default()),
            plugins: Arc::new(ArcSwap::from_pointee(Default::default())),
            plugin_watcher: Mutex::new(None),
            tracker: TaskTracker::new(),
            workers: threads.as_ref().map(|t| t.workers.clone()),
            hard_stop: CancellationToken::new(),
            started: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            listeners: Mutex::new(HashMap::new()),
            reload_lock: tokio::sync::Mutex::new(()),
        });
        let admin = TcpListener::bind(config.admin.listen)
            .await
            .map_err(|source| Error::Bind {
                what: "admin".into(),
                addr: config.admin.listen.to_string(),
                source,
            })?;
        let admin_addr = admin.local_addr().map_err(|source| Error::Bind {
            what: "admin".into(),
            addr: config.admin.listen.to_string(),
            source,
        })?;
        let admin_stop = CancellationToken::new();
        let ambassador = Ambassador {
            shared: shared.clone(),
            admin_addr,
            admin_stop: admin_stop.clone(),
            threads,
        };
        ambassador.apply(config).await?;
        tokio::spawn(crate::admin::serve(admin, shared.clone(), admin_stop));
        tracing::info!(address = %admin_addr, "admin listening");
        shared.started.store(true, Ordering::Relaxed);
        Ok(ambassador)
    }

    /// The admin server's bound address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The bound address of the listener `name`.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.shared.listeners.lock().ok()?.get(name).map(|h| h.local_addr)
    }

    /// The shared state (metrics, upstreams), for embedding programs.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Applies a new configuration without dropping open connections. All or
    /// nothing: if any listener cannot bind or any upstream's TLS files are unusable,
    /// nothing changes and the error says why. Counted in `config_reloads`.
    pub async fn reload(&self, config: Config) -> Result<ReloadSummary, Error> {
        let result = self.apply(config).await;
        let label = ResultLabels {
            result: if result.is_ok() { "success" } else { "failure" },
        };
        self.shared.metrics.config_reloads.get_or_create(&label).inc();
        result
    }

    async fn apply(&self, config: Config) -> Result<ReloadSummary, Error> {
        let shared = &self.shared;
        let _one_at_a_time = shared.reload_lock.lock().await;
        let old_config = shared.config.load_full();
        if old_config.admin.listen != config.admin.listen && shared.started() {
            tracing::warn!(
                from = %old_config.admin.listen,
                to = %config.admin.listen,
                "admin.listen changed; the admin server moves at the next restart"
            );
        }

        // Phase 1: build everything that can fail, touching nothing live.
        let old_upstreams = shared.upstreams.load_full();
        let mut upstreams = HashMap::new();
        let mut fresh = Vec::new();
        for uc in &config.upstreams {
            let old = old_upstreams.get(&uc.name);
            let up = match old {
                Some(o) if o.config == *uc => o.clone(),
                _ => {
                    let up = Upstream::new(uc.clone(), shared.metrics.clone(), old.map(|o| o.as_ref()))
                        .map_err(|source| Error::Tls {
                            upstream: uc.name.clone(),
                            source,
                        })?;
                    let up = Arc::new(up);
                    fresh.push(up.clone());
                    up
                }
            };
            upstreams.insert(uc.name.clone(), up);
        }
        let plugins = self.load_plugins(&config).await?;
        let mut bound = Vec::new();
        {
            let live = shared.listeners.lock().map(|l| {
                l.iter()
                    .map(|(k, h)| (k.clone(), h.state.load().config.listen.clone()))
                    .collect::<HashMap<_, _>>()
            });
            let live = live.unwrap_or_default();
            for lc in &config.listeners {
                if live.get(&lc.name) == Some(&lc.listen) {
                    continue;
                }
                let what = format!("listener {:?}", lc.name);
                let bind_err = |source| Error::Bind {
                    what: what.clone(),
                    addr: lc.listen.clone(),
                    source,
                };
                let addr = lc
                    .listen_addr()
                    .ok_or_else(|| bind_err(std::io::Error::other("not a socket address")))?;
                let sock = TcpListener::bind(addr).await.map_err(bind_err)?;
                bound.push((lc.name.clone(), sock));
            }
        }

        // Phase 2: commit. Nothing below can fail.
        shared.upstreams.store(Arc::new(upstreams));
        self.swap_plugins(plugins);
        for up in &fresh {
            crate::health::spawn(up);
        }
        let mut summary = ReloadSummary::default();
        let mut bound: HashMap<String, TcpListener> = bound.into_iter().collect();
        let Ok(mut live) = shared.listeners.lock() else {
            return Ok(summary);
        };
        let wanted: Vec<&str> = config.listeners.iter().map(|l| l.name.as_str()).collect();
        live.retain(|name, h| {
            let keep = wanted.contains(&name.as_str());
            if !keep {
                h.stop.cancel();
                tracing::info!(listener = %name, "listener stopped; its open connections go on");
                summary.removed.push(name.clone());
            }
            keep
        });
        for lc in &config.listeners {
            if let Some(sock) = bound.remove(&lc.name) {
                let previous = live.remove(&lc.name);
                if let Some(p) = &previous {
                    p.stop.cancel();
                }
                let prev_state = previous.as_ref().map(|p| p.state.load_full());
                let state = Arc::new(ArcSwap::from_pointee(ListenerState::new(
                    lc.clone(),
                    prev_state.as_deref(),
                )));
                let local_addr = sock
                    .local_addr()
                    .unwrap_or_else(|_| lc.listen_addr().unwrap_or(self.admin_addr));
                let stop = CancellationToken::new();
                tracing::info!(
                    listener = %lc.name,
                    address = %local_addr,
                    protocol = %lc.protocol,
                    upstream = %lc.upstream,
                    "listening: {} ({}) -> upstream {:?}",
                    local_addr,
                    lc.protocol,
                    lc.upstream
                );
                tokio::spawn(accept_loop(shared.clone(), sock, state.clone(), stop.clone()));
                live.insert(
                    lc.name.clone(),
                    ListenerHandle {
                        state,
                        local_addr,
                        stop,
                    },
                );
                if previous.is_some() {
                    summary.changed.push(lc.name.clone());
                } else {
                    summary.added.push(lc.name.clone());
                }
            } else if let Some(h) = live.get(&lc.name) {
                let cur = h.state.load_full();
                if cur.config != *lc {
                    h.state
                        .store(Arc::new(ListenerState::new(lc.clone(), Some(&cur))));
                    summary.changed.push(lc.name.clone());
                }
            }
        }
        drop(live);
        for uc in &config.upstreams {
            if let Some(tls) = &uc.tls
                && tls.insecure_skip_verify
            {
                tracing::warn!(upstream = %uc.name, "tls.insecure_skip_verify = true: upstream certificates are NOT verified");
            }
        }
        shared.config.store(Arc::new(config));
        Ok(summary)
    }

    /// Loads every plugin whose entry is new or changed (compiling off the async
    /// workers); unchanged entries keep their slot and the version serving.
    async fn load_plugins(&self, config: &Config) -> Result<crate::plugin::PluginMap, Error> {
        let old = self.shared.plugins.load_full();
        let mut map = crate::plugin::PluginMap::new();
        for pc in &config.plugins {
            let previous = old.get(&pc.name).cloned();
            if let Some(slot) = &previous
                && slot.current.load().config == *pc
            {
                map.insert(pc.name.clone(), slot.clone());
                continue;
            }
            let shared = self.plugin_shared();
            let pc2 = pc.clone();
            let slot = tokio::task::spawn_blocking(move || {
                crate::plugin::load_slot(&pc2, &shared, previous.as_deref())
            })
            .await
            .map_err(|e| crate::plugin::LoadError::Engine(format!("plugin loader stopped: {e}")))??;
            map.insert(pc.name.clone(), slot);
        }
        Ok(map)
    }

    fn plugin_shared(&self) -> crate::plugin::PluginShared {
        crate::plugin::PluginShared {
            metrics: self.shared.metrics.clone(),
            plugin_metrics: self.shared.metrics.plugin_metrics.clone(),
        }
    }

    fn swap_plugins(&self, plugins: crate::plugin::PluginMap) {
        let empty = plugins.is_empty();
        self.shared.plugins.store(Arc::new(plugins));
        let Ok(mut w) = self.shared.plugin_watcher.lock() else {
            return;
        };
        // The folder set may have changed: start a fresh watch (the old one stops when
        // dropped).
        *w = None;
        if !empty {
            match crate::plugin::watch::watch(self.shared.plugins.clone(), self.plugin_shared()) {
                Ok(watcher) => *w = Some(watcher),
                Err(e) => tracing::error!(error = %e, "cannot watch the plugin folders; hot swap is off"),
            }
        }
    }

    /// Marks the ambassador not ready (`/ready` answers 503) without stopping anything.
    pub fn begin_drain(&self) {
        self.shared.draining.store(true, Ordering::Relaxed);
    }

    /// Graceful stop: not ready at once, keep accepting for `admin.drain_delay`,
    /// then stop accepting and wait up to `admin.drain_timeout` for open connections;
    /// whatever is still open then is closed. Returns when done.
    pub async fn shutdown(mut self) {
        self.begin_drain();
        let admin = self.shared.config.load().admin.clone();
        tracing::info!(drain_delay = ?admin.drain_delay, drain_timeout = ?admin.drain_timeout, "draining");
        tokio::time::sleep(admin.drain_delay).await;
        if let Ok(mut live) = self.shared.listeners.lock() {
            for (_, h) in live.drain() {
                h.stop.cancel();
            }
        }
        let tracker = &self.shared.tracker;
        tracker.close();
        let open = tracker.len();
        if open > 0 {
            tracing::info!(open, "waiting for open connections");
        }
        if tokio::time::timeout(admin.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = tracker.len(),
                "drain timeout reached; closing the remaining connections"
            );
            self.shared.hard_stop.cancel();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), tracker.wait()).await;
        }
        self.admin_stop.cancel();
        if let Ok(mut w) = self.shared.plugin_watcher.lock() {
            *w = None;
        }
        // Every connection has ended (or was told to): the threads can go.
        drop(self.threads.take());
        tracing::info!("stopped");
    }
}

/// Starts the ambassador with `config`, runs until `shutdown` resolves, then drains
/// (see [`Ambassador::shutdown`]). For embedding in another tokio program.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let ambassador = Ambassador::start(config).await?;
    shutdown.await;
    ambassador.shutdown().await;
    Ok(())
}
