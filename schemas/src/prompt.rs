//! The prompt protocol (DESIGN.md §5): the exact text the released AlignXplore models
//! were trained on, for the base setting (behaviour only) and the streaming setting
//! (previous summary + new behaviour), plus the judge and R_gen prompts.
//!
//! Templates are data. [`Templates::default`] holds the released wording; a TOML file
//! may override any subset of fields so that a model trained on other wording can be
//! served. Placeholders are `{name}`; values are inserted in one pass and never
//! re-scanned, so text from users cannot inject placeholders or change the template.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::check::{Checker, Text};
use crate::defaults::NO_PAST_SUMMARY;
use crate::problem::Problems;
use crate::signal::{Signal, SignalBody};
use crate::training::{HistoryComment, HistoryPair};

/// Every template of the protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Templates {
    /// Before the problem. Placeholder: `{bos}`.
    pub prefix: String,
    /// After the problem; the model continues from here.
    pub suffix: String,
    /// Problem header in the base setting.
    pub base_header: String,
    /// Problem header in the streaming setting. Placeholder: `{past}`.
    pub streaming_header: String,
    /// Stands in for `{past}` when the user has no summary yet.
    pub no_past: String,
    /// Heading of the user-comment block.
    pub ugc_header: String,
    /// One comment. Placeholders: `{i}` (1-based), `{post}`, `{comment}`.
    pub ugc_item: String,
    /// Heading of the preference-pair block.
    pub pairs_header: String,
    /// One pair. Placeholders: `{i}`, `{post}`, `{chosen}`, `{rejected}`.
    pub pair_item: String,
    /// Heading of the free-text block (our extension; the paper has no free text).
    pub texts_header: String,
    /// One text. Placeholders: `{i}`, `{text}`.
    pub text_item: String,
    /// System message of the judge chat.
    pub judge_system: String,
    /// User message of the judge chat. Placeholders: `{examples}`, `{post}`,
    /// `{summary}`, `{a}`, `{b}`.
    pub judge_user: String,
    /// The worked example inserted as `{examples}`.
    pub judge_examples: String,
    /// The judge's answer is read from the next token after this text.
    pub judge_answer_prefix: String,
    /// System message of the R_gen chat.
    pub rgen_system: String,
    /// User message of the R_gen chat. Placeholders: `{summary}`, `{post}`.
    pub rgen_user: String,
}

const PREFIX: &str = "{bos}A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The Assistant first thinks about the reasoning process in the mind and then provides the User with the answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. User: You must put your answer inside <answer> </answer> tags, i.e., <answer> answer here </answer>.\nThis is the problem:\n";

const STREAMING_HEADER: &str = "Summarize comprehensive user preferences based on their behavior in as concise language as possible. If past preferences are provided, adjust the preferences by combining past preferences with those reflected in current behavior, removing conflicting parts, and integrating new insights. If no past preferences are provided, derive the final preferences solely from user behavior.\n\n**Past Preferences:**\n\n{past}\n\n";

const JUDGE_USER: &str = "Determine which response the user prefers based on the user\u{2019}s preferences. Please output your selection below in a json format by filling in the placeholders in []:{\"selection\": \"[Response A / Response B]\"}\n{examples}\n<Prompt>\n{post}\n</Prompt>\n\n<Preference>\n{summary}</Preference>\n\n<Response A>\n{a}\n</Response A>\n\n<Response B>\n{b}\n</Response B>\n\n";

const JUDGE_EXAMPLES: &str = "Here is an example.\n<Prompt>\nWhat should I cook tonight?\n</Prompt>\n\n<Preference>\nWants short, practical answers; has little patience for long explanations.</Preference>\n\n<Response A>\nThere are many things to weigh when planning a dinner: nutrition, budget, the time you have, and what is already in the fridge. Let us go through each of them in turn before deciding.\n</Response A>\n\n<Response B>\nA vegetable stir-fry with rice: twenty minutes, one pan.\n</Response B>\n\n{\"selection\": \"Response B\"}\n";

impl Default for Templates {
    fn default() -> Self {
        Self {
            prefix: PREFIX.into(),
            suffix: "\nAssistant: <think>".into(),
            base_header: "Generate the user's preference based on their historical behavior.\n\n".into(),
            streaming_header: STREAMING_HEADER.into(),
            no_past: NO_PAST_SUMMARY.into(),
            ugc_header: "**This person has commented on some posts:**\n\n".into(),
            ugc_item: "{i}. *Post:*\n{post}\n\n*Comment:*\n{comment}\n\n".into(),
            pairs_header: "**This person has chosen or rejected comments on some posts:**\n\n".into(),
            pair_item: "{i}. *Post:*\n{post}\n\n*Chosen:*\n{chosen}\n\n*Rejected:*\n{rejected}\n\n".into(),
            texts_header: "**This person has written:**\n\n".into(),
            text_item: "{i}. {text}\n\n".into(),
            judge_system: "Generate a task-specific response.".into(),
            judge_user: JUDGE_USER.into(),
            judge_examples: JUDGE_EXAMPLES.into(),
            judge_answer_prefix: "{\"selection\": \"Response ".into(),
            rgen_system: "Generate a task-specific response based on user preferences.".into(),
            rgen_user: "***User Preferences***\n\n{summary}***Task***\n\n{post}".into(),
        }
    }
}

