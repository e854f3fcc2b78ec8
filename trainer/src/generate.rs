//! Batched, KV-cached generation with the tch model: the trainer's sampler for RL
//! rollouts and `alignx-trainer generate`.
//!
//! Prompts of different lengths are left-padded into one batch; each row stops on its
//! own (EOS, a stop condition, or `max_new_tokens`) and finished rows leave the batch, so
//! the remaining rows stop paying for them. Sampling happens on the host with one seeded
//! RNG per prompt, so a prompt's output does not depend on what it was batched with.

use tch::{Device, Kind, Tensor};

use crate::qwen2::{KvCache, Qwen2};
use crate::rng::Rng;

/// How to pick the next token.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    /// 0: greedy (argmax). Otherwise logits are divided by it before sampling.
    pub temperature: f64,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p`.
    pub top_p: Option<f64>,
    /// Prompt `i` samples from an RNG seeded with `seed + i`.
    pub seed: u64,
}

impl SamplingParams {
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self { max_new_tokens, temperature: 0.0, top_k: None, top_p: None, seed: 0 }
    }
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token (included in `tokens`).
    Eos,
    /// The caller's stop condition held (the tokens that made it hold are included).
    Stop,
    /// `max_new_tokens` were generated.
    Length,
}

/// One prompt's continuation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    pub tokens: Vec<i64>,
    pub finish: Finish,
}

/// The first index of the largest value, as `torch.argmax` picks.
fn argmax(logits: &[f32]) -> usize {
    logits.iter().enumerate().fold(0, |best, (i, &v)| if v > logits[best] { i } else { best })
}

/// Picks a token id from one row of logits.
fn sample(logits: &[f32], p: &SamplingParams, rng: &mut Rng) -> i64 {
    if p.temperature <= 0.0 {
        return argmax(logits) as i64;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if let Some(k) = p.top_k {
        order.truncate(k.max(1));
    }
    let max = f64::from(logits[order[0]]);
    let mut probs: Vec<f64> =
        order.iter().map(|&i| ((f64::from(logits[i]) - max) / p.temperature).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= total);
    if let Some(top_p) = p.top_p {
        let mut cumulative = 0.0;
        let keep = probs
            .iter()
            .position(|q| {
                cumulative += q;
                cumulative >= top_p
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        order.truncate(keep);
        let kept: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= kept);
    }
    let mut u = rng.next_f64();
    for (&i, &q) in order.iter().zip(&probs) {
        if u < q {
            return i as i64;
        }
        u -= q;
    }
    order[order.len() - 1] as i64
}

/// Continues every prompt. `stop(i, tokens)` is asked after each new token of prompt
/// `i` (e.g. "does the decoded text end with a stop string?").
/// A batch of prompts as `[n, width]` tensors on `device`, `(input_ids, attention_mask,
/// position_ids)`, left-padded: real tokens end at the same column (so a next token is
/// appended to every row at once) and count positions from 0.
pub fn left_padded(prompts: &[Vec<i64>], device: Device) -> (Tensor, Tensor, Tensor) {
    let n = prompts.len();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut ids = vec![0i64; n * width];
    let mut mask = vec![0i64; n * width];
    let mut positions = vec![0i64; n * width];
    for (r, p) in prompts.iter().enumerate() {
        let start = width - p.len();
        for (j, &t) in p.iter().enumerate() {
            ids[r * width + start + j] = t;
            mask[r * width + start + j] = 1;
            positions[r * width + start + j] = j as i64;
        }
    }
    let to = |v: &[i64]| Tensor::from_slice(v).view([n as i64, width as i64]).to_device(device);
    (to(&ids), to(&mask), to(&positions))
}

pub fn generate(
    model: &Qwen2,
    prompts: &[Vec<i64>],
    params: &SamplingParams,
    eos: &[i64],
    mut stop: impl FnMut(usize, &[i64]) -> bool,
    device: Device,
) -> Vec<Generation> {
    let n = prompts.len();
    let mut out: Vec<Generation> = vec![Generation { tokens: Vec::new(), finish: Finish::Length }; n];
    if n == 0 || params.max_new_tokens == 0 {
        return out;
    }
    let mut rngs: Vec<Rng> = (0..n).map(|i| Rng::new(params.seed.wrapping_add(i as u64))).collect();
    let (input_ids, mut mask_t, positions) = left_padded(prompts, device);
    let mut next_pos: Vec<i64> = prompts.iter().map(|p| p.len() as i64).collect();
    let mut cache = KvCache::new();
    let mut active: Vec<usize> = (0..n).collect();
    let mut logits =
        tch::no_grad(|| model.forward(&input_ids, &mask_t, &positions, &mut cache)).select(1, -1);
    loop {
        let rows = Vec::<f32>::try_from(logits.to_kind(Kind::Float).to_device(Device::Cpu).flatten(0, -1))
            .expect("f32 logits");
        let vocab = rows.len() / active.len();
        let mut keep = Vec::with_capacity(active.len());
        let mut next = Vec::with_capacity(active.len());
        for (slot, &r) in active.iter().enumerate() {
            let token = sample(&rows[slot * vocab..(slot + 1) * vocab], params, &mut rngs[r]);
            let g = &mut out[r];
            g.tokens.push(token);
            let finish = if eos.contains(&token) {
                Some(Finish::Eos)
            } else if stop(r, &g.tokens) {
                Some(Finish::Stop)
            } else if g.tokens.len() >= params.max_new_tokens {
                Some(Finish::Length)
            } else {
                None
            };
            match finish {
                Some(f) => g.finish = f,
                None => {
                    keep.push(slot as i64);
                    next.push(token);
                }
            }
        }
        if keep.is_empty() {
            return out;
        }
        if keep.len() < active.len() {
            let rows = Tensor::from_slice(&keep).to_device(device);
            cache.select_rows(&rows);
            mask_t = mask_t.index_select(0, &rows);
            active = keep.iter().map(|&s| active[s as usize]).collect();
        }
        let m = active.len() as i64;
        mask_t = Tensor::cat(&[&mask_t, &Tensor::ones([m, 1], (Kind::Int64, device))], 1);
        let pos: Vec<i64> = active.iter().map(|&r| next_pos[r]).collect();
        for &r in &active {
            next_pos[r] += 1;
        }
        let input = Tensor::from_slice(&next).view([m, 1]).to_device(device);
        let pos = Tensor::from_slice(&pos).view([m, 1]).to_device(device);
        logits = tch::no_grad(|| model.forward(&input, &mask_t, &pos, &mut cache)).select(1, -1);
    }
}

/// Continues one prompt text, encoded as-is (no chat template, no added BOS), and
/// decodes the continuation. Generation also stops once the decoded text ends with
/// one of `stops` (which is kept in the text, as answer parsing expects `</answer>`).
pub fn complete_text(
    loaded: &crate::model_dir::LoadedModel,
    prompt: &str,
    params: &SamplingParams,
    stops: &[String],
    device: Device,
) -> Result<(String, Finish), tokenizers::Error> {
    let tok = &loaded.tokenizer;
    let ids = crate::tokenizer::encode_ids(tok, prompt)?;
    let decode = |t: &[i64]| tok.decode(&t.iter().map(|&i| i as u32).collect::<Vec<_>>(), false);
    let stop =
        |_: usize, t: &[i64]| decode(t).is_ok_and(|text| stops.iter().any(|s| text.ends_with(s.as_str())));
    let g = generate(&loaded.model, &[ids], params, &loaded.eos, stop, device).remove(0);
    Ok((decode(&g.tokens)?, g.finish))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_one_and_zero_temperature_are_argmax() {
        let logits = [0.1f32, 2.0, -1.0, 2.0, 0.5];
        let mut rng = Rng::new(1);
        assert_eq!(sample(&logits, &SamplingParams::greedy(1), &mut rng), 1);
        let k1 = SamplingParams { temperature: 1.0, top_k: Some(1), ..SamplingParams::greedy(1) };
        assert_eq!(sample(&logits, &k1, &mut rng), 1);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.8 keeps the first two.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let p = SamplingParams { temperature: 1.0, top_p: Some(0.8), ..SamplingParams::greedy(1) };
        let mut rng = Rng::new(42);
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[sample(&logits, &p, &mut rng) as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        // Renormalised over the nucleus: 0.64/0.88 ≈ 0.73.
        let share = seen[0] as f64 / 2000.0;
        assert!((share - 0.73).abs() < 0.04, "{seen:?}");
    }
}
