//! `alignx-trainer init`: a new model directory with random weights and a byte-level
//! BPE tokenizer trained on a corpus — the starting point of our tiny models.

use std::path::{Path, PathBuf};

use serde_json::json;
use tch::Device;
use tch::nn::VarStore;

use crate::checkpoint::{self, CheckpointError};
use crate::qwen2::{Config, Qwen2};
use crate::tokenizer::{self, BOS, EOS, PAD, TokenizerError};

/// Named starting sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// ~0.4M parameters: trains in minutes on two CPU cores.
    Tiny,
    /// ~4M parameters.
    Small,
}

/// Model shape; the preset's values unless overridden.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    /// Target BPE vocabulary; the config gets the size actually trained.
    pub vocab_size: usize,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
}

impl Preset {
    pub fn shape(self) -> Shape {
        match self {
            Preset::Tiny => Shape {
                hidden_size: 64,
                intermediate_size: 176,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                vocab_size: 2048,
                max_position_embeddings: 2048,
                tie_word_embeddings: true,
            },
            Preset::Small => Shape {
                hidden_size: 256,
                intermediate_size: 704,
                num_hidden_layers: 4,
                num_attention_heads: 8,
                num_key_value_heads: 2,
                vocab_size: 4096,
                max_position_embeddings: 4096,
                tie_word_embeddings: true,
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{0} exists; pass --force to replace it")]
    Exists(PathBuf),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("invalid shape: {0}")]
    Shape(String),
}

/// The ChatML template Qwen models use, for chat-rendered prompts (the judge); that it
/// renders exactly ChatML is tested in `chat_template`.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Creates `out` (atomically) and returns the config written.
pub fn init(corpus: &Path, shape: &Shape, seed: i64, out: &Path, force: bool) -> Result<Config, InitError> {
    if out.exists() && !force {
        return Err(InitError::Exists(out.to_path_buf()));
    }
    let tok = tokenizer::train(corpus, shape.vocab_size)?;
    let id = |t: &str| tokenizer::token_id(&tok, t).map(i64::from);
    let (bos, eos, pad) = (id(BOS)?, id(EOS)?, id(PAD)?);
    let config_json = json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": tok.get_vocab_size(true),
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "use_sliding_window": false,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
    });
    let config: Config =
        serde_json::from_value(config_json.clone()).map_err(|e| InitError::Shape(e.to_string()))?;
    config.validate().map_err(|(field, reason)| InitError::Shape(format!("`{field}` {reason}")))?;

    let tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "model_max_length": shape.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    });
    let generation_config = json!({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad});
    tch::manual_seed(seed);
    let vs = VarStore::new(Device::Cpu);
    let _model = Qwen2::new(&vs.root(), &config);
    // Tokenizer and generation files are written into the model directory before it is
    // renamed into place.
    checkpoint::save_with(&vs, &config_json, None, out, |dir| {
        let path = dir.join(tokenizer::TOKENIZER_FILE);
        tok.save(&path, false).map_err(|e| checkpoint::io_error(&path, e))?;
        for (name, value) in
            [("tokenizer_config.json", &tokenizer_config), ("generation_config.json", &generation_config)]
        {
            let path = dir.join(name);
            std::fs::write(&path, value.to_string()).map_err(|e| checkpoint::io_error(&path, e))?;
        }
        Ok(())
    })?;
    Ok(config)
}
