//! The narrow interface between the pipeline and model execution: a batch of update
//! requests in, one generation per request out. The pipeline never calls a model
//! directly; it holds an `Arc<dyn Engine>`.
//!
//! [`CountingEngine`] is the deterministic engine for pipeline tests and benchmarks: it
//! "summarises" by counting signal kinds, continuing from the previous summary, in the
//! protocol's output format, so everything downstream of generation runs for real.

use alignx_schemas::SignalKind;

/// One user's update, ready for the model.
#[derive(Debug, Clone)]
pub struct UpdateRequest {
    pub user_id: String,
    /// The full prompt (DESIGN.md §5), rendered by the pipeline.
    pub prompt: String,
    /// The summary the update starts from.
    pub previous_summary: Option<String>,
    /// The kinds of the window's signals, in order (the prompt shows the signals).
    pub kinds: Vec<SignalKind>,
    /// Seed of this request's sampling (reproducible generations).
    pub seed: u64,
}

/// What the model wrote for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// The continuation after the prompt (parsed later for `<answer>`).
    pub text: String,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("engine failed: {0}")]
    Failed(String),
}

/// Runs a model over batches of update requests.
pub trait Engine: Send + Sync {
    /// The model version id recorded with every summary it writes.
    fn model_id(&self) -> &str;
    /// The tokenizer's BOS token text that starts every prompt ("" when it has none).
    fn bos(&self) -> &str {
        ""
    }
    /// Where it runs, for `alignx_model_info{provider}` (e.g. `cpu`, `cuda`).
    fn provider(&self) -> &str;
    /// One result per request, in request order; the outer error fails the whole batch.
    /// Blocking: call it off the async runtime's worker threads.
    fn generate(&self, batch: &[UpdateRequest]) -> Result<Vec<Result<Generation, EngineError>>, EngineError>;
    /// The longest prompt, in tokens, the engine takes (`None`: no limit). The pipeline
    /// drops the oldest signals from a prompt until it fits.
    fn max_prompt_tokens(&self) -> Option<usize> {
        None
    }
    /// How many tokens a prompt is (asked only when there is a limit).
    fn count_tokens(&self, _prompt: &str) -> usize {
        0
    }
}

/// The engine currently serving, swappable while the pipeline runs (model hot reload).
/// Each batch takes the current engine once and uses it throughout, so a swap never
/// splits a batch, and updates in flight finish on the model they started with.
pub struct EngineSlot(std::sync::RwLock<std::sync::Arc<dyn Engine>>);

impl EngineSlot {
    pub fn new(engine: std::sync::Arc<dyn Engine>) -> Self {
        Self(std::sync::RwLock::new(engine))
    }

    pub fn current(&self) -> std::sync::Arc<dyn Engine> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `engine` in place; returns the one it replaces.
    pub fn swap(&self, engine: std::sync::Arc<dyn Engine>) -> std::sync::Arc<dyn Engine> {
        std::mem::replace(&mut *self.0.write().unwrap_or_else(|p| p.into_inner()), engine)
    }
}

/// Counts signal kinds: the summary is `pair=P ugc=U text=T`, carried over from the
/// previous summary when it has that form.
#[derive(Debug, Default, Clone)]
pub struct CountingEngine;

impl CountingEngine {
    fn counts(previous: Option<&str>) -> [u64; 3] {
        let mut counts = [0u64; 3];
        for part in previous.unwrap_or("").split_whitespace() {
            if let Some((name, n)) = part.split_once('=')
                && let Some(i) = SignalKind::ALL.iter().position(|k| k.as_str() == name)
            {
                counts[i] = n.parse().unwrap_or(0);
            }
        }
        counts
    }
}

impl Engine for CountingEngine {
    fn model_id(&self) -> &str {
        "counting"
    }

    fn provider(&self) -> &str {
        "none"
    }

    fn generate(&self, batch: &[UpdateRequest]) -> Result<Vec<Result<Generation, EngineError>>, EngineError> {
        Ok(batch
            .iter()
            .map(|r| {
                let mut counts = Self::counts(r.previous_summary.as_deref());
                for kind in &r.kinds {
                    let i = SignalKind::ALL.iter().position(|k| k == kind).expect("every kind is listed");
                    counts[i] += 1;
                }
                let summary: Vec<String> =
                    SignalKind::ALL.iter().zip(counts).map(|(k, n)| format!("{}={n}", k.as_str())).collect();
                let text = format!(
                    " Counted {} new signals. </think> <answer>{}</answer>",
                    r.kinds.len(),
                    summary.join(" ")
                );
                Ok(Generation {
                    prompt_tokens: r.prompt.split_whitespace().count() as u64,
                    generated_tokens: text.split_whitespace().count() as u64,
                    text,
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use alignx_schemas::answer::parse_answer;
    use alignx_schemas::{Limits, Signal, validate_signal};

    use super::*;

    fn signal(kind: &str) -> Signal {
        let body = match kind {
            "pair" => r#""post":"p","chosen":"c","rejected":"r""#,
            "ugc" => r#""post":"p","comment":"c""#,
            _ => r#""text":"t""#,
        };
        let json = format!(
            r#"{{"schema":"alignx.signal.v1","user_id":"u","signal_id":"s","ts":"2026-01-01T00:00:00Z","kind":"{kind}",{body}}}"#
        );
        validate_signal(json.as_bytes(), Some(b"u"), &Limits::default()).unwrap()
    }

    #[test]
    fn counts_continue_from_the_previous_summary_and_parse_as_answers() {
        let request = |previous: Option<&str>, kinds: &[&str]| UpdateRequest {
            user_id: "u".into(),
            prompt: "a prompt".into(),
            previous_summary: previous.map(str::to_owned),
            kinds: kinds.iter().map(|k| signal(k).kind()).collect(),
            seed: 0,
        };
        let out = CountingEngine
            .generate(&[
                request(None, &["pair", "text", "pair"]),
                request(Some("pair=2 ugc=5 text=0"), &["ugc"]),
            ])
            .unwrap();
        let out: Vec<Generation> = out.into_iter().map(Result::unwrap).collect();
        let summaries: Vec<String> =
            out.iter().map(|g| parse_answer(&g.text, 2048).unwrap().summary).collect();
        assert_eq!(summaries, ["pair=2 ugc=0 text=1", "pair=2 ugc=6 text=0"]);
        assert_eq!(out[0].prompt_tokens, 2);
    }
}
