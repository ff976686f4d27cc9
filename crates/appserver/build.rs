//! Records where the Python this crate is built against keeps its standard library, so the
//! zygote can point CPython at it without the user setting `PYTHONHOME`, and where libpython
//! lives, so the binary can carry an rpath to it.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
    println!("cargo:rerun-if-changed=build.rs");
    let config = pyo3_build_config::get();
    let python = config.executable().unwrap_or("python3").to_owned();
    let output = Command::new(&python)
        .args(["-c", "import sys; print(sys.base_prefix)"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} to find its prefix: {e}"));
    assert!(
        output.status.success(),
        "{python} failed to print sys.base_prefix"
    );
    let home = String::from_utf8(output.stdout).expect("prefix is UTF-8");
    println!("cargo:rustc-env=STRATA_PYTHON_HOME={}", home.trim());
    println!(
        "cargo:rustc-env=STRATA_PYTHON_VERSION={}.{}",
        config.version().major,
        config.version().minor
    );
    // Read by the binary's build script, which sets the rpath.
    if let Some(dir) = config.lib_dir() {
        println!("cargo:libdir={dir}");
    }
}
