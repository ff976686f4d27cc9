//! Process titles: `strata master`, `strata zygote gen=N`, `strata worker id=K gen=N`.
//!
//! The title is written over the process's original argument area (what `ps` and
//! `/proc/PID/cmdline` show) and, shortened, into the thread name (`/proc/PID/comm`, `top`).
//! The zygote is started with a padded argument list so a worker's longer title fits.

use std::fs;

/// Arguments to start a zygote with: its title, padded so worker titles fit in place.
pub fn zygote_args(generation: u32) -> (String, String) {
    (format!("strata zygote gen={generation}"), " ".repeat(48))
}

/// Sets the calling process's title as far as its argument area allows.
pub fn set(title: &str) {
    let short: String = title.chars().take(15).collect();
    let _ = rustix::thread::set_name(&std::ffi::CString::new(short).unwrap_or_default());
    if let Some((start, end)) = argument_area() {
        overwrite(start, end, title.as_bytes());
    }
}

/// The `[arg_start, arg_end)` addresses of this process's argument area, from
/// `/proc/self/stat` (fields 48 and 49).
fn argument_area() -> Option<(usize, usize)> {
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is parenthesised and may hold spaces; count after it.
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    // `after_name` starts at field 3, so field N is at index N - 3.
    let start = fields.get(48 - 3)?.parse().ok()?;
    let end = fields.get(49 - 3)?.parse().ok()?;
    (end > start).then_some((start, end))
}

#[allow(unsafe_code)]
fn overwrite(start: usize, end: usize, title: &[u8]) {
    let len = end - start;
    let n = title.len().min(len - 1);
    // SAFETY: [start, end) is this process's argument area as the kernel reports it in
    // /proc/self/stat: mapped, writable memory on the initial stack that holds the argv
    // strings, and `n < len` keeps every write inside it. Rust's std keeps pointers to these
    // strings and copies them on each `std::env::args()` call; callers set the title only after
    // the arguments have been parsed, so a later read sees the title, which nothing relies on.
    // The master sets its title before its runtime starts and zygotes and workers are
    // single-threaded, so no other thread reads the area while it is written.
    unsafe {
        let area = start as *mut u8;
        std::ptr::copy_nonoverlapping(title.as_ptr(), area, n);
        std::ptr::write_bytes(area.add(n), 0, len - n);
    }
}
