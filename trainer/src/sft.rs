//! `alignx-trainer sft`: supervised fine-tuning on `{prompt, response}` records (the
//! paper's `cold_start.json`, JSON array or JSON Lines). The loss covers response tokens
//! only (and the EOS after them), averaged over every response token of an optimizer
//! step, however the step is split into micro-batches.
//!
//! Data order comes from the seed alone (one shuffle per epoch), and the optimizer state
//! is saved with each checkpoint, so `--resume` continues with exactly the losses an
//! uninterrupted run would have had.

use std::path::{Path, PathBuf};
use std::time::Instant;

use alignx_schemas::training::{ColdStartRecord, read_records};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, CONFIG_FILE, CheckpointError};
use crate::lora::{self, LoraConfig};
use crate::model_dir::{self, Dtype, LoadError};
use crate::optim::{AdamW, AdamWConfig, clip_grad_norm, learning_rate};
use crate::qwen2::{KvCache, Qwen2};
use crate::rng::Rng;

pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";

/// Everything a run needs; the CLI fills it.
#[derive(Debug, Clone)]
pub struct SftConfig {
    pub model: PathBuf,
    pub data: PathBuf,
    pub out: PathBuf,
    pub epochs: usize,
    /// Stop after this many optimizer steps (default: all epochs).
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    /// Examples longer than this (prompt + response + EOS) are dropped and counted.
    pub max_length: usize,
    /// Write `out/checkpoint-STEP` every this many steps (0: never).
    pub save_every: usize,
    pub seed: u64,
    /// A `checkpoint-STEP` directory of an earlier run with the same settings.
    pub resume: Option<PathBuf>,
    pub device: Device,
    /// Precision of the model's weights during training (bf16/fp16 keep f32 masters in
    /// the optimizer; losses and softmax are always f32).
    pub dtype: Dtype,
    pub progress: bool,
    /// Train LoRA adapters instead of all weights; the output is then an adapter.
    pub lora: Option<LoraConfig>,
}

impl SftConfig {
    /// A run on `data` from `model` into `out` with the CLI's defaults (one epoch, batch
    /// 8, lr 1e-3, cosine to 10%, clipping at 1, examples up to 1,024 tokens, CPU, fp32);
    /// set the rest with struct-update syntax.
    pub fn new(model: impl Into<PathBuf>, data: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            data: data.into(),
            out: out.into(),
            epochs: 1,
            max_steps: None,
            batch_size: 8,
            grad_accum: 1,
            lr: 1e-3,
            warmup_steps: 0,
            min_lr_ratio: 0.1,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            max_length: 1024,
            save_every: 0,
            seed: 0,
            resume: None,
            device: Device::Cpu,
            dtype: Dtype::Fp32,
            progress: false,
            lora: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SftError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path}: {problems}")]
    Records { path: String, problems: alignx_schemas::Problems },
    #[error("{0}")]
    Invalid(String),
    #[error("cannot resume from {path}: {message}")]
    Resume { path: String, message: String },
}

/// What a run did, printed as JSON at the end.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SftSummary {
    pub steps: usize,
    pub examples: usize,
    pub dropped_too_long: usize,
    /// Input tokens processed (padding excluded).
    pub tokens: u64,
    pub seconds: f64,
    pub tokens_per_second: f64,
    /// Token-mean response loss of every optimizer step this run took, in order.
    pub losses: Vec<f64>,
    /// The first step this run took (non-zero when resumed).
    pub start_step: usize,
}

/// What a checkpoint records besides weights and optimizer state.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct TrainerState {
    pub step: usize,
    pub seed: u64,
    pub total_steps: usize,
}

/// One tokenised example: `ids` = prompt + response (+ EOS); loss on `ids[prompt_len..]`.
#[derive(Debug, Clone)]
pub struct Example {
    pub ids: Vec<i64>,
    pub prompt_len: usize,
}

impl Example {
    pub fn response_len(&self) -> usize {
        self.ids.len() - self.prompt_len
    }
}

fn tokenize(
    records: &[ColdStartRecord],
    tok: &tokenizers::Tokenizer,
    eos: i64,
    max_length: usize,
) -> Result<(Vec<Example>, usize), SftError> {
    let encode = |t: &str| {
        crate::tokenizer::encode_ids(tok, t).map_err(|e| SftError::Invalid(format!("tokenizer: {e}")))
    };
    let mut kept = Vec::new();
    let mut dropped = 0;
    for r in records {
        let mut ids = encode(&r.prompt)?;
        let prompt_len = ids.len();
        ids.extend(encode(&r.response)?);
        ids.push(eos);
        if ids.len() > max_length {
            dropped += 1;
        } else {
            kept.push(Example { ids, prompt_len });
        }
    }
    Ok((kept, dropped))
}

