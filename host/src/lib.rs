//! wasmbassador: an embeddable ambassador sidecar. An application talks plain text to
//! a local port; wasmbassador carries the traffic to a remote service with TLS,
//! connect retries, health checks and failover.
//!
//! # Layout
//! Modules follow the data path of one connection:
//! - [`config`]: the TOML configuration and its validation.
//! - [`listener`]: accept on a local port, enforce limits, hand each connection on.
//! - [`postgres`]: the PostgreSQL preamble, refusals, BackendKeyData and CancelRequests.
//! - [`http`](crate::http): `http` listeners: requests proxied through pooled upstream connections.
//! - [`upstream`]: endpoint choice by priority and weight, retries, passive ejection.
//! - [`health`]: active health checks.
//! - [`connect`]: one connect attempt: TCP, then TLS (SSLRequest or direct).
//! - [`tls`]: rustls client settings, verification, mTLS, certificate rotation.
//! - [`forward`]: bytes both ways, half-close, idle timeout.
//! - [`metrics`]: Prometheus metrics.
//! - [`admin`]: the admin HTTP server.
//! - [`ambassador`]: start, reload and drain of the whole.
//! - [`reload`]: watching the config file.
//! - [`demo`]: the self-contained demo.
//! - [`inject`]: `wasmbassador inject`, the native sidecar added to Kubernetes workloads.
//! - [`probe`]: `wasmbassador probe`, the Kubernetes exec probe against the admin server.
//! - [`webhook`]: `wasmbassador webhook`, the mutating admission webhook applying `inject` to new pods.
//!
//! # Embedding
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let config = wasmbassador::config::Config::load("wasmbassador.toml".as_ref())?;
//! wasmbassador::run(config, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod admin;
pub mod ambassador;
pub mod config;
pub mod connect;
pub mod demo;
pub mod forward;
pub mod health;
pub mod http;
pub mod inject;
pub mod listener;
pub mod logs;
pub mod metrics;
pub mod plugin;
pub mod postgres;
pub mod probe;
pub mod reload;
pub mod tls;
pub mod upstream;
pub mod webhook;
pub mod workers;

pub use ambassador::{Ambassador, Error, ReloadSummary, run};
pub use config::Config;
