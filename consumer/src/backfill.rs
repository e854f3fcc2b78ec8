//! `alignx-consumer backfill`: after a model upgrade, re-infer users' summaries with the
//! new model from their history — the windows of signals their applied updates consumed,
//! as the inference-log topic recorded them — while the live consumer keeps running.
//!
//! Each user's windows are folded in order through the model (streaming: each summary
//! goes into the next prompt; base: the most recent signals) and the result is written
//! with the store's version CAS against the version read before: if the live consumer
//! updated the user meanwhile, the backfilled summary is dropped (`raced`) and the live
//! one stands. Users whose summary was already written by this model are skipped, which
//! makes a run resumable: run it again after an interruption and it continues where it
//! stopped. An erasure record in the log drops the user's earlier windows.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alignx_schemas::answer::parse_answer;
use alignx_schemas::inference_log::{
    InferenceLogRecord, InferenceLogSchema, LogTopicRecord, LoggedSignal, UpdateOutcome,
};
use alignx_schemas::prompt::{Evidence, Setting, Templates};
use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureRecord;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::RunConfig;
use crate::engine::{Engine, UpdateRequest};
use crate::redis_conn::RedisConn;
use crate::sink::client_config;
use crate::store::{ApplyOutcome, Store, Update};
use crate::update::now_ms;

/// Which users, how fast.
#[derive(Debug, Clone)]
pub struct BackfillOptions {
    /// These users only; `None`: every user with history in the log.
    pub users: Option<Vec<String>>,
    /// Also users whose summary this model already wrote.
    pub include_current: bool,
    /// Users per second at most (0: no limit), so the live consumer keeps its share.
    pub max_users_per_second: f64,
    /// Users whose windows go through the model together.
    pub batch_size: usize,
    /// Reading the log stops after this long without a new message.
    pub log_idle: Duration,
}

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct BackfillReport {
    /// Users with applied updates in the log.
    pub users_in_log: u64,
    /// Users asked for (all of the log's, or the list).
    pub selected: u64,
    /// New summary written by the new model.
    pub rewritten: u64,
    /// Already written by this model (skipped; see `include_current`).
    pub already_current: u64,
    /// The live consumer wrote a newer version meanwhile: its summary stands.
    pub raced: u64,
    /// No summary in Redis: nothing to re-infer.
    pub no_summary: u64,
    /// The log read does not hold every version of the summary (updated since the log was
    /// read, or older records gone by retention): left for the next run.
    pub log_behind: u64,
    /// Windows whose generation had no usable answer (the previous summary carried on).
    pub failed_windows: u64,
    /// Users none of whose windows gave an answer: their summary is left as it was.
    pub no_answer: u64,
    pub windows: u64,
}

/// Every applied update's window per user, in version order, from the log topic.
pub fn read_histories(cfg: &RunConfig, idle: Duration) -> anyhow::Result<HashMap<String, History>> {
    let topic = cfg.kafka.log_topic.as_str();
    let mut c = client_config(&cfg.kafka);
    // `assign` needs a group id; this reader never joins a group or commits.
    c.set("group.id", "alignx-backfill-reader").set("enable.auto.commit", "false");
    let consumer: BaseConsumer = c.create().context("create the log reader")?;
    let meta = consumer.fetch_metadata(Some(topic), Duration::from_secs(30)).context("log topic metadata")?;
    let mut tpl = TopicPartitionList::new();
    // Read up to where the log ends now: the live consumer keeps appending. (A user
    // updated after that is skipped below, their history being incomplete.)
    let mut ends: HashMap<i32, i64> = HashMap::new();
    for p in meta.topics().iter().flat_map(|t| t.partitions()) {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
        let (low, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(30))?;
        if high > low {
            ends.insert(p.id(), high);
        }
    }
    consumer.assign(&tpl)?;
    let mut windows: HashMap<String, BTreeMap<u64, Vec<LoggedSignal>>> = HashMap::new();
    let mut last = Instant::now();
    while !ends.is_empty() && last.elapsed() < idle {
        let Some(m) = consumer.poll(Duration::from_millis(100)) else { continue };
        let m = m.context("read the log topic")?;
        last = Instant::now();
        if ends.get(&m.partition()).is_some_and(|&end| m.offset() + 1 >= end) {
            ends.remove(&m.partition());
        }
        let Some(payload) = m.payload() else { continue };
        match serde_json::from_slice::<LogTopicRecord>(payload) {
            Ok(LogTopicRecord::Update(r)) => {
                if let Some(v) = r.new_version {
                    // An outbox re-send repeats a version; the first copy is the same.
                    windows.entry(r.user_id).or_default().entry(v).or_insert(r.signals);
                }
            }
            Ok(LogTopicRecord::Erasure(e)) => {
                windows.remove(&e.user_id);
            }
            Err(e) => {
                tracing::warn!(partition = m.partition(), offset = m.offset(), error = %e, "unreadable log record skipped")
            }
        }
    }
    Ok(windows.into_iter().map(|(u, w)| (u, History(w))).collect())
}

