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
    /// The listeners sit behind a balancer that speaks the PROXY protocol (v1 or v2): every
    /// connection must start with its header, whose client address stands for the peer.
    pub proxy_protocol: bool,
    /// Most client connections open at once per listener; more wait in the kernel's queue.
    pub max_connections: usize,
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
    /// Longest pause while a client sends a request body; then the body ends in an error.
    #[serde(with = "strata_core::duration")]
    pub body_read_timeout: Duration,
    /// Whether client connections are kept alive between requests.
    pub keepalive: bool,
    /// On shutdown, how long open keep-alive connections are kept while their responses say
    /// `Connection: close`, before idle ones are shut (shutting them at once races requests
    /// clients are already sending on them).
    #[serde(with = "strata_core::duration")]
    pub drain_linger: Duration,
    /// On SIGTERM, how long the node keeps accepting while `/readyz` says it is stopping, so
    /// that balancers in front take it out first (HAProxy's `grace`, a Kubernetes `preStop`
    /// sleep); 0 stops accepting at once.
    #[serde(with = "strata_core::duration")]
    pub shutdown_delay: Duration,
    /// Routes, tried in order; a request none claims goes to `default_backend`, or to the
    /// next tier of this node.
    pub routes: Vec<RouteConfig>,
    /// Backend pools routes can name.
    pub backends: Vec<BackendConfig>,
    /// The pool requests no route claims go to; the next tier of this node when absent.
    pub default_backend: Option<String>,
    /// Networks (CIDR, or single addresses) whose `X-Forwarded-For`/`-Proto` are believed
    /// and which may ask for one backend by name (`X-Strata-Backend`); others' forwarded
    /// headers are replaced, and their backend requests refused unless they carry the admin
    /// token (`X-Strata-Token`).
    pub trusted_networks: Vec<String>,
}

/// One `[[lb.backends]]` pool.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    pub name: String,
    /// `p2c` (power of two choices on peak-EWMA latency × load, the default),
    /// `least-requests`, `round-robin` or `weighted` (random in proportion to weights).
    pub balance: String,
    pub servers: Vec<ServerConfig>,
    /// A new or recovered server's share ramps from 10 % to its full weight over this long.
    #[serde(with = "strata_core::duration")]
    pub slow_start: Duration,
    /// Requests waiting for a server under its `max_conn`, at most; more get 503 at once.
    pub max_queue: usize,
    /// Longest a request waits for a server; then 503.
    #[serde(with = "strata_core::duration")]
    pub queue_timeout: Duration,
    /// How long a server has to send its response head; then 504.
    #[serde(with = "strata_core::duration")]
    pub timeout: Duration,
    /// How often the host names of `servers` are looked up again (members follow DNS).
    #[serde(with = "strata_core::duration")]
    pub resolve_interval: Duration,
    /// How long a new connection to a server may take; then the request counts as not sent
    /// (retried on another server, within `retries`) and the server as failing.
    #[serde(with = "strata_core::duration")]
    pub connect_timeout: Duration,
    /// Active checks: `GET health_path` on remote servers (2xx/3xx passes); the local tier
    /// answers from its supervisor instead, without a request.
    pub health_path: String,
    /// Checks go to this port of each server instead of its URL's (HAProxy's `check port`):
    /// another Strata node's admin listener, whose `/readyz` goes not-ready as it stops.
    pub health_port: Option<u16>,
    #[serde(with = "strata_core::duration")]
    pub health_interval: Duration,
    #[serde(with = "strata_core::duration")]
    pub health_timeout: Duration,
    /// Consecutive passed checks that bring a server back, failed ones that take it out.
    pub rise: u32,
    pub fall: u32,
    /// Passive checks: this many failures in a row (no connection, 502/503/504, timeouts)
    /// eject a server for `ejection_time`.
    pub eject_after: u32,
    #[serde(with = "strata_core::duration")]
    pub ejection_time: Duration,
    /// Never eject more than this share of the servers.
    pub max_ejection: f64,
    /// Below this share of healthy servers the pool is in panic: it sends traffic to all of
    /// them rather than overload the few (or shut the site down).
    pub panic_threshold: f64,
    /// Times an idempotent request that could not reach a server is sent to another; within
    /// a budget of 20 % of requests in flight (at least 3).
    pub retries: u32,
    /// For `https://` servers: the CAs that sign their certificates, and this side's
    /// certificate if they require one (`[lb.backends.tls]`).
    pub tls: strata_core::tls::ClientTls,
}

/// One server of a pool.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Its name in `X-Strata-Backend`, `/status` and metrics.
    pub name: String,
    /// `http://host:port` (another Strata node or any HTTP server), or `local`: this node's
    /// next tier.
    pub url: String,
    #[serde(default = "one")]
    pub weight: u32,
    /// Most requests it is sent at once (HAProxy's `maxconn`); unlimited when absent.
    #[serde(default)]
    pub max_conn: Option<usize>,
    /// When the URL names a host: one member per address it resolves to, looked up again
    /// every `resolve_interval` (true, the default), or one member that connects to the
    /// name (false).
    #[serde(default = "yes")]
    pub resolve: bool,
}

