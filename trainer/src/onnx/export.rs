//! ONNX export of a Qwen2 model in the layout Hugging Face Optimum produces for decoder
//! models with past key values (DESIGN.md §4), written from Rust:
//!
//! - inputs `input_ids [batch, seq]`, `attention_mask [batch, past + seq]`,
//!   `position_ids [batch, seq]` (int64), `past_key_values.{i}.key|value
//!   [batch, kv_heads, past, head_dim]`;
//! - outputs `logits [batch, seq, vocab]` (always f32), `present.{i}.key|value
//!   [batch, kv_heads, past + seq, head_dim]`.
//!
//! With [`KvLayout::Shared`] the graph instead uses ONNX Runtime's `GroupQueryAttention`
//! (domain `com.microsoft`): inputs `input_ids`, `seqlens_k [batch]` (int32, cached tokens
//! per row minus one during prefill, cached tokens during decode) and
//! `total_sequence_length` (int32 scalar), past key/values as fixed-capacity buffers
//! `[batch, kv_heads, capacity, head_dim]` that the caller binds as the presents too, so
//! each step writes its new keys in place instead of copying the whole cache (the
//! Optimum layout's `Concat`). Rows are right-padded and each keeps its own length, so no
//! attention mask or position ids are needed. Only our engine serves this layout.
//!
//! The Optimum graph computes what `qwen2::Qwen2::forward` computes, op for op: the same finite
//! additive mask (causal over absolute positions, padding from `attention_mask`), RoPE
//! from `position_ids` as given, RMSNorm variance and attention softmax in f32 even in
//! an fp16 export. Weights go inline, or to `model.onnx_data` when the model is over
//! 2 GB (protobuf's limit).

use std::io::Write;
use std::path::Path;

use prost::Message;
use tch::{Kind, Tensor};

use super::build::{Dim, IR_VERSION, OPSET, attr_int, node, value_info};
use super::proto::{
    AttributeProto, GraphProto, ModelProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
    attribute_type, data_location, data_type,
};
use crate::checkpoint::{self, CheckpointError};
use crate::qwen2::Config;

pub const MODEL_FILE: &str = "model.onnx";
pub const EXTERNAL_DATA_FILE: &str = "model.onnx_data";
/// Files copied next to the graph so the directory is servable as is.
const SERVED_FILES: [&str; 4] =
    ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"];
/// Protobuf cannot hold a message over 2 GiB; leave headroom for the graph itself.
const INLINE_LIMIT: usize = (2 << 30) - (64 << 20);

/// Weight precision of the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ExportDtype {
    #[default]
    Fp32,
    /// Weights, activations and the KV cache in fp16; RMSNorm variance, attention
    /// scores/softmax and the logits in f32.
    Fp16,
}

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Logits {
    /// Every position, `[batch, seq, vocab]`: Hugging Face Optimum's layout.
    #[default]
    All,
    /// The last position only, `[batch, 1, vocab]`: all that generation needs. Prefill
    /// then skips the LM head (and its large output) for every prompt token but one.
    Last,
}

/// How the graph takes and returns the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KvLayout {
    /// `past_key_values.*` in, `present.*` = past + new out (Hugging Face Optimum's
    /// layout; any ONNX runtime can serve it).
    #[default]
    Optimum,
    /// Fixed-capacity buffers updated in place through ONNX Runtime's
    /// `GroupQueryAttention`: no per-step copy of the cache.
    Shared,
}

/// How to export.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExportOptions {
    pub dtype: ExportDtype,
    pub logits: Logits,
    pub kv_layout: KvLayout,
    /// Write the weights to `model.onnx_data` even for small models (tests use it).
    pub force_external: bool,
}

impl ExportOptions {
    /// What alignx-consumer serves fastest (and only it serves): the in-place cache
    /// layout, logits for the last position. The recipe and the model store export so.
    pub fn for_consumer() -> Self {
        Self { logits: Logits::Last, kv_layout: KvLayout::Shared, ..Default::default() }
    }
}

