//! The AlignXplore Stream consumer: turns the Kafka stream of behavioural signals into
//! per-user preference summaries in Redis (DESIGN.md §3).
//!
//! # Layout
//! - [`engine`]: the `Engine` trait between pipeline and model, and the deterministic
//!   `CountingEngine` for pipeline tests and benchmarks.
//! - [`metrics`]: the Prometheus metrics of DESIGN.md §3.6 and the `/metrics`,
//!   `/healthz`, `/readyz` endpoint.
//! - [`onnx_runtime`]: finding and loading ONNX Runtime (config, `ORT_DYLIB_PATH`, next
//!   to the binary).
//! - [`store`]: the Redis store: pending windows, summaries, history, applied by Lua
//!   scripts atomically and idempotently (DESIGN.md §3.3).
//! - [`validate_cmd`]: `alignx-consumer validate`, the DLQ gate run over a file, so
//!   producers can check their output before sending it.
//!
//! The stream pipeline (ingest → window → engine → store) is built on these.

pub mod engine;
pub mod metrics;
pub mod onnx_runtime;
pub mod store;
pub mod validate_cmd;
