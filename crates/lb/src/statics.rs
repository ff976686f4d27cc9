//! Static files without Python: a directory (Django's `collectstatic` output) served under a
//! path prefix. Precompressed `.br`/`.gz` siblings are chosen by `Accept-Encoding`; `ETag` and
//! `Last-Modified` answer conditional requests; single byte ranges are served; names that carry
//! a content hash (ManifestStaticFilesStorage's `name.0123456789ab.css`) are cached for a year
//! as `immutable`. Paths are decoded once and checked segment by segment (no `..`, no hidden
//! names), and the file found must resolve inside the directory, so a symlink cannot lead out.

use std::fs::Metadata;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use strata_core::channel_body::ChannelBody;
use strata_core::seam::{empty, full, status_response};
use strata_core::Body;

use crate::conditional::{self, Precondition, Ranged, Validators};

/// Files up to this size are read whole; larger ones stream from a blocking reader.
const READ_WHOLE: u64 = 1 << 20;
const CHUNK: usize = 64 * 1024;
/// A year: the cache lifetime of a name that changes whenever its content does.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// One directory served under a prefix.
#[derive(Debug)]
pub struct StaticDir {
    root: PathBuf,
    prefix: String,
    max_age: Duration,
}

/// The file chosen for a request: the original or a precompressed sibling.
struct Chosen {
    path: PathBuf,
    meta: Metadata,
    encoding: Option<&'static str>,
}

impl StaticDir {
    /// Serves `root` under `prefix`; names without a content hash get `max_age`.
    pub fn open(root: &Path, prefix: &str, max_age: Duration) -> std::io::Result<Self> {
        Ok(Self {
            root: root.canonicalize()?,
            prefix: prefix.to_owned(),
            max_age,
        })
    }

