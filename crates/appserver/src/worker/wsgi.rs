//! One WSGI exchange (PEP 3333): the environ, `start_response` with `exc_info`, `write()`,
//! iterating the result, `close()`, and the response frames sent back to the master.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyAssertionError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

use super::io::{Errors, Input};
use super::{lock, SharedConn};
use crate::proto::{self, kind, ProtoError};
use crate::python;

/// Headers a WSGI application must not set (PEP 3333, "hop-by-hop"): the server frames the
/// connection itself, so they are dropped.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
];

/// Per-worker state reused across requests.
pub struct Wsgi {
    conn: SharedConn,
    errors: Py<Errors>,
    file_wrapper: Py<PyAny>,
    version: Py<PyTuple>,
    /// The environ's keys as Python strings, made once per worker (bounded: header names are
    /// the client's choice).
    keys: RefCell<HashMap<Vec<u8>, Py<PyString>, BuildHasherDefault<Fnv>>>,
}

/// Environ keys kept per worker at most; past it, new names get a fresh string each time.
const MAX_KEYS: usize = 256;

/// FNV-1a over a key's bytes: keys are short, and the table is bounded, so a crafted
/// collision costs a slower lookup and nothing more.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The response as `start_response` and `write()` shape it.
#[derive(Default)]
struct Response {
    status: Option<(u16, String)>,
    headers: Vec<(String, String)>,
    head_sent: bool,
    head_request: bool,
}

type SharedResponse = Arc<Mutex<Response>>;

impl Wsgi {
    pub fn new(py: Python<'_>, worker: u32, conn: SharedConn) -> PyResult<Self> {
        Ok(Self {
            conn,
            errors: Py::new(py, Errors::new(worker))?,
            file_wrapper: py.import("strata")?.getattr("FileWrapper")?.unbind(),
            version: PyTuple::new(py, [1, 0])?.unbind(),
            keys: RefCell::default(),
        })
    }

