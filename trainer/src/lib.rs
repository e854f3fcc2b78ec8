//! The AlignXplore Stream trainer: fine-tunes the preference-inference LLM and exports
//! it for the consumer (DESIGN.md §6).
//!
//! # Layout
//! - [`chat_template`]: a model's Jinja chat template (`tokenizer_config.json`), ChatML fallback.
//! - [`checkpoint`]: HF model directories: safetensors (sharded or not) by parameter name.
//! - [`dataset`]: `alignx-trainer build-dataset`, RL records from the inference log.
//! - [`device`]: `--device cpu|cuda|auto`, loading libtorch's CUDA part on GPU machines.
//! - [`generate`]: batched KV-cached sampling (greedy, temperature, top-k, top-p, stops).
//! - [`eval`]: `alignx-trainer eval`, ACC_jud of policy summaries next to baselines.
//! - [`init`]: `alignx-trainer init`, a new tiny model directory (presets, BPE tokenizer).
//! - [`judge`]: the judge's ChatML prompt and A-vs-B scoring by next-token log-probs.
//! - [`kafka`]: reading whole topics (to their ends at start) under a group of our own.
//! - [`lora`]: LoRA adapters in the PEFT layout; merging into base weights.
//! - [`model_dir`]: load a model directory (config, weights, tokenizer, EOS ids).
//! - [`model_store`]: versioned model store, the `current` symlink and Redis pointer.
//! - [`onnx`]: ONNX protobuf messages and graph-building helpers for the exporter.
//! - [`qwen2`]: the Qwen2 decoder with HF parameter names and a caller-owned KV cache.
//! - [`recipe`]: `alignx-trainer recipe tiny`, the cached end-to-end tiny model build.
//! - [`retrain`]: `alignx-trainer retrain`, dataset → GRPO → gate → promotion, locked.
//! - [`rgen`]: R_gen, the generator's log-prob margin for the chosen response with a summary.
//! - [`rl`]: `alignx-trainer grpo`, GRPO with the judge reward or R_gen, base and streaming.
//! - [`rng`]: the seeded SplitMix64 RNG behind sampling and data order.
//! - [`sft`]: `alignx-trainer sft`, response-only loss, exact resumes.
//! - [`synth`]: `alignx-trainer synth`, the deterministic synthetic preference world.
//! - [`tokenizer`]: byte-level BPE training (exact round trips) and `tokenizer.json` loading.
//! - [`optim`]: AdamW (state saved for exact resumes), warmup+cosine schedule, clipping.
//! - [`prompt_cmd`]: `alignx-trainer prompt`, rendering the prompt protocol of
//!   `alignx-schemas` for a golden-format input file.

pub mod chat_template;
pub mod checkpoint;
pub mod dataset;
pub mod device;
pub mod eval;
pub mod generate;
pub mod init;
pub mod judge;
pub mod kafka;
pub mod lora;
pub mod model_dir;
pub mod model_store;
pub mod onnx;
pub mod optim;
pub mod prompt_cmd;
pub mod qwen2;
pub mod recipe;
pub mod retrain;
pub mod rgen;
pub mod rl;
pub mod rng;
pub mod sft;
pub mod synth;
pub mod tokenizer;