    /// Answers one request whose path starts with the prefix.
    pub fn serve<B>(&self, request: &Request<B>) -> Response<Body> {
        if !matches!(*request.method(), Method::GET | Method::HEAD) {
            let mut response =
                status_response(StatusCode::METHOD_NOT_ALLOWED, "static files are read-only");
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        let rest = request
            .uri()
            .path()
            .strip_prefix(self.prefix.as_str())
            .unwrap_or_default();
        let Some(relative) = clean_path(rest) else {
            return status_response(StatusCode::NOT_FOUND, "not found");
        };
        let Some((path, meta)) = self.regular_file(&self.root.join(&relative)) else {
            return status_response(StatusCode::NOT_FOUND, "not found");
        };
        let headers = request.headers();
        let (chosen, varies) = self.choose(path, meta, headers);
        let head = *request.method() == Method::HEAD;
        self.respond(&relative, chosen, varies, headers, head)
    }

    /// `path` if it is a regular file that resolves inside the root.
    fn regular_file(&self, path: &Path) -> Option<(PathBuf, Metadata)> {
        let meta = std::fs::metadata(path).ok().filter(Metadata::is_file)?;
        let real = path.canonicalize().ok()?;
        real.starts_with(&self.root).then_some((real, meta))
    }

    /// The best representation the client accepts; whether any precompressed sibling exists
    /// (the response then varies by `Accept-Encoding`). A range request gets the file itself,
    /// so ranges always count bytes of one representation.
    fn choose(&self, path: PathBuf, meta: Metadata, headers: &HeaderMap) -> (Chosen, bool) {
        let offered = headers
            .get(header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let mut varies = false;
        let mut best = None;
        for (encoding, suffix) in [("br", "br"), ("gzip", "gz")] {
            let mut sibling = path.clone().into_os_string();
            sibling.push(".");
            sibling.push(suffix);
            let Some((sibling, sibling_meta)) = self.regular_file(Path::new(&sibling)) else {
                continue;
            };
            varies = true;
            let wanted = best.is_none()
                && !headers.contains_key(header::RANGE)
                && accepts(offered, encoding);
            if wanted {
                best = Some(Chosen {
                    path: sibling,
                    meta: sibling_meta,
                    encoding: Some(encoding),
                });
            }
        }
        let chosen = best.unwrap_or(Chosen {
            path,
            meta,
            encoding: None,
        });
        (chosen, varies)
    }

    fn respond(
        &self,
        relative: &str,
        chosen: Chosen,
        varies: bool,
        request: &HeaderMap,
        head: bool,
    ) -> Response<Body> {
        let len = chosen.meta.len();
        let modified = chosen.meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        let stamp = modified
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let file = Validators {
            etag: format!("\"{stamp:x}-{len:x}\""),
            modified,
        };
        let mut response = Response::new(empty());
        let headers = response.headers_mut();
        let set = |headers: &mut HeaderMap, name, value: String| {
            if let Ok(value) = HeaderValue::try_from(value) {
                headers.insert(name, value);
            }
        };
        set(headers, header::ETAG, file.etag.clone());
        set(
            headers,
            header::LAST_MODIFIED,
            httpdate::fmt_http_date(modified),
        );
        let cache_control = if is_hashed(relative) {
            IMMUTABLE.to_owned()
        } else {
            format!("public, max-age={}", self.max_age.as_secs())
        };
        set(headers, header::CACHE_CONTROL, cache_control);
        if varies {
            headers.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
        }
        match conditional::evaluate(request, &file) {
            Precondition::Proceed => {}
            Precondition::NotModified => {
                *response.status_mut() = StatusCode::NOT_MODIFIED;
                return response;
            }
            Precondition::Failed => {
                return status_response(StatusCode::PRECONDITION_FAILED, "precondition failed")
            }
        }
        set(headers, header::CONTENT_TYPE, content_type(relative).into());
        if let Some(encoding) = chosen.encoding {
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(encoding));
        } else {
            headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        }
        let (start, end) = match conditional::range(request, &file, len) {
            Ranged::Whole => (0, len),
            Ranged::Part { start, end } => {
                *response.status_mut() = StatusCode::PARTIAL_CONTENT;
                let range = format!("bytes {start}-{}/{len}", end - 1);
                set(response.headers_mut(), header::CONTENT_RANGE, range);
                (start, end)
            }
            Ranged::Unsatisfiable => {
                let mut refused =
                    status_response(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
                set(
                    refused.headers_mut(),
                    header::CONTENT_RANGE,
                    format!("bytes */{len}"),
                );
                return refused;
            }
        };
        set(
            response.headers_mut(),
            header::CONTENT_LENGTH,
            (end - start).to_string(),
        );
        if !head {
            match body(&chosen.path, start, end) {
                Ok(body) => *response.body_mut() = body,
                Err(error) => {
                    tracing::warn!(%error, path = %chosen.path.display(), "static file unreadable");
                    return status_response(StatusCode::NOT_FOUND, "not found");
                }
            }
        }
        response
    }
}

/// Bytes `start..end` of the file at `path`: read at once when small, else streamed by a
/// blocking reader through a bounded channel.
fn body(path: &Path, start: u64, end: u64) -> std::io::Result<Body> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(start))?;
    let len = end - start;
    if len <= READ_WHOLE {
        let mut bytes = Vec::with_capacity(len as usize);
        file.take(len).read_to_end(&mut bytes)?;
        return Ok(full(bytes));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let mut left = len;
        while left > 0 {
            let mut chunk = vec![0u8; CHUNK.min(left as usize)];
            let sent = match file.read(&mut chunk) {
                Ok(0) => Err("the file shrank while being sent".into()),
                Ok(n) => {
                    chunk.truncate(n);
                    left -= n as u64;
                    Ok(Bytes::from(chunk))
                }
                Err(error) => Err(error.into()),
            };
            let failed = sent.is_err();
            if tx.blocking_send(sent).is_err() || failed {
                return;
            }
        }
    });
    Ok(http_body_util::BodyExt::boxed_unsync(ChannelBody::new(
        Vec::new(),
        rx,
        Some(len),
    )))
}

