//! A pool's members: the servers its `[[lb.backends.servers]]` entries name, with DNS names
//! followed.
//!
//! An entry whose URL names an address (or `local`, or that says `resolve = false`) is one
//! member for good. An entry whose URL names a host name stands for every address the name
//! resolves to, as a Kubernetes headless Service lists its ready pods: it is resolved at start
//! and again every `resolve_interval`, and members come and go without a reload. A new member
//! starts in slow start; one that stays keeps its health, latency and counters; one that goes
//! finishes the requests it holds. A lookup that fails keeps the members the name had (a DNS
//! outage must not empty the pool), and is logged.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use strata_core::{HttpService, Readiness, Shutdown};

use crate::config::{BackendConfig, ServerConfig};
use crate::upstream::{Pool, Server};

/// Why a server entry cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("lb.backends[{index}].servers[{server}].url = {url:?}: {reason}")]
pub struct PoolError {
    pub index: usize,
    pub server: usize,
    pub url: String,
    pub reason: String,
}

/// Where an entry's members come from.
enum Source {
    /// This node's next tier.
    Local,
    /// One server at a fixed URL.
    Fixed(http::Uri),
    /// Every address of `host`, on `port`.
    Name { host: String, port: u16 },
}

/// One entry of a pool, parsed.
struct Entry {
    config: ServerConfig,
    source: Source,
    /// `https://`: members are reached over TLS, their certificates valid for `host`.
    secure: bool,
    /// The URL's host (a name or an address, without brackets).
    host: String,
}

impl Entry {
    fn parse(pool: usize, at: usize, config: &ServerConfig) -> Result<Self, PoolError> {
        let error = |reason: String| PoolError {
            index: pool,
            server: at,
            url: config.url.clone(),
            reason,
        };
        if config.url == "local" {
            return Ok(Self {
                config: config.clone(),
                source: Source::Local,
                secure: false,
                host: String::new(),
            });
        }
        let url: http::Uri = config.url.parse().map_err(|e| error(format!("{e}")))?;
        let host = url.host().unwrap_or_default();
        let literal = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok();
        let secure = url.scheme_str() == Some("https");
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let source = if literal || !config.resolve {
            Source::Fixed(url)
        } else {
            Source::Name {
                host: host.to_owned(),
                port: url.port_u16().unwrap_or(if secure { 443 } else { 80 }),
            }
        };
        Ok(Self {
            config: config.clone(),
            source,
            secure,
            host: bare,
        })
    }
}

/// Makes a pool's members and keeps them following DNS.
pub struct Members {
    backend: BackendConfig,
    /// For `https://` entries.
    tls: Option<Arc<strata_core::tls::Connector>>,
    entries: Vec<Entry>,
    local: HttpService,
    readiness: Option<Arc<dyn Readiness>>,
}

impl Members {
    pub fn new(
        pool: usize,
        backend: &BackendConfig,
        local: &HttpService,
        readiness: Option<Arc<dyn Readiness>>,
    ) -> Result<Self, PoolError> {
        let entries: Vec<Entry> = backend
            .servers
            .iter()
            .enumerate()
            .map(|(at, server)| Entry::parse(pool, at, server))
            .collect::<Result<_, _>>()?;
        let tls = match entries.iter().position(|e| e.secure) {
            Some(at) => Some(
                strata_core::tls::Connector::new(&backend.tls, &[b"h2", b"http/1.1"]).map_err(
                    |e| PoolError {
                        index: pool,
                        server: at,
                        url: backend.servers[at].url.clone(),
                        reason: format!("lb.backends[{pool}].tls: {e}"),
                    },
                )?,
            ),
            None => None,
        };
        Ok(Self {
            backend: backend.clone(),
            tls,
            entries,
            local: local.clone(),
            readiness,
        })
    }

    /// The TLS connector of the pool's `https://` servers, to watch for new files.
    pub fn tls(&self) -> Option<Arc<strata_core::tls::Connector>> {
        self.tls.clone()
    }

    /// Whether any entry follows a DNS name.
    pub fn follows_names(&self) -> bool {
        self.entries
            .iter()
            .any(|e| matches!(e.source, Source::Name { .. }))
    }

    /// The members at start: names resolved once, here (a name that does not resolve yet
    /// has no members until it does).
    pub fn initial(&self) -> Vec<Arc<Server>> {
        let mut servers = Vec::new();
        for (at, entry) in self.entries.iter().enumerate() {
            match &entry.source {
                Source::Local => servers.push(self.server(at, None, None)),
                Source::Fixed(url) => servers.push(self.server(at, Some(url.clone()), None)),
                Source::Name { host, port } => {
                    match strata_core::resolve::addresses_now(host, *port) {
                        Ok(addrs) => {
                            servers.extend(addrs.into_iter().map(|a| self.member(at, a)));
                        }
                        Err(error) => tracing::warn!(
                            pool = %self.backend.name, %host, %error,
                            "backend name does not resolve yet: no members until it does"
                        ),
                    }
                }
            }
        }
        servers
    }

