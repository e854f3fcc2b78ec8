//! A model directory (DESIGN.md §4) served with ONNX Runtime: the graph's inputs and
//! outputs are discovered from the file, not assumed, and batched generation runs
//! prefill then decode with the KV cache fed back.
//!
//! The present key/values a step returns are moved, as ONNX Runtime values, into the next
//! step's past inputs: no copy while the batch is unchanged. When rows finish they leave
//! the batch, and only then is the cache copied (the remaining rows selected).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use half::f16;
use ort::session::Session;
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};
use serde::Deserialize;

use crate::onnx_runtime::OrtRuntime;
use crate::sampler::{Rng, SamplingParams, penalise, sample};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model directory {dir}: {what} is missing")]
    Missing { dir: PathBuf, what: String },
    #[error("model directory {dir}: {file}: {message}")]
    BadFile { dir: PathBuf, file: &'static str, message: String },
    #[error("model graph {path}: {message}")]
    Graph { path: PathBuf, message: String },
    #[error("ONNX Runtime: {0}")]
    Ort(String),
    #[error("the CUDA execution provider is not available: {0}")]
    NoCuda(String),
}

impl<T> From<ort::Error<T>> for ModelError {
    fn from(e: ort::Error<T>) -> Self {
        ModelError::Ort(e.to_string())
    }
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when it can be used, else CPU (with one warning).
    Auto,
    Cpu,
    /// CUDA or an error.
    Cuda,
}

/// The fields of `config.json` the server needs.
#[derive(Debug, Clone, Deserialize)]
struct ConfigJson {
    max_position_embeddings: Option<usize>,
    eos_token_id: Option<OneOrMany>,
}

/// `generation_config.json`: EOS ids (one or several) and sampling defaults.
#[derive(Debug, Clone, Default, Deserialize)]
struct GenerationConfigJson {
    eos_token_id: Option<OneOrMany>,
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    repetition_penalty: Option<f32>,
    do_sample: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<u32> {
        match self {
            OneOrMany::One(x) => vec![x],
            OneOrMany::Many(v) => v,
        }
    }
}

/// Precision of the KV cache (the graph's past inputs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KvType {
    F32,
    F16,
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Eos,
    Stop,
    Length,
}

/// One prompt's continuation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub tokens: Vec<u32>,
    pub finish: Finish,
}

/// Time spent in one `generate` call, by phase.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub prefill_s: f64,
    pub decode_s: f64,
    pub sampling_s: f64,
}

/// A loaded model graph with what generation needs to know about it.
pub struct OnnxModel {
    session: Mutex<Session>,
    path: PathBuf,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    kv: KvType,
    pub provider: &'static str,
    /// Longest sequence (prompt + generation) the model takes, when known.
    pub max_positions: Option<usize>,
    pub eos: Vec<u32>,
    /// Sampling defaults from `generation_config.json`.
    pub defaults: SamplingParams,
}

fn read_json<T: serde::de::DeserializeOwned>(
    dir: &Path,
    file: &'static str,
) -> Result<Option<T>, ModelError> {
    let path = dir.join(file);
    if !path.exists() {
        return Ok(None);
    }
    let bad = |message: String| ModelError::BadFile { dir: dir.to_owned(), file, message };
    let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
    serde_json::from_str(&text).map(Some).map_err(|e| bad(e.to_string()))
}

fn tensor_type(vt: &ValueType) -> Option<(TensorElementType, Vec<i64>)> {
    match vt {
        ValueType::Tensor { ty, shape, .. } => Some((*ty, shape.iter().copied().collect())),
        _ => None,
    }
}

