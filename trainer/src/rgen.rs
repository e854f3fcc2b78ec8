//! The generative reward R_gen (DESIGN.md §6): does the summary make a generator model
//! more likely to write the response the user chose?
//!
//! For a comparison (post, chosen, rejected) and a summary s, with the generator's
//! summed log-probabilities of a response after the R_gen chat
//! ([`Templates::rgen_messages`]):
//!
//! ```text
//! margin = [log p(chosen | s, post) − log p(rejected | s, post)]
//!        − [log p(chosen | –, post) − log p(rejected | –, post)]
//! ```
//!
//! The hard reward is 1 when `margin > τ`, else 0; the soft one is σ(margin − τ). (The
//! paper's code summed probabilities; log-probabilities do not underflow and are what its
//! text describes.) Text is re-tokenised with the generator's own tokenizer, so the
//! generator need not share the policy's vocabulary.

use std::path::Path;

use alignx_schemas::prompt::Templates;
use tch::{Device, Kind};

use crate::chat_template::ChatTemplate;
use crate::judge::JudgeError;
use crate::model_dir::{self, Dtype, LoadedModel};
use crate::sft::{Example, response_logprobs};
use crate::tokenizer::encode_ids;

/// DESIGN.md §6's default margin τ.
pub const DEFAULT_MARGIN: f64 = 0.03;

/// One comparison to score a summary on.
#[derive(Debug, Clone, Copy)]
pub struct GenItem<'a> {
    pub post: &'a str,
    pub summary: &'a str,
    pub chosen: &'a str,
    pub rejected: &'a str,
}

pub struct Generator {
    model: LoadedModel,
    device: Device,
    templates: Templates,
    chat: ChatTemplate,
}

impl Generator {
    pub fn load(dir: &Path, device: Device) -> Result<Self, JudgeError> {
        let chat = ChatTemplate::load(dir).map_err(JudgeError::Template)?;
        Ok(Self {
            model: model_dir::load(dir, device, Dtype::Fp32)?,
            device,
            templates: Templates::default(),
            chat,
        })
    }

    fn example(&self, summary: &str, post: &str, response: &str) -> Result<Example, JudgeError> {
        let encode =
            |t: &str| encode_ids(&self.model.tokenizer, t).map_err(|e| JudgeError::Tokenizer(e.to_string()));
        let chat =
            self.chat.render(&self.templates.rgen_messages(summary, post)).map_err(JudgeError::Template)?;
        let mut ids = encode(&chat)?;
        let prompt_len = ids.len();
        let tokens = encode(response)?;
        if tokens.is_empty() {
            return Err(JudgeError::Tokenizer(format!("response {response:?} encodes to no tokens")));
        }
        ids.extend(tokens);
        Ok(Example { ids, prompt_len })
    }

    /// The margin of each item (see the module docs), `batch` items per forward pass.
    pub fn margins(&self, items: &[GenItem<'_>], batch: usize) -> Result<Vec<f64>, JudgeError> {
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(batch.max(1)) {
            // Four sequences per item: (with, chosen), (with, rejected), (none, chosen), (none, rejected).
            let mut examples = Vec::with_capacity(chunk.len() * 4);
            for it in chunk {
                for summary in [it.summary, ""] {
                    examples.push(self.example(summary, it.post, it.chosen)?);
                    examples.push(self.example(summary, it.post, it.rejected)?);
                }
            }
            let refs: Vec<&Example> = examples.iter().collect();
            let logp = tch::no_grad(|| response_logprobs(&self.model.model, &refs, self.device))
                .to_kind(Kind::Double)
                .to_device(Device::Cpu);
            let mut sums = Vec::with_capacity(examples.len());
            let mut at = 0i64;
            for e in &examples {
                let n = e.response_len() as i64;
                sums.push(logp.narrow(0, at, n).sum(Kind::Double).double_value(&[]));
                at += n;
            }
            for s in sums.chunks(4) {
                out.push((s[0] - s[1]) - (s[2] - s[3]));
            }
        }
        Ok(out)
    }
}

/// The hard (1 above the margin, else 0) or soft (σ(margin − τ)) reward.
pub fn reward(margin: f64, tau: f64, soft: bool) -> f64 {
    if soft {
        1.0 / (1.0 + (tau - margin).exp())
    } else if margin > tau {
        1.0
    } else {
        0.0
    }
}