impl ExportDtype {
    fn onnx(self) -> i32 {
        match self {
            ExportDtype::Fp32 => data_type::FLOAT,
            ExportDtype::Fp16 => data_type::FLOAT16,
        }
    }
    fn kind(self) -> Kind {
        match self {
            ExportDtype::Fp32 => Kind::Float,
            ExportDtype::Fp16 => Kind::Half,
        }
    }
}

/// Builds a graph: fresh value names, nodes, initialisers.
struct Graph {
    nodes: Vec<super::proto::NodeProto>,
    inits: Vec<TensorProto>,
    next: usize,
    dtype: ExportDtype,
}

impl Graph {
    fn fresh(&mut self, hint: &str) -> String {
        self.next += 1;
        format!("{hint}_{}", self.next)
    }

    /// Adds a node with one output and returns the output's name.
    fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = self.fresh(&op.to_lowercase());
        let name = format!("/{op}_{}", self.next);
        self.nodes.push(node(op, &name, inputs, &[&out], attrs));
        out
    }

    /// A node whose output gets a given name (graph outputs).
    fn op_named(&mut self, op: &str, inputs: &[&str], out: &str, attrs: Vec<AttributeProto>) {
        let name = format!("/{op}_{out}");
        self.nodes.push(node(op, &name, inputs, &[out], attrs));
    }

    fn init(&mut self, name: &str, dims: &[i64], elem: i32, raw: Vec<u8>) -> String {
        self.inits.push(TensorProto {
            name: name.to_owned(),
            dims: dims.to_vec(),
            data_type: elem,
            raw_data: raw,
            ..Default::default()
        });
        name.to_owned()
    }

    fn i64s(&mut self, values: &[i64]) -> String {
        let name = self.fresh("const_i64");
        self.init(
            &name,
            &[values.len() as i64],
            data_type::INT64,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    fn f32_scalar(&mut self, v: f32) -> String {
        let name = self.fresh("const_f32");
        self.init(&name, &[], data_type::FLOAT, v.to_le_bytes().to_vec())
    }

    /// A weight in the export dtype; `transpose` stores `Wᵀ` for `x · Wᵀ` as a MatMul.
    fn weight(&mut self, name: &str, t: &Tensor, transpose: bool) -> String {
        let t = if transpose { t.transpose(0, 1) } else { t.shallow_clone() };
        let t = t.to_kind(self.dtype.kind()).to_device(tch::Device::Cpu).contiguous();
        let numel = t.numel();
        let mut raw = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.copy_data_u8(&mut raw, numel);
        let elem = self.dtype.onnx();
        self.init(name, &t.size(), elem, raw)
    }

    /// A constant table in the export dtype (not a model parameter).
    fn table(&mut self, name: &str, t: &Tensor) -> String {
        let name = self.fresh(name);
        self.weight(&name, t, false)
    }

    fn cast(&mut self, x: &str, to: i32) -> String {
        self.op("Cast", &[x], vec![attr_int("to", i64::from(to))])
    }

    fn matmul_bias(&mut self, x: &str, w: &str, b: Option<&str>) -> String {
        let y = self.op("MatMul", &[x, w], vec![]);
        match b {
            Some(b) => self.op("Add", &[&y, b], vec![]),
            None => y,
        }
    }

    /// RMSNorm with the variance (and normalisation) in f32, cast back to the model dtype.
    fn rms_norm(&mut self, x: &str, weight: &str, eps: f64) -> String {
        let x32 = if self.dtype == ExportDtype::Fp32 { x.to_owned() } else { self.cast(x, data_type::FLOAT) };
        let sq = self.op("Mul", &[&x32, &x32], vec![]);
        let mean = self.op("ReduceMean", &[&sq], vec![ints("axes", &[-1]), attr_int("keepdims", 1)]);
        let eps = self.f32_scalar(eps as f32);
        let var = self.op("Add", &[&mean, &eps], vec![]);
        let std = self.op("Sqrt", &[&var], vec![]);
        let normed = self.op("Div", &[&x32, &std], vec![]);
        let normed =
            if self.dtype == ExportDtype::Fp32 { normed } else { self.cast(&normed, self.dtype.onnx()) };
        self.op("Mul", &[&normed, weight], vec![])
    }
}

/// The `com.microsoft` operator domain of ONNX Runtime's contrib ops.
const MS_DOMAIN: &str = "com.microsoft";

/// One of the two attention layouts, with the values its layers share (one per export,
/// so the variants' sizes do not matter).
#[allow(clippy::large_enum_variant)]
enum Attention {
    Optimum(OptimumAttention),
    Shared(SharedAttention),
}

/// The Optimum layout's shared pieces: the additive mask and the RoPE tables from
/// `position_ids`.
struct OptimumAttention {
    rope: Rope,
    split_heads: String,
    split_kv: String,
    group_rows: String,
    merge_heads: String,
    merge_out: String,
    group_bias: String,
    scale: String,
}

impl OptimumAttention {
    fn new(g: &mut Graph, c: &Config) -> Self {
        let (heads, kv, d) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let (dtype, elem) = (g.dtype, g.dtype.onnx());
        // Additive mask [b, 1, s, t]: key j visible to query i iff j <= past + i and
        // attention_mask[b, j] != 0. Same construction as the tch model.
        let ids_shape = g.op("Shape", &["input_ids"], vec![]);
        let mask_shape = g.op("Shape", &["attention_mask"], vec![]);
        let one = g.i64s(&[1]);
        let two = g.i64s(&[2]);
        let s = g.op("Slice", &[&ids_shape, &one, &two], vec![]);
        let t = g.op("Slice", &[&mask_shape, &one, &two], vec![]);
        let s0 = g.op("Squeeze", &[&s], vec![]);
        let t0 = g.op("Squeeze", &[&t], vec![]);
        let zero_s = g.i64s(&[0]);
        let zero0 = g.op("Squeeze", &[&zero_s], vec![]);
        let one0 = g.op("Squeeze", &[&one], vec![]);
        let past = g.op("Sub", &[&t0, &s0], vec![]);
        let key_idx = g.op("Range", &[&zero0, &t0, &one0], vec![]);
        let q_idx = g.op("Range", &[&past, &t0, &one0], vec![]);
        let ax0 = g.i64s(&[0]);
        let ax1 = g.i64s(&[1]);
        let keys_row = g.op("Unsqueeze", &[&key_idx, &ax0], vec![]);
        let q_col = g.op("Unsqueeze", &[&q_idx, &ax1], vec![]);
        let causal = g.op("LessOrEqual", &[&keys_row, &q_col], vec![]);
        let zero_i = g.i64s(&[0]);
        let pad = g.op("Equal", &["attention_mask", &zero_i], vec![]);
        let visible = g.op("Not", &[&pad], vec![]);
        let ax12 = g.i64s(&[1, 2]);
        let visible = g.op("Unsqueeze", &[&visible, &ax12], vec![]);
        let allowed = g.op("And", &[&causal, &visible], vec![]);
        let zero_f = g.f32_scalar(0.0);
        let neg = g.f32_scalar(-1e30);
        let bias = g.op("Where", &[&allowed, &zero_f, &neg], vec![]);

        // RoPE: freqs = position_ids × inv_freq, emb = [freqs, freqs], cos/sin [b, 1, s, d].
        let inv: Vec<f32> =
            (0..d / 2).map(|i| (1.0 / c.rope_theta().powf(2.0 * i as f64 / d as f64)) as f32).collect();
        let inv_freq = g.fresh("inv_freq");
        let inv_freq =
            g.init(&inv_freq, &[d / 2], data_type::FLOAT, inv.iter().flat_map(|v| v.to_le_bytes()).collect());
        let pos = g.cast("position_ids", data_type::FLOAT);
        let ax2 = g.i64s(&[2]);
        let pos = g.op("Unsqueeze", &[&pos, &ax2], vec![]);
        let freqs = g.op("Mul", &[&pos, &inv_freq], vec![]);
        let emb = g.op("Concat", &[&freqs, &freqs], vec![attr_int("axis", -1)]);
        let emb = g.op("Unsqueeze", &[&emb, &ax1], vec![]);
        let cos = g.op("Cos", &[&emb], vec![]);
        let sin = g.op("Sin", &[&emb], vec![]);
        let (cos, sin) =
            if dtype == ExportDtype::Fp32 { (cos, sin) } else { (g.cast(&cos, elem), g.cast(&sin, elem)) };
        let rope = Rope {
            cos,
            sin,
            half: g.i64s(&[d / 2]),
            full: g.i64s(&[d]),
            zero: g.i64s(&[0]),
            axis: g.i64s(&[3]),
        };
        let split_heads = g.i64s(&[0, 0, heads, d]);
        let split_kv = g.i64s(&[0, 0, kv, d]);
        let group_rows = g.i64s(&[0, kv, -1, d]);
        let merge_heads = g.i64s(&[0, heads, -1, d]);
        // The mask once per forward, repeated for the query heads sharing a key/value head.
        let tiles = g.i64s(&[1, 1, heads / kv, 1]);
        let group_bias = g.op("Tile", &[&bias, &tiles], vec![]);
        Self {
            rope,
            split_heads,
            split_kv,
            group_rows,
            merge_heads,
            merge_out: g.i64s(&[0, 0, heads * d]),
            group_bias,
            scale: g.f32_scalar(1.0 / (d as f32).sqrt()),
        }
    }

    /// Attention of layer `i` on projected `q [b, s, heads·d]`, `k`/`val [b, s, kv·d]`:
    /// concatenates the past, writes the presents, returns `[b, s, heads·d]`.
    fn layer(&self, g: &mut Graph, i: i64, q: &str, k: &str, val: &str) -> String {
        let (dtype, elem) = (g.dtype, g.dtype.onnx());
        let Self { rope, split_heads, split_kv, group_rows, merge_heads, merge_out, group_bias, scale } =
            self;
        let perm = || ints("perm", &[0, 2, 1, 3]);
        let q = g.op("Reshape", &[q, split_heads], vec![]);
        let q = g.op("Transpose", &[&q], vec![perm()]);
        let k = g.op("Reshape", &[k, split_kv], vec![]);
        let k = g.op("Transpose", &[&k], vec![perm()]);
        let val = g.op("Reshape", &[val, split_kv], vec![]);
        let val = g.op("Transpose", &[&val], vec![perm()]);
        let q = rope.apply(g, &q);
        let k = rope.apply(g, &k);
        let (pk, pv) = (format!("past_key_values.{i}.key"), format!("past_key_values.{i}.value"));
        let (ok, ov) = (format!("present.{i}.key"), format!("present.{i}.value"));
        g.op_named("Concat", &[&pk, &k], &ok, vec![attr_int("axis", 2)]);
        g.op_named("Concat", &[&pv, &val], &ov, vec![attr_int("axis", 2)]);
        // Grouped-query attention without copying the cache per query head: the
        // `group` query heads of each key/value head become extra query rows,
        // [b, heads, s, d] → [b, kv, group·s, d] (head h = kv_head·group + g, as
        // HF's repeat_kv orders them), and the mask is tiled to match. The cache is
        // then read in place by the MatMuls (ONNX Runtime fuses the transpose).
        let qg = g.op("Reshape", &[&q, group_rows], vec![]);
        let kt = g.op("Transpose", &[&ok], vec![ints("perm", &[0, 1, 3, 2])]);
        let (q32, kt32) = if dtype == ExportDtype::Fp32 {
            (qg, kt)
        } else {
            (g.cast(&qg, data_type::FLOAT), g.cast(&kt, data_type::FLOAT))
        };
        let scores = g.op("MatMul", &[&q32, &kt32], vec![]);
        let scores = g.op("Mul", &[&scores, scale], vec![]);
        let scores = g.op("Add", &[&scores, group_bias], vec![]);
        let probs = g.op("Softmax", &[&scores], vec![attr_int("axis", -1)]);
        let probs = if dtype == ExportDtype::Fp32 { probs } else { g.cast(&probs, elem) };
        let attn = g.op("MatMul", &[&probs, &ov], vec![]);
        let attn = g.op("Reshape", &[&attn, merge_heads], vec![]);
        let attn = g.op("Transpose", &[&attn], vec![perm()]);
        g.op("Reshape", &[&attn, merge_out], vec![])
    }
}

/// The shared layout's pieces: RoPE tables for `GroupQueryAttention`, which rotates `q`
/// and `k` itself at the positions it derives from `seqlens_k`.
struct SharedAttention {
    cos: String,
    sin: String,
    heads: i64,
    kv_heads: i64,
}

impl SharedAttention {
    fn new(g: &mut Graph, c: &Config) -> Self {
        let d = c.head_dim();
        // The same values the tch model computes (f32 positions × inv_freq, then cos/sin),
        // for every position the model takes; GQA wants the first half ([freqs, freqs]).
        let exponents = Tensor::arange_start_step(0, d, 2, (Kind::Float, tch::Device::Cpu)) / d as f64;
        let inv_freq = Tensor::from(c.rope_theta()).pow(&exponents).reciprocal();
        let positions = Tensor::arange(c.max_position_embeddings, (Kind::Float, tch::Device::Cpu));
        let freqs = positions.unsqueeze(-1) * inv_freq.view([1, -1]);
        let cos = g.table("rope_cos_cache", &freqs.cos());
        let sin = g.table("rope_sin_cache", &freqs.sin());
        Self { cos, sin, heads: c.num_attention_heads, kv_heads: c.kv_heads() }
    }

    /// Attention of layer `i`: one `GroupQueryAttention` node that reads and updates the
    /// layer's cache buffers in place (when the caller binds each present to its past).
    fn layer(&self, g: &mut Graph, i: i64, q: &str, k: &str, val: &str) -> String {
        let (pk, pv) = (format!("past_key_values.{i}.key"), format!("past_key_values.{i}.value"));
        let (ok, ov) = (format!("present.{i}.key"), format!("present.{i}.value"));
        let out = g.fresh("gqa");
        let mut n = node(
            "GroupQueryAttention",
            &format!("/GroupQueryAttention_{i}"),
            &[q, k, val, &pk, &pv, "seqlens_k", "total_sequence_length", &self.cos, &self.sin],
            &[&out, &ok, &ov],
            vec![
                attr_int("num_heads", self.heads),
                attr_int("kv_num_heads", self.kv_heads),
                attr_int("do_rotary", 1),
                attr_int("rotary_interleaved", 0),
            ],
        );
        n.domain = MS_DOMAIN.into();
        g.nodes.push(n);
        out
    }

    /// Each row's last real position of `x [b, s, hidden]`, as `[b, 1, hidden]`: prompts
    /// are right-padded, so a row's last token sits at `seqlens_k` during prefill (and
    /// at 0 during decode, where `seqlens_k` counts the cache and `s` is 1).
    fn last_positions(&self, g: &mut Graph, x: &str, hidden: i64) -> String {
        let seqlens = g.cast("seqlens_k", data_type::INT64);
        let shape = g.op("Shape", &[x], vec![]);
        let (one, two) = (g.i64s(&[1]), g.i64s(&[2]));
        let s = g.op("Slice", &[&shape, &one, &two], vec![]);
        let last = g.op("Sub", &[&s, &one], vec![]);
        let idx = g.op("Min", &[&seqlens, &last], vec![]);
        let idx_shape = g.i64s(&[-1, 1, 1]);
        let idx = g.op("Reshape", &[&idx, &idx_shape], vec![]);
        let (zero, width) = (g.i64s(&[0]), g.i64s(&[hidden]));
        let batch = g.op("Slice", &[&shape, &zero, &one], vec![]);
        let wide = g.op("Concat", &[&batch, &one, &width], vec![attr_int("axis", 0)]);
        let idx = g.op("Expand", &[&idx, &wide], vec![]);
        g.op("GatherElements", &[x, &idx], vec![attr_int("axis", 1)])
    }
}

/// Value names of the RoPE tables and the slicing constants `rotate_half` needs.
struct Rope {
    cos: String,
    sin: String,
    half: String,
    full: String,
    zero: String,
    axis: String,
}

impl Rope {
    /// `x * cos + rotate_half(x) * sin`, `x: [b, heads, s, d]`.
    fn apply(&self, g: &mut Graph, x: &str) -> String {
        let x1 = g.op("Slice", &[x, &self.zero, &self.half, &self.axis], vec![]);
        let x2 = g.op("Slice", &[x, &self.half, &self.full, &self.axis], vec![]);
        let neg = g.op("Neg", &[&x2], vec![]);
        let rotated = g.op("Concat", &[&neg, &x1], vec![attr_int("axis", -1)]);
        let a = g.op("Mul", &[x, &self.cos], vec![]);
        let b = g.op("Mul", &[&rotated, &self.sin], vec![]);
        g.op("Add", &[&a, &b], vec![])
    }
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.to_owned(),
        ints: v.to_vec(),
        r#type: attribute_type::INTS,
        ..Default::default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Config(#[from] crate::qwen2::ConfigError),
    #[error(
        "--kv-cache shared needs a head dimension that is a multiple of 16 (GroupQueryAttention's rotary \
         embedding), this model has {0}; export with --kv-cache optimum"
    )]
    HeadDim(i64),
}

