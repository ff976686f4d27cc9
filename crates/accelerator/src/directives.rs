//! Cache-Control directives (RFC 9111 §5.2), parsed once per message.
//!
//! Parsing is lenient where the RFC asks recipients to be (quoted values, odd spacing,
//! repeated fields) and strict where a wrong guess would serve stale or private content: an
//! unparseable `max-age` or `s-maxage` makes the response stale rather than fresh for ever.

use std::time::Duration;

use http::header::HeaderName;
use http::HeaderMap;

/// RFC 9111 §1.2.2: delta-seconds larger than this are taken as this.
const DELTA_MAX: u64 = 2_147_483_648;

/// A parsed `max-age`-style value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delta {
    Seconds(u64),
    /// Present but not a number: treated as zero seconds (stale at once).
    Invalid,
}

impl Delta {
    fn parse(value: Option<&str>) -> Self {
        match value {
            Some(v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
                Delta::Seconds(v.parse::<u64>().unwrap_or(DELTA_MAX).min(DELTA_MAX))
            }
            _ => Delta::Invalid,
        }
    }

    /// The value as a duration; an invalid value counts as zero.
    pub fn duration(self) -> Duration {
        match self {
            Delta::Seconds(s) => Duration::from_secs(s),
            Delta::Invalid => Duration::ZERO,
        }
    }
}

/// The directives of one `Cache-Control`-like field (all its lines together).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directives {
    pub max_age: Option<Delta>,
    pub s_maxage: Option<Delta>,
    pub no_store: bool,
    /// `no-cache`, with or without a field list (a list is treated as the whole response).
    pub no_cache: bool,
    /// `private`, with or without a field list.
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub stale_while_revalidate: Option<Delta>,
    pub stale_if_error: Option<Delta>,
    pub immutable: bool,
    pub must_understand: bool,
    /// Request only.
    pub only_if_cached: bool,
    /// Any directive at all was present.
    pub present: bool,
}

impl Directives {
    /// Parses every line of `name` in `headers`.
    pub fn parse(headers: &HeaderMap, name: &HeaderName) -> Self {
        let mut out = Directives::default();
        for value in headers.get_all(name) {
            // Non-UTF-8 bytes cannot belong to a directive name; skip the line.
            let Ok(text) = value.to_str() else { continue };
            for (key, arg) in split(text) {
                out.present = true;
                out.apply(&key, arg.as_deref());
            }
        }
        out
    }

    fn apply(&mut self, key: &str, arg: Option<&str>) {
        // First occurrence wins for valued directives (RFC 9111 §4.2.1).
        match key {
            "max-age" => {
                self.max_age.get_or_insert(Delta::parse(arg));
            }
            "s-maxage" => {
                self.s_maxage.get_or_insert(Delta::parse(arg));
            }
            "stale-while-revalidate" => {
                self.stale_while_revalidate.get_or_insert(Delta::parse(arg));
            }
            "stale-if-error" => {
                self.stale_if_error.get_or_insert(Delta::parse(arg));
            }
            "no-store" => self.no_store = true,
            "no-cache" => self.no_cache = true,
            "private" => self.private = true,
            "public" => self.public = true,
            "must-revalidate" => self.must_revalidate = true,
            "proxy-revalidate" => self.proxy_revalidate = true,
            "immutable" => self.immutable = true,
            "must-understand" => self.must_understand = true,
            "only-if-cached" => self.only_if_cached = true,
            _ => {}
        }
    }
}

/// Splits a field value into lower-cased directive names with their unquoted arguments,
/// honouring quoted strings (a comma inside quotes does not end a directive).
fn split(text: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        // Name up to '=' or ','.
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && bytes[i] != b',' {
            i += 1;
        }
        let name = text[start..i].trim().to_ascii_lowercase();
        let mut arg = None;
        if i < bytes.len() && bytes[i] == b'=' {
            i += 1;
            while i < bytes.len() && bytes[i] == b' ' {
                i += 1;
            }
            if i < bytes.len() && bytes[i] == b'"' {
                i += 1;
                let mut value = String::new();
                while i < bytes.len() && bytes[i] != b'"' {
                    if bytes[i] == b'\\' && i + 1 < bytes.len() {
                        i += 1;
                    }
                    value.push(bytes[i] as char);
                    i += 1;
                }
                i += 1; // closing quote
                while i < bytes.len() && bytes[i] != b',' {
                    i += 1;
                }
                arg = Some(value);
            } else {
                let vstart = i;
                while i < bytes.len() && bytes[i] != b',' {
                    i += 1;
                }
                arg = Some(text[vstart..i].trim().to_owned());
            }
        }
        i += 1; // the comma
        if !name.is_empty() {
            out.push((name, arg));
        }
    }
    out
}

/// The members of a comma-separated list field (`Vary`, `Connection`, tag lists), trimmed and
/// lower-cased, empty members dropped.
pub fn list(headers: &HeaderMap, name: &HeaderName) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|m| m.trim().to_ascii_lowercase())
        .filter(|m| !m.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::CACHE_CONTROL;
    use http::HeaderValue;

    fn parse(lines: &[&str]) -> Directives {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append(CACHE_CONTROL, HeaderValue::from_str(line).unwrap());
        }
        Directives::parse(&headers, &CACHE_CONTROL)
    }

    #[test]
    fn values_quoted_or_not_and_case_insensitive_names() {
        let d = parse(&["Max-Age=60, s-maxage=\"30\", PUBLIC"]);
        assert_eq!(d.max_age, Some(Delta::Seconds(60)));
        assert_eq!(d.s_maxage, Some(Delta::Seconds(30)));
        assert!(d.public);
    }

    #[test]
    fn first_occurrence_wins_across_lines() {
        let d = parse(&["max-age=10", "max-age=3600"]);
        assert_eq!(d.max_age, Some(Delta::Seconds(10)));
    }

    #[test]
    fn invalid_numbers_are_stale_and_huge_ones_are_capped() {
        assert_eq!(parse(&["max-age=10a"]).max_age, Some(Delta::Invalid));
        assert_eq!(
            parse(&["max-age=-1"]).max_age.unwrap().duration(),
            Duration::ZERO
        );
        assert_eq!(
            parse(&["max-age=99999999999999999999999"]).max_age,
            Some(Delta::Seconds(DELTA_MAX))
        );
    }

    #[test]
    fn field_lists_and_commas_in_quotes() {
        let d = parse(&["private=\"set-cookie, foo\", no-cache=\"bar\", max-age=5"]);
        assert!(d.private && d.no_cache);
        assert_eq!(d.max_age, Some(Delta::Seconds(5)));
    }

    #[test]
    fn lists_are_split_trimmed_and_lowered() {
        let mut headers = HeaderMap::new();
        headers.append(
            http::header::VARY,
            HeaderValue::from_static("Accept, , Cookie"),
        );
        headers.append(http::header::VARY, HeaderValue::from_static("X-Foo"));
        assert_eq!(
            list(&headers, &http::header::VARY),
            ["accept", "cookie", "x-foo"]
        );
    }
}