/// The request path under the prefix, decoded and checked: `None` for a `..` or hidden
/// segment, an encoded slash or NUL, or bytes that are not UTF-8.
pub(crate) fn clean_path(raw: &str) -> Option<String> {
    let mut segments = Vec::new();
    for segment in raw.split('/') {
        let segment = percent_decode(segment)?;
        if segment.is_empty() || segment == "." {
            continue;
        }
        if segment.starts_with('.') || segment.contains(['/', '\\', '\0']) {
            return None;
        }
        segments.push(segment);
    }
    (!segments.is_empty()).then(|| segments.join("/"))
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            // Exactly two hex digits (`from_str_radix` alone would take `%+f`).
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Whether `Accept-Encoding` accepts `coding` (named or by `*`, with a non-zero weight).
fn accepts(offered: &str, coding: &str) -> bool {
    let mut star = None;
    for item in offered.split(',') {
        let mut parts = item.split(';');
        let name = parts.next().unwrap_or("").trim();
        let weight = parts
            .find_map(|p| p.trim().strip_prefix("q="))
            .and_then(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        if name.eq_ignore_ascii_case(coding) {
            return weight > 0.0;
        }
        if name == "*" {
            star = Some(weight > 0.0);
        }
    }
    star.unwrap_or(false)
}

/// Whether the file name carries a content hash as Django's manifest storage writes it:
/// `name.<12 hex digits>.ext`.
fn is_hashed(relative: &str) -> bool {
    let name = relative.rsplit('/').next().unwrap_or(relative);
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() >= 3 && {
        let hash = parts[parts.len() - 2];
        hash.len() == 12 && hash.bytes().all(|b| b.is_ascii_hexdigit())
    }
}

/// The media type of a file, by its extension.
fn content_type(relative: &str) -> &'static str {
    let extension = relative.rsplit_once('.').map_or("", |(_, e)| e);
    match extension.to_ascii_lowercase().as_str() {
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" | "map" => "application/json",
        "html" | "htm" => "text/html; charset=utf-8",
        "txt" => "text/plain; charset=utf-8",
        "xml" => "application/xml",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "ico" => "image/vnd.microsoft.icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "otf" => "font/otf",
        "pdf" => "application/pdf",
        "wasm" => "application/wasm",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mp3" => "audio/mpeg",
        "zip" => "application/zip",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_decoded_and_traversal_refused() {
        assert_eq!(clean_path("css/site.css").as_deref(), Some("css/site.css"));
        assert_eq!(
            clean_path("css//./a%20b.css").as_deref(),
            Some("css/a b.css")
        );
        for bad in [
            "../secret",
            "css/../../x",
            "%2e%2e/x",
            "a%2fb",
            "a%5cb",
            "x%00",
            ".env",
            "a/.git/config",
            "%ff",
            "%zz",
            "",
        ] {
            assert_eq!(clean_path(bad), None, "{bad}");
        }
        for malformed in ["a%+fb", "a%-1", "a%2", "a%zz"] {
            assert_eq!(clean_path(malformed), None, "{malformed}");
        }
    }

    #[test]
    fn encodings_by_weight() {
        assert!(accepts("gzip, br", "br"));
        assert!(accepts("gzip;q=0.5", "gzip"));
        assert!(!accepts("gzip;q=0", "gzip"));
        assert!(!accepts("gzip", "br"));
        assert!(accepts("*", "br"));
        assert!(!accepts("*, br;q=0", "br"));
        assert!(!accepts("", "gzip"));
    }

    #[test]
    fn hashed_names_are_recognised() {
        assert!(is_hashed("css/site.0123456789ab.css"));
        assert!(!is_hashed("site.0123456789ab.min.js"));
        assert!(!is_hashed("css/site.css"));
        assert!(!is_hashed("site.0123456789a.css"));
        assert!(!is_hashed("0123456789ab.css"));
    }
}
