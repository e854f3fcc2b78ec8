//! The model store the consumer serves from, and the pointer it watches.
//!
//! ```text
//! STORE/versions/v0003/     ONNX model directory (what the consumer loads; its name is
//!                           the `model` id in logs and `alignx_model_info`) + alignx_version.json
//! STORE/policies/v0003/     the same version's trainable weights (HF layout), RL starts here
//! STORE/current -> versions/v0003   the symlink `--model-dir` can point at
//! STORE/.lock               held (flock) by the one retrain/publish running
//! ```
//!
//! Promotion writes the new version completely, then re-points `current` (a symlink
//! swapped by `rename`, atomic) and, when a Redis URL is given, `alignx:model:current`
//! (which the consumer prefers when set). A version is never modified once published.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::onnx::export::{self, ExportOptions};

pub const VERSIONS_DIR: &str = "versions";
pub const POLICIES_DIR: &str = "policies";
pub const CURRENT_LINK: &str = "current";
pub const VERSION_FILE: &str = "alignx_version.json";
const LOCK_FILE: &str = ".lock";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("model store {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("model store {0}: no current version (publish one first: alignx-trainer publish)")]
    NoCurrent(PathBuf),
    #[error("the current model {0} is not a version of this store (no trainable weights for it)")]
    Foreign(PathBuf),
    #[error("export: {0}")]
    Export(String),
    #[error("redis: {0}")]
    Redis(String),
}

fn io(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io { path: path.to_owned(), message: e.to_string() }
}

/// What a published version records about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VersionMeta {
    pub id: String,
    /// The version it was trained from (none for the first).
    pub parent: Option<String>,
    pub created_unix_s: u64,
    /// FNV-1a of the dataset files it was trained and gated on (none when published by hand).
    pub dataset_hash: Option<String>,
    /// Free-form facts: ACC_jud of it and its parent, GRPO summary, …
    pub notes: serde_json::Value,
}

impl VersionMeta {
    /// Metadata stamped now; the id is filled in by [`ModelStore::publish`].
    pub fn new(parent: Option<String>, dataset_hash: Option<String>, notes: serde_json::Value) -> Self {
        let created_unix_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Self { id: String::new(), parent, created_unix_s, dataset_hash, notes }
    }
}

/// A version of the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Version {
    pub id: String,
    /// ONNX directory served by the consumer.
    pub served: PathBuf,
    /// Trainable weights.
    pub policy: PathBuf,
}

pub struct ModelStore {
    root: PathBuf,
    /// Name of the symlink to the served version (default [`CURRENT_LINK`]).
    link: String,
}

/// Held while a retrain or publish runs; released on drop (the kernel drops a crashed
/// holder's lock too, so a stale lock file never blocks).
pub struct StoreLock {
    _file: File,
}

