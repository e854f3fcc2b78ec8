//! Configuration of `alignx-consumer run`: a TOML file (`--config`), overridden by
//! environment variables, overridden by flags. Every field has a default, so an empty
//! file (or none) is a valid configuration.
//!
//! ```toml
//! metrics_addr = "0.0.0.0:9464"
//! [kafka]
//! brokers = "kafka-0:9092,kafka-1:9092"
//! settings = { "security.protocol" = "SASL_SSL", "sasl.mechanism" = "SCRAM-SHA-512" }
//! settings_files = { "sasl.password" = "/etc/alignx/kafka-secrets/0/value" }
//! [redis]
//! url = "redis://redis:6379/"
//! [window]
//! max_signals = 4
//! max_wait = "30s"
//! [engine]
//! kind = "onnx"
//! model_dir = "/models/current"
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use alignx_schemas::prompt::{TemplateError, Templates};
use alignx_schemas::{Limits, defaults, keys, secret_file};

use crate::onnx_model::DeviceChoice;
use crate::sampler::SamplingParams;
use serde::{Deserialize, Deserializer};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("cannot read Redis password file {path}: {source}")]
    PasswordFile { path: PathBuf, source: std::io::Error },
    #[error("cannot read the file of Kafka setting {key} ({path}): {source}")]
    SettingFile { key: String, path: PathBuf, source: std::io::Error },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Everything `run` needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub kafka: KafkaConfig,
    pub redis: RedisConfig,
    pub window: WindowConfig,
    pub engine: EngineConfig,
    pub input: InputConfig,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_addr: SocketAddr,
    /// How often pending windows are persisted and offsets committed.
    #[serde(deserialize_with = "de_duration")]
    pub commit_interval: Duration,
    /// Signals held in memory (windows and updates in flight) before partitions are paused.
    pub max_buffered_signals: usize,
    /// Messages taken from Kafka per poll round.
    pub poll_batch: usize,
    /// Updates in flight at once, over all users (0: no limit beyond one per user). More
    /// than a few thousand only adds memory and contention.
    /// With `poll_batch = 1`, `max_in_flight = 1`, `commit_interval = "0s"` and
    /// `engine.batch_size = 1` the pipeline handles one message at a time — the baseline
    /// of the pipeline benchmark, not a production setting.
    pub max_in_flight: usize,
    /// Idle users whose state stays cached (beyond it, idle users are forgotten and read
    /// back from Redis when they return).
    pub max_cached_users: usize,
    /// ONNX Runtime library (default: `ORT_DYLIB_PATH`, then next to the binary).
    pub ort_library: Option<PathBuf>,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            kafka: KafkaConfig::default(),
            redis: RedisConfig::default(),
            window: WindowConfig::default(),
            engine: EngineConfig::default(),
            input: InputConfig::default(),
            metrics_addr: defaults::METRICS_ADDR.parse().expect("the default address parses"),
            commit_interval: Duration::from_secs(1),
            max_buffered_signals: 100_000,
            poll_batch: 8192,
            max_in_flight: 2048,
            max_cached_users: 1_000_000,
            ort_library: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated.
    pub brokers: String,
    pub group_id: String,
    pub input_topic: String,
    pub dlq_topic: String,
    pub log_topic: String,
    /// Optional compacted topic receiving every new summary (key = user_id).
    pub summaries_topic: Option<String>,
    /// librdkafka properties passed through to the consumer and producers (SASL, TLS…).
    pub settings: BTreeMap<String, SettingValue>,
    /// librdkafka properties whose value is the content of a file (a mounted Secret, e.g.
    /// `"sasl.password" = "/etc/alignx/kafka-secrets/0/value"`), read at start-up into
    /// `settings`. Keeps secrets out of the config file, the environment and `ps`.
    pub settings_files: BTreeMap<String, PathBuf>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            group_id: defaults::GROUP_ID.into(),
            input_topic: keys::SIGNALS_TOPIC.into(),
            dlq_topic: keys::DLQ_TOPIC.into(),
            log_topic: keys::INFERENCE_LOG_TOPIC.into(),
            summaries_topic: None,
            settings: BTreeMap::new(),
            settings_files: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user@]host:port/[db]`; several comma-separated URLs (or `cluster = true`)
    /// select Redis Cluster. Put the password in `password_file` or
    /// `ALIGNX_REDIS_PASSWORD`, not in the URL.
    pub url: String,
    pub cluster: bool,
    pub password_file: Option<PathBuf>,
    /// Past summaries kept per user.
    pub history_len: usize,
    #[serde(skip)]
    pub password: Option<Secret>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379/".into(),
            cluster: false,
            password_file: None,
            history_len: defaults::HISTORY_LEN,
            password: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WindowConfig {
    /// Signals per update.
    pub max_signals: usize,
    /// Longest a signal waits before its window is flushed anyway.
    #[serde(deserialize_with = "de_duration")]
    pub max_wait: Duration,
}

impl Default for WindowConfig {
    fn default() -> Self {
        Self { max_signals: defaults::WINDOW_MAX_SIGNALS, max_wait: defaults::WINDOW_MAX_WAIT }
    }
}

/// What a prompt shows the model (DESIGN.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PromptSetting {
    /// The previous summary and the new signals: incremental updates.
    Streaming,
    /// The user's most recent signals only, for models trained in the base setting.
    Base,
}

/// Which engine writes summaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// The model of `model_dir`, run with ONNX Runtime.
    Onnx,
    /// Deterministic signal counting, for pipeline tests and benchmarks — not a model.
    Counting,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    pub kind: EngineKind,
    pub model_dir: Option<PathBuf>,
    /// Users per engine call.
    pub batch_size: usize,
    /// Engine calls in flight at once.
    pub concurrency: usize,
    /// Failed generations of one window before it is recorded as failed and skipped.
    pub max_retries: u32,
    /// Prompt templates overriding the shipped ones (TOML, see `alignx_schemas::prompt`).
    pub templates: Option<PathBuf>,
    /// Longest summary kept, in characters.
    pub max_summary_chars: usize,
    /// Store the model's reasoning next to the summary.
    pub keep_reasoning: bool,
    /// Where the model runs: `auto` (CUDA, else CPU with a warning), `cpu`, `cuda`.
    pub device: DeviceChoice,
    /// ONNX Runtime intra-op threads (0: its default, one per core).
    pub threads: usize,
    /// Longest generation per update, in tokens.
    pub max_new_tokens: usize,
    /// `streaming` (previous summary + new signals) or `base` (recent signals only).
    pub setting: PromptSetting,
    /// Recent signals a base-setting prompt shows (kept per user in `alignx:{u}:signals`).
    pub base_signals: usize,
    /// How often the model pointer (`alignx:model:current`, or the `model_dir` symlink) is
    /// checked for a new version; "0s" turns hot reload off.
    #[serde(deserialize_with = "de_duration")]
    pub reload_interval: Duration,
    /// Sampling, overriding `generation_config.json` (absent: its defaults; greedy
    /// when it does not ask for sampling).
    pub sampling: Option<SamplingParams>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            kind: EngineKind::Onnx,
            model_dir: None,
            batch_size: 32,
            concurrency: 2,
            max_retries: defaults::MAX_UPDATE_RETRIES,
            templates: None,
            max_summary_chars: defaults::MAX_SUMMARY_CHARS,
            keep_reasoning: false,
            device: DeviceChoice::Auto,
            threads: 0,
            max_new_tokens: 512,
            reload_interval: Duration::from_secs(10),
            setting: PromptSetting::Streaming,
            base_signals: defaults::WINDOW_MAX_SIGNALS,
            sampling: None,
        }
    }
}

/// Validation of incoming messages and the invalid-message circuit breaker.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InputConfig {
    pub max_id_bytes: usize,
    pub max_text_bytes: usize,
    pub max_message_bytes: usize,
    /// Stop when more than this fraction of …
    pub max_invalid_ratio: f64,
    /// … the last this many messages of one partition were invalid.
    pub invalid_ratio_window: usize,
}

impl Default for InputConfig {
    fn default() -> Self {
        let l = Limits::default();
        Self {
            max_id_bytes: l.max_id_bytes,
            max_text_bytes: l.max_text_bytes,
            max_message_bytes: l.max_message_bytes,
            max_invalid_ratio: defaults::INVALID_RATIO_MAX,
            invalid_ratio_window: defaults::INVALID_RATIO_WINDOW,
        }
    }
}

impl EngineConfig {
    /// Recent signals kept per user: only the base setting needs them.
    pub fn recent_len(&self) -> usize {
        match self.setting {
            PromptSetting::Base => self.base_signals,
            PromptSetting::Streaming => 0,
        }
    }

    /// The prompt templates: the configured file, else the shipped ones.
    pub fn templates(&self) -> Result<Templates, TemplateError> {
        match &self.templates {
            Some(path) => Templates::from_file(path),
            None => Ok(Templates::default()),
        }
    }
}

impl InputConfig {
    pub fn limits(&self) -> Limits {
        Limits {
            max_id_bytes: self.max_id_bytes,
            max_text_bytes: self.max_text_bytes,
            max_message_bytes: self.max_message_bytes,
        }
    }
}

/// A secret: its `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A librdkafka property value: shown in `Debug` unless its key looks secret.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SettingValue(pub String);

