//! The judge (DESIGN.md §5, §6): given a user's preference summary, a post and two
//! responses, which response does the user prefer? Scored, not generated: the judge's
//! next-token log-probabilities of `A` vs `B` after the answer prefix
//! (`{"selection": "Response `, [`Templates::judge_answer_prefix`]) — one deterministic
//! forward pass per batch.
//!
//! Prompts are rendered with the judge's own chat template (`tokenizer_config.json`;
//! [`crate::chat_template`]), else the ChatML layout Qwen models are trained on
//! (`<|im_start|>role\n…<|im_end|>\n`), which our tiny tokenizers carry as special tokens
//! and whose template `init` writes.

use std::path::Path;

use alignx_schemas::prompt::{ChatMessage, Templates};
use alignx_schemas::training::{Choice, ColdStartRecord};
use tch::{Device, Kind, Tensor};

use crate::chat_template::ChatTemplate;
use crate::generate::left_padded;
use crate::model_dir::{self, Dtype, LoadError, LoadedModel};
use crate::qwen2::KvCache;
use crate::tokenizer::encode_ids;

// How a tiny judge learns (`alignx-trainer recipe tiny`). Which response a user prefers
// is an interaction — response B's style × the styles in the summary — and with both A/B
// orders in the data neither alone tells anything, so training on the selection alone
// sits at chance: the readout of `A` vs `B` collapses to exactly 1/2 before attention has
// learnt to bring either input to the answer position. Two copy targets at the same
// position give each input a gradient of its own: after the same answer prefix, the
// judge is also trained to write response B's last word and a word of the summary. The
// curriculum: (1) the copies alone on short chats (no instructions or worked example,
// summaries naming one style), (2) copies and selections mixed on those, (3) everything
// on the real prompt. Scoring reads only `A` vs `B`, so the copies never count there.

/// Renders a chat in ChatML, ending with an open assistant turn.
pub fn chatml(messages: &[ChatMessage]) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str(&format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content));
    }
    out.push_str("<|im_start|>assistant\n");
    out
}

/// A judge SFT example: the rendered chat, and the selection as the response.
pub fn training_record(
    templates: &Templates,
    post: &str,
    summary: &str,
    a: &str,
    b: &str,
    answer: Choice,
) -> ColdStartRecord {
    let letter = if answer == Choice::A { "A" } else { "B" };
    copy_record(templates, post, summary, a, b, letter)
}

/// A judge training record whose answer, after the selection prefix, is `word`: one of
/// the copy targets described above, or (from [`training_record`]) the selection's letter.
pub fn copy_record(
    templates: &Templates,
    post: &str,
    summary: &str,
    a: &str,
    b: &str,
    word: &str,
) -> ColdStartRecord {
    ColdStartRecord {
        prompt: chatml(&templates.judge_messages(post, summary, a, b)),
        response: format!("{}{word}\"}}<|im_end|>", templates.judge_answer_prefix),
    }
}

/// The judge chat of the curriculum's first stages: the comparison without the
/// instructions and the worked example.
pub fn curriculum_templates() -> Templates {
    Templates {
        judge_user: "{examples}<Prompt>\n{post}\n</Prompt>\n\n<Preference>\n{summary}</Preference>\n\n\
                     <Response A>\n{a}\n</Response A>\n\n<Response B>\n{b}\n</Response B>\n\n"
            .into(),
        judge_examples: String::new(),
        ..Templates::default()
    }
}

/// One comparison to judge.
#[derive(Debug, Clone, Copy)]
pub struct JudgeItem<'a> {
    pub post: &'a str,
    pub summary: &'a str,
    pub a: &'a str,
    pub b: &'a str,
}

#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    #[error("judge model: {0}")]
    Load(#[from] LoadError),
    #[error("judge tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Template(String),
}

/// A loaded judge model.
pub struct Judge {
    model: LoadedModel,
    device: Device,
    templates: Templates,
    /// The model's own chat template (ChatML when it has none).
    chat: ChatTemplate,
    /// Token ids of the selection prefix shared by both answers, and the single tokens
    /// that differ (`None`: the tokenizer splits the answers otherwise; then whole
    /// continuations are scored).
    prefix: Vec<i64>,
    single: Option<(i64, i64)>,
    tails: (Vec<i64>, Vec<i64>),
}