/// Right-padded batch of the examples' tokens from `skip` on: `(input_ids,
/// attention_mask, position_ids, targets, target_mask)`, the mask covering the `skip`
/// cached positions too, targets shifted by one so position `t` predicts token `t + 1`.
fn batch(examples: &[&Example], skip: usize, device: Device) -> (Tensor, Tensor, Tensor, Tensor, Tensor) {
    let b = examples.len();
    let width = examples.iter().map(|e| e.ids.len() - skip).max().unwrap_or(1);
    let (mut ids, mut mask, mut targets, mut tmask) =
        (vec![0i64; b * width], vec![0i64; b * width], vec![0i64; b * width], vec![0f32; b * width]);
    for (r, e) in examples.iter().enumerate() {
        for (c, &t) in e.ids[skip..].iter().enumerate() {
            let (i, j) = (r * width + c, skip + c);
            ids[i] = t;
            mask[i] = 1;
            if j + 1 < e.ids.len() {
                targets[i] = e.ids[j + 1];
                // Position j predicts token j+1, a response token when j+1 >= prompt_len.
                if j + 1 >= e.prompt_len {
                    tmask[i] = 1.0;
                }
            }
        }
    }
    let shape = [b as i64, width as i64];
    let t = |v: &[i64]| Tensor::from_slice(v).view(shape).to_device(device);
    let positions =
        (Tensor::arange(width as i64, (Kind::Int64, device)) + skip as i64).unsqueeze(0).expand(shape, false);
    let mask = Tensor::cat(&[Tensor::ones([b as i64, skip as i64], (Kind::Int64, device)), t(&mask)], 1);
    (t(&ids), mask, positions, t(&targets), Tensor::from_slice(&tmask).view(shape).to_device(device))
}

/// Shared prefixes shorter than this are recomputed per row (not worth a second pass).
const MIN_SHARED_PREFIX: usize = 16;

/// Tokens every example starts with, ending before the first position the loss covers.
fn shared_prefix(examples: &[&Example]) -> usize {
    let Some(first) = examples.first() else { return 0 };
    let mut n = examples.iter().map(|e| e.prompt_len.saturating_sub(1)).min().unwrap_or(0);
    for e in &examples[1..] {
        n = n.min(first.ids.iter().zip(&e.ids).take_while(|(a, b)| a == b).count());
    }
    n
}

/// Log-probabilities of every example's response tokens under `model` (with gradients),
/// concatenated in example order: [`Example::response_len`] values each.
///
/// Prompts that start alike (the instructions of a template, the judge's worked example)
/// have their common prefix run once, as one row whose keys and values every row then
/// attends to: the same numbers as running each row whole (causal attention: a prefix
/// never sees what follows it), and gradients flow back through the shared pass.
pub fn response_logprobs(model: &Qwen2, examples: &[&Example], device: Device) -> Tensor {
    response_logprobs_and_hidden(model, examples, device).0
}

/// [`response_logprobs`] and the final hidden states they come from, `[tokens, hidden]`
/// in the same order: the state before each response token, which a value head reads.
pub fn response_logprobs_and_hidden(
    model: &Qwen2,
    examples: &[&Example],
    device: Device,
) -> (Tensor, Tensor) {
    let shared = shared_prefix(examples);
    let skip = if shared >= MIN_SHARED_PREFIX && examples.len() > 1 { shared } else { 0 };
    let mut cache = KvCache::new();
    if skip > 0 {
        let ids = Tensor::from_slice(&examples[0].ids[..skip]).view([1, skip as i64]).to_device(device);
        let mask = Tensor::ones([1, skip as i64], (Kind::Int64, device));
        let positions = Tensor::arange(skip as i64, (Kind::Int64, device)).unsqueeze(0);
        let _ = model.hidden(&ids, &mask, &positions, &mut cache);
        cache.expand_rows(examples.len() as i64);
    }
    let (ids, mask, positions, targets, tmask) = batch(examples, skip, device);
    // Logits only where the loss is: response tokens are a small share of each
    // sequence, and the [batch, seq, vocab] tensor is the biggest of the step.
    let hidden = model.hidden(&ids, &mask, &positions, &mut cache);
    let rows = tmask.flatten(0, -1).nonzero().squeeze_dim(-1);
    let hidden = hidden.flatten(0, 1).index_select(0, &rows);
    let targets = targets.flatten(0, -1).index_select(0, &rows);
    let logp = model
        .logits(&hidden)
        .log_softmax(-1, Kind::Float)
        .gather(-1, &targets.unsqueeze(-1), false)
        .squeeze_dim(-1);
    (logp, hidden)
}

