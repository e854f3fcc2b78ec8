//! The pipeline's [`Engine`] on a model directory run with ONNX Runtime: tokenise the
//! rendered prompts, generate in one batch, stop at EOS or a stop string of DESIGN.md §5,
//! decode. Parsing `<answer>` stays with the pipeline.

use std::path::Path;
use std::sync::Arc;

use crate::engine::{Engine, EngineError, Generation, UpdateRequest};
use crate::metrics::Metrics;
use crate::onnx_model::{Batcher, DeviceChoice, Finish, ModelError, OnnxModel, StepReport, Timings};
use crate::onnx_runtime::OrtRuntime;
use crate::sampler::SamplingParams;

/// Generation stops once the decoded continuation ends with one of these (kept in the
/// text: answer parsing wants the `</answer>`), or at EOS.
pub const STOP_STRINGS: [&str; 5] = ["</answer>", "User:", "Human:", "Assistant:", "<|im_end|>"];

/// Tokens decoded from the end of a continuation to look for a stop string: enough for
/// the longest one even at one byte per token.
const STOP_WINDOW: usize = 16;

/// One finished prompt of [`OnnxEngine::complete`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The continuation (EOS removed, a stop string kept).
    pub text: String,
    pub finish: Finish,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
}

pub struct OnnxEngine {
    model: Arc<OnnxModel>,
    /// Requests of concurrent `generate` calls share one running batch.
    batcher: Batcher,
    tokenizer: Arc<tokenizers::Tokenizer>,
    bos: String,
    model_id: String,
    params: SamplingParams,
}

/// How a model is served.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    pub device: DeviceChoice,
    /// ONNX Runtime intra-op threads (0: one per core).
    pub threads: usize,
    /// Overrides `generation_config.json`'s sampling defaults when given.
    pub sampling: Option<SamplingParams>,
    pub max_new_tokens: usize,
    /// Rows of the continuous batch.
    pub max_rows: usize,
}

impl OnnxEngine {
    /// Loads a model directory and starts its continuous batcher; engine time per phase
    /// goes to `metrics` when given.
    pub fn load(
        runtime: &OrtRuntime,
        dir: &Path,
        options: &ServeOptions,
        metrics: Option<Metrics>,
    ) -> Result<Self, ModelError> {
        let model = Arc::new(OnnxModel::load(runtime, dir, options.device, options.threads)?);
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(ModelError::Missing { dir: dir.to_owned(), what: "tokenizer.json".into() });
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| ModelError::BadFile {
            dir: dir.to_owned(),
            file: "tokenizer.json",
            message: e.to_string(),
        })?;
        let bos = alignx_schemas::prompt::bos_text(dir);
        let mut params = options.sampling.unwrap_or(model.defaults);
        params.max_new_tokens = options.max_new_tokens;
        let model_id = dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| dir.display().to_string());
        let report: Option<StepReport> = metrics.map(|m| {
            Box::new(move |t: &Timings| {
                if t.prefill_s > 0.0 {
                    m.engine_seconds.with_label_values(&["prefill"]).observe(t.prefill_s);
                }
                if t.decode_s > 0.0 {
                    m.engine_seconds.with_label_values(&["decode"]).observe(t.decode_s + t.sampling_s);
                }
            }) as StepReport
        });
        let batcher = model.clone().continuous(options.max_rows, report);
        Ok(Self { model, batcher, tokenizer: Arc::new(tokenizer), bos, model_id, params })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        // The prompt already starts with the BOS text; add nothing.
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| EngineError::Failed(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    fn decode(&self, tokens: &[u32]) -> Result<String, EngineError> {
        self.tokenizer.decode(tokens, false).map_err(|e| EngineError::Failed(e.to_string()))
    }

    /// Generates for prompt texts with explicit parameters and seeds (the `generate`
    /// command and benchmarks).
    pub fn complete(
        &self,
        prompts: &[String],
        params: &[SamplingParams],
        seeds: &[u64],
    ) -> Result<Vec<Result<Completion, EngineError>>, EngineError> {
        // Prompts that do not fit the context fail alone; the rest run as one batch.
        let mut results: Vec<Option<Result<Completion, EngineError>>> = vec![None; prompts.len()];
        let mut rows = Vec::new();
        let mut encoded = Vec::new();
        let mut row_params = Vec::new();
        let mut row_seeds = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let ids = self.encode(p)?;
            let mut params = params[i];
            if let Some(max) = self.model.max_positions {
                if ids.len() >= max {
                    results[i] = Some(Err(EngineError::Failed(format!(
                        "prompt of {} tokens does not fit the model's context of {max}",
                        ids.len()
                    ))));
                    continue;
                }
                // Never past the context: fewer new tokens.
                params.max_new_tokens = params.max_new_tokens.min(max - ids.len());
            }
            rows.push(i);
            encoded.push(ids);
            row_params.push(params);
            row_seeds.push(seeds[i]);
        }
        let tokenizer = self.tokenizer.clone();
        let stop = Arc::new(move |tokens: &[u32]| {
            let tail = &tokens[tokens.len().saturating_sub(STOP_WINDOW)..];
            tokenizer.decode(tail, false).is_ok_and(|text| STOP_STRINGS.iter().any(|s| text.ends_with(s)))
        });
        let outputs = self.batcher.generate(&encoded, &row_params, &row_seeds, stop);
        for ((o, prompt), i) in outputs.into_iter().zip(&encoded).zip(rows) {
            let o = match o {
                Ok(o) => o,
                Err(e) => {
                    results[i] = Some(Err(EngineError::Failed(e.to_string())));
                    continue;
                }
            };
            let body = match o.finish {
                Finish::Eos => &o.tokens[..o.tokens.len() - 1],
                _ => &o.tokens[..],
            };
            results[i] = Some(self.decode(body).map(|text| Completion {
                text,
                finish: o.finish,
                prompt_tokens: prompt.len(),
                generated_tokens: o.tokens.len(),
            }));
        }
        Ok(results.into_iter().map(|r| r.expect("every prompt has a result")).collect())
    }
}

impl Engine for OnnxEngine {
    fn model_id(&self) -> &str {
        &self.model_id
    }

    fn bos(&self) -> &str {
        &self.bos
    }

    fn provider(&self) -> &str {
        self.model.provider
    }

    fn max_prompt_tokens(&self) -> Option<usize> {
        // Leave room for the generation (up to half the context).
        let max = self.model.max_positions?;
        Some(max - self.params.max_new_tokens.min(max / 2))
    }

    fn count_tokens(&self, prompt: &str) -> usize {
        self.tokenizer.encode(prompt, false).map_or(usize::MAX, |e| e.get_ids().len())
    }

    fn generate(&self, batch: &[UpdateRequest]) -> Result<Vec<Result<Generation, EngineError>>, EngineError> {
        let prompts: Vec<String> = batch.iter().map(|r| r.prompt.clone()).collect();
        let params = vec![self.params; batch.len()];
        let seeds: Vec<u64> = batch.iter().map(|r| r.seed).collect();
        let done = self.complete(&prompts, &params, &seeds)?;
        Ok(done
            .into_iter()
            .map(|c| {
                c.map(|c| Generation {
                    text: c.text,
                    prompt_tokens: c.prompt_tokens as u64,
                    generated_tokens: c.generated_tokens as u64,
                })
            })
            .collect())
    }
}
