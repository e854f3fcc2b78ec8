//! A model directory (DESIGN.md §4) served with ONNX Runtime: the graph's inputs and
//! outputs are discovered from the file, not assumed, and batched generation runs
//! prefill then decode with the KV cache fed back.
//!
//! Two cache layouts, told apart by the graph's inputs:
//! - Hugging Face Optimum's (`attention_mask`, `position_ids`; each present is past + new):
//!   the presents a step returns are moved, as ONNX Runtime values, into the next step's
//!   past inputs. Prompts are left-padded.
//! - our `export-onnx --kv-cache shared` (`seqlens_k`, `total_sequence_length`): one
//!   fixed-capacity buffer per layer and kind, bound as both past and present, which
//!   ONNX Runtime's `GroupQueryAttention` updates in place — a decode step copies
//!   nothing. Prompts are right-padded and every row keeps its own length.
//!
//! In both, the cache is copied only when the batch changes shape: rows that finish
//! leave it (the remaining rows selected), new rows join it (stacked).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use half::f16;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{DynTensorValueType, DynValue, Tensor, TensorElementType, ValueType};
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

/// How the graph takes its KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `attention_mask` + `position_ids`; presents = past + new.
    Optimum,
    /// `seqlens_k` + `total_sequence_length`; presents are the pasts, updated in place.
    Shared,
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
    layout: Layout,
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

fn host_memory() -> Result<MemoryInfo<'static>, ModelError> {
    Ok(MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default)?)
}

