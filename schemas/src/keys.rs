//! Names other systems see: Kafka topics and headers, Redis keys (DESIGN.md §1, §3.3).

/// Signals produced by applications; key = `user_id`.
pub const SIGNALS_TOPIC: &str = "alignx.signals";
/// Rejected signals, with the reason in headers.
pub const DLQ_TOPIC: &str = "alignx.signals.dlq";
/// One record per update, the trainer's input.
pub const INFERENCE_LOG_TOPIC: &str = "alignx.inference-log";
/// Optional compacted topic with every new summary; key = `user_id`.
pub const SUMMARIES_TOPIC: &str = "alignx.summaries";

/// DLQ header: the machine reason code ([`crate::ProblemCode::as_str`]).
pub const HEADER_ERROR: &str = "alignx-error";
/// DLQ header: every problem, human readable.
pub const HEADER_ERROR_DETAIL: &str = "alignx-error-detail";
/// DLQ headers: where the message came from.
pub const HEADER_ORIGIN_TOPIC: &str = "alignx-origin-topic";
pub const HEADER_ORIGIN_PARTITION: &str = "alignx-origin-partition";
pub const HEADER_ORIGIN_OFFSET: &str = "alignx-origin-offset";

/// The Redis keys of one user. All share the hash tag `{user_id}`, so a Lua script may
/// touch them together on Redis Cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserKeys {
    /// Hash: the current summary record ([`crate::summary::SummaryRecord`]).
    pub summary: String,
    /// List: signals received but not yet applied, with their offsets.
    pub pending: String,
    /// List: past summaries, newest first, capped.
    pub history: String,
    /// List: the user's most recent signals, capped (kept only for base-setting models,
    /// whose prompts show recent behaviour instead of a past summary).
    pub signals: String,
    /// The user's erasure tombstone: the time (Unix ms) of their last erasure. Signals
    /// stamped at or before it never become state again.
    pub erased: String,
}

impl UserKeys {
    pub fn new(user_id: &str) -> Self {
        let tag = hash_tag(user_id);
        Self {
            summary: format!("alignx:{{{tag}}}:summary"),
            pending: format!("alignx:{{{tag}}}:pending"),
            history: format!("alignx:{{{tag}}}:history"),
            signals: format!("alignx:{{{tag}}}:signals"),
            erased: format!("alignx:{{{tag}}}:erased"),
        }
    }
}

/// String: the model directory consumers should serve. Set by the trainer's promotion
/// step (or by hand); consumers watch it and swap models between batches.
pub const MODEL_POINTER: &str = "alignx:model:current";

/// Sorted set of the users with signals pending from one input partition, scored by when
/// their first pending signal was persisted (Unix ms). A consumer that is assigned the
/// partition reads it to resume those windows. Kafka topic names cannot contain braces,
/// so the tag is always the whole `topic/partition`.
pub fn pending_index(topic: &str, partition: i32) -> String {
    format!("alignx:pending-users:{{{topic}/{partition}}}")
}

/// The user id as it appears between the braces of a key. Redis Cluster hashes the text
/// between the first `{` and the next `}`, so a `}` in an id would cut the tag short;
/// `{`, `}` and `%` are percent-encoded so the tag is always the whole id and distinct
/// ids always give distinct keys.
pub fn hash_tag(user_id: &str) -> String {
    let mut out = String::with_capacity(user_id.len());
    for ch in user_id.chars() {
        match ch {
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            '%' => out.push_str("%25"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag() {
        let k = UserKeys::new("alice");
        assert_eq!(k.summary, "alignx:{alice}:summary");
        assert_eq!(k.pending, "alignx:{alice}:pending");
        assert_eq!(k.history, "alignx:{alice}:history");
    }

    #[test]
    fn pending_index_is_tagged_by_partition() {
        assert_eq!(pending_index("alignx.signals", 3), "alignx:pending-users:{alignx.signals/3}");
    }

    #[test]
    fn braces_cannot_break_the_tag() {
        let k = UserKeys::new("a}b{c%");
        assert_eq!(k.summary, "alignx:{a%7Db%7Bc%25}:summary");
        // The tag Redis hashes is everything between the first '{' and the next '}'.
        let open = k.summary.find('{').unwrap();
        let close = open + k.summary[open..].find('}').unwrap();
        assert_eq!(&k.summary[open + 1..close], "a%7Db%7Bc%25");
        assert_ne!(UserKeys::new("%7D"), UserKeys::new("}"));
    }
}
