//! Log setup shared by every Strata process (master, zygote, workers): human-readable or JSON
//! lines on standard error.

use std::io::IsTerminal;

use tracing::level_filters::LevelFilter;

/// Installs the global subscriber; later calls do nothing.
pub fn init(level: &str, json: bool) {
    let level: LevelFilter = level.parse().unwrap_or(LevelFilter::INFO);
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Whether `level` names a log level.
pub fn valid_level(level: &str) -> bool {
    level.parse::<LevelFilter>().is_ok()
}
