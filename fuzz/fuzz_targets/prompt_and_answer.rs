//! Prompt rendering and `<answer>` extraction (`alignx_schemas::fuzz::prompt_and_answer`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| alignx_schemas::fuzz::prompt_and_answer(data));