    fn key<'py>(&self, py: Python<'py>, raw: &[u8]) -> Bound<'py, PyString> {
        let mut keys = self.keys.borrow_mut();
        if let Some(key) = keys.get(raw) {
            return key.bind(py).clone();
        }
        let key = PyString::new(py, &latin1(raw));
        if keys.len() < MAX_KEYS {
            keys.insert(raw.to_vec(), key.clone().unbind());
        }
        key
    }

    /// Serves one request frame; errors are failures to talk to the master.
    pub fn handle(
        &self,
        py: Python<'_>,
        app: &Bound<'_, PyAny>,
        payload: &[u8],
    ) -> Result<(), ProtoError> {
        let request = proto::decode_request(payload)?;
        let seq = {
            let mut conn = lock(py, &self.conn);
            conn.seq = conn.seq.wrapping_add(1);
            conn.serving = true;
            conn.seq
        };
        let response: SharedResponse = Arc::default();
        let environ = self
            .environ(py, &request, seq, &response)
            .map_err(|err| std::io::Error::other(python::format_error(py, &err)))?;
        let start_response = Py::new(
            py,
            StartResponse {
                conn: self.conn.clone(),
                response: response.clone(),
            },
        )
        .map_err(|err| std::io::Error::other(err.to_string()))?;
        let result = app.call1((environ, start_response));
        let outcome = match result {
            Ok(iterable) => {
                let sent = self.send_body(&iterable, &response);
                let closed = close(py, &iterable);
                match sent {
                    Ok(Ok(())) => closed,
                    Ok(Err(err)) => {
                        if let Err(close_err) = closed {
                            log_app_error(py, &close_err);
                        }
                        Err(err)
                    }
                    Err(io) => return Err(io.into()),
                }
            }
            Err(err) => Err(err),
        };
        let mut conn = lock(py, &self.conn);
        conn.serving = false;
        let mut response = lock(py, &response);
        match outcome {
            Ok(()) if response.status.is_none() => {
                tracing::error!("application returned without calling start_response");
                send_error_page(&mut conn, &mut response);
            }
            Ok(()) => {
                if !response.head_sent {
                    send_head(&mut conn, &mut response, Some(0));
                }
                conn.enc.frame(kind::END, b"");
            }
            Err(err) => {
                log_app_error(py, &err);
                if response.head_sent {
                    conn.enc.frame(kind::ABORT, b"");
                } else {
                    send_error_page(&mut conn, &mut response);
                }
            }
        }
        // The caller ends the exchange (`Conn::end`): the frames stay encoded until then.
        Ok(())
    }

    fn environ<'py>(
        &self,
        py: Python<'py>,
        request: &proto::RequestFrame<'_>,
        seq: u32,
        response: &SharedResponse,
    ) -> PyResult<Bound<'py, PyDict>> {
        let environ = PyDict::new(py);
        for (key, value) in &request.vars {
            if *key == b"REQUEST_METHOD" && *value == b"HEAD" {
                lock(py, response).head_request = true;
            }
            environ.set_item(self.key(py, key), PyString::new(py, &latin1(value)))?;
        }
        let input = Input::new(self.conn.clone(), seq, request.body, request.body_complete);
        environ.set_item(pyo3::intern!(py, "wsgi.version"), self.version.bind(py))?;
        environ.set_item(pyo3::intern!(py, "wsgi.input"), Py::new(py, input)?)?;
        environ.set_item(pyo3::intern!(py, "wsgi.errors"), self.errors.bind(py))?;
        environ.set_item(pyo3::intern!(py, "wsgi.multithread"), false)?;
        environ.set_item(pyo3::intern!(py, "wsgi.multiprocess"), true)?;
        environ.set_item(pyo3::intern!(py, "wsgi.run_once"), false)?;
        environ.set_item(pyo3::intern!(py, "wsgi.input_terminated"), true)?;
        environ.set_item(
            pyo3::intern!(py, "wsgi.file_wrapper"),
            self.file_wrapper.bind(py),
        )?;
        Ok(environ)
    }

    /// Iterates the application's result into body frames. The outer error is a lost master
    /// connection; the inner one an application error.
    fn send_body(
        &self,
        iterable: &Bound<'_, PyAny>,
        response: &SharedResponse,
    ) -> Result<PyResult<()>, std::io::Error> {
        // A list or tuple is the whole body: its length can be declared and it goes out in
        // one write. Anything else streams, one flush per chunk.
        let whole = iterable.is_instance_of::<PyList>() || iterable.is_instance_of::<PyTuple>();
        if whole {
            if let Err(err) = declare_length(iterable, response) {
                return Ok(Err(err));
            }
        }
        let iterator = match iterable.try_iter() {
            Ok(iterator) => iterator,
            Err(err) => return Ok(Err(err)),
        };
        for item in iterator {
            let item = match item {
                Ok(item) => item,
                Err(err) => return Ok(Err(err)),
            };
            let Ok(bytes) = item.cast::<PyBytes>() else {
                return Ok(Err(PyTypeError::new_err(format!(
                    "WSGI response items must be bytes, not {}",
                    item.get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_default()
                ))));
            };
            let data = bytes.as_bytes();
            if data.is_empty() {
                continue;
            }
            let py = iterable.py();
            let mut conn = lock(py, &self.conn);
            let mut response = lock(py, response);
            if !response.head_sent {
                if response.status.is_none() {
                    return Ok(Err(PyAssertionError::new_err(
                        "the application yielded body bytes before calling start_response",
                    )));
                }
                send_head(&mut conn, &mut response, None);
            }
            if !response.head_request {
                conn.enc.frame(kind::CHUNK, data);
            }
            if whole {
                conn.put()?;
            } else {
                conn.flush()?;
            }
        }
        Ok(Ok(()))
    }
}

