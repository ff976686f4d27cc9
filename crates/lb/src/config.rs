//! Listener configuration: the `[lb]` section.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The `[lb]` section of `strata.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LbConfig {
    /// Address the HTTP listener binds.
    pub bind: SocketAddr,
    /// Also accept HTTP/2 without TLS on `bind` (h2c with prior knowledge, told apart from
    /// HTTP/1.1 by its preface): for a balancer or client in front that speaks it.
    pub h2c: bool,
    /// Address of the HTTPS listener (HTTP/1.1 and HTTP/2 by ALPN); none when absent.
    pub tls_bind: Option<SocketAddr>,
    /// Certificate chain and private key (PEM) of the HTTPS listener; a change to either
    /// file is picked up within seconds, without a restart.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Largest request head (request line and headers) in bytes; larger heads get 431.
    pub max_header_bytes: usize,
    /// Largest number of request headers; more get 431.
    pub max_headers: usize,
    /// Largest request body in bytes; larger bodies get 413.
    pub max_body_bytes: u64,
    /// Time a client has to send a complete request head.
    #[serde(with = "strata_core::duration")]
    pub header_read_timeout: Duration,
    /// Whether client connections are kept alive between requests.
    pub keepalive: bool,
    /// On shutdown, how long open keep-alive connections are kept while their responses say
    /// `Connection: close`, before idle ones are shut (shutting them at once races requests
    /// clients are already sending on them).
    #[serde(with = "strata_core::duration")]
    pub drain_linger: Duration,
    /// Routes, tried in order; a request none claims goes to the next tier.
    pub routes: Vec<RouteConfig>,
}

/// One `[[lb.routes]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The host it serves (`www.example.com`, or `*.example.com` for its subdomains); any
    /// host when absent.
    #[serde(default)]
    pub host: Option<String>,
    /// Requests whose path starts with this.
    #[serde(default = "root_prefix")]
    pub path_prefix: String,
    /// Serve files from this directory (Django's `STATIC_ROOT`) rather than the next tier.
    #[serde(default)]
    pub static_dir: Option<PathBuf>,
    /// Cache lifetime of static files whose names carry no content hash (hashed names get
    /// a year, `immutable`).
    #[serde(default = "static_max_age", with = "strata_core::duration")]
    pub max_age: Duration,
}

fn root_prefix() -> String {
    "/".into()
}

fn static_max_age() -> Duration {
    Duration::from_secs(60)
}

impl Default for LbConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8000)),
            h2c: false,
            tls_bind: None,
            tls_cert_file: None,
            tls_key_file: None,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_body_bytes: 100 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(30),
            keepalive: true,
            drain_linger: Duration::from_secs(1),
            routes: Vec::new(),
        }
    }
}

impl LbConfig {
    /// Checks values serde cannot, naming the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_header_bytes < 8192 {
            return Err(format!(
                "lb.max_header_bytes = {}: must be at least 8192",
                self.max_header_bytes
            ));
        }
        if self.max_headers == 0 {
            return Err("lb.max_headers = 0: must be at least 1".into());
        }
        if self.tls_bind.is_some() && (self.tls_cert_file.is_none() || self.tls_key_file.is_none())
        {
            return Err("lb.tls_bind needs lb.tls_cert_file and lb.tls_key_file".into());
        }
        for (index, route) in self.routes.iter().enumerate() {
            if !route.path_prefix.starts_with('/') {
                return Err(format!(
                    "lb.routes[{index}].path_prefix = {:?}: must start with /",
                    route.path_prefix
                ));
            }
        }
        Ok(())
    }
}
