//! Reading whole topics for `build-dataset`: every partition from the beginning up to
//! its end as it was when the read started (the high watermark), under a consumer group
//! of the trainer's own that never commits — so each run reads the same history and the
//! serving consumer's group is never touched. (tansu, the test broker, reports wrong
//! high watermarks for batched produce — DESIGN.md §8 — so its tests produce unbatched.)

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use alignx_schemas::inference_log::{LogTopicRecord, LoggedSignal};
use alignx_schemas::signal::{Limits, validate_signal};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;

use crate::dataset::DatasetError;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct KafkaSource {
    pub brokers: String,
    pub group: String,
    /// Extra librdkafka settings (`security.protocol`, `sasl.*`, `ssl.*`, …).
    pub settings: Vec<(String, String)>,
    /// How long to wait for the broker before giving up.
    pub timeout: Duration,
}

fn kafka(e: impl std::fmt::Display) -> DatasetError {
    DatasetError::Kafka(e.to_string())
}

/// One message: partition, offset, key, payload.
type Raw = (i32, i64, Option<Vec<u8>>, Option<Vec<u8>>);

impl KafkaSource {
    fn consumer(&self) -> Result<BaseConsumer, DatasetError> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest");
        for (k, v) in &self.settings {
            cfg.set(k, v);
        }
        cfg.create().map_err(kafka)
    }

    /// Every message of `topic` up to the ends its partitions had when called.
    fn read(&self, topic: &str) -> Result<Vec<Raw>, DatasetError> {
        let consumer = self.consumer()?;
        let metadata = consumer.fetch_metadata(Some(topic), self.timeout).map_err(kafka)?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            return Err(DatasetError::Kafka(format!("topic {topic} does not exist or has no partitions")));
        }
        let mut ends: HashMap<i32, i64> = HashMap::new();
        let mut assignment = TopicPartitionList::new();
        for &p in &partitions {
            let (low, high) = consumer.fetch_watermarks(topic, p, self.timeout).map_err(kafka)?;
            if high > low {
                ends.insert(p, high);
                assignment.add_partition_offset(topic, p, Offset::Offset(low)).map_err(kafka)?;
            }
        }
        let mut out = Vec::new();
        if ends.is_empty() {
            return Ok(out);
        }
        consumer.assign(&assignment).map_err(kafka)?;
        let mut quiet_since = Instant::now();
        while !ends.is_empty() {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    quiet_since = Instant::now();
                    let (p, o) = (m.partition(), m.offset());
                    let Some(&end) = ends.get(&p) else { continue };
                    if o < end {
                        out.push((p, o, m.key().map(<[u8]>::to_vec), m.payload().map(<[u8]>::to_vec)));
                    }
                    if o + 1 >= end {
                        ends.remove(&p);
                    }
                }
                Some(Err(e)) => return Err(kafka(e)),
                None if quiet_since.elapsed() > self.timeout => {
                    return Err(DatasetError::Kafka(format!(
                        "{topic}: no message for {:?} with partitions {:?} unfinished",
                        self.timeout,
                        ends.keys().collect::<Vec<_>>()
                    )));
                }
                None => {}
            }
        }
        Ok(out)
    }

    /// The inference-log topic's records in order (per partition; a user's records are
    /// all in one). Returns how many messages were not records (counted, skipped).
    pub fn read_log(&self, topic: &str) -> Result<(Vec<LogTopicRecord>, usize), DatasetError> {
        let mut raw = self.read(topic)?;
        raw.sort_by_key(|(p, o, _, _)| (*p, *o));
        let (mut records, mut bad) = (Vec::new(), 0);
        for (_, _, _, payload) in raw {
            match payload.as_deref().map(serde_json::from_slice::<LogTopicRecord>) {
                Some(Ok(r)) => records.push(r),
                _ => bad += 1,
            }
        }
        Ok((records, bad))
    }

    /// The signals topic's valid signals with their positions; invalid messages (the
    /// consumer dead-lettered them) are counted and skipped.
    pub fn read_signals(&self, topic: &str) -> Result<(Vec<LoggedSignal>, usize), DatasetError> {
        let limits = Limits::default();
        let (mut signals, mut invalid) = (Vec::new(), 0);
        for (partition, offset, key, payload) in self.read(topic)? {
            match validate_signal(payload.as_deref().unwrap_or_default(), key.as_deref(), &limits) {
                Ok(signal) => signals.push(LoggedSignal { partition, offset, signal }),
                Err(_) => invalid += 1,
            }
        }
        Ok((signals, invalid))
    }
}

