//! The CGI variables of a WSGI environ, computed in the master from the request head.
//!
//! The worker turns each value into a native string (latin-1, as PEP 3333 says) and adds the
//! `wsgi.*` entries; everything that depends on HTTP parsing happens here, in Rust.

use std::net::IpAddr;

use http::request::Parts;
use http::{header, HeaderName};
use strata_core::ConnInfo;

use crate::proto::{self, Encoder};

/// CGI variables, already in the request frame's wire format (one buffer for all of them).
#[derive(Debug, Default)]
pub struct CgiVars {
    enc: Encoder,
    count: u32,
}

impl CgiVars {
    /// No variables yet, with room for about `bytes` of them. They are written straight
    /// into a request frame ([`CgiVars::into_frame`]).
    pub fn with_capacity(bytes: usize) -> Self {
        let mut enc = Encoder::with_capacity(proto::REQUEST_PREFIX + bytes);
        proto::begin_request(&mut enc);
        Self { enc, count: 0 }
    }

    /// The request frame: these variables and the start of the body.
    pub fn into_frame(mut self, body_complete: bool, body: &[u8]) -> Encoder {
        proto::finish_request(&mut self.enc, body_complete, self.count, body);
        self.enc
    }

    /// Appends one variable; callers never add a name twice.
    pub fn push(&mut self, key: &[u8], value: &[u8]) {
        self.enc.short(key).long(value);
        self.count += 1;
    }

    /// The value of `key`, if set.
    #[cfg(test)]
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(k, _)| *k == key.as_bytes())
            .map(|(_, v)| v)
    }

    /// The variables, decoded.
    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let mut dec = crate::proto::Decoder::new(self.encoded());
        (0..self.count).map_while(move |_| Some((dec.short().ok()?, dec.long().ok()?)))
    }

    /// The encoded variables.
    #[cfg(test)]
    fn encoded(&self) -> &[u8] {
        &self.enc.bytes()[proto::REQUEST_PREFIX..]
    }
}

/// Builds the CGI variables for `parts`, mounted at `script_name`.
pub fn build(parts: &Parts, info: Option<&ConnInfo>, script_name: &str) -> CgiVars {
    let mut vars = CgiVars::with_capacity(estimate(parts));
    vars.push(b"REQUEST_METHOD", parts.method.as_str().as_bytes());
    let path = percent_decode(parts.uri.path().as_bytes());
    let path_info = match path.strip_prefix(script_name.as_bytes()) {
        Some(rest) if !script_name.is_empty() && (rest.is_empty() || rest[0] == b'/') => rest,
        _ => &path[..],
    };
    vars.push(b"SCRIPT_NAME", script_name.as_bytes());
    vars.push(b"PATH_INFO", path_info);
    vars.push(b"QUERY_STRING", parts.uri.query().unwrap_or("").as_bytes());
    let protocol: &[u8] = match parts.version {
        http::Version::HTTP_10 => b"HTTP/1.0",
        http::Version::HTTP_2 => b"HTTP/2",
        _ => b"HTTP/1.1",
    };
    vars.push(b"SERVER_PROTOCOL", protocol);
    let host = parts.uri.authority().map(|a| a.as_str()).or_else(|| {
        parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    });
    let local_ip;
    // `[::1]:8000`, `example.com:8000`, `example.com`.
    let (name, port) = match host.map(|h| (h, h.rfind(':'))) {
        Some((host, Some(i))) if !host[i..].contains(']') => {
            (&host.as_bytes()[..i], Some(&host[i + 1..]))
        }
        Some((host, _)) => (host.as_bytes(), None),
        None => match info {
            Some(info) => {
                local_ip = Ascii::ip(info.local.ip());
                (local_ip.bytes(), None)
            }
            None => (&b"localhost"[..], None),
        },
    };
    vars.push(b"SERVER_NAME", name);
    match (port, info) {
        (Some(port), _) => vars.push(b"SERVER_PORT", port.as_bytes()),
        (None, Some(info)) => vars.push(b"SERVER_PORT", Ascii::number(info.local.port()).bytes()),
        (None, None) => vars.push(b"SERVER_PORT", b"80"),
    }
    if let Some(info) = info {
        vars.push(b"REMOTE_ADDR", Ascii::ip(info.remote.ip()).bytes());
        vars.push(b"REMOTE_PORT", Ascii::number(info.remote.port()).bytes());
    }
    let secure = info.is_some_and(|i| i.secure);
    vars.push(b"wsgi.url_scheme", if secure { b"https" } else { b"http" });
    let mut key = Vec::with_capacity(64);
    for name in parts.headers.keys() {
        let key: &[u8] = match *name {
            header::CONTENT_TYPE => b"CONTENT_TYPE",
            header::CONTENT_LENGTH => b"CONTENT_LENGTH",
            // Names with `_` would collide with their `-` spelling once converted; they are
            // dropped rather than merged (a spoofing vector otherwise).
            _ if name.as_str().contains('_') => continue,
            _ => {
                http_key(name, &mut key);
                &key
            }
        };
        let mut values = parts.headers.get_all(name).iter().map(|v| v.as_bytes());
        let first = values.next().unwrap_or_default();
        match values.next() {
            None => vars.push(key, first),
            Some(second) => {
                let separator: &[u8] = if *name == header::COOKIE {
                    b"; "
                } else {
                    b", "
                };
                let mut joined = [first, separator, second].concat();
                for value in values {
                    joined.extend_from_slice(separator);
                    joined.extend_from_slice(value);
                }
                vars.push(key, &joined);
            }
        }
    }
    vars
}