/// What a training run starts from, and the `config.json` of the weights loaded: `base`;
/// when resuming a full fine-tune, the checkpoint's weights; with `lora`, `base` with
/// fresh adapters, or with the checkpoint's adapter when resuming (refused when it is
/// not the adapter this run asks for).
pub(crate) fn load_for_training(
    base: &Path,
    resume: Option<&Path>,
    lora: Option<&LoraConfig>,
    device: Device,
    dtype: Dtype,
) -> Result<(model_dir::LoadedModel, serde_json::Value), SftError> {
    let weights_dir = match (lora, resume) {
        (None, Some(dir)) => dir,
        _ => base,
    };
    let loaded = model_dir::load_with_lora(weights_dir, device, dtype, lora)?;
    let config_json = read_config_json(weights_dir)?;
    if let (Some(lora), Some(dir), Some(lora_vs)) = (lora, resume, &loaded.lora_vs) {
        let saved = LoraConfig::read(dir)?;
        if &saved != lora {
            return Err(SftError::Resume {
                path: dir.display().to_string(),
                message: format!("its adapter is {saved:?}, this run asks for {lora:?}"),
            });
        }
        lora::load_adapter(lora_vs, dir)?;
    }
    Ok((loaded, config_json))
}

/// A training progress bar (`NAME [bar] pos/len steps  msg  eta`) starting at `start`;
/// hidden unless `show`.
pub(crate) fn progress_bar(name: &str, total: usize, start: usize, show: bool) -> indicatif::ProgressBar {
    let bar = if show { indicatif::ProgressBar::new(total as u64) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{name} {{bar:30}} {{pos}}/{{len}} steps  {{msg}}  eta {{eta}}"
        ))
        .expect("valid template"),
    );
    bar.set_position(start as u64);
    bar
}

/// The order of `n` items in pass `epoch` over the data: a shuffle seeded by the run's
/// seed and the epoch alone (so a resumed run sees the same order).
pub(crate) fn epoch_order(seed: u64, epoch: usize, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(seed.wrapping_add(epoch as u64)).shuffle(&mut order);
    order
}

/// Steps whose examples a window of the shuffled order is sorted into by length.
const LENGTH_GROUP_STEPS: usize = 8;

/// [`epoch_order`] with examples of similar length put in the same step: each window of
/// [`LENGTH_GROUP_STEPS`] steps is sorted by length, cut into steps, and the steps of
/// the window shuffled again (so no step's position predicts its lengths). Rows of a
/// micro-batch are padded to its longest, and with random batches of cold-start records
/// ~20% of the rows' positions were padding; grouped, ~5%.
pub(crate) fn length_grouped_order(
    seed: u64,
    epoch: usize,
    lengths: &[usize],
    per_step: usize,
) -> Vec<usize> {
    let mut order = epoch_order(seed, epoch, lengths.len());
    // A stream of its own, so the shuffle above stays what it was.
    let mut rng = Rng::new(seed.wrapping_add(epoch as u64) ^ 0x6c65_6e67_7468);
    let window = per_step * LENGTH_GROUP_STEPS;
    for chunk in order.chunks_mut(window) {
        chunk.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        let mut steps: Vec<Vec<usize>> = chunk.chunks(per_step).map(<[usize]>::to_vec).collect();
        // A short last step stays last: only the last window of an epoch is short.
        let full = steps.iter().filter(|s| s.len() == per_step).count();
        rng.shuffle(&mut steps[..full]);
        for (slot, i) in chunk.iter_mut().zip(steps.into_iter().flatten()) {
            *slot = i;
        }
    }
    order
}

pub(crate) fn read_config_json(dir: &Path) -> Result<serde_json::Value, SftError> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| SftError::Read { path: path.display().to_string(), message: e.to_string() })?;
    serde_json::from_str(&text)
        .map_err(|e| SftError::Read { path: path.display().to_string(), message: e.to_string() })
}

/// Saves what a run trains: the whole model, or (with `lora`) the adapter over `base`.
pub(crate) fn save_model(
    lora: Option<&LoraConfig>,
    base: &Path,
    loaded: &model_dir::LoadedModel,
    config_json: &serde_json::Value,
    dir: &Path,
    extra: impl FnOnce(&Path) -> Result<(), CheckpointError>,
) -> Result<(), CheckpointError> {
    match (lora, &loaded.lora_vs) {
        (Some(lora), Some(lora_vs)) => lora::save_adapter(lora_vs, lora, base, dir, extra),
        _ => checkpoint::save_with(&loaded.vs, config_json, Some(base), dir, extra),
    }
}

