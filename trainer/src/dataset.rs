//! `alignx-trainer build-dataset`: RL records from what the consumer logged (DESIGN.md
//! §6, "logged data → training data").
//!
//! Each update the consumer logged is a prompt state the policy really met: the user's
//! previous summary and a window of signals. The user's next `pair` signal after that
//! window is what the summary should have predicted, so it becomes the record's ground
//! truth. Records are written in the paper's formats (`rl_train`, `streaming_rl_train`),
//! the users split into train and holdout by a seeded hash of the user id, so a user
//! never lands on both sides and the split does not move as the log grows.
//!
//! What is dropped, and counted in [`DatasetStats`]: duplicate log records (the outbox
//! re-sends a record after a crash; the same window and version twice), `stale` attempts
//! (another update of the same window got there first), updates with no later pair
//! (the user has not chosen since), and everything of an erased user up to the erasure.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use alignx_schemas::inference_log::{InferenceLogRecord, LogTopicRecord, LoggedSignal, UpdateOutcome};
use alignx_schemas::prompt::{Evidence, Setting, Templates};
use alignx_schemas::rng::Fnv1a;
use alignx_schemas::signal::{Signal, SignalBody};
use alignx_schemas::training::{
    Choice, Comparison, RlRecord, StreamingEntry, StreamingRlRecord, StreamingStep,
};
use serde::Serialize;

use crate::eval::EvalSetting;
use crate::rng::Rng;

pub const RL_TRAIN_FILE: &str = "rl_train.jsonl";
pub const STREAMING_TRAIN_FILE: &str = "streaming_rl_train.jsonl";
pub const RL_HOLDOUT_FILE: &str = "rl_holdout.jsonl";
pub const STREAMING_HOLDOUT_FILE: &str = "streaming_rl_holdout.jsonl";
pub const STATS_FILE: &str = "dataset_stats.json";

#[derive(Debug, Clone)]
pub struct DatasetConfig {
    /// How `rl_train` prompts are written: `streaming` (the previous summary the
    /// consumer had, as it served them) or `base` (the window alone).
    pub setting: EvalSetting,
    /// Share of users held out (by a hash of the user id and `seed`).
    pub holdout: f64,
    /// Seeds the split and the A/B order of each comparison.
    pub seed: u64,
    pub templates: Templates,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        Self { setting: EvalSetting::Streaming, holdout: 0.2, seed: 0, templates: Templates::default() }
    }
}

/// What the builder saw and kept, printed and written as `dataset_stats.json`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct DatasetStats {
    pub log_records: usize,
    pub erasures: usize,
    pub signals: usize,
    /// Log records repeated (outbox re-sends): same user, window and version.
    pub duplicates: usize,
    /// `stale` attempts: the window was applied by another attempt.
    pub stale: usize,
    /// Records and signals of erased users, up to their erasure.
    pub erased: usize,
    /// Updates whose user has chosen no pair since the window.
    pub no_later_pair: usize,
    /// Logged prompts that do not contain the problem re-rendered from their signals with
    /// this run's templates (the consumer ran other templates, or the record is damaged).
    pub prompt_mismatch: usize,
    pub users_train: usize,
    pub users_holdout: usize,
    pub rl_train: usize,
    pub rl_holdout: usize,
    /// Users with two or more consecutive applied updates (streaming records need them).
    pub streaming_train: usize,
    pub streaming_holdout: usize,
    /// Messages read from Kafka that were not valid signals or log records (skipped).
    pub unreadable_messages: usize,
}

/// The built records, before they are written.
#[derive(Debug, Default)]
pub struct Dataset {
    pub rl_train: Vec<RlRecord>,
    pub rl_holdout: Vec<RlRecord>,
    pub streaming_train: Vec<StreamingRlRecord>,
    pub streaming_holdout: Vec<StreamingRlRecord>,
    pub stats: DatasetStats,
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path} line {line}: {message}")]
    Parse { path: PathBuf, line: usize, message: String },
    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },
    #[error("--holdout must be in [0, 1), got {0}")]
    Holdout(f64),
    #[error(
        "no RL records: {updates} usable updates in {log_records} log records, {no_later_pair} without a \
         later pair signal ({signals} signals read) — the log and the signals must cover the same users"
    )]
    Empty { log_records: usize, updates: usize, no_later_pair: usize, signals: usize },
    #[error("kafka: {0}")]
    Kafka(String),
}

