//! Fuzz target `pg_frontend`: see `strata_dbpool::fuzz::frontend` for what it feeds and what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strata_dbpool::fuzz::frontend(data));
