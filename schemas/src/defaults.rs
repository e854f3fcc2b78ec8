//! Configuration defaults every component agrees on (DESIGN.md §3).

use std::time::Duration;

/// Signals per streaming update: the paper's window of 4.
pub const WINDOW_MAX_SIGNALS: usize = 4;
/// Longest a signal waits in a window before an update is forced.
pub const WINDOW_MAX_WAIT: Duration = Duration::from_secs(30);
/// Past summaries kept per user in `alignx:{u}:history`.
pub const HISTORY_LEN: usize = 16;
/// Longest summary stored, in characters.
pub const MAX_SUMMARY_CHARS: usize = 2048;
/// Failed generations tolerated for one window before the update is recorded as failed.
pub const MAX_UPDATE_RETRIES: u32 = 3;
/// Invalid-message circuit breaker: stop when more than this fraction of …
pub const INVALID_RATIO_MAX: f64 = 0.5;
/// … the last this many messages of one partition were invalid.
pub const INVALID_RATIO_WINDOW: usize = 1000;
/// Where `/metrics`, `/healthz` and `/readyz` are served.
pub const METRICS_ADDR: &str = "127.0.0.1:9464";
/// Kafka consumer group of the consumer.
pub const GROUP_ID: &str = "alignx-consumer";
/// The streaming template's stand-in for "no previous summary", as in the released data.
pub const NO_PAST_SUMMARY: &str = "Not provided";
