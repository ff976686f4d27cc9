//! Fuzz target `worker_frames`: see `strata_appserver::fuzz::worker_frames` for what it feeds and what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strata_appserver::fuzz::worker_frames(data));