impl fmt::Debug for SettingValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Values are printed only through `KafkaConfig`'s derived Debug, which cannot see
        // the key; never print any of them.
        f.write_str("<value>")
    }
}

/// The command-line (and environment) side of the configuration. Every flag is optional
/// and overrides the file.
#[derive(Debug, Default, clap::Args)]
pub struct RunArgs {
    /// Configuration file, Kafka and Redis: shared with the operator commands.
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Consumer group [default: alignx-consumer].
    #[arg(long, env = "ALIGNX_GROUP_ID")]
    pub group_id: Option<String>,
    /// Dead-letter topic for rejected messages [default: alignx.signals.dlq].
    #[arg(long, env = "ALIGNX_DLQ_TOPIC")]
    pub dlq_topic: Option<String>,
    /// Optional compacted topic receiving every new summary.
    #[arg(long, env = "ALIGNX_SUMMARIES_TOPIC")]
    pub summaries_topic: Option<String>,
    /// Model directory (ONNX export, tokenizer, configs) for `--engine onnx`.
    #[arg(long, env = "ALIGNX_MODEL_DIR")]
    pub model_dir: Option<PathBuf>,
    /// `onnx` runs the model; `counting` is a deterministic stand-in for tests and
    /// pipeline benchmarks [default: onnx].
    #[arg(long, env = "ALIGNX_ENGINE", value_enum)]
    pub engine: Option<EngineKind>,
    /// Address of /metrics, /healthz and /readyz [default: 127.0.0.1:9464].
    #[arg(long, env = "ALIGNX_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Signals per update [default: 4].
    #[arg(long, env = "ALIGNX_WINDOW_SIZE")]
    pub window_size: Option<usize>,
    /// Longest a signal waits for its window to fill, e.g. `30s`, `500ms` [default: 30s].
    #[arg(long, env = "ALIGNX_WINDOW_WAIT", value_parser = parse_duration)]
    pub window_wait: Option<Duration>,
    /// ONNX Runtime library file [default: $ORT_DYLIB_PATH, then next to this binary].
    #[arg(long, env = "ALIGNX_ORT_LIBRARY")]
    pub ort_library: Option<PathBuf>,
    /// Where the model runs [default: auto: CUDA when usable, else CPU].
    #[arg(long, env = "ALIGNX_DEVICE", value_enum)]
    pub device: Option<DeviceChoice>,
    /// ONNX Runtime intra-op threads; 0 = one per core [default: 0].
    #[arg(long, env = "ALIGNX_ENGINE_THREADS")]
    pub engine_threads: Option<usize>,
    /// Longest generation per update, in tokens [default: 512].
    #[arg(long, env = "ALIGNX_MAX_NEW_TOKENS")]
    pub max_new_tokens: Option<usize>,
    /// `streaming`: prompts carry the previous summary; `base`: the user's most recent
    /// signals only, for models trained in the paper's base setting [default: streaming].
    #[arg(long, env = "ALIGNX_SETTING", value_enum)]
    pub setting: Option<PromptSetting>,
    /// How often to check for a new model version; 0s = never [default: 10s].
    #[arg(long, env = "ALIGNX_RELOAD_INTERVAL", value_parser = parse_duration)]
    pub reload_interval: Option<Duration>,
    /// Users per engine call [default: 32].
    #[arg(long, env = "ALIGNX_BATCH_SIZE")]
    pub batch_size: Option<usize>,
    /// Engine calls in flight at once [default: 2].
    #[arg(long, env = "ALIGNX_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// How often windows are persisted and offsets committed [default: 1s].
    #[arg(long, env = "ALIGNX_COMMIT_INTERVAL", value_parser = parse_duration)]
    pub commit_interval: Option<Duration>,
    /// Messages taken from Kafka per poll round [default: 8192].
    #[arg(long, env = "ALIGNX_POLL_BATCH")]
    pub poll_batch: Option<usize>,
    /// Updates in flight at once over all users; 0 = no limit beyond one per user [default: 2048].
    #[arg(long, env = "ALIGNX_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<usize>,
}