/// Writes `dir/checkpoint-STEP` for a resume: the model (via `save`), the optimizer state
/// and `state`.
pub(crate) fn save_checkpoint(
    dir: &Path,
    opt: &AdamW,
    state: &TrainerState,
    save: impl FnOnce(&Path, &dyn Fn(&Path) -> Result<(), CheckpointError>) -> Result<(), CheckpointError>,
) -> Result<(), CheckpointError> {
    let extra = |tmp: &Path| {
        opt.save(&tmp.join(OPTIMIZER_FILE)).map_err(|e| checkpoint::io_error(tmp, e))?;
        let text = serde_json::to_string_pretty(state).expect("state serialises");
        std::fs::write(tmp.join(STATE_FILE), text).map_err(|e| checkpoint::io_error(tmp, e))
    };
    save(&dir.join(format!("checkpoint-{}", state.step)), &extra)
}

/// Reads a checkpoint's state and loads its optimizer state into `opt`, checking that it
/// was written by a run with `seed` and `total_steps`.
pub(crate) fn resume_state(
    dir: &Path,
    opt: &mut AdamW,
    seed: u64,
    total_steps: usize,
) -> Result<TrainerState, SftError> {
    let resume_err = |message: String| SftError::Resume { path: dir.display().to_string(), message };
    let state: TrainerState = std::fs::read_to_string(dir.join(STATE_FILE))
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
        .map_err(resume_err)?;
    if state.seed != seed || state.total_steps != total_steps {
        return Err(resume_err(format!(
            "it was written with seed {} and {} total steps; this run has seed {seed} and {total_steps}",
            state.seed, state.total_steps
        )));
    }
    opt.load(&dir.join(OPTIMIZER_FILE)).map_err(resume_err)?;
    Ok(state)
}

/// Moves the final model written by `save` into `out`, replacing its files (checkpoint
/// directories inside it are kept).
pub(crate) fn save_final(
    out: &Path,
    save: impl FnOnce(&Path) -> Result<(), CheckpointError>,
) -> Result<(), CheckpointError> {
    let final_dir = out.join("final.partial");
    save(&final_dir)?;
    for entry in std::fs::read_dir(&final_dir).map_err(|e| checkpoint::io_error(&final_dir, e))? {
        let entry = entry.map_err(|e| checkpoint::io_error(&final_dir, e))?;
        let to = out.join(entry.file_name());
        std::fs::rename(entry.path(), &to).map_err(|e| checkpoint::io_error(&to, e))?;
    }
    std::fs::remove_dir(&final_dir).map_err(|e| checkpoint::io_error(&final_dir, e))
}

