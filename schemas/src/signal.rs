//! `alignx.signal.v1`: what applications produce to `alignx.signals` (DESIGN.md §3.1).
//!
//! ```json
//! {"schema":"alignx.signal.v1","user_id":"u1","signal_id":"s1","ts":"2026-01-01T00:00:00Z",
//!  "kind":"pair","post":"…","chosen":"…","rejected":"…"}
//! ```
//! Unknown extra members are tolerated (and dropped) so producers can add metadata.

use std::fmt;

use chrono::DateTime;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::check::{Checker, Text, field_path};
use crate::problem::{ProblemCode, Problems};

/// The `schema` value of every signal.
pub const SIGNAL_SCHEMA: &str = "alignx.signal.v1";

/// Size limits of a signal; configurable, defaults from DESIGN.md §3.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest `user_id` / `signal_id`, in bytes.
    pub max_id_bytes: usize,
    /// Longest text field (`post`, `chosen`, `rejected`, `comment`, `text`), in bytes.
    pub max_text_bytes: usize,
    /// Largest whole message, in bytes.
    pub max_message_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_id_bytes: 128, max_text_bytes: 16 * 1024, max_message_bytes: 64 * 1024 }
    }
}

/// The kinds of behavioural signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SignalKind {
    Pair,
    Ugc,
    Text,
}

impl SignalKind {
    pub const ALL: [SignalKind; 3] = [SignalKind::Pair, SignalKind::Ugc, SignalKind::Text];

    pub fn as_str(self) -> &'static str {
        match self {
            SignalKind::Pair => "pair",
            SignalKind::Ugc => "ugc",
            SignalKind::Text => "text",
        }
    }
}

impl fmt::Display for SignalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An RFC 3339 timestamp that keeps the producer's exact text (so a signal
/// re-serialises byte-for-byte) next to its value in Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timestamp {
    raw: String,
    unix_ms: i64,
}

impl Timestamp {
    pub fn parse(raw: &str) -> Result<Self, chrono::ParseError> {
        let dt = DateTime::parse_from_rfc3339(raw)?;
        Ok(Self { raw: raw.to_owned(), unix_ms: dt.timestamp_millis() })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    pub fn unix_ms(&self) -> i64 {
        self.unix_ms
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.raw)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Timestamp::parse(&raw)
            .map_err(|e| serde::de::Error::custom(format!("invalid RFC 3339 timestamp {raw:?}: {e}")))
    }
}

/// What the user did; the `kind` member selects the variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SignalBody {
    /// The user chose `chosen` over `rejected` as a reply to `post`.
    Pair { post: String, chosen: String, rejected: String },
    /// The user wrote `comment` in reply to `post`.
    Ugc { post: String, comment: String },
    /// Free-form text by the user, not tied to a post.
    Text { text: String },
}

impl SignalBody {
    pub fn kind(&self) -> SignalKind {
        match self {
            SignalBody::Pair { .. } => SignalKind::Pair,
            SignalBody::Ugc { .. } => SignalKind::Ugc,
            SignalBody::Text { .. } => SignalKind::Text,
        }
    }
}

/// The `schema` member: one variant per version we read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SignalSchema {
    #[default]
    #[serde(rename = "alignx.signal.v1")]
    V1,
}

/// A validated signal. Construct it with [`validate_signal`] from untrusted bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    pub schema: SignalSchema,
    pub user_id: String,
    pub signal_id: String,
    pub ts: Timestamp,
    #[serde(flatten)]
    pub body: SignalBody,
}

impl Signal {
    pub fn kind(&self) -> SignalKind {
        self.body.kind()
    }
}

/// Validates one Kafka message: its payload and its key. Returns every problem found.
///
/// `key` must equal `user_id` so that all of a user's signals land in one partition
/// and are applied in order; a message without a key is rejected for the same reason.
pub fn validate_signal(payload: &[u8], key: Option<&[u8]>, limits: &Limits) -> Result<Signal, Problems> {
    let signal = validate_payload(payload, limits)?;
    let mut c = Checker::new();
    check_key(&mut c, key, &signal.user_id);
    c.conclude(Some(signal), "$")
}