/// FNV-1a of `parts`, each followed by 0xff (so `["ab", "c"]` and `["a", "bc"]`
/// differ), for the split and the A/B seeds: stable across runs, platforms and versions.
pub(crate) fn fnv(parts: &[&[u8]]) -> u64 {
    parts.iter().fold(Fnv1a::default(), |h, p| h.write(p).write(&[0xff])).finish()
}

/// Whether `user` is held out: the same answer for a seed whatever else is in the log.
pub fn is_holdout(user: &str, seed: u64, share: f64) -> bool {
    let h = fnv(&[b"split", &seed.to_le_bytes(), user.as_bytes()]);
    (h % 1_000_000) as f64 / 1_000_000.0 < share
}

/// What makes two log records the same update: user, starting version, window positions.
type UpdateKey = (String, u64, Vec<(i32, i64)>);

/// One usable logged update and the comparison that scores it.
struct Update {
    record: InferenceLogRecord,
    comparison: Comparison,
}

/// The user's next pair after `(partition, offset)` in `signals` (sorted by partition
/// and offset), A/B order seeded by its identity.
fn next_pair(signals: &[LoggedSignal], partition: i32, offset: i64, seed: u64) -> Option<Comparison> {
    let after = signals.partition_point(|s| (s.partition, s.offset) <= (partition, offset));
    let s = signals[after..].iter().take_while(|s| s.partition == partition).find(|s| is_pair(&s.signal))?;
    let SignalBody::Pair { post, chosen, rejected } = &s.signal.body else { return None };
    let mut rng =
        Rng::new(fnv(&[b"ab", &seed.to_le_bytes(), s.signal.user_id.as_bytes(), &s.offset.to_le_bytes()]));
    let answer = if rng.next_u64().is_multiple_of(2) { Choice::A } else { Choice::B };
    let (a, b) = match answer {
        Choice::A => (chosen.clone(), rejected.clone()),
        Choice::B => (rejected.clone(), chosen.clone()),
    };
    Some(Comparison {
        task: post.clone(),
        chosen: chosen.clone(),
        rejected: rejected.clone(),
        response_a: a,
        response_b: b,
        answer,
    })
}

fn is_pair(s: &Signal) -> bool {
    matches!(s.body, SignalBody::Pair { .. })
}