/// Bytes enough for the variables of `parts` in most requests: each header as a key and a
/// value with their prefixes, plus the fixed variables.
fn estimate(parts: &Parts) -> usize {
    let headers: usize = parts
        .headers
        .iter()
        .map(|(name, value)| 2 * name.as_str().len() + value.len() + 16)
        .sum();
    256 + 2 * parts.uri.path().len() + parts.uri.query().map_or(0, str::len) + headers
}

/// Writes `HTTP_USER_AGENT` for `user-agent` into `key`.
fn http_key(name: &HeaderName, key: &mut Vec<u8>) {
    key.clear();
    key.extend_from_slice(b"HTTP_");
    key.extend(name.as_str().bytes().map(|b| {
        if b == b'-' {
            b'_'
        } else {
            b.to_ascii_uppercase()
        }
    }));
}

/// An address or a port written out on the stack, without the formatting machinery (the
/// per-request path of the master).
struct Ascii {
    buf: [u8; 46],
    len: usize,
}

impl Ascii {
    fn new() -> Self {
        Self {
            buf: [0; 46],
            len: 0,
        }
    }

    fn number(n: u16) -> Self {
        let mut text = Self::new();
        text.decimal(n);
        text
    }

    fn ip(ip: IpAddr) -> Self {
        let mut text = Self::new();
        match ip {
            IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        text.push(b'.');
                    }
                    text.decimal(octet.into());
                }
            }
            IpAddr::V6(v6) => {
                use std::io::Write;
                let mut rest = &mut text.buf[..];
                // At most 45 characters: it always fits.
                let _ = write!(rest, "{v6}");
                text.len = 46 - rest.len();
            }
        }
        text
    }

    fn push(&mut self, byte: u8) {
        self.buf[self.len] = byte;
        self.len += 1;
    }

    fn decimal(&mut self, n: u16) {
        let mut digits = [0u8; 5];
        let mut at = digits.len();
        let mut n = n;
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for &digit in &digits[at..] {
            self.push(digit);
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Percent-decodes a path; invalid escapes are kept as they are.
fn percent_decode(input: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if !input.contains(&b'%') {
        return std::borrow::Cow::Borrowed(input);
    }
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' && i + 2 < input.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(input[i + 1]), hex(input[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(input[i]);
        i += 1;
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn vars_for(request: http::Request<()>, script_name: &str) -> CgiVars {
        let info = ConnInfo {
            remote: "10.0.0.7:5555".parse::<SocketAddr>().unwrap(),
            local: "127.0.0.1:8000".parse::<SocketAddr>().unwrap(),
            secure: false,
        };
        let (parts, ()) = request.into_parts();
        build(&parts, Some(&info), script_name)
    }

    #[test]
    fn the_frame_built_in_place_decodes_to_the_variables_and_body() {
        let request = http::Request::post("/form?a=1")
            .header("Host", "example.com")
            .body(())
            .unwrap();
        let vars = vars_for(request, "");
        let expected: Vec<(Vec<u8>, Vec<u8>)> =
            vars.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        let enc = vars.into_frame(true, b"x=1");
        let bytes = enc.bytes();
        let (kind, len) = proto::parse_header(bytes[..5].try_into().unwrap()).unwrap();
        assert_eq!((kind, len), (proto::kind::REQUEST, bytes.len() - 5));
        let frame = proto::decode_request(&bytes[5..]).unwrap();
        assert!(frame.body_complete);
        assert_eq!(frame.body, b"x=1");
        let decoded: Vec<(Vec<u8>, Vec<u8>)> = frame
            .vars
            .iter()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect();
        assert_eq!(decoded, expected);
        assert!(decoded
            .iter()
            .any(|(k, v)| k == b"HTTP_HOST" && v == b"example.com"));
    }

    #[test]
    fn decodes_path_and_splits_script_name() {
        let request = http::Request::get("/app/caf%C3%A9%2Fx?q=%20")
            .body(())
            .unwrap();
        let vars = vars_for(request, "/app");
        assert_eq!(vars.get("SCRIPT_NAME"), Some(&b"/app"[..]));
        assert_eq!(vars.get("PATH_INFO"), Some(&b"/caf\xc3\xa9/x"[..]));
        assert_eq!(vars.get("QUERY_STRING"), Some(&b"q=%20"[..]));
        let other = vars_for(http::Request::get("/application").body(()).unwrap(), "/app");
        assert_eq!(other.get("PATH_INFO"), Some(&b"/application"[..]));
    }

    #[test]
    fn headers_become_http_keys_and_underscores_are_dropped() {
        let request = http::Request::post("/")
            .header("Host", "example.com:8080")
            .header("X-Forwarded-For", "1.1.1.1")
            .header("X_Forwarded_For", "6.6.6.6")
            .header("Accept", "a")
            .header("Accept", "b")
            .header("Cookie", "a=1")
            .header("Cookie", "b=2")
            .header("Content-Type", "text/plain")
            .header("Content-Length", "3")
            .body(())
            .unwrap();
        let vars = vars_for(request, "");
        assert_eq!(vars.get("HTTP_X_FORWARDED_FOR"), Some(&b"1.1.1.1"[..]));
        assert_eq!(vars.get("HTTP_ACCEPT"), Some(&b"a, b"[..]));
        assert_eq!(vars.get("HTTP_COOKIE"), Some(&b"a=1; b=2"[..]));
        assert_eq!(vars.get("CONTENT_TYPE"), Some(&b"text/plain"[..]));
        assert_eq!(vars.get("CONTENT_LENGTH"), Some(&b"3"[..]));
        assert_eq!(vars.get("HTTP_CONTENT_TYPE"), None);
        assert_eq!(vars.get("SERVER_NAME"), Some(&b"example.com"[..]));
        assert_eq!(vars.get("SERVER_PORT"), Some(&b"8080"[..]));
        assert_eq!(vars.get("REMOTE_ADDR"), Some(&b"10.0.0.7"[..]));
        assert_eq!(
            vars.iter()
                .filter(|(k, _)| k.starts_with(b"HTTP_X"))
                .count(),
            1
        );
    }

    #[test]
    fn ipv6_host_and_missing_host() {
        let request = http::Request::get("/")
            .header("Host", "[::1]")
            .body(())
            .unwrap();
        let vars = vars_for(request, "");
        assert_eq!(vars.get("SERVER_NAME"), Some(&b"[::1]"[..]));
        assert_eq!(vars.get("SERVER_PORT"), Some(&b"8000"[..]));
        let bare = vars_for(http::Request::get("/").body(()).unwrap(), "");
        assert_eq!(bare.get("SERVER_NAME"), Some(&b"127.0.0.1"[..]));
    }

    #[test]
    fn addresses_and_ports_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "10.0.0.7",
            "255.255.255.255",
            "::1",
            "2001:db8::8a2e:370:7334",
            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(Ascii::ip(ip).bytes(), ip.to_string().as_bytes());
        }
        for port in [0, 9, 10, 80, 8000, 65535] {
            assert_eq!(Ascii::number(port).bytes(), port.to_string().as_bytes());
        }
    }

    #[test]
    fn bad_escapes_are_kept() {
        assert_eq!(&*percent_decode(b"/a%zz%4"), b"/a%zz%4");
        assert_eq!(&*percent_decode(b"%41%"), b"A%");
    }
}
