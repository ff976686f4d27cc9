//! Binary upgrade without a closed socket: the running master hands its listening sockets to
//! a new `strata run --upgrade` over a Unix socket (`SCM_RIGHTS`), then drains and exits.
//!
//! 1. The running master listens on `admin.upgrade_socket` (by default a path named after
//!    `admin.bind` in the temporary directory). A node refuses to start when a live master
//!    already listens on its path (it asks with `P`, answered `Y`).
//! 2. The new master connects, says `U`, and receives the HTTP listener (if the node has HTTP tiers),
//!    the HTTPS listener (if it has one) and the admin listener, tagged by one byte: `L`
//!    (HTTP, admin), `A` (admin), `T` (HTTP, HTTPS, admin), `S` (HTTPS, admin). It warms its own app
//!    server while the old one keeps serving, then serves the same sockets and sends `R`.
//! 3. The old master unlinks the upgrade socket, answers `A` and shuts down gracefully; the
//!    new master binds the upgrade socket for the next upgrade.
//!
//! If the new master fails before `R` (its application does not import, say), the connection
//! closes and the old master simply keeps serving.
//!
//! # In the running node
//!
//! `handoff.rs` in the binary crate. Every master offers its listening sockets on a Unix socket
//! (`admin.upgrade_socket`) from a thread of its own. `strata run --upgrade` connects, receives
//! the HTTP, HTTPS (when configured) and admin listeners with `SCM_RIGHTS` (a tag byte says
//! which), starts its app server, adopts the (already
//! listening) sockets, and sends `R`; the old master unlinks the upgrade socket, answers `A` and
//! shuts down gracefully, and the new master offers the next upgrade. Both masters accept from
//! the same kernel queue while this happens, so nothing is refused.
//!
//! A node without HTTP tiers (`--tiers cache`) has no HTTP listener; it hands over only its
//! admin listener. The cache tier's listener is not handed over: it is bound with
//! `SO_REUSEPORT`, so the new master binds it beside the old one, and clients reconnect when the
//! old master's connections close. In-memory state (the accelerator's and the cache's stores)
//! starts empty in the new master, as after a restart of Varnish or memcached.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use strata_core::shutdown::{Shutdown, Stage};

/// Where a node's upgrade socket lives by default: named after its admin listener, which
/// every node has and no two live nodes on a host share (a path named after `lb.bind`'s port
/// made every node without HTTP tiers take the same socket).
pub fn default_path(admin: std::net::SocketAddr) -> PathBuf {
    let ip = admin.ip().to_string().replace(':', "_");
    std::env::temp_dir().join(format!("strata-upgrade-{ip}-{}.sock", admin.port()))
}

/// What a connecting process says first: it wants the listeners (`U`), or only asks whether
/// a master is listening here (`P`, answered `Y`).
const WANT: u8 = b'U';
const PROBE: u8 = b'P';

/// Whether a live master offers upgrades on `path` (a socket file nobody listens on is left
/// over from a master that died, and is not).
pub fn in_use(path: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(path) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let mut answer = [0u8; 1];
    // A master of an older build sends its listeners at once instead of answering: live too.
    stream.write_all(&[PROBE]).is_ok() && stream.read(&mut answer).is_ok_and(|n| n == 1)
}

/// The listeners a new master inherits.
pub struct Inherited {
    /// `None` when the old master ran no HTTP tier.
    pub http: Option<std::net::TcpListener>,
    /// `None` when the old master had no HTTPS listener.
    pub https: Option<std::net::TcpListener>,
    pub admin: std::net::TcpListener,
    /// Tells the old master the new one serves; returns once it has let go of the path.
    confirm: UnixStream,
}