impl Judge {
    pub fn load(dir: &Path, device: Device) -> Result<Self, JudgeError> {
        let model = model_dir::load(dir, device, Dtype::Fp32)?;
        let templates = Templates::default();
        let encode =
            |t: &str| encode_ids(&model.tokenizer, t).map_err(|e| JudgeError::Tokenizer(e.to_string()));
        let a = encode(&format!("{}A", templates.judge_answer_prefix))?;
        let b = encode(&format!("{}B", templates.judge_answer_prefix))?;
        let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        let single = (a.len() == common + 1 && b.len() == common + 1).then(|| (a[common], b[common]));
        let chat = ChatTemplate::load(dir).map_err(JudgeError::Template)?;
        Ok(Self {
            chat,
            prefix: a[..common].to_vec(),
            single,
            tails: (a[common..].to_vec(), b[common..].to_vec()),
            model,
            device,
            templates,
        })
    }

    /// The judge's probability that the user prefers response A, for each item
    /// (normalised over the two answers), in batches of `batch`.
    pub fn prob_a(&self, items: &[JudgeItem<'_>], batch: usize) -> Result<Vec<f64>, JudgeError> {
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(batch.max(1)) {
            let mut prompts = Vec::with_capacity(chunk.len());
            for it in chunk {
                let chat = self
                    .chat
                    .render(&self.templates.judge_messages(it.post, it.summary, it.a, it.b))
                    .map_err(JudgeError::Template)?;
                let mut ids = encode_ids(&self.model.tokenizer, &chat)
                    .map_err(|e| JudgeError::Tokenizer(e.to_string()))?;
                ids.extend_from_slice(&self.prefix);
                prompts.push(ids);
            }
            match self.single {
                Some((ta, tb)) => {
                    let lp = tch::no_grad(|| self.last_logprobs(&prompts));
                    for r in 0..prompts.len() as i64 {
                        let (a, b) = (lp.double_value(&[r, ta]), lp.double_value(&[r, tb]));
                        out.push(1.0 / (1.0 + (b - a).exp()));
                    }
                }
                None => {
                    let with = |tail: &[i64]| -> Vec<Vec<i64>> {
                        prompts.iter().map(|p| p.iter().chain(tail).copied().collect()).collect()
                    };
                    let sa = tch::no_grad(|| self.tail_logprobs(&with(&self.tails.0), self.tails.0.len()));
                    let sb = tch::no_grad(|| self.tail_logprobs(&with(&self.tails.1), self.tails.1.len()));
                    out.extend(sa.iter().zip(&sb).map(|(a, b)| 1.0 / (1.0 + (b - a).exp())));
                }
            }
        }
        Ok(out)
    }

    /// Left-padded batch → log-probabilities `[batch, seq, vocab]`.
    fn logprobs(&self, seqs: &[Vec<i64>]) -> Tensor {
        let (ids, mask, positions) = left_padded(seqs, self.device);
        let logits = self.model.model.forward(&ids, &mask, &positions, &mut KvCache::new());
        logits.log_softmax(-1, Kind::Float).to_device(Device::Cpu)
    }

    fn last_logprobs(&self, seqs: &[Vec<i64>]) -> Tensor {
        self.logprobs(seqs).select(1, -1)
    }

    /// Summed log-probability of each sequence's last `tail` tokens.
    fn tail_logprobs(&self, seqs: &[Vec<i64>], tail: usize) -> Vec<f64> {
        let lp = self.logprobs(seqs);
        let width = lp.size()[1];
        seqs.iter()
            .enumerate()
            .map(|(r, s)| {
                (0..tail)
                    .map(|k| {
                        // Token at column width-tail+k is predicted at the column before it.
                        let col = width - tail as i64 + k as i64;
                        lp.double_value(&[r as i64, col - 1, s[s.len() - tail + k]])
                    })
                    .sum()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_ends_with_an_open_assistant_turn() {
        let t = Templates::default();
        let r = training_record(&t, "post", "likes jokes", "x", "y", Choice::B);
        assert!(r.prompt.starts_with("<|im_start|>system\nGenerate a task-specific response.<|im_end|>\n"));
        assert!(r.prompt.ends_with("</Response B>\n\n<|im_end|>\n<|im_start|>assistant\n"), "{}", r.prompt);
        assert_eq!(r.response, "{\"selection\": \"Response B\"}<|im_end|>");
        assert!(r.response.starts_with(&t.judge_answer_prefix));
    }
}
