//! Fuzz target `pg_scram`: see `strata_dbpool::fuzz::scram` for what it feeds and what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strata_dbpool::fuzz::scram(data));