/// A template file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot read template file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("template file {path} is not valid: {source}")]
    Parse { path: String, source: toml::de::Error },
    #[error("template `{field}` uses unknown placeholder {{{name}}} (allowed: {allowed})")]
    UnknownPlaceholder { field: &'static str, name: String, allowed: String },
}

/// Which prompt to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting<'a> {
    /// Infer preferences from behaviour alone.
    Base,
    /// Update `past` (None: no summary yet) with new behaviour.
    Streaming { past: Option<&'a str> },
}

/// The behaviour a prompt shows the model, block by block.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evidence {
    pub ugc: Vec<HistoryComment>,
    pub pairs: Vec<HistoryPair>,
    pub texts: Vec<String>,
}

impl Evidence {
    /// Sorts a window of signals into blocks, keeping their order within each block.
    pub fn from_signals<'s>(signals: impl IntoIterator<Item = &'s Signal>) -> Self {
        let mut ev = Evidence::default();
        for s in signals {
            match &s.body {
                SignalBody::Pair { post, chosen, rejected } => ev.pairs.push(HistoryPair {
                    prompt: post.clone(),
                    chosen: chosen.clone(),
                    rejected: rejected.clone(),
                }),
                SignalBody::Ugc { post, comment } => {
                    ev.ugc.push(HistoryComment { prompt: post.clone(), comment: comment.clone() })
                }
                SignalBody::Text { text } => ev.texts.push(text.clone()),
            }
        }
        ev
    }
}

