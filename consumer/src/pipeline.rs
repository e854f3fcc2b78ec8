//! The stream pipeline (DESIGN.md §3): Kafka → validate → per-user windows (persisted in
//! Redis) → engine → store → inference log, with offsets committed only up to the
//! low-water mark of fully handled messages.
//!
//! One thread owns all pipeline state and runs the loop: poll a batch of messages,
//! validate them, add them to windows, hand out ready windows as engine batches, take
//! back finished updates, and every `commit_interval` persist the windows' new signals
//! and commit. The slow work — engine calls, Redis scripts, log delivery — runs as tasks
//! on a tokio runtime and reports back over a channel, so the loop never waits on one
//! user. librdkafka calls the rebalance hooks from inside `poll`, on this same thread,
//! while the loop holds no lock: the hooks lock the state, drain in-flight work, persist
//! and commit synchronously before the partitions go.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alignx_schemas::SignalKind;
use alignx_schemas::inference_log::LoggedSignal;
use alignx_schemas::keys::pending_index;
use anyhow::Context;
use prometheus::IntCounter;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::runtime::Runtime;
use tokio::sync::Semaphore;

use crate::config::RunConfig;
use crate::engine::{Engine, EngineSlot};
use crate::ingest::{Incoming, IngestContext, KafkaConsumer, consumer_config, incoming};
use crate::metrics::{Metrics, Readiness};
use crate::offsets::PartitionOffsets;
use crate::redis_conn::RedisConn;
use crate::reload::Reload;
use crate::sink::{Rejected, Sink};
use crate::store::{Store, UserRecord};
use crate::update::{Updater, known, now_ms, redis_retry};
use crate::window::{Finished, Pushed, Windows};

/// How long shutdown and revocation wait for in-flight updates.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why `run` returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM/SIGINT: drained and committed.
    Shutdown,
    /// The invalid-message circuit breaker tripped.
    InvalidRatio(String),
}

enum Completion {
    Updates(Vec<(Arc<str>, Finished)>),
    DeadLettered { partition: i32, offset: i64, delivered: bool, reason: &'static str },
}

/// One assigned partition: offsets and the invalid-message breaker's recent history.
#[derive(Default)]
struct PartitionState {
    offsets: PartitionOffsets,
    recent: VecDeque<bool>,
    invalid: usize,
}

pub struct Pipeline {
    cfg: Arc<RunConfig>,
    rt: tokio::runtime::Handle,
    updater: Arc<Updater>,
    windows: Windows,
    partitions: BTreeMap<i32, PartitionState>,
    tx: mpsc::Sender<Completion>,
    rx: mpsc::Receiver<Completion>,
    engine_slots: Arc<Semaphore>,
    dlq_in_flight: usize,
    last_checkpoint: Instant,
    paused: bool,
    readiness: Readiness,
    tripped: Option<String>,
    draining: bool,
    /// `alignx_signals_total{kind, outcome}` children, indexed by `SignalKind as usize`.
    accepted: [IntCounter; 3],
    duplicates: [IntCounter; 3],
    erased: [IntCounter; 3],
}

impl Pipeline {
    fn new(
        cfg: Arc<RunConfig>,
        rt: tokio::runtime::Handle,
        updater: Arc<Updater>,
        readiness: Readiness,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        let signals = &updater.metrics.signals;
        let by_kind =
            |outcome: &str| SignalKind::ALL.map(|k| signals.with_label_values(&[k.as_str(), outcome]));
        Self {
            accepted: by_kind("accepted"),
            duplicates: by_kind("duplicate"),
            erased: by_kind("erased"),
            windows: Windows::with_recent(
                cfg.window.max_signals,
                cfg.window.max_wait,
                cfg.engine.recent_len(),
            ),
            engine_slots: Arc::new(Semaphore::new(cfg.engine.concurrency)),
            cfg,
            rt,
            updater,
            partitions: BTreeMap::new(),
            tx,
            rx,
            dlq_in_flight: 0,
            last_checkpoint: Instant::now(),
            paused: false,
            readiness,
            tripped: None,
            draining: false,
        }
    }

    fn metrics(&self) -> &Metrics {
        &self.updater.metrics
    }