impl OnnxModel {
    /// Loads `model.onnx` of a model directory and checks it has the Optimum
    /// decoder-with-past interface.
    pub fn load(
        runtime: &OrtRuntime,
        dir: &Path,
        device: DeviceChoice,
        threads: usize,
    ) -> Result<Self, ModelError> {
        let path = dir.join("model.onnx");
        if !path.exists() {
            return Err(ModelError::Missing { dir: dir.to_owned(), what: "model.onnx".into() });
        }
        let config: ConfigJson = read_json(dir, "config.json")?
            .ok_or_else(|| ModelError::Missing { dir: dir.to_owned(), what: "config.json".into() })?;
        let generation: GenerationConfigJson = read_json(dir, "generation_config.json")?.unwrap_or_default();
        let eos = generation
            .eos_token_id
            .clone()
            .or(config.eos_token_id.clone())
            .map(OneOrMany::into_vec)
            .unwrap_or_default();
        let sampled = generation.do_sample.unwrap_or(false);
        let defaults = SamplingParams {
            temperature: if sampled { generation.temperature.unwrap_or(1.0) } else { 0.0 },
            top_k: if sampled { generation.top_k.unwrap_or(0) } else { 0 },
            top_p: if sampled { generation.top_p.unwrap_or(1.0) } else { 1.0 },
            repetition_penalty: generation.repetition_penalty.unwrap_or(1.0),
            ..SamplingParams::default()
        };

        let (session, provider) = Self::session(runtime, &path, device, threads)?;
        let graph = |message: String| ModelError::Graph { path: path.clone(), message };
        let inputs: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
        for want in ["input_ids", "attention_mask", "position_ids"] {
            if !inputs.contains(&want) {
                return Err(graph(format!("no `{want}` input (inputs: {})", inputs.join(", "))));
            }
        }
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        if !outputs.contains(&"logits") {
            return Err(graph(format!("no `logits` output (outputs: {})", outputs.join(", "))));
        }
        let layers =
            (0..).take_while(|i| inputs.contains(&format!("past_key_values.{i}.key").as_str())).count();
        if layers == 0 {
            return Err(graph("no `past_key_values.0.key` input: export with past key values".into()));
        }
        let past = session
            .inputs()
            .iter()
            .find(|o| o.name() == "past_key_values.0.key")
            .and_then(|o| tensor_type(o.dtype()))
            .ok_or_else(|| graph("past_key_values.0.key is not a tensor".into()))?;
        let kv = match past.0 {
            TensorElementType::Float32 => KvType::F32,
            TensorElementType::Float16 => KvType::F16,
            other => return Err(graph(format!("past key/values of type {other:?}; f32 or f16 expected"))),
        };
        let (kv_heads, head_dim) = match past.1.as_slice() {
            [_, h, _, d] if *h > 0 && *d > 0 => (*h as usize, *d as usize),
            other => {
                return Err(graph(format!(
                    "past key shape {other:?}; [batch, kv_heads, past, head_dim] expected"
                )));
            }
        };
        for i in 0..layers {
            for name in [format!("present.{i}.key"), format!("present.{i}.value")] {
                if !outputs.contains(&name.as_str()) {
                    return Err(graph(format!("no `{name}` output")));
                }
            }
        }
        Ok(Self {
            session: Mutex::new(session),
            path,
            layers,
            kv_heads,
            head_dim,
            kv,
            provider,
            max_positions: config.max_position_embeddings,
            eos,
            defaults,
        })
    }

