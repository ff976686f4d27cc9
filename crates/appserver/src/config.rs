//! App server configuration: the `[app]` section.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The `[app]` section of `strata.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AppConfig {
    /// The WSGI application as `module:callable` (`callable` defaults to `application`).
    pub module: String,
    /// Directory the application runs in; it is also put first on `sys.path`.
    pub chdir: Option<PathBuf>,
    /// A virtualenv whose packages are put on `sys.path`.
    pub virtualenv: Option<PathBuf>,
    /// Number of worker processes.
    pub workers: usize,
    /// Requests that may wait for an idle worker; more get 503. At most 8192; the shared
    /// ring is sized from it at start, so a reload can lower it but not raise it past that.
    pub queue_length: usize,
    /// Longest wait for an idle worker; longer waits get 503.
    #[serde(with = "strata_core::duration")]
    pub queue_timeout: Duration,
    /// Longest a worker may spend on one request; it is then killed (its Python stack logged)
    /// and the client gets 504.
    #[serde(with = "strata_core::duration")]
    pub timeout: Duration,
    /// Recycle a worker after this many requests (0: never).
    pub max_requests: u64,
    /// Add up to this many requests, chosen at random per worker, to `max_requests`.
    pub max_requests_jitter: u64,
    /// Recycle a worker whose resident memory passes this many MiB (0: never).
    pub max_rss_mb: u64,
    /// Time in-flight requests get to finish on SIGTERM.
    #[serde(with = "strata_core::duration")]
    pub graceful_timeout: Duration,
    /// Paths requested inside the zygote before workers are forked, to warm lazy code.
    pub warmup_paths: Vec<String>,
    /// `Host` used for warm-up requests.
    pub warmup_host: String,
    /// Where the application is mounted (`SCRIPT_NAME`); empty for the root.
    pub script_name: String,
    /// During a reload, how many old workers are being replaced at once (each by a new
    /// worker that is ready before the old one retires).
    pub reload_surge: usize,
    /// Niceness (0 to 19) of the work done before serving: the zygote's import and warm-up,
    /// its forks, and each new worker's warm-up. Serving workers keep the CPU while a reload or
    /// a respawn warms up; a worker returns to normal priority before it takes traffic. Needs
    /// the right to raise priority back (root, or `RLIMIT_NICE`); without it, 0 is used.
    pub warmup_nice: i32,
    /// Request bodies up to this size are read whole before a worker is chosen, so slow
    /// uploads never hold a worker; larger bodies are streamed to the worker.
    pub buffer_body_bytes: usize,
}

impl Default for AppConfig {
    fn default() -> Self {
        Self {
            module: "wsgi:application".into(),
            chdir: None,
            virtualenv: None,
            workers: 2,
            queue_length: 1024,
            queue_timeout: Duration::from_secs(30),
            timeout: Duration::from_secs(30),
            max_requests: 0,
            max_requests_jitter: 0,
            max_rss_mb: 0,
            graceful_timeout: Duration::from_secs(30),
            warmup_paths: Vec::new(),
            warmup_host: "localhost".into(),
            script_name: String::new(),
            buffer_body_bytes: 1024 * 1024,
            reload_surge: 1,
            warmup_nice: 10,
        }
    }
}

impl AppConfig {
    /// Checks values serde cannot, naming the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        let (module, callable) = self.target();
        let is_dotted_name = |s: &str| {
            !s.is_empty()
                && s.split('.').all(|part| {
                    part.chars()
                        .next()
                        .is_some_and(|c| c.is_alphabetic() || c == '_')
                        && part.chars().all(|c| c.is_alphanumeric() || c == '_')
                })
        };
        if !is_dotted_name(module) || !is_dotted_name(callable) {
            return Err(format!(
                "app.module = {:?}: expected `package.module:callable`",
                self.module
            ));
        }
        if self.queue_length > crate::queue::MAX_CAPACITY {
            return Err(format!(
                "app.queue_length = {}: must be at most {}",
                self.queue_length,
                crate::queue::MAX_CAPACITY
            ));
        }
        if self.workers == 0 || self.workers > 1024 {
            return Err(format!("app.workers = {}: must be 1 to 1024", self.workers));
        }
        if !(0..=19).contains(&self.warmup_nice) {
            return Err(format!(
                "app.warmup_nice = {}: must be 0 to 19",
                self.warmup_nice
            ));
        }
        if self.reload_surge == 0 {
            return Err("app.reload_surge = 0: must be at least 1".into());
        }
        if self.timeout.is_zero() {
            return Err("app.timeout = 0s: must be positive".into());
        }
        if !self.script_name.is_empty()
            && (!self.script_name.starts_with('/') || self.script_name.ends_with('/'))
        {
            return Err(format!(
                "app.script_name = {:?}: must start with `/` and not end with one",
                self.script_name
            ));
        }
        if let Some(path) = self.warmup_paths.iter().find(|p| !p.starts_with('/')) {
            return Err(format!("app.warmup_paths: {path:?} must start with `/`"));
        }
        for (key, dir) in [
            ("app.chdir", &self.chdir),
            ("app.virtualenv", &self.virtualenv),
        ] {
            if let Some(dir) = dir {
                if !dir.is_dir() {
                    return Err(format!("{key} = {:?}: not a directory", dir.display()));
                }
            }
        }
        Ok(())
    }

    /// The module and callable names of [`AppConfig::module`].
    pub fn target(&self) -> (&str, &str) {
        match self.module.split_once(':') {
            Some((module, callable)) => (module, callable),
            None => (self.module.as_str(), "application"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_defaults_callable() {
        let config = AppConfig {
            module: "mysite.wsgi".into(),
            ..AppConfig::default()
        };
        assert_eq!(config.target(), ("mysite.wsgi", "application"));
        assert!(config.validate().is_ok());
    }

    #[test]
    fn validate_names_the_key() {
        let bad = |f: fn(&mut AppConfig)| {
            let mut config = AppConfig::default();
            f(&mut config);
            config.validate().unwrap_err()
        };
        assert!(bad(|c| c.module = "my-site:app".into()).starts_with("app.module"));
        assert!(bad(|c| c.workers = 0).starts_with("app.workers"));
        assert!(bad(|c| c.script_name = "app/".into()).starts_with("app.script_name"));
        assert!(bad(|c| c.warmup_paths = vec!["x".into()]).starts_with("app.warmup_paths"));
        assert!(bad(|c| c.chdir = Some("/nonexistent/dir".into())).starts_with("app.chdir"));
    }
}
