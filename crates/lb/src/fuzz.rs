//! Entry points of the fuzz targets (`fuzz/`), compiled only under `cfg(fuzzing)`.

use crate::proxy_protocol::parse;
use crate::statics::clean_path;

/// A PROXY v1/v2 header off the wire. A header is what it is however TCP cut it: every
/// prefix of a complete header asks for more, and the header's length never runs past the
/// bytes read.
pub fn proxy_header(data: &[u8]) {
    match parse(data) {
        Ok(Some((len, _))) => {
            assert!(len <= data.len() && len > 0);
            assert_eq!(
                parse(&data[..len]).map(|p| p.map(|(l, _)| l)),
                Ok(Some(len))
            );
            for cut in [len / 2, len - 1] {
                assert_eq!(
                    parse(&data[..cut]).map(|p| p.is_some()),
                    Ok(false),
                    "cut {cut}"
                );
            }
        }
        // Asking for more is bounded: the longest header is a v2 one of 16 + 512 bytes.
        Ok(None) => assert!(data.len() < 16 + 512),
        Err(_) => {}
    }
}

/// A static file's request path: what comes out stays inside the directory.
pub fn static_path(data: &[u8]) {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let Some(relative) = clean_path(raw) else {
        return;
    };
    assert!(!relative.is_empty() && !relative.starts_with('/'));
    for segment in relative.split('/') {
        assert!(
            !segment.is_empty() && !segment.starts_with('.'),
            "{raw:?} → {relative:?}"
        );
        assert!(!segment.contains(['\\', '\0']), "{raw:?} → {relative:?}");
    }
    // Every escape was a `%` and two hex digits.
    let bytes = raw.as_bytes();
    for (i, _) in bytes.iter().enumerate().filter(|(_, b)| **b == b'%') {
        assert!(
            bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)),
            "{raw:?} decoded"
        );
    }
}
