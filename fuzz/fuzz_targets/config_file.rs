//! Fuzz target `config_file`: see `strata::config::fuzz_file` for what it feeds and what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strata::config::fuzz_file(data));