impl ModelStore {
    /// Opens (creating) the store at `root`, its served version linked as `current`.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        Self::open_with_link(root, CURRENT_LINK)
    }

    /// [`ModelStore::open`] with another name for the `current` symlink.
    pub fn open_with_link(root: &Path, link: &str) -> Result<Self, StoreError> {
        for dir in [VERSIONS_DIR, POLICIES_DIR] {
            let path = root.join(dir);
            std::fs::create_dir_all(&path).map_err(|e| io(&path, e))?;
        }
        let root = root.canonicalize().map_err(|e| io(root, e))?;
        Ok(Self { root, link: link.to_owned() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes the store's lock, or `None` when another process holds it.
    pub fn try_lock(&self) -> Result<Option<StoreLock>, StoreError> {
        let path = self.root.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EWOULDBLOCK) => Ok(None),
                _ => Err(io(&path, err)),
            };
        }
        file.set_len(0).map_err(|e| io(&path, e))?;
        writeln!(file, "{}", std::process::id()).map_err(|e| io(&path, e))?;
        Ok(Some(StoreLock { _file: file }))
    }

    fn version(&self, id: &str) -> Version {
        Version {
            id: id.to_owned(),
            served: self.root.join(VERSIONS_DIR).join(id),
            policy: self.root.join(POLICIES_DIR).join(id),
        }
    }

    /// The version served now: the Redis pointer when given and set, else `current`.
    pub fn current(&self, redis: Option<&RedisPointer>) -> Result<Version, StoreError> {
        let pointed = match redis {
            Some(r) => r.get()?.filter(|p| !p.trim().is_empty()).map(PathBuf::from),
            None => None,
        };
        let target = pointed.unwrap_or_else(|| self.root.join(&self.link));
        let served = match target.canonicalize() {
            Ok(p) => p,
            Err(_) => return Err(StoreError::NoCurrent(self.root.clone())),
        };
        let versions = self.root.join(VERSIONS_DIR);
        let id = match (served.parent(), served.file_name()) {
            (Some(parent), Some(name)) if parent == versions => name.to_string_lossy().into_owned(),
            _ => return Err(StoreError::Foreign(served)),
        };
        let version = self.version(&id);
        if !version.policy.join("config.json").is_file() {
            return Err(StoreError::Foreign(served));
        }
        Ok(version)
    }

    /// The metadata of a published version.
    pub fn meta(&self, version: &Version) -> Result<VersionMeta, StoreError> {
        let path = version.served.join(VERSION_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| io(&path, e))
    }

    /// The next unused id (`v0001`, `v0002`, …); call with the lock held.
    pub fn next_id(&self) -> Result<String, StoreError> {
        let dir = self.root.join(VERSIONS_DIR);
        let mut last = 0u32;
        for entry in std::fs::read_dir(&dir).map_err(|e| io(&dir, e))? {
            let name = entry.map_err(|e| io(&dir, e))?.file_name();
            if let Some(n) =
                name.to_str().and_then(|n| n.strip_prefix('v')).and_then(|n| n.parse::<u32>().ok())
            {
                last = last.max(n);
            }
        }
        Ok(format!("v{:04}", last + 1))
    }

    /// Publishes `policy` (a model directory, moved into the store when `take`, else
    /// copied) as a new version: trainable weights, ONNX export, metadata. Subdirectories
    /// (training checkpoints) are not part of a version, either way. Not yet served:
    /// [`ModelStore::point`] does that. Call with the lock held.
    pub fn publish(
        &self,
        policy: &Path,
        take: bool,
        mut meta: VersionMeta,
        options: &ExportOptions,
    ) -> Result<Version, StoreError> {
        let version = self.version(&self.next_id()?);
        meta.id = version.id.clone();
        let staged = self.root.join(POLICIES_DIR).join(format!(".{}.partial", version.id));
        let _ = std::fs::remove_dir_all(&staged);
        if take {
            std::fs::rename(policy, &staged).map_err(|e| io(policy, e))?;
            remove_subdirs(&staged)?;
        } else {
            copy_files(policy, &staged)?;
        }
        let exported = self.root.join(VERSIONS_DIR).join(format!(".{}.partial", version.id));
        let _ = std::fs::remove_dir_all(&exported);
        export::export(&staged, &exported, options).map_err(|e| StoreError::Export(e.to_string()))?;
        let path = exported.join(VERSION_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(&meta).expect("serialisable"))
            .map_err(|e| io(&path, e))?;
        // Weights first, then the served directory: a served version always has weights.
        std::fs::rename(&staged, &version.policy).map_err(|e| io(&version.policy, e))?;
        std::fs::rename(&exported, &version.served).map_err(|e| io(&version.served, e))?;
        Ok(version)
    }

    /// Serves `version`: re-points the `current` symlink (atomically) and, with `redis`,
    /// the `alignx:model:current` key to the version's absolute path.
    pub fn point(&self, version: &Version, redis: Option<&RedisPointer>) -> Result<(), StoreError> {
        let link = self.root.join(&self.link);
        let staged = self.root.join(format!(".{}.{}", self.link, std::process::id()));
        let _ = std::fs::remove_file(&staged);
        let relative = Path::new(VERSIONS_DIR).join(&version.id);
        std::os::unix::fs::symlink(&relative, &staged).map_err(|e| io(&staged, e))?;
        std::fs::rename(&staged, &link).map_err(|e| io(&link, e))?;
        if let Some(r) = redis {
            r.set(&version.served.display().to_string())?;
        }
        Ok(())
    }
}

/// The files directly in `dir` and its subdirectories, apart.
fn entries(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>), StoreError> {
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let path = entry.map_err(|e| io(dir, e))?.path();
        if path.is_dir() {
            dirs.push(path)
        } else if path.is_file() {
            files.push(path)
        }
    }
    Ok((files, dirs))
}

fn copy_files(from: &Path, to: &Path) -> Result<(), StoreError> {
    std::fs::create_dir_all(to).map_err(|e| io(to, e))?;
    for path in entries(from)?.0 {
        let dest = to.join(path.file_name().expect("a directory entry has a name"));
        std::fs::copy(&path, &dest).map_err(|e| io(&dest, e))?;
    }
    Ok(())
}

fn remove_subdirs(dir: &Path) -> Result<(), StoreError> {
    for path in entries(dir)?.1 {
        std::fs::remove_dir_all(&path).map_err(|e| io(&path, e))?;
    }
    Ok(())
}

/// The Redis holding `alignx:model:current` (one node; not a cluster).
#[derive(Clone)]
pub struct RedisPointer {
    pub url: String,
    /// From a file or the environment, never from the URL in logs.
    pub password: Option<String>,
}

impl std::fmt::Debug for RedisPointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPointer")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl RedisPointer {
    fn connect(&self) -> Result<redis::Connection, StoreError> {
        use redis::IntoConnectionInfo;
        let err = |e: redis::RedisError| StoreError::Redis(e.to_string());
        let mut info = self.url.as_str().into_connection_info().map_err(err)?;
        if let Some(p) = &self.password {
            let settings = info.redis_settings().clone().set_password(p.clone());
            info = info.set_redis_settings(settings);
        }
        redis::Client::open(info).map_err(err)?.get_connection().map_err(err)
    }

    fn get(&self) -> Result<Option<String>, StoreError> {
        redis::cmd("GET")
            .arg(alignx_schemas::keys::MODEL_POINTER)
            .query(&mut self.connect()?)
            .map_err(|e| StoreError::Redis(e.to_string()))
    }

    fn set(&self, value: &str) -> Result<(), StoreError> {
        redis::cmd("SET")
            .arg(alignx_schemas::keys::MODEL_POINTER)
            .arg(value)
            .query::<()>(&mut self.connect()?)
            .map_err(|e| StoreError::Redis(e.to_string()))
    }
}
