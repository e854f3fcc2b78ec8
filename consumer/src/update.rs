//! Runs one batch of updates: prompts → engine → `<answer>` → store → inference log.
//!
//! Per user the order is fixed: the Lua script writes the summary together with its
//! inference-log record (the outbox), then the record is produced and acknowledged, then
//! the outbox is cleared. A crash at any point leaves either nothing applied (the signals
//! are still pending and get replayed) or an applied summary whose record the next owner
//! re-sends. Redis errors are retried with backoff; the update is abandoned only when the
//! pipeline gives up on in-flight work (shutdown deadline), and then nothing is lost either.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use alignx_schemas::answer::{AnswerFailure, parse_answer};
use alignx_schemas::inference_log::{InferenceLogRecord, InferenceLogSchema, LoggedSignal, UpdateOutcome};
use alignx_schemas::prompt::{Evidence, Setting, Templates};
use alignx_schemas::rng::Fnv1a;
use alignx_schemas::summary::{SummaryRecord, SummarySchema};

use crate::engine::{Engine, EngineSlot, Generation, UpdateRequest};
use crate::metrics::Metrics;
use crate::redis_conn::RedisConn;
use crate::sink::Sink;
use crate::store::{ApplyOutcome, Store, StoreError, Update};
use crate::window::{Finished, Known, UpdateInput};

