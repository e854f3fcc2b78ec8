//! `alignx-trainer eval`: ACC_jud — how often a judge, reading a user's preference
//! summary, picks the response the user really chose on held-out comparisons.
//!
//! Summaries come from a policy (generated from the user's history), and two baselines
//! are scored on the same items: no summary (≈ 50% for a judge that has learnt nothing
//! about the user) and, when the eval records carry it, the user's true preferences
//! (`latent_summary`, our synthetic world's extension) — the judge's upper bound.
//!
//! Histories are read as the paper's eval data holds them: the user's pairs, in order.
//! The base setting shows the policy the last `window` pairs; the streaming setting walks
//! the pairs window by window, each step's summary becoming the next step's past.

use std::collections::HashMap;
use std::path::PathBuf;

use alignx_schemas::prompt::{Evidence, Setting, Templates};
use alignx_schemas::training::{Choice, EvalRecord, HistoryPair, RlRecord, read_records};
use serde::Serialize;
use tch::Device;

use crate::generate::{self, SamplingParams};
use crate::judge::{Judge, JudgeError, JudgeItem};
use crate::model_dir::{self, Dtype, LoadError, LoadedModel};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EvalSetting {
    Base,
    Streaming,
}

#[derive(Debug, Clone)]
pub struct EvalConfig {
    pub policy: Option<PathBuf>,
    /// A second policy scored on the same items, reported as a paired difference.
    pub compare: Option<PathBuf>,
    pub judge: PathBuf,
    pub data: PathBuf,
    pub setting: EvalSetting,
    pub window: usize,
    pub max_new_tokens: usize,
    pub batch_size: usize,
    pub device: Device,
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path}: {problems}")]
    Invalid { path: PathBuf, problems: String },
    #[error("{path}: no eval records")]
    Empty { path: PathBuf },
    #[error("policy model: {0}")]
    Policy(#[from] LoadError),
    #[error(transparent)]
    Judge(#[from] JudgeError),
    #[error("policy tokenizer: {0}")]
    Tokenizer(String),
}

/// Accuracy of one summary source on the items.
#[derive(Debug, Clone, Serialize)]
pub struct Score {
    /// Share of items where the judge's more likely answer is the user's (a tie counts ½).
    pub acc_jud: f64,
    /// Mean probability the judge gives the user's answer.
    pub soft: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub data: String,
    pub items: usize,
    pub histories: usize,
    pub setting: EvalSetting,
    pub no_summary: Score,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latent_summary: Option<Score>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<Score>,
    /// Policy generations with no parsable `<answer>` (scored as no summary).
    pub answer_failures: usize,
    /// `compare`'s policy against `policy`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compared: Option<Paired>,
    /// A few (history index, summary) for reading.
    pub examples: Vec<String>,
    pub seconds: f64,
}

/// One judged comparison: the post, the two responses as shown, and the user's choice.
#[derive(Debug, Clone, Copy)]
pub struct Judged<'a> {
    pub post: &'a str,
    pub a: &'a str,
    pub b: &'a str,
    pub answer: Choice,
}

impl<'a> From<&'a EvalRecord> for Judged<'a> {
    fn from(r: &'a EvalRecord) -> Self {
        Self { post: &r.prompt, a: &r.response_a, b: &r.response_b, answer: r.answer }
    }
}

impl<'a> From<&'a RlRecord> for Judged<'a> {
    fn from(r: &'a RlRecord) -> Self {
        let c = &r.comparison;
        Self { post: &c.task, a: &c.response_a, b: &c.response_b, answer: r.ground_truth }
    }
}

