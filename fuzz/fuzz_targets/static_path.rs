//! Fuzz target `static_path`: see `strata_lb::fuzz::static_path` for what it feeds and what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strata_lb::fuzz::static_path(data));
