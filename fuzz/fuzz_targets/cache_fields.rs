//! Fuzz target `cache_fields`: see `strata_accelerator::fuzz::cache_fields` for what it feeds and what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strata_accelerator::fuzz::cache_fields(data));
