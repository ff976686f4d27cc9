//! A zygote as the master sees it: the process, its control channel, and the reader task
//! that turns its messages into supervisor events. Also the greeting of each new worker.

use std::hash::BuildHasher;
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::Child;
use tokio::sync::mpsc;

use super::dispatch::watch;
use super::pool::WorkerConn;
use super::supervisor::Event;
use super::{Shared, StartError};
use crate::control::{self, FromZygote, ToZygote, ZygoteSpec};
use crate::proto::{self, kind};
use crate::{proctitle, python};

/// A running zygote.
pub struct Zygote {
    pub generation: u32,
    child: Child,
    writer: OwnedWriteHalf,
    /// Taken by the reader task once the zygote is ready.
    lines: Option<Lines<BufReader<OwnedReadHalf>>>,
}

impl Zygote {
    /// Starts a zygote and waits until the application is imported and warm.
    pub async fn start(spec: &ZygoteSpec) -> Result<Self, StartError> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(StartError::Spawn)?;
        let (title, padding) = proctitle::zygote_args(spec.generation);
        let exe = std::env::current_exe().map_err(StartError::Spawn)?;
        let mut command = tokio::process::Command::new(exe);
        command
            .arg0(title)
            .arg(padding)
            .env(control::ROLE_ENV, "zygote")
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            // Ctrl-C reaches the master only; it decides what the children do.
            .process_group(0)
            .kill_on_drop(true);
        if std::env::var_os("PYTHONHOME").is_none() {
            command.env("PYTHONHOME", python::PYTHON_HOME);
        }
        if std::env::var_os("PYTHONUNBUFFERED").is_none() {
            command.env("PYTHONUNBUFFERED", "1");
        }
        let child = command.spawn().map_err(StartError::Spawn)?;
        ours.set_nonblocking(true).map_err(StartError::Spawn)?;
        let (reader, writer) = UnixStream::from_std(ours)
            .map_err(StartError::Spawn)?
            .into_split();
        let mut zygote = Self {
            generation: spec.generation,
            child,
            writer,
            lines: Some(BufReader::new(reader).lines()),
        };
        zygote.send_line(control::to_line(spec)).await?;
        loop {
            match zygote.next().await {
                Some(FromZygote::Ready) => return Ok(zygote),
                Some(FromZygote::Failed { error }) => return Err(StartError::AppLoad(error)),
                Some(other) => tracing::debug!(?other, "zygote message before ready"),
                None => {
                    let status = zygote.child.wait().await.map_err(StartError::Spawn)?;
                    return Err(StartError::AppLoad(format!(
                        "the zygote exited during start-up ({status})"
                    )));
                }
            }
        }
    }

    async fn send_line(&mut self, line: String) -> Result<(), StartError> {
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(StartError::Spawn)
    }

    pub async fn send(&mut self, message: &ToZygote) -> Result<(), StartError> {
        self.send_line(control::to_line(message)).await
    }

    /// The next message; `None` once the zygote is gone.
    async fn next(&mut self) -> Option<FromZygote> {
        next_message(self.lines.as_mut()?).await
    }

    /// From now on, the zygote's messages arrive as [`Event::Zygote`]; the last one carries
    /// `None` (the zygote exited).
    pub fn forward_messages(&mut self, events: mpsc::UnboundedSender<Event>) {
        let Some(mut lines) = self.lines.take() else {
            return;
        };
        let generation = self.generation;
        tokio::spawn(async move {
            loop {
                let message = next_message(&mut lines).await;
                let gone = message.is_none();
                if events
                    .send(Event::Zygote {
                        generation,
                        message,
                    })
                    .is_err()
                    || gone
                {
                    return;
                }
            }
        });
    }

    /// Waits up to `wait` for the zygote to exit, then kills it.
    pub async fn finish(mut self, wait: Duration) {
        if tokio::time::timeout(wait, self.child.wait()).await.is_err() {
            tracing::warn!(
                generation = self.generation,
                "the zygote did not exit in time; killing it"
            );
            let _ = self.child.kill().await;
        }
    }

    /// Asks for `count` workers and waits until each has connected.
    pub async fn first_workers(
        &mut self,
        shared: &Arc<Shared>,
        listener: &UnixListener,
        count: usize,
        next_id: &mut u32,
    ) -> Result<(), StartError> {
        for _ in 0..count {
            *next_id += 1;
            self.send(&ToZygote::Fork { id: *next_id }).await?;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        for _ in 0..count {
            let accepted = tokio::time::timeout_at(deadline, listener.accept()).await;
            let (stream, _) = accepted
                .map_err(|_| StartError::Workers("workers did not connect within 60s".into()))?
                .map_err(StartError::Spawn)?;
            let worker = hello(stream, shared)
                .await
                .map_err(|e| StartError::Workers(e.to_string()))?;
            shared.pool.add(&worker);
            watch(shared.clone(), worker);
        }
        Ok(())
    }
}

