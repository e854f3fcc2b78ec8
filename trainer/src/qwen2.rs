//! The Qwen2 decoder (the architecture of the released AlignXplore models and of our
//! tiny ones) in libtorch: GQA attention with q/k/v bias, RoPE, RMSNorm, SwiGLU MLP,
//! optional tied embeddings. Parameter paths are Hugging Face's, so checkpoints load and
//! save by name (`model.layers.{i}.self_attn.q_proj.weight`, …).
//!
//! The KV cache belongs to the caller ([`KvCache`]), not the model, so one set of weights
//! can serve several batches (rollouts, a reference model, evaluation) at once.

use std::path::Path;

use serde::Deserialize;

use crate::lora::{Lora, LoraConfig};
use tch::nn::{self, Init, Module};
use tch::{Device, Kind, Tensor};

/// `config.json`, with the Hugging Face field names.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Config {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    /// Absent in some configs: then every head has its own key/value (no GQA).
    #[serde(default)]
    pub num_key_value_heads: Option<i64>,
    pub rms_norm_eps: f64,
    /// Top-level in released Qwen2 checkpoints.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Where `transformers` ≥ 5 writes the RoPE base (and type).
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// RoPE scaling (YaRN, linear, …) is not implemented; any value but `null` or a
    /// `default` type is refused rather than silently ignored.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    pub max_position_embeddings: i64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<i64>,
    /// One id or a list, as in `config.json`.
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Per-layer attention kinds (`transformers` ≥ 4.5x); only `full_attention` is served.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub head_dim: Option<i64>,
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
}

fn default_act() -> String {
    "silu".into()
}

fn default_init_range() -> f64 {
    0.02
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_type: Option<String>,
}

/// A `config.json` we cannot serve faithfully.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path}: {error}")]
    Parse { path: String, error: serde_json::Error },
    #[error("{path}: `{field}` {reason}")]
    Unsupported { path: String, field: &'static str, reason: String },
}

impl Config {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|error| ConfigError::Read { path: shown.clone(), error })?;
        let config: Config =
            serde_json::from_str(&text).map_err(|error| ConfigError::Parse { path: shown.clone(), error })?;
        config.validate().map_err(|(field, reason)| ConfigError::Unsupported {
            path: shown,
            field,
            reason,
        })?;
        Ok(config)
    }

    /// Refuses what the model here would compute differently from Hugging Face:
    /// `Err((field, reason))`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(t) = self.model_type.as_deref().filter(|t| *t != "qwen2") {
            return Err(("model_type", format!("is {t:?}; only \"qwen2\" is supported")));
        }
        if self.use_sliding_window {
            return Err((
                "use_sliding_window",
                "is true; sliding-window attention is not implemented".into(),
            ));
        }
        if let Some(t) = self.layer_types.iter().flatten().find(|t| *t != "full_attention") {
            return Err(("layer_types", format!("contains {t:?}; only \"full_attention\" is implemented")));
        }
        if self.hidden_act != "silu" {
            return Err(("hidden_act", format!("is {:?}; only \"silu\" is supported", self.hidden_act)));
        }
        let default_rope = |v: &serde_json::Value| {
            v.is_null()
                || v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()) == Some("default")
        };
        if let Some(s) = self.rope_scaling.as_ref().filter(|s| !default_rope(s)) {
            return Err(("rope_scaling", format!("is {s}; only unscaled RoPE is implemented")));
        }
        if let Some(t) =
            self.rope_parameters.as_ref().and_then(|p| p.rope_type.as_deref()).filter(|t| *t != "default")
        {
            return Err(("rope_parameters.rope_type", format!("is {t:?}; only \"default\" is implemented")));
        }
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
        ];
        if let Some((field, v)) = positive.iter().find(|(_, v)| *v <= 0) {
            return Err((field, format!("is {v}; must be positive")));
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(("num_attention_heads", "must divide hidden_size".into()));
        }
        if self.num_attention_heads % self.kv_heads() != 0 {
            return Err(("num_key_value_heads", "must divide num_attention_heads".into()));
        }
        if let Some(d) = self.head_dim.filter(|d| *d != self.hidden_size / self.num_attention_heads) {
            return Err(("head_dim", format!("is {d}; Qwen2 uses hidden_size / num_attention_heads")));
        }
        if self.rope_theta.is_none() && self.rope_parameters.as_ref().and_then(|p| p.rope_theta).is_none() {
            return Err(("rope_theta", "is missing (looked at the top level and in rope_parameters)".into()));
        }
        Ok(())
    }

    pub fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }

    /// The RoPE base: top-level `rope_theta`, else `rope_parameters.rope_theta`.
    pub fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| self.rope_parameters.as_ref().and_then(|p| p.rope_theta))
            .unwrap_or(10_000.0)
    }
}

