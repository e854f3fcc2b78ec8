//! `alignx.inference_log.v1`: one record per update attempt on `alignx.inference-log`
//! (DESIGN.md §3.4). The trainer turns these, with later signals, into training data.

use serde::{Deserialize, Serialize};

use crate::signal::Signal;

/// The `schema` member of a log record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum InferenceLogSchema {
    #[default]
    #[serde(rename = "alignx.inference_log.v1")]
    V1,
}

/// How an update attempt ended. Stable labels: they are also metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateOutcome {
    /// A new summary version was written.
    Applied,
    /// The generation had no `<answer>…</answer>`.
    NoAnswer,
    /// An `<answer>` was opened but the generation ended before `</answer>`.
    Truncated,
    /// The answer was empty after cleaning.
    EmptyAnswer,
    /// The engine failed (not the model's output).
    EngineError,
    /// The store refused the write: another update or a replay got there first.
    Stale,
}

impl UpdateOutcome {
    pub const ALL: [UpdateOutcome; 6] =
        [Self::Applied, Self::NoAnswer, Self::Truncated, Self::EmptyAnswer, Self::EngineError, Self::Stale];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::NoAnswer => "no_answer",
            Self::Truncated => "truncated",
            Self::EmptyAnswer => "empty_answer",
            Self::EngineError => "engine_error",
            Self::Stale => "stale",
        }
    }
}

/// A signal as it was read from Kafka. Keep `partition` and `offset` the first two
/// fields: the consumer's Redis scripts read them from the front of the JSON text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedSignal {
    pub partition: i32,
    pub offset: i64,
    pub signal: Signal,
}

/// One update attempt. `S` is how the signals are held: owned when a record is read;
/// the consumer writes records that borrow the signals of its windows (`&LoggedSignal`)
/// rather than copying them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceLogRecord<S = LoggedSignal> {
    pub schema: InferenceLogSchema,
    pub user_id: String,
    /// Model version id that generated.
    pub model: String,
    /// When the record was written (Unix ms).
    pub logged_at_ms: u64,
    /// Summary version the update started from (0: none yet).
    pub previous_version: u64,
    pub previous_summary: Option<String>,
    /// The window of signals, in offset order.
    pub signals: Vec<S>,
    /// The exact prompt text given to the model.
    pub prompt: String,
    /// The raw generation after the prompt.
    pub generation: String,
    /// The parsed summary, when there was one.
    pub summary: Option<String>,
    /// The version written, when `outcome` is `applied`.
    pub new_version: Option<u64>,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    /// Oldest signal timestamp → summary written.
    pub latency_ms: u64,
    pub outcome: UpdateOutcome,
}

/// The `schema` member of an erasure record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ErasureSchema {
    #[default]
    #[serde(rename = "alignx.erasure.v1")]
    V1,
}

/// `alignx.erasure.v1`: the audit record `alignx-consumer erase` writes to the
/// inference-log topic (keyed by user) when a user's data is erased. It holds no content;
/// readers of the log (dataset builders) drop the user's earlier records when they see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErasureRecord {
    pub schema: ErasureSchema,
    pub user_id: String,
    /// The tombstone: signals stamped at or before it (Unix ms) never become state again.
    pub erased_at_ms: u64,
    /// The summary version that was deleted (0: none).
    pub erased_version: u64,
    /// Why, for the audit trail (e.g. a ticket id); never user content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A record of the inference-log topic: an update, or an erasure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LogTopicRecord {
    Update(Box<InferenceLogRecord>),
    Erasure(ErasureRecord),
}