/// Configuration file, Kafka and Redis: the settings of the operator commands
/// (`produce`, `inspect`, `export`, `erase`), and the first part of `run`'s.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ConnArgs {
    /// TOML configuration file (the consumer's); flags and environment variables override it.
    #[arg(long, env = "ALIGNX_CONFIG")]
    pub config: Option<PathBuf>,
    /// Kafka bootstrap servers, comma-separated [default: 127.0.0.1:9092].
    #[arg(long, env = "ALIGNX_BROKERS")]
    pub brokers: Option<String>,
    /// Topic of incoming signals [default: alignx.signals].
    #[arg(long, env = "ALIGNX_INPUT_TOPIC")]
    pub input_topic: Option<String>,
    /// Topic of inference-log records, one per update, and of erasure audit records
    /// [default: alignx.inference-log].
    #[arg(long, env = "ALIGNX_LOG_TOPIC")]
    pub log_topic: Option<String>,
    /// librdkafka property for the consumer and producers, e.g. `security.protocol=SSL`
    /// (repeatable). Prefer the config file or `--kafka-set-file` for secrets: flags are
    /// visible in `ps`.
    #[arg(long = "kafka-set", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub kafka_set: Vec<(String, String)>,
    /// librdkafka property whose value is read from a file, e.g.
    /// `sasl.password=/run/secrets/kafka-password` (repeatable; one trailing newline is
    /// dropped). The way to pass secrets.
    #[arg(long = "kafka-set-file", value_name = "KEY=PATH", value_parser = parse_key_value)]
    pub kafka_set_file: Vec<(String, String)>,
    /// Redis URL, or several comma-separated for Redis Cluster [default: redis://127.0.0.1:6379/].
    #[arg(long, env = "ALIGNX_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Treat the Redis URL(s) as a Redis Cluster.
    #[arg(long)]
    pub redis_cluster: bool,
    /// File holding the Redis password (the env var ALIGNX_REDIS_PASSWORD also works).
    #[arg(long, env = "ALIGNX_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<PathBuf>,
}

