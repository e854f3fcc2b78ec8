//! A small checker for JSON documents that collects every problem with its path,
//! instead of stopping at the first as `serde` does. Validators read a
//! `serde_json::Value` with it and build the typed value only when nothing is wrong.

use serde_json::{Map, Value};

use crate::problem::{Problem, ProblemCode, Problems};

/// How a text field is checked.
#[derive(Debug, Clone, Copy)]
pub struct Text {
    /// Empty or whitespace-only text is a problem.
    pub non_empty: bool,
    /// Upper bound in bytes of UTF-8.
    pub max_bytes: Option<usize>,
}

impl Text {
    /// Any string, even empty.
    pub const ANY: Text = Text { non_empty: false, max_bytes: None };
    /// A string with at least one non-whitespace character.
    pub const NON_EMPTY: Text = Text { non_empty: true, max_bytes: None };

    pub const fn non_empty_max(max_bytes: usize) -> Text {
        Text { non_empty: true, max_bytes: Some(max_bytes) }
    }
}

/// Collects problems while a validator walks a document.
#[derive(Debug, Default)]
pub struct Checker {
    problems: Vec<Problem>,
}

/// `parent.field`, the path of an object member.
pub fn field_path(parent: &str, field: &str) -> String {
    format!("{parent}.{field}")
}

/// `parent[i]`, the path of an array element.
pub fn index_path(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Checker {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn report(&mut self, path: impl Into<String>, code: ProblemCode, message: impl Into<String>) {
        self.problems.push(Problem { path: path.into(), code, message: message.into() });
    }

    /// Problems reported so far; compare before and after a sub-check to see if it failed.
    pub fn problem_count(&self) -> usize {
        self.problems.len()
    }

    /// Ends a walk whose result is `built`: the value when it was built and nothing was
    /// reported, else every problem. A check that gave up without saying why would be a
    /// bug; on untrusted input it still yields a problem at `path`, never a panic.
    pub fn conclude<T>(self, built: Option<T>, path: &str) -> Result<T, Problems> {
        match (Problems::from_vec(self.problems), built) {
            (None, Some(value)) => Ok(value),
            (Some(problems), _) => Err(problems),
            (None, None) => Err(Problems::single(path, ProblemCode::InvalidValue, "rejected")),
        }
    }

    fn wrong_type(&mut self, path: &str, expected: &str, got: &Value) {
        self.report(path, ProblemCode::WrongType, format!("expected {expected}, got {}", type_name(got)));
    }

    /// The value as an object, or a problem.
    pub fn object<'v>(&mut self, value: &'v Value, path: &str) -> Option<&'v Map<String, Value>> {
        match value {
            Value::Object(map) => Some(map),
            other => {
                self.wrong_type(path, "an object", other);
                None
            }
        }
    }

    /// The value as an array, or a problem.
    pub fn array<'v>(&mut self, value: &'v Value, path: &str) -> Option<&'v [Value]> {
        match value {
            Value::Array(items) => Some(items),
            other => {
                self.wrong_type(path, "an array", other);
                None
            }
        }
    }

    /// A member that must be present (`null` counts as absent).
    pub fn required<'v>(
        &mut self,
        obj: &'v Map<String, Value>,
        parent: &str,
        field: &str,
    ) -> Option<&'v Value> {
        match obj.get(field) {
            Some(Value::Null) | None => {
                self.report(
                    field_path(parent, field),
                    ProblemCode::MissingField,
                    format!("`{field}` is required"),
                );
                None
            }
            Some(v) => Some(v),
        }
    }

    /// A list member whose items are each checked by `item`: `Some` only when every item
    /// passed (every failing item having reported why). An optional list may be absent
    /// or null, which reads as empty.
    pub fn list<'v, T>(
        &mut self,
        obj: &'v Map<String, Value>,
        parent: &str,
        field: &str,
        required: bool,
        mut item: impl FnMut(&mut Checker, &'v Value, &str) -> Option<T>,
    ) -> Option<Vec<T>> {
        let path = field_path(parent, field);
        let items = match obj.get(field) {
            None | Some(Value::Null) if !required => return Some(Vec::new()),
            _ => self.required(obj, parent, field).and_then(|v| self.array(v, &path))?,
        };
        let checked: Vec<Option<T>> =
            items.iter().enumerate().map(|(i, v)| item(self, v, &index_path(&path, i))).collect();
        checked.into_iter().collect()
    }

    /// Checks a string value against `rule`.
    pub fn text_value<'v>(&mut self, value: &'v Value, path: &str, rule: Text) -> Option<&'v str> {
        let Value::String(s) = value else {
            self.wrong_type(path, "a string", value);
            return None;
        };
        let mut ok = true;
        if rule.non_empty && s.trim().is_empty() {
            self.report(path, ProblemCode::EmptyField, "must not be empty");
            ok = false;
        }
        if let Some(max) = rule.max_bytes
            && s.len() > max
        {
            self.report(path, ProblemCode::FieldTooLong, format!("{} bytes, limit {max}", s.len()));
            ok = false;
        }
        ok.then_some(s.as_str())
    }

    /// A required string member.
    pub fn text<'v>(
        &mut self,
        obj: &'v Map<String, Value>,
        parent: &str,
        field: &str,
        rule: Text,
    ) -> Option<&'v str> {
        let value = self.required(obj, parent, field)?;
        self.text_value(value, &field_path(parent, field), rule)
    }

    /// An optional string member: `Some(None)` when absent or null, `None` on a problem.
    pub fn optional_text<'v>(
        &mut self,
        obj: &'v Map<String, Value>,
        parent: &str,
        field: &str,
        rule: Text,
    ) -> Option<Option<&'v str>> {
        match obj.get(field) {
            None | Some(Value::Null) => Some(None),
            Some(v) => self.text_value(v, &field_path(parent, field), rule).map(Some),
        }
    }

    /// A required non-negative integer member.
    pub fn unsigned(&mut self, obj: &Map<String, Value>, parent: &str, field: &str) -> Option<u64> {
        let value = self.required(obj, parent, field)?;
        match value.as_u64() {
            Some(n) => Some(n),
            None => {
                self.wrong_type(&field_path(parent, field), "a non-negative integer", value);
                None
            }
        }
    }

    /// A required string member that must equal one of `allowed`.
    pub fn one_of<'v>(
        &mut self,
        obj: &'v Map<String, Value>,
        parent: &str,
        field: &str,
        allowed: &[&str],
        code: ProblemCode,
    ) -> Option<&'v str> {
        let s = self.text(obj, parent, field, Text::ANY)?;
        if allowed.contains(&s) {
            Some(s)
        } else {
            self.report(
                field_path(parent, field),
                code,
                format!("{s:?} is not one of {}", allowed.join(", ")),
            );
            None
        }
    }
}
