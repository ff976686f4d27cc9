//! The PROXY protocol (versions 1 and 2), for a listener behind another balancer that speaks
//! it (`lb.proxy_protocol`): the header in front of the connection's first byte names the
//! client, which then stands for the peer everywhere (`REMOTE_ADDR`, `X-Forwarded-For`). A
//! connection without a valid header is refused; a `LOCAL` or `UNKNOWN` header keeps the
//! peer's own address (health checks of the balancer in front).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest version 1 header, CRLF included.
const V1_MAX: usize = 107;
/// Longest version 2 header accepted (addresses and TLVs).
const V2_MAX: usize = 16 + 512;

/// Why a connection's header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    #[error("no PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header")]
    Malformed,
    #[error("the PROXY protocol header did not arrive in time")]
    Timeout,
    #[error("the connection closed before its PROXY protocol header ended")]
    Closed,
}

/// What a complete header says: its length and the client it names (`None`: keep the peer).
type Parsed = (usize, Option<SocketAddr>);

/// Parses a header at the start of `bytes`; `Ok(None)` when more bytes are needed.
pub fn parse(bytes: &[u8]) -> Result<Option<Parsed>, ProxyError> {
    if bytes.len() >= 12 && bytes[..12] == V2_SIGNATURE[..] {
        return parse_v2(bytes);
    }
    let v1 = b"PROXY ";
    let prefix = bytes.len().min(v1.len());
    if bytes[..prefix] != v1[..prefix] {
        // Could it still become the version 2 signature?
        let v2 = bytes.len().min(12);
        return if bytes[..v2] == V2_SIGNATURE[..v2] {
            Ok(None)
        } else {
            Err(ProxyError::Missing)
        };
    }
    // The line is at most 107 bytes with its CRLF, whether or not more bytes came with it
    // (a longer line accepted when it arrived whole was refused when it came in pieces).
    let window = &bytes[..bytes.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if bytes.len() >= V1_MAX {
            Err(ProxyError::Malformed)
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&bytes[..end]).map_err(|_| ProxyError::Malformed)?;
    let fields: Vec<&str> = line.split(' ').collect();
    let client = match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => None,
        ["PROXY", family @ ("TCP4" | "TCP6"), source, _, port, _] => {
            let ip: IpAddr = source.parse().map_err(|_| ProxyError::Malformed)?;
            if ip.is_ipv4() != (*family == "TCP4") {
                return Err(ProxyError::Malformed);
            }
            let port: u16 = port.parse().map_err(|_| ProxyError::Malformed)?;
            Some(SocketAddr::new(ip, port))
        }
        _ => return Err(ProxyError::Malformed),
    };
    Ok(Some((end + 2, client)))
}

fn parse_v2(bytes: &[u8]) -> Result<Option<Parsed>, ProxyError> {
    if bytes.len() < 16 {
        return Ok(None);
    }
    let (version, command) = (bytes[12] >> 4, bytes[12] & 0x0f);
    if version != 2 || command > 1 {
        return Err(ProxyError::Malformed);
    }
    let len = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    if 16 + len > V2_MAX {
        return Err(ProxyError::Malformed);
    }
    if bytes.len() < 16 + len {
        return Ok(None);
    }
    let body = &bytes[16..16 + len];
    // LOCAL (command 0): the balancer's own connection; keep its address.
    if command == 0 {
        return Ok(Some((16 + len, None)));
    }
    let client = match bytes[13] >> 4 {
        1 if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([body[8], body[9]]),
            ))
        }
        2 if body.len() >= 36 => {
            let octets: [u8; 16] = body[..16].try_into().map_err(|_| ProxyError::Malformed)?;
            let port = u16::from_be_bytes([body[32], body[33]]);
            Some(SocketAddr::new(Ipv6Addr::from(octets).into(), port))
        }
        1 | 2 => return Err(ProxyError::Malformed),
        // AF_UNSPEC or AF_UNIX: nothing to stand for the peer.
        _ => None,
    };
    Ok(Some((16 + len, client)))
}

/// Reads the header off `stream` (nothing after it), within `timeout`.
pub async fn read(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<Option<SocketAddr>, ProxyError> {
    let work = async {
        let mut buf = vec![0u8; V2_MAX];
        loop {
            let seen = stream
                .peek(&mut buf)
                .await
                .map_err(|_| ProxyError::Closed)?;
            if seen == 0 {
                return Err(ProxyError::Closed);
            }
            if let Some((len, client)) = parse(&buf[..seen])? {
                stream
                    .read_exact(&mut buf[..len])
                    .await
                    .map_err(|_| ProxyError::Closed)?;
                return Ok(client);
            }
            if seen == buf.len() {
                return Err(ProxyError::Malformed);
            }
            // Part of a header: the socket stays readable while it is unread, so wait a moment
            // and look again.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(ProxyError::Timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family << 4 | 1);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn version_1_headers() {
        let header = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\nGET / HTTP/1.1\r\n";
        let (len, client) = parse(header).unwrap().unwrap();
        assert_eq!(&header[len..len + 3], b"GET");
        assert_eq!(client, Some("203.0.113.7:51000".parse().unwrap()));
        let six = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 80\r\n";
        assert_eq!(
            parse(six).unwrap().unwrap().1,
            Some("[2001:db8::1]:4000".parse().unwrap())
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap(), Some((15, None)));
        // Longer than 107 bytes is refused however it arrives (found by fuzzing: whole, it
        // was accepted; in pieces, refused).
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(130, b'x');
        long.extend_from_slice(b"\r\n");
        assert_eq!(parse(&long), Err(ProxyError::Malformed));
        assert_eq!(parse(&long[..110]), Err(ProxyError::Malformed));
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4"), Ok(None));
        assert_eq!(parse(b"PRO"), Ok(None));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyError::Missing));
        assert_eq!(
            parse(b"PROXY TCP4 ::1 ::1 1 2\r\n"),
            Err(ProxyError::Malformed)
        );
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 x 2\r\n"),
            Err(ProxyError::Malformed)
        );
        assert_eq!(
            parse(&[b'P', b'R', b'O', b'X', b'Y', b' ', b'A'].repeat(20)),
            Err(ProxyError::Malformed)
        );
    }

    #[test]
    fn version_2_headers() {
        let mut body = vec![198, 51, 100, 9, 10, 0, 0, 1];
        body.extend_from_slice(&4321u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        let header = v2(1, 1, &body);
        assert_eq!(
            parse(&header).unwrap(),
            Some((header.len(), Some("198.51.100.9:4321".parse().unwrap())))
        );
        assert_eq!(parse(&header[..14]), Ok(None));
        assert_eq!(parse(&header[..20]), Ok(None));
        let local = v2(0, 0, &[]);
        assert_eq!(parse(&local).unwrap(), Some((16, None)));
        assert_eq!(parse(&v2(1, 1, &[1, 2, 3])), Err(ProxyError::Malformed));
        let mut bad_version = header.clone();
        bad_version[12] = 0x11;
        assert_eq!(parse(&bad_version), Err(ProxyError::Malformed));
    }
}
