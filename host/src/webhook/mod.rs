//! `wasmbassador webhook`: a mutating admission webhook that adds the native sidecar
//! to pods as they are created, the same change `wasmbassador inject` makes to YAML.
//!
//! It answers AdmissionReview **v1** over TLS (rustls), HTTP/1.1:
//!
//! | path | answers |
//! |---|---|
//! | `POST /mutate` | pods that opt in themselves: label (or annotation) `wasmbassador.io/inject: "true"` |
//! | `POST /mutate-namespace` | pods of a namespace labelled `wasmbassador.io/inject: "true"`: injected unless the pod says `"false"` |
//! | `GET /healthz` | 200 `ok`, for the webhook's own probes |
//!
//! **Why two paths.** The API server sends the pod, never its namespace's labels, so
//! the webhook cannot see that a namespace opted in. The MutatingWebhookConfiguration
//! can: its entry with a `namespaceSelector` on the label calls `/mutate-namespace`,
//! and the path is the fact "this namespace opted in". The entry with an
//! `objectSelector` on the pod label calls `/mutate`. (An `objectSelector` sees labels
//! only: through the webhook a pod opts in with the label; the annotation works too
//! once the pod reaches the webhook, and always with `wasmbassador inject`.)
//!
//! Each request is allowed; an injected pod's response carries a base64 `JSONPatch`
//! computed with the `json-patch` crate as the difference between the pod and what
//! [`crate::inject::inject_document`] makes of it, so the API server ends up with
//! exactly the pod `inject` would write. Pods with a malformed opt-in value are
//! refused, see [`review::review`]. A body that is not an AdmissionReview gets HTTP
//! 400 with the reason, and the server goes on.
//!
//! The certificate and key files are re-read when they change (cert-manager renews
//! them in the mounted Secret): new handshakes use the new pair, a broken pair is
//! refused with a log line while the old one keeps serving. See [`cert`].
//!
//! Layout: [`review`] is the pure part (AdmissionReview in, AdmissionReview out),
//! [`cert`] the reloading certificate, and [`serve`] the thin HTTPS layer.

pub mod cert;
pub mod review;
mod server;

use std::future::Future;
use std::path::PathBuf;

use tokio::net::TcpListener;

use crate::inject::InjectOptions;

pub use review::{Admission, Decision, NAMESPACE_PATH, OptIn, POD_PATH, ReviewError};
pub use server::MAX_BODY;

/// What the webhook serves with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The serving certificate (PEM, the leaf first), re-read when it changes.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The sidecar's image and defaults; `inject_by_default` is set per path.
    pub options: InjectOptions,
}

/// Why the webhook could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The certificate or key cannot serve.
    #[error(transparent)]
    Cert(#[from] cert::CertError),
    /// rustls refused the server settings.
    #[error("TLS settings refused by rustls: {0}")]
    Tls(rustls::Error),
    /// The listener's address cannot be read.
    #[error("webhook listener: {0}")]
    Listen(std::io::Error),
    /// The certificate's folder cannot be watched.
    #[error("cannot watch the certificate files: {0}")]
    Watch(notify::Error),
}

/// Serves the webhook on `listener` until `shutdown` completes, then answers the
/// requests under way (up to 10 s) and returns. Fails only at start, when the
/// certificate cannot serve or its folder cannot be watched.
pub async fn serve(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WebhookError> {
    server::serve(listener, settings, shutdown).await
}
