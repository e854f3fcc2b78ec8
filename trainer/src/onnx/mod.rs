//! ONNX graphs written from Rust, with no Python at export time.
//!
//! - [`proto`]: the subset of `onnx.proto` we write, as `prost` messages.
//! - [`build`]: small helpers to assemble graphs (tensors, value infos, nodes).

pub mod build;
pub mod proto;