pub fn run(cfg: &SftConfig) -> Result<SftSummary, SftError> {
    if cfg.batch_size == 0 || cfg.grad_accum == 0 || cfg.epochs == 0 {
        return Err(SftError::Invalid("--batch-size, --grad-accum and --epochs must be at least 1".into()));
    }
    let text = std::fs::read_to_string(&cfg.data)
        .map_err(|e| SftError::Read { path: cfg.data.display().to_string(), message: e.to_string() })?;
    let records = read_records::<ColdStartRecord>(&text)
        .map_err(|problems| SftError::Records { path: cfg.data.display().to_string(), problems })?;
    let (loaded, config_json) =
        load_for_training(&cfg.model, cfg.resume.as_deref(), cfg.lora.as_ref(), cfg.device, cfg.dtype)?;
    let save = |dir: &Path, extra: &dyn Fn(&Path) -> Result<(), CheckpointError>| {
        save_model(cfg.lora.as_ref(), &cfg.model, &loaded, &config_json, dir, extra)
    };
    let eos = *loaded.eos.first().ok_or_else(|| SftError::Invalid("the model has no eos_token_id".into()))?;
    let (examples, dropped) = tokenize(&records, &loaded.tokenizer, eos, cfg.max_length)?;
    if examples.is_empty() {
        return Err(SftError::Invalid(format!(
            "no example fits --max-length {} ({} records, all too long)",
            cfg.max_length,
            records.len()
        )));
    }
    let per_step = cfg.batch_size * cfg.grad_accum;
    let steps_per_epoch = examples.len().div_ceil(per_step);
    let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    let total_steps = cfg.max_steps.unwrap_or(usize::MAX).min(steps_per_epoch * cfg.epochs);

    let trained = loaded.lora_vs.as_ref().unwrap_or(&loaded.vs);
    let mut params: Vec<(String, Tensor)> = trained.variables().into_iter().collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    let mut opt =
        AdamW::new(params, AdamWConfig { weight_decay: cfg.weight_decay, ..AdamWConfig::default() });
    let mut start_step = 0;
    if let Some(dir) = &cfg.resume {
        start_step = resume_state(dir, &mut opt, cfg.seed, total_steps)?.step;
    }

    let bar = progress_bar("sft", total_steps, start_step, cfg.progress);
    let started = Instant::now();
    let mut tokens = 0u64;
    let mut losses = Vec::new();
    let mut order: Vec<usize> = Vec::new();
    let mut order_epoch = usize::MAX;
    for step in start_step..total_steps {
        let epoch = step / steps_per_epoch;
        if epoch != order_epoch {
            order = length_grouped_order(cfg.seed, epoch, &lengths, per_step);
            order_epoch = epoch;
        }
        let first = (step % steps_per_epoch) * per_step;
        let chosen: Vec<&Example> =
            order[first..(first + per_step).min(order.len())].iter().map(|&i| &examples[i]).collect();
        let step_targets: usize = chosen.iter().map(|e| e.ids.len() - e.prompt_len).sum();
        opt.zero_grad();
        let mut loss_sum = 0.0;
        for micro in chosen.chunks(cfg.batch_size) {
            tokens += micro.iter().map(|e| e.ids.len() as u64).sum::<u64>();
            let logp = response_logprobs(&loaded.model, micro, cfg.device);
            let nll = -logp.sum(Kind::Float);
            loss_sum += nll.double_value(&[]);
            (nll / step_targets as f64).backward();
        }
        clip_grad_norm(opt.params(), cfg.max_grad_norm);
        opt.step(learning_rate(step, cfg.lr, cfg.warmup_steps, total_steps, cfg.min_lr_ratio));
        let loss = loss_sum / step_targets as f64;
        losses.push(loss);
        let elapsed = started.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!("loss {loss:.4}  {:.0} tok/s", tokens as f64 / elapsed));
        bar.inc(1);
        let done = step + 1;
        if cfg.save_every > 0 && done % cfg.save_every == 0 && done < total_steps {
            let state = TrainerState { step: done, seed: cfg.seed, total_steps };
            save_checkpoint(&cfg.out, &opt, &state, save)?;
        }
    }
    bar.finish_and_clear();
    save_final(&cfg.out, |dir| save(dir, &|_| Ok(())))?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(SftSummary {
        steps: total_steps - start_step,
        examples: examples.len(),
        dropped_too_long: dropped,
        tokens,
        seconds,
        tokens_per_second: tokens as f64 / seconds.max(1e-9),
        losses,
        start_step,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Positions a run of steps computes, each row padded to its step's longest.
    fn padded(order: &[usize], lengths: &[usize], per_step: usize) -> usize {
        order.chunks(per_step).map(|s| s.len() * s.iter().map(|&i| lengths[i]).max().unwrap_or(0)).sum()
    }

    #[test]
    fn length_grouping_is_a_permutation_with_less_padding_and_the_same_for_a_seed() {
        let mut rng = Rng::new(7);
        let lengths: Vec<usize> = (0..1_000).map(|_| 300 + (rng.next_u64() % 400) as usize).collect();
        let grouped = length_grouped_order(3, 1, &lengths, 16);
        let mut sorted = grouped.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..lengths.len()).collect::<Vec<_>>());
        assert_eq!(grouped, length_grouped_order(3, 1, &lengths, 16));
        assert_ne!(grouped, length_grouped_order(3, 2, &lengths, 16));
        let random = padded(&epoch_order(3, 1, lengths.len()), &lengths, 16);
        let real: usize = lengths.iter().sum();
        let grouped = padded(&grouped, &lengths, 16);
        assert!(grouped < random, "grouped {grouped} vs random {random}");
        assert!((grouped - real) * 4 < random - real, "padding {} vs {}", grouped - real, random - real);
    }

    #[test]
    fn length_grouped_steps_are_not_ordered_by_length() {
        let lengths: Vec<usize> = (0..16 * 8).collect();
        let order = length_grouped_order(0, 0, &lengths, 16);
        let longest: Vec<usize> =
            order.chunks(16).map(|s| s.iter().map(|&i| lengths[i]).max().unwrap()).collect();
        let mut descending = longest.clone();
        descending.sort_unstable_by(|a, b| b.cmp(a));
        assert_ne!(longest, descending, "steps came out sorted: {longest:?}");
    }
}