    /// Runs a Redis operation to completion on this thread (retrying with backoff).
    fn redis_blocking<T, F, Fut>(&self, what: &str, op: F) -> Option<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, crate::store::StoreError>>,
    {
        let u = &self.updater;
        self.rt.block_on(redis_retry(&u.metrics, &u.redis_ok, &u.abandon, what, op))
    }

    /// Takes in a polled batch: validation results go to the DLQ or to windows.
    pub fn ingest(&mut self, batch: Vec<Incoming>) {
        let now = Instant::now();
        let mut valid = Vec::with_capacity(batch.len());
        for msg in batch {
            let Some(part) = self.partitions.get_mut(&msg.partition()) else { continue };
            if !part.offsets.read(msg.offset()) {
                continue;
            }
            let invalid = matches!(msg, Incoming::Invalid(_));
            part.recent.push_back(invalid);
            part.invalid += invalid as usize;
            if part.recent.len() > self.cfg.input.invalid_ratio_window
                && let Some(old) = part.recent.pop_front()
            {
                part.invalid -= old as usize;
            }
            let window = self.cfg.input.invalid_ratio_window;
            if invalid
                && part.recent.len() >= window
                && part.invalid as f64 > self.cfg.input.max_invalid_ratio * window as f64
            {
                self.tripped = Some(format!(
                    "{} of the last {window} messages on partition {} were invalid (limit {:.0}%): \
                     stopping instead of dead-lettering this traffic; fix the producer or raise \
                     input.max_invalid_ratio",
                    part.invalid,
                    msg.partition(),
                    self.cfg.input.max_invalid_ratio * 100.0
                ));
                return;
            }
            match msg {
                Incoming::Valid(s) => valid.push(s),
                Incoming::Invalid(r) => self.dead_letter(r),
            }
        }
        self.load_users(&valid);
        for s in valid {
            let Some(user) = self.windows.user_id(&s.signal.user_id) else { continue };
            let (kind, partition, offset) = (s.signal.kind(), s.partition, s.offset);
            let k = kind as usize;
            match self.windows.push(&user, s, now) {
                Pushed::Added => self.accepted[k].inc(),
                Pushed::Duplicate => {
                    self.duplicates[k].inc();
                    self.handled(partition, offset);
                }
                Pushed::Erased => {
                    self.erased[k].inc();
                    self.handled(partition, offset);
                }
            }
        }
    }

    /// Reads the stored state of users seen for the first time, all at once.
    fn load_users(&mut self, signals: &[LoggedSignal]) {
        let mut unknown: Vec<(&str, i32)> = Vec::new();
        let mut seen = HashSet::new();
        for s in signals {
            let u = s.signal.user_id.as_str();
            if !self.windows.knows(u) && seen.insert(u) {
                unknown.push((u, s.partition));
            }
        }
        if unknown.is_empty() {
            return;
        }
        let store = &self.updater.store;
        let loaded = self.redis_blocking("load users", || {
            futures::future::try_join_all(unknown.iter().map(|(u, _)| store.load_user(u)))
        });
        let Some(records) = loaded else { return };
        for ((user, partition), rec) in unknown.into_iter().zip(records) {
            self.windows.insert(user, known(&rec), partition);
            self.resend_outbox(user.to_owned(), rec);
        }
    }

    /// Re-sends, in the background, a log record a previous owner left unconfirmed.
    fn resend_outbox(&self, user: String, rec: UserRecord) {
        if rec.outbox.is_some() {
            let updater = self.updater.clone();
            self.rt.spawn(async move { updater.resend_outbox(&user, &rec).await });
        }
    }

    fn dead_letter(&mut self, r: Rejected) {
        self.metrics().signals.with_label_values(&["invalid", "rejected"]).inc();
        tracing::debug!(
            partition = r.partition,
            offset = r.offset,
            reason = r.code.as_str(),
            "dead-lettering"
        );
        let (sink, tx) = (self.updater.sink.clone(), self.tx.clone());
        self.dlq_in_flight += 1;
        self.rt.spawn(async move {
            let delivered = sink.dead_letter(&r).await;
            let _ = tx.send(Completion::DeadLettered {
                partition: r.partition,
                offset: r.offset,
                delivered,
                reason: r.code.as_str(),
            });
        });
    }

