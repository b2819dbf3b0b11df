//! Hot swap: watch the folders that hold plugin files and reload a plugin when its
//! file's bytes change.
//!
//! Folders, not files, are watched: a Kubernetes ConfigMap mount updates by swapping a
//! `..data` symlink, so the plugin's own path never sees a write event. After a burst
//! of events settles (debounce), each plugin in the folder is read; one whose digest
//! differs from the version serving is compiled and checked off the async workers
//! and swapped in only if every step passes. A half-written file fails to compile and
//! is refused; the write that completes it fires another event and is picked up.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::{PluginMap, PluginShared, load};

/// Quiet time after the last event in a folder before it is examined.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// Keeps the folder watches alive; dropping it stops hot swap.
#[derive(Debug)]
pub struct PluginWatcher {
    _watcher: RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PluginWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn folder_of(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// Watches the folders of every plugin in `plugins` (the map may be swapped later; it
/// is read at each event, so an event only ever reloads plugins still configured).
pub fn watch(plugins: Arc<ArcSwap<PluginMap>>, shared: PluginShared) -> notify::Result<PluginWatcher> {
    let folders: BTreeSet<PathBuf> = plugins
        .load()
        .values()
        .map(|s| folder_of(&s.current.load().config.path))
        .collect();
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(e) = event
            && !e.kind.is_access()
        {
            let _ = tx.send(());
        }
    })?;
    for f in &folders {
        watcher.watch(f, RecursiveMode::NonRecursive)?;
    }
    let task = tokio::spawn(async move {
        while rx.recv().await.is_some() {
            while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
            let map = plugins.load_full();
            let shared = shared.clone();
            // Compiling is CPU work; keep it off the async workers.
            let _ = tokio::task::spawn_blocking(move || check_all(&map, &shared)).await;
        }
    });
    Ok(PluginWatcher {
        _watcher: watcher,
        task,
    })
}

/// Reloads every plugin whose file's digest differs from the version serving.
pub fn check_all(plugins: &PluginMap, shared: &PluginShared) {
    for slot in plugins.values() {
        let current = slot.current.load_full();
        let Ok(bytes) = std::fs::read(&current.config.path) else {
            // Mid-swap the path may briefly dangle; the next event retries.
            continue;
        };
        let digest = load::digest(&bytes);
        if digest == current.sha256 || slot.was_refused(&digest) {
            continue;
        }
        match slot.reload(&current.config, shared) {
            // `init` can fail for a passing reason (its deadline missed on a busy
            // machine, the instance pool full): the next event in the folder retries
            // it. Every other step fails the same way for the same bytes.
            Err(e) if e.step() != "init" => slot.mark_refused(digest),
            _ => {}
        }
    }
}
