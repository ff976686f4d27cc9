//! The embedded interpreter: start it on a fresh machine, find the application, warm it.
//!
//! Only this crate links libpython, and only zygote and worker processes initialise it.

use std::ffi::CString;
use std::path::Path;

use pyo3::prelude::*;
use pyo3::types::{PyList, PyModule};

use crate::control::ZygoteSpec;

/// Where the build-time Python keeps its standard library (`sys.base_prefix`).
pub const PYTHON_HOME: &str = env!("STRATA_PYTHON_HOME");

/// `major.minor` of the Python this binary is built against.
pub const PYTHON_VERSION: &str = env!("STRATA_PYTHON_VERSION");

const STRATA_PY: &str = include_str!("../python/strata/__init__.py");

/// Submodules of the embedded package, imported on demand.
const SUBMODULES: &[(&str, &str)] =
    &[("strata.django", include_str!("../python/strata/django.py"))];

/// Initialises CPython and prepares `sys.path` for the application.
pub fn initialise(py: Python<'_>, spec: &ZygoteSpec) -> PyResult<()> {
    let sys = py.import("sys")?;
    let os = py.import("os")?;
    // Workers must not think they are zygotes if the application runs `strata` itself.
    os.getattr("environ")?
        .call_method1("pop", (crate::control::ROLE_ENV, py.None()))?;
    let path = sys.getattr("path")?.cast_into::<PyList>()?;
    if let Some(venv) = &spec.app.virtualenv {
        use_virtualenv(py, venv)?;
    }
    if let Some(dir) = &spec.app.chdir {
        let dir = dir.display().to_string();
        os.call_method1("chdir", (&dir,))?;
        path.insert(0, dir)?;
    } else {
        path.insert(0, os.call_method0("getcwd")?)?;
    }
    // The submodules' sources go in before the package's code runs, which installs their
    // importer: build the module by hand so its namespace can be seeded.
    let module = PyModule::new(py, "strata")?;
    let sources = pyo3::types::PyDict::new(py);
    for (name, source) in SUBMODULES {
        sources.set_item(name, source)?;
    }
    module.setattr("_embedded_sources", sources)?;
    module.setattr("__file__", "strata/__init__.py")?;
    sys.getattr("modules")?.set_item("strata", &module)?;
    let code = CString::new(STRATA_PY).expect("no NUL in source");
    py.run(&code, Some(&module.dict()), None)?;
    // A worker killed at its timeout first gets SIGUSR1, which dumps every thread's stack.
    let signal = py.import("signal")?.getattr("SIGUSR1")?;
    py.import("faulthandler")?.call_method1(
        "register",
        (signal, py.import("sys")?.getattr("stderr")?, true),
    )?;
    Ok(())
}

/// Puts the virtualenv's packages on `sys.path` in place of the base installation's, unless
/// its `pyvenv.cfg` asks to include system site-packages.
fn use_virtualenv(py: Python<'_>, venv: &Path) -> PyResult<()> {
    let site_packages = venv
        .join("lib")
        .join(format!("python{PYTHON_VERSION}"))
        .join("site-packages");
    let include_system = std::fs::read_to_string(venv.join("pyvenv.cfg"))
        .map(|cfg| {
            cfg.lines().any(|line| {
                let mut kv = line.splitn(2, '=').map(str::trim);
                kv.next() == Some("include-system-site-packages") && kv.next() == Some("true")
            })
        })
        .unwrap_or(false);
    let code = format!(
        "import sys, site\n\
         if not {include_system}:\n    \
             sys.path[:] = [p for p in sys.path if not (p.startswith(sys.base_prefix) and p.endswith('site-packages'))]\n\
         sys.prefix = sys.exec_prefix = {venv:?}\n\
         site.addsitedir({site_packages:?})\n",
        include_system = if include_system { "True" } else { "False" },
        venv = venv.display().to_string(),
        site_packages = site_packages.display().to_string(),
    );
    py.run(&CString::new(code).expect("no NUL in paths"), None, None)
}

/// Imports `module:callable` and returns the callable.
pub fn load_app<'py>(py: Python<'py>, spec: &ZygoteSpec) -> Result<Bound<'py, PyAny>, String> {
    let (module, callable) = spec.app.target();
    let imported = py.import(module).map_err(|err| {
        let path = py
            .import("sys")
            .and_then(|sys| sys.getattr("path"))
            .map(|p| p.to_string())
            .unwrap_or_default();
        format!(
            "cannot import the application module `{module}` (app.module = {:?}; sys.path = {path}):\n{}",
            spec.app.module,
            format_error(py, &err)
        )
    })?;
    let app = imported.getattr(callable).map_err(|err| {
        format!(
            "module `{module}` has no callable `{callable}`:\n{}",
            format_error(py, &err)
        )
    })?;
    if !app.is_callable() {
        return Err(format!("`{module}:{callable}` is not callable"));
    }
    Ok(app)
}

/// Warms the application. In the zygote: Django's lazy parts and the configured paths, then
/// database connections are closed so no socket is shared across fork. In a worker
/// (`in_worker`): the configured paths again, for what each process keeps for itself.
pub fn warm_up(
    py: Python<'_>,
    spec: &ZygoteSpec,
    app: &Bound<'_, PyAny>,
    in_worker: bool,
) -> Result<(), String> {
    let log = pyo3::types::PyCFunction::new_closure(py, None, None, move |args, _kwargs| {
        let line: String = args.get_item(0)?.extract()?;
        if in_worker {
            tracing::debug!("{line}");
        } else {
            tracing::info!("{line}");
        }
        Ok::<_, PyErr>(())
    })
    .map_err(|err| format_error(py, &err))?;
    py.import("strata")
        .and_then(|strata| {
            strata.call_method1(
                "warm_up",
                (
                    app,
                    spec.app.warmup_paths.clone(),
                    spec.app.warmup_host.as_str(),
                    spec.app.script_name.as_str(),
                    log,
                    in_worker,
                ),
            )
        })
        .map(drop)
        .map_err(|err| format!("warm-up failed:\n{}", format_error(py, &err)))
}

/// A Python exception with its traceback, as Python would print it.
pub fn format_error(py: Python<'_>, err: &PyErr) -> String {
    let formatted = py.import("traceback").and_then(|traceback| {
        traceback
            .call_method1(
                "format_exception",
                (err.get_type(py), err.value(py), err.traceback(py)),
            )?
            .extract::<Vec<String>>()
    });
    match formatted {
        Ok(lines) => lines.concat(),
        Err(_) => err.to_string(),
    }
}
