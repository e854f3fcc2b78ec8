//! Helpers shared by the end-to-end tests under `tests/tests/`.