/// A user's applied windows by the version they produced.
#[derive(Debug, Clone, Default)]
pub struct History(BTreeMap<u64, Vec<LoggedSignal>>);

impl History {
    /// The windows, if the log holds every version 1..=`version` (the one stored now);
    /// otherwise a re-inference would drop signals.
    fn complete_to(&self, version: u64) -> Option<Vec<Vec<LoggedSignal>>> {
        let complete = self.0.len() as u64 == version && self.0.keys().copied().eq(1..=version);
        complete.then(|| self.0.values().cloned().collect())
    }
}

/// Re-infers the selected users' summaries with `engine`; `progress(done, total)`.
pub async fn backfill(
    cfg: &RunConfig,
    engine: Arc<dyn Engine>,
    templates: &Templates,
    opts: &BackfillOptions,
    progress: impl Fn(u64, u64),
) -> anyhow::Result<BackfillReport> {
    let idle = opts.log_idle;
    let cfg2 = cfg.clone();
    let histories = tokio::task::spawn_blocking(move || read_histories(&cfg2, idle)).await??;
    let mut report = BackfillReport { users_in_log: histories.len() as u64, ..Default::default() };
    let mut users: Vec<String> = match &opts.users {
        Some(list) => list.clone(),
        None => histories.keys().cloned().collect(),
    };
    users.sort();
    report.selected = users.len() as u64;
    let conn = RedisConn::connect(&cfg.redis).await.context("connect to Redis")?;
    let store = Store::with_recent(conn, cfg.redis.history_len, 0);
    let producer = crate::ops::producer(cfg)?;
    let base_signals = cfg.engine.recent_len();
    let max_chars = cfg.engine.max_summary_chars;
    let started = Instant::now();
    let mut done = 0u64;
    for chunk in users.chunks(opts.batch_size.max(1)) {
        // Who is due, from which stored version.
        let mut work: Vec<(String, u64, Vec<Vec<LoggedSignal>>)> = Vec::new();
        for user in chunk {
            let rec = store.load_user(user).await?;
            let history = histories.get(user).cloned().unwrap_or_default();
            match rec.summary {
                None => report.no_summary += 1,
                Some(s) if s.model == engine.model_id() && !opts.include_current => {
                    report.already_current += 1
                }
                Some(s) => match history.complete_to(s.version) {
                    Some(windows) => work.push((user.clone(), s.version, windows)),
                    // Updated after the log was read, or the log lost old records
                    // (retention): re-inferring would drop signals.
                    None => report.log_behind += 1,
                },
            }
        }
        let summaries = fold(&*engine, templates, base_signals, max_chars, &work, &mut report)?;
        for ((user, version, history), summary) in work.iter().zip(summaries) {
            let Some(summary) = summary else {
                report.no_answer += 1;
                continue;
            };
            let oldest = history.iter().flatten().map(|s| s.signal.ts.unix_ms()).min().unwrap_or(i64::MAX);
            let now = now_ms();
            // The log gets every version: a record of this one (no window: it re-read
            // all of them), kept in the outbox until the broker has it.
            let record = InferenceLogRecord::<LoggedSignal> {
                schema: InferenceLogSchema::V1,
                user_id: user.clone(),
                model: engine.model_id().to_owned(),
                logged_at_ms: now,
                previous_version: *version,
                previous_summary: None,
                signals: Vec::new(),
                prompt: String::new(),
                generation: String::new(),
                summary: Some(summary.clone()),
                new_version: Some(version + 1),
                prompt_tokens: 0,
                generated_tokens: 0,
                latency_ms: 0,
                outcome: UpdateOutcome::Applied,
            };
            let update = Update {
                user_id: user.clone(),
                expected_version: *version,
                summary,
                model: engine.model_id().to_owned(),
                reasoning: None,
                consumed: BTreeMap::new(),
                signals: 0,
                oldest_ts_ms: oldest,
                now_ms: now,
                outbox: serde_json::to_string(&record).expect("a log record serialises"),
                recent: Vec::new(),
            };
            match store.apply(&update).await? {
                ApplyOutcome::Applied { .. } => {
                    producer
                        .send(
                            FutureRecord::to(&cfg.kafka.log_topic)
                                .key(user.as_bytes())
                                .payload(&update.outbox),
                            Duration::from_secs(30),
                        )
                        .await
                        .map_err(|(e, _)| anyhow::anyhow!("write the log record of {user}: {e}"))?;
                    store.clear_outbox(user).await?;
                    report.rewritten += 1;
                }
                _ => report.raced += 1,
            }
        }
        done += chunk.len() as u64;
        progress(done, report.selected);
        if opts.max_users_per_second > 0.0 {
            let due = Duration::from_secs_f64(done as f64 / opts.max_users_per_second);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    Ok(report)
}

/// Folds each user's windows through the model in lockstep (one engine call per window
/// index over the batch); `None` for a user none of whose windows produced an answer.
/// The engine blocks: this runs under `block_in_place` (a multi-threaded runtime).
fn fold(
    engine: &dyn Engine,
    templates: &Templates,
    base_signals: usize,
    max_chars: usize,
    work: &[(String, u64, Vec<Vec<LoggedSignal>>)],
    report: &mut BackfillReport,
) -> anyhow::Result<Vec<Option<String>>> {
    let mut summaries: Vec<Option<String>> = vec![None; work.len()];
    let steps = work.iter().map(|(_, _, h)| h.len()).max().unwrap_or(0);
    for k in 0..steps {
        let mut rows = Vec::new();
        let mut requests = Vec::new();
        for (i, (user, _, history)) in work.iter().enumerate() {
            let Some(window) = history.get(k) else { continue };
            let shown: Vec<&LoggedSignal> = if base_signals > 0 {
                let seen: Vec<&LoggedSignal> = history[..=k].iter().flatten().collect();
                seen[seen.len().saturating_sub(base_signals)..].to_vec()
            } else {
                window.iter().collect()
            };
            let evidence = Evidence::from_signals(shown.iter().map(|s| &s.signal));
            let setting = if base_signals > 0 {
                Setting::Base
            } else {
                Setting::Streaming { past: summaries[i].as_deref() }
            };
            requests.push(UpdateRequest {
                user_id: user.clone(),
                prompt: templates.render(engine.bos(), setting, &evidence),
                previous_summary: summaries[i].clone(),
                kinds: window.iter().map(|s| s.signal.kind()).collect(),
                seed: k as u64,
            });
            rows.push(i);
        }
        report.windows += rows.len() as u64;
        // The engine blocks; keep it off the runtime's thread.
        let generations =
            tokio::task::block_in_place(|| engine.generate(&requests)).map_err(|e| anyhow::anyhow!("{e}"))?;
        for (i, g) in rows.into_iter().zip(generations) {
            match g.ok().and_then(|g| parse_answer(&g.text, max_chars).ok()) {
                Some(answer) => summaries[i] = Some(answer.summary),
                None => report.failed_windows += 1,
            }
        }
    }
    Ok(summaries)
}
