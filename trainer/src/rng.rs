//! The project's seeded RNG (SplitMix64), shared with the consumer.

pub use alignx_schemas::rng::Rng;
