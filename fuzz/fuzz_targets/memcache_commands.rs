//! Fuzz target `memcache_commands`: see `strata_cache::fuzz::commands` for what it feeds and what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strata_cache::fuzz::commands(data));