/// Builds the model protobuf from the parameters of a loaded model (`vs` variables by
/// HF name).
fn build(
    vars: &std::collections::HashMap<String, Tensor>,
    c: &Config,
    dtype: ExportDtype,
    scope: Logits,
    layout: KvLayout,
) -> ModelProto {
    let mut g = Graph { nodes: Vec::new(), inits: Vec::new(), next: 0, dtype };
    let (kv, d) = (c.kv_heads(), c.head_dim());
    let elem = dtype.onnx();
    let v =
        |n: &str| vars.get(n).unwrap_or_else(|| panic!("parameter {n} of a loaded model")).shallow_clone();

    // Shared pieces: embeddings, mask, RoPE tables.
    let embed = g.weight("model.embed_tokens.weight", &v("model.embed_tokens.weight"), false);
    let mut x = g.op("Gather", &[&embed, "input_ids"], vec![attr_int("axis", 0)]);

    let attention = match layout {
        KvLayout::Optimum => Attention::Optimum(OptimumAttention::new(&mut g, c)),
        KvLayout::Shared => Attention::Shared(SharedAttention::new(&mut g, c)),
    };

    for i in 0..c.num_hidden_layers {
        let p = |n: &str| format!("model.layers.{i}.{n}");
        let ln1 = g.weight(&p("input_layernorm.weight"), &v(&p("input_layernorm.weight")), false);
        let normed = g.rms_norm(&x, &ln1, c.rms_norm_eps);
        let proj = |g: &mut Graph, name: &str, bias: bool| {
            let w = g.weight(
                &p(&format!("self_attn.{name}.weight")),
                &v(&p(&format!("self_attn.{name}.weight"))),
                true,
            );
            let b = bias.then(|| {
                g.weight(
                    &p(&format!("self_attn.{name}.bias")),
                    &v(&p(&format!("self_attn.{name}.bias"))),
                    false,
                )
            });
            g.matmul_bias(&normed, &w, b.as_deref())
        };
        let (q, k, val) =
            (proj(&mut g, "q_proj", true), proj(&mut g, "k_proj", true), proj(&mut g, "v_proj", true));
        let attn = match &attention {
            Attention::Optimum(a) => a.layer(&mut g, i, &q, &k, &val),
            Attention::Shared(a) => a.layer(&mut g, i, &q, &k, &val),
        };
        let wo = g.weight(&p("self_attn.o_proj.weight"), &v(&p("self_attn.o_proj.weight")), true);
        let attn = g.matmul_bias(&attn, &wo, None);
        let h1 = g.op("Add", &[&x, &attn], vec![]);

        let ln2 =
            g.weight(&p("post_attention_layernorm.weight"), &v(&p("post_attention_layernorm.weight")), false);
        let normed = g.rms_norm(&h1, &ln2, c.rms_norm_eps);
        let mlp = |g: &mut Graph, name: &str, input: &str| {
            let w = g.weight(&p(&format!("mlp.{name}.weight")), &v(&p(&format!("mlp.{name}.weight"))), true);
            g.matmul_bias(input, &w, None)
        };
        let gate = mlp(&mut g, "gate_proj", &normed);
        let up = mlp(&mut g, "up_proj", &normed);
        let sig = g.op("Sigmoid", &[&gate], vec![]);
        let act = g.op("Mul", &[&gate, &sig], vec![]);
        let act = g.op("Mul", &[&act, &up], vec![]);
        let down = mlp(&mut g, "down_proj", &act);
        x = g.op("Add", &[&h1, &down], vec![]);
    }
    if scope == Logits::Last {
        x = match &attention {
            Attention::Optimum(_) => {
                let (start, end, axis) = (g.i64s(&[-1]), g.i64s(&[i64::MAX]), g.i64s(&[1]));
                g.op("Slice", &[&x, &start, &end, &axis], vec![])
            }
            Attention::Shared(a) => a.last_positions(&mut g, &x, c.hidden_size),
        };
    }
    let norm = g.weight("model.norm.weight", &v("model.norm.weight"), false);
    let x = g.rms_norm(&x, &norm, c.rms_norm_eps);
    // Tied heads reuse the embedding matrix through a Transpose node rather than a
    // second copy in the file.
    let head = match vars.get("lm_head.weight") {
        Some(w) => g.weight("lm_head.weight", w, true),
        None => g.op("Transpose", &[&embed], vec![ints("perm", &[1, 0])]),
    };
    let logits = g.op("MatMul", &[&x, &head], vec![]);
    g.op_named("Cast", &[&logits], "logits", vec![attr_int("to", i64::from(data_type::FLOAT))]);

    let (b, sq, pl, tl) = (
        Dim::Named("batch_size"),
        Dim::Named("sequence_length"),
        Dim::Named("past_sequence_length"),
        Dim::Named("total_sequence_length"),
    );
    let mut inputs = vec![value_info("input_ids", data_type::INT64, &[b.clone(), sq.clone()])];
    match layout {
        KvLayout::Optimum => {
            inputs.push(value_info("attention_mask", data_type::INT64, &[b.clone(), tl.clone()]));
            inputs.push(value_info("position_ids", data_type::INT64, &[b.clone(), sq.clone()]));
        }
        KvLayout::Shared => {
            inputs.push(value_info("seqlens_k", data_type::INT32, std::slice::from_ref(&b)));
            inputs.push(value_info("total_sequence_length", data_type::INT32, &[]));
        }
    }
    // The shared layout's cache is one buffer in and out: the same capacity both ways.
    let (pl, tl) = match layout {
        KvLayout::Optimum => (pl, tl),
        KvLayout::Shared => (Dim::Named("cache_capacity"), Dim::Named("cache_capacity")),
    };
    let positions = match scope {
        Logits::All => sq.clone(),
        Logits::Last => Dim::Fixed(1),
    };
    let mut outputs =
        vec![value_info("logits", data_type::FLOAT, &[b.clone(), positions, Dim::Fixed(c.vocab_size)])];
    for i in 0..c.num_hidden_layers {
        for kind in ["key", "value"] {
            let dims_in = [b.clone(), Dim::Fixed(kv), pl.clone(), Dim::Fixed(d)];
            let dims_out = [b.clone(), Dim::Fixed(kv), tl.clone(), Dim::Fixed(d)];
            inputs.push(value_info(&format!("past_key_values.{i}.{kind}"), elem, &dims_in));
            outputs.push(value_info(&format!("present.{i}.{kind}"), elem, &dims_out));
        }
    }
    let graph = GraphProto {
        name: "alignx_qwen2".into(),
        node: g.nodes,
        initializer: g.inits,
        input: inputs,
        output: outputs,
        ..Default::default()
    };
    ModelProto {
        ir_version: IR_VERSION,
        producer_name: "alignx-trainer".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        opset_import: match layout {
            KvLayout::Optimum => vec![OperatorSetIdProto { domain: String::new(), version: OPSET }],
            KvLayout::Shared => vec![
                OperatorSetIdProto { domain: String::new(), version: OPSET },
                OperatorSetIdProto { domain: MS_DOMAIN.into(), version: 1 },
            ],
        },
        ..Default::default()
    }
}

