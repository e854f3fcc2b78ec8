//! Validation problems: where (a JSON path), what (a stable code), and a readable message.

use std::fmt;

/// Stable machine codes for rejected input. They label the DLQ (`alignx-error` header)
/// and metrics, so the set is small and fixed; the human detail goes in the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProblemCode {
    /// The message is larger than the configured byte limit.
    MessageTooLarge,
    /// The payload is not valid UTF-8.
    InvalidUtf8,
    /// The payload is not JSON (or nests deeper than the parser allows).
    InvalidJson,
    /// A value has the wrong JSON type (e.g. the document is not an object).
    WrongType,
    /// A required field is absent.
    MissingField,
    /// A required text is empty or only whitespace.
    EmptyField,
    /// A text is longer than its byte limit.
    FieldTooLong,
    /// An identifier contains control characters.
    InvalidId,
    /// `schema` names a document type or version we do not read.
    UnknownSchema,
    /// `kind` is not one of the known signal kinds.
    UnknownKind,
    /// A timestamp is not RFC 3339.
    InvalidTimestamp,
    /// A value is outside its allowed set or range.
    InvalidValue,
    /// The Kafka message key differs from `user_id` (or is missing).
    KeyMismatch,
}

impl ProblemCode {
    /// Every code, for metric label pre-registration and documentation.
    pub const ALL: [ProblemCode; 13] = [
        Self::MessageTooLarge,
        Self::InvalidUtf8,
        Self::InvalidJson,
        Self::WrongType,
        Self::MissingField,
        Self::EmptyField,
        Self::FieldTooLong,
        Self::InvalidId,
        Self::UnknownSchema,
        Self::UnknownKind,
        Self::InvalidTimestamp,
        Self::InvalidValue,
        Self::KeyMismatch,
    ];

    /// The snake_case label used in headers, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MessageTooLarge => "message_too_large",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::InvalidJson => "invalid_json",
            Self::WrongType => "wrong_type",
            Self::MissingField => "missing_field",
            Self::EmptyField => "empty_field",
            Self::FieldTooLong => "field_too_long",
            Self::InvalidId => "invalid_id",
            Self::UnknownSchema => "unknown_schema",
            Self::UnknownKind => "unknown_kind",
            Self::InvalidTimestamp => "invalid_timestamp",
            Self::InvalidValue => "invalid_value",
            Self::KeyMismatch => "key_mismatch",
        }
    }
}

impl fmt::Display for ProblemCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One thing wrong with a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// JSON path of the offending value, `$` for the whole document (e.g. `$.pairs[1].chosen`).
    pub path: String,
    pub code: ProblemCode,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ({})", self.path, self.message, self.code)
    }
}

/// Every problem found in one document; never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Problems(Vec<Problem>);

impl Problems {
    /// Wraps a non-empty list. Returns `None` for an empty one, which is no error.
    pub fn from_vec(problems: Vec<Problem>) -> Option<Self> {
        (!problems.is_empty()).then_some(Self(problems))
    }

    pub fn single(path: impl Into<String>, code: ProblemCode, message: impl Into<String>) -> Self {
        Self(vec![Problem { path: path.into(), code, message: message.into() }])
    }

    pub fn as_slice(&self) -> &[Problem] {
        &self.0
    }

    /// The first problem's code: the one reason a DLQ record is filed under.
    pub fn primary_code(&self) -> ProblemCode {
        self.0[0].code
    }

    pub fn into_vec(self) -> Vec<Problem> {
        self.0
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}
