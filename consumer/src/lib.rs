//! The AlignXplore Stream consumer: turns the Kafka stream of behavioural signals into
//! per-user preference summaries in Redis (DESIGN.md §3).
//!
//! # Layout
//! - [`config`]: `run`'s configuration: TOML file, environment, flags.
//! - [`ingest`]: the Kafka consumer's settings and rebalance hooks; messages → signals or
//!   dead letters.
//! - [`pipeline`]: the loop that owns the state: windows, offsets, dispatch, checkpoints,
//!   rebalances, shutdown.
//! - [`window`]: per-user windows, flush timers and the ready queue (no I/O).
//! - [`offsets`]: per-partition low-water marks of handled messages.
//! - [`update`]: one batch of updates: prompt → engine → answer → store → log.
//! - [`sink`]: the Kafka producer for dead letters, inference-log records and summaries.
//! - [`redis_conn`]: one reconnecting Redis connection type, single node or cluster.
//! - [`onnx_model`]: a model directory's ONNX graph (interface discovered from the file),
//!   execution provider choice, batched KV-cached generation.
//! - [`onnx_engine`]: the pipeline's `Engine` on it: tokenise, generate, stop strings.
//! - [`reload`]: model hot reload from `alignx:model:current` or a re-pointed symlink.
//! - [`sampler`]: greedy / temperature / top-k / top-p / repetition penalty, seeded.
//! - [`engine`]: the `Engine` trait between pipeline and model, and the deterministic
//!   `CountingEngine` for pipeline tests and benchmarks.
//! - [`metrics`]: the Prometheus metrics of DESIGN.md §3.6 and the `/metrics`,
//!   `/healthz`, `/readyz` endpoint.
//! - [`onnx_runtime`]: finding and loading ONNX Runtime (config, `ORT_DYLIB_PATH`, next
//!   to the binary).
//! - [`store`]: the Redis store: pending windows, summaries, history, applied by Lua
//!   scripts atomically and idempotently (DESIGN.md §3.3).
//! - [`backfill`]: re-infer summaries with a new model from the users' logged windows.
//! - [`ops`]: operator commands — `produce` signals from a file, `inspect`/`export`
//!   everything stored about a user, `erase` a user (tombstone + audit record).
//! - [`validate_cmd`]: `alignx-consumer validate`, the DLQ gate run over a file, so
//!   producers can check their output before sending it.

pub mod backfill;
pub mod config;
pub mod engine;
pub mod ingest;
pub mod metrics;
pub mod offsets;
pub mod onnx_engine;
pub mod onnx_model;
pub mod onnx_runtime;
pub mod ops;
pub mod pipeline;
pub mod redis_conn;
pub mod reload;
pub mod sampler;
pub mod sink;
pub mod store;
pub mod update;
pub mod validate_cmd;
pub mod window;
