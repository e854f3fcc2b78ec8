//! Training record formats (DESIGN.md §6), read from the paper's own files as well as
//! ours: `cold_start`, `rl_train`, `streaming_rl_train` and eval data. Files may be one
//! JSON array or JSON Lines; [`read_records`] accepts both and reports every problem
//! of every record, each with its record's position.
//!
//! Members we do not use (the paper's `pre_prompt`, `chosen_log`, …) are tolerated.

use serde::ser::SerializeSeq;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::check::{Checker, Text, field_path, index_path};
use crate::problem::{Problem, ProblemCode, Problems};

/// Which response the user chose, written `"Response A"` / `"Response B"` as in the paper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Choice {
    #[serde(rename = "Response A")]
    A,
    #[serde(rename = "Response B")]
    B,
}

impl Choice {
    pub const LABELS: [&'static str; 2] = ["Response A", "Response B"];

    pub fn label(self) -> &'static str {
        match self {
            Choice::A => Self::LABELS[0],
            Choice::B => Self::LABELS[1],
        }
    }

    fn from_label(s: &str) -> Choice {
        if s == Self::LABELS[0] { Choice::A } else { Choice::B }
    }
}

/// A supervised example (`cold_start.json`): the loss covers `response` only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColdStartRecord {
    pub prompt: String,
    pub response: String,
}

/// The facts of one judged comparison, shared by the RL and streaming formats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Comparison {
    /// The post the responses answer.
    pub task: String,
    pub chosen: String,
    pub rejected: String,
    #[serde(rename = "responseA")]
    pub response_a: String,
    #[serde(rename = "responseB")]
    pub response_b: String,
    /// Which of A/B is `chosen`.
    pub answer: Choice,
}

/// One `rl_train.json` record: `[{from:"human", value, …comparison}, {from:"assistant",
/// ground_truth:{value}}]`. `value` is the problem text (the prompt without wrapper).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RlRecord {
    pub value: String,
    pub comparison: Comparison,
    pub ground_truth: Choice,
}

impl Serialize for RlRecord {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Human<'a> {
            from: &'static str,
            value: &'a str,
            #[serde(flatten)]
            comparison: &'a Comparison,
        }
        let assistant =
            serde_json::json!({"from": "assistant", "ground_truth": {"value": self.ground_truth}});
        let mut seq = s.serialize_seq(Some(2))?;
        seq.serialize_element(&Human { from: "human", value: &self.value, comparison: &self.comparison })?;
        seq.serialize_element(&assistant)?;
        seq.end()
    }
}

/// One step of a streaming record: the problem text for this step (its past summary is
/// substituted at training time) and the comparison that scores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamingStep {
    pub value: String,
    #[serde(flatten)]
    pub comparison: Comparison,
}

/// One entry of a `streaming_rl_train.json` record: the ordered steps of one user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamingEntry {
    pub history: Vec<StreamingStep>,
}

/// One `streaming_rl_train.json` record: `[{history:[step, …]}, …]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StreamingRlRecord(pub Vec<StreamingEntry>);

/// A preference pair in an eval record's behaviour history.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HistoryPair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

/// A user comment in an eval record's behaviour history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryComment {
    pub prompt: String,
    pub comment: String,
}

impl HistoryPair {
    /// Checks `{prompt, chosen, rejected}` at `path`, each text against `rule`.
    pub(crate) fn check(c: &mut Checker, value: &Value, path: &str, rule: Text) -> Option<Self> {
        let obj = c.object(value, path)?;
        let mut t = |f: &str| c.text(obj, path, f, rule).map(str::to_owned);
        let (prompt, chosen, rejected) = (t("prompt"), t("chosen"), t("rejected"));
        Some(Self { prompt: prompt?, chosen: chosen?, rejected: rejected? })
    }
}

impl HistoryComment {
    /// Checks `{prompt, comment}` at `path`, each text against `rule`.
    pub(crate) fn check(c: &mut Checker, value: &Value, path: &str, rule: Text) -> Option<Self> {
        let obj = c.object(value, path)?;
        let mut t = |f: &str| c.text(obj, path, f, rule).map(str::to_owned);
        let (prompt, comment) = (t("prompt"), t("comment"));
        Some(Self { prompt: prompt?, comment: comment? })
    }
}

/// One eval item (AlignX layout): a user's history and one held-out comparison.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalRecord {
    #[serde(rename = "Pair-wise Comparative Feedback")]
    pub pairs: Vec<HistoryPair>,
    #[serde(rename = "User-Generated Content", default, skip_serializing_if = "Vec::is_empty")]
    pub ugc: Vec<HistoryComment>,
    /// The held-out post.
    pub prompt: String,
    #[serde(rename = "responseA")]
    pub response_a: String,
    #[serde(rename = "responseB")]
    pub response_b: String,
    pub answer: Choice,
    /// Our extension (synthetic world): whose history this is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Our extension (synthetic world): the user's true preferences as a summary, the
    /// judge's upper bound in evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latent_summary: Option<String>,
}

