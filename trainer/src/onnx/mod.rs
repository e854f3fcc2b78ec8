//! ONNX graphs written from Rust, with no Python at export time.
//!
//! - [`proto`]: the subset of `onnx.proto` we write, as `prost` messages.
//! - [`build`]: small helpers to assemble graphs (tensors, value infos, nodes).
//! - [`export`]: Qwen2 → ONNX in the HF Optimum decoder-with-past layout.

pub mod build;
pub mod export;
pub mod proto;