/// Keys and values of every layer for the positions seen so far, `[batch, kv_heads,
/// past, head_dim]` each.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions already cached.
    pub fn past_len(&self) -> i64 {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |(k, _)| k.size()[2])
    }

    /// Repeats a one-row cache as `rows` rows (a shared prompt prefix; a view, and
    /// differentiable: gradients of every row flow back to the one).
    pub fn expand_rows(&mut self, rows: i64) {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.expand([rows, -1, -1, -1], false);
            *v = v.expand([rows, -1, -1, -1], false);
        }
    }

    /// Keeps only the batch rows in `rows` (finished sequences leave the batch).
    pub fn select_rows(&mut self, rows: &Tensor) {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(0, rows);
            *v = v.index_select(0, rows);
        }
    }
}

#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(vs: nn::Path, size: i64, eps: f64) -> Self {
        Self { weight: vs.var("weight", &[size], Init::Const(1.0)), eps }
    }
}

impl Module for RmsNorm {
    /// Computed in f32 whatever the weights' precision, as Hugging Face does.
    fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let x32 = x.to_kind(Kind::Float);
        let var = x32.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = (x32 * (var + self.eps).rsqrt()).to_kind(kind);
        &self.weight * normed
    }
}

/// `rotate_half` of the Hugging Face RoPE layout: halves, not interleaved pairs.
fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[x.dim() - 1] / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[x2.neg(), x1], -1)
}

#[derive(Debug)]
struct Rotary {
    /// `1 / theta^(2i/d)`, f32.
    inv_freq: Tensor,
}

impl Rotary {
    fn new(config: &Config, device: Device) -> Self {
        let d = config.head_dim();
        let exponents = Tensor::arange_start_step(0, d, 2, (Kind::Float, device)) / d as f64;
        let inv_freq = Tensor::from(config.rope_theta()).to_device(device).pow(&exponents).reciprocal();
        Self { inv_freq }
    }

    /// `cos`, `sin` of shape `[batch, 1, seq, head_dim]` for `position_ids [batch, seq]`.
    fn cos_sin(&self, position_ids: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let freqs = position_ids.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }
}

/// Where a block's parameters go: the base weights, and the LoRA adapters (if any) under
/// the same relative names in their own store.
#[derive(Clone)]
struct Scope<'a> {
    base: nn::Path<'a>,
    lora: Option<(nn::Path<'a>, &'a LoraConfig)>,
}

impl<'a> Scope<'a> {
    fn sub(&self, name: impl ToString + Copy) -> Scope<'a> {
        Scope { base: &self.base / name, lora: self.lora.as_ref().map(|(p, c)| (p / name, *c)) }
    }
}

/// A projection (`nn::Linear`) with an optional LoRA adapter.
#[derive(Debug)]
struct Proj {
    linear: nn::Linear,
    lora: Option<Lora>,
}

impl Proj {
    fn new(scope: &Scope, name: &str, inp: i64, out: i64, bias: bool, std: f64) -> Self {
        let config = nn::LinearConfig {
            ws_init: Init::Randn { mean: 0.0, stdev: std },
            bs_init: Some(Init::Const(0.0)),
            bias,
        };
        let linear = nn::linear(&scope.base / name, inp, out, config);
        let lora = scope
            .lora
            .as_ref()
            .filter(|(_, c)| c.targets(name))
            .map(|(p, c)| Lora::new(p / name, inp, out, c));
        Self { linear, lora }
    }
}

impl Module for Proj {
    fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.linear.forward(x);
        match &self.lora {
            Some(l) => y + l.delta(x),
            None => y,
        }
    }
}

