//! Embeds an rpath to the libpython the app server tier links, so the binary loads the same
//! library it was built against on a machine that has several, without `LD_LIBRARY_PATH`.
//! The app server's build script reports the directory (`links = "strata_python"`).

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_STRATA_PYTHON_LIBDIR");
    if let Ok(dir) = std::env::var("DEP_STRATA_PYTHON_LIBDIR") {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{dir}");
    }
}
