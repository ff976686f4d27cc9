//! Side requests: what application code asks of the master while a request is being served
//! (purges of the accelerator's cache, commands for the cache tier), over the worker's own
//! connection.

use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::{lock, SharedConn};
use crate::proto::{self, kind};

/// `strata._channel`: the worker's connection as the `strata` package uses it.
#[pyclass(module = "strata")]
pub struct Channel {
    conn: SharedConn,
}

impl Channel {
    pub(crate) fn new(conn: SharedConn) -> Self {
        Self { conn }
    }
}

impl Channel {
    /// Sends one frame and reads the answer, which must be of kind `reply`; `None` when no
    /// request is being served.
    fn ask(
        &self,
        py: Python<'_>,
        encode: impl FnOnce(&mut proto::Encoder),
        reply: u8,
    ) -> PyResult<Option<Vec<u8>>> {
        let mut conn = lock(py, &self.conn);
        if !conn.serving {
            return Ok(None);
        }
        encode(&mut conn.enc);
        let mut payload = Vec::new();
        let answer = conn
            .flush()
            .map_err(proto::ProtoError::from)
            .and_then(|()| proto::read_frame(&mut conn.reader, &mut payload));
        match answer {
            Ok(Some(kind)) if kind == reply => Ok(Some(payload)),
            Ok(other) => Err(PyOSError::new_err(format!(
                "protocol error: frame {other:?} where {reply} was expected"
            ))),
            Err(error) => Err(PyOSError::new_err(format!(
                "master connection lost: {error}"
            ))),
        }
    }
}

#[pymethods]
impl Channel {
    /// Purges URLs (or, with the tags flag, surrogate keys); returns how many cached objects
    /// were affected, or `None` when no request is being served (the master only listens to a
    /// worker during an exchange).
    fn purge(&self, py: Python<'_>, flags: u8, items: Vec<String>) -> PyResult<Option<u32>> {
        let answer = self.ask(
            py,
            |enc| proto::encode_purge(enc, flags, &items),
            kind::PURGED,
        )?;
        Ok(answer.map(|payload| {
            payload
                .get(..4)
                .map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        }))
    }

    /// Runs memcached protocol `commands` in the node's cache tier and returns the answers;
    /// `None` when no request is being served.
    fn cache<'py>(
        &self,
        py: Python<'py>,
        commands: &[u8],
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let answer = self.ask(
            py,
            |enc| enc.frame(kind::CACHE, commands),
            kind::CACHE_REPLY,
        )?;
        Ok(answer.map(|payload| PyBytes::new(py, &payload)))
    }
}