/// A host copy of `value` when it lives in device memory (`None`: readable as it is).
/// Only batch re-layouts (rows leaving or joining) need this; steady decoding never does.
fn host_copy(value: &DynValue) -> Result<Option<DynValue>, ModelError> {
    let tensor = value.view().downcast::<DynTensorValueType>()?;
    if tensor.memory_info().is_cpu_accessible() {
        return Ok(None);
    }
    Ok(Some(tensor.to(AllocationDevice::CPU, 0)?.into()))
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
        let layout = if inputs.contains(&"seqlens_k") { Layout::Shared } else { Layout::Optimum };
        let wanted: &[&str] = match layout {
            Layout::Optimum => &["input_ids", "attention_mask", "position_ids"],
            Layout::Shared => &["input_ids", "seqlens_k", "total_sequence_length"],
        };
        for want in wanted {
            if !inputs.contains(want) {
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
        if layout == Layout::Shared && kv == KvType::F32 && provider == "cuda" {
            tracing::warn!(
                "GroupQueryAttention has no fp32 CUDA kernel: this fp32 shared-cache model runs its attention \
                 on the CPU; export with --dtype fp16 for GPUs"
            );
        }
        Ok(Self {
            session: Mutex::new(session),
            layout,
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
        // `ALIGNX_ORT_PROFILE=PREFIX`: ONNX Runtime writes a per-node timing profile
        // (Chrome trace JSON, PREFIX_<time>.json) when the session ends.
        let profiled = |b: ort::session::builder::SessionBuilder| -> Result<_, ModelError> {
            Ok(match std::env::var_os("ALIGNX_ORT_PROFILE") {
                Some(p) => b.with_profiling(p)?,
                None => b,
            })
        };
        let cpu = || -> Result<Session, ModelError> {
            let mut b = profiled(runtime.session_builder()?)?;
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
            let mut b = profiled(runtime.session_builder()?)?
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

    fn empty_past(&self, rows: usize) -> Result<DynValue, ModelError> {
        let shape = vec![rows as i64, self.kv_heads as i64, 0, self.head_dim as i64];
        Ok(match self.kv {
            KvType::F32 => Tensor::from_array((shape, Vec::<f32>::new()))?.into_dyn(),
            KvType::F16 => Tensor::from_array((shape, Vec::<f16>::new()))?.into_dyn(),
        })
    }

    /// Where the key/value cache lives between steps: the GPU on CUDA, else the host.
    fn kv_memory(&self) -> Result<MemoryInfo<'static>, ModelError> {
        if self.provider == "cuda" {
            Ok(MemoryInfo::new(AllocationDevice::CUDA, 0, AllocatorType::Device, MemoryType::Default)?)
        } else {
            host_memory()
        }
    }

    /// Keeps rows `keep` (in order) of every `[rows, …]` cache tensor.
    fn select_rows(
        &self,
        past: &[DynValue],
        keep: &[usize],
        capacity: usize,
    ) -> Result<Vec<DynValue>, ModelError> {
        fn pick<T: Copy + ort::value::PrimitiveTensorElementType + std::fmt::Debug + 'static>(
            model: &OnnxModel,
            value: &DynValue,
            keep: &[usize],
            capacity: usize,
        ) -> Result<DynValue, ModelError> {
            let copy = host_copy(value)?;
            let value = copy.as_ref().unwrap_or(value);
            let (shape, data) = value.try_extract_tensor::<T>()?;
            let per_row = data.len() / (shape[0].max(1) as usize);
            let mut out = Vec::with_capacity(per_row * keep.len());
            for &r in keep {
                out.extend_from_slice(&data[r * per_row..(r + 1) * per_row]);
            }
            let mut dims: Vec<i64> = shape.iter().copied().collect();
            dims[0] = keep.len() as i64;
            model.cache_value(dims, out, capacity)
        }
        past.iter()
            .map(|v| match self.kv {
                KvType::F32 => pick::<f32>(self, v, keep, capacity),
                KvType::F16 => pick::<f16>(self, v, keep, capacity),
            })
            .collect()
    }

    /// A cache tensor of shape `dims` holding `data` (host values) for the next step: a
    /// plain host tensor in the Optimum layout (ONNX Runtime moves it to the device); in
    /// the shared layout a buffer ONNX Runtime owns, in the cache's memory, since it will
    /// be bound as an output.
    fn cache_value<T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static>(
        &self,
        dims: Vec<i64>,
        data: Vec<T>,
        capacity: usize,
    ) -> Result<DynValue, ModelError> {
        if self.layout == Layout::Optimum {
            return Ok(Tensor::from_array((dims, data))?.into_dyn());
        }
        debug_assert_eq!(dims[2] as usize, capacity);
        let mut host = Tensor::<T>::new(&ort::memory::Allocator::default(), dims)?;
        host.extract_tensor_mut().1.copy_from_slice(&data);
        if self.provider == "cuda" {
            return Ok(host.to(AllocationDevice::CUDA, 0)?.into_dyn());
        }
        Ok(host.into_dyn())
    }

    /// Continues every prompt as one static batch. `params[i]` and `seeds[i]` belong to
    /// prompt `i`; `stop(i, tokens)` is asked after each new token of prompt `i`.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        params: &[SamplingParams],
        seeds: &[u64],
        mut stop: impl FnMut(usize, &[u32]) -> bool,
    ) -> Result<(Vec<Output>, Timings), ModelError> {
        let mut timings = Timings::default();
        let mut out: Vec<Option<Output>> = vec![None; prompts.len()];
        if prompts.is_empty() {
            return Ok((Vec::new(), timings));
        }
        let rows: Vec<Row> = prompts
            .iter()
            .zip(params)
            .zip(seeds)
            .enumerate()
            .map(|(i, ((p, params), &seed))| Row::new(i, p.clone(), *params, seed))
            .collect();
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let mut running = self.prefill(&mut session, rows, &mut timings)?;
        loop {
            for row in self.sample(&mut running, &mut |r: &Row| stop(r.id, &r.tokens), &mut timings)? {
                let id = row.id;
                out[id] = Some(row.into_output());
            }
            if running.rows.is_empty() {
                break;
            }
            self.decode(&mut session, &mut running, &mut timings)?;
        }
        Ok((out.into_iter().map(|o| o.expect("every row finishes")).collect(), timings))
    }

    /// Runs the prompts of `rows` through the model with an empty cache.
    fn prefill(
        &self,
        session: &mut Session,
        rows: Vec<Row>,
        timings: &mut Timings,
    ) -> Result<Running, ModelError> {
        let started = std::time::Instant::now();
        let mut running = match self.layout {
            Layout::Optimum => self.prefill_optimum(session, rows)?,
            Layout::Shared => self.prefill_shared(session, rows)?,
        };
        timings.prefill_s += started.elapsed().as_secs_f64();
        for row in &mut running.rows {
            row.next_pos = row.prompt.len() as i64;
        }
        Ok(running)
    }

    /// Optimum layout: prompts left-padded, masked, with explicit positions.
    fn prefill_optimum(&self, session: &mut Session, rows: Vec<Row>) -> Result<Running, ModelError> {
        let n = rows.len();
        let width = rows.iter().map(|r| r.prompt.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![0i64; n * width];
        let mut positions = vec![0i64; n * width];
        let mut masks = Vec::with_capacity(n);
        for (r, row) in rows.iter().enumerate() {
            let start = width - row.prompt.len();
            let mut mask = vec![0i64; width];
            for (j, &t) in row.prompt.iter().enumerate() {
                ids[r * width + start + j] = i64::from(t);
                mask[start + j] = 1;
                positions[r * width + start + j] = j as i64;
            }
            masks.push(mask);
        }
        let past = (0..2 * self.layers).map(|_| self.empty_past(n)).collect::<Result<_, _>>()?;
        let mut running = Running { rows, masks, past, ..Running::default() };
        self.forward(session, &mut running, ids, positions, width)?;
        Ok(running)
    }

    /// Shared layout: prompts right-padded into fresh cache buffers with room for every
    /// row's prompt and new tokens.
    fn prefill_shared(&self, session: &mut Session, rows: Vec<Row>) -> Result<Running, ModelError> {
        if rows.iter().any(|r| r.prompt.is_empty()) {
            return Err(ModelError::Ort("an empty prompt cannot be prefilled".into()));
        }
        let n = rows.len();
        let width = rows.iter().map(|r| r.prompt.len()).max().unwrap_or(1);
        let mut ids = vec![0i64; n * width];
        for (r, row) in rows.iter().enumerate() {
            for (j, &t) in row.prompt.iter().enumerate() {
                ids[r * width + j] = i64::from(t);
            }
        }
        // During prefill `seqlens_k` is each row's prompt length minus one.
        let seqlens: Vec<i32> = rows.iter().map(|r| r.prompt.len() as i32 - 1).collect();
        let capacity = self.capacity(&rows);
        let past =
            (0..2 * self.layers).map(|_| self.kv_buffer(session, n, capacity)).collect::<Result<_, _>>()?;
        let mut running = Running { rows, past, capacity, ..Running::default() };
        self.forward_shared(session, &mut running, ids, width, seqlens, width as i32)?;
        Ok(running)
    }

    /// Cache positions a batch needs: its longest prompt + new tokens, within the model's
    /// context.
    fn capacity(&self, rows: &[Row]) -> usize {
        let need = rows.iter().map(|r| r.prompt.len() + r.params.max_new_tokens).max().unwrap_or(1);
        self.max_positions.map_or(need, |m| need.min(m)).max(1)
    }

    /// An uninitialised cache buffer `[rows, kv_heads, capacity, head_dim]` in the cache's
    /// memory, created by ONNX Runtime so that it can be bound as an output. Positions a
    /// row has not written are never read.
    fn kv_buffer(&self, session: &Session, rows: usize, capacity: usize) -> Result<DynValue, ModelError> {
        let allocator = ort::memory::Allocator::new(session, self.kv_memory()?)?;
        let shape = [rows, self.kv_heads, capacity, self.head_dim];
        Ok(match self.kv {
            KvType::F32 => Tensor::<f32>::new(&allocator, shape)?.into_dyn(),
            KvType::F16 => Tensor::<f16>::new(&allocator, shape)?.into_dyn(),
        })
    }

    /// One decode step: each row's last sampled token in, next logits out.
    fn decode(
        &self,
        session: &mut Session,
        running: &mut Running,
        timings: &mut Timings,
    ) -> Result<(), ModelError> {
        let ids: Vec<i64> =
            running.rows.iter().map(|r| i64::from(*r.tokens.last().expect("sampled"))).collect();
        let started = std::time::Instant::now();
        match self.layout {
            Layout::Optimum => {
                let positions: Vec<i64> = running.rows.iter().map(|r| r.next_pos).collect();
                for mask in &mut running.masks {
                    mask.push(1);
                }
                self.forward(session, running, ids, positions, 1)?;
            }
            Layout::Shared => {
                // During decode `seqlens_k` is the number of cached tokens of each row.
                let seqlens: Vec<i32> = running.rows.iter().map(|r| r.next_pos as i32).collect();
                let total = seqlens.iter().max().copied().unwrap_or(0) + 1;
                self.forward_shared(session, running, ids, 1, seqlens, total)?;
            }
        }
        timings.decode_s += started.elapsed().as_secs_f64();
        for row in &mut running.rows {
            row.next_pos += 1;
        }
        Ok(())
    }

    /// Runs the graph on `running`'s cache; keeps the presents as the next past and the
    /// last position's logits of every row.
    fn forward(
        &self,
        session: &mut Session,
        running: &mut Running,
        ids: Vec<i64>,
        positions: Vec<i64>,
        len: usize,
    ) -> Result<(), ModelError> {
        let m = running.rows.len() as i64;
        let total = running.masks[0].len() as i64;
        let flat_mask: Vec<i64> = running.masks.iter().flatten().copied().collect();
        let mut inputs: Vec<(String, DynValue)> = vec![
            ("input_ids".into(), Tensor::from_array((vec![m, len as i64], ids))?.into_dyn()),
            ("attention_mask".into(), Tensor::from_array((vec![m, total], flat_mask))?.into_dyn()),
            ("position_ids".into(), Tensor::from_array((vec![m, len as i64], positions))?.into_dyn()),
        ];
        for (i, value) in running.past.drain(..).enumerate() {
            let kind = if i % 2 == 0 { "key" } else { "value" };
            inputs.push((format!("past_key_values.{}.{kind}", i / 2), value));
        }
        // Bound rather than plain `run`: the presents stay where the provider made them
        // (GPU memory on CUDA) and go back in as the next step's past without a round
        // trip through the host; only the logits come to the CPU for sampling.
        let mut binding = session.create_binding()?;
        for (name, value) in &inputs {
            binding.bind_input(name.as_str(), value)?;
        }
        let kv_memory = self.kv_memory()?;
        for i in 0..self.layers {
            for kind in ["key", "value"] {
                binding.bind_output_to_device(format!("present.{i}.{kind}"), &kv_memory)?;
            }
        }
        binding.bind_output_to_device("logits", &host_memory()?)?;
        let mut outputs = session.run_binding(&binding)?;
        for i in 0..self.layers {
            for kind in ["key", "value"] {
                let name = format!("present.{i}.{kind}");
                running
                    .past
                    .push(outputs.remove(&name).ok_or_else(|| ModelError::Ort(format!("no {name} output")))?);
            }
        }
        let (shape, logits) = outputs["logits"].try_extract_tensor::<f32>()?;
        let (seq, vocab) = (shape[1] as usize, shape[2] as usize);
        running.vocab = vocab;
        running.logits.clear();
        for r in 0..m as usize {
            let start = (r * seq + seq - 1) * vocab;
            running.logits.extend_from_slice(&logits[start..start + vocab]);
        }
        Ok(())
    }

    /// Runs the shared-layout graph: each cache buffer is bound as its layer's past and
    /// present, so the graph writes the new keys/values in place; keeps each row's logits
    /// at its last real position.
    fn forward_shared(
        &self,
        session: &mut Session,
        running: &mut Running,
        ids: Vec<i64>,
        len: usize,
        seqlens: Vec<i32>,
        total: i32,
    ) -> Result<(), ModelError> {
        let m = running.rows.len();
        let last: Vec<usize> = seqlens.iter().map(|&s| (s.max(0) as usize).min(len - 1)).collect();
        let mut binding = session.create_binding()?;
        binding.bind_input("input_ids", &Tensor::from_array((vec![m as i64, len as i64], ids))?)?;
        binding.bind_input("seqlens_k", &Tensor::from_array((vec![m as i64], seqlens))?)?;
        binding
            .bind_input("total_sequence_length", &Tensor::from_array((Vec::<i64>::new(), vec![total]))?)?;
        for (i, value) in running.past.iter_mut().enumerate() {
            let kind = if i % 2 == 0 { "key" } else { "value" };
            binding.bind_input(format!("past_key_values.{}.{kind}", i / 2), &*value)?;
            binding.bind_output(format!("present.{}.{kind}", i / 2), &mut *value)?;
        }
        binding.bind_output_to_device("logits", &host_memory()?)?;
        let outputs = session.run_binding(&binding)?;
        let (shape, logits) = outputs["logits"].try_extract_tensor::<f32>()?;
        let (seq, vocab) = (shape[1] as usize, shape[2] as usize);
        running.vocab = vocab;
        running.logits.clear();
        for (r, &pos) in last.iter().enumerate() {
            let start = (r * seq + pos.min(seq - 1)) * vocab;
            running.logits.extend_from_slice(&logits[start..start + vocab]);
        }
        Ok(())
    }

    /// Samples every row's next token; rows that finish leave the batch (their cache rows
    /// are dropped) and are returned.
    fn sample(
        &self,
        running: &mut Running,
        stop: &mut dyn FnMut(&Row) -> bool,
        timings: &mut Timings,
    ) -> Result<Vec<Row>, ModelError> {
        let started = std::time::Instant::now();
        let vocab = running.vocab;
        let mut keep = Vec::with_capacity(running.rows.len());
        for (slot, row) in running.rows.iter_mut().enumerate() {
            let mut logits = running.logits[slot * vocab..(slot + 1) * vocab].to_vec();
            if row.params.repetition_penalty != 1.0 {
                penalise(&mut logits, &row.prompt, row.params.repetition_penalty);
                penalise(&mut logits, &row.tokens, row.params.repetition_penalty);
            }
            let token = sample(&logits, &row.params, &mut row.rng);
            row.tokens.push(token);
            row.finish = if self.eos.contains(&token) {
                Some(Finish::Eos)
            } else if stop(row) {
                Some(Finish::Stop)
            } else if row.tokens.len() >= row.params.max_new_tokens
                || (self.layout == Layout::Shared && row.next_pos as usize >= running.capacity)
            {
                Some(Finish::Length)
            } else {
                None
            };
            if row.finish.is_none() {
                keep.push(slot);
            }
        }
        let mut done = Vec::new();
        if keep.len() < running.rows.len() {
            running.past = self.select_rows(&running.past, &keep, running.capacity)?;
            let rows = std::mem::take(&mut running.rows);
            for (slot, row) in rows.into_iter().enumerate() {
                if keep.contains(&slot) { running.rows.push(row) } else { done.push(row) }
            }
            if self.layout == Layout::Optimum {
                let masks = std::mem::take(&mut running.masks);
                running.masks = keep.iter().map(|&k| masks[k].clone()).collect();
            }
        }
        timings.sampling_s += started.elapsed().as_secs_f64();
        Ok(done)
    }

    /// Joins two running batches. Optimum layout: the shorter cache is left-padded
    /// (masked out) to the longer one's length. Shared layout: the smaller buffers are
    /// widened to the larger capacity (the rows keep their lengths). Then the rows are
    /// stacked.
    fn merge(&self, a: Running, b: Running) -> Result<Running, ModelError> {
        if a.rows.is_empty() {
            return Ok(b);
        }
        if b.rows.is_empty() {
            return Ok(a);
        }
        let (la, lb) = match self.layout {
            Layout::Optimum => (a.masks[0].len(), b.masks[0].len()),
            Layout::Shared => (a.capacity, b.capacity),
        };
        let len = la.max(lb);
        let mut past = Vec::with_capacity(a.past.len());
        for (x, y) in a.past.iter().zip(&b.past) {
            past.push(self.stack_padded(x, la, y, lb, len)?);
        }
        let pad = |mut m: Vec<i64>, l: usize| {
            let mut v = vec![0i64; len - l];
            v.append(&mut m);
            v
        };
        let mut masks: Vec<Vec<i64>> = a.masks.into_iter().map(|m| pad(m, la)).collect();
        masks.extend(b.masks.into_iter().map(|m| pad(m, lb)));
        let mut logits = a.logits;
        logits.extend(b.logits);
        let mut rows = a.rows;
        rows.extend(b.rows);
        Ok(Running { rows, masks, past, logits, vocab: a.vocab.max(b.vocab), capacity: len })
    }

    /// `[ra, h, la, d]` and `[rb, h, lb, d]` → `[ra + rb, h, len, d]`, the new positions
    /// zero: on the left in the Optimum layout (positions are aligned at the end), on
    /// the right in the shared one (each row starts at position 0).
    fn stack_padded(
        &self,
        x: &DynValue,
        la: usize,
        y: &DynValue,
        lb: usize,
        len: usize,
    ) -> Result<DynValue, ModelError> {
        fn go<T: Copy + Default + ort::value::PrimitiveTensorElementType + std::fmt::Debug + 'static>(
            model: &OnnxModel,
            x: &DynValue,
            la: usize,
            y: &DynValue,
            lb: usize,
            len: usize,
        ) -> Result<DynValue, ModelError> {
            let (cx, cy) = (host_copy(x)?, host_copy(y)?);
            let (x, y) = (cx.as_ref().unwrap_or(x), cy.as_ref().unwrap_or(y));
            let (sx, dx) = x.try_extract_tensor::<T>()?;
            let (sy, dy) = y.try_extract_tensor::<T>()?;
            let (heads, d) = (sx[1] as usize, sx[3] as usize);
            let rows = (sx[0] + sy[0]) as usize;
            let left = model.layout == Layout::Optimum;
            let mut out = Vec::with_capacity(rows * heads * len * d);
            for (data, l, n) in [(dx, la, sx[0] as usize), (dy, lb, sy[0] as usize)] {
                for block in 0..n * heads {
                    let pad = std::iter::repeat_n(T::default(), (len - l) * d);
                    if left {
                        out.extend(pad);
                        out.extend_from_slice(&data[block * l * d..(block + 1) * l * d]);
                    } else {
                        out.extend_from_slice(&data[block * l * d..(block + 1) * l * d]);
                        out.extend(pad);
                    }
                }
            }
            model.cache_value(vec![rows as i64, heads as i64, len as i64, d as i64], out, len)
        }
        match self.kv {
            KvType::F32 => go::<f32>(self, x, la, y, lb, len),
            KvType::F16 => go::<f16>(self, x, la, y, lb, len),
        }
    }

    /// Starts the continuous batcher: a thread that owns generation and admits new
    /// requests into the running batch between decode steps (up to `max_rows` rows), so
    /// a short request never waits for a long batch to finish.
    /// `report` receives each step's timings.
    pub fn continuous(self: std::sync::Arc<Self>, max_rows: usize, report: Option<StepReport>) -> Batcher {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let model = self;
        let thread = std::thread::Builder::new()
            .name("alignx-batcher".into())
            .spawn(move || model.serve(rx, max_rows.max(1), report))
            .expect("spawn the batcher thread");
        Batcher { tx: Some(tx), thread: Some(thread) }
    }

    fn serve(&self, rx: std::sync::mpsc::Receiver<Job>, max_rows: usize, report: Option<StepReport>) {
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let mut running = Running::default();
        let mut jobs: std::collections::HashMap<usize, Job> = std::collections::HashMap::new();
        let mut next_id = 0usize;
        loop {
            // Admit waiting requests: block only when there is nothing to decode.
            let mut admitted = Vec::new();
            while running.rows.len() + admitted.len() < max_rows {
                let job = if running.rows.is_empty() && admitted.is_empty() {
                    match rx.recv() {
                        Ok(j) => j,
                        Err(_) => return, // every handle dropped
                    }
                } else {
                    match rx.try_recv() {
                        Ok(j) => j,
                        Err(_) => break,
                    }
                };
                let id = next_id;
                next_id += 1;
                admitted.push(Row::new(id, job.prompt.clone(), job.params, job.seed));
                jobs.insert(id, job);
            }
            let mut timings = Timings::default();
            let result = (|| -> Result<(), ModelError> {
                if !admitted.is_empty() {
                    let mut fresh = self.prefill(&mut session, admitted, &mut timings)?;
                    self.sample_and_reply(&mut fresh, &mut jobs, &mut timings)?;
                    running = self.merge(std::mem::take(&mut running), fresh)?;
                } else {
                    self.decode(&mut session, &mut running, &mut timings)?;
                    self.sample_and_reply(&mut running, &mut jobs, &mut timings)?;
                }
                Ok(())
            })();
            if let Some(report) = &report {
                report(&timings);
            }
            if let Err(e) = result {
                // A failed step fails every request in it; the batcher starts afresh.
                for (_, job) in jobs.drain() {
                    let _ = job.reply.send(Err(ModelError::Ort(e.to_string())));
                }
                running = Running::default();
            }
        }
    }
}

/// Whether a row's generated tokens end with a stop condition (e.g. a stop string).
pub type StopFn = std::sync::Arc<dyn Fn(&[u32]) -> bool + Send + Sync>;

/// Receives the timings of each batcher step (prefill of new rows, or one decode step).
pub type StepReport = Box<dyn Fn(&Timings) + Send>;

impl OnnxModel {
    /// Samples the next token of every row; rows that finish are answered and leave.
    fn sample_and_reply(
        &self,
        batch: &mut Running,
        jobs: &mut std::collections::HashMap<usize, Job>,
        timings: &mut Timings,
    ) -> Result<(), ModelError> {
        let mut stop = |r: &Row| (jobs[&r.id].stop)(&r.tokens);
        for row in self.sample(batch, &mut stop, timings)? {
            if let Some(job) = jobs.remove(&row.id) {
                let _ = job.reply.send(Ok(row.into_output()));
            }
        }
        Ok(())
    }
}

/// A request to the continuous batcher.
struct Job {
    prompt: Vec<u32>,
    params: SamplingParams,
    seed: u64,
    stop: StopFn,
    reply: std::sync::mpsc::Sender<Result<Output, ModelError>>,
}

/// Handle to the continuous batcher thread, usable from any thread; dropping it stops
/// the thread and waits for it.
pub struct Batcher {
    /// `None` only while dropping.
    tx: Option<std::sync::mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Batcher {
    /// Closes the queue and waits for the batcher thread, so its session is released
    /// before the process can exit: ONNX Runtime's CUDA provider crashes at exit when a
    /// session is still being torn down on another thread.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Batcher {
    /// Generates for these prompts, sharing the running batch with everyone else's.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        params: &[SamplingParams],
        seeds: &[u64],
        stop: StopFn,
    ) -> Vec<Result<Output, ModelError>> {
        let receivers: Vec<_> = prompts
            .iter()
            .zip(params)
            .zip(seeds)
            .map(|((p, params), &seed)| {
                let (reply, rx) = std::sync::mpsc::channel();
                let job = Job { prompt: p.clone(), params: *params, seed, stop: stop.clone(), reply };
                let tx = self.tx.as_ref().expect("set until drop");
                tx.send(job).map(|_| rx).map_err(|_| ModelError::Ort("the batcher stopped".into()))
            })
            .collect();
        receivers
            .into_iter()
            .map(|rx| rx?.recv().map_err(|_| ModelError::Ort("the batcher stopped".into()))?)
            .collect()
    }
}

/// One sequence being generated.
struct Row {
    /// The caller's index for it.
    id: usize,
    prompt: Vec<u32>,
    params: SamplingParams,
    rng: Rng,
    tokens: Vec<u32>,
    finish: Option<Finish>,
    /// Position id of the next token fed in.
    next_pos: i64,
}

impl Row {
    fn new(id: usize, prompt: Vec<u32>, params: SamplingParams, seed: u64) -> Self {
        Self { id, prompt, params, rng: Rng::new(seed), tokens: Vec::new(), finish: None, next_pos: 0 }
    }

    fn into_output(self) -> Output {
        Output { tokens: self.tokens, finish: self.finish.unwrap_or(Finish::Length) }
    }
}

/// A batch in the middle of generation: its rows, their attention masks (Optimum
/// layout: all the same length, the cache's), the cache, the last step's logits per row,
/// and (shared layout) the positions each cache buffer holds.
#[derive(Default)]
struct Running {
    rows: Vec<Row>,
    masks: Vec<Vec<i64>>,
    past: Vec<DynValue>,
    logits: Vec<f32>,
    vocab: usize,
    capacity: usize,
}
