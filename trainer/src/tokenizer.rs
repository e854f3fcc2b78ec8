//! Tokenizers: training a byte-level BPE for our tiny models, and loading any model
//! directory's `tokenizer.json` (ours or a released model's).
//!
//! Our tokenizers are byte-level like Qwen2's, with `add_prefix_space = false`, so every
//! text round-trips exactly through encode/decode — prompts are data, and a leading
//! space the model never saw would change them.

use std::path::Path;

use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const BOS: &str = "<|begin_of_text|>";
pub const EOS: &str = "<|endoftext|>";
pub const PAD: &str = "<|pad|>";
/// ChatML turn markers, for chat-templated prompts (the judge).
pub const CHAT_TOKENS: [&str; 2] = ["<|im_start|>", "<|im_end|>"];
/// The prompt protocol's tags, single tokens that decode back to their text.
pub const TAG_TOKENS: [&str; 4] = ["<think>", "</think>", "<answer>", "</answer>"];

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("cannot train a tokenizer on {path}: {message}")]
    Train { path: String, message: String },
}

/// Loads `tokenizer.json` from a model directory.
pub fn load(dir: &Path) -> Result<Tokenizer, TokenizerError> {
    let path = dir.join(TOKENIZER_FILE);
    Tokenizer::from_file(&path)
        .map_err(|e| TokenizerError::File { path: path.display().to_string(), message: e.to_string() })
}

/// Trains a byte-level BPE of at most `vocab_size` entries on `corpus` (UTF-8 text),
/// with our special and tag tokens.
pub fn train(corpus: &Path, vocab_size: usize) -> Result<Tokenizer, TokenizerError> {
    let err = |e: tokenizers::Error| TokenizerError::Train {
        path: corpus.display().to_string(),
        message: e.to_string(),
    };
    if !corpus.is_file() {
        return Err(TokenizerError::Train {
            path: corpus.display().to_string(),
            message: "no such file".into(),
        });
    }
    let specials: Vec<AddedToken> =
        [BOS, EOS, PAD].iter().chain(&CHAT_TOKENS).map(|t| AddedToken::from(*t, true)).collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build();
    let byte_level = ByteLevel::new(false, true, true);
    let mut built = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<NormalizerWrapper>)
        .with_pre_tokenizer(Some(byte_level))
        .with_post_processor(Some(byte_level))
        .with_decoder(Some(DecoderWrapper::ByteLevel(byte_level)))
        .build()
        .map_err(err)?;
    built.train_from_files(&mut trainer, vec![corpus.display().to_string()]).map_err(err)?;
    let mut tokenizer = Tokenizer::from(built);
    // Not "special": they must survive decoding like any other text.
    tokenizer.add_tokens(&TAG_TOKENS.map(|t| AddedToken::from(t, false)));
    Ok(tokenizer)
}

/// `text` as token ids (no special tokens added), the `i64`s tch takes.
pub fn encode_ids(tokenizer: &Tokenizer, text: &str) -> tokenizers::Result<Vec<i64>> {
    Ok(tokenizer.encode(text, false)?.get_ids().iter().map(|&i| i64::from(i)).collect())
}

/// The id of a token that must exist.
pub fn token_id(tokenizer: &Tokenizer, token: &str) -> Result<u32, TokenizerError> {
    tokenizer.token_to_id(token).ok_or_else(|| TokenizerError::File {
        path: TOKENIZER_FILE.into(),
        message: format!("no token {token:?}"),
    })
}
