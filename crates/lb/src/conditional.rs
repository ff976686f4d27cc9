//! Conditional and range requests for files (RFC 9110 §13 and §14), as pure functions of the
//! request headers and the file's validators, so the rules are tested apart from any I/O.

use std::time::SystemTime;

use http::{header, HeaderMap};

/// What a file offers to compare against.
#[derive(Debug, Clone)]
pub struct Validators {
    /// A strong entity tag, quotes included.
    pub etag: String,
    pub modified: SystemTime,
}

/// What the preconditions decide.
#[derive(Debug, PartialEq, Eq)]
pub enum Precondition {
    /// Serve the file (perhaps a range of it).
    Proceed,
    /// `304 Not Modified`.
    NotModified,
    /// `412 Precondition Failed`.
    Failed,
}

/// Whether an `If-Match`/`If-None-Match` list names `etag` (`*` names anything). Weak
/// comparison when `weak` (the `W/` prefix is ignored), as `If-None-Match` asks.
fn list_matches(value: &str, etag: &str, weak: bool) -> bool {
    value.split(',').map(str::trim).any(|tag| {
        if tag == "*" {
            return true;
        }
        match tag.strip_prefix("W/") {
            Some(tag) => weak && tag == etag,
            None => tag == etag,
        }
    })
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn date(headers: &HeaderMap, name: header::HeaderName) -> Option<SystemTime> {
    header_str(headers, name).and_then(|v| httpdate::parse_http_date(v).ok())
}

/// Whole seconds, as HTTP dates carry them.
fn seconds(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Evaluates the preconditions of a GET or HEAD in RFC 9110 §13.2.2's order: `If-Match`, else
/// `If-Unmodified-Since`; then `If-None-Match`, else `If-Modified-Since`.
pub fn evaluate(headers: &HeaderMap, file: &Validators) -> Precondition {
    if let Some(value) = header_str(headers, header::IF_MATCH) {
        if !list_matches(value, &file.etag, false) {
            return Precondition::Failed;
        }
    } else if let Some(since) = date(headers, header::IF_UNMODIFIED_SINCE) {
        if seconds(file.modified) > seconds(since) {
            return Precondition::Failed;
        }
    }
    if let Some(value) = header_str(headers, header::IF_NONE_MATCH) {
        if list_matches(value, &file.etag, true) {
            return Precondition::NotModified;
        }
    } else if let Some(since) = date(headers, header::IF_MODIFIED_SINCE) {
        if seconds(file.modified) <= seconds(since) {
            return Precondition::NotModified;
        }
    }
    Precondition::Proceed
}

/// What a `Range` header asks of a file of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Ranged {
    /// No range, an `If-Range` that no longer holds, or a form not served as ranges (several
    /// ranges, another unit): the whole file.
    Whole,
    /// Bytes `start..end` (end exclusive).
    Part { start: u64, end: u64 },
    /// `416 Range Not Satisfiable`.
    Unsatisfiable,
}

/// Reads `Range` (one `bytes` range) against a file of `len` bytes, honouring `If-Range`.
pub fn range(headers: &HeaderMap, file: &Validators, len: u64) -> Ranged {
    let Some(value) = header_str(headers, header::RANGE) else {
        return Ranged::Whole;
    };
    if let Some(condition) = header_str(headers, header::IF_RANGE) {
        let holds = if condition.starts_with('"') {
            condition == file.etag
        } else {
            httpdate::parse_http_date(condition)
                .is_ok_and(|date| seconds(date) == seconds(file.modified))
        };
        if !holds {
            return Ranged::Whole;
        }
    }
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ranged::Whole;
    };
    if spec.contains(',') {
        return Ranged::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Ranged::Whole;
    };
    let (first, last) = (first.trim(), last.trim());
    let number = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    if first.is_empty() {
        // `-N`: the last N bytes.
        return match number(last) {
            Some(0) => Ranged::Unsatisfiable,
            Some(_) if len == 0 => Ranged::Unsatisfiable,
            Some(suffix) => Ranged::Part {
                start: len.saturating_sub(suffix),
                end: len,
            },
            None => Ranged::Whole,
        };
    }
    let Some(start) = number(first) else {
        return Ranged::Whole;
    };
    let last = if last.is_empty() {
        None
    } else {
        match number(last) {
            Some(last) if last >= start => Some(last),
            // Malformed, or ending before it starts: not a range at all.
            _ => return Ranged::Whole,
        }
    };
    if start >= len {
        return Ranged::Unsatisfiable;
    }
    let end = last.map_or(len, |last| last.saturating_add(1).min(len));
    Ranged::Part { start, end }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn file() -> Validators {
        Validators {
            etag: "\"abc\"".into(),
            modified: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(
                header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn preconditions_follow_rfc_9110_order() {
        let f = file();
        let date = httpdate::fmt_http_date(f.modified);
        let earlier = httpdate::fmt_http_date(f.modified - Duration::from_secs(10));
        let cases = [
            (vec![], Precondition::Proceed),
            (
                vec![("if-none-match", "\"abc\"")],
                Precondition::NotModified,
            ),
            (
                vec![("if-none-match", "W/\"abc\"")],
                Precondition::NotModified,
            ),
            (
                vec![("if-none-match", "\"x\", \"abc\"")],
                Precondition::NotModified,
            ),
            (vec![("if-none-match", "*")], Precondition::NotModified),
            (vec![("if-none-match", "\"x\"")], Precondition::Proceed),
            (
                vec![("if-modified-since", date.as_str())],
                Precondition::NotModified,
            ),
            (
                vec![("if-modified-since", earlier.as_str())],
                Precondition::Proceed,
            ),
            // If-None-Match wins over If-Modified-Since.
            (
                vec![
                    ("if-none-match", "\"x\""),
                    ("if-modified-since", date.as_str()),
                ],
                Precondition::Proceed,
            ),
            (vec![("if-match", "\"x\"")], Precondition::Failed),
            (vec![("if-match", "W/\"abc\"")], Precondition::Failed),
            (vec![("if-match", "\"abc\"")], Precondition::Proceed),
            (
                vec![("if-unmodified-since", earlier.as_str())],
                Precondition::Failed,
            ),
            (
                vec![("if-unmodified-since", date.as_str())],
                Precondition::Proceed,
            ),
        ];
        for (pairs, expected) in cases {
            assert_eq!(evaluate(&headers(&pairs), &f), expected, "{pairs:?}");
        }
    }

    #[test]
    fn single_byte_ranges_and_their_edges() {
        let f = file();
        let part = |start, end| Ranged::Part { start, end };
        let cases = [
            ("bytes=0-9", part(0, 10)),
            ("bytes=5-", part(5, 100)),
            ("bytes=-10", part(90, 100)),
            ("bytes=-500", part(0, 100)),
            ("bytes=90-500", part(90, 100)),
            ("bytes=100-", Ranged::Unsatisfiable),
            ("bytes=-0", Ranged::Unsatisfiable),
            ("bytes=9-5", Ranged::Whole),
            ("bytes=0-1,5-6", Ranged::Whole),
            ("items=0-1", Ranged::Whole),
            ("bytes=a-b", Ranged::Whole),
            ("bytes=1-2x", Ranged::Whole),
        ];
        for (value, expected) in cases {
            assert_eq!(
                range(&headers(&[("range", value)]), &f, 100),
                expected,
                "{value}"
            );
        }
        assert_eq!(range(&headers(&[]), &f, 100), Ranged::Whole);
    }

    #[test]
    fn if_range_serves_the_range_only_while_the_file_is_unchanged() {
        let f = file();
        let date = httpdate::fmt_http_date(f.modified);
        let with = |condition: &str| {
            range(
                &headers(&[("range", "bytes=0-0"), ("if-range", condition)]),
                &f,
                10,
            )
        };
        assert_eq!(with("\"abc\""), Ranged::Part { start: 0, end: 1 });
        assert_eq!(with("\"old\""), Ranged::Whole);
        assert_eq!(with(&date), Ranged::Part { start: 0, end: 1 });
        assert_eq!(with("Mon, 01 Jan 2001 00:00:00 GMT"), Ranged::Whole);
    }
}