    fn session(
        runtime: &OrtRuntime,
        path: &Path,
        device: DeviceChoice,
        threads: usize,
    ) -> Result<(Session, &'static str), ModelError> {
        let cpu = || -> Result<Session, ModelError> {
            let mut b = runtime.session_builder()?;
            if threads > 0 {
                b = b.with_intra_threads(threads)?;
            }
            Ok(b.commit_from_file(path)?)
        };
        if device == DeviceChoice::Cpu {
            return Ok((cpu()?, "cpu"));
        }
        let cuda = || -> Result<Session, ModelError> {
            let ep = ort::ep::CUDA::default().build().error_on_failure();
            let mut b = runtime
                .session_builder()?
                .with_execution_providers([ep])
                .map_err(|e| ModelError::NoCuda(e.to_string()))?;
            Ok(b.commit_from_file(path)?)
        };
        match (cuda(), device) {
            (Ok(s), _) => Ok((s, "cuda")),
            (Err(e), DeviceChoice::Cuda) => Err(ModelError::NoCuda(e.to_string())),
            (Err(e), _) => {
                tracing::warn!(error = %e, "CUDA execution provider unavailable; running on CPU");
                Ok((cpu()?, "cpu"))
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn empty_past(&self, rows: usize) -> Result<DynValue, ModelError> {
        let shape = vec![rows as i64, self.kv_heads as i64, 0, self.head_dim as i64];
        Ok(match self.kv {
            KvType::F32 => Tensor::from_array((shape, Vec::<f32>::new()))?.into_dyn(),
            KvType::F16 => Tensor::from_array((shape, Vec::<f16>::new()))?.into_dyn(),
        })
    }

    /// Keeps rows `keep` (in order) of a `[rows, …]` cache tensor.
    fn select_rows(&self, value: &DynValue, keep: &[usize]) -> Result<DynValue, ModelError> {
        fn pick<T: Copy + ort::value::PrimitiveTensorElementType + std::fmt::Debug + 'static>(
            value: &DynValue,
            keep: &[usize],
        ) -> Result<DynValue, ModelError> {
            let (shape, data) = value.try_extract_tensor::<T>()?;
            let per_row = data.len() / (shape[0].max(1) as usize);
            let mut out = Vec::with_capacity(per_row * keep.len());
            for &r in keep {
                out.extend_from_slice(&data[r * per_row..(r + 1) * per_row]);
            }
            let mut dims: Vec<i64> = shape.iter().copied().collect();
            dims[0] = keep.len() as i64;
            Ok(Tensor::from_array((dims, out))?.into_dyn())
        }
        match self.kv {
            KvType::F32 => pick::<f32>(value, keep),
            KvType::F16 => pick::<f16>(value, keep),
        }
    }

    /// Continues every prompt. `params[i]` and `seeds[i]` belong to prompt `i`;
    /// `stop(i, tokens)` is asked after each new token of prompt `i`.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        params: &[SamplingParams],
        seeds: &[u64],
        mut stop: impl FnMut(usize, &[u32]) -> bool,
    ) -> Result<(Vec<Output>, Timings), ModelError> {
        let n = prompts.len();
        let mut timings = Timings::default();
        let mut out: Vec<Output> = vec![Output { tokens: Vec::new(), finish: Finish::Length }; n];
        if n == 0 {
            return Ok((out, timings));
        }
        let mut rngs: Vec<Rng> = seeds.iter().map(|&s| Rng::new(s)).collect();
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0).max(1);
        // Left padding: every row's last real token is in the last column.
        let mut ids = vec![0i64; n * width];
        let mut mask: Vec<Vec<i64>> = vec![vec![0; width]; n];
        let mut positions = vec![0i64; n * width];
        for (r, p) in prompts.iter().enumerate() {
            let start = width - p.len();
            for (j, &t) in p.iter().enumerate() {
                ids[r * width + start + j] = i64::from(t);
                mask[r][start + j] = 1;
                positions[r * width + start + j] = j as i64;
            }
        }
        let mut next_pos: Vec<i64> = prompts.iter().map(|p| p.len() as i64).collect();
        let mut past: Vec<DynValue> =
            (0..2 * self.layers).map(|_| self.empty_past(n)).collect::<Result<_, _>>()?;
        let mut active: Vec<usize> = (0..n).collect();
        let mut step_ids = ids;
        let mut step_pos = positions;
        let mut step_len = width;
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let m = active.len();
            let total = mask[active[0]].len();
            let flat_mask: Vec<i64> = active.iter().flat_map(|&r| mask[r].iter().copied()).collect();
            let mut inputs: Vec<(String, DynValue)> = vec![
                (
                    "input_ids".into(),
                    Tensor::from_array((vec![m as i64, step_len as i64], step_ids))?.into_dyn(),
                ),
                (
                    "attention_mask".into(),
                    Tensor::from_array((vec![m as i64, total as i64], flat_mask))?.into_dyn(),
                ),
                (
                    "position_ids".into(),
                    Tensor::from_array((vec![m as i64, step_len as i64], step_pos))?.into_dyn(),
                ),
            ];
            for (i, value) in past.drain(..).enumerate() {
                let kind = if i % 2 == 0 { "key" } else { "value" };
                inputs.push((format!("past_key_values.{}.{kind}", i / 2), value));
            }
            let started = std::time::Instant::now();
            let mut outputs = session.run(inputs)?;
            let elapsed = started.elapsed().as_secs_f64();
            if step_len > 1 || total == step_len {
                timings.prefill_s += elapsed;
            } else {
                timings.decode_s += elapsed;
            }
            for i in 0..self.layers {
                for kind in ["key", "value"] {
                    let name = format!("present.{i}.{kind}");
                    past.push(
                        outputs.remove(&name).ok_or_else(|| ModelError::Ort(format!("no {name} output")))?,
                    );
                }
            }
            let sampling = std::time::Instant::now();
            let (shape, logits) = outputs["logits"].try_extract_tensor::<f32>()?;
            let (seq, vocab) = (shape[1] as usize, shape[2] as usize);
            let mut keep = Vec::with_capacity(m);
            let mut next = Vec::with_capacity(m);
            for (slot, &r) in active.iter().enumerate() {
                let start = (slot * seq + seq - 1) * vocab;
                let mut row = logits[start..start + vocab].to_vec();
                let p = &params[r];
                if p.repetition_penalty != 1.0 {
                    penalise(&mut row, &prompts[r], p.repetition_penalty);
                    penalise(&mut row, &out[r].tokens, p.repetition_penalty);
                }
                let token = sample(&row, p, &mut rngs[r]);
                let o = &mut out[r];
                o.tokens.push(token);
                let finish = if self.eos.contains(&token) {
                    Some(Finish::Eos)
                } else if stop(r, &o.tokens) {
                    Some(Finish::Stop)
                } else if o.tokens.len() >= p.max_new_tokens {
                    Some(Finish::Length)
                } else {
                    None
                };
                match finish {
                    Some(f) => o.finish = f,
                    None => {
                        keep.push(slot);
                        next.push(i64::from(token));
                    }
                }
            }
            drop(outputs);
            timings.sampling_s += sampling.elapsed().as_secs_f64();
            if keep.is_empty() {
                return Ok((out, timings));
            }
            if keep.len() < m {
                past = past.iter().map(|v| self.select_rows(v, &keep)).collect::<Result<_, _>>()?;
                active = keep.iter().map(|&s| active[s]).collect();
            }
            for &r in &active {
                mask[r].push(1);
            }
            step_pos = active.iter().map(|&r| next_pos[r]).collect();
            for &r in &active {
                next_pos[r] += 1;
            }
            step_ids = next;
            step_len = 1;
        }
    }
}