#[derive(Debug)]
struct Attention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn new(s: &Scope, c: &Config) -> Self {
        let (h, d, std) = (c.hidden_size, c.head_dim(), c.initializer_range);
        Self {
            q_proj: Proj::new(s, "q_proj", h, c.num_attention_heads * d, true, std),
            k_proj: Proj::new(s, "k_proj", h, c.kv_heads() * d, true, std),
            v_proj: Proj::new(s, "v_proj", h, c.kv_heads() * d, true, std),
            o_proj: Proj::new(s, "o_proj", c.num_attention_heads * d, h, false, std),
            heads: c.num_attention_heads,
            kv_heads: c.kv_heads(),
            head_dim: d,
        }
    }

    /// `mask`: additive f32 `[batch, 1, seq, past + seq]`.
    fn forward(
        &self,
        x: &Tensor,
        cos_sin: &(Tensor, Tensor),
        mask: &Tensor,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> Tensor {
        let (b, s, _) = x.size3().expect("hidden states are [batch, seq, hidden]");
        let split = |t: Tensor, n: i64| t.view([b, s, n, self.head_dim]).transpose(1, 2);
        let q = split(self.q_proj.forward(x), self.heads);
        let k = split(self.k_proj.forward(x), self.kv_heads);
        let v = split(self.v_proj.forward(x), self.kv_heads);
        let (cos, sin) = cos_sin;
        let q = &q * cos + rotate_half(&q) * sin;
        let k = &k * cos + rotate_half(&k) * sin;
        let (k, v) = match cache.take() {
            Some((pk, pv)) => (Tensor::cat(&[pk, k], 2), Tensor::cat(&[pv, v], 2)),
            None => (k, v),
        };
        *cache = Some((k.shallow_clone(), v.shallow_clone()));
        // Grouped-query attention: each key/value head serves `heads / kv_heads` query heads.
        let rep = self.heads / self.kv_heads;
        let t = k.size()[2];
        let expand = |x: &Tensor| {
            x.unsqueeze(2).expand([b, self.kv_heads, rep, t, self.head_dim], false).reshape([
                b,
                self.heads,
                t,
                self.head_dim,
            ])
        };
        let (k, v) = (expand(&k), expand(&v));
        // Scores and softmax in f32, so half precision cannot overflow them.
        let scores = q.to_kind(Kind::Float).matmul(&k.to_kind(Kind::Float).transpose(-2, -1))
            / (self.head_dim as f64).sqrt()
            + mask;
        let probs = scores.softmax(-1, Kind::Float).to_kind(v.kind());
        let out = probs.matmul(&v).transpose(1, 2).reshape([b, s, self.heads * self.head_dim]);
        self.o_proj.forward(&out)
    }
}

#[derive(Debug)]
struct Mlp {
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
}

