//! Entry points of the fuzz targets (`fuzz/`), compiled only under `cfg(fuzzing)`.

use std::time::{Duration, SystemTime};

use http::header::{HeaderName, HeaderValue, AGE, CACHE_CONTROL, DATE, EXPIRES, VARY};
use http::HeaderMap;

use crate::config::AcceleratorConfig;
use crate::directives::{list, Directives};
use crate::freshness::{age_value, lifetime, Timing};
use crate::key::Keyer;
use crate::policy::effective;
use crate::sfv::is_dictionary;

/// The largest delta-seconds (RFC 9111 §1.2.2).
const DELTA_MAX: Duration = Duration::from_secs(2_147_483_648);

/// Response fields a cache reads: the input is split at `\n` into values of `Cache-Control`,
/// `CDN-Cache-Control`, `Surrogate-Control`, `Age`, `Date`, `Expires` and `Vary`, in turn.
pub fn cache_fields(data: &[u8]) {
    let names = [
        CACHE_CONTROL,
        HeaderName::from_static("cdn-cache-control"),
        HeaderName::from_static("surrogate-control"),
        AGE,
        DATE,
        EXPIRES,
        VARY,
    ];
    let mut headers = HeaderMap::new();
    for (i, value) in data.split(|b| *b == b'\n').enumerate() {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append(names[i % names.len()].clone(), value);
        }
    }
    let directives = Directives::parse(&headers, &CACHE_CONTROL);
    for delta in [directives.max_age, directives.s_maxage]
        .into_iter()
        .flatten()
    {
        assert!(delta.duration() <= DELTA_MAX);
    }
    assert!(age_value(&headers) <= DELTA_MAX);
    let (governing, _) = effective(&headers);
    let now = SystemTime::now();
    let timing = Timing::new(&headers, now, now);
    let _ = lifetime(&governing, &headers, &timing);
    let _ = list(&headers, &VARY);
    if let Ok(text) = std::str::from_utf8(data) {
        // A dictionary stays one with spaces around it and when repeated as another line.
        if is_dictionary(text) {
            assert!(is_dictionary(&format!("  {text} ")), "{text:?}");
            assert!(is_dictionary(&format!("{text}, {text}")), "{text:?}");
        }
    }
}

/// The cache key: two requests for different (valid host, path) pairs never share one. The
/// input is `host \0 path \0 host \0 path`.
pub fn cache_key(data: &[u8]) {
    let parts: Vec<&[u8]> = data.split(|b| *b == 0).collect();
    let [h1, p1, h2, p2] = parts[..] else {
        return;
    };
    let keyer = Keyer::new(&AcceleratorConfig::default());
    let key = |host: &[u8], path: &[u8]| -> Option<String> {
        let host = std::str::from_utf8(host).ok()?;
        let path = std::str::from_utf8(path).ok()?;
        let valid = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%:[]".contains(&b);
        if !host.bytes().all(valid) || !path.starts_with('/') || path.contains(['?', '#']) {
            return None;
        }
        Some(keyer.primary_for(&host.to_ascii_lowercase(), path, None))
    };
    if let (Some(k1), Some(k2)) = (key(h1, p1), key(h2, p2)) {
        let same = h1.eq_ignore_ascii_case(h2) && p1 == p2;
        assert_eq!(k1 == k2, same, "{k1:?} / {k2:?}");
    }
}
