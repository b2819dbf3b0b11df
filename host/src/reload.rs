//! Config reload: watch the config file's folder and reload on change.
//!
//! The folder is watched rather than the file because a Kubernetes ConfigMap mount
//! updates by swapping a `..data` symlink: the file's own path never sees a write.
//! Events are debounced, and a reload happens only when the text actually changed.

use std::path::Path;
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::ambassador::{Ambassador, Error, ReloadSummary};
use crate::config::Config;
use crate::metrics::ResultLabels;

/// Quiet time after the last file event before the file is read.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// Watches the folder of `path`; each debounced burst of changes yields one `()`.
/// Keep the returned watcher alive for as long as events are wanted.
pub fn watch(path: &Path) -> notify::Result<(RecommendedWatcher, mpsc::Receiver<()>)> {
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(e) = event
            && !e.kind.is_access()
        {
            let _ = raw_tx.send(());
        }
    })?;
    watcher.watch(&folder, RecursiveMode::NonRecursive)?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while raw_rx.recv().await.is_some() {
            // Debounce: wait until events stop for DEBOUNCE.
            while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, raw_rx.recv()).await {}
            if tx.send(()).await.is_err() {
                return;
            }
        }
    });
    Ok((watcher, rx))
}

/// Reloads from `path` if its text differs from `last_text`; logs the outcome.
/// A config that does not parse is refused whole, counted, and the old one stays.
pub async fn reload_file(
    ambassador: &Ambassador,
    path: &Path,
    last_text: &mut String,
    force: bool,
) -> Option<Result<ReloadSummary, Error>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            // Mid-swap the file may be briefly absent; the next event retries.
            tracing::warn!(path = %path.display(), error = %e, "config file unreadable; keeping the running config");
            return None;
        }
    };
    if !force && text == *last_text {
        return None;
    }
    *last_text = text.clone();
    let result = match Config::parse_and_check_files(&text, &path.display().to_string()) {
        Ok(config) => ambassador.reload(config).await,
        Err(e) => {
            ambassador
                .shared()
                .metrics
                .config_reloads
                .get_or_create(&ResultLabels { result: "failure" })
                .inc();
            Err(Error::Config(e))
        }
    };
    match &result {
        Ok(s) => tracing::info!(
            added = ?s.added,
            removed = ?s.removed,
            changed = ?s.changed,
            "config reloaded"
        ),
        Err(e) => tracing::error!("config reload refused; the running config stays in force: {e}"),
    }
    Some(result)
}