    fn handled(&mut self, partition: i32, offset: i64) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.offsets.handled(offset);
        }
    }

    fn complete(&mut self, c: Completion) {
        let now = Instant::now();
        match c {
            Completion::Updates(done) => {
                for (user, finished) in done {
                    for (p, o) in self.windows.finish(&user, finished, now) {
                        self.handled(p, o);
                    }
                }
            }
            Completion::DeadLettered { partition, offset, delivered, reason } => {
                self.dlq_in_flight -= 1;
                if delivered {
                    self.metrics().dlq.with_label_values(&[reason]).inc();
                    self.handled(partition, offset);
                }
            }
        }
    }

    /// Everything between polls: finished work, timers, new engine batches, checkpoints,
    /// backpressure, gauges.
    pub fn pump(&mut self, consumer: &KafkaConsumer) {
        while let Ok(c) = self.rx.try_recv() {
            self.complete(c);
        }
        let now = Instant::now();
        self.windows.fire_timers(now);
        if !self.draining {
            self.dispatch();
        }
        if now.duration_since(self.last_checkpoint) >= self.cfg.commit_interval {
            // Signals younger than an interval are usually applied before the next
            // checkpoint; persisting only older ones saves most Redis writes, and the
            // commit point lags by at most two intervals.
            self.checkpoint(consumer, CommitMode::Async, self.cfg.commit_interval);
            self.windows.evict_idle(self.cfg.max_cached_users);
        }
        self.backpressure(consumer);
        let m = self.metrics();
        m.pending_signals.set(self.windows.buffered() as i64);
        m.inflight_updates.set(self.windows.in_flight() as i64);
        self.readiness.set(!self.partitions.is_empty() && self.updater.redis_ok.load(Ordering::Relaxed));
    }

    /// Whether the `max_in_flight` limit is reached.
    pub fn at_capacity(&self) -> bool {
        self.cfg.max_in_flight > 0 && self.windows.in_flight() >= self.cfg.max_in_flight
    }

    /// Blocks until some in-flight work reports back (or `timeout`).
    pub fn await_completion(&mut self, timeout: Duration) {
        if let Ok(c) = self.rx.recv_timeout(timeout) {
            self.complete(c);
        }
    }

    /// Hands every ready window (up to `max_in_flight`) to the engine stage in batches;
    /// the batches wait for a free engine slot inside their tasks, so this loop never
    /// waits for the engine.
    fn dispatch(&mut self) {
        while self.windows.has_ready() && !self.at_capacity() {
            let room = match self.cfg.max_in_flight {
                0 => usize::MAX,
                max => max - self.windows.in_flight(),
            };
            let inputs = self.windows.take_ready(self.cfg.engine.batch_size.min(room));
            if inputs.is_empty() {
                break;
            }
            let (updater, tx, slots) = (self.updater.clone(), self.tx.clone(), self.engine_slots.clone());
            self.rt.spawn(async move {
                let Ok(permit) = slots.acquire_owned().await else { return };
                let done = updater.run_batch(inputs, permit).await;
                let _ = tx.send(Completion::Updates(done));
            });
        }
    }

    /// How long the next poll may block.
    pub fn poll_timeout(&self) -> Duration {
        if self.windows.in_flight() > 0 || self.dlq_in_flight > 0 || self.windows.has_ready() {
            return Duration::from_millis(2);
        }
        let now = Instant::now();
        let mut wait = Duration::from_millis(100);
        if let Some(at) = self.windows.next_deadline() {
            wait = wait.min(at.saturating_duration_since(now));
        }
        wait.min((self.last_checkpoint + self.cfg.commit_interval).saturating_duration_since(now))
    }

    /// Persists window signals older than `min_age` (index first, then the lists), drops
    /// emptied users from the index, and commits every partition's low-water mark.
    fn checkpoint(&mut self, consumer: &KafkaConsumer, mode: CommitMode, min_age: Duration) {
        let now = Instant::now();
        self.last_checkpoint = now;
        let cutoff = now.checked_sub(min_age).unwrap_or(now);
        let todo = self.windows.unpersisted(cutoff);
        if !todo.is_empty() {
            let topic = &self.cfg.kafka.input_topic;
            let by_partition = by_index(topic, todo.iter().map(|(u, p, _)| (*p, &**u)));
            let store = &self.updater.store;
            let stamp = now_ms();
            let indexed = self.redis_blocking("index pending users", || {
                futures::future::try_join_all(
                    by_partition.iter().map(|(index, users)| store.index_add(index, users, stamp)),
                )
            });
            let persisted = indexed.and_then(|_| {
                self.redis_blocking("persist pending", || {
                    futures::future::try_join_all(todo.iter().map(|(u, _, s)| store.persist_pending(u, s)))
                })
            });
            if persisted.is_none() {
                return; // abandoned (shutdown with Redis down): nothing more is handled
            }
            self.windows.persisted(cutoff);
            for (_, _, signals) in &todo {
                for s in signals {
                    self.handled(s.partition, s.offset);
                }
            }
        }
        let emptied = self.windows.take_emptied();
        if !emptied.is_empty() {
            let topic = &self.cfg.kafka.input_topic;
            let by_partition = by_index(topic, emptied.iter().map(|(p, u)| (*p, &**u)));
            let store = &self.updater.store;
            // A failure leaves stale index entries, which the next owner cleans up.
            self.redis_blocking("unindex users", || {
                futures::future::try_join_all(
                    by_partition.iter().map(|(index, users)| store.index_remove(index, users)),
                )
            });
        }
        self.commit(consumer, mode);
    }

    fn commit(&mut self, consumer: &KafkaConsumer, mode: CommitMode) {
        let mut tpl = TopicPartitionList::new();
        for (p, state) in &self.partitions {
            // An asynchronous commit that failed later is not known here: synchronous
            // commits (revocation, shutdown) send every partition's mark again.
            let offset = match mode {
                CommitMode::Sync => state.offsets.low_water(),
                CommitMode::Async => state.offsets.to_commit(),
            };
            if let Some(o) = offset {
                let _ = tpl.add_partition_offset(&self.cfg.kafka.input_topic, *p, Offset::Offset(o));
            }
        }
        if tpl.count() == 0 {
            return;
        }
        match consumer.commit(&tpl, mode) {
            Ok(()) => {
                for e in tpl.elements() {
                    if let (Some(state), Offset::Offset(o)) =
                        (self.partitions.get_mut(&e.partition()), e.offset())
                    {
                        state.offsets.committed(o);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "offset commit failed; retried at the next checkpoint"),
        }
    }

    /// Pauses consumption while too many signals are held; resumes below half of it.
    fn backpressure(&mut self, consumer: &KafkaConsumer) {
        let held = self.windows.buffered();
        let max = self.cfg.max_buffered_signals;
        let pause = held >= max;
        let resume = held < max / 2;
        if (pause && !self.paused) || (resume && self.paused) {
            let mut tpl = TopicPartitionList::new();
            for p in self.partitions.keys() {
                tpl.add_partition(&self.cfg.kafka.input_topic, *p);
            }
            let result = if pause { consumer.pause(&tpl) } else { consumer.resume(&tpl) };
            match result {
                Ok(()) => {
                    self.paused = pause;
                    tracing::debug!(held, paused = pause, "backpressure");
                }
                Err(e) => tracing::warn!(error = %e, "pause/resume failed"),
            }
        }
    }

    /// Waits for in-flight updates and dead letters; past `timeout` they are abandoned
    /// (their messages stay unhandled, so they are read again — nothing is lost).
    fn drain(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.windows.in_flight() > 0 || self.dlq_in_flight > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    updates = self.windows.in_flight(),
                    dead_letters = self.dlq_in_flight,
                    "giving up on in-flight work; it will be redone from Kafka"
                );
                self.updater.abandon.store(true, Ordering::Relaxed);
                return;
            }
            if let Ok(c) = self.rx.recv_timeout(left.min(Duration::from_millis(100))) {
                self.complete(c);
            }
        }
    }

    /// Before partitions are taken away: finish in-flight work, persist, commit, forget.
    pub fn revoke(&mut self, consumer: &KafkaConsumer, partitions: &[i32]) {
        tracing::info!(?partitions, "partitions revoked: draining");
        self.draining = true;
        self.drain(DRAIN_TIMEOUT);
        self.checkpoint(consumer, CommitMode::Sync, Duration::ZERO);
        self.windows.drop_partitions(partitions);
        for p in partitions {
            self.partitions.remove(p);
        }
        // Work abandoned at the drain deadline belonged to the revoked partitions; from
        // here on, retries are for partitions we still own.
        self.updater.abandon.store(false, Ordering::Relaxed);
        self.draining = false;
        self.paused = false;
        self.readiness.set(!self.partitions.is_empty());
    }

    /// After partitions are assigned: resume the windows persisted for them.
    pub fn assign(&mut self, partitions: &[i32]) {
        let new: Vec<i32> = partitions.iter().copied().filter(|p| !self.partitions.contains_key(p)).collect();
        tracing::info!(partitions = ?new, "partitions assigned");
        let topic = self.cfg.kafka.input_topic.clone();
        let store = self.updater.store.clone();
        let now = Instant::now();
        let now_ms = now_ms();
        let mut resumed = 0;
        for &p in &new {
            self.partitions.insert(p, PartitionState::default());
            let index = pending_index(&topic, p);
            let Some(members) = self.redis_blocking("read pending index", || store.index_members(&index))
            else {
                continue;
            };
            let members: Vec<(String, u64)> =
                members.into_iter().filter(|(u, _)| !self.windows.knows(u)).collect();
            let loaded = self.redis_blocking("load pending windows", || {
                futures::future::try_join_all(members.iter().map(|(u, _)| {
                    let store = &store;
                    async move {
                        Ok::<_, crate::store::StoreError>((
                            store.load_user(u).await?,
                            store.pending(u).await?,
                        ))
                    }
                }))
            });
            let Some(loaded): Option<Vec<(crate::store::UserRecord, Vec<LoggedSignal>)>> = loaded else {
                continue;
            };
            for ((user, since_ms), (rec, pending)) in members.into_iter().zip(loaded) {
                let id = self.windows.insert(&user, known(&rec), p);
                let since =
                    now.checked_sub(Duration::from_millis(now_ms.saturating_sub(since_ms))).unwrap_or(now);
                resumed += pending.len();
                self.windows.restore(&id, pending, since, now);
                self.resend_outbox(user, rec);
            }
        }
        if resumed > 0 {
            tracing::info!(signals = resumed, "resumed pending windows");
        }
    }

    /// SIGTERM: stop taking work, finish what is in flight, persist and commit.
    fn shutdown(&mut self, consumer: &KafkaConsumer) {
        tracing::info!(
            updates = self.windows.in_flight(),
            pending = self.windows.buffered(),
            "shutting down: draining"
        );
        self.draining = true;
        self.drain(DRAIN_TIMEOUT);
        self.checkpoint(consumer, CommitMode::Sync, Duration::ZERO);
    }
}