/// A record format the trainer reads: how to check one record.
pub trait TrainingRecord: Sized {
    /// The format's name, for messages.
    const NAME: &'static str;
    /// Whether one record is itself a JSON array (of objects), as `rl_train` and
    /// `streaming_rl_train` records are: a one-line JSON Lines file of them then looks
    /// like a whole-file array, and is told apart by its items being objects.
    const IS_ARRAY: bool = false;
    /// Checks `value` (at `path`), reporting every problem; builds the record if clean.
    fn check(c: &mut Checker, value: &Value, path: &str) -> Option<Self>;
}

impl TrainingRecord for ColdStartRecord {
    const NAME: &'static str = "cold_start";
    fn check(c: &mut Checker, value: &Value, path: &str) -> Option<Self> {
        let obj = c.object(value, path)?;
        let prompt = c.text(obj, path, "prompt", Text::NON_EMPTY);
        let response = c.text(obj, path, "response", Text::NON_EMPTY);
        Some(Self { prompt: prompt?.to_owned(), response: response?.to_owned() })
    }
}

fn check_choice(c: &mut Checker, obj: &Map<String, Value>, path: &str, field: &str) -> Option<Choice> {
    c.one_of(obj, path, field, &Choice::LABELS, ProblemCode::InvalidValue).map(Choice::from_label)
}

/// Checks the comparison members of `obj`, and that `answer` really points at `chosen`.
fn check_comparison(c: &mut Checker, obj: &Map<String, Value>, path: &str) -> Option<Comparison> {
    let mut text = |f: &str| c.text(obj, path, f, Text::NON_EMPTY).map(str::to_owned);
    let (task, chosen, rejected, a, b) =
        (text("task"), text("chosen"), text("rejected"), text("responseA"), text("responseB"));
    let answer = check_choice(c, obj, path, "answer");
    let cmp = Comparison {
        task: task?,
        chosen: chosen?,
        rejected: rejected?,
        response_a: a?,
        response_b: b?,
        answer: answer?,
    };
    let (picked, other) = match cmp.answer {
        Choice::A => (&cmp.response_a, &cmp.response_b),
        Choice::B => (&cmp.response_b, &cmp.response_a),
    };
    if picked != &cmp.chosen || other != &cmp.rejected {
        c.report(
            field_path(path, "answer"),
            ProblemCode::InvalidValue,
            format!(
                "{} is not the chosen response (or the other is not the rejected one)",
                cmp.answer.label()
            ),
        );
        return None;
    }
    Some(cmp)
}

impl TrainingRecord for RlRecord {
    const NAME: &'static str = "rl_train";
    const IS_ARRAY: bool = true;
    fn check(c: &mut Checker, value: &Value, path: &str) -> Option<Self> {
        let turns = c.array(value, path)?;
        if turns.len() != 2 {
            c.report(
                path,
                ProblemCode::InvalidValue,
                format!("expected 2 turns (human, assistant), got {}", turns.len()),
            );
            return None;
        }
        let (hp, ap) = (index_path(path, 0), index_path(path, 1));
        let human = c.object(&turns[0], &hp);
        let assistant = c.object(&turns[1], &ap);
        let (human, assistant) = (human?, assistant?);
        let from_h = c.one_of(human, &hp, "from", &["human"], ProblemCode::InvalidValue);
        let value = c.text(human, &hp, "value", Text::NON_EMPTY);
        let comparison = check_comparison(c, human, &hp);
        let from_a = c.one_of(assistant, &ap, "from", &["assistant"], ProblemCode::InvalidValue);
        let gt_path = field_path(&ap, "ground_truth");
        let ground_truth = c
            .required(assistant, &ap, "ground_truth")
            .and_then(|gt| c.object(gt, &gt_path))
            .and_then(|gt| check_choice(c, gt, &gt_path, "value"));
        let (_, _, value, comparison, ground_truth) = (from_h?, from_a?, value?, comparison?, ground_truth?);
        Some(Self { value: value.to_owned(), comparison, ground_truth })
    }
}

impl TrainingRecord for StreamingRlRecord {
    const NAME: &'static str = "streaming_rl_train";
    const IS_ARRAY: bool = true;
    fn check(c: &mut Checker, value: &Value, path: &str) -> Option<Self> {
        let entries = c.array(value, path)?;
        if entries.is_empty() {
            c.report(path, ProblemCode::EmptyField, "a streaming record needs at least one entry");
            return None;
        }
        let checked: Vec<Option<StreamingEntry>> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| StreamingEntry::check(c, e, &index_path(path, i)))
            .collect();
        checked.into_iter().collect::<Option<Vec<_>>>().map(Self)
    }
}

impl StreamingEntry {
    fn check(c: &mut Checker, value: &Value, path: &str) -> Option<Self> {
        let obj = c.object(value, path)?;
        let history = c.list(obj, path, "history", true, |c, v, p| {
            let step = c.object(v, p)?;
            let value = c.text(step, p, "value", Text::NON_EMPTY);
            let comparison = check_comparison(c, step, p);
            Some(StreamingStep { value: value?.to_owned(), comparison: comparison? })
        })?;
        if history.is_empty() {
            c.report(field_path(path, "history"), ProblemCode::EmptyField, "history needs at least one step");
            return None;
        }
        Some(Self { history })
    }
}