/// Validates a payload without a Kafka key: for signals not yet sent, which will be
/// produced with key = `user_id` (files checked by `alignx-consumer validate`).
pub fn validate_payload(payload: &[u8], limits: &Limits) -> Result<Signal, Problems> {
    if payload.len() > limits.max_message_bytes {
        return Err(Problems::single(
            "$",
            ProblemCode::MessageTooLarge,
            format!("message is {} bytes, limit {}", payload.len(), limits.max_message_bytes),
        ));
    }
    let text = std::str::from_utf8(payload)
        .map_err(|e| Problems::single("$", ProblemCode::InvalidUtf8, format!("payload is not UTF-8: {e}")))?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| Problems::single("$", ProblemCode::InvalidJson, format!("payload is not JSON: {e}")))?;
    let mut c = Checker::new();
    let signal = check_signal(&mut c, &value, limits);
    c.conclude(signal, "$")
}

fn check_key(c: &mut Checker, key: Option<&[u8]>, user_id: &str) {
    match key {
        Some(k) if k == user_id.as_bytes() => {}
        Some(k) => c.report(
            "$.user_id",
            ProblemCode::KeyMismatch,
            format!("message key {:?} differs from user_id", String::from_utf8_lossy(k)),
        ),
        None => {
            c.report("$.user_id", ProblemCode::KeyMismatch, "message has no key; the key must be the user_id")
        }
    }
}

fn check_id<'v>(
    c: &mut Checker,
    obj: &'v Map<String, Value>,
    field: &str,
    limits: &Limits,
) -> Option<&'v str> {
    let id = c.text(obj, "$", field, Text::non_empty_max(limits.max_id_bytes))?;
    if id.chars().any(char::is_control) {
        c.report(field_path("$", field), ProblemCode::InvalidId, "must not contain control characters");
        return None;
    }
    Some(id)
}

/// Walks the whole document, reporting each problem; builds the signal only if all is well.
fn check_signal(c: &mut Checker, value: &Value, limits: &Limits) -> Option<Signal> {
    let obj = c.object(value, "$")?;
    let schema = c.one_of(obj, "$", "schema", &[SIGNAL_SCHEMA], ProblemCode::UnknownSchema);
    let user_id = check_id(c, obj, "user_id", limits);
    let signal_id = check_id(c, obj, "signal_id", limits);
    let ts = c.text(obj, "$", "ts", Text::ANY).and_then(|raw| match Timestamp::parse(raw) {
        Ok(ts) => Some(ts),
        Err(e) => {
            c.report(
                "$.ts",
                ProblemCode::InvalidTimestamp,
                format!("{raw:?} is not an RFC 3339 timestamp: {e}"),
            );
            None
        }
    });
    let body = check_body(c, obj, limits);
    let (_, user_id, signal_id, ts, body) = (schema?, user_id?, signal_id?, ts?, body?);
    Some(Signal {
        schema: SignalSchema::V1,
        user_id: user_id.to_owned(),
        signal_id: signal_id.to_owned(),
        ts,
        body,
    })
}