impl ConnArgs {
    /// The consumer's configuration with these settings applied (engine settings unused).
    pub fn load(self) -> Result<RunConfig, ConfigError> {
        RunConfig::load(RunArgs { conn: self, engine: Some(EngineKind::Counting), ..RunArgs::default() })
    }
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| "expected KEY=VALUE".to_owned())?;
    if k.trim().is_empty() {
        return Err("empty KEY in KEY=VALUE".into());
    }
    Ok((k.trim().to_owned(), v.to_owned()))
}

/// Parses `250ms`, `30s`, `5m`, `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("{s:?} is not a duration like 30s or 500ms"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown unit {other:?} in {s:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{s:?}: {e}"))
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let raw = String::deserialize(d)?;
    parse_duration(&raw).map_err(serde::de::Error::custom)
}

impl RunConfig {
    /// The file (if any), then the environment and flags in `args`, then checks.
    pub fn load(args: RunArgs) -> Result<Self, ConfigError> {
        let mut cfg = match &args.conn.config {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        cfg.apply(args)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })
    }

    fn apply(&mut self, a: RunArgs) -> Result<(), ConfigError> {
        fn set<T>(slot: &mut T, value: Option<T>) {
            if let Some(v) = value {
                *slot = v;
            }
        }
        let k = &mut self.kafka;
        set(&mut k.brokers, a.conn.brokers);
        set(&mut k.group_id, a.group_id);
        set(&mut k.input_topic, a.conn.input_topic);
        set(&mut k.dlq_topic, a.dlq_topic);
        set(&mut k.log_topic, a.conn.log_topic);
        if a.summaries_topic.is_some() {
            k.summaries_topic = a.summaries_topic;
        }
        for (key, value) in a.conn.kafka_set {
            k.settings.insert(key, SettingValue(value));
        }
        for (key, path) in a.conn.kafka_set_file {
            k.settings_files.insert(key, PathBuf::from(path));
        }
        for (key, path) in &k.settings_files {
            if k.settings.contains_key(key) {
                return Err(ConfigError::Invalid(format!(
                    "Kafka setting {key} is given both as a value and as a file"
                )));
            }
            let value = secret_file::read(path).map_err(|source| ConfigError::SettingFile {
                key: key.clone(),
                path: path.clone(),
                source,
            })?;
            k.settings.insert(key.clone(), SettingValue(value));
        }
        set(&mut self.redis.url, a.conn.redis_url);
        self.redis.cluster |= a.conn.redis_cluster;
        if a.conn.redis_password_file.is_some() {
            self.redis.password_file = a.conn.redis_password_file;
        }
        self.redis.password = match (&self.redis.password_file, std::env::var("ALIGNX_REDIS_PASSWORD")) {
            (Some(path), _) => Some(Secret::new(
                secret_file::read(path)
                    .map_err(|source| ConfigError::PasswordFile { path: path.clone(), source })?,
            )),
            (None, Ok(p)) if !p.is_empty() => Some(Secret::new(p)),
            _ => None,
        };
        if a.model_dir.is_some() {
            self.engine.model_dir = a.model_dir;
        }
        set(&mut self.engine.kind, a.engine);
        set(&mut self.metrics_addr, a.metrics_addr);
        set(&mut self.window.max_signals, a.window_size);
        set(&mut self.window.max_wait, a.window_wait);
        set(&mut self.engine.batch_size, a.batch_size);
        set(&mut self.engine.device, a.device);
        if a.ort_library.is_some() {
            self.ort_library = a.ort_library;
        }
        set(&mut self.engine.threads, a.engine_threads);
        set(&mut self.engine.max_new_tokens, a.max_new_tokens);
        set(&mut self.engine.reload_interval, a.reload_interval);
        set(&mut self.engine.setting, a.setting);
        set(&mut self.engine.concurrency, a.concurrency);
        set(&mut self.commit_interval, a.commit_interval);
        set(&mut self.poll_batch, a.poll_batch);
        set(&mut self.max_in_flight, a.max_in_flight);
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.window.max_signals == 0 {
            return bad("window size must be at least 1".into());
        }
        if self.poll_batch == 0 {
            return bad("poll_batch must be at least 1".into());
        }
        if self.engine.setting == PromptSetting::Base && self.engine.base_signals == 0 {
            return bad("base_signals must be at least 1 in the base setting".into());
        }
        if self.engine.max_new_tokens == 0 {
            return bad("max_new_tokens must be at least 1".into());
        }
        if self.engine.batch_size == 0 || self.engine.concurrency == 0 {
            return bad("engine batch size and concurrency must be at least 1".into());
        }
        if !(self.input.max_invalid_ratio > 0.0 && self.input.max_invalid_ratio <= 1.0) {
            return bad(format!("max_invalid_ratio {} must be in (0, 1]", self.input.max_invalid_ratio));
        }
        if self.input.invalid_ratio_window == 0 {
            return bad("invalid_ratio_window must be at least 1".into());
        }
        if self.engine.kind == EngineKind::Onnx && self.engine.model_dir.is_none() {
            return bad("--engine onnx needs --model-dir (or ALIGNX_MODEL_DIR); \
                 `--engine counting` runs the pipeline without a model"
                .into());
        }
        if self.kafka.brokers.trim().is_empty() {
            return bad("no Kafka brokers given".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3d").is_err());
    }

    #[test]
    fn flags_override_the_file_and_unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "commit_interval = \"2s\"\n[window]\nmax_signals = 8\nmax_wait = \"5s\"\n[engine]\nkind = \"counting\"\n[kafka]\nsettings = { \"sasl.password\" = \"hunter2\" }\n",
        )
        .unwrap();
        let args = RunArgs {
            conn: ConnArgs { config: Some(path.clone()), ..Default::default() },
            window_size: Some(2),
            ..Default::default()
        };
        let cfg = RunConfig::load(args).unwrap();
        assert_eq!(cfg.window.max_signals, 2);
        assert_eq!(cfg.window.max_wait, Duration::from_secs(5));
        assert_eq!(cfg.commit_interval, Duration::from_secs(2));
        assert_eq!(cfg.engine.kind, EngineKind::Counting);
        assert!(!format!("{cfg:?}").contains("hunter2"), "secrets never appear in Debug output");

        std::fs::write(&path, "[window]\nmax_signal = 8\n").unwrap();
        let err = RunConfig::load(RunArgs {
            conn: ConnArgs { config: Some(path), ..Default::default() },
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("max_signal"), "{err}");
    }

    #[test]
    fn kafka_settings_from_files_are_read_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("password");
        std::fs::write(&secret, "s3cr3t-value\n").unwrap();
        let path = dir.path().join("c.toml");
        let toml = format!(
            "[engine]\nkind = \"counting\"\n[kafka.settings_files]\n\"sasl.password\" = {:?}\n",
            secret.display().to_string()
        );
        std::fs::write(&path, toml).unwrap();
        let cfg = RunConfig::load(RunArgs {
            conn: ConnArgs { config: Some(path.clone()), ..Default::default() },
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.kafka.settings["sasl.password"].0, "s3cr3t-value", "one trailing newline dropped");
        assert!(!format!("{cfg:?}").contains("s3cr3t"));

        // The same from a flag; a missing file names the setting and the path.
        let args = RunArgs {
            engine: Some(EngineKind::Counting),
            conn: ConnArgs {
                kafka_set_file: vec![(
                    "ssl.key.password".into(),
                    dir.path().join("nope").display().to_string(),
                )],
                ..Default::default()
            },
            ..Default::default()
        };
        let err = RunConfig::load(args).unwrap_err().to_string();
        assert!(err.contains("ssl.key.password") && err.contains("nope"), "{err}");

        // A value given twice is ambiguous.
        let args = RunArgs {
            conn: ConnArgs {
                config: Some(path),
                kafka_set: vec![("sasl.password".into(), "other".into())],
                ..Default::default()
            },
            ..Default::default()
        };
        let err = RunConfig::load(args).unwrap_err().to_string();
        assert!(err.contains("both"), "{err}");
    }

    #[test]
    fn onnx_without_a_model_dir_is_refused() {
        let err = RunConfig::load(RunArgs::default()).unwrap_err();
        assert!(err.to_string().contains("--model-dir"), "{err}");
    }
}
