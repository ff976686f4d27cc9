//! Reload, both sides. In the node, [`Reloader`] re-reads the configuration the node was
//! started from, hands the app server its new `[app]` section with the request for a new
//! generation, and names the settings that only a restart applies. On the command line,
//! [`request`] is `strata reload`: a plain HTTP/1.1 exchange with the admin listener.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;

use strata_appserver::AppServer;

use crate::config::Config;

/// Loads the configuration again, from the same file, environment and flags.
pub type LoadConfig = Arc<dyn Fn() -> Result<Config, String> + Send + Sync>;

/// A reload that succeeded.
#[derive(Debug, serde::Serialize)]
pub struct Reloaded {
    /// The generation every worker now runs.
    pub generation: u32,
    /// Changed settings that take effect only on restart.
    pub restart_needed: Vec<String>,
}

/// What SIGHUP and `POST /reload` call.
pub struct Reloader {
    app: Option<Arc<AppServer>>,
    started_with: Config,
    load: LoadConfig,
}

impl Reloader {
    pub fn new(app: Option<Arc<AppServer>>, started_with: Config, load: LoadConfig) -> Self {
        Self {
            app,
            started_with,
            load,
        }
    }

    /// Reloads the application's code and its `[app]` settings. An invalid configuration
    /// changes nothing, like a failed import.
    pub async fn reload(&self) -> Result<Reloaded, String> {
        let Some(app) = &self.app else {
            return Err("this node does not run the app tier: nothing to reload".into());
        };
        let config = (self.load)().map_err(|e| format!("invalid configuration: {e}"))?;
        let restart_needed = restart_needed(&self.started_with, &config);
        let generation = app.reload(Some(config.app)).await?;
        Ok(Reloaded {
            generation,
            restart_needed,
        })
    }
}

/// The keys outside `[app]` whose value differs: they need a restart.
fn restart_needed(running: &Config, new: &Config) -> Vec<String> {
    let (Ok(serde_json::Value::Object(running)), Ok(serde_json::Value::Object(new))) =
        (serde_json::to_value(running), serde_json::to_value(new))
    else {
        return Vec::new();
    };
    let mut changed = Vec::new();
    for (section, value) in &new {
        if section == "app" || running.get(section) == Some(value) {
            continue;
        }
        match (running.get(section), value) {
            (Some(serde_json::Value::Object(old)), serde_json::Value::Object(fresh)) => {
                for (key, v) in fresh {
                    if old.get(key) != Some(v) {
                        changed.push(format!("{section}.{key}"));
                    }
                }
            }
            _ => changed.push(section.clone()),
        }
    }
    changed
}

/// Sends `POST /reload` and waits for the answer (which comes once the rollout is done).
pub fn request(admin: SocketAddr, token: Option<&str>) -> std::io::Result<ExitCode> {
    let mut stream = TcpStream::connect(admin)?;
    let authorization = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "POST /reload HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\n{authorization}Connection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.split(' ').nth(1).unwrap_or("");
    let body = body.trim();
    let parsed: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    if status == "200" {
        println!(
            "reloaded: generation {} serves every request",
            parsed["generation"]
        );
        let restart: Vec<&str> = parsed["restart_needed"]
            .as_array()
            .map(|keys| keys.iter().filter_map(|k| k.as_str()).collect())
            .unwrap_or_default();
        if !restart.is_empty() {
            println!(
                "changed settings that need a restart: {}",
                restart.join(", ")
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    match parsed["error"].as_str() {
        Some(error) => eprintln!("reload failed; the running generation keeps serving:\n{error}"),
        None => eprintln!("reload failed: HTTP {status}: {body}"),
    }
    Ok(ExitCode::from(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_changed_keys_outside_app() {
        let running = Config::default();
        let mut new = Config::default();
        new.app.workers = 7;
        new.lb.max_headers = 50;
        new.log.level = "debug".into();
        new.tiers = vec!["app".into()];
        let mut keys = restart_needed(&running, &new);
        keys.sort();
        assert_eq!(keys, ["lb.max_headers", "log.level", "tiers"]);
        assert!(restart_needed(&running, &Config::default()).is_empty());
    }
}
