//! LoRA adapters (low-rank updates `W + (alpha / r)·B·A` on chosen projections), for
//! fine-tuning models too big to train fully. Adapters are saved in the PEFT layout
//! (`adapter_config.json`, `adapter_model.safetensors` with `base_model.model.…lora_A.weight`
//! names), so they move between this project and the HF ecosystem, and can be merged
//! into the base weights (`alignx-trainer merge-lora`).

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::nn::{self, Init, VarStore};
use tch::{Kind, Tensor};

use crate::checkpoint::{self, CheckpointError};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT's prefix in front of the model's own parameter names.
const PEFT_PREFIX: &str = "base_model.model.";
/// Every projection an adapter may target.
pub const MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// What to adapt, as PEFT's `adapter_config.json` says it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    #[serde(rename = "r")]
    pub rank: i64,
    pub lora_alpha: f64,
    pub target_modules: Vec<String>,
}

impl LoraConfig {
    /// Parses `q,k,v,o,gate,up,down` (short or full names).
    pub fn parse_targets(list: &str) -> Result<Vec<String>, String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|t| {
                let full = if t.ends_with("_proj") { t.to_owned() } else { format!("{t}_proj") };
                if MODULES.contains(&full.as_str()) {
                    Ok(full)
                } else {
                    Err(format!("unknown LoRA target {t:?} (choose from q,k,v,o,gate,up,down)"))
                }
            })
            .collect()
    }

    pub fn scale(&self) -> f64 {
        self.lora_alpha / self.rank as f64
    }

    pub fn targets(&self, module: &str) -> bool {
        self.target_modules.iter().any(|m| m == module)
    }

    pub fn read(dir: &Path) -> Result<Self, CheckpointError> {
        let path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&path).map_err(|e| checkpoint::io_error(&path, e))?;
        serde_json::from_str(&text).map_err(|e| checkpoint::io_error(&path, e))
    }
}

/// One adapter: `A [r, in]`, `B [out, r]`.
#[derive(Debug)]
pub struct Lora {
    a: Tensor,
    b: Tensor,
    scale: f64,
}

impl Lora {
    /// A starts small and random, B at zero, so a new adapter changes nothing (as PEFT).
    pub fn new(vs: nn::Path, inp: i64, out: i64, config: &LoraConfig) -> Self {
        let bound = 1.0 / (inp as f64).sqrt();
        let a = (&vs / "lora_A").var("weight", &[config.rank, inp], Init::Uniform { lo: -bound, up: bound });
        let b = (&vs / "lora_B").var("weight", &[out, config.rank], Init::Const(0.0));
        Self { a, b, scale: config.scale() }
    }

    /// The adapter's contribution for input `x`.
    /// Computed in the adapter's precision (f32) even over a bf16/fp16 base.
    pub fn delta(&self, x: &Tensor) -> Tensor {
        let h = x.to_kind(self.a.kind()).matmul(&self.a.transpose(0, 1)).matmul(&self.b.transpose(0, 1));
        (h * self.scale).to_kind(x.kind())
    }
}

/// Writes an adapter directory (PEFT layout) atomically; `extra` may add files to it
/// before it is renamed into place.
pub fn save_adapter(
    lora_vs: &VarStore,
    config: &LoraConfig,
    base: &Path,
    out: &Path,
    extra: impl FnOnce(&Path) -> Result<(), CheckpointError>,
) -> Result<(), CheckpointError> {
    checkpoint::write_dir_atomically(out, |tmp| {
        let mut named: Vec<(String, Tensor)> =
            lora_vs.variables().into_iter().map(|(n, t)| (format!("{PEFT_PREFIX}{n}"), t)).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let weights = tmp.join(ADAPTER_WEIGHTS);
        Tensor::write_safetensors(&named, &weights).map_err(|e| checkpoint::io_error(&weights, e))?;
        let peft = serde_json::json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank, "lora_alpha": config.lora_alpha,
            "target_modules": config.target_modules, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": false,
            "base_model_name_or_path": base.display().to_string(),
        });
        let cfg_path = tmp.join(ADAPTER_CONFIG);
        let text = serde_json::to_string_pretty(&peft).expect("json");
        std::fs::write(&cfg_path, text).map_err(|e| checkpoint::io_error(&cfg_path, e))?;
        extra(tmp)
    })
}

/// Fills `lora_vs` from an adapter directory; names, shapes and completeness checked.
pub fn load_adapter(lora_vs: &VarStore, dir: &Path) -> Result<(), CheckpointError> {
    let file = dir.join(ADAPTER_WEIGHTS);
    let shown = file.display().to_string();
    let vars = lora_vs.variables();
    let tensors = Tensor::read_safetensors(&file).map_err(|e| checkpoint::io_error(&file, e))?;
    let mut seen = 0;
    for (name, t) in tensors {
        let local = name.strip_prefix(PEFT_PREFIX).unwrap_or(&name);
        let Some(var) = vars.get(local) else {
            return Err(CheckpointError::Unknown { file: shown, name });
        };
        if var.size() != t.size() {
            return Err(CheckpointError::Shape { file: shown, name, got: t.size(), want: var.size() });
        }
        tch::no_grad(|| var.shallow_clone().copy_(&t.to_kind(var.kind())));
        seen += 1;
    }
    if seen != vars.len() {
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        return Err(CheckpointError::Missing {
            path: shown,
            count: vars.len() - seen,
            first: names[0].clone(),
        });
    }
    Ok(())
}

/// Folds every adapter into its base weight: `W += scale · B·A`.
pub fn merge(base_vs: &VarStore, lora_vs: &VarStore, config: &LoraConfig) {
    let base = base_vs.variables();
    let lora = lora_vs.variables();
    tch::no_grad(|| {
        for (name, a) in &lora {
            let Some(prefix) = name.strip_suffix(".lora_A.weight") else { continue };
            let b = &lora[&format!("{prefix}.lora_B.weight")];
            let w = &base[&format!("{prefix}.weight")];
            let delta = b.to_kind(Kind::Float).matmul(&a.to_kind(Kind::Float)) * config.scale();
            let _ = w.shallow_clone().g_add_(&delta.to_kind(w.kind()));
        }
    });
}