fn check_body(c: &mut Checker, obj: &Map<String, Value>, limits: &Limits) -> Option<SignalBody> {
    let kinds = SignalKind::ALL.map(SignalKind::as_str);
    let kind = c.one_of(obj, "$", "kind", &kinds, ProblemCode::UnknownKind)?;
    let rule = Text::non_empty_max(limits.max_text_bytes);
    let mut text = |field: &str| c.text(obj, "$", field, rule).map(str::to_owned);
    match kind {
        "pair" => {
            let (post, chosen, rejected) = (text("post"), text("chosen"), text("rejected"));
            Some(SignalBody::Pair { post: post?, chosen: chosen?, rejected: rejected? })
        }
        "ugc" => {
            let (post, comment) = (text("post"), text("comment"));
            Some(SignalBody::Ugc { post: post?, comment: comment? })
        }
        _ => Some(SignalBody::Text { text: text("text")? }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(r: Result<Signal, Problems>) -> Vec<(String, ProblemCode)> {
        r.expect_err("should be rejected").into_vec().into_iter().map(|p| (p.path, p.code)).collect()
    }

    const PAIR: &str = r#"{"schema":"alignx.signal.v1","user_id":"u1","signal_id":"s1","ts":"2026-01-02T03:04:05.678+01:00","kind":"pair","post":"P","chosen":"C","rejected":"R"}"#;

    #[test]
    fn valid_pair_round_trips() {
        let s = validate_signal(PAIR.as_bytes(), Some(b"u1"), &Limits::default()).unwrap();
        assert_eq!(s.kind(), SignalKind::Pair);
        assert_eq!(s.ts.unix_ms(), 1_767_319_445_678);
        let back: Value = serde_json::to_value(&s).unwrap();
        assert_eq!(back, serde_json::from_str::<Value>(PAIR).unwrap());
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let doc = r#"{"schema":"alignx.signal.v2","user_id":"","signal_id":7,"ts":"yesterday","kind":"pair","post":"  ","chosen":"C"}"#;
        let got = codes(validate_signal(doc.as_bytes(), Some(b""), &Limits::default()));
        assert_eq!(
            got,
            vec![
                ("$.schema".into(), ProblemCode::UnknownSchema),
                ("$.user_id".into(), ProblemCode::EmptyField),
                ("$.signal_id".into(), ProblemCode::WrongType),
                ("$.ts".into(), ProblemCode::InvalidTimestamp),
                ("$.post".into(), ProblemCode::EmptyField),
                ("$.rejected".into(), ProblemCode::MissingField),
            ]
        );
    }

    #[test]
    fn key_must_match_user_id() {
        assert_eq!(
            codes(validate_signal(PAIR.as_bytes(), Some(b"u2"), &Limits::default())),
            vec![("$.user_id".into(), ProblemCode::KeyMismatch)]
        );
        assert_eq!(
            codes(validate_signal(PAIR.as_bytes(), None, &Limits::default()))[0].1,
            ProblemCode::KeyMismatch
        );
    }

    #[test]
    fn limits_are_bytes() {
        let limits = Limits { max_text_bytes: 4, ..Limits::default() };
        // "ééé" is 3 characters but 6 bytes.
        let doc = PAIR.replace("\"C\"", "\"ééé\"");
        assert_eq!(
            codes(validate_signal(doc.as_bytes(), Some(b"u1"), &limits)),
            vec![("$.chosen".into(), ProblemCode::FieldTooLong)]
        );
        let small = Limits { max_message_bytes: 10, ..Limits::default() };
        assert_eq!(
            codes(validate_signal(PAIR.as_bytes(), Some(b"u1"), &small))[0].1,
            ProblemCode::MessageTooLarge
        );
    }

    #[test]
    fn hostile_bytes_are_rejected_not_panicked_on() {
        let l = Limits::default();
        assert_eq!(codes(validate_signal(b"\xff\xfe", Some(b"u"), &l))[0].1, ProblemCode::InvalidUtf8);
        assert_eq!(codes(validate_signal(b"{\"a\":", Some(b"u"), &l))[0].1, ProblemCode::InvalidJson);
        let deep = "[".repeat(10_000);
        assert_eq!(codes(validate_signal(deep.as_bytes(), Some(b"u"), &l))[0].1, ProblemCode::InvalidJson);
        assert_eq!(codes(validate_signal(b"[1]", Some(b"u"), &l))[0].1, ProblemCode::WrongType);
        let ctrl = PAIR.replace("\"u1\"", "\"u\\u0000\"");
        assert_eq!(codes(validate_signal(ctrl.as_bytes(), Some(b"u\0"), &l))[0].1, ProblemCode::InvalidId);
    }

    #[test]
    fn unknown_kind_is_its_own_code() {
        let doc = PAIR.replace("\"kind\":\"pair\"", "\"kind\":\"like\"");
        assert_eq!(
            codes(validate_signal(doc.as_bytes(), Some(b"u1"), &Limits::default())),
            vec![("$.kind".into(), ProblemCode::UnknownKind)]
        );
    }
}
