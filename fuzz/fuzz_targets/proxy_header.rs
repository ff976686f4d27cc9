//! Fuzz target `proxy_header`: see `strata_lb::fuzz::proxy_header` for what it feeds and what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strata_lb::fuzz::proxy_header(data));