/// Moves initialisers over 1 KiB into `data` (the external data file), leaving references.
fn externalise(model: &mut ModelProto, data: &mut Vec<u8>) {
    let graph = model.graph.as_mut().expect("built with a graph");
    for t in graph.initializer.iter_mut().filter(|t| t.raw_data.len() > 1024) {
        // Offsets aligned to 4 KiB, as the ONNX tools write them (allows mmap).
        data.resize(data.len().div_ceil(4096) * 4096, 0);
        let offset = data.len();
        data.extend_from_slice(&t.raw_data);
        let entry = |k: &str, v: String| StringStringEntryProto { key: k.into(), value: v };
        t.external_data = vec![
            entry("location", EXTERNAL_DATA_FILE.into()),
            entry("offset", offset.to_string()),
            entry("length", t.raw_data.len().to_string()),
        ];
        t.data_location = data_location::EXTERNAL;
        t.raw_data = Vec::new();
    }
}

/// Exports the model directory `model` to `out` (atomically).
pub fn export(model: &Path, out: &Path, options: &ExportOptions) -> Result<ExportReport, ExportError> {
    let ExportOptions { dtype, logits, kv_layout, force_external } = *options;
    // Config and weights only: a checkpoint without a tokenizer still exports (the
    // report lists what the directory lacks to be servable).
    let config = Config::from_file(&model.join(checkpoint::CONFIG_FILE))?;
    if kv_layout == KvLayout::Shared && config.head_dim() % 16 != 0 {
        return Err(ExportError::HeadDim(config.head_dim()));
    }
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _model = crate::qwen2::Qwen2::new(&vs.root(), &config);
    checkpoint::load(&vs, model)?;
    let mut proto = build(&vs.variables(), &config, dtype, logits, kv_layout);
    let weight_bytes: usize =
        proto.graph.as_ref().map_or(0, |g| g.initializer.iter().map(|t| t.raw_data.len()).sum());
    let external = force_external || weight_bytes > INLINE_LIMIT;
    let missing = checkpoint::write_dir_atomically(out, |tmp| {
        if external {
            let mut data = Vec::new();
            externalise(&mut proto, &mut data);
            let path = tmp.join(EXTERNAL_DATA_FILE);
            std::fs::File::create(&path)
                .and_then(|mut f| f.write_all(&data))
                .map_err(|e| checkpoint::io_error(&path, e))?;
        }
        let path = tmp.join(MODEL_FILE);
        std::fs::write(&path, proto.encode_to_vec()).map_err(|e| checkpoint::io_error(&path, e))?;
        let mut missing = Vec::new();
        for name in SERVED_FILES {
            let from = model.join(name);
            if from.is_file() {
                std::fs::copy(&from, tmp.join(name)).map_err(|e| checkpoint::io_error(&from, e))?;
            } else {
                missing.push(name);
            }
        }
        Ok(missing)
    })?;
    Ok(ExportReport { weight_bytes, external, nodes: proto.graph.map_or(0, |g| g.node.len()), missing })
}

/// What an export wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    pub weight_bytes: usize,
    pub external: bool,
    pub nodes: usize,
    /// Files the source directory did not have (the export cannot be served without
    /// `tokenizer.json`).
    pub missing: Vec<&'static str>,
}
