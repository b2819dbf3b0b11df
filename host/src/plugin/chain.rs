//! The plugin chain of one connection, following the listener's `plugins` order:
//! `allow` goes on, the first `deny` ends it, a later `route` replaces an earlier one.
//! A failed call is answered by that plugin's `on_error` policy.

use std::cell::OnceCell;
use std::sync::Arc;

use super::{CloseInfo, ConnectInfo, Loaded, PluginMap, RouteTarget, Verdict};
use crate::config::OnError;

/// The plugin versions a connection started with.
#[derive(Debug, Default)]
pub struct Chain {
    plugins: Vec<Arc<Loaded>>,
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
    /// The current versions of `names` (names are validated against the config, so a
    /// missing one can only appear mid-reload and is skipped).
    pub fn new(plugins: &PluginMap, names: &[String]) -> Self {
        Chain {
            plugins: names
                .iter()
                .filter_map(|n| plugins.get(n).map(|s| s.current.load_full()))
                .collect(),
            ran: 0,
        }
    }

    /// Whether there is nothing to run.
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }

    /// Runs `on-connect` through the chain.
    pub fn on_connect(&mut self, info: &ConnectInfo) -> Decision {
        let mut route = None;
        let packed = OnceCell::new();
        for p in &self.plugins {
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
        for p in &self.plugins[..self.ran] {
            p.on_close(info, &packed);
        }
    }
}
