//! Configuration: built-in defaults < `strata.toml` (or `--config`) < `STRATA_*` environment
//! (`STRATA_APP__WORKERS=4`) < command-line flags. Parsed and validated once, here; the tiers
//! receive their own typed sections.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use strata_accelerator::AcceleratorConfig;
use strata_appserver::AppConfig;
use strata_cache::CacheConfig;
use strata_dbpool::DbPoolConfig;
use strata_lb::LbConfig;

use crate::cluster::ClusterConfig;

/// Tiers a node can run.
pub const TIERS: &[&str] = &["lb", "accelerator", "app", "cache", "dbpool"];

/// Tiers this build serves today.
const AVAILABLE: &[&str] = &["lb", "accelerator", "app", "cache", "dbpool"];

/// Tiers a node runs unless told otherwise.
const DEFAULT_TIERS: &[&str] = &["lb", "accelerator", "app"];

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Tiers this node runs.
    pub tiers: Vec<String>,
    pub lb: LbConfig,
    pub accelerator: AcceleratorConfig,
    pub app: AppConfig,
    pub cache: CacheConfig,
    pub dbpool: DbPoolConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub cluster: ClusterConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            tiers: DEFAULT_TIERS.iter().map(|t| t.to_string()).collect(),
            lb: LbConfig::default(),
            accelerator: AcceleratorConfig::default(),
            app: AppConfig::default(),
            cache: CacheConfig::default(),
            dbpool: DbPoolConfig::default(),
            admin: AdminConfig::default(),
            log: LogConfig::default(),
            cluster: ClusterConfig::default(),
        }
    }
}

/// The `[admin]` section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin listener.
    pub bind: SocketAddr,
    /// Bearer token required on every admin request; required when `bind` is not loopback.
    pub token: Option<String>,
    /// Unix socket a new `strata run --upgrade` takes the listeners over (default: in the
    /// temporary directory, named after `lb.bind`'s port).
    pub upgrade_socket: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 9000)),
            token: None,
            upgrade_socket: None,
        }
    }
}

/// The `[log]` section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// Values given on the command line; `None` leaves the layer below in force.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub tiers: Option<Vec<String>>,
    pub bind: Option<SocketAddr>,
    pub upstream: Option<String>,
    pub app: Option<String>,
    pub chdir: Option<PathBuf>,
    pub virtualenv: Option<PathBuf>,
    pub workers: Option<usize>,
    pub admin: Option<SocketAddr>,
}

impl Overrides {
    fn figment(&self) -> Figment {
        let mut figment = Figment::new();
        let mut set = |key: &str, value: figment::value::Value| {
            figment = std::mem::take(&mut figment).merge(Serialized::default(key, value));
        };
        if let Some(tiers) = &self.tiers {
            set("tiers", tiers.clone().into());
        }
        if let Some(bind) = self.bind {
            set("lb.bind", bind.to_string().into());
        }
        if let Some(upstream) = &self.upstream {
            set("accelerator.upstream", upstream.clone().into());
        }
        if let Some(app) = &self.app {
            set("app.module", app.clone().into());
        }
        if let Some(chdir) = &self.chdir {
            set("app.chdir", chdir.display().to_string().into());
        }
        if let Some(venv) = &self.virtualenv {
            set("app.virtualenv", venv.display().to_string().into());
        }
        if let Some(workers) = self.workers {
            set("app.workers", workers.into());
        }
        if let Some(admin) = self.admin {
            set("admin.bind", admin.to_string().into());
        }
        figment
    }
}

/// Loads and validates the configuration. `file` must exist when given; without it
/// `./strata.toml` is read if present.
pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, String> {
    let file = match file {
        Some(path) if !path.is_file() => {
            return Err(format!("{}: no such configuration file", path.display()))
        }
        Some(path) => Some(path.to_path_buf()),
        None => Some(PathBuf::from("strata.toml")).filter(|p| p.is_file()),
    };
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    if let Some(file) = &file {
        figment = figment.merge(Toml::file_exact(file));
    }
    figment = figment
        .merge(Env::prefixed("STRATA_").split("__"))
        .merge(overrides.figment());
    let origin = file
        .as_ref()
        .map(|f| format!(" (from {} and overrides)", f.display()))
        .unwrap_or_default();
    let mut config = extract(&figment, &origin)?;
    // Relative paths are relative to where strata was started; make them absolute once.
    for dir in [&mut config.app.chdir, &mut config.app.virtualenv]
        .into_iter()
        .flatten()
    {
        if let Ok(absolute) = std::path::absolute(&*dir) {
            *dir = absolute;
        }
    }
    Ok(config)
}

