//! Finding and loading ONNX Runtime.
//!
//! The `ort` crate is built with `load-dynamic`: `libonnxruntime.so` is opened at run
//! time, so one binary runs against the CPU or the CUDA build of ONNX Runtime 1.31. It
//! is looked for, in order:
//! 1. the path given in configuration (`--ort-library`);
//! 2. the `ORT_DYLIB_PATH` environment variable (what `scripts/env.sh` sets);
//! 3. next to the running binary: `libonnxruntime.so.1.31.1`, `libonnxruntime.so`, and
//!    the same under `lib/` beside it.
//!
//! An explicitly given path that does not exist is an error, never a silent fallback.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The ONNX Runtime release our `ort` version speaks (API 31).
pub const ORT_VERSION: &str = "1.31.1";
/// Environment variable naming the library file.
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";

#[derive(Debug, thiserror::Error)]
pub enum OrtLoadError {
    #[error("ONNX Runtime library {path} (from {source_name}) does not exist")]
    Missing { path: PathBuf, source_name: &'static str },
    #[error(
        "ONNX Runtime {ORT_VERSION} not found; tried {tried}. Run scripts/setup and `source scripts/env.sh`, \
         set {ORT_DYLIB_ENV}, pass --ort-library, or put libonnxruntime.so next to the binary"
    )]
    NotFound { tried: String },
    #[error("cannot load ONNX Runtime from {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("ONNX Runtime is already loaded from {loaded}; cannot also load {requested} in one process")]
    AlreadyLoaded { loaded: PathBuf, requested: PathBuf },
}

/// A loaded ONNX Runtime with its process-wide environment. Sessions may be created
/// while this value lives.
pub struct OrtRuntime {
    /// Sessions are built in it; `ort` itself holds only a weak reference.
    environment: ort::environment::Environment,
    path: PathBuf,
}

impl std::fmt::Debug for OrtRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtRuntime").field("path", &self.path).finish_non_exhaustive()
    }
}

/// An explicitly named file must exist; no fallback hides a misconfiguration.
fn explicit(path: PathBuf, source_name: &'static str) -> Result<PathBuf, OrtLoadError> {
    if path.is_file() { Ok(path) } else { Err(OrtLoadError::Missing { path, source_name }) }
}

/// The file names looked for next to the running binary.
fn beside_binary() -> Vec<PathBuf> {
    let Some(dir) = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)) else {
        return Vec::new();
    };
    [dir.clone(), dir.join("lib")]
        .iter()
        .flat_map(|d| [d.join(format!("libonnxruntime.so.{ORT_VERSION}")), d.join("libonnxruntime.so")])
        .collect()
}

/// Finds the library file without loading it.
pub fn locate(configured: Option<&Path>) -> Result<PathBuf, OrtLoadError> {
    if let Some(path) = configured {
        return explicit(path.to_path_buf(), "--ort-library");
    }
    if let Some(path) = std::env::var_os(ORT_DYLIB_ENV).filter(|p| !p.is_empty()) {
        return explicit(PathBuf::from(path), ORT_DYLIB_ENV);
    }
    let tried = beside_binary();
    tried.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        let listed: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
        OrtLoadError::NotFound { tried: format!("{ORT_DYLIB_ENV} (unset), {}", listed.join(", ")) }
    })
}

/// The process's runtime, once loaded. ONNX Runtime allows one environment per process.
static RUNTIME: Mutex<Option<&'static OrtRuntime>> = Mutex::new(None);

/// Locates, loads and initialises ONNX Runtime for this process; later calls return the
/// same runtime (asking for a different library file then is an error).
pub fn init(configured: Option<&Path>) -> Result<&'static OrtRuntime, OrtLoadError> {
    let path = locate(configured)?;
    // A poisoned lock only means another thread panicked while loading; the slot is
    // still either empty or a complete runtime.
    let mut slot = RUNTIME.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(runtime) = *slot {
        return if runtime.path == path {
            Ok(runtime)
        } else {
            Err(OrtLoadError::AlreadyLoaded { loaded: runtime.path.clone(), requested: path })
        };
    }
    let load_err = |message: String| OrtLoadError::Load { path: path.clone(), message };
    let builder = ort::init_from(&path).map_err(|e| load_err(e.to_string()))?;
    let environment = builder.with_name("alignx").build().map_err(|e| load_err(e.to_string()))?;
    let runtime: &'static OrtRuntime = Box::leak(Box::new(OrtRuntime { environment, path }));
    *slot = Some(runtime);
    Ok(runtime)
}

impl OrtRuntime {
    /// The library file in use.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A builder for a session in this runtime's environment.
    pub fn session_builder(&self) -> ort::Result<ort::session::builder::SessionBuilder> {
        ort::session::Session::builder(&self.environment)
    }

    /// ONNX Runtime's own build description (version, commit, flags).
    pub fn build_info(&self) -> &'static str {
        ort::info()
    }
}
