//! Side requests: what application code asks of the master while a request is being served
//! (today, purges of the accelerator's cache), over the worker's own connection.

use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;

use super::SharedConn;
use crate::proto::{self, kind};

/// `strata._channel`: the worker's connection as the `strata` package uses it.
#[pyclass(unsendable, module = "strata")]
pub struct Channel {
    conn: SharedConn,
}

impl Channel {
    pub(crate) fn new(conn: SharedConn) -> Self {
        Self { conn }
    }
}

#[pymethods]
impl Channel {
    /// Purges URLs (or, with the tags flag, surrogate keys); returns how many cached objects
    /// were affected, or `None` when no request is being served (the master only listens to a
    /// worker during an exchange).
    fn purge(&self, flags: u8, items: Vec<String>) -> PyResult<Option<u32>> {
        let mut conn = self.conn.borrow_mut();
        if !conn.serving {
            return Ok(None);
        }
        proto::encode_purge(&mut conn.enc, flags, &items);
        let mut payload = Vec::new();
        let reply = conn
            .flush()
            .map_err(proto::ProtoError::from)
            .and_then(|()| proto::read_frame(&mut conn.reader, &mut payload));
        match reply {
            Ok(Some(kind::PURGED)) if payload.len() == 4 => Ok(Some(u32::from_le_bytes(
                payload[..4].try_into().expect("4 bytes"),
            ))),
            Ok(other) => Err(PyOSError::new_err(format!(
                "protocol error while purging: frame {other:?}"
            ))),
            Err(error) => Err(PyOSError::new_err(format!(
                "master connection lost: {error}"
            ))),
        }
    }
}
