//! Chat templates: a model directory's `tokenizer_config.json` `chat_template` (Jinja, as
//! Hugging Face renders it: `trim_blocks`, `lstrip_blocks`, Python string methods,
//! `raise_exception`), with the ChatML layout Qwen models use as the fallback when the
//! file has none. Judges and R_gen generators render their chats through this, so a
//! model fine-tuned elsewhere is prompted the way it was trained.

use std::path::Path;

use alignx_schemas::prompt::ChatMessage;
use minijinja::{Environment, Error, ErrorKind, context};

use crate::judge::chatml;

pub struct ChatTemplate {
    /// `None`: ChatML.
    env: Option<Environment<'static>>,
    bos: String,
    eos: String,
}

/// A special token as `tokenizer_config.json` writes it: a string, or `{"content": …}`.
fn token(config: &serde_json::Value, name: &str) -> String {
    match &config[name] {
        serde_json::Value::String(s) => s.clone(),
        v => v["content"].as_str().unwrap_or_default().to_owned(),
    }
}

impl ChatTemplate {
    /// The template of `dir` (ChatML when it has no `tokenizer_config.json` or no
    /// `chat_template`; the `default` one when it has several named ones).
    pub fn load(dir: &Path) -> Result<Self, String> {
        let path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?,
            Err(_) => serde_json::Value::Null,
        };
        let source = match &config["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(named) => named
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_owned),
            _ => None,
        };
        Self::from_source(source, token(&config, "bos_token"), token(&config, "eos_token"))
            .map_err(|e| format!("{}: chat_template: {e}", path.display()))
    }

    /// A template from its Jinja source (`None`: ChatML).
    pub fn from_source(source: Option<String>, bos: String, eos: String) -> Result<Self, String> {
        let Some(source) = source else { return Ok(Self { env: None, bos, eos }) };
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned("chat", source).map_err(|e| e.to_string())?;
        Ok(Self { env: Some(env), bos, eos })
    }

    /// The chat ending with an open assistant turn (`add_generation_prompt`).
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, String> {
        let Some(env) = &self.env else { return Ok(chatml(messages)) };
        let template = env.get_template("chat").map_err(|e| e.to_string())?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => &self.bos,
                eos_token => &self.eos,
            })
            .map_err(|e| format!("chat_template: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat() -> Vec<ChatMessage> {
        vec![ChatMessage::system("Judge."), ChatMessage::user("Which one?\n  Two lines.")]
    }

    #[test]
    fn no_template_is_chatml() {
        let t = ChatTemplate::from_source(None, String::new(), String::new()).unwrap();
        assert_eq!(t.render(&chat()).unwrap(), chatml(&chat()));
    }

    /// The template `alignx-trainer init` writes, and a Qwen2-Instruct-style one (block
    /// tags, whitespace control, a Python string method), render exactly ChatML.
    #[test]
    fn hugging_face_templates_render_as_transformers_does() {
        let ours = crate::init::CHAT_TEMPLATE;
        let qwen = "{%- for message in messages %}\n    {{- '<|im_start|>' + message.role + '\\n' + message.content.strip() + '<|im_end|>' + '\\n' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n";
        for source in [ours, qwen] {
            let t = ChatTemplate::from_source(Some(source.into()), "<s>".into(), "</s>".into()).unwrap();
            assert_eq!(t.render(&chat()).unwrap(), chatml(&chat()), "{source}");
        }
        let raising = "{{ raise_exception('system messages are not supported') }}";
        let t = ChatTemplate::from_source(Some(raising.into()), String::new(), String::new()).unwrap();
        assert!(t.render(&chat()).unwrap_err().contains("not supported"));
        let bos =
            ChatTemplate::from_source(Some("{{ bos_token }}x".into()), "<s>".into(), String::new()).unwrap();
        assert_eq!(bos.render(&chat()).unwrap(), "<s>x");
    }
}
