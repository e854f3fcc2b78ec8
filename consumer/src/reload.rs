//! Model hot reload: the consumer serves the model directory named by the Redis key
//! `alignx:model:current` when it is set, else the configured `--model-dir` (typically a
//! symlink the deployment re-points). Every `reload_interval` the pointer is resolved to
//! a real directory; when that changes, the new model is loaded off the pipeline's
//! threads and swapped into the [`EngineSlot`] between batches — batches in flight finish
//! on the model they started with, nothing is dropped or done twice. A model that fails
//! to load is reported and the current one keeps serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::engine::{Engine, EngineSlot};
use crate::metrics::Metrics;
use crate::redis_conn::RedisConn;
use crate::store::Store;

/// Builds an engine from a model directory (with the configured device, sampling, …).
pub type Loader = Arc<dyn Fn(&Path) -> anyhow::Result<Arc<dyn Engine>> + Send + Sync>;

pub struct Reload {
    /// The configured model directory.
    pub model_dir: PathBuf,
    pub interval: Duration,
    pub loader: Loader,
}

/// The directory to serve now: the Redis pointer when set, else the configured one,
/// with symlinks resolved.
async fn resolve(store: &Store<RedisConn>, model_dir: &Path) -> anyhow::Result<PathBuf> {
    let target = match store.model_pointer().await? {
        Some(p) if !p.trim().is_empty() => PathBuf::from(p.trim()),
        _ => model_dir.to_owned(),
    };
    std::fs::canonicalize(&target).map_err(|e| anyhow::anyhow!("model directory {}: {e}", target.display()))
}

/// Watches the pointer until `stop`, swapping models as it changes.
pub async fn watch(
    reload: Reload,
    slot: Arc<EngineSlot>,
    store: Store<RedisConn>,
    metrics: Metrics,
    stop: Arc<AtomicBool>,
) {
    let mut serving = std::fs::canonicalize(&reload.model_dir).unwrap_or_else(|_| reload.model_dir.clone());
    let mut failed: Option<PathBuf> = None;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(reload.interval).await;
        let target = match resolve(&store, &reload.model_dir).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot resolve the model pointer; keeping the current model");
                continue;
            }
        };
        if target == serving || failed.as_ref() == Some(&target) {
            continue;
        }
        tracing::info!(from = %serving.display(), to = %target.display(), "new model version: loading");
        let loader = reload.loader.clone();
        let path = target.clone();
        match tokio::task::spawn_blocking(move || loader(&path)).await {
            Ok(Ok(engine)) => {
                let old = slot.swap(engine.clone());
                let _ = metrics.model_info.remove_label_values(&[old.model_id(), old.provider()]);
                metrics.model_info.with_label_values(&[engine.model_id(), engine.provider()]).set(1);
                tracing::info!(model = engine.model_id(), provider = engine.provider(), "now serving");
                serving = target;
                failed = None;
            }
            Ok(Err(e)) => {
                tracing::error!(model = %target.display(), error = format!("{e:#}"), "new model failed to load; keeping the current one");
                failed = Some(target);
            }
            Err(e) => tracing::error!(error = %e, "model loading panicked"),
        }
    }
}