/// Users grouped by the pending index of their partition.
fn by_index<'a>(topic: &str, users: impl Iterator<Item = (i32, &'a str)>) -> HashMap<String, Vec<&'a str>> {
    let mut out: HashMap<String, Vec<&str>> = HashMap::new();
    for (partition, user) in users {
        out.entry(pending_index(topic, partition)).or_default().push(user);
    }
    out
}

fn lock(p: &Mutex<Pipeline>) -> std::sync::MutexGuard<'_, Pipeline> {
    p.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs the consumer until SIGTERM/SIGINT (or `stop`), or until the invalid-message
/// breaker trips.
pub fn run(
    cfg: RunConfig,
    engine: Arc<dyn Engine>,
    reload: Option<Reload>,
    metrics: Metrics,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Exit> {
    let cfg = Arc::new(cfg);
    let rt = Runtime::new().context("start the async runtime")?;
    let readiness = Readiness::default();
    metrics.model_info.with_label_values(&[engine.model_id(), engine.provider()]).set(1);

    let (bound, _server) = rt
        .block_on(crate::metrics::serve(cfg.metrics_addr, metrics.clone(), readiness.clone(), {
            let stop = stop.clone();
            async move {
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }))
        .with_context(|| format!("serve metrics on {}", cfg.metrics_addr))?;
    tracing::info!(addr = %bound, "metrics, health and readiness served");
    rt.spawn(watch_signals(stop.clone()));

    let abandon = Arc::new(AtomicBool::new(false));
    let redis_ok = Arc::new(AtomicBool::new(false));
    let conn = rt
        .block_on(connect_redis(&cfg, &metrics, &stop))
        .context("Redis unreachable; stopped before consuming")?;
    redis_ok.store(true, Ordering::Relaxed);
    let templates = cfg.engine.templates()?;
    let store = Store::with_recent(conn, cfg.redis.history_len, cfg.engine.recent_len());
    rt.block_on(store.load_scripts()).context("load the Lua scripts into Redis")?;
    let slot = Arc::new(EngineSlot::new(engine));
    if let Some(reload) = reload {
        let (slot, store, metrics, stop) = (slot.clone(), store.clone(), metrics.clone(), stop.clone());
        rt.spawn(crate::reload::watch(reload, slot, store, metrics, stop));
    }
    let updater = Arc::new(Updater {
        engine: slot,
        store,
        sink: Sink::new(&cfg.kafka, abandon.clone()).context("create the Kafka producer")?,
        metrics: metrics.clone(),
        templates,
        max_summary_chars: cfg.engine.max_summary_chars,
        keep_reasoning: cfg.engine.keep_reasoning,
        max_retries: cfg.engine.max_retries,
        base_signals: cfg.engine.recent_len(),
        redis_ok,
        abandon,
    });
    let sink = updater.sink.clone();
    let pipeline = Arc::new(Mutex::new(Pipeline::new(cfg.clone(), rt.handle().clone(), updater, readiness)));
    let context = IngestContext::new(pipeline.clone(), metrics, cfg.kafka.input_topic.clone());
    let consumer: KafkaConsumer =
        consumer_config(&cfg.kafka).create_with_context(context).context("create the Kafka consumer")?;
    consumer.subscribe(&[&cfg.kafka.input_topic]).context("subscribe to the input topic")?;
    tracing::info!(topic = %cfg.kafka.input_topic, group = %cfg.kafka.group_id, "consuming");

    let limits = cfg.input.limits();
    let mut last_error: Option<Instant> = None;
    let exit = loop {
        if stop.load(Ordering::Relaxed) {
            break Exit::Shutdown;
        }
        let timeout = {
            let mut p = lock(&pipeline);
            if p.at_capacity() {
                // Take nothing new until an update finishes (rebalances wait for the
                // next poll; heartbeats run on librdkafka's own thread).
                p.await_completion(Duration::from_millis(100));
                p.pump(&consumer);
                continue;
            }
            p.poll_timeout()
        };
        let mut batch = Vec::new();
        let mut wait = timeout;
        while batch.len() < cfg.poll_batch {
            match consumer.poll(wait) {
                Some(Ok(m)) => batch.push(incoming(&m, &limits)),
                Some(Err(e)) => {
                    // Broker outages surface here; librdkafka reconnects on its own.
                    if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(error = %e, "Kafka error");
                        last_error = Some(Instant::now());
                    }
                    break;
                }
                None => break,
            }
            wait = Duration::ZERO;
        }
        let mut p = lock(&pipeline);
        p.ingest(batch);
        p.pump(&consumer);
        if let Some(reason) = p.tripped.clone() {
            break Exit::InvalidRatio(reason);
        }
    };
    lock(&pipeline).shutdown(&consumer);
    drop(consumer); // leaves the group; the revoke hook finds nothing left to do
    sink.flush(Duration::from_secs(10));
    stop.store(true, Ordering::Relaxed);
    tracing::info!(?exit, "stopped");
    Ok(exit)
}

/// Connects to Redis, retrying with backoff until it answers or `stop` is set.
async fn connect_redis(cfg: &RunConfig, metrics: &Metrics, stop: &AtomicBool) -> anyhow::Result<RedisConn> {
    let mut delay = Duration::from_millis(200);
    loop {
        match RedisConn::connect(&cfg.redis).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                metrics.redis_errors.inc();
                tracing::warn!(error = %e, "cannot connect to Redis; retrying in {delay:?}");
            }
        }
        if stop.load(Ordering::Relaxed) {
            anyhow::bail!("stopped while waiting for Redis");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn watch_signals(stop: Arc<AtomicBool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    stop.store(true, Ordering::Relaxed);
}
