//! `alignx-trainer retrain`: the periodic job in one command (DESIGN.md §6, promotion).
//!
//! build the dataset from the log → GRPO from the version being served → ACC_jud of
//! both on the holdout users' logged prompt states → promote (publish + re-point) when
//! the candidate is not worse than the current model by more than `tolerance`, else keep
//! the current one and say why. The store's lock makes a second run at the same time
//! return `busy` without touching anything; a run whose dataset equals the one the
//! current version was trained or last judged on returns `no_new_data` (idempotent).

use std::path::PathBuf;
use std::time::Instant;

use alignx_schemas::training::RlRecord;
use serde::{Deserialize, Serialize};
use tch::Device;

use crate::dataset::{self, Dataset, DatasetConfig, DatasetStats, Source};
use crate::eval::{self, Judged, Score};
use crate::judge::Judge;
use crate::model_dir::{self, Dtype};
use crate::model_store::{ModelStore, RedisPointer, StoreError, Version, VersionMeta};
use crate::onnx::export::ExportOptions;
use crate::rl::{self, RlConfig};

pub struct RetrainConfig {
    pub store: PathBuf,
    pub source: Source,
    pub dataset: DatasetConfig,
    pub judge: PathBuf,
    /// GRPO settings; `policy`, `data` and `out` are filled in here.
    pub rl: RlConfig,
    /// ACC_jud the candidate may trail the current model by and still be promoted.
    pub tolerance: f64,
    pub eval_max_new_tokens: usize,
    pub eval_batch: usize,
    /// Read and move `alignx:model:current` too.
    pub redis: Option<RedisPointer>,
    /// Name of the store's symlink to the served version.
    pub current_link: String,
    /// Pushgateway base URL (`http://host:port`): `alignx_trainer_*` metrics are pushed.
    pub pushgateway: Option<String>,
    pub export: ExportOptions,
    pub device: Device,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The candidate was published and is now served.
    Promoted,
    /// Promotion refused: the candidate was worse (or could not be judged); the current
    /// model stays.
    Refused,
    /// Nothing new since the current version was trained or last judged.
    NoNewData,
    /// Another retrain holds the store's lock.
    Busy,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [Self::Promoted, Self::Refused, Self::NoNewData, Self::Busy];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Promoted => "promoted",
            Self::Refused => "refused",
            Self::NoNewData => "no_new_data",
            Self::Busy => "busy",
        }
    }
}

