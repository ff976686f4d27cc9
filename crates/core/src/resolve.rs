//! Host names as sets of addresses: what a backend pool, the cluster's peers and the cache
//! nodes follow when they are given a name. An address is its own set, without a lookup.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, SocketAddr};

/// `host` (a name, or an address with or without brackets) and `port`, split out of
/// `host:port`; `None` without a port.
pub fn split(text: &str) -> Option<(&str, u16)> {
    let (host, port) = text.rsplit_once(':')?;
    Some((host.trim_matches(['[', ']']), port.parse().ok()?))
}

fn literal(host: &str, port: u16) -> Option<BTreeSet<SocketAddr>> {
    let ip = host.trim_matches(['[', ']']).parse::<IpAddr>().ok()?;
    Some(BTreeSet::from([SocketAddr::new(ip, port)]))
}

/// Every address `host` resolves to, on `port`.
pub async fn addresses(host: &str, port: u16) -> io::Result<BTreeSet<SocketAddr>> {
    if let Some(one) = literal(host, port) {
        return Ok(one);
    }
    Ok(tokio::net::lookup_host((host, port)).await?.collect())
}

/// [`addresses`], blocking: for start-up, before anything is served.
pub fn addresses_now(host: &str, port: u16) -> io::Result<BTreeSet<SocketAddr>> {
    if let Some(one) = literal(host, port) {
        return Ok(one);
    }
    Ok(std::net::ToSocketAddrs::to_socket_addrs(&(host, port))?.collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_need_no_lookup_and_ports_are_split_off() {
        assert_eq!(split("app.svc:8000"), Some(("app.svc", 8000)));
        assert_eq!(split("[fd00::3]:11211"), Some(("fd00::3", 11211)));
        assert_eq!(split("app.svc"), None);
        let one = addresses_now("[fd00::3]", 80).expect("no lookup");
        assert_eq!(
            one.into_iter().collect::<Vec<_>>(),
            ["[fd00::3]:80".parse().unwrap()]
        );
    }
}