/// Builds the records from the log topic's records (in topic order) and the signals.
pub fn build(
    cfg: &DatasetConfig,
    log: Vec<LogTopicRecord>,
    signals: Vec<LoggedSignal>,
) -> Result<Dataset, DatasetError> {
    if !(0.0..1.0).contains(&cfg.holdout) {
        return Err(DatasetError::Holdout(cfg.holdout));
    }
    let mut stats = DatasetStats { log_records: log.len(), signals: signals.len(), ..Default::default() };

    // Erasures first: everything of the user stamped at or before the latest one goes.
    let mut erased_at: HashMap<String, i64> = HashMap::new();
    for r in &log {
        if let LogTopicRecord::Erasure(e) = r {
            stats.erasures += 1;
            let at = erased_at.entry(e.user_id.clone()).or_default();
            *at = (*at).max(i64::try_from(e.erased_at_ms).unwrap_or(i64::MAX));
        }
    }
    let erased = |user: &str, ms: i64| erased_at.get(user).is_some_and(|&at| ms <= at);

    let mut by_user: HashMap<String, Vec<LoggedSignal>> = HashMap::new();
    for s in signals {
        if erased(&s.signal.user_id, s.signal.ts.unix_ms()) {
            stats.erased += 1;
            continue;
        }
        by_user.entry(s.signal.user_id.clone()).or_default().push(s);
    }
    for list in by_user.values_mut() {
        list.sort_by_key(|s| (s.partition, s.offset));
        list.dedup_by_key(|s| (s.partition, s.offset));
    }

    let mut seen: HashSet<UpdateKey> = HashSet::new();
    let mut updates: BTreeMap<String, Vec<Update>> = BTreeMap::new();
    let mut usable = 0;
    for r in log {
        let LogTopicRecord::Update(record) = r else { continue };
        let record = *record;
        if record.outcome == UpdateOutcome::Stale {
            stats.stale += 1;
            continue;
        }
        // The consumer refuses signals stamped at or before an erasure, so a window
        // whose newest signal is that old was applied before it.
        let newest_signal = record.signals.iter().map(|s| s.signal.ts.unix_ms()).max().unwrap_or(0);
        if erased(&record.user_id, newest_signal) {
            stats.erased += 1;
            continue;
        }
        let window: Vec<(i32, i64)> = record.signals.iter().map(|s| (s.partition, s.offset)).collect();
        let Some(&(partition, last)) = window.iter().max_by_key(|(_, o)| *o) else { continue };
        if !seen.insert((record.user_id.clone(), record.previous_version, window)) {
            stats.duplicates += 1;
            continue;
        }
        usable += 1;
        let user_signals = by_user.get(&record.user_id).map(Vec::as_slice).unwrap_or_default();
        let Some(comparison) = next_pair(user_signals, partition, last, cfg.seed) else {
            stats.no_later_pair += 1;
            continue;
        };
        updates.entry(record.user_id.clone()).or_default().push(Update { record, comparison });
    }

    let mut out = Dataset::default();
    for (user, mut list) in updates {
        let holdout = is_holdout(&user, cfg.seed, cfg.holdout);
        if holdout {
            stats.users_holdout += 1;
        } else {
            stats.users_train += 1;
        }
        list.sort_by_key(|u| (u.record.previous_version, u.record.signals.first().map(|s| s.offset)));
        for u in &list {
            let value = problem(cfg, &u.record);
            if !u.record.prompt.contains(&value) {
                stats.prompt_mismatch += 1;
            }
            let record =
                RlRecord { value, comparison: u.comparison.clone(), ground_truth: u.comparison.answer };
            if holdout { &mut out.rl_holdout } else { &mut out.rl_train }.push(record);
        }
        if let Some(chain) = streaming_chain(&cfg.templates, &list) {
            if holdout { &mut out.streaming_holdout } else { &mut out.streaming_train }.push(chain);
        }
    }
    stats.rl_train = out.rl_train.len();
    stats.rl_holdout = out.rl_holdout.len();
    stats.streaming_train = out.streaming_train.len();
    stats.streaming_holdout = out.streaming_holdout.len();
    if out.rl_train.is_empty() && out.rl_holdout.is_empty() {
        return Err(DatasetError::Empty {
            log_records: stats.log_records,
            updates: usable,
            no_later_pair: stats.no_later_pair,
            signals: stats.signals,
        });
    }
    out.stats = stats;
    Ok(out)
}

/// The problem text of a logged update as `rl_train` holds it.
fn problem(cfg: &DatasetConfig, r: &InferenceLogRecord) -> String {
    let ev = Evidence::from_signals(r.signals.iter().map(|s| &s.signal));
    let setting = match cfg.setting {
        EvalSetting::Base => Setting::Base,
        EvalSetting::Streaming => Setting::Streaming { past: r.previous_summary.as_deref() },
    };
    cfg.templates.problem(setting, &ev)
}

/// A user's applied updates, in version order, as one streaming history: the longest run
/// of consecutive versions (each step's summary fed the next). Steps have no past in
/// their text: streaming RL puts the summary it sampled for the step before there.
fn streaming_chain(templates: &Templates, list: &[Update]) -> Option<StreamingRlRecord> {
    let applied: Vec<&Update> = list.iter().filter(|u| u.record.outcome == UpdateOutcome::Applied).collect();
    let mut best: &[&Update] = &[];
    let mut start = 0;
    for i in 1..=applied.len() {
        let continues = i < applied.len()
            && applied[i].record.previous_version == applied[i - 1].record.new_version.unwrap_or(u64::MAX);
        if !continues {
            if i - start > best.len() {
                best = &applied[start..i];
            }
            start = i;
        }
    }
    if best.len() < 2 {
        return None;
    }
    let history = best
        .iter()
        .map(|u| StreamingStep {
            value: templates.problem(
                Setting::Streaming { past: None },
                &Evidence::from_signals(u.record.signals.iter().map(|s| &s.signal)),
            ),
            comparison: u.comparison.clone(),
        })
        .collect();
    Some(StreamingRlRecord(vec![StreamingEntry { history }]))
}