/// ACC_jud of the two models (and no summary) on the same holdout items.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Gate {
    pub items: usize,
    pub no_summary: f64,
    pub current: f64,
    pub candidate: f64,
    pub current_soft: f64,
    pub candidate_soft: f64,
    pub tolerance: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RetrainReport {
    pub outcome: Outcome,
    pub reason: String,
    /// The version served when the run started.
    pub current: Option<String>,
    /// The version published (promoted only).
    pub promoted: Option<String>,
    pub dataset: Option<DatasetStats>,
    pub dataset_hash: Option<String>,
    pub gate: Option<Gate>,
    pub grpo_steps: usize,
    pub grpo_reward_first: Option<f64>,
    pub grpo_reward_last: Option<f64>,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum RetrainError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Dataset(#[from] dataset::DatasetError),
    #[error("grpo: {0}")]
    Rl(#[from] rl::RlError),
    #[error("eval: {0}")]
    Eval(#[from] eval::EvalError),
    #[error("pushgateway: {0}")]
    Push(String),
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
}

/// What the last judged run decided, so that running again on the same data is a no-op.
#[derive(Debug, Serialize, Deserialize)]
struct LastRun {
    current: String,
    dataset_hash: String,
    outcome: Outcome,
    reason: String,
}

const LAST_RUN_FILE: &str = "last_retrain.json";

/// FNV-1a over the records a run would train and gate on.
fn dataset_hash(d: &Dataset) -> String {
    fn json<T: Serialize>(r: &T) -> String {
        serde_json::to_string(r).expect("serialisable")
    }
    let records: Vec<String> = (d.rl_train.iter().chain(&d.rl_holdout).map(json))
        .chain(d.streaming_train.iter().chain(&d.streaming_holdout).map(json))
        .collect();
    let parts: Vec<&[u8]> = records.iter().map(|r| r.as_bytes()).collect();
    format!("{:016x}", dataset::fnv(&parts))
}

pub fn run(cfg: &RetrainConfig) -> Result<RetrainReport, RetrainError> {
    let started = Instant::now();
    let store = ModelStore::open_with_link(&cfg.store, &cfg.current_link)?;
    let mut report = RetrainReport {
        outcome: Outcome::Busy,
        reason: String::new(),
        current: None,
        promoted: None,
        dataset: None,
        dataset_hash: None,
        gate: None,
        grpo_steps: 0,
        grpo_reward_first: None,
        grpo_reward_last: None,
        seconds: 0.0,
    };
    let Some(_lock) = store.try_lock()? else {
        report.reason = "another retrain holds the model store's lock".into();
        return Ok(report);
    };
    let result = judged_run(cfg, &store, &mut report);
    report.seconds = started.elapsed().as_secs_f64();
    if let Some(url) = &cfg.pushgateway {
        let pushed = push_metrics(url, result.as_ref().ok().map(|_| &report));
        // The run's own error is the one to report; a failed push after it is secondary.
        if let (Ok(()), Err(e)) = (&result, pushed) {
            return Err(e);
        }
    }
    result.map(|()| report)
}

fn judged_run(
    cfg: &RetrainConfig,
    store: &ModelStore,
    report: &mut RetrainReport,
) -> Result<(), RetrainError> {
    let current = store.current(cfg.redis.as_ref())?;
    report.current = Some(current.id.clone());
    let work = tempfile::Builder::new()
        .prefix(".retrain-")
        .tempdir_in(store.root())
        .map_err(|e| RetrainError::Io { path: store.root().to_owned(), message: e.to_string() })?;

    let data_dir = work.path().join("dataset");
    let data = dataset::run(&cfg.dataset, &cfg.source, &data_dir)?;
    let hash = dataset_hash(&data);
    report.dataset = Some(data.stats.clone());
    report.dataset_hash = Some(hash.clone());

    if store.meta(&current).ok().and_then(|m| m.dataset_hash).as_deref() == Some(hash.as_str()) {
        report.outcome = Outcome::NoNewData;
        report.reason = format!("{} was trained on this very dataset", current.id);
        return Ok(());
    }
    let last_path = store.root().join(LAST_RUN_FILE);
    if let Some(last) =
        std::fs::read_to_string(&last_path).ok().and_then(|t| serde_json::from_str::<LastRun>(&t).ok())
        && last.current == current.id
        && last.dataset_hash == hash
    {
        report.outcome = Outcome::NoNewData;
        report.reason = format!("already judged against {} on this dataset: {}", current.id, last.reason);
        return Ok(());
    }

    let (outcome, reason) =
        train_and_judge(cfg, store, &current, &data, &data_dir, work.path(), &hash, report)?;
    report.outcome = outcome;
    report.reason = reason.clone();
    let last = LastRun { current: current.id.clone(), dataset_hash: hash, outcome, reason };
    std::fs::write(&last_path, serde_json::to_string_pretty(&last).expect("serialisable"))
        .map_err(|e| RetrainError::Io { path: last_path.clone(), message: e.to_string() })?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn train_and_judge(
    cfg: &RetrainConfig,
    store: &ModelStore,
    current: &Version,
    data: &Dataset,
    data_dir: &std::path::Path,
    work: &std::path::Path,
    hash: &str,
    report: &mut RetrainReport,
) -> Result<(Outcome, String), RetrainError> {
    if data.rl_holdout.is_empty() {
        return Ok((
            Outcome::Refused,
            "no holdout records: the candidate cannot be judged (log more users)".into(),
        ));
    }
    let train_file = match cfg.rl.setting {
        eval::EvalSetting::Base => dataset::RL_TRAIN_FILE,
        eval::EvalSetting::Streaming => dataset::STREAMING_TRAIN_FILE,
    };
    let candidate_dir = work.join("candidate");
    let rl_cfg = RlConfig {
        policy: current.policy.clone(),
        judge: cfg.judge.clone(),
        data: data_dir.join(train_file),
        out: candidate_dir.clone(),
        lora: None,
        ..cfg.rl.clone()
    };
    let summary = rl::run(&rl_cfg)?;
    report.grpo_steps = summary.steps;
    report.grpo_reward_first = Some(summary.reward_first);
    report.grpo_reward_last = Some(summary.reward_last);

    let gate = judge_both(cfg, &current.policy, &candidate_dir, &data.rl_holdout)?;
    report.gate = Some(gate.clone());
    if gate.candidate + cfg.tolerance < gate.current {
        let (candidate, served, points) =
            (100.0 * gate.candidate, 100.0 * gate.current, 100.0 * cfg.tolerance);
        let reason = if cfg.tolerance >= 0.0 {
            format!(
                "candidate ACC_jud {candidate:.1}% is below {}'s {served:.1}% by more than the tolerance \
                 ({points:.1} points) on {} holdout items",
                current.id, gate.items
            )
        } else {
            format!(
                "candidate ACC_jud {candidate:.1}% does not beat {}'s {served:.1}% by the {:.1} points required \
                 on {} holdout items",
                current.id, -points, gate.items
            )
        };
        return Ok((Outcome::Refused, reason));
    }
    let meta = VersionMeta::new(
        Some(current.id.clone()),
        Some(hash.to_owned()),
        serde_json::json!({"gate": gate, "dataset": data.stats, "grpo": {
            "steps": summary.steps, "reward_first": summary.reward_first, "reward_last": summary.reward_last,
        }}),
    );
    let version = store.publish(&candidate_dir, true, meta, &cfg.export)?;
    store.point(&version, cfg.redis.as_ref())?;
    report.promoted = Some(version.id.clone());
    let reason = format!(
        "candidate ACC_jud {:.1}% vs {}'s {:.1}% on {} holdout items (no summary {:.1}%)",
        100.0 * gate.candidate,
        current.id,
        100.0 * gate.current,
        gate.items,
        100.0 * gate.no_summary
    );
    Ok((Outcome::Promoted, reason))
}

/// ACC_jud of the current and the candidate policy on the same holdout prompt states.
fn judge_both(
    cfg: &RetrainConfig,
    current: &std::path::Path,
    candidate: &std::path::Path,
    holdout: &[RlRecord],
) -> Result<Gate, RetrainError> {
    let judge = Judge::load(&cfg.judge, cfg.device).map_err(eval::EvalError::from)?;
    let items: Vec<Judged<'_>> = holdout.iter().map(Judged::from).collect();
    let batch = cfg.eval_batch.max(1);
    let none = vec![""; items.len()];
    let no_summary = eval::score(&judge, &items, &none, batch)?;
    let mut scores: Vec<Score> = Vec::new();
    for dir in [current, candidate] {
        let policy = model_dir::load(dir, cfg.device, Dtype::Fp32).map_err(eval::EvalError::from)?;
        let summaries = eval::summarise_records(
            &policy,
            dir,
            &cfg.dataset.templates,
            holdout,
            cfg.eval_max_new_tokens,
            batch,
            cfg.device,
        )?;
        let texts: Vec<&str> = summaries.iter().map(|s| s.as_deref().unwrap_or("")).collect();
        scores.push(eval::score(&judge, &items, &texts, batch)?);
    }
    Ok(Gate {
        items: items.len(),
        no_summary: no_summary.acc_jud,
        current: scores[0].acc_jud,
        candidate: scores[1].acc_jud,
        current_soft: scores[0].soft,
        candidate_soft: scores[1].soft,
        tolerance: cfg.tolerance,
    })
}

/// The run's metrics in the Prometheus text format (`None`: the run failed). These are
/// the Helm chart's alert contract: `alignx_trainer_retrain_last_outcome{outcome}` (1 for
/// the last run's outcome, `failed` included) and
/// `alignx_trainer_retrain_last_success_timestamp_seconds` (only pushed by runs that
/// finished, so a failure leaves the last success in place).
pub fn metrics_text(r: Option<&RetrainReport>) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, help: &str, samples: &[(String, f64)]| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
        for (labels, v) in samples {
            out.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let last = r.map_or("failed", |r| r.outcome.as_str());
    // `busy` runs push nothing: the run holding the lock reports.
    let outcomes: Vec<(String, f64)> = Outcome::ALL
        .iter()
        .filter(|o| **o != Outcome::Busy)
        .map(|o| o.as_str())
        .chain(["failed"])
        .map(|o| (format!("{{outcome=\"{o}\"}}"), f64::from(u8::from(o == last))))
        .collect();
    metric("alignx_trainer_retrain_last_outcome", "1 for the last retrain's outcome.", &outcomes);
    metric(
        "alignx_trainer_retrain_last_run_timestamp_seconds",
        "When the last retrain ended.",
        &[(String::new(), now)],
    );
    let Some(r) = r else { return out };
    metric(
        "alignx_trainer_retrain_last_success_timestamp_seconds",
        "When a retrain last finished (promoted, refused or no new data).",
        &[(String::new(), now)],
    );
    metric(
        "alignx_trainer_retrain_seconds",
        "How long the last retrain took.",
        &[(String::new(), r.seconds)],
    );
    if let Some(d) = &r.dataset {
        let splits = [("train", d.rl_train), ("holdout", d.rl_holdout)];
        let samples: Vec<(String, f64)> =
            splits.iter().map(|(s, n)| (format!("{{split=\"{s}\"}}"), *n as f64)).collect();
        metric("alignx_trainer_dataset_records", "RL records built from the log, by split.", &samples);
        metric(
            "alignx_trainer_dataset_no_later_pair",
            "Logged updates without a later pair signal (unused).",
            &[(String::new(), d.no_later_pair as f64)],
        );
    }
    if let Some(g) = &r.gate {
        let samples = [
            ("{model=\"current\"}".to_owned(), g.current),
            ("{model=\"candidate\"}".to_owned(), g.candidate),
            ("{model=\"no_summary\"}".to_owned(), g.no_summary),
        ];
        metric("alignx_trainer_acc_jud", "Holdout ACC_jud of the last retrain's models.", &samples);
    }
    if let Some(reward) = r.grpo_reward_last {
        metric(
            "alignx_trainer_grpo_reward_last",
            "Mean reward over the last tenth of the last retrain's GRPO steps.",
            &[(String::new(), reward)],
        );
        metric(
            "alignx_trainer_grpo_steps",
            "GRPO steps of the last retrain.",
            &[(String::new(), r.grpo_steps as f64)],
        );
    }
    out
}

/// POSTs the metrics to a Pushgateway (`http://host:port[/prefix]`, job `alignx_trainer`):
/// metrics of these names replace the job's earlier ones, others stay.
pub fn push_metrics(url: &str, report: Option<&RetrainReport>) -> Result<(), RetrainError> {
    use std::io::{Read, Write};
    let err = |m: String| RetrainError::Push(m);
    let rest =
        url.strip_prefix("http://").ok_or_else(|| err(format!("{url}: only http:// URLs are supported")))?;
    let (host, prefix) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p.trim_end_matches('/')));
    let path = if prefix.is_empty() {
        "/metrics/job/alignx_trainer".to_owned()
    } else {
        format!("/{prefix}/metrics/job/alignx_trainer")
    };
    let body = metrics_text(report);
    let mut stream = std::net::TcpStream::connect(host).map_err(|e| err(format!("{host}: {e}")))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).map_err(|e| err(e.to_string()))?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).map_err(|e| err(e.to_string()))?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| err(e.to_string()))?;
    let status = response.split_whitespace().nth(1).unwrap_or("");
    if !status.starts_with('2') {
        return Err(err(format!("{host}{path} answered {:?}", response.lines().next().unwrap_or(""))));
    }
    Ok(())
}