/// The BOS text prompts start with, as Hugging Face's `tokenizer.bos_token` is: the
/// `bos_token` of the model directory's `tokenizer_config.json` (a string or an added
/// token's `content`), empty when there is none.
pub fn bos_text(model_dir: &Path) -> String {
    #[derive(Deserialize)]
    struct TokenizerConfig {
        #[serde(default)]
        bos_token: Option<TokenText>,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum TokenText {
        Plain(String),
        Added { content: String },
    }
    std::fs::read_to_string(model_dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<TokenizerConfig>(&t).ok())
        .and_then(|c| c.bos_token)
        .map(|t| match t {
            TokenText::Plain(s) => s,
            TokenText::Added { content } => content,
        })
        .unwrap_or_default()
}

/// Inserts `vars` into `template` in one left-to-right pass. `{name}` with an unknown
/// name is kept literally (load-time validation rejects those in configured templates).
fn fill(template: &str, vars: &[(&str, &str)], out: &mut String) {
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let var = after.find('}').and_then(|end| {
            let name = &after[..end];
            vars.iter().find(|(k, _)| *k == name).map(|(_, v)| (end, *v))
        });
        match var {
            Some((end, value)) => {
                out.push_str(value);
                rest = &after[end + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
}

/// `{name}` tokens that look like placeholders: an identifier between braces.
fn placeholders(template: &str) -> impl Iterator<Item = &str> {
    template.split('{').skip(1).filter_map(|s| {
        let name = &s[..s.find('}')?];
        (!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')).then_some(name)
    })
}

impl Templates {
    /// The defaults with the fields set in a TOML file replaced, checked for unknown
    /// placeholders.
    pub fn from_file(path: &Path) -> Result<Self, TemplateError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| TemplateError::Read { path: shown.clone(), source })?;
        let t: Templates =
            toml::from_str(&text).map_err(|source| TemplateError::Parse { path: shown, source })?;
        t.validate()?;
        Ok(t)
    }

    /// Rejects placeholders a field does not know (a typo would otherwise reach the model).
    pub fn validate(&self) -> Result<(), TemplateError> {
        let rules: [(&'static str, &str, &[&str]); 14] = [
            ("prefix", &self.prefix, &["bos"]),
            ("suffix", &self.suffix, &[]),
            ("base_header", &self.base_header, &[]),
            ("streaming_header", &self.streaming_header, &["past"]),
            ("ugc_header", &self.ugc_header, &[]),
            ("ugc_item", &self.ugc_item, &["i", "post", "comment"]),
            ("pairs_header", &self.pairs_header, &[]),
            ("pair_item", &self.pair_item, &["i", "post", "chosen", "rejected"]),
            ("texts_header", &self.texts_header, &[]),
            ("text_item", &self.text_item, &["i", "text"]),
            ("judge_user", &self.judge_user, &["examples", "post", "summary", "a", "b"]),
            ("rgen_user", &self.rgen_user, &["summary", "post"]),
            ("judge_system", &self.judge_system, &[]),
            ("rgen_system", &self.rgen_system, &[]),
        ];
        for (field, text, allowed) in rules {
            if let Some(name) = placeholders(text).find(|n| !allowed.contains(n)) {
                return Err(TemplateError::UnknownPlaceholder {
                    field,
                    name: name.to_owned(),
                    allowed: if allowed.is_empty() { "none".into() } else { allowed.join(", ") },
                });
            }
        }
        Ok(())
    }

    /// The problem text: header, then the comment, pair and free-text blocks (each only
    /// when non-empty). This is the `value` of the paper's RL records.
    pub fn problem(&self, setting: Setting<'_>, ev: &Evidence) -> String {
        let mut out = String::new();
        match setting {
            Setting::Base => out.push_str(&self.base_header),
            Setting::Streaming { past } => {
                let past = past.filter(|p| !p.trim().is_empty()).unwrap_or(&self.no_past);
                fill(&self.streaming_header, &[("past", past)], &mut out);
            }
        }
        if !ev.ugc.is_empty() {
            out.push_str(&self.ugc_header);
            for (i, c) in ev.ugc.iter().enumerate() {
                let n = (i + 1).to_string();
                fill(&self.ugc_item, &[("i", &n), ("post", &c.prompt), ("comment", &c.comment)], &mut out);
            }
        }
        if !ev.pairs.is_empty() {
            out.push_str(&self.pairs_header);
            for (i, p) in ev.pairs.iter().enumerate() {
                let n = (i + 1).to_string();
                let vars = [
                    ("i", n.as_str()),
                    ("post", &p.prompt),
                    ("chosen", &p.chosen),
                    ("rejected", &p.rejected),
                ];
                fill(&self.pair_item, &vars, &mut out);
            }
        }
        if !ev.texts.is_empty() {
            out.push_str(&self.texts_header);
            for (i, t) in ev.texts.iter().enumerate() {
                let n = (i + 1).to_string();
                fill(&self.text_item, &[("i", &n), ("text", t)], &mut out);
            }
        }
        out
    }

    /// A streaming problem text written without a past summary (`"{no_past}"` in its
    /// past-preferences slot, as `streaming_rl_train` records hold them) with `past`
    /// put in that slot instead; `None` when the text has no such slot. This is how
    /// streaming RL feeds the summary sampled for one step into the next step's prompt.
    pub fn with_past(&self, problem: &str, past: &str) -> Option<String> {
        let mut empty = String::new();
        fill(&self.streaming_header, &[("past", &self.no_past)], &mut empty);
        let rest = problem.strip_prefix(&empty)?;
        let mut out = String::new();
        let past = if past.trim().is_empty() { &self.no_past } else { past };
        fill(&self.streaming_header, &[("past", past)], &mut out);
        out.push_str(rest);
        Some(out)
    }

    /// Wraps a problem text into the full prompt. `bos` is the tokenizer's BOS text, or "".
    pub fn wrap(&self, bos: &str, problem: &str) -> String {
        let mut out = String::with_capacity(self.prefix.len() + problem.len() + self.suffix.len());
        fill(&self.prefix, &[("bos", bos)], &mut out);
        out.push_str(problem);
        out.push_str(&self.suffix);
        out
    }

    /// The full prompt the model continues.
    pub fn render(&self, bos: &str, setting: Setting<'_>, ev: &Evidence) -> String {
        self.wrap(bos, &self.problem(setting, ev))
    }

    /// The judge chat for one comparison: `[system, user]`.
    pub fn judge_messages(&self, post: &str, summary: &str, a: &str, b: &str) -> [ChatMessage; 2] {
        let mut user = String::new();
        let vars = [
            ("examples", self.judge_examples.as_str()),
            ("post", post),
            ("summary", summary),
            ("a", a),
            ("b", b),
        ];
        fill(&self.judge_user, &vars, &mut user);
        [ChatMessage::system(&self.judge_system), ChatMessage::user(user)]
    }

    /// The R_gen chat: the post with the summary as context, `[system, user]`.
    pub fn rgen_messages(&self, summary: &str, post: &str) -> [ChatMessage; 2] {
        let mut user = String::new();
        fill(&self.rgen_user, &[("summary", summary), ("post", post)], &mut user);
        [ChatMessage::system(&self.rgen_system), ChatMessage::user(user)]
    }
}

/// One chat turn, rendered later with the judge or generator tokenizer's chat template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn system(content: impl Into<String>) -> Self {
        Self { role: "system".into(), content: content.into() }
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self { role: "user".into(), content: content.into() }
    }
}

/// The input of `alignx-trainer prompt` and of the golden vectors in `spec/golden/`:
/// `{"bos_token": str, "pairs": [{prompt, chosen, rejected}], "ugc": [{prompt, comment}],
/// "texts": [str]}` (`texts` optional).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptInput {
    pub bos_token: String,
    pub evidence: Evidence,
}

impl PromptInput {
    /// Parses and checks the input, reporting every problem with its path.
    pub fn parse(text: &str) -> Result<Self, Problems> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Problems::single("$", crate::ProblemCode::InvalidJson, format!("not JSON: {e}")))?;
        let mut c = Checker::new();
        let parsed = Self::check(&mut c, &value);
        c.conclude(parsed, "$")
    }

    fn check(c: &mut Checker, value: &Value) -> Option<Self> {
        let obj = c.object(value, "$")?;
        let bos = c.text(obj, "$", "bos_token", Text::ANY);
        // The golden vectors show raw pairs as the paper renders them: even empty text.
        let pairs = c.list(obj, "$", "pairs", false, |c, v, p| HistoryPair::check(c, v, p, Text::ANY));
        let ugc = c.list(obj, "$", "ugc", false, |c, v, p| HistoryComment::check(c, v, p, Text::ANY));
        let texts =
            c.list(obj, "$", "texts", false, |c, v, p| c.text_value(v, p, Text::ANY).map(str::to_owned));
        let (bos, pairs, ugc, texts) = (bos?, pairs?, ugc?, texts?);
        Some(Self { bos_token: bos.to_owned(), evidence: Evidence { ugc, pairs, texts } })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_text_cannot_inject_placeholders() {
        let ev = Evidence {
            pairs: vec![HistoryPair {
                prompt: "{chosen}".into(),
                chosen: "{i}{rejected}".into(),
                rejected: "{".into(),
            }],
            ..Evidence::default()
        };
        let p = Templates::default().problem(Setting::Base, &ev);
        assert!(p.contains("1. *Post:*\n{chosen}\n\n*Chosen:*\n{i}{rejected}\n\n*Rejected:*\n{\n\n"), "{p}");
    }

    #[test]
    fn streaming_uses_placeholder_without_past() {
        let t = Templates::default();
        let ev = Evidence { texts: vec!["I love puns.".into()], ..Evidence::default() };
        let none = t.problem(Setting::Streaming { past: None }, &ev);
        assert!(none.contains(
            "**Past Preferences:**\n\nNot provided\n\n**This person has written:**\n\n1. I love puns.\n\n"
        ));
        let blank = t.problem(Setting::Streaming { past: Some("  ") }, &ev);
        assert_eq!(none, blank);
        let some = t.problem(Setting::Streaming { past: Some("Likes puns.") }, &ev);
        assert!(some.contains("**Past Preferences:**\n\nLikes puns.\n\n"));
        // Streaming RL puts a sampled summary into a step written without one.
        assert_eq!(t.with_past(&none, "Likes puns.").as_deref(), Some(some.as_str()));
        assert_eq!(t.with_past(&none, " ").as_deref(), Some(none.as_str()));
        assert_eq!(t.with_past(&t.problem(Setting::Base, &ev), "Likes puns."), None);
    }

    #[test]
    fn judge_prompt_layout() {
        let [sys, user] = Templates::default().judge_messages("P", "S", "A", "B");
        assert_eq!(sys.content, "Generate a task-specific response.");
        assert!(user.content.starts_with(
            "Determine which response the user prefers based on the user\u{2019}s preferences."
        ));
        assert!(user.content.ends_with("<Prompt>\nP\n</Prompt>\n\n<Preference>\nS</Preference>\n\n<Response A>\nA\n</Response A>\n\n<Response B>\nB\n</Response B>\n\n"));
        assert!(user.content.contains("{\"selection\": \"Response B\"}\n\n<Prompt>\nP"));
        let [_, rgen] = Templates::default().rgen_messages("S", "P");
        assert_eq!(rgen.content, "***User Preferences***\n\nS***Task***\n\nP");
    }

    #[test]
    fn template_typos_are_caught() {
        let t = Templates { pair_item: "{i}. {psot}".into(), ..Templates::default() };
        let err = t.validate().unwrap_err().to_string();
        assert!(err.contains("pair_item") && err.contains("{psot}"), "{err}");
        Templates::default().validate().unwrap();
    }

    #[test]
    fn prompt_input_reports_fields() {
        let err = PromptInput::parse(r#"{"pairs":[{"prompt":"p","chosen":1}],"ugc":{}}"#).unwrap_err();
        let paths: Vec<_> = err.as_slice().iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["$.bos_token", "$.pairs[0].chosen", "$.pairs[0].rejected", "$.ugc"]);
    }
}
