//! The app server tier: Gunicorn's job, with a warm zygote.
//!
//! # Layout
//! - [`master`] (runs in the tokio master): the tier service, the bounded queue in front of
//!   idle workers, the supervisor that keeps workers alive.
//! - [`zygote`] (a re-executed, single-threaded process): imports and warms the application,
//!   forks workers.
//! - `worker` (forked from the zygote): runs WSGI requests framed by [`proto`].
//! - [`control`]: the master ↔ zygote line protocol; [`proto`]: the master ↔ worker frames.
//!
//! Only this crate links libpython; the master never initialises it.

pub mod config;
pub mod control;
pub mod master;
pub mod proctitle;
pub mod proto;
mod python;
mod queue;
mod worker;
pub mod zygote;

pub use config::AppConfig;
pub use control::LogSpec;
pub use master::{AppServer, ReloadResult, StartError, Status};

/// Whether this process was started as a zygote (checked by `main` before anything else).
pub fn is_zygote() -> bool {
    std::env::var_os(control::ROLE_ENV).is_some_and(|role| role == "zygote")
}