/// Per item: ([`credit`], probability of the user's answer).
fn judged(
    judge: &Judge,
    items: &[Judged<'_>],
    summaries: &[&str],
    batch: usize,
) -> Result<Vec<(f64, f64)>, EvalError> {
    let judged: Vec<JudgeItem<'_>> = items
        .iter()
        .zip(summaries)
        .map(|(r, s)| JudgeItem { post: r.post, summary: s, a: r.a, b: r.b })
        .collect();
    let p = judge.prob_a(&judged, batch)?;
    Ok(items
        .iter()
        .zip(&p)
        .map(|(r, pa)| {
            let right = p_right(r.answer, *pa);
            (credit(right), right)
        })
        .collect())
}

/// The judge's probability of the user's answer, from its probability of `A`.
pub fn p_right(answer: Choice, p_a: f64) -> f64 {
    if answer == Choice::A { p_a } else { 1.0 - p_a }
}

/// ACC_jud's credit for one item, from the judge's probability of the user's answer:
/// 1 when that answer is the more likely, ½ on a tie, else 0. Also R_jud's hard reward,
/// so training and the promotion gate count alike.
pub fn credit(p_right: f64) -> f64 {
    if p_right > 0.5 {
        1.0
    } else if p_right == 0.5 {
        0.5
    } else {
        0.0
    }
}

fn mean_score(per_item: &[(f64, f64)]) -> Score {
    let n = per_item.len().max(1) as f64;
    Score {
        acc_jud: per_item.iter().map(|c| c.0).sum::<f64>() / n,
        soft: per_item.iter().map(|c| c.1).sum::<f64>() / n,
    }
}

/// ACC_jud of `summaries` (one per item) on `items`.
pub fn score(
    judge: &Judge,
    items: &[Judged<'_>],
    summaries: &[&str],
    batch: usize,
) -> Result<Score, EvalError> {
    Ok(mean_score(&judged(judge, items, summaries, batch)?))
}

/// A second policy against the first on the same items: the paired difference of their
/// per-item credit, with its standard error clustered by history (the items of one
/// history share one summary, so they are not independent draws).
#[derive(Debug, Clone, Serialize)]
pub struct Paired {
    pub policy: String,
    pub score: Score,
    /// ACC_jud of this policy minus the first's.
    pub difference: f64,
    pub standard_error: f64,
    /// Histories (summaries) the standard error treats as independent.
    pub clusters: usize,
    /// Items only this policy got right, and only the first.
    pub better: usize,
    pub worse: usize,
}

/// `cluster[i]`: which history item `i` belongs to (dense indices from 0).
fn paired(
    policy: &std::path::Path,
    first: &[(f64, f64)],
    second: &[(f64, f64)],
    cluster: &[usize],
) -> Paired {
    let d: Vec<f64> = first.iter().zip(second).map(|(a, b)| b.0 - a.0).collect();
    let n = d.len().max(1) as f64;
    let mean = d.iter().sum::<f64>() / n;
    let clusters = cluster.iter().max().map_or(0, |m| m + 1);
    let mut residual = vec![0.0; clusters];
    for (&c, x) in cluster.iter().zip(&d) {
        residual[c] += x - mean;
    }
    // Cluster-robust variance of a mean, with the small-sample factor C/(C−1).
    let g = clusters as f64;
    let var = residual.iter().map(|r| r * r).sum::<f64>() / (n * n) * g / (g - 1.0).max(1.0);
    Paired {
        policy: policy.display().to_string(),
        score: mean_score(second),
        difference: mean,
        standard_error: var.sqrt(),
        clusters,
        better: d.iter().filter(|&&x| x > 0.0).count(),
        worse: d.iter().filter(|&&x| x < 0.0).count(),
    }
}

/// Whether the generation `tokens` has just closed its answer (`</answer>` in the
/// last few tokens): where summary generation stops.
pub fn answer_closed(tok: &tokenizers::Tokenizer, tokens: &[i64]) -> bool {
    let tail: Vec<u32> = tokens[tokens.len().saturating_sub(6)..].iter().map(|&i| i as u32).collect();
    tok.decode(&tail, false).is_ok_and(|s| s.contains("</answer>"))
}

/// Greedy summaries for a batch of prompts (`None` where no `<answer>` was produced).
pub fn summarise(
    policy: &LoadedModel,
    prompts: &[String],
    max_new_tokens: usize,
    batch: usize,
    device: Device,
) -> Result<Vec<Option<String>>, EvalError> {
    let tok = &policy.tokenizer;
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(batch.max(1)) {
        let ids: Vec<Vec<i64>> = chunk
            .iter()
            .map(|p| crate::tokenizer::encode_ids(tok, p).map_err(|e| EvalError::Tokenizer(e.to_string())))
            .collect::<Result<_, _>>()?;
        let decode = |t: &[i64]| tok.decode(&t.iter().map(|&i| i as u32).collect::<Vec<_>>(), false);
        let stop = |_: usize, t: &[i64]| answer_closed(tok, t);
        let params = SamplingParams::greedy(max_new_tokens);
        for g in generate::generate(&policy.model, &ids, &params, &policy.eos, stop, device) {
            let text = decode(&g.tokens).map_err(|e| EvalError::Tokenizer(e.to_string()))?;
            out.push(alignx_schemas::answer::parse_answer(&text, 2048).ok().map(|a| a.summary));
        }
    }
    Ok(out)
}

fn evidence(pairs: &[HistoryPair]) -> Evidence {
    Evidence { pairs: pairs.to_vec(), ..Evidence::default() }
}

/// One summary per distinct history.
fn policy_summaries(
    cfg: &EvalConfig,
    dir: &std::path::Path,
    policy: &LoadedModel,
    histories: &[&[HistoryPair]],
) -> Result<Vec<Option<String>>, EvalError> {
    let templates = Templates::default();
    let bos = alignx_schemas::prompt::bos_text(dir);
    let window = cfg.window.max(1);
    match cfg.setting {
        EvalSetting::Base => {
            let prompts: Vec<String> = histories
                .iter()
                .map(|h| {
                    templates.render(&bos, Setting::Base, &evidence(&h[h.len().saturating_sub(window)..]))
                })
                .collect();
            summarise(policy, &prompts, cfg.max_new_tokens, cfg.batch_size, cfg.device)
        }
        EvalSetting::Streaming => {
            let mut current: Vec<Option<String>> = vec![None; histories.len()];
            let steps = histories.iter().map(|h| h.len().div_ceil(window)).max().unwrap_or(0);
            for k in 0..steps {
                let active: Vec<usize> =
                    (0..histories.len()).filter(|&i| k * window < histories[i].len()).collect();
                let prompts: Vec<String> = active
                    .iter()
                    .map(|&i| {
                        let h = histories[i];
                        let w = &h[k * window..((k + 1) * window).min(h.len())];
                        templates.render(
                            &bos,
                            Setting::Streaming { past: current[i].as_deref() },
                            &evidence(w),
                        )
                    })
                    .collect();
                let got = summarise(policy, &prompts, cfg.max_new_tokens, cfg.batch_size, cfg.device)?;
                for (&i, s) in active.iter().zip(got) {
                    // A failed step keeps the previous summary, as the consumer does.
                    if s.is_some() {
                        current[i] = s;
                    }
                }
            }
            Ok(current)
        }
    }
}

pub fn run(cfg: &EvalConfig) -> Result<EvalReport, EvalError> {
    let started = std::time::Instant::now();
    let text = std::fs::read_to_string(&cfg.data)
        .map_err(|e| EvalError::Read { path: cfg.data.clone(), message: e.to_string() })?;
    let records: Vec<EvalRecord> = read_records(&text)
        .map_err(|p| EvalError::Invalid { path: cfg.data.clone(), problems: p.to_string() })?;
    if records.is_empty() {
        return Err(EvalError::Empty { path: cfg.data.clone() });
    }
    let judge = Judge::load(&cfg.judge, cfg.device)?;
    let batch = cfg.batch_size.max(1);
    let items: Vec<Judged<'_>> = records.iter().map(Judged::from).collect();
    let none: Vec<&str> = vec![""; records.len()];
    let no_summary = score(&judge, &items, &none, batch)?;
    let latent = match records.iter().map(|r| r.latent_summary.as_deref()).collect::<Option<Vec<&str>>>() {
        Some(s) => Some(score(&judge, &items, &s, batch)?),
        None => None,
    };

    // Distinct histories, in first-seen order.
    let mut index: HashMap<&[HistoryPair], usize> = HashMap::new();
    let mut histories: Vec<&[HistoryPair]> = Vec::new();
    let of: Vec<usize> = records
        .iter()
        .map(|r| {
            *index.entry(r.pairs.as_slice()).or_insert_with(|| {
                histories.push(r.pairs.as_slice());
                histories.len() - 1
            })
        })
        .collect();
    // Per item: each policy's summary of the item's history, judged.
    type Credited = (Vec<(f64, f64)>, Vec<Option<String>>);
    let judge_policy = |dir: &std::path::Path| -> Result<Credited, EvalError> {
        let policy = model_dir::load(dir, cfg.device, Dtype::Fp32)?;
        let summaries = policy_summaries(cfg, dir, &policy, &histories)?;
        let per_item: Vec<&str> = of.iter().map(|&h| summaries[h].as_deref().unwrap_or("")).collect();
        Ok((judged(&judge, &items, &per_item, batch)?, summaries))
    };
    let (mut policy_score, mut failures, mut examples, mut compared) = (None, 0, Vec::new(), None);
    if let Some(dir) = &cfg.policy {
        let (credit, summaries) = judge_policy(dir)?;
        failures = summaries.iter().filter(|s| s.is_none()).count();
        examples = summaries.iter().take(3).map(|s| s.clone().unwrap_or_default()).collect();
        policy_score = Some(mean_score(&credit));
        if let Some(other) = &cfg.compare {
            compared = Some(paired(other, &credit, &judge_policy(other)?.0, &of));
        }
    }
    Ok(EvalReport {
        data: cfg.data.display().to_string(),
        items: records.len(),
        histories: histories.len(),
        setting: cfg.setting,
        no_summary,
        latent_summary: latent,
        policy: policy_score,
        answer_failures: failures,
        compared,
        examples,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Greedy summaries of `rl_train`-format records: each record's problem text (for logged
/// data, the prompt state the consumer served) wrapped as `policy_dir`'s model sees it.
pub fn summarise_records(
    policy: &LoadedModel,
    policy_dir: &std::path::Path,
    templates: &Templates,
    records: &[RlRecord],
    max_new_tokens: usize,
    batch: usize,
    device: Device,
) -> Result<Vec<Option<String>>, EvalError> {
    let bos = alignx_schemas::prompt::bos_text(policy_dir);
    let prompts: Vec<String> = records.iter().map(|r| templates.wrap(&bos, &r.value)).collect();
    summarise(policy, &prompts, max_new_tokens, batch, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_standard_error_is_clustered_by_history() {
        let first = [(0.0, 0.0); 4];
        let second = [(1.0, 1.0), (1.0, 1.0), (0.0, 0.0), (0.0, 0.0)];
        let p = std::path::Path::new("p");
        // One item per history: the usual standard error of a mean, s/√n.
        let iid = paired(p, &first, &second, &[0, 1, 2, 3]);
        assert!((iid.difference - 0.5).abs() < 1e-12);
        assert!((iid.standard_error - (1.0f64 / 12.0).sqrt()).abs() < 1e-12, "{}", iid.standard_error);
        // The gains all in one history and the losses in another: two draws, not four.
        let clustered = paired(p, &first, &second, &[0, 0, 1, 1]);
        assert_eq!(clustered.clusters, 2);
        assert!((clustered.standard_error - 0.5).abs() < 1e-12, "{}", clustered.standard_error);
        assert_eq!((clustered.better, clustered.worse), (2, 0));
    }
}
