//! Picking the next token from a row of logits: greedy, temperature, top-k, top-p and
//! repetition penalty, with a seeded RNG per request so that a generation can be
//! reproduced from its seed alone.
//!
//! The order of operations is Hugging Face `generate`'s: repetition penalty, then
//! temperature, then top-k, then top-p over the renormalised distribution. Greedy takes
//! the first index of the largest logit, as `torch.argmax` does, so greedy generations
//! match the trainer's token for token.

pub use alignx_schemas::rng::Rng;
use serde::Deserialize;

/// How one request samples.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    /// 0: greedy. Otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (1: all).
    pub top_p: f32,
    /// > 1 discourages tokens already in the prompt or generation (1: off).
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { max_new_tokens: 512, temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0 }
    }
}

impl SamplingParams {
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self { max_new_tokens, ..Self::default() }
    }
}

/// The first index of the largest value.
pub fn argmax(logits: &[f32]) -> usize {
    logits.iter().enumerate().fold(0, |best, (i, &v)| if v > logits[best] { i } else { best })
}

/// Applies the repetition penalty in place to the logits of `seen` tokens.
pub fn penalise(logits: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    for &t in seen {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

/// Picks a token from one row of logits (already penalised).
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    if p.temperature <= 0.0 {
        return argmax(logits) as u32;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let k = if p.top_k == 0 { logits.len() } else { p.top_k.min(logits.len()) };
    // Only the top k need sorting.
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, |&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        order.truncate(k);
    }
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let max = f64::from(logits[order[0]]);
    let t = f64::from(p.temperature);
    let mut probs: Vec<f64> = order.iter().map(|&i| ((f64::from(logits[i]) - max) / t).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= total);
    if p.top_p < 1.0 {
        let mut cumulative = 0.0;
        let keep = probs
            .iter()
            .position(|q| {
                cumulative += q;
                cumulative >= f64::from(p.top_p)
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
            return i as u32;
        }
        u -= q;
    }
    order[order.len() - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(sample(&[0.1, 3.0, 3.0, -1.0], &SamplingParams::greedy(1), &mut Rng::new(0)), 1);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_choice_and_seeds_reproduce() {
        let logits = [2.0, 1.9, 0.0, -5.0, 1.8];
        let p = SamplingParams { temperature: 1.0, top_k: 2, ..SamplingParams::default() };
        let mut rng = Rng::new(7);
        let picks: Vec<u32> = (0..200).map(|_| sample(&logits, &p, &mut rng)).collect();
        assert!(picks.iter().all(|&t| t == 0 || t == 1), "top-2 only");
        assert!(picks.contains(&0) && picks.contains(&1));
        let mut again = Rng::new(7);
        assert_eq!(picks, (0..200).map(|_| sample(&logits, &p, &mut again)).collect::<Vec<_>>());

        let nucleus = SamplingParams { temperature: 1.0, top_p: 0.01, ..SamplingParams::default() };
        assert!((0..50).all(|_| sample(&logits, &nucleus, &mut rng) == 0), "a tiny nucleus is the argmax");
    }

    #[test]
    fn repetition_penalty_shrinks_seen_logits_towards_less_likely() {
        let mut logits = [2.0, -1.0, 0.5];
        penalise(&mut logits, &[0, 1], 2.0);
        assert_eq!(logits, [1.0, -2.0, 0.5]);
    }
}
