//! The `[accelerator]` section.

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The `[accelerator]` section of `strata.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AcceleratorConfig {
    /// Origin to fetch from when this node does not run the app tier
    /// (`http://host:port` or `https://host:port`); ignored when it does.
    pub upstream: Option<String>,
    /// For an `https://` upstream: the CAs that sign its certificate, and this side's
    /// certificate if it requires one (`[accelerator.upstream_tls]`).
    pub upstream_tls: strata_core::tls::ClientTls,
    /// Memory for stored responses (keys, headers and bodies), in bytes.
    pub capacity_bytes: u64,
    /// Responses larger than this stream through without being stored.
    pub max_object_bytes: u64,
    /// Freshness given to cacheable responses that state none (0: none; RFC behaviour).
    #[serde(with = "strata_core::duration")]
    pub default_ttl: Duration,
    /// How long past its freshness a response may be served while one background refresh
    /// runs, when the response does not say (`stale-while-revalidate` overrides it).
    #[serde(with = "strata_core::duration")]
    pub grace: Duration,
    /// How long past its freshness a response may be served when the origin fails, when the
    /// response does not say (`stale-if-error` overrides it).
    #[serde(with = "strata_core::duration")]
    pub stale_if_error: Duration,
    /// How long an expired response with a validator (`ETag`, `Last-Modified`) is kept to
    /// revalidate it with a conditional request instead of fetching it whole.
    #[serde(with = "strata_core::duration")]
    pub keep: Duration,
    /// How long a soft-purged response is still served (stale, while one background refresh
    /// replaces it) when its own grace is shorter.
    #[serde(with = "strata_core::duration")]
    pub soft_purge_grace: Duration,
    /// How long an uncacheable answer is remembered, so that later requests for the URL go
    /// to the origin in parallel instead of waiting for each other.
    #[serde(with = "strata_core::duration")]
    pub hit_for_miss: Duration,
    /// Query parameters left out of the cache key; a trailing `*` matches a prefix.
    pub ignore_query: Vec<String>,
    /// Sort query parameters in the cache key, so `?a=1&b=2` and `?b=2&a=1` share an entry.
    pub sort_query: bool,
    /// Cookies that make a request personal: it bypasses the cache.
    pub pass_cookies: Vec<String>,
    /// Cookies a response that says `Vary: Cookie` is keyed on. Every other cookie is ignored
    /// when looking up and storing.
    pub key_cookies: Vec<String>,
    /// Remove ignored cookies from the request sent to the origin.
    pub strip_ignored_cookies: bool,
    /// Addresses allowed to send `PURGE` (exact IPs or CIDR networks).
    pub purge_from: Vec<String>,
}

impl Default for AcceleratorConfig {
    fn default() -> Self {
        Self {
            upstream: None,
            upstream_tls: strata_core::tls::ClientTls::default(),
            capacity_bytes: 256 * 1024 * 1024,
            max_object_bytes: 8 * 1024 * 1024,
            default_ttl: Duration::ZERO,
            grace: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            keep: Duration::from_secs(3600),
            soft_purge_grace: Duration::from_secs(60),
            hit_for_miss: Duration::from_secs(120),
            ignore_query: ["utm_*", "fbclid", "gclid", "mc_cid", "mc_eid"]
                .map(String::from)
                .to_vec(),
            sort_query: true,
            pass_cookies: vec!["sessionid".into()],
            key_cookies: vec!["csrftoken".into()],
            strip_ignored_cookies: false,
            purge_from: vec!["127.0.0.0/8".into(), "::1/128".into()],
        }
    }
}

/// A network from `purge_from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: prefix length must be 0..={max}"))?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl AcceleratorConfig {
    /// Checks values serde cannot, naming the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        for net in &self.purge_from {
            Network::parse(net).map_err(|e| format!("accelerator.purge_from: {e}"))?;
        }
        if let Some(upstream) = &self.upstream {
            let uri: http::Uri = upstream
                .parse()
                .map_err(|_| format!("accelerator.upstream = {upstream:?}: not a URL"))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
                return Err(format!(
                    "accelerator.upstream = {upstream:?}: expected http://host:port or https://host:port"
                ));
            }
        }
        self.upstream_tls.validate("accelerator.upstream_tls")?;
        if self.max_object_bytes > self.capacity_bytes {
            return Err(format!(
                "accelerator.max_object_bytes = {}: larger than capacity_bytes = {}",
                self.max_object_bytes, self.capacity_bytes
            ));
        }
        if self.max_object_bytes > u64::from(u32::MAX) {
            return Err("accelerator.max_object_bytes: must be below 4 GiB".into());
        }
        Ok(())
    }

    /// The parsed `purge_from` networks (valid after [`validate`](Self::validate)).
    pub fn purge_networks(&self) -> Vec<Network> {
        self.purge_from
            .iter()
            .filter_map(|n| Network::parse(n).ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        AcceleratorConfig::default().validate().unwrap();
    }

    #[test]
    fn networks_match_by_prefix() {
        let net = Network::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        let host = Network::parse("::1").unwrap();
        assert!(host.contains("::1".parse().unwrap()));
        let loopback = Network::parse("127.0.0.0/8").unwrap();
        assert!(loopback.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(Network::parse("10.0.0.0/33").is_err());
        assert!(Network::parse("example.com").is_err());
    }

    #[test]
    fn upstream_must_be_http() {
        let config = AcceleratorConfig {
            upstream: Some("ftp://x".into()),
            ..AcceleratorConfig::default()
        };
        assert!(config
            .validate()
            .unwrap_err()
            .contains("accelerator.upstream"));
    }
}