/// Connects to the running master and takes its listeners.
pub fn receive(path: &Path) -> std::io::Result<Inherited> {
    let mut stream = UnixStream::connect(path)?;
    stream.write_all(&[WANT])?;
    let mut byte = [0u8; 1];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    rustix::net::recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut byte)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    let (http, https) = match byte[0] {
        b'L' => (true, false),
        b'A' => (false, false),
        b'T' => (true, true),
        b'S' => (false, true),
        _ => {
            return Err(std::io::Error::other(
                "the running master sent no listeners",
            ))
        }
    };
    if fds.len() != 1 + usize::from(http) + usize::from(https) {
        return Err(std::io::Error::other(
            "the running master sent the wrong number of listeners",
        ));
    }
    let mut fds = fds.into_iter().map(std::net::TcpListener::from);
    let mut next = |present: bool| present.then(|| fds.next()).flatten();
    let http = next(http);
    let https = next(https);
    let admin = next(true).expect("counted above");
    Ok(Inherited {
        http,
        https,
        admin,
        confirm: stream,
    })
}

impl Inherited {
    /// Tells the old master to stop and waits until it has released the upgrade socket path.
    pub fn confirm(mut self) -> std::io::Result<()> {
        self.confirm.write_all(b"R")?;
        let mut ack = [0u8; 1];
        self.confirm.read_exact(&mut ack)?;
        Ok(())
    }
}

/// The listeners a master offers, as duplicated descriptors.
pub struct Listeners {
    pub http: Option<OwnedFd>,
    pub https: Option<OwnedFd>,
    pub admin: OwnedFd,
}

/// Offers the listeners (HTTP and HTTPS when the node has them, admin) to a new master on
/// `path` until one takes them; then starts this node's graceful shutdown. Runs on a thread
/// of its own; returns whether it handed over.
pub fn offer(path: PathBuf, listeners: Listeners, shutdown: Shutdown) -> bool {
    use std::os::unix::fs::PermissionsExt;
    // Only a file nobody listens on is removed (the node checked at start; this is for a
    // master that took the path since).
    if in_use(&path) {
        tracing::warn!(path = %path.display(), "binary upgrades unavailable: another master offers upgrades on this socket");
        return false;
    }
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::warn!(%error, path = %path.display(), "binary upgrades unavailable: cannot bind the upgrade socket");
            return false;
        }
    };
    // Only this user may take the listeners.
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    tracing::info!(path = %path.display(), "upgrade socket ready");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        if shutdown.stage() != Stage::Running {
            break;
        }
        // A client that says nothing must not hold the thread.
        let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
        let mut want = [0u8; 1];
        match stream.read_exact(&mut want).map(|()| want[0]) {
            Ok(WANT) => {}
            Ok(PROBE) => {
                let _ = stream.write_all(b"Y");
                continue;
            }
            _ => continue,
        }
        let _ = stream.set_read_timeout(None);
        let Listeners { http, https, admin } = &listeners;
        let fds: Vec<_> = http
            .iter()
            .chain(https)
            .map(|fd| fd.as_fd())
            .chain([admin.as_fd()])
            .collect();
        let tag: &[u8] = match (http.is_some(), https.is_some()) {
            (true, false) => b"L",
            (false, false) => b"A",
            (true, true) => b"T",
            (false, true) => b"S",
        };
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        control.push(SendAncillaryMessage::ScmRights(&fds));
        // From here a stop of this master must leave the sockets listening for the new one.
        shutdown.share_listeners(true);
        if let Err(error) = rustix::net::sendmsg(
            &stream,
            &[IoSlice::new(tag)],
            &mut control,
            SendFlags::empty(),
        ) {
            shutdown.share_listeners(false);
            tracing::warn!(%error, "upgrade handoff failed");
            continue;
        }
        tracing::info!("upgrade: listeners handed to a new master; waiting until it serves");
        let mut ready = [0u8; 1];
        if stream.read_exact(&mut ready).is_err() || ready[0] != b'R' {
            shutdown.share_listeners(false);
            tracing::warn!("upgrade: the new master gave up; this one keeps serving");
            continue;
        }
        let _ = std::fs::remove_file(&path);
        drop(listener);
        let _ = stream.write_all(b"A");
        tracing::info!("upgrade: the new master serves; draining and exiting");
        shutdown.trigger(Stage::Graceful);
        return true;
    }
    false
}