impl Mlp {
    fn new(s: &Scope, c: &Config) -> Self {
        let (h, i, std) = (c.hidden_size, c.intermediate_size, c.initializer_range);
        Self {
            gate_proj: Proj::new(s, "gate_proj", h, i, false, std),
            up_proj: Proj::new(s, "up_proj", h, i, false, std),
            down_proj: Proj::new(s, "down_proj", i, h, false, std),
        }
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.down_proj.forward(&(self.gate_proj.forward(x).silu() * self.up_proj.forward(x)))
    }
}

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(s: &Scope, c: &Config) -> Self {
        Self {
            input_layernorm: RmsNorm::new(&s.base / "input_layernorm", c.hidden_size, c.rms_norm_eps),
            self_attn: Attention::new(&s.sub("self_attn"), c),
            post_attention_layernorm: RmsNorm::new(
                &s.base / "post_attention_layernorm",
                c.hidden_size,
                c.rms_norm_eps,
            ),
            mlp: Mlp::new(&s.sub("mlp"), c),
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        cos_sin: &(Tensor, Tensor),
        mask: &Tensor,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> Tensor {
        let h = x + self.self_attn.forward(&self.input_layernorm.forward(x), cos_sin, mask, cache);
        &h + self.mlp.forward(&self.post_attention_layernorm.forward(&h))
    }
}

/// Additive attention mask `[batch, 1, seq, past + seq]`: 0 where query `i` may see key
/// `j` (causal, and the key is not padding), a large negative number elsewhere. Finite,
/// so a row with nothing to see (a left-padding query) stays a number, not NaN.
fn attention_bias(attention_mask: &Tensor, past: i64, seq: i64) -> Tensor {
    let device = attention_mask.device();
    let total = past + seq;
    let key_pos = Tensor::arange(total, (Kind::Int64, device)).view([1, total]);
    let query_pos = (Tensor::arange(seq, (Kind::Int64, device)) + past).view([seq, 1]);
    let causal = key_pos.le_tensor(&query_pos).view([1, 1, seq, total]);
    let keys = attention_mask.ne(0).view([-1, 1, 1, total]);
    let allowed = causal.logical_and(&keys);
    Tensor::zeros(allowed.size(), (Kind::Float, device)).masked_fill(&allowed.logical_not(), -1e30)
}

/// A Qwen2 causal language model.
#[derive(Debug)]
pub struct Qwen2 {
    config: Config,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `None` when the output projection is tied to `embed_tokens`.
    lm_head: Option<Tensor>,
    rotary: Rotary,
}

impl Qwen2 {
    /// Creates the parameters under `vs` with Hugging Face names and random values
    /// (normal, std `initializer_range`; norms at 1; biases at 0).
    pub fn new(vs: &nn::Path, config: &Config) -> Self {
        Self::build(Scope { base: vs / "model", lora: None }, vs, config)
    }

    /// As [`Qwen2::new`], with LoRA adapters on `lora.target_modules` created under
    /// `lora_vs` (same relative names as the base parameters).
    pub fn with_lora(vs: &nn::Path, lora_vs: &nn::Path, lora: &LoraConfig, config: &Config) -> Self {
        Self::build(Scope { base: vs / "model", lora: Some((lora_vs / "model", lora)) }, vs, config)
    }

    fn build(model: Scope, vs: &nn::Path, config: &Config) -> Self {
        let std = config.initializer_range;
        let embed_tokens = (&model.base / "embed_tokens").var(
            "weight",
            &[config.vocab_size, config.hidden_size],
            Init::Randn { mean: 0.0, stdev: std },
        );
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::new(&model.sub("layers").sub(i), config))
            .collect();
        let norm = RmsNorm::new(&model.base / "norm", config.hidden_size, config.rms_norm_eps);
        let lm_head = (!config.tie_word_embeddings).then(|| {
            (vs / "lm_head").var(
                "weight",
                &[config.vocab_size, config.hidden_size],
                Init::Randn { mean: 0.0, stdev: std },
            )
        });
        Self {
            config: config.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary: Rotary::new(config, vs.device()),
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Logits `[batch, seq, vocab]` (f32) for `input_ids [batch, seq]`.
    ///
    /// `attention_mask [batch, past + seq]` marks real tokens with 1 and padding with 0
    /// (left padding for batched generation); `position_ids [batch, seq]` are used as
    /// given. With a cache, its contents are the first `past` keys and it is extended.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        position_ids: &Tensor,
        cache: &mut KvCache,
    ) -> Tensor {
        self.logits(&self.hidden(input_ids, attention_mask, position_ids, cache))
    }

    /// The final (normed) hidden states `[batch, seq, hidden]`; [`Qwen2::forward`]
    /// without the output projection, for callers that need logits at a few positions.
    pub fn hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        position_ids: &Tensor,
        cache: &mut KvCache,
    ) -> Tensor {
        let (_, seq) = input_ids.size2().expect("input_ids are [batch, seq]");
        cache.layers.resize_with(self.layers.len(), || None);
        let past = cache.past_len();
        let mut x = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false);
        let cos_sin = self.rotary.cos_sin(position_ids, x.kind());
        let mask = attention_bias(attention_mask, past, seq);
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, &cos_sin, &mask, layer_cache);
        }
        self.norm.forward(&x)
    }

    /// f32 logits `[…, vocab]` for hidden states `[…, hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        hidden.matmul(&head.transpose(0, 1)).to_kind(Kind::Float)
    }

    /// Logits for unpadded sequences without a cache: positions `0..seq`, all visible.
    pub fn forward_full(&self, input_ids: &Tensor) -> Tensor {
        let (b, seq) = input_ids.size2().expect("input_ids are [batch, seq]");
        let device = input_ids.device();
        let mask = Tensor::ones([b, seq], (Kind::Int64, device));
        let positions = Tensor::arange(seq, (Kind::Int64, device)).unsqueeze(0).expand([b, seq], false);
        self.forward(input_ids, &mask, &positions, &mut KvCache::new())
    }
}
