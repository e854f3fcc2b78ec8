//! Helpers shared by the end-to-end tests under `tests/tests/`.
//!
//! - [`services`]: start real Redis and the tansu Kafka-protocol broker as child
//!   processes on free loopback ports, and stop them (by PID) when dropped.
//! - [`stream`]: topics, synthetic signal streams, `alignx-consumer run` as a process,
//!   and the exactly-once audit.

pub mod services;
pub mod stream;
