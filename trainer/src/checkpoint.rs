//! Model directories in the Hugging Face layout (DESIGN.md §4): `config.json`,
//! `model.safetensors` or shards with `model.safetensors.index.json`, and the tokenizer
//! and generation files carried along. Tensors are matched to parameters by their HF
//! names, and every mismatch is an error naming the file and the tensor.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, View};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Files copied from a source model directory when a checkpoint is saved.
pub const CARRIED_FILES: [&str; 5] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
];
/// Largest shard written (as `transformers` does for big models).
pub const MAX_SHARD_BYTES: usize = 4 << 30;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("{path}: no {WEIGHTS_FILE} or {INDEX_FILE}")]
    NoWeights { path: String },
    #[error("{file}: tensor `{name}` has shape {got:?}, the model expects {want:?}")]
    Shape { file: String, name: String, got: Vec<i64>, want: Vec<i64> },
    #[error("{file}: unknown tensor `{name}` (not a parameter of this model)")]
    Unknown { file: String, name: String },
    #[error("{path}: missing {count} tensor(s), e.g. `{first}`")]
    Missing { path: String, count: usize, first: String },
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Io { path: path.display().to_string(), message: e.to_string() }
}

/// The weight files of a model directory, sharded or not.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let text = std::fs::read_to_string(&index).map_err(|e| io_err(&index, e))?;
        let parsed: Index = serde_json::from_str(&text).map_err(|e| io_err(&index, e))?;
        let files: std::collections::BTreeSet<&String> = parsed.weight_map.values().collect();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        Ok(vec![single])
    } else {
        Err(CheckpointError::NoWeights { path: dir.display().to_string() })
    }
}

/// Fills every parameter of `vs` from the directory's safetensors, converting to each
/// parameter's kind. Extra tensors are errors, except `lm_head.weight` of a model
/// whose head is tied (some exporters write the tied copy).
pub fn load(vs: &VarStore, dir: &Path) -> Result<(), CheckpointError> {
    let vars = vs.variables();
    let mut seen = HashSet::new();
    for file in weight_files(dir)? {
        let shown = file.display().to_string();
        let tensors = Tensor::read_safetensors(&file).map_err(|e| io_err(&file, e))?;
        for (name, tensor) in tensors {
            let Some(var) = vars.get(&name) else {
                // Only a tied model has no `lm_head.weight` parameter; skip the tied copy.
                if name == "lm_head.weight" {
                    continue;
                }
                return Err(CheckpointError::Unknown { file: shown, name });
            };
            if tensor.size() != var.size() {
                return Err(CheckpointError::Shape {
                    file: shown,
                    name,
                    got: tensor.size(),
                    want: var.size(),
                });
            }
            tch::no_grad(|| var.shallow_clone().copy_(&tensor.to_kind(var.kind())));
            seen.insert(name);
        }
    }
    let mut missing: Vec<&String> = vars.keys().filter(|n| !seen.contains(*n)).collect();
    missing.sort();
    match missing.first() {
        None => Ok(()),
        Some(first) => Err(CheckpointError::Missing {
            path: dir.display().to_string(),
            count: missing.len(),
            first: (*first).clone(),
        }),
    }
}