/// The `[kafka]` section of the service's configuration file: the TOML `alignx-consumer
/// run --config` reads, which the Helm chart mounts into the retraining job as well
/// (`ALIGNX_CONFIG`), so that both reach the same brokers and topics with the same client
/// settings and secrets. The consumer's `config.rs` owns the format; the keys read here
/// mean the same, every other key and section is the consumer's and ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ServiceKafka {
    pub brokers: Option<String>,
    pub input_topic: Option<String>,
    pub log_topic: Option<String>,
    /// librdkafka properties (SASL, TLS, …).
    pub settings: BTreeMap<String, String>,
    /// librdkafka properties whose value is a file's content (a mounted Secret).
    pub settings_files: BTreeMap<String, PathBuf>,
}

impl ServiceKafka {
    pub fn from_file(path: &Path) -> Result<Self, DatasetError> {
        #[derive(Deserialize)]
        struct File {
            #[serde(default)]
            kafka: ServiceKafka,
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| DatasetError::Read { path: path.to_owned(), message: e.to_string() })?;
        let file: File = toml::from_str(&text)
            .map_err(|e| DatasetError::Read { path: path.to_owned(), message: e.to_string() })?;
        Ok(file.kafka)
    }
}

/// librdkafka settings from values and from files (`KEY=PATH`: the value is read as
/// [`alignx_schemas::secret_file::read`] reads it, as the consumer does), the latter for secrets,
/// which should never sit in arguments or the environment. A key given both ways is an
/// error rather than a silent choice.
pub fn settings(
    values: impl IntoIterator<Item = (String, String)>,
    files: impl IntoIterator<Item = (String, PathBuf)>,
) -> Result<Vec<(String, String)>, DatasetError> {
    let mut out: BTreeMap<String, String> = values.into_iter().collect();
    for (key, path) in files {
        if out.contains_key(&key) {
            return Err(DatasetError::Kafka(format!("setting {key} is given both as a value and as a file")));
        }
        let value = alignx_schemas::secret_file::read(&path).map_err(|e| DatasetError::Read {
            path: path.clone(),
            message: format!("Kafka setting {key}: {e}"),
        })?;
        out.insert(key, value);
    }
    Ok(out.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kafka_section_of_the_consumers_config_and_secrets_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("value");
        std::fs::write(&secret, "s3cr3t\n").unwrap();
        // As the chart's ConfigMap writes it: the consumer's other sections are ignored.
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "metrics_addr = \"0.0.0.0:9464\"\n[kafka]\ngroup_id = \"alignx-consumer\"\n\
                 input_topic = \"prod.signals\"\nlog_topic = \"prod.log\"\n\
                 [kafka.settings]\n\"security.protocol\" = \"SASL_SSL\"\n\
                 [kafka.settings_files]\n\"sasl.password\" = {:?}\n[redis]\ncluster = false\n",
                secret.display().to_string()
            ),
        )
        .unwrap();
        let k = ServiceKafka::from_file(&config).unwrap();
        assert_eq!(
            (k.input_topic.as_deref(), k.log_topic.as_deref()),
            (Some("prod.signals"), Some("prod.log"))
        );
        assert_eq!(k.brokers, None);
        let got = settings(k.settings, k.settings_files).unwrap();
        assert_eq!(
            got,
            [
                ("sasl.password".to_owned(), "s3cr3t".to_owned()),
                ("security.protocol".into(), "SASL_SSL".into())
            ]
        );

        let both =
            settings([("sasl.password".to_owned(), "x".to_owned())], [("sasl.password".to_owned(), secret)]);
        assert!(both.unwrap_err().to_string().contains("both as a value and as a file"));
        let missing = settings([], [("sasl.password".to_owned(), dir.path().join("nope"))]);
        assert!(missing.unwrap_err().to_string().contains("sasl.password"));
        std::fs::write(&config, "[kafka]\nbrokers = [1]\n").unwrap();
        let bad = ServiceKafka::from_file(&config).unwrap_err().to_string();
        assert!(bad.contains("config.toml") && bad.contains("brokers"), "{bad}");
    }
}
