//! A worker: forked from the zygote, it connects to the master, maps the shared request
//! queue, and serves one request at a time through the WSGI application: it takes the oldest
//! queued request itself, opens the exchange on its socket with `BEGIN`, and sleeps on the
//! queue when it is empty. It leaves when told to (retired, shutdown) or when the master
//! closes its socket.

mod io;
mod side;
mod wsgi;

use std::io::{BufReader, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use pyo3::prelude::*;

use crate::control::ZygoteSpec;
use crate::proctitle;
use crate::proto::{self, kind, Encoder, ProtoError};
use crate::queue::{Queue, Taken};

/// The worker's connection to the master, shared by the objects the application is given
/// (`wsgi.input` pulls body bytes, `write()` pushes response bytes).
pub(crate) struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Frames put but not yet written to the socket.
    out: Vec<u8>,
    /// Part of the current exchange went over the socket, so the rest goes there too.
    sent: bool,
    /// Sequence number of the request being served; stale `wsgi.input` objects read nothing.
    seq: u32,
    /// A request is being served: the master is listening for side requests.
    serving: bool,
    enc: Encoder,
}

/// Output past this is written to the socket even before the exchange ends.
const OUT_LIMIT: usize = 64 * 1024;

impl Conn {
    /// Moves the frames encoded so far to the output; a large output is written out.
    fn put(&mut self) -> std::io::Result<()> {
        self.out.extend_from_slice(self.enc.bytes());
        self.enc.clear();
        if self.out.len() >= OUT_LIMIT {
            self.write_out()?;
        }
        Ok(())
    }

    /// Writes everything encoded so far to the socket.
    fn flush(&mut self) -> std::io::Result<()> {
        self.put()?;
        self.write_out()
    }

    fn write_out(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.writer.write_all(&self.out)?;
            self.out.clear();
            self.sent = true;
        }
        Ok(())
    }

    /// Opens an exchange: `BEGIN` is buffered, so it leaves with the exchange's first write.
    fn begin(&mut self, taken: Taken) {
        self.sent = false;
        self.enc
            .begin(kind::BEGIN)
            .u64(taken.id)
            .u8(taken.fetch.into())
            .finish();
    }

    /// Ends an exchange: a response that is whole and has not touched the socket goes into
    /// the worker's answer ring (ringing the master's doorbell if it waits for one); anything
    /// else is written to the socket.
    fn end(
        &mut self,
        queue: &Queue,
        slot: u32,
        id: u64,
        doorbell: &OwnedFd,
    ) -> std::io::Result<()> {
        self.out.extend_from_slice(self.enc.bytes());
        self.enc.clear();
        let whole = self.out.ends_with(&[kind::END, 0, 0, 0, 0]);
        if !self.sent && whole && self.out.len() > proto::BEGIN_FRAME {
            let started = queue.holding(slot).1;
            if let Some(ring) = queue.answer(slot, id, started, &self.out[proto::BEGIN_FRAME..]) {
                self.out.clear();
                if ring {
                    // Non-blocking: a full pipe already tells the master to look.
                    match rustix::io::write(doorbell, &[1]) {
                        Ok(_) | Err(rustix::io::Errno::AGAIN) => {}
                        Err(error) => return Err(error.into()),
                    }
                }
                return Ok(());
            }
        }
        self.write_out()
    }
}

/// The worker's connection to the master, shared by the objects handed to the application.
/// Those may be used, and are often dropped, on other Python threads (a thread pool of the
/// application's, the garbage collector running there): hence a mutex, locked with [`lock`].
pub(crate) type SharedConn = Arc<Mutex<Conn>>;

/// Locks `mutex`; while another thread holds it, waits with the interpreter released, so the
/// holder can take the GIL back and finish. Nothing runs Python code while holding one of
/// these locks. A lock poisoned by a panic is taken as it is: the panic already failed its
/// request.
pub(crate) fn lock<'a, T>(py: Python<'_>, mutex: &'a Mutex<T>) -> MutexGuard<'a, T> {
    use pyo3::sync::MutexExt;
    mutex
        .lock_py_attached(py)
        .unwrap_or_else(PoisonError::into_inner)
}

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
        writer: stream,
        out: Vec::with_capacity(OUT_LIMIT),
        sent: false,
        seq: 0,
        serving: false,
        enc: Encoder::new(),
    };
    proto::encode_hello(&mut conn.enc, id, spec.generation, std::process::id());
    conn.flush()?;
    let (queue, doorbell, slot) = welcome(conn.reader.get_ref())?;
    let conn = Arc::new(Mutex::new(conn));
    Py::new(py, side::Channel::new(conn.clone()))
        .and_then(|channel| py.import("strata")?.setattr("_channel", channel))
        .map_err(|err| std::io::Error::other(err.to_string()))?;
    let wsgi = wsgi::Wsgi::new(py, id, conn.clone())
        .map_err(|err| std::io::Error::other(err.to_string()))?;
    let mut payload = Vec::new();
    loop {
        if queue.leaving(slot) {
            break;
        }
        let Some(taken) = queue.take(slot, &mut payload) else {
            // Wake at least once a second to notice a master that went away.
            // Idle: the application's own threads run meanwhile.
            let woken = py.detach(|| queue.wait(slot, Duration::from_secs(1)));
            if !woken && master_gone(lock(py, &conn).reader.get_ref()) {
                break;
            }
            continue;
        };
        {
            let mut conn = lock(py, &conn);
            conn.begin(taken);
            if taken.fetch {
                conn.flush()?;
                match proto::read_frame(&mut conn.reader, &mut payload)? {
                    Some(kind::REQUEST) => {}
                    None => return Ok(()),
                    Some(other) => return Err(ProtoError::UnexpectedKind(other)),
                }
            }
        }
        wsgi.handle(py, app, &payload)?;
        lock(py, &conn).end(&queue, slot, taken.id, &doorbell)?;
        queue.done(slot);
    }
    // Retired (or the master is gone): tearing down the address space is background work;
    // let serving workers go first.
    let _ = rustix::process::setpriority_process(None, 19);
    Ok(())
}

/// Reads the master's `WELCOME`: this worker's slot, the shared region to map, and the
/// master's doorbell for answers.
fn welcome(socket: &UnixStream) -> Result<(Queue, OwnedFd, u32), ProtoError> {
    use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut bytes = [0u8; 9];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = recvmsg(
        socket,
        &mut [std::io::IoSliceMut::new(&mut bytes)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    let (frame, len) = proto::parse_header(bytes[..5].try_into().expect("5 bytes"))?;
    if received.bytes != 9 || frame != kind::WELCOME || len != 4 {
        return Err(ProtoError::UnexpectedKind(frame));
    }
    let slot = proto::Decoder::new(&bytes[5..]).u32()?;
    let mut fds = fds.into_iter();
    let (Some(region), Some(doorbell)) = (fds.next(), fds.next()) else {
        return Err(std::io::Error::other("the welcome came without its descriptors").into());
    };
    let queue = Queue::open(std::os::fd::AsFd::as_fd(&region))
        .map_err(|error| std::io::Error::other(error.to_string()))?;
    Ok((queue, doorbell, slot))
}

/// Whether the master closed this worker's socket (it sends nothing unasked, so an idle
/// worker's socket is readable only at its end).
fn master_gone(socket: &UnixStream) -> bool {
    use rustix::net::{recv, RecvFlags};
    let mut byte = [0u8; 1];
    match recv(socket, &mut byte, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
        Ok((0, _)) => true,
        Ok(_) => false,
        Err(error) => error != rustix::io::Errno::AGAIN,
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
