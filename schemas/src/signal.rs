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
    if let Some(signal) = fast_path(text, limits) {
        return Ok(signal);
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|e| Problems::single("$", ProblemCode::InvalidJson, format!("payload is not JSON: {e}")))?;
    let mut c = Checker::new();
    let signal = check_signal(&mut c, &value, limits);
    c.conclude(signal, "$")
}

/// A well-formed signal with exactly the known members, deserialised without building
/// a JSON tree. Anything unusual — extra members, duplicates, nulls, wrong types, any rule
/// broken — returns `None`, and the full checker (which explains every problem) decides.
/// So this path only ever accepts what the checker accepts; `fast_path_agrees_with_the_checker`
/// holds it to that.
fn fast_path(text: &str, limits: &Limits) -> Option<Signal> {
    use std::borrow::Cow;
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw<'a> {
        #[serde(borrow)]
        schema: Cow<'a, str>,
        #[serde(borrow)]
        user_id: Cow<'a, str>,
        #[serde(borrow)]
        signal_id: Cow<'a, str>,
        #[serde(borrow)]
        ts: Cow<'a, str>,
        #[serde(borrow)]
        kind: Cow<'a, str>,
        #[serde(borrow, default)]
        post: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        chosen: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        rejected: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        comment: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        text: Option<Cow<'a, str>>,
    }
    let raw: Raw<'_> = serde_json::from_str(text).ok()?;
    let id_ok = |id: &str| {
        !id.trim().is_empty() && id.len() <= limits.max_id_bytes && !id.chars().any(char::is_control)
    };
    let field = |f: &Option<Cow<'_, str>>| -> Option<String> {
        let f = f.as_deref()?;
        (!f.trim().is_empty() && f.len() <= limits.max_text_bytes).then(|| f.to_owned())
    };
    if raw.schema != SIGNAL_SCHEMA || !id_ok(&raw.user_id) || !id_ok(&raw.signal_id) {
        return None;
    }
    let body = match raw.kind.as_ref() {
        "pair" => SignalBody::Pair {
            post: field(&raw.post)?,
            chosen: field(&raw.chosen)?,
            rejected: field(&raw.rejected)?,
        },
        "ugc" => SignalBody::Ugc { post: field(&raw.post)?, comment: field(&raw.comment)? },
        "text" => SignalBody::Text { text: field(&raw.text)? },
        _ => return None,
    };
    Some(Signal {
        schema: SignalSchema::V1,
        user_id: raw.user_id.into_owned(),
        signal_id: raw.signal_id.into_owned(),
        ts: Timestamp::parse(&raw.ts).ok()?,
        body,
    })
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
    #[test]
    fn fast_path_agrees_with_the_checker() {
        let limits = Limits { max_id_bytes: 8, max_text_bytes: 10, max_message_bytes: 1000 };
        let head =
            r#""schema":"alignx.signal.v1","user_id":"u1","signal_id":"s1","ts":"2026-01-01T00:00:00Z""#;
        let cases = [
            format!(r#"{{{head},"kind":"text","text":"hi"}}"#),
            format!(r#"{{{head},"kind":"pair","post":"p","chosen":"c","rejected":"r"}}"#),
            format!(r#"{{{head},"kind":"ugc","post":"p","comment":"c"}}"#),
            format!(r#"{{{head},"kind":"ugc","post":"p","comment":"\u00e9\n"}}"#),
            format!(r#"{{{head},"kind":"text","text":"  "}}"#),
            format!(r#"{{{head},"kind":"text","text":"01234567890"}}"#),
            format!(r#"{{{head},"kind":"text","text":null}}"#),
            format!(r#"{{{head},"kind":"text","text":"a","extra":[[[[1]]]]}}"#),
            format!(r#"{{{head},"kind":"text","text":"a","text":"b"}}"#),
            format!(r#"{{{head},"kind":"pair","post":"p","chosen":"c"}}"#),
            format!(r#"{{{head},"kind":"like","text":"a"}}"#),
            format!(r#"{{{head},"kind":"text","text":"a","post":5}}"#),
            r#"{"schema":"alignx.signal.v2","user_id":"u","signal_id":"s","ts":"2026-01-01T00:00:00Z","kind":"text","text":"a"}"#.into(),
            r#"{"schema":"alignx.signal.v1","user_id":"u\u0001","signal_id":"s","ts":"2026-01-01T00:00:00Z","kind":"text","text":"a"}"#.into(),
            r#"{"schema":"alignx.signal.v1","user_id":"u","signal_id":"s","ts":"yesterday","kind":"text","text":"a"}"#.into(),
            r#"{"schema":"alignx.signal.v1","user_id":"a-long-id","signal_id":"s","ts":"2026-01-01T00:00:00Z","kind":"text","text":"a"}"#.into(),
        ];
        let mut fast_accepts = 0;
        for case in &cases {
            let full = validate_payload(case.as_bytes(), &limits);
            if let Some(fast) = super::fast_path(case, &limits) {
                fast_accepts += 1;
                assert_eq!(full.as_ref().ok(), Some(&fast), "{case}");
            }
            // And the public entry point (fast path first) gives the checker's verdict.
            let mut c = Checker::new();
            let slow =
                serde_json::from_str::<Value>(case).ok().and_then(|v| check_signal(&mut c, &v, &limits));
            assert_eq!(full.ok(), slow.filter(|_| c.conclude(Some(()), "$").is_ok()), "{case}");
        }
        assert_eq!(fast_accepts, 4, "the well-formed cases take the fast path");
    }

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