impl TrainingRecord for EvalRecord {
    const NAME: &'static str = "eval";
    fn check(c: &mut Checker, value: &Value, path: &str) -> Option<Self> {
        let obj = c.object(value, path)?;
        let pairs = c.list(obj, path, "Pair-wise Comparative Feedback", true, |c, v, p| {
            HistoryPair::check(c, v, p, Text::NON_EMPTY)
        });
        let ugc = c.list(obj, path, "User-Generated Content", false, |c, v, p| {
            HistoryComment::check(c, v, p, Text::NON_EMPTY)
        });
        let mut t = |f: &str| c.text(obj, path, f, Text::NON_EMPTY).map(str::to_owned);
        let (prompt, a, b) = (t("prompt"), t("responseA"), t("responseB"));
        let answer = check_choice(c, obj, path, "answer");
        Some(Self {
            pairs: pairs?,
            ugc: ugc?,
            prompt: prompt?,
            response_a: a?,
            response_b: b?,
            answer: answer?,
            user_id: obj.get("user_id").and_then(Value::as_str).map(str::to_owned),
            latent_summary: obj.get("latent_summary").and_then(Value::as_str).map(str::to_owned),
        })
    }
}

/// Parses a training file: one JSON array of records, or JSON Lines (one record a line;
/// blank lines skipped). Every problem of every record is returned, with paths
/// `$[i]…` for arrays and `line N: $…` for JSON Lines.
pub fn read_records<T: TrainingRecord>(text: &str) -> Result<Vec<T>, Problems> {
    let trimmed = text.trim_start();
    // A whole-file JSON array whose items are records (see `IS_ARRAY`).
    if trimmed.starts_with('[')
        && let Ok(Value::Array(items)) = serde_json::from_str::<Value>(text)
        && !(T::IS_ARRAY && items.first().is_some_and(Value::is_object))
    {
        let mut c = Checker::new();
        // Check every record (not `collect::<Option<_>>`, which stops at the first bad one).
        let checked: Vec<Option<T>> =
            items.iter().enumerate().map(|(i, v)| T::check(&mut c, v, &index_path("$", i))).collect();
        return c.conclude(checked.into_iter().collect(), "$");
    }
    let mut problems: Vec<Problem> = Vec::new();
    let mut records = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let path = format!("line {}: $", n + 1);
        match serde_json::from_str::<Value>(line) {
            Err(e) => problems.push(Problem { path, code: ProblemCode::InvalidJson, message: e.to_string() }),
            Ok(v) => {
                let mut c = Checker::new();
                let record = T::check(&mut c, &v, &path);
                match c.conclude(record, &path) {
                    Ok(r) => records.push(r),
                    Err(p) => problems.extend(p.into_vec()),
                }
            }
        }
    }
    match Problems::from_vec(problems) {
        Some(p) => Err(p),
        None => Ok(records),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(p: Problems) -> Vec<String> {
        p.into_vec().into_iter().map(|p| p.path).collect()
    }

    const STEP: &str = r#"{"value":"v","task":"t","chosen":"c","rejected":"r","responseA":"c","responseB":"r","answer":"Response A"}"#;

    #[test]
    fn every_bad_record_of_an_array_is_reported() {
        let bad_step = STEP.replace(r#""answer":"Response A""#, r#""answer":"Response B""#);
        let text =
            format!(r#"[[{{"history":[{STEP},{bad_step}]}}], [{{"history":[]}}], [{{"history":[{STEP}]}}]]"#);
        let err = read_records::<StreamingRlRecord>(&text).unwrap_err();
        assert_eq!(paths(err), ["$[0][0].history[1].answer", "$[1][0].history"]);
        let ok = read_records::<StreamingRlRecord>(&format!("[[{{\"history\":[{STEP},{STEP}]}}]]")).unwrap();
        assert_eq!(ok[0].0[0].history.len(), 2);
    }

    #[test]
    fn jsonl_problems_carry_their_line() {
        let good = format!(
            r#"[{}, {{"from":"assistant","ground_truth":{{"value":"Response A"}}}}]"#,
            STEP.replacen('{', r#"{"from":"human","#, 1)
        );
        let text = format!("{good}\n\n[{{\"from\":\"human\"}}]\nnot json\n");
        let err = read_records::<RlRecord>(&text).unwrap_err();
        let got = paths(err);
        assert_eq!(got[0], "line 3: $");
        assert!(got.iter().any(|p| p == "line 4: $"), "{got:?}");
        assert_eq!(read_records::<RlRecord>(&good).unwrap()[0].ground_truth, Choice::A);
    }

    #[test]
    fn a_one_line_jsonl_of_array_records_is_one_record() {
        let line = format!("[{{\"history\":[{STEP},{STEP}]}}, {{\"history\":[{STEP}]}}]\n");
        let one = read_records::<StreamingRlRecord>(&line).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].0.len(), 2);
    }
}
