//! `wsgi.input` and `wsgi.errors`.
//!
//! `wsgi.input` streams the request body: bytes that came with the request frame are served
//! first, the rest is pulled from the master a frame at a time as the application reads.

use std::io::Write;

use pyo3::exceptions::{PyOSError, PyStopIteration};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::{lock, SharedConn};
use crate::proto::{self, kind};

/// `wsgi.input`.
#[pyclass(module = "strata")]
pub struct Input {
    conn: SharedConn,
    seq: u32,
    buf: Vec<u8>,
    pos: usize,
    done: bool,
}

impl Input {
    pub(crate) fn new(conn: SharedConn, seq: u32, start: &[u8], complete: bool) -> Self {
        Self {
            conn,
            seq,
            buf: start.to_vec(),
            pos: 0,
            done: complete,
        }
    }

    fn available(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Pulls one more chunk from the master; false once the body has ended.
    fn fill(&mut self, py: Python<'_>) -> PyResult<bool> {
        if self.done {
            return Ok(false);
        }
        let mut conn = lock(py, &self.conn);
        if conn.seq != self.seq {
            // An input object kept past its request must not read the next request's body.
            self.done = true;
            return Ok(false);
        }
        self.buf.drain(..self.pos);
        self.pos = 0;
        conn.enc.begin(kind::READ).u32(proto::READ_SIZE).finish();
        let mut payload = Vec::new();
        let frame = conn
            .flush()
            .map_err(proto::ProtoError::from)
            .and_then(|()| proto::read_frame(&mut conn.reader, &mut payload));
        match frame {
            Ok(Some(kind::BODY)) if payload.is_empty() => {
                self.done = true;
                Ok(false)
            }
            Ok(Some(kind::BODY)) => {
                self.buf.extend_from_slice(&payload);
                Ok(true)
            }
            Ok(Some(kind::BODY_ERROR)) => {
                self.done = true;
                Err(PyOSError::new_err(format!(
                    "request body could not be read: {}",
                    String::from_utf8_lossy(&payload)
                )))
            }
            Ok(other) => Err(PyOSError::new_err(format!(
                "protocol error while reading the request body: frame {other:?}"
            ))),
            Err(error) => Err(PyOSError::new_err(format!(
                "master connection lost: {error}"
            ))),
        }
    }

    fn take<'py>(&mut self, py: Python<'py>, n: usize) -> Bound<'py, PyBytes> {
        let n = n.min(self.available());
        let bytes = PyBytes::new(py, &self.buf[self.pos..self.pos + n]);
        self.pos += n;
        bytes
    }

    fn line_len(&mut self, py: Python<'_>, limit: usize) -> PyResult<usize> {
        let mut searched = 0;
        loop {
            let window = &self.buf[self.pos..];
            if let Some(i) = window[searched..].iter().position(|b| *b == b'\n') {
                return Ok((searched + i + 1).min(limit));
            }
            searched = window.len();
            if searched >= limit || !self.fill(py)? {
                return Ok(self.available().min(limit));
            }
        }
    }
}

#[pymethods]
impl Input {
    #[pyo3(signature = (size = None))]
    fn read<'py>(&mut self, py: Python<'py>, size: Option<isize>) -> PyResult<Bound<'py, PyBytes>> {
        let want = match size {
            Some(n) if n >= 0 => n as usize,
            _ => usize::MAX,
        };
        while self.available() < want && self.fill(py)? {}
        Ok(self.take(py, want))
    }

    #[pyo3(signature = (size = None))]
    fn readline<'py>(
        &mut self,
        py: Python<'py>,
        size: Option<isize>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let limit = match size {
            Some(n) if n >= 0 => n as usize,
            _ => usize::MAX,
        };
        let n = self.line_len(py, limit)?;
        Ok(self.take(py, n))
    }

    #[pyo3(signature = (hint = None))]
    fn readlines<'py>(
        &mut self,
        py: Python<'py>,
        hint: Option<isize>,
    ) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        let hint = hint.filter(|h| *h > 0).map_or(usize::MAX, |h| h as usize);
        let mut lines = Vec::new();
        let mut total = 0;
        while total < hint {
            let n = self.line_len(py, usize::MAX)?;
            if n == 0 {
                break;
            }
            total += n;
            lines.push(self.take(py, n));
        }
        Ok(lines)
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let n = self.line_len(py, usize::MAX)?;
        if n == 0 {
            return Err(PyStopIteration::new_err(()));
        }
        Ok(self.take(py, n))
    }
}

/// `wsgi.errors`: text written here goes to Strata's log, a line at a time.
#[pyclass(module = "strata")]
pub struct Errors {
    pending: String,
    worker: u32,
}

impl Errors {
    pub fn new(worker: u32) -> Self {
        Self {
            pending: String::new(),
            worker,
        }
    }

    fn emit_lines(&mut self) {
        while let Some(i) = self.pending.find('\n') {
            let line: String = self.pending.drain(..=i).collect();
            tracing::warn!(target: "wsgi.errors", worker = self.worker, "{}", line.trim_end());
        }
    }
}

#[pymethods]
impl Errors {
    fn write(&mut self, text: &str) -> usize {
        self.pending.push_str(text);
        self.emit_lines();
        text.len()
    }

    fn writelines(&mut self, lines: Vec<String>) {
        for line in lines {
            self.write(&line);
        }
    }

    fn flush(&mut self) {
        if !self.pending.is_empty() {
            self.pending.push('\n');
            self.emit_lines();
        }
        let _ = std::io::stderr().flush();
    }
}