/// The configuration `figment` holds, validated; errors name the key at fault.
fn extract(figment: &Figment, origin: &str) -> Result<Config, String> {
    let config: Config = figment.extract().map_err(|error| {
        error
            .into_iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    config.validate().map_err(|e| format!("{e}{origin}"))?;
    Ok(config)
}

/// A configuration file's text, as `strata check` reads it: the fuzz target's entry point.
/// Whatever the text, the answer is a configuration or an error, never a panic.
#[cfg(fuzzing)]
pub fn fuzz_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let figment = Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text));
    let _ = extract(&figment, "");
}

impl Config {
    /// Whether this node runs an HTTP tier (and so listens on `lb.bind`).
    pub fn runs_http(&self) -> bool {
        self.tiers
            .iter()
            .any(|t| matches!(t.as_str(), "lb" | "accelerator" | "app"))
    }

    /// Checks what serde cannot, naming the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        for tier in &self.tiers {
            if !TIERS.contains(&tier.as_str()) {
                return Err(format!(
                    "tiers: unknown tier {tier:?} (known: {})",
                    TIERS.join(", ")
                ));
            }
            if !AVAILABLE.contains(&tier.as_str()) {
                return Err(format!(
                    "tiers: the {tier} tier is not available in this build yet"
                ));
            }
        }
        let has = |tier: &str| self.tiers.iter().any(|t| t == tier);
        let fronts_upstream = has("accelerator") && self.accelerator.upstream.is_some();
        let balances = has("lb") && self.lb.default_backend.is_some();
        if self.runs_http() && !(has("app") || fronts_upstream || balances) {
            return Err(
                "tiers: without the app tier, run the accelerator with accelerator.upstream set, or the lb with lb.default_backend"
                    .into(),
            );
        }
        self.lb.validate()?;
        self.accelerator.validate()?;
        self.cluster.validate()?;
        self.cache.validate()?;
        if has("dbpool") {
            // Its login settings only make sense where it runs.
            self.dbpool.validate()?;
        }
        self.app.validate()?;
        if !strata_core::logging::valid_level(&self.log.level) {
            return Err(format!(
                "log.level = {:?}: expected error, warn, info, debug or trace",
                self.log.level
            ));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(format!(
                "log.format = {:?}: expected text or json",
                self.log.format
            ));
        }
        if !self.admin.bind.ip().is_loopback() && self.admin.token.is_none() {
            return Err(format!(
                "admin.bind = {}: a non-loopback admin listener needs admin.token",
                self.admin.bind
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn flags_override_defaults() {
        let overrides = Overrides {
            workers: Some(5),
            app: Some("site.wsgi:app".into()),
            ..Overrides::default()
        };
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(overrides.figment())
            .extract()
            .unwrap();
        assert_eq!(config.app.workers, 5);
        assert_eq!(config.app.module, "site.wsgi:app");
        assert_eq!(config.lb, LbConfig::default());
    }

    #[test]
    fn a_node_without_the_app_tier_needs_an_upstream() {
        let mut config = Config {
            tiers: vec!["accelerator".into()],
            ..Config::default()
        };
        assert!(config
            .validate()
            .unwrap_err()
            .contains("accelerator.upstream"));
        config.accelerator.upstream = Some("http://127.0.0.1:8080".into());
        config.validate().unwrap();
    }

    #[test]
    fn unknown_tier_is_named() {
        let config = Config {
            tiers: vec!["app".into(), "varnish".into()],
            ..Config::default()
        };
        assert!(config.validate().unwrap_err().contains("\"varnish\""));
    }
}
