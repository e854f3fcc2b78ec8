//! The AlignXplore Stream contract, shared by the consumer, the trainer and the tests.
//!
//! # Layout
//! - [`problem`]: a validation problem (JSON path + stable machine code + message), and
//!   [`problem::Problems`], the error that carries every problem of a document at once.
//! - [`check`]: the small field checker the validators are written with.
//! - [`signal`]: `alignx.signal.v1`, the messages applications produce, and
//!   [`signal::validate_signal`], the gate every Kafka message passes (DESIGN.md §3.1).
//! - [`summary`]: `alignx.summary.v1`, a user's record in Redis (DESIGN.md §3.3).
//! - [`inference_log`]: `alignx.inference_log.v1`, one record per update (DESIGN.md §3.4).
//! - [`training`]: the trainer's record formats, compatible with the paper's files (§6).
//! - [`prompt`]: the prompt protocol (DESIGN.md §5): templates, rendering.
//! - [`answer`]: parsing a generation into a summary, or a failure kind.
//! - [`keys`]: Redis key builders (cluster hash-tagged) and topic names.
//! - [`defaults`]: configuration defaults every component agrees on.
//! - [`secret_file`]: reading a secret mounted as a file.
//!
//! The JSON Schema files under `schemas/json/` describe the same documents for
//! producers in other languages; a test keeps them and these types in agreement.

pub mod answer;
pub mod check;
pub mod defaults;
pub mod fuzz;
pub mod inference_log;
pub mod keys;
pub mod problem;
pub mod prompt;
pub mod rng;
pub mod secret_file;
pub mod signal;
pub mod summary;
pub mod training;

pub use problem::{Problem, ProblemCode, Problems};
pub use signal::{Limits, Signal, SignalBody, SignalKind, validate_payload, validate_signal};
