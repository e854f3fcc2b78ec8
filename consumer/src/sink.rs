//! What the consumer writes to Kafka: dead letters, inference-log records, and (when
//! configured) summaries. Every send waits for the broker's acknowledgement, because the
//! offsets of the input only advance past a message once what it caused is durable.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use alignx_schemas::{ProblemCode, keys};
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::KafkaConfig;

/// A message that failed validation, with what the DLQ needs to explain it.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// The original message's headers, passed on.
    pub headers: Vec<(String, Vec<u8>)>,
    pub code: ProblemCode,
    pub detail: String,
}

#[derive(Clone)]
pub struct Sink {
    producer: FutureProducer,
    input_topic: String,
    dlq_topic: String,
    log_topic: String,
    summaries_topic: Option<String>,
    /// Set when the pipeline gives up on in-flight work (shutdown deadline).
    abandon: Arc<AtomicBool>,
}

/// The librdkafka settings shared by the consumer and the producer.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in &cfg.settings {
        c.set(k, &v.0);
    }
    c
}

impl Sink {
    pub fn new(cfg: &KafkaConfig, abandon: Arc<AtomicBool>) -> Result<Self, KafkaError> {
        let mut c = client_config(cfg);
        // Our defaults come first so that `settings` may override them.
        for (k, v) in [
            ("acks", "all"),
            ("linger.ms", "5"),
            ("compression.type", "lz4"),
            ("message.timeout.ms", "120000"),
        ] {
            if !cfg.settings.contains_key(k) {
                c.set(k, v);
            }
        }
        Ok(Self {
            producer: c.create()?,
            input_topic: cfg.input_topic.clone(),
            dlq_topic: cfg.dlq_topic.clone(),
            log_topic: cfg.log_topic.clone(),
            summaries_topic: cfg.summaries_topic.clone(),
            abandon,
        })
    }

    /// Sends a rejected message to the DLQ with its reason and origin in headers.
    pub async fn dead_letter(&self, r: &Rejected) -> bool {
        let partition = r.partition.to_string();
        let offset = r.offset.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(r.headers.len() + 5)
            .insert(Header { key: keys::HEADER_ERROR, value: Some(r.code.as_str()) })
            .insert(Header { key: keys::HEADER_ERROR_DETAIL, value: Some(r.detail.as_str()) })
            .insert(Header { key: keys::HEADER_ORIGIN_TOPIC, value: Some(self.input_topic.as_str()) })
            .insert(Header { key: keys::HEADER_ORIGIN_PARTITION, value: Some(partition.as_str()) })
            .insert(Header { key: keys::HEADER_ORIGIN_OFFSET, value: Some(offset.as_str()) });
        for (k, v) in &r.headers {
            headers = headers.insert(Header { key: k.as_str(), value: Some(v.as_slice()) });
        }
        self.send(&self.dlq_topic, r.key.as_deref(), &r.payload, Some(headers)).await
    }

    /// Sends one inference-log record (key = user id).
    pub async fn log(&self, user: &str, record: &str) -> bool {
        self.send(&self.log_topic, Some(user.as_bytes()), record.as_bytes(), None).await
    }

    /// Publishes a new summary on the summaries topic, when one is configured.
    pub async fn summary(&self, user: &str, record: &str) -> bool {
        match &self.summaries_topic {
            Some(topic) => self.send(topic, Some(user.as_bytes()), record.as_bytes(), None).await,
            None => true,
        }
    }

    pub fn publishes_summaries(&self) -> bool {
        self.summaries_topic.is_some()
    }

    /// Sends until the broker acknowledges; false only when the pipeline abandons work.
    async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: Option<OwnedHeaders>,
    ) -> bool {
        let mut delay = Duration::from_millis(100);
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).payload(payload);
            if let Some(k) = key {
                record = record.key(k);
            }
            if let Some(h) = &headers {
                record = record.headers(h.clone());
            }
            match self.producer.send(record, Duration::from_secs(5)).await {
                Ok(_) => return true,
                Err((e, _)) => {
                    tracing::warn!(topic, error = %e, "produce failed; retrying in {delay:?}");
                }
            }
            if self.abandon.load(Ordering::Relaxed) {
                return false;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Waits for queued messages to be delivered (shutdown).
    pub fn flush(&self, timeout: Duration) {
        use rdkafka::producer::Producer;
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "producer flush incomplete");
        }
    }
}
