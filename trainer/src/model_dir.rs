//! Loading a whole model directory: config, weights, tokenizer, and the EOS ids of
//! `generation_config.json` (falling back to `config.json`).

use std::path::Path;

use tch::nn::VarStore;
use tch::{Device, Kind};
use tokenizers::Tokenizer;

use crate::checkpoint::{self, CONFIG_FILE, CheckpointError};
use crate::lora::LoraConfig;
use crate::qwen2::{Config, ConfigError, Qwen2};
use crate::tokenizer::{self, TokenizerError};

/// Parameter precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dtype {
    Fp32,
    Bf16,
    Fp16,
}

impl Dtype {
    pub fn kind(self) -> Kind {
        match self {
            Dtype::Fp32 => Kind::Float,
            Dtype::Bf16 => Kind::BFloat16,
            Dtype::Fp16 => Kind::Half,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// A model ready to run.
pub struct LoadedModel {
    /// Owns the base parameters `model` uses (frozen when an adapter is attached).
    pub vs: VarStore,
    /// Owns the LoRA adapter parameters, when the model was built with them.
    pub lora_vs: Option<VarStore>,
    pub model: Qwen2,
    pub tokenizer: Tokenizer,
    /// Token ids that end a generation.
    pub eos: Vec<i64>,
}

fn ids(value: Option<&serde_json::Value>) -> Vec<i64> {
    match value {
        Some(serde_json::Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(serde_json::Value::as_i64).collect(),
        _ => Vec::new(),
    }
}

pub fn load(dir: &Path, device: Device, dtype: Dtype) -> Result<LoadedModel, LoadError> {
    load_with_lora(dir, device, dtype, None)
}

/// [`load`], adding fresh LoRA adapters (trainable, in f32) and freezing the base.
pub fn load_with_lora(
    dir: &Path,
    device: Device,
    dtype: Dtype,
    lora: Option<&LoraConfig>,
) -> Result<LoadedModel, LoadError> {
    let config = Config::from_file(&dir.join(CONFIG_FILE))?;
    let mut vs = VarStore::new(device);
    let lora_vs = lora.map(|_| VarStore::new(device));
    let model = match (lora, &lora_vs) {
        (Some(l), Some(lvs)) => Qwen2::with_lora(&vs.root(), &lvs.root(), l, &config),
        _ => Qwen2::new(&vs.root(), &config),
    };
    checkpoint::load(&vs, dir)?;
    vs.set_kind(dtype.kind());
    if lora_vs.is_some() {
        vs.freeze();
    }
    let tokenizer = tokenizer::load(dir)?;
    let generation: Option<serde_json::Value> = std::fs::read_to_string(dir.join("generation_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let mut eos = ids(generation.as_ref().and_then(|g| g.get("eos_token_id")));
    if eos.is_empty() {
        eos = ids(config.eos_token_id.as_ref());
    }
    Ok(LoadedModel { vs, lora_vs, model, tokenizer, eos })
}

/// Folds the adapter at `adapter` into the base model at `base` and writes a plain model
/// directory (HF layout, no adapter) at `out`.
pub fn merge_lora(base: &Path, adapter: &Path, out: &Path) -> Result<(), LoadError> {
    let lora = LoraConfig::read(adapter)?;
    let loaded = load_with_lora(base, Device::Cpu, Dtype::Fp32, Some(&lora))?;
    let lora_vs = loaded.lora_vs.as_ref().expect("built with an adapter");
    crate::lora::load_adapter(lora_vs, adapter)?;
    crate::lora::merge(&loaded.vs, lora_vs, &lora);
    let path = base.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| checkpoint::io_error(&path, e))?;
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| checkpoint::io_error(&path, e))?;
    checkpoint::save(&loaded.vs, &config, Some(base), out)?;
    Ok(())
}