/// Adds `Content-Length` for a list or tuple body when the application did not set one.
fn declare_length(iterable: &Bound<'_, PyAny>, response: &SharedResponse) -> PyResult<()> {
    let mut response = lock(iterable.py(), response);
    if response.status.is_none()
        || response
            .headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("content-length"))
    {
        return Ok(());
    }
    let mut total = 0usize;
    for item in iterable.try_iter()? {
        match item?.cast::<PyBytes>() {
            Ok(bytes) => total += bytes.as_bytes().len(),
            // Leave the error to the iteration that sends the body.
            Err(_) => return Ok(()),
        }
    }
    response
        .headers
        .push(("Content-Length".into(), total.to_string()));
    Ok(())
}

fn close(py: Python<'_>, iterable: &Bound<'_, PyAny>) -> PyResult<()> {
    // Plain lists and tuples have no close(); asking would build an AttributeError per request.
    if iterable.is_exact_instance_of::<PyList>() || iterable.is_exact_instance_of::<PyTuple>() {
        return Ok(());
    }
    if iterable.hasattr(pyo3::intern!(py, "close"))? {
        iterable.call_method0(pyo3::intern!(py, "close"))?;
    }
    Ok(())
}

fn log_app_error(py: Python<'_>, err: &PyErr) {
    tracing::error!(
        "application error:\n{}",
        python::format_error(py, err).trim_end()
    );
}

/// Encodes the head; `length` adds `Content-Length` when the body is known to be empty.
fn send_head(conn: &mut super::Conn, response: &mut Response, length: Option<usize>) {
    let (status, reason) = response.status.clone().unwrap_or((500, String::new()));
    if let Some(length) = length {
        let declared = response
            .headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("content-length"));
        if !declared && !response.head_request && status != 204 && status != 304 {
            response
                .headers
                .push(("Content-Length".into(), length.to_string()));
        }
    }
    // Names are tokens (ASCII, checked by `start_response`); values are latin-1.
    let values: Vec<Cow<'_, [u8]>> = response
        .headers
        .iter()
        .map(|(_, value)| latin1_bytes(value))
        .collect();
    proto::encode_head(
        &mut conn.enc,
        status,
        reason.as_bytes(),
        response
            .headers
            .iter()
            .zip(&values)
            .map(|((name, _), value)| (name.as_bytes(), &value[..])),
    );
    response.head_sent = true;
}

fn send_error_page(conn: &mut super::Conn, response: &mut Response) {
    let body = b"500 Internal Server Error\n";
    response.status = Some((500, "Internal Server Error".into()));
    response.headers = vec![
        ("Content-Type".into(), "text/plain; charset=utf-8".into()),
        ("Content-Length".into(), body.len().to_string()),
    ];
    send_head(conn, response, None);
    if !response.head_request {
        conn.enc.frame(kind::CHUNK, body);
    }
    conn.enc.frame(kind::END, b"");
}

/// The `start_response` callable.
#[pyclass(module = "strata")]
struct StartResponse {
    conn: SharedConn,
    response: SharedResponse,
}

