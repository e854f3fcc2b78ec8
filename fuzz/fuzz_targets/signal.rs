//! Signal parsing and validation (`alignx_schemas::fuzz::signal`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| alignx_schemas::fuzz::signal(data));
