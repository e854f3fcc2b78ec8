//! `alignx.summary.v1`: a user's current preference summary, as kept in the Redis hash
//! `alignx:{u}:summary` (DESIGN.md §3.3) and as exported or published on
//! `alignx.summaries`.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::problem::{ProblemCode, Problems};

/// The `schema` member of a summary document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SummarySchema {
    #[default]
    #[serde(rename = "alignx.summary.v1")]
    V1,
}

/// The summary record. In Redis each member is one hash field holding text (the
/// `applied` map as JSON); `schema` and `user_id` are implied by the key there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SummaryRecord {
    pub schema: SummarySchema,
    pub user_id: String,
    /// The preference summary text.
    pub summary: String,
    /// +1 per applied update; starts at 1 with the first summary.
    pub version: u64,
    /// Version id of the model that wrote this summary.
    pub model: String,
    pub updated_at_ms: u64,
    /// Signals folded into the summary so far, over all versions.
    pub signals_applied: u64,
    /// Input partition → offset of the last signal applied from it. Replays at or
    /// below these offsets are refused.
    pub applied: BTreeMap<i32, i64>,
    /// The model's reasoning for this version, when the consumer is configured to keep it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
}

/// Hash field names, shared by the Lua update script and readers.
pub mod field {
    pub const SUMMARY: &str = "summary";
    pub const VERSION: &str = "version";
    pub const MODEL: &str = "model";
    pub const UPDATED_AT_MS: &str = "updated_at_ms";
    pub const SIGNALS_APPLIED: &str = "signals_applied";
    pub const APPLIED: &str = "applied";
    pub const REASONING: &str = "reasoning";
}

impl SummaryRecord {
    /// The hash fields, as written to Redis.
    pub fn to_hash_fields(&self) -> Vec<(&'static str, String)> {
        let applied = serde_json::to_string(&self.applied).expect("a map of integers serialises");
        let mut fields = vec![
            (field::SUMMARY, self.summary.clone()),
            (field::VERSION, self.version.to_string()),
            (field::MODEL, self.model.clone()),
            (field::UPDATED_AT_MS, self.updated_at_ms.to_string()),
            (field::SIGNALS_APPLIED, self.signals_applied.to_string()),
            (field::APPLIED, applied),
        ];
        if let Some(r) = &self.reasoning {
            fields.push((field::REASONING, r.clone()));
        }
        fields
    }

    /// Reads the record back from a hash (`HGETALL`), reporting every bad field.
    pub fn from_hash_fields(user_id: &str, fields: &HashMap<String, String>) -> Result<Self, Problems> {
        let mut problems = Vec::new();
        let mut get = |name: &str| -> Option<&String> {
            let v = fields.get(name);
            if v.is_none() {
                problems.push(crate::Problem {
                    path: format!("$.{name}"),
                    code: ProblemCode::MissingField,
                    message: format!("hash field `{name}` is missing"),
                });
            }
            v
        };
        let (summary, version, model, updated, applied_n, applied) = (
            get(field::SUMMARY),
            get(field::VERSION),
            get(field::MODEL),
            get(field::UPDATED_AT_MS),
            get(field::SIGNALS_APPLIED),
            get(field::APPLIED),
        );
        let mut number = |name: &str, v: Option<&String>| -> Option<u64> {
            let v = v?;
            v.parse()
                .map_err(|_| problems.push(bad(name, format!("{v:?} is not a non-negative integer"))))
                .ok()
        };
        let (version, updated, applied_n) = (
            number(field::VERSION, version),
            number(field::UPDATED_AT_MS, updated),
            number(field::SIGNALS_APPLIED, applied_n),
        );
        let applied = applied.and_then(|v| {
            serde_json::from_str::<BTreeMap<i32, i64>>(v)
                .map_err(|e| {
                    problems.push(bad(field::APPLIED, format!("not a partition→offset JSON map: {e}")))
                })
                .ok()
        });
        if let Some(problems) = Problems::from_vec(problems) {
            return Err(problems);
        }
        Ok(Self {
            schema: SummarySchema::V1,
            user_id: user_id.to_owned(),
            summary: summary.cloned().unwrap_or_default(),
            version: version.unwrap_or_default(),
            model: model.cloned().unwrap_or_default(),
            updated_at_ms: updated.unwrap_or_default(),
            signals_applied: applied_n.unwrap_or_default(),
            applied: applied.unwrap_or_default(),
            reasoning: fields.get(field::REASONING).cloned(),
        })
    }
}

fn bad(name: &str, message: String) -> crate::Problem {
    crate::Problem { path: format!("$.{name}"), code: ProblemCode::WrongType, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_fields_round_trip() {
        let rec = SummaryRecord {
            schema: SummarySchema::V1,
            user_id: "u".into(),
            summary: "likes brevity".into(),
            version: 3,
            model: "tiny-1".into(),
            updated_at_ms: 1_700_000_000_000,
            signals_applied: 12,
            applied: BTreeMap::from([(0, 41), (3, 7)]),
            reasoning: None,
        };
        let fields: HashMap<String, String> =
            rec.to_hash_fields().into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        assert_eq!(fields["applied"], r#"{"0":41,"3":7}"#);
        assert_eq!(SummaryRecord::from_hash_fields("u", &fields).unwrap(), rec);
    }

    #[test]
    fn bad_hash_reports_every_field() {
        let fields = HashMap::from([
            ("summary".to_owned(), "s".to_owned()),
            ("version".to_owned(), "-1".to_owned()),
            ("applied".to_owned(), "[".to_owned()),
        ]);
        let err = SummaryRecord::from_hash_fields("u", &fields).unwrap_err();
        let paths: Vec<_> = err.as_slice().iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["$.model", "$.updated_at_ms", "$.signals_applied", "$.version", "$.applied"]);
    }
}
