//! The Kafka side of the input: the consumer's settings, its context (rebalance hooks
//! and statistics), and turning a raw message into a validated signal or a dead letter.

use std::sync::{Arc, Mutex, MutexGuard};

use alignx_schemas::inference_log::LoggedSignal;
use alignx_schemas::{Limits, validate_signal};
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, ClientContext, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::sink::{Rejected, client_config};

pub type KafkaConsumer = BaseConsumer<IngestContext>;

/// A message read from the input topic.
#[derive(Debug)]
pub enum Incoming {
    Valid(LoggedSignal),
    Invalid(Rejected),
}

impl Incoming {
    pub fn partition(&self) -> i32 {
        match self {
            Incoming::Valid(s) => s.partition,
            Incoming::Invalid(r) => r.partition,
        }
    }
    pub fn offset(&self) -> i64 {
        match self {
            Incoming::Valid(s) => s.offset,
            Incoming::Invalid(r) => r.offset,
        }
    }
}

/// Validates a message (payload and key, DESIGN.md §3.1).
pub fn incoming(m: &BorrowedMessage<'_>, limits: &Limits) -> Incoming {
    let payload = m.payload().unwrap_or_default();
    match validate_signal(payload, m.key(), limits) {
        Ok(signal) => Incoming::Valid(LoggedSignal { partition: m.partition(), offset: m.offset(), signal }),
        Err(problems) => {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec).unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default();
            Incoming::Invalid(Rejected {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                payload: payload.to_vec(),
                headers,
                code: problems.primary_code(),
                detail: problems.to_string(),
            })
        }
    }
}

/// The consumer's librdkafka settings: offsets are stored and committed by the pipeline
/// only (DESIGN.md §3.5). `settings` from the configuration override the defaults here,
/// except the two offset settings the pipeline's guarantees depend on.
pub fn consumer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = client_config(cfg);
    for (k, v) in
        [("auto.offset.reset", "earliest"), ("statistics.interval.ms", "5000"), ("fetch.wait.max.ms", "100")]
    {
        if !cfg.settings.contains_key(k) {
            c.set(k, v);
        }
    }
    c.set("group.id", &cfg.group_id);
    c.set("enable.auto.commit", "false");
    c.set("enable.auto.offset.store", "false");
    c
}

/// Runs the pipeline's hooks on rebalances, and turns statistics into lag gauges.
pub struct IngestContext {
    pipeline: Arc<Mutex<Pipeline>>,
    metrics: Metrics,
    topic: String,
}

impl IngestContext {
    pub fn new(pipeline: Arc<Mutex<Pipeline>>, metrics: Metrics, topic: String) -> Self {
        Self { pipeline, metrics, topic }
    }

    fn pipeline(&self) -> MutexGuard<'_, Pipeline> {
        self.pipeline.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

impl ClientContext for IngestContext {
    fn stats(&self, stats: Statistics) {
        let Some(topic) = stats.topics.get(&self.topic) else { return };
        for (p, s) in &topic.partitions {
            if *p >= 0 && s.consumer_lag >= 0 {
                self.metrics
                    .consumer_lag
                    .with_label_values(&[self.topic.as_str(), &p.to_string()])
                    .set(s.consumer_lag);
            }
        }
    }
}

impl ConsumerContext for IngestContext {
    fn pre_rebalance(&self, consumer: &KafkaConsumer, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.pipeline().revoke(consumer, &partitions(tpl));
        }
    }

    fn post_rebalance(&self, _consumer: &KafkaConsumer, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => self.pipeline().assign(&partitions(tpl)),
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(error = %e, partitions = ?partitions(offsets), "offset commit failed; the next one retries");
        }
    }
}
