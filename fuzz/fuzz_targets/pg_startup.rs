//! Fuzz target `pg_startup`: see `strata_dbpool::fuzz::startup` for what it feeds and what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strata_dbpool::fuzz::startup(data));
