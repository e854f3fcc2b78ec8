//! Operator commands over the same Kafka topics and Redis keys the consumer uses:
//! `produce` (validated signals onto the input topic), `inspect`/`export` (everything
//! stored about a user) and `erase` (a user's data rights: delete and tombstone, audited
//! on the inference-log topic). Each is a function over a loaded [`RunConfig`], so the
//! file/env/flag configuration is the consumer's own.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::time::Duration;

use alignx_schemas::inference_log::{ErasureRecord, ErasureSchema, LoggedSignal};
use alignx_schemas::summary::SummaryRecord;
use alignx_schemas::{Limits, ProblemCode, validate_payload};
use anyhow::Context;
use futures::StreamExt;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::redis_conn::RedisConn;
use crate::sink::client_config;
use crate::store::{HistoryEntry, Store};

/// A producer that waits for every acknowledgement and keeps per-partition order even
/// with many messages in flight (idempotence).
pub(crate) fn producer(cfg: &RunConfig) -> anyhow::Result<FutureProducer> {
    let mut c = client_config(&cfg.kafka);
    for (k, v) in
        [("acks", "all"), ("enable.idempotence", "true"), ("linger.ms", "5"), ("message.timeout.ms", "30000")]
    {
        if !cfg.kafka.settings.contains_key(k) {
            c.set(k, v);
        }
    }
    c.create().context("create the Kafka producer")
}

async fn store(cfg: &RunConfig) -> anyhow::Result<Store<RedisConn>> {
    let conn = RedisConn::connect(&cfg.redis).await.context("connect to Redis")?;
    Ok(Store::new(conn, 1))
}

/// A line `produce` refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidLine {
    pub line: usize,
    pub reason: ProblemCode,
    pub detail: String,
}

/// What `produce` did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Produced {
    pub sent: u64,
    pub invalid: u64,
    /// Sent, by kind.
    pub by_kind: BTreeMap<&'static str, u64>,
}

/// Validates every line of `input` as the consumer would, then — only if all are valid,
/// or `skip_invalid` — sends the valid ones to the input topic keyed by `user_id`, in
/// file order per user, each acknowledged by the brokers. `on_invalid` sees each refused
/// line; `on_sent` counts progress.
pub async fn produce(
    cfg: &RunConfig,
    input: impl BufRead,
    skip_invalid: bool,
    mut on_invalid: impl FnMut(&InvalidLine),
    on_sent: impl Fn(u64),
) -> anyhow::Result<Produced> {
    let limits = Limits::default();
    let mut valid: Vec<(String, &'static str, Vec<u8>)> = Vec::new();
    let mut report = Produced::default();
    for (i, line) in input.split(b'\n').enumerate() {
        let line = line.context("read the input")?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match validate_payload(&line, &limits) {
            Ok(signal) => valid.push((signal.user_id.clone(), signal.kind().as_str(), line)),
            Err(problems) => {
                report.invalid += 1;
                on_invalid(&InvalidLine {
                    line: i + 1,
                    reason: problems.primary_code(),
                    detail: problems.to_string(),
                });
            }
        }
    }
    if report.invalid > 0 && !skip_invalid {
        return Ok(report);
    }
    let producer = producer(cfg)?;
    let topic = cfg.kafka.input_topic.as_str();
    let mut sends = futures::stream::iter(valid.iter())
        .map(|(user, kind, payload)| {
            let producer = &producer;
            async move {
                producer
                    .send(
                        FutureRecord::to(topic).key(user.as_bytes()).payload(payload),
                        Duration::from_secs(30),
                    )
                    .await
                    .map(|_| *kind)
                    .map_err(|(e, _)| anyhow::anyhow!("send to {topic}: {e}"))
            }
        })
        .buffered(1024);
    while let Some(sent) = sends.next().await {
        let kind = sent?;
        report.sent += 1;
        *report.by_kind.entry(kind).or_default() += 1;
        on_sent(report.sent);
    }
    Ok(report)
}

/// Everything stored about one user (`export`, `inspect --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserExport {
    /// `alignx.user_export.v1`.
    pub schema: String,
    pub user_id: String,
    pub exported_at_ms: u64,
    /// The current summary, with version, model and update time; `null` when none.
    pub summary: Option<SummaryRecord>,
    /// Past summaries, newest first (capped).
    pub history: Vec<HistoryEntry>,
    /// Signals received but not yet folded into a summary, in arrival order.
    pub pending: Vec<LoggedSignal>,
    /// The most recent applied signals (kept only in the base setting).
    pub recent: Vec<LoggedSignal>,
    /// When the user was last erased (Unix ms), if ever.
    pub erased_at_ms: Option<i64>,
    /// What this export does not contain.
    pub not_included: String,
}

