//! What identifies a stored response: the primary key (host, path, normalised query) and the
//! request header values its `Vary` names (RFC 9111 §4.1), with Django's cookies in mind.

use http::header::{HeaderName, COOKIE, HOST};
use http::{HeaderMap, HeaderValue, Uri};

use crate::config::AcceleratorConfig;

/// How requests are turned into keys; built once from the configuration.
#[derive(Debug, Clone)]
pub struct Keyer {
    ignore_query: Vec<String>,
    sort_query: bool,
    pass_cookies: Vec<String>,
    key_cookies: Vec<String>,
}

impl Keyer {
    pub fn new(config: &AcceleratorConfig) -> Self {
        Self {
            ignore_query: config.ignore_query.clone(),
            sort_query: config.sort_query,
            pass_cookies: config.pass_cookies.clone(),
            key_cookies: config.key_cookies.clone(),
        }
    }

    /// The primary key of a request for `uri` with these headers: lower-cased host, path,
    /// and the query without ignored parameters (sorted when configured).
    pub fn primary(&self, uri: &Uri, headers: &HeaderMap) -> String {
        let host = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                headers
                    .get(HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default()
            .to_ascii_lowercase();
        self.primary_for(&host, uri.path(), uri.query())
    }

    /// The primary key for a host, a path and a raw query.
    pub fn primary_for(&self, host: &str, path: &str, query: Option<&str>) -> String {
        let mut key = String::with_capacity(host.len() + path.len() + 16);
        key.push_str(host);
        key.push_str(if path.is_empty() { "/" } else { path });
        if let Some(query) = query {
            let mut params: Vec<&str> = query
                .split('&')
                .filter(|p| !p.is_empty() && !self.ignored(p))
                .collect();
            if self.sort_query {
                params.sort_unstable();
            }
            if !params.is_empty() {
                key.push('?');
                key.push_str(&params.join("&"));
            }
        }
        key
    }

    fn ignored(&self, param: &str) -> bool {
        let name = param.split('=').next().unwrap_or(param);
        self.ignore_query
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == pattern,
            })
    }

    /// The first cookie that makes this request personal, if any.
    pub fn pass_cookie(&self, headers: &HeaderMap) -> Option<String> {
        cookies(headers)
            .find(|(name, _)| self.pass_cookies.iter().any(|p| p == name))
            .map(|(name, _)| name.to_owned())
    }

    /// The cookies a `Vary: Cookie` response is keyed on, in a canonical form.
    fn keyed_cookies(&self, headers: &HeaderMap) -> Option<String> {
        let mut kept: Vec<(&str, &str)> = cookies(headers)
            .filter(|(name, _)| self.key_cookies.iter().any(|k| k == name))
            .collect();
        if kept.is_empty() {
            return None;
        }
        kept.sort_unstable();
        Some(
            kept.iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join("; "),
        )
    }

    /// The `Cookie` header without the cookies the cache ignores (`None`: no cookie left).
    pub fn stripped_cookies(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let kept: Vec<String> = cookies(headers)
            .filter(|(name, _)| {
                self.key_cookies
                    .iter()
                    .chain(&self.pass_cookies)
                    .any(|k| k == name)
            })
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        if kept.is_empty() {
            None
        } else {
            HeaderValue::from_str(&kept.join("; ")).ok()
        }
    }

    /// The values of the request headers `names` (a response's `Vary`), normalised, in the
    /// same order: what a later request must present to be served this response.
    pub fn vary_values(&self, names: &[HeaderName], headers: &HeaderMap) -> Vec<Option<String>> {
        names
            .iter()
            .map(|name| {
                if name == COOKIE {
                    self.keyed_cookies(headers)
                } else {
                    normalised(headers, name)
                }
            })
            .collect()
    }
}

/// All lines of a header joined as one list, with spacing around commas removed.
fn normalised(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut lines = headers.get_all(name).iter().peekable();
    lines.peek()?;
    let members: Vec<String> = lines
        .flat_map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .split(',')
                .map(|m| m.trim().to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    Some(members.join(","))
}

/// The `name=value` pairs of every `Cookie` line.
fn cookies(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|line| line.split(';'))
        .filter_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            Some((name.trim(), value.trim()))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::headers;

    fn keyer() -> Keyer {
        Keyer::new(&AcceleratorConfig::default())
    }

    #[test]
    fn primary_key_normalises_host_and_query() {
        let k = keyer();
        let h = headers(&[("host", "Example.COM")]);
        let a = k.primary(&"/p?b=2&utm_source=x&a=1&fbclid=9".parse().unwrap(), &h);
        let b = k.primary(&"/p?a=1&b=2".parse().unwrap(), &h);
        assert_eq!(a, "example.com/p?a=1&b=2");
        assert_eq!(a, b);
        assert_eq!(
            k.primary(&"/p?utm_x=1".parse().unwrap(), &h),
            "example.com/p"
        );
        assert_ne!(
            k.primary(&"/p".parse().unwrap(), &h),
            k.primary(&"/q".parse().unwrap(), &h)
        );
    }

    #[test]
    fn session_cookie_passes_and_others_are_ignored_or_keyed() {
        let k = keyer();
        let h = headers(&[
            ("cookie", "_ga=1; csrftoken=abc"),
            ("cookie", "sessionid=s"),
        ]);
        assert_eq!(k.pass_cookie(&h).as_deref(), Some("sessionid"));
        assert_eq!(
            k.stripped_cookies(&h).unwrap(),
            HeaderValue::from_static("csrftoken=abc; sessionid=s")
        );
        let anon = headers(&[("cookie", "_ga=1; _gid=2")]);
        assert_eq!(k.pass_cookie(&anon), None);
        let names = [COOKIE];
        assert_eq!(k.vary_values(&names, &anon), [None]);
        assert_eq!(
            k.vary_values(&names, &h),
            [Some("csrftoken=abc".to_owned())]
        );
    }

    #[test]
    fn vary_values_join_lines_and_trim() {
        let k = keyer();
        let names = [HeaderName::from_static("accept-language")];
        let a = headers(&[("accept-language", "en, fr"), ("accept-language", "de")]);
        let b = headers(&[("accept-language", "en,fr,de")]);
        assert_eq!(k.vary_values(&names, &a), k.vary_values(&names, &b));
        assert_eq!(k.vary_values(&names, &HeaderMap::new()), [None]);
    }
}
