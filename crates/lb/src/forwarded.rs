//! Who the client is, told to the servers behind: `X-Forwarded-For` and `X-Forwarded-Proto`,
//! believed only from `lb.trusted_networks` (a balancer in front of this one) and otherwise
//! replaced with what this listener saw.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue};

static FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// An address range: `10.0.0.0/8`, `::1`, `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    bits: u8,
}

impl Network {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, bits) = match text.split_once('/') {
            Some((addr, bits)) => (addr, Some(bits)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| "not an IP address".to_string())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            Some(bits) => bits
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("prefix length must be 0 to {max}"))?,
            None => max,
        };
        Ok(Self { addr, bits })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.bits),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.bits),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let whole = usize::from(bits / 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    let rest = bits % 8;
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        a[whole] & mask == b[whole] & mask
    }
}

/// The trusted networks of a listener.
#[derive(Debug, Clone, Default)]
pub struct Trusted(Vec<Network>);

impl Trusted {
    /// Networks already checked by `LbConfig::validate`; any that fail to parse are skipped.
    pub fn new(networks: &[String]) -> Self {
        Self(
            networks
                .iter()
                .filter_map(|n| Network::parse(n).ok())
                .collect(),
        )
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(ip))
    }
}

/// What one connection tells the servers behind about its client: made once per connection.
#[derive(Debug, Clone)]
pub struct Forwarder {
    peer: IpAddr,
    peer_value: Option<HeaderValue>,
    proto: &'static str,
    trusted: bool,
}

impl Forwarder {
    /// For a connection from `peer` on a `secure` (or plain) listener; `trusted` when the
    /// peer is in `trusted_networks`.
    pub fn new(peer: IpAddr, secure: bool, trusted: bool) -> Self {
        Self {
            peer,
            peer_value: HeaderValue::from_str(&peer.to_string()).ok(),
            proto: if secure { "https" } else { "http" },
            trusted,
        }
    }

    /// Sets the forwarded headers of one request.
    pub fn apply(&self, headers: &mut HeaderMap) {
        // Room for both fields at once: one growth of the map, not two.
        headers.reserve(2);
        let earlier = self
            .trusted
            .then(|| headers.get(&FORWARDED_FOR))
            .flatten()
            .and_then(|v| v.to_str().ok());
        let value = match earlier {
            Some(earlier) => HeaderValue::from_str(&format!("{earlier}, {}", self.peer)).ok(),
            None => self.peer_value.clone(),
        };
        if let Some(value) = value {
            headers.insert(FORWARDED_FOR.clone(), value);
        }
        if !(self.trusted && headers.contains_key(&FORWARDED_PROTO)) {
            headers.insert(
                FORWARDED_PROTO.clone(),
                HeaderValue::from_static(self.proto),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn networks_contain_their_addresses() {
        let net = Network::parse("10.1.0.0/16").unwrap();
        assert!(net.contains(ip("10.1.200.3")));
        assert!(!net.contains(ip("10.2.0.1")));
        assert!(Network::parse("10.1.2.3").unwrap().contains(ip("10.1.2.3")));
        assert!(!Network::parse("10.1.2.3").unwrap().contains(ip("10.1.2.4")));
        assert!(Network::parse("192.168.0.0/23")
            .unwrap()
            .contains(ip("192.168.1.9")));
        assert!(!Network::parse("192.168.0.0/23")
            .unwrap()
            .contains(ip("192.168.2.9")));
        assert!(Network::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Network::parse("fd00::/8").unwrap().contains(ip("fd12::1")));
        assert!(Network::parse("127.0.0.1")
            .unwrap()
            .contains(ip("::ffff:127.0.0.1")));
        for bad in ["10.0.0.0/33", "nope", "::/129", "1.2.3.4/x"] {
            assert!(Network::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_headers_are_believed_only_from_trusted_peers() {
        let mut headers = HeaderMap::new();
        headers.insert(FORWARDED_FOR.clone(), HeaderValue::from_static("1.2.3.4"));
        headers.insert(FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
        let mut untrusted = headers.clone();
        Forwarder::new(ip("9.9.9.9"), false, false).apply(&mut untrusted);
        assert_eq!(untrusted[&FORWARDED_FOR], "9.9.9.9");
        assert_eq!(untrusted[&FORWARDED_PROTO], "http");
        Forwarder::new(ip("10.0.0.1"), false, true).apply(&mut headers);
        assert_eq!(headers[&FORWARDED_FOR], "1.2.3.4, 10.0.0.1");
        assert_eq!(headers[&FORWARDED_PROTO], "https");
    }
}