pub const EXPORT_SCHEMA: &str = "alignx.user_export.v1";

/// Reads everything stored about `user_id` in Redis.
pub async fn export(cfg: &RunConfig, user_id: &str) -> anyhow::Result<UserExport> {
    let store = store(cfg).await?;
    let rec = store.load_user(user_id).await?;
    Ok(UserExport {
        schema: EXPORT_SCHEMA.to_owned(),
        user_id: user_id.to_owned(),
        exported_at_ms: crate::update::now_ms(),
        summary: rec.summary,
        history: store.history(user_id).await?,
        pending: store.pending(user_id).await?,
        recent: store.recent(user_id).await?,
        erased_at_ms: rec.erased_at_ms,
        not_included: format!(
            "Kafka topics ({}, {}, {}{}) keep the user's messages until their retention or \
             compaction removes them; see the README's section on erasure.",
            cfg.kafka.input_topic,
            cfg.kafka.log_topic,
            cfg.kafka.dlq_topic,
            cfg.kafka.summaries_topic.as_deref().map(|t| format!(", {t}")).unwrap_or_default()
        ),
    })
}

/// The human view of an export.
pub fn render(e: &UserExport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let time = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms).map_or_else(|| ms.to_string(), |t| t.to_rfc3339())
    };
    let _ = writeln!(out, "user: {}", e.user_id);
    match &e.summary {
        Some(s) => {
            let _ = writeln!(
                out,
                "summary: version {}, model {}, updated {}, {} signals applied",
                s.version,
                s.model,
                time(s.updated_at_ms as i64),
                s.signals_applied
            );
            for line in s.summary.lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
        None => out.push_str("summary: none\n"),
    }
    let _ = writeln!(out, "pending signals: {}", e.pending.len());
    for s in &e.pending {
        let _ = writeln!(
            out,
            "  partition {} offset {}: {} at {} ({})",
            s.partition,
            s.offset,
            s.signal.kind().as_str(),
            s.signal.ts.as_str(),
            s.signal.signal_id
        );
    }
    let _ = writeln!(out, "history: {} past summaries", e.history.len());
    for h in &e.history {
        let first = h.summary.lines().next().unwrap_or("");
        let _ = writeln!(out, "  v{}: {first}", h.version);
    }
    if !e.recent.is_empty() {
        let _ = writeln!(out, "recent signals kept: {}", e.recent.len());
    }
    match e.erased_at_ms {
        Some(t) => {
            let _ = writeln!(out, "erased: {} (signals stamped before this are dropped)", time(t));
        }
        None => out.push_str("erased: never\n"),
    }
    out
}

/// What `erase` did (returned once the audit record is acknowledged).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErasureReport {
    pub user_id: String,
    pub erased_at_ms: u64,
    pub erased_version: u64,
    pub pending_removed: u64,
    pub history_removed: u64,
}

/// Erases everything stored about `user_id` in Redis (atomically, leaving a tombstone at
/// `now`), then writes the audit record to the inference-log topic. Running it again is
/// safe: a failed audit is retried by rerunning.
pub async fn erase(cfg: &RunConfig, user_id: &str, reason: Option<String>) -> anyhow::Result<ErasureReport> {
    let store = store(cfg).await?;
    let now = crate::update::now_ms();
    let erased = store.erase(user_id, now as i64).await.context("erase in Redis")?;
    tracing::info!(user = user_id, version = erased.version, "erased from Redis");
    let record = ErasureRecord {
        schema: ErasureSchema::V1,
        user_id: user_id.to_owned(),
        erased_at_ms: now,
        erased_version: erased.version,
        reason,
    };
    let json = serde_json::to_string(&record).expect("an erasure record serialises");
    let producer = producer(cfg)?;
    producer
        .send(
            FutureRecord::to(&cfg.kafka.log_topic).key(user_id.as_bytes()).payload(&json),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| {
            anyhow::anyhow!(
                "the user is erased from Redis, but the audit record could not be written to {}: {e}; \
                 run the same erase again",
                cfg.kafka.log_topic
            )
        })?;
    Ok(ErasureReport {
        user_id: user_id.to_owned(),
        erased_at_ms: now,
        erased_version: erased.version,
        pending_removed: erased.pending,
        history_removed: erased.history,
    })
}