/// What every update needs, shared by all batches.
pub struct Updater {
    pub engine: Arc<EngineSlot>,
    pub store: Store<RedisConn>,
    pub sink: Sink,
    pub metrics: Metrics,
    pub templates: Templates,
    pub max_summary_chars: usize,
    pub keep_reasoning: bool,
    pub max_retries: u32,
    /// Recent signals a base-setting prompt shows; 0: the streaming setting.
    pub base_signals: usize,
    /// False while Redis calls fail (readiness).
    pub redis_ok: Arc<AtomicBool>,
    /// Set when the pipeline gives up on in-flight work.
    pub abandon: Arc<AtomicBool>,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Updater {
    /// Runs a batch: one engine call, then each user's store and log steps concurrently.
    pub async fn run_batch(
        self: Arc<Self>,
        inputs: Vec<UpdateInput>,
        engine_permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Vec<(Arc<str>, Finished)> {
        let me = self.clone();
        // One engine for the whole batch, even if a new model is swapped in meanwhile.
        let engine = self.engine.current();
        let model_id: Arc<str> = Arc::from(engine.model_id());
        let prepared = tokio::task::spawn_blocking(move || {
            let requests: Vec<UpdateRequest> = inputs.iter().map(|i| me.request(&*engine, i)).collect();
            let started = Instant::now();
            let result = engine.generate(&requests);
            (inputs, requests, result, started.elapsed())
        })
        .await;
        drop(engine_permit);
        let (inputs, requests, result, _elapsed) = match prepared {
            Ok(p) => p,
            Err(e) => {
                // The engine panicked; nothing was written, the windows are retried.
                tracing::error!(error = %e, "engine task failed");
                return Vec::new();
            }
        };
        self.metrics.engine_batch_size.observe(inputs.len() as f64);
        let generations: Vec<Result<Generation, String>> = match result {
            Ok(g) if g.len() == inputs.len() => g.into_iter().map(|r| r.map_err(|e| e.to_string())).collect(),
            Ok(g) => {
                let msg = format!("engine returned {} generations for {} requests", g.len(), inputs.len());
                inputs.iter().map(|_| Err(msg.clone())).collect()
            }
            Err(e) => inputs.iter().map(|_| Err(e.to_string())).collect(),
        };
        let work = inputs.into_iter().zip(requests).zip(generations).map(|((input, request), generation)| {
            let (me, model_id) = (self.clone(), model_id.clone());
            async move {
                let user = input.user.clone();
                (user, me.finish_one(input, &model_id, request.prompt, generation).await)
            }
        });
        futures::future::join_all(work).await
    }

    fn request(&self, engine: &dyn Engine, input: &UpdateInput) -> UpdateRequest {
        let render = |shown: &[Arc<LoggedSignal>]| {
            let evidence = Evidence::from_signals(shown.iter().map(|s| &s.signal));
            let setting = match self.base_signals {
                0 => Setting::Streaming { past: input.previous_summary.as_deref() },
                _ => Setting::Base,
            };
            self.templates.render(engine.bos(), setting, &evidence)
        };
        // Streaming: the window. Base: the most recent signals, earlier ones included.
        let base: Vec<Arc<LoggedSignal>> = if self.base_signals > 0 {
            let all: Vec<Arc<LoggedSignal>> = input.recent.iter().chain(&input.signals).cloned().collect();
            all[all.len().saturating_sub(self.base_signals)..].to_vec()
        } else {
            Vec::new()
        };
        let mut shown = if self.base_signals > 0 { &base[..] } else { &input.signals[..] };
        let mut prompt = render(shown);
        if let Some(max) = engine.max_prompt_tokens() {
            // Too long for the model: drop the oldest signals (never the instructions,
            // the past summary or the `Assistant: <think>` cue) until it fits.
            let full = shown.len();
            while shown.len() > 1 && engine.count_tokens(&prompt) > max {
                shown = &shown[1..];
                prompt = render(shown);
            }
            if shown.len() < full {
                self.metrics.prompt_truncations.inc();
                tracing::debug!(user = %input.user, dropped = full - shown.len(), "prompt truncated to fit the model");
            }
        }
        UpdateRequest {
            user_id: input.user.to_string(),
            prompt,
            previous_summary: input.previous_summary.clone(),
            kinds: input.signals.iter().map(|s| s.signal.kind()).collect(),
            seed: seed(&input.user, input.expected_version, input.attempt),
        }
    }

    async fn finish_one(
        &self,
        input: UpdateInput,
        model_id: &str,
        prompt: String,
        generation: Result<Generation, String>,
    ) -> Finished {
        let (text, prompt_tokens, generated_tokens, parsed) = match generation {
            Ok(g) => {
                self.metrics.prompt_tokens.inc_by(g.prompt_tokens);
                self.metrics.generated_tokens.inc_by(g.generated_tokens);
                let parsed = parse_answer(&g.text, self.max_summary_chars).map_err(failure_outcome);
                (g.text, g.prompt_tokens, g.generated_tokens, parsed)
            }
            Err(e) => {
                tracing::warn!(user = %input.user, error = %e, "engine error");
                (String::new(), 0, 0, Err(UpdateOutcome::EngineError))
            }
        };
        let mut record = InferenceLogRecord {
            schema: InferenceLogSchema::V1,
            user_id: input.user.to_string(),
            model: model_id.to_owned(),
            logged_at_ms: now_ms(),
            previous_version: input.expected_version,
            previous_summary: input.previous_summary.clone(),
            signals: input.signals.iter().map(|s| &**s).collect::<Vec<&LoggedSignal>>(),
            prompt,
            generation: text,
            summary: None,
            new_version: None,
            prompt_tokens,
            generated_tokens,
            latency_ms: 0,
            outcome: UpdateOutcome::Applied,
        };
        let oldest_ts = input.signals.iter().map(|s| s.signal.ts.unix_ms()).min().unwrap_or(0);
        let mut update = Update {
            user_id: input.user.to_string(),
            expected_version: input.expected_version,
            summary: String::new(),
            model: record.model.clone(),
            reasoning: None,
            consumed: input.signals.iter().fold(Default::default(), |mut m, s| {
                let o = m.entry(s.partition).or_insert(s.offset);
                *o = (*o).max(s.offset);
                m
            }),
            signals: input.signals.len() as u64,
            oldest_ts_ms: oldest_ts,
            now_ms: now_ms(),
            outbox: String::new(),
            recent: if self.base_signals > 0 {
                input
                    .signals
                    .iter()
                    .map(|s| serde_json::to_string(&**s).expect("a signal serialises"))
                    .collect()
            } else {
                Vec::new()
            },
        };
        match parsed {
            Ok(answer) => {
                update.summary = answer.summary.clone();
                update.reasoning = self.keep_reasoning.then_some(answer.reasoning);
                record.summary = Some(answer.summary.clone());
                record.new_version = Some(input.expected_version + 1);
                record.latency_ms = update.now_ms.saturating_sub(oldest_ts.max(0) as u64);
                update.outbox = serde_json::to_string(&record).expect("a log record serialises");
                let Some(outcome) = self.redis("apply", || self.store.apply(&update)).await else {
                    return Finished::Abandoned;
                };
                match outcome {
                    ApplyOutcome::Applied { version, signals_applied } => {
                        self.metrics.updates.with_label_values(&[UpdateOutcome::Applied.as_str()]).inc();
                        self.metrics.update_latency.observe(record.latency_ms as f64 / 1000.0);
                        if !self.publish(&input.user, &update, version, signals_applied).await {
                            return Finished::Abandoned;
                        }
                        Finished::Applied { version, summary: answer.summary }
                    }
                    _ => self.reload(&input.user).await,
                }
            }
            Err(outcome) => {
                self.metrics.updates.with_label_values(&[outcome.as_str()]).inc();
                if input.attempt + 1 < self.max_retries {
                    return Finished::Retry { after: Duration::from_millis(500 << input.attempt.min(6)) };
                }
                tracing::warn!(user = %input.user, outcome = outcome.as_str(), attempts = input.attempt + 1,
                    "giving up on a window: its signals are consumed without a new summary");
                let Some(result) = self.redis("skip", || self.store.skip(&update)).await else {
                    return Finished::Abandoned;
                };
                match result {
                    ApplyOutcome::Skipped { .. } => {
                        record.outcome = outcome;
                        let json = serde_json::to_string(&record).expect("a log record serialises");
                        if !self.sink.log(&input.user, &json).await {
                            return Finished::Abandoned;
                        }
                        Finished::Skipped
                    }
                    _ => self.reload(&input.user).await,
                }
            }
        }
    }

    /// Produces the log record (and summary) of an applied update, then clears its outbox.
    async fn publish(&self, user: &str, update: &Update, version: u64, signals_applied: u64) -> bool {
        if !self.sink.log(user, &update.outbox).await {
            return false;
        }
        if self.sink.publishes_summaries() {
            let record = SummaryRecord {
                schema: SummarySchema::V1,
                user_id: user.to_owned(),
                summary: update.summary.clone(),
                version,
                model: update.model.clone(),
                updated_at_ms: update.now_ms,
                signals_applied,
                applied: update.consumed.clone(),
                reasoning: update.reasoning.clone(),
            };
            let json = serde_json::to_string(&record).expect("a summary serialises");
            if !self.sink.summary(user, &json).await {
                return false;
            }
        }
        self.redis("clear outbox", || self.store.clear_outbox(user)).await.is_some()
    }

    /// The stored state moved on under this update: read it back.
    async fn reload(&self, user: &Arc<str>) -> Finished {
        self.metrics.updates.with_label_values(&[UpdateOutcome::Stale.as_str()]).inc();
        match self.redis("reload", || self.store.load_user(user)).await {
            Some(rec) => Finished::Reload(known(&rec)),
            None => Finished::Abandoned,
        }
    }

    /// Re-sends the outbox record a previous owner left unconfirmed.
    pub async fn resend_outbox(&self, user: &str, rec: &crate::store::UserRecord) {
        let (Some(record), Some(summary)) = (&rec.outbox, &rec.summary) else { return };
        tracing::info!(user, version = summary.version, "re-sending an unconfirmed inference-log record");
        if !self.sink.log(user, record).await {
            return;
        }
        if self.sink.publishes_summaries() {
            let json = serde_json::to_string(summary).expect("a summary serialises");
            if !self.sink.summary(user, &json).await {
                return;
            }
        }
        self.redis("clear outbox", || self.store.clear_outbox(user)).await;
    }

    /// Retries a Redis operation with backoff until it succeeds or work is abandoned.
    pub async fn redis<T, F, Fut>(&self, what: &str, op: F) -> Option<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        redis_retry(&self.metrics, &self.redis_ok, &self.abandon, what, op).await
    }
}

/// Retries a Redis operation with backoff (100 ms doubling to 5 s) until it succeeds or
/// `abandon` is set; keeps `redis_ok` and the error counter current.
pub async fn redis_retry<T, F, Fut>(
    metrics: &Metrics,
    redis_ok: &AtomicBool,
    abandon: &AtomicBool,
    what: &str,
    op: F,
) -> Option<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut delay = Duration::from_millis(100);
    let mut failures = 0u32;
    loop {
        match op().await {
            Ok(v) => {
                if failures > 0 {
                    tracing::info!(what, failures, "Redis reachable again");
                }
                redis_ok.store(true, Ordering::Relaxed);
                return Some(v);
            }
            Err(e) => {
                metrics.redis_errors.inc();
                redis_ok.store(false, Ordering::Relaxed);
                if failures.is_power_of_two() || failures == 0 {
                    tracing::warn!(what, error = %e, failures, "Redis operation failed; retrying");
                }
                failures += 1;
            }
        }
        if abandon.load(Ordering::Relaxed) {
            return None;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

pub fn known(rec: &crate::store::UserRecord) -> Known {
    Known {
        version: rec.summary.as_ref().map_or(0, |s| s.version),
        summary: rec.summary.as_ref().map(|s| s.summary.clone()),
        applied: rec.applied.clone(),
        recent: rec.recent.clone(),
        erased_at_ms: rec.erased_at_ms,
    }
}

fn failure_outcome(f: AnswerFailure) -> UpdateOutcome {
    match f {
        AnswerFailure::NoAnswer => UpdateOutcome::NoAnswer,
        AnswerFailure::Truncated => UpdateOutcome::Truncated,
        AnswerFailure::Empty => UpdateOutcome::EmptyAnswer,
    }
}

/// A reproducible sampling seed per (user, version, attempt): FNV-1a of the three.
fn seed(user: &str, version: u64, attempt: u32) -> u64 {
    Fnv1a::default()
        .write(user.as_bytes())
        .write(&version.to_le_bytes())
        .write(&attempt.to_le_bytes())
        .finish()
}