/// Reads a worker's greeting, gives it a slot and the shared region (`WELCOME`, with the
/// region's descriptor attached), and wraps its socket.
pub(super) async fn hello(
    stream: UnixStream,
    shared: &Shared,
) -> Result<WorkerConn, proto::ProtoError> {
    let config = shared.config();
    let (reader, writer) = stream.into_split();
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let mut header = [0u8; 5];
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_exact(&mut reader, &mut header),
    )
    .await
    .map_err(|_| std::io::Error::other("no hello within 10s"))??;
    let (frame, len) = proto::parse_header(header)?;
    if frame != kind::HELLO || len != 12 {
        return Err(proto::ProtoError::UnexpectedKind(frame));
    }
    let mut payload = [0u8; 12];
    tokio::io::AsyncReadExt::read_exact(&mut reader, &mut payload).await?;
    let mut dec = proto::Decoder::new(&payload);
    let (id, generation, pid) = (dec.u32()?, dec.u32()?, dec.u32()?);
    let slot = shared
        .dispatch
        .slot()
        .ok_or_else(|| std::io::Error::other("no free worker slot"))?;
    let mut welcome = proto::Encoder::new();
    welcome.begin(kind::WELCOME).u32(slot.index()).finish();
    send_with_fds(
        reader.get_ref().as_ref(),
        welcome.bytes(),
        &[shared.dispatch.region(), shared.dispatch.doorbell()],
    )?;
    Ok(WorkerConn {
        id,
        pid,
        generation,
        slot,
        reader,
        writer,
        limit: request_limit(&config, id),
    })
}

/// Sends a small message with two descriptors attached (`SCM_RIGHTS`). The socket is new
/// and empty, so the message fits its buffer and the call does not block.
fn send_with_fds(
    socket: &UnixStream,
    bytes: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>; 2],
) -> std::io::Result<()> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(fds));
    let sent = sendmsg(
        socket,
        &[std::io::IoSlice::new(bytes)],
        &mut control,
        SendFlags::empty(),
    )?;
    if sent != bytes.len() {
        return Err(std::io::Error::other("short write of the worker's welcome"));
    }
    Ok(())
}

/// `max_requests` plus this worker's share of the jitter; never for 0.
pub(super) fn request_limit(config: &crate::AppConfig, id: u32) -> u64 {
    if config.max_requests == 0 {
        return u64::MAX;
    }
    let jitter = match config.max_requests_jitter {
        0 => 0,
        j => std::collections::hash_map::RandomState::new().hash_one(id) % (j + 1),
    };
    config.max_requests + jitter
}

async fn next_message(lines: &mut Lines<BufReader<OwnedReadHalf>>) -> Option<FromZygote> {
    loop {
        let line = lines.next_line().await.ok()??;
        match control::from_line(&line) {
            Ok(message) => return Some(message),
            Err(error) => tracing::warn!(%error, %line, "bad message from zygote"),
        }
    }
}