fn yes() -> bool {
    true
}

fn one() -> u32 {
    1
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            balance: "p2c".into(),
            servers: Vec::new(),
            slow_start: Duration::from_secs(30),
            max_queue: 1024,
            queue_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(60),
            connect_timeout: strata_core::client::CONNECT_TIMEOUT,
            resolve_interval: Duration::from_secs(5),
            health_path: "/".into(),
            health_port: None,
            health_interval: Duration::from_secs(2),
            health_timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            eject_after: 5,
            ejection_time: Duration::from_secs(30),
            max_ejection: 0.5,
            panic_threshold: 0.5,
            retries: 1,
            tls: strata_core::tls::ClientTls::default(),
        }
    }
}

impl BackendConfig {
    fn validate(&self, index: usize) -> Result<(), String> {
        let at = format!("lb.backends[{index}]");
        if self.name.is_empty() {
            return Err(format!("{at}.name: every backend pool needs a name"));
        }
        if !matches!(
            self.balance.as_str(),
            "p2c" | "least-requests" | "round-robin" | "weighted"
        ) {
            return Err(format!(
                "{at}.balance = {:?}: expected \"p2c\", \"least-requests\", \"round-robin\" or \"weighted\"",
                self.balance
            ));
        }
        if self.servers.is_empty() {
            return Err(format!("{at}.servers: a pool needs at least one server"));
        }
        for (i, server) in self.servers.iter().enumerate() {
            let web = server.url.starts_with("http://") || server.url.starts_with("https://");
            if server.url != "local" && !web {
                return Err(format!(
                    "{at}.servers[{i}].url = {:?}: expected http://host:port, https://host:port or \"local\"",
                    server.url
                ));
            }
            if server.weight == 0 {
                return Err(format!("{at}.servers[{i}].weight = 0: must be at least 1"));
            }
        }
        for (key, share) in [
            ("max_ejection", self.max_ejection),
            ("panic_threshold", self.panic_threshold),
        ] {
            if !(0.0..=1.0).contains(&share) {
                return Err(format!(
                    "{at}.{key} = {share}: expected a share from 0 to 1"
                ));
            }
        }
        self.tls.validate(&format!("{at}.tls"))?;
        if self.resolve_interval.is_zero() {
            return Err(format!("{at}.resolve_interval = 0s: must be more than 0"));
        }
        if self.rise == 0 || self.fall == 0 || self.eject_after == 0 {
            return Err(format!(
                "{at}: rise, fall and eject_after must be at least 1"
            ));
        }
        Ok(())
    }
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
    /// Send to this backend pool (a `[[lb.backends]]` name) rather than the next tier.
    #[serde(default)]
    pub backend: Option<String>,
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
            proxy_protocol: false,
            max_connections: 10_000,
            tls_bind: None,
            tls_cert_file: None,
            tls_key_file: None,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_body_bytes: 100 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(60),
            keepalive: true,
            drain_linger: Duration::from_secs(1),
            shutdown_delay: Duration::ZERO,
            routes: Vec::new(),
            backends: Vec::new(),
            default_backend: None,
            trusted_networks: Vec::new(),
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
        if self.max_connections == 0 {
            return Err("lb.max_connections = 0: must be at least 1".into());
        }
        if self.tls_bind.is_some() && (self.tls_cert_file.is_none() || self.tls_key_file.is_none())
        {
            return Err("lb.tls_bind needs lb.tls_cert_file and lb.tls_key_file".into());
        }
        for (index, backend) in self.backends.iter().enumerate() {
            backend.validate(index)?;
        }
        let known = |name: &str| self.backends.iter().any(|b| b.name == name);
        if let Some(name) = self.default_backend.as_deref().filter(|n| !known(n)) {
            return Err(format!(
                "lb.default_backend = {name:?}: no such lb.backends name"
            ));
        }
        for network in &self.trusted_networks {
            crate::forwarded::Network::parse(network)
                .map_err(|e| format!("lb.trusted_networks: {network:?}: {e}"))?;
        }
        for (index, route) in self.routes.iter().enumerate() {
            if !route.path_prefix.starts_with('/') {
                return Err(format!(
                    "lb.routes[{index}].path_prefix = {:?}: must start with /",
                    route.path_prefix
                ));
            }
            if route.static_dir.is_some() && route.backend.is_some() {
                return Err(format!(
                    "lb.routes[{index}]: static_dir and backend do not go together"
                ));
            }
            if let Some(name) = route.backend.as_deref().filter(|n| !known(n)) {
                return Err(format!(
                    "lb.routes[{index}].backend = {name:?}: no such lb.backends name"
                ));
            }
        }
        Ok(())
    }
}
