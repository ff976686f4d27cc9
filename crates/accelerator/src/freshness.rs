//! Time arithmetic of RFC 9111 §4.2: freshness lifetime, age, and HTTP dates.

use std::time::{Duration, SystemTime};

use http::header::{HeaderName, AGE, DATE, EXPIRES};
use http::HeaderMap;

use crate::directives::Directives;

/// Parses an HTTP date (IMF-fixdate and the two obsolete formats).
pub fn parse_date(headers: &HeaderMap, name: &HeaderName) -> Option<SystemTime> {
    let value = headers.get(name)?.to_str().ok()?;
    httpdate::parse_http_date(value.trim()).ok()
}

/// Formats `time` as an IMF-fixdate.
#[cfg(test)]
pub fn format_date(time: SystemTime) -> String {
    httpdate::fmt_http_date(time)
}

/// The `Age` a response arrived with (RFC 9111 §5.1): of a list (one line with commas, or
/// several lines) the first member counts; a value that is not a non-negative integer
/// (`abc`, `-5`, `1.5`, `60;p=1`) is ignored, as the section says, rather than read as "too
/// old". Values past the largest delta-seconds are that (§1.2.2).
pub fn age_value(headers: &HeaderMap) -> Duration {
    let Some(first) = headers.get(AGE) else {
        return Duration::ZERO;
    };
    let text = first.to_str().unwrap_or("");
    let member = text.split(',').next().unwrap_or("").trim();
    if member.is_empty() || !member.bytes().all(|b| b.is_ascii_digit()) {
        return Duration::ZERO;
    }
    Duration::from_secs(member.parse::<u64>().unwrap_or(DELTA_MAX).min(DELTA_MAX))
}

/// RFC 9111 §1.2.2's largest delta-seconds.
const DELTA_MAX: u64 = 2_147_483_648;

/// When and how a stored response was obtained: what §4.2.3 needs to compute its age.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// When the request that produced the response was sent.
    pub request_time: SystemTime,
    /// When the response head arrived.
    pub response_time: SystemTime,
    /// The response's `Date`, or `response_time` without one.
    pub date: SystemTime,
    /// The response's `Age`.
    pub age: Duration,
}

impl Timing {
    pub fn new(headers: &HeaderMap, request_time: SystemTime, response_time: SystemTime) -> Self {
        Self {
            request_time,
            response_time,
            date: parse_date(headers, &DATE).unwrap_or(response_time),
            age: age_value(headers),
        }
    }

    /// The age at the moment the response was received (§4.2.3's corrected_initial_age).
    pub fn initial_age(&self) -> Duration {
        let apparent = self
            .response_time
            .duration_since(self.date)
            .unwrap_or_default();
        let delay = self
            .response_time
            .duration_since(self.request_time)
            .unwrap_or_default();
        apparent.max(self.age + delay)
    }

    /// The current age (§4.2.3).
    pub fn current_age(&self, now: SystemTime) -> Duration {
        self.initial_age() + now.duration_since(self.response_time).unwrap_or_default()
    }
}

/// The freshness lifetime a shared cache gives a response (§4.2.1), or `None` when the
/// response states none. `directives` are the ones that apply to this cache (the targeted
/// field when present).
pub fn lifetime(directives: &Directives, headers: &HeaderMap, timing: &Timing) -> Option<Duration> {
    if let Some(s) = directives.s_maxage {
        return Some(s.duration());
    }
    if let Some(m) = directives.max_age {
        return Some(m.duration());
    }
    if headers.contains_key(EXPIRES) {
        // An invalid Expires (such as "0") means already expired (§5.3).
        return Some(match parse_date(headers, &EXPIRES) {
            Some(expires) => expires.duration_since(timing.date).unwrap_or_default(),
            None => Duration::ZERO,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::headers;
    use http::header::CACHE_CONTROL;

    #[test]
    fn s_maxage_beats_max_age_beats_expires() {
        let now = SystemTime::now();
        let h = headers(&[
            ("cache-control", "max-age=10, s-maxage=20"),
            ("expires", &format_date(now + Duration::from_secs(100))),
            ("date", &format_date(now)),
        ]);
        let t = Timing::new(&h, now, now);
        let d = Directives::parse(&h, &CACHE_CONTROL);
        assert_eq!(lifetime(&d, &h, &t), Some(Duration::from_secs(20)));
        let h2 = headers(&[
            ("expires", &format_date(now + Duration::from_secs(100))),
            ("date", &format_date(now)),
        ]);
        let d2 = Directives::parse(&h2, &CACHE_CONTROL);
        assert_eq!(lifetime(&d2, &h2, &t), Some(Duration::from_secs(100)));
    }

    #[test]
    fn invalid_expires_is_expired_and_none_is_none() {
        let now = SystemTime::now();
        let h = headers(&[("expires", "0")]);
        let t = Timing::new(&h, now, now);
        assert_eq!(
            lifetime(&Directives::default(), &h, &t),
            Some(Duration::ZERO)
        );
        assert_eq!(
            lifetime(&Directives::default(), &HeaderMap::new(), &t),
            None
        );
    }

    #[test]
    fn age_adds_delay_apparent_age_and_residence() {
        let sent = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let received = sent + Duration::from_secs(2);
        let h = headers(&[("age", "30"), ("date", &format_date(received))]);
        let t = Timing::new(&h, sent, received);
        assert_eq!(t.initial_age(), Duration::from_secs(32));
        assert_eq!(
            t.current_age(received + Duration::from_secs(5)),
            Duration::from_secs(37)
        );
        // A Date far in the past makes the apparent age win.
        let old = headers(&[("date", &format_date(sent - Duration::from_secs(100)))]);
        assert_eq!(
            Timing::new(&old, sent, received).initial_age(),
            Duration::from_secs(102)
        );
    }

    #[test]
    fn age_is_the_first_member_and_an_invalid_one_is_ignored() {
        let age = |lines: &[&str]| {
            let pairs: Vec<_> = lines.iter().map(|l| ("age", *l)).collect();
            age_value(&headers(&pairs)).as_secs()
        };
        assert_eq!(age(&[" 60 "]), 60);
        assert_eq!(age(&["0,7200"]), 0);
        assert_eq!(age(&["7200, 0"]), 7200);
        assert_eq!(age(&["7200", "0"]), 7200);
        assert_eq!(age(&["3600, 3600"]), 3600);
        assert_eq!(age(&["99999999999999999999"]), DELTA_MAX);
        for bad in ["-5", "1.5", "7200.0", "abc", "", "7200;foo=1"] {
            assert_eq!(age(&[bad]), 0, "{bad}");
        }
    }
}
