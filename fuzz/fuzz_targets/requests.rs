//! Fuzz target `requests`: runs [`check::requests`] on each input. The check is shared with the
//! corpus replay in `crates/luafcgid/tests/fuzz_corpus.rs`.
#![no_main]

#[path = "../../crates/luafcgid/tests/fuzz_corpus/check.rs"]
#[allow(dead_code)]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::requests(data));
