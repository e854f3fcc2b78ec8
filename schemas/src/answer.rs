//! Reading a summary out of a generation (DESIGN.md §5).
//!
//! The model continues after `<think>`; the summary is the last `<answer>…</answer>`
//! with the literal `answer here` (echoed from the instructions) removed, trimmed, and
//! capped in length. When answers nest, the innermost (last opened) one is taken, so a
//! summary never carries tags; the paper's regex would keep the outer text instead.

use std::fmt;

const OPEN: &str = "<answer>";
const CLOSE: &str = "</answer>";
const PLACEHOLDER: &str = "answer here";

/// Why a generation gave no summary. Stable labels, also used in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AnswerFailure {
    /// No `<answer>` at all.
    NoAnswer,
    /// An `<answer>` was opened after the last complete one and never closed: the
    /// generation hit its token limit (or a stop string) mid-answer.
    Truncated,
    /// The answer was empty after cleaning.
    Empty,
}

impl AnswerFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            AnswerFailure::NoAnswer => "no_answer",
            AnswerFailure::Truncated => "truncated",
            AnswerFailure::Empty => "empty_answer",
        }
    }
}

impl fmt::Display for AnswerFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed answer: the summary and the reasoning that preceded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub summary: String,
    /// Text before the answer with a closing `</think>` and what follows it removed.
    pub reasoning: String,
}

/// Extracts the summary, capped to `max_chars` characters.
pub fn parse_answer(generation: &str, max_chars: usize) -> Result<Answer, AnswerFailure> {
    // The last opening tag decides: it is closed by the first `</answer>` after it, or
    // the generation ended mid-answer. Earlier (outer or older) answers are superseded.
    let open = generation.rfind(OPEN).ok_or(AnswerFailure::NoAnswer)?;
    let body_start = open + OPEN.len();
    let close = body_start + generation[body_start..].find(CLOSE).ok_or(AnswerFailure::Truncated)?;
    let inner = &generation[body_start..close];
    // Removing the placeholder can splice a tag together ("<answer" + "answer here" +
    // ">"): strip what that forms until nothing changes, so no tag ever survives.
    let mut cleaned = inner.replace(PLACEHOLDER, "");
    loop {
        let next = cleaned.replace(PLACEHOLDER, "").replace(OPEN, "").replace(CLOSE, "");
        if next == cleaned {
            break;
        }
        cleaned = next;
    }
    let summary: String = cleaned.trim().chars().take(max_chars).collect();
    let summary = summary.trim_end().to_owned();
    if summary.is_empty() {
        return Err(AnswerFailure::Empty);
    }
    let before = &generation[..open];
    let reasoning = before.find("</think>").map_or(before, |end| &before[..end]).trim().to_owned();
    Ok(Answer { summary, reasoning })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(g: &str) -> Result<String, AnswerFailure> {
        parse_answer(g, 2048).map(|a| a.summary)
    }

    /// Found by the `prompt_and_answer` fuzz target.
    #[test]
    fn removing_the_placeholder_never_splices_a_tag_into_the_summary() {
        assert_eq!(summary("<answer>x <answeranswer here> y</answer>"), Ok("x  y".into()));
        assert_eq!(summary("<answer>a </answanswer hereer> b</answer>"), Ok("a  b".into()));
    }

    #[test]
    fn plain_answer() {
        let a =
            parse_answer(" The user likes jokes. </think> <answer> Enjoys humour. </answer>", 2048).unwrap();
        assert_eq!(a.summary, "Enjoys humour.");
        assert_eq!(a.reasoning, "The user likes jokes.");
    }

    #[test]
    fn last_answer_wins() {
        assert_eq!(summary("<answer>first</answer> more <answer>second</answer>").unwrap(), "second");
    }

    #[test]
    fn nested_tags_take_the_innermost() {
        assert_eq!(summary("<answer>outer <answer>inner</answer>").unwrap(), "inner");
        assert_eq!(summary("<answer>a</answer></answer>").unwrap(), "a");
    }

    #[test]
    fn placeholder_is_removed() {
        assert_eq!(summary("i.e., <answer> answer here </answer>"), Err(AnswerFailure::Empty));
        assert_eq!(summary("<answer>answer here: likes cats</answer>").unwrap(), ": likes cats");
    }

    #[test]
    fn missing_closing_tag_is_truncation() {
        assert_eq!(summary("thinking <answer> likes ca"), Err(AnswerFailure::Truncated));
        assert_eq!(summary("<answer>old</answer> then <answer> new but cut"), Err(AnswerFailure::Truncated));
        assert_eq!(summary("no tags at all"), Err(AnswerFailure::NoAnswer));
        assert_eq!(summary("stray </answer> only"), Err(AnswerFailure::NoAnswer));
        assert_eq!(summary("<answer>   \n </answer>"), Err(AnswerFailure::Empty));
    }

    #[test]
    fn unicode_and_newlines_survive_and_cap_counts_characters() {
        assert_eq!(summary("<answer>\nMag 🍣 und\nKürze.\n</answer>").unwrap(), "Mag 🍣 und\nKürze.");
        assert_eq!(parse_answer("<answer>ééééé</answer>", 3).unwrap().summary, "ééé");
    }
}
