//! The AlignXplore Stream trainer: fine-tunes the preference-inference LLM and exports
//! it for the consumer (DESIGN.md §6).
//!
//! # Layout
//! - [`device`]: `--device cpu|cuda|auto`, loading libtorch's CUDA part on GPU machines.
//! - [`onnx`]: ONNX protobuf messages and graph-building helpers for the exporter.
//! - [`prompt_cmd`]: `alignx-trainer prompt`, rendering the prompt protocol of
//!   `alignx-schemas` for a golden-format input file.

pub mod device;
pub mod onnx;
pub mod prompt_cmd;