    fn server(&self, at: usize, url: Option<http::Uri>, addr: Option<SocketAddr>) -> Arc<Server> {
        let config = &self.entries[at].config;
        let (service, readiness) = match &url {
            None => (self.local.clone(), self.readiness.clone()),
            Some(url) => {
                let entry = &self.entries[at];
                let tls = self
                    .tls
                    .clone()
                    .filter(|_| entry.secure)
                    .map(|connector| (connector, entry.host.clone()));
                (
                    strata_core::client::upstream_tls(
                        url,
                        self.backend.timeout,
                        self.backend.connect_timeout,
                        tls,
                    ),
                    None,
                )
            }
        };
        let name = match addr {
            Some(addr) => format!("{}/{addr}", config.name),
            None => config.name.clone(),
        };
        Arc::new(Server::new(
            name,
            at,
            addr,
            service,
            url,
            readiness,
            config.weight,
            config.max_conn,
        ))
    }

    fn member(&self, at: usize, addr: SocketAddr) -> Arc<Server> {
        let scheme = if self.entries[at].secure {
            "https"
        } else {
            "http"
        };
        let url = format!("{scheme}://{addr}")
            .parse()
            .expect("a socket address is an authority");
        self.server(at, Some(url), Some(addr))
    }

    /// Re-resolves every name each `resolve_interval` and updates `pool` until `shutdown`.
    pub async fn follow(self, pool: Arc<Pool>, shutdown: Shutdown) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.backend.resolve_interval) => {}
                () = shutdown.requested() => return,
            }
            self.refresh(&pool).await;
        }
    }

    /// One round: looks every name up, and replaces the pool's members if any changed.
    async fn refresh(&self, pool: &Pool) {
        let current = pool.servers();
        let mut next: Vec<Arc<Server>> = Vec::with_capacity(current.len());
        let mut changed = false;
        for (at, entry) in self.entries.iter().enumerate() {
            let had = current.iter().filter(|s| s.entry == at);
            let Source::Name { host, port } = &entry.source else {
                next.extend(had.cloned());
                continue;
            };
            let addrs = match strata_core::resolve::addresses(host, *port).await {
                Ok(addrs) => addrs,
                Err(error) => {
                    tracing::warn!(
                        pool = %self.backend.name, %host, %error,
                        "backend name did not resolve: its members are kept"
                    );
                    next.extend(had.cloned());
                    continue;
                }
            };
            for server in had {
                if server.addr.is_some_and(|a| addrs.contains(&a)) {
                    next.push(server.clone());
                } else {
                    tracing::info!(pool = %self.backend.name, server = %server.name, "backend member removed: its name no longer resolves to it");
                    changed = true;
                }
            }
            for addr in addrs {
                if !current
                    .iter()
                    .any(|s| s.entry == at && s.addr == Some(addr))
                {
                    let member = self.member(at, addr);
                    tracing::info!(pool = %self.backend.name, server = %member.name, "backend member added");
                    next.push(member);
                    changed = true;
                }
            }
        }
        if changed {
            pool.set_servers(next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(url: &str, resolve: bool) -> Source {
        let config = ServerConfig {
            name: "a".into(),
            url: url.into(),
            weight: 1,
            max_conn: None,
            resolve,
        };
        Entry::parse(0, 0, &config)
            .map(|e| e.source)
            .expect("parses")
    }

    #[test]
    fn names_are_followed_and_addresses_are_not() {
        assert!(matches!(entry("local", true), Source::Local));
        assert!(matches!(
            entry("http://10.0.0.3:8000", true),
            Source::Fixed(_)
        ));
        assert!(matches!(
            entry("http://[fd00::3]:8000", true),
            Source::Fixed(_)
        ));
        assert!(matches!(
            entry("http://app.svc:8000", false),
            Source::Fixed(_)
        ));
        match entry("http://app.svc:8000", true) {
            Source::Name { host, port } => assert_eq!((host.as_str(), port), ("app.svc", 8000)),
            _ => panic!("a name is followed"),
        }
        match entry("http://app.svc", true) {
            Source::Name { port, .. } => assert_eq!(port, 80),
            _ => panic!("a name is followed"),
        }
    }
}