/// A tensor's bytes for safetensors, in the tensor's own dtype.
struct Bytes {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Bytes {
    fn of(tensor: &Tensor) -> Self {
        let t = tensor.to_device(tch::Device::Cpu).contiguous();
        let dtype = match t.kind() {
            Kind::BFloat16 => Dtype::BF16,
            Kind::Half => Dtype::F16,
            Kind::Double => Dtype::F64,
            Kind::Int64 => Dtype::I64,
            _ => Dtype::F32,
        };
        let t = if dtype == Dtype::F32 { t.to_kind(Kind::Float) } else { t };
        let numel = t.numel();
        let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.copy_data_u8(&mut data, numel);
        Self { dtype, shape: t.size().iter().map(|&d| d as usize).collect(), data }
    }
}

impl View for &Bytes {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes `vs` and `config` as a model directory at `out`, copying the tokenizer and
/// generation files from `carry_from`. Written into a temporary sibling directory and
/// renamed into place, so `out` is either complete or untouched; an existing `out` is
/// replaced.
pub fn save(
    vs: &VarStore,
    config: &serde_json::Value,
    carry_from: Option<&Path>,
    out: &Path,
) -> Result<(), CheckpointError> {
    save_with(vs, config, carry_from, out, |_| Ok(()))
}

/// [`save`], with `extra` writing more files (e.g. optimizer state) into the directory
/// before it is renamed into place.
pub fn save_with(
    vs: &VarStore,
    config: &serde_json::Value,
    carry_from: Option<&Path>,
    out: &Path,
    extra: impl FnOnce(&Path) -> Result<(), CheckpointError>,
) -> Result<(), CheckpointError> {
    write_dir_atomically(out, |tmp| {
        write_weights(vs, tmp)?;
        let config_path = tmp.join(CONFIG_FILE);
        let text = serde_json::to_string_pretty(config).map_err(|e| io_err(&config_path, e))?;
        std::fs::write(&config_path, text).map_err(|e| io_err(&config_path, e))?;
        if let Some(src) = carry_from {
            for name in CARRIED_FILES {
                let from = src.join(name);
                if from.is_file() {
                    std::fs::copy(&from, tmp.join(name)).map_err(|e| io_err(&from, e))?;
                }
            }
        }
        extra(tmp)
    })
}

/// Fills a temporary sibling of `out` with `fill`, then renames it to `out` (replacing
/// an existing one), so `out` is either complete or untouched.
pub fn write_dir_atomically<T>(
    out: &Path,
    fill: impl FnOnce(&Path) -> Result<T, CheckpointError>,
) -> Result<T, CheckpointError> {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
    let tmp =
        tempfile::Builder::new().prefix(".partial-").tempdir_in(parent).map_err(|e| io_err(parent, e))?;
    let value = fill(tmp.path())?;
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| io_err(out, e))?;
    }
    std::fs::rename(tmp.keep(), out).map_err(|e| io_err(out, e))?;
    Ok(value)
}

/// An I/O failure at `path`, for [`save_with`] hooks.
pub fn io_error(path: &Path, e: impl std::fmt::Display) -> CheckpointError {
    io_err(path, e)
}

fn write_weights(vs: &VarStore, dir: &Path) -> Result<(), CheckpointError> {
    let metadata = Some(HashMap::from([("format".to_owned(), "pt".to_owned())]));
    let mut named: Vec<(String, Bytes)> =
        vs.variables().into_iter().map(|(n, t)| (n, Bytes::of(&t))).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    // Greedy shards of at most MAX_SHARD_BYTES, in name order.
    let mut shards: Vec<Vec<(String, Bytes)>> = vec![Vec::new()];
    let mut size = 0;
    for (name, bytes) in named {
        if size > 0 && size + bytes.data.len() > MAX_SHARD_BYTES {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes.data.len();
        shards.last_mut().expect("one shard at least").push((name, bytes));
    }
    if shards.len() == 1 {
        let path = dir.join(WEIGHTS_FILE);
        let views = shards[0].iter().map(|(n, b)| (n.as_str(), b));
        return safetensors::tensor::serialize_to_file(views, &metadata, &path)
            .map_err(|e| io_err(&path, format!("{e:?}")));
    }
    let total: usize = shards.iter().flatten().map(|(_, b)| b.data.len()).sum();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len());
        let path = dir.join(&file);
        let views = shard.iter().map(|(n, b)| (n.as_str(), b));
        safetensors::tensor::serialize_to_file(views, &metadata, &path)
            .map_err(|e| io_err(&path, format!("{e:?}")))?;
        weight_map.extend(shard.iter().map(|(n, _)| (n.clone(), file.clone())));
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let path = dir.join(INDEX_FILE);
    std::fs::write(&path, serde_json::to_string_pretty(&index).expect("json")).map_err(|e| io_err(&path, e))
}