#[pymethods]
impl StartResponse {
    #[pyo3(signature = (status, headers, exc_info = None))]
    fn __call__(
        &self,
        status: &Bound<'_, PyAny>,
        headers: &Bound<'_, PyAny>,
        exc_info: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Writer> {
        let py = status.py();
        let exc_info = exc_info.filter(|info| !info.is_none());
        let (head_sent, started) = {
            let response = lock(py, &self.response);
            (response.head_sent, response.status.is_some())
        };
        match exc_info {
            Some(info) if head_sent => {
                // Too late to change the response: re-raise the application's error.
                return Err(PyErr::from_value(info.get_item(1)?));
            }
            None if started => {
                return Err(PyAssertionError::new_err(
                    "start_response called a second time without exc_info",
                ));
            }
            _ => {}
        }
        let status = parse_status(status)?;
        let headers = parse_headers(headers)?;
        let mut response = lock(py, &self.response);
        response.status = Some(status);
        response.headers = headers;
        Ok(Writer {
            conn: self.conn.clone(),
            response: self.response.clone(),
        })
    }
}

/// The `write()` callable `start_response` returns, for applications that push their body.
#[pyclass(module = "strata")]
struct Writer {
    conn: SharedConn,
    response: SharedResponse,
}

#[pymethods]
impl Writer {
    fn __call__(&self, data: &Bound<'_, PyBytes>) -> PyResult<()> {
        let py = data.py();
        let mut conn = lock(py, &self.conn);
        let mut response = lock(py, &self.response);
        if !response.head_sent {
            send_head(&mut conn, &mut response, None);
        }
        if !response.head_request && !data.as_bytes().is_empty() {
            conn.enc.frame(kind::CHUNK, data.as_bytes());
        }
        conn.flush().map_err(|e| {
            pyo3::exceptions::PyOSError::new_err(format!("client connection lost: {e}"))
        })
    }
}

fn parse_status(status: &Bound<'_, PyAny>) -> PyResult<(u16, String)> {
    let text: String = status
        .cast::<PyString>()
        .map_err(|_| PyTypeError::new_err("status must be a str such as '200 OK'"))?
        .to_str()?
        .to_owned();
    let bad = || PyValueError::new_err(format!("invalid status {text:?}: expected '200 OK'"));
    let (code, reason) = text.split_at(text.len().min(3));
    let code: u16 = code.parse().map_err(|_| bad())?;
    if !(100..=999).contains(&code) || !(reason.is_empty() || reason.starts_with(' ')) {
        return Err(bad());
    }
    let reason = reason.trim_start();
    if reason.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err(bad());
    }
    Ok((code, reason.to_owned()))
}

fn parse_headers(headers: &Bound<'_, PyAny>) -> PyResult<Vec<(String, String)>> {
    if !(headers.is_instance_of::<PyList>() || headers.is_instance_of::<PyTuple>()) {
        return Err(PyTypeError::new_err(
            "response headers must be a list of (name, value) tuples",
        ));
    }
    let mut parsed = Vec::new();
    for item in headers.try_iter()? {
        let item = item?;
        let (name, value): (String, String) = item.extract().map_err(|_| {
            PyTypeError::new_err(format!("response header {item} is not a (str, str) tuple"))
        })?;
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(PyValueError::new_err(format!(
                "invalid response header name {name:?}"
            )));
        }
        if value
            .chars()
            .any(|c| c == '\r' || c == '\n' || c == '\0' || c as u32 > 0xff)
        {
            return Err(PyValueError::new_err(format!(
                "invalid value for response header {name:?}: {value:?}"
            )));
        }
        if HOP_BY_HOP.iter().any(|hop| name.eq_ignore_ascii_case(hop)) {
            tracing::debug!(header = %name, "dropping hop-by-hop response header");
            continue;
        }
        parsed.push((name, value));
    }
    Ok(parsed)
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Bytes as a native string the way PEP 3333 says: each byte one code point (latin-1).
fn latin1(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(ascii) if bytes.is_ascii() => Cow::Borrowed(ascii),
        _ => Cow::Owned(bytes.iter().map(|b| char::from(*b)).collect()),
    }
}

/// The reverse of [`latin1`]; values were checked to be below U+0100.
fn latin1_bytes(text: &str) -> Cow<'_, [u8]> {
    if text.is_ascii() {
        Cow::Borrowed(text.as_bytes())
    } else {
        Cow::Owned(text.chars().map(|c| c as u32 as u8).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latin1_maps_each_byte_to_one_code_point() {
        assert_eq!(latin1(b"/caf\xc3\xa9"), "/caf\u{c3}\u{a9}");
        assert_eq!(&*latin1_bytes(&latin1(b"\xff\x00a")), b"\xff\x00a");
        assert_eq!(&*latin1_bytes("plain"), b"plain");
    }
}