/// Writes the four files and the stats into `dir` (created if missing).
pub fn write(dataset: &Dataset, dir: &Path) -> Result<(), DatasetError> {
    let err = |path: &Path, e: &dyn std::fmt::Display| DatasetError::Write {
        path: path.to_owned(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| err(dir, &e))?;
    fn lines<T: Serialize>(items: &[T]) -> String {
        items.iter().map(|r| serde_json::to_string(r).expect("serialisable") + "\n").collect()
    }
    let files = [
        (RL_TRAIN_FILE, lines(&dataset.rl_train)),
        (RL_HOLDOUT_FILE, lines(&dataset.rl_holdout)),
        (STREAMING_TRAIN_FILE, lines(&dataset.streaming_train)),
        (STREAMING_HOLDOUT_FILE, lines(&dataset.streaming_holdout)),
        (STATS_FILE, serde_json::to_string_pretty(&dataset.stats).expect("serialisable") + "\n"),
    ];
    for (name, text) in files {
        // Write then rename: a reader never sees half a file.
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).map_err(|e| err(&tmp, &e))?;
        std::fs::rename(&tmp, &path).map_err(|e| err(&path, &e))?;
    }
    Ok(())
}

/// Reads a JSONL dump of the inference-log topic (one record per line, as produced).
pub fn read_log_jsonl(path: &Path) -> Result<Vec<LogTopicRecord>, DatasetError> {
    read_lines(path, |line| serde_json::from_str::<LogTopicRecord>(line).map_err(|e| e.to_string()))
}

/// Reads a JSONL dump of signals: `{partition, offset, signal}` per line (as the
/// inference log holds them), or bare `alignx.signal.v1` objects, whose order in the file
/// is then their order (partition 0, offset = line number).
pub fn read_signals_jsonl(path: &Path) -> Result<Vec<LoggedSignal>, DatasetError> {
    let limits = alignx_schemas::signal::Limits::default();
    let mut n = 0i64;
    read_lines(path, |line| {
        n += 1;
        if let Ok(s) = serde_json::from_str::<LoggedSignal>(line) {
            return Ok(s);
        }
        let signal =
            alignx_schemas::signal::validate_payload(line.as_bytes(), &limits).map_err(|p| p.to_string())?;
        Ok(LoggedSignal { partition: 0, offset: n - 1, signal })
    })
}

fn read_lines<T>(
    path: &Path,
    mut parse: impl FnMut(&str) -> Result<T, String>,
) -> Result<Vec<T>, DatasetError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| DatasetError::Read { path: path.to_owned(), message: e.to_string() })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(parse(line).map_err(|message| DatasetError::Parse {
            path: path.to_owned(),
            line: i + 1,
            message,
        })?);
    }
    Ok(out)
}

/// Where the log and the signals come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// JSONL dumps ([`read_log_jsonl`], [`read_signals_jsonl`]).
    Files { log: PathBuf, signals: PathBuf },
    /// The topics themselves, read whole ([`crate::kafka`]).
    Kafka { kafka: crate::kafka::KafkaSource, log_topic: String, signals_topic: String },
}

/// Reads the log and the signals, and how many messages could not be read as either.
pub fn load(source: &Source) -> Result<(Vec<LogTopicRecord>, Vec<LoggedSignal>, usize), DatasetError> {
    match source {
        Source::Files { log, signals } => Ok((read_log_jsonl(log)?, read_signals_jsonl(signals)?, 0)),
        Source::Kafka { kafka, log_topic, signals_topic } => {
            let (log, bad_log) = kafka.read_log(log_topic)?;
            let (signals, bad_signals) = kafka.read_signals(signals_topic)?;
            Ok((log, signals, bad_log + bad_signals))
        }
    }
}

/// [`load`], [`build`] and [`write`] into `out`: what `build-dataset` (and `retrain`) does.
pub fn run(cfg: &DatasetConfig, source: &Source, out: &Path) -> Result<Dataset, DatasetError> {
    let (log, signals, unreadable) = load(source)?;
    let mut dataset = build(cfg, log, signals)?;
    dataset.stats.unreadable_messages = unreadable;
    write(&dataset, out)?;
    Ok(dataset)
}
