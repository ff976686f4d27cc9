//! A worker: forked from the zygote, it connects to the master and serves one request at a
//! time through the WSGI application, until the master closes its socket.

mod io;
mod side;
mod wsgi;

use std::cell::RefCell;
use std::io::{BufReader, BufWriter, Write};
use std::os::unix::net::UnixStream;
use std::rc::Rc;

use pyo3::prelude::*;

use crate::control::ZygoteSpec;
use crate::proctitle;
use crate::proto::{self, kind, Encoder};

/// The worker's connection to the master, shared by the objects the application is given
/// (`wsgi.input` pulls body bytes, `write()` pushes response bytes).
pub(crate) struct Conn {
    reader: BufReader<UnixStream>,
    writer: BufWriter<UnixStream>,
    /// Sequence number of the request being served; stale `wsgi.input` objects read nothing.
    seq: u32,
    /// A request is being served: the master is listening for side requests.
    serving: bool,
    enc: Encoder,
}

impl Conn {
    /// Writes the frames encoded so far into the buffered writer.
    fn put(&mut self) -> std::io::Result<()> {
        let Self { writer, enc, .. } = self;
        writer.write_all(enc.bytes())?;
        enc.clear();
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.put()?;
        self.writer.flush()
    }
}

pub(crate) type SharedConn = Rc<RefCell<Conn>>;

/// Runs the worker until the master goes away; never returns.
pub fn run(py: Python<'_>, spec: &ZygoteSpec, id: u32, app: &Bound<'_, PyAny>, niced: bool) -> ! {
    proctitle::set(&format!("strata worker id={id} gen={}", spec.generation));
    let code = match serve(py, spec, id, app, niced) {
        Ok(()) => 0,
        Err(error) => {
            tracing::error!(worker = id, %error, "worker stopped");
            1
        }
    };
    exit(py, code)
}

fn serve(
    py: Python<'_>,
    spec: &ZygoteSpec,
    id: u32,
    app: &Bound<'_, PyAny>,
    niced: bool,
) -> Result<(), proto::ProtoError> {
    py.import("gc")
        .and_then(|gc| gc.call_method0("enable"))
        .map_err(|err| std::io::Error::other(err.to_string()))?;
    batch_scheduling(py);
    // Warm what is per process before taking traffic: the master hands requests to a worker
    // only after its hello.
    if !spec.app.warmup_paths.is_empty() {
        if let Err(error) = crate::python::warm_up(py, spec, app, true) {
            tracing::warn!(worker = id, "worker warm-up failed:\n{error}");
        }
    }
    // Serve at normal priority (the zygote checked this is allowed before lowering it).
    if niced {
        if let Err(error) = rustix::process::setpriority_process(None, 0) {
            tracing::warn!(worker = id, %error, "cannot return to normal priority");
        }
    }
    let stream = UnixStream::connect(&spec.socket)?;
    let mut conn = Conn {
        reader: BufReader::with_capacity(64 * 1024, stream.try_clone()?),
        writer: BufWriter::with_capacity(64 * 1024, stream),
        seq: 0,
        serving: false,
        enc: Encoder::new(),
    };
    proto::encode_hello(&mut conn.enc, id, spec.generation, std::process::id());
    conn.flush()?;
    let conn = Rc::new(RefCell::new(conn));
    Py::new(py, side::Channel::new(conn.clone()))
        .and_then(|channel| py.import("strata")?.setattr("_channel", channel))
        .map_err(|err| std::io::Error::other(err.to_string()))?;
    let wsgi = wsgi::Wsgi::new(py, id, conn.clone())
        .map_err(|err| std::io::Error::other(err.to_string()))?;
    let mut payload = Vec::new();
    loop {
        let frame = proto::read_frame(&mut conn.borrow_mut().reader, &mut payload)?;
        match frame {
            None => {
                // Retired (or the master is gone): tearing down the address space is
                // background work; let serving workers go first.
                let _ = rustix::process::setpriority_process(None, 19);
                return Ok(());
            }
            Some(kind::REQUEST) => wsgi.handle(py, app, &payload)?,
            Some(other) => return Err(proto::ProtoError::UnexpectedKind(other)),
        }
    }
}

/// Puts the worker under `SCHED_BATCH`: waking it (a request arrived) does not preempt the
/// master, which can then finish what it was doing — answer other clients, hand the next
/// request to the next worker — before the worker runs. CPU shares are unchanged; on a
/// contended core this halves the context switches per request.
fn batch_scheduling(py: Python<'_>) {
    let result = py.import("os").and_then(|os| {
        let param = os.call_method1("sched_param", (0,))?;
        os.call_method1("sched_setscheduler", (0, os.getattr("SCHED_BATCH")?, param))
    });
    if let Err(err) = result {
        tracing::debug!(%err, "SCHED_BATCH unavailable");
    }
}

/// Leaves the process the way `os._exit` does: no interpreter teardown, no atexit handlers
/// inherited from the zygote.
fn exit(py: Python<'_>, code: i32) -> ! {
    let _ = py
        .import("os")
        .and_then(|os| os.call_method1("_exit", (code,)));
    std::process::exit(code)
}
