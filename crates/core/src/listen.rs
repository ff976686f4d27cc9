//! Accept loops for the tiers that serve protocols of their own (cache, dbpool), over TCP and
//! Unix listeners alike, until shutdown.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::Shutdown;

/// A listener a tier accepts connections on.
pub trait Accept: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    fn accept_one(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Accept for TcpListener {
    type Stream = TcpStream;

    async fn accept_one(&self) -> std::io::Result<TcpStream> {
        let (stream, _) = self.accept().await?;
        // Request-response protocols: never wait to fill a segment.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

impl Accept for UnixListener {
    type Stream = UnixStream;

    async fn accept_one(&self) -> std::io::Result<UnixStream> {
        Ok(self.accept().await?.0)
    }
}

/// Stops `listener` listening for good, so that connections arriving from now on are
/// refused at once (a balancer in front retries elsewhere) instead of queueing in the kernel
/// until the process exits: other descriptors of the socket (the copies kept for a binary
/// upgrade) would otherwise keep it listening. Connections still queued are reset, so accept
/// those first. A socket shared with a new master (`Shutdown::listeners_shared`) is left alone.
pub fn stop_listening(listener: &TcpListener, shutdown: &Shutdown) {
    if shutdown.listeners_shared() {
        return;
    }
    if let Err(error) = rustix::net::shutdown(listener, rustix::net::Shutdown::Read) {
        tracing::debug!(%error, "cannot shut the listening socket");
    }
}

/// Hands every connection accepted on `listener` to `handle` until `shutdown` is requested.
///
/// A failed accept (out of file descriptors, say) pauses the loop instead of spinning: the
/// pause doubles from 10 ms up to a second while accepts keep failing, and the failures are
/// logged at most once a second, with how many there were since the last line.
pub async fn accept_until<L: Accept>(
    listener: L,
    shutdown: Shutdown,
    what: &'static str,
    mut handle: impl FnMut(L::Stream),
) {
    let mut failures = AcceptFailures::default();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept_one() => accepted,
            () = shutdown.requested() => return,
        };
        match accepted {
            Ok(stream) => {
                failures.succeeded();
                handle(stream);
            }
            Err(error) => {
                if !failures.pause(what, &error, &shutdown).await {
                    return;
                }
            }
        }
    }
}

/// Whether a listener of tier `what` may log an accept failure at `now`: a tier's listeners
/// (TCP and Unix) fail together when the process is out of file descriptors, and one line a
/// second from the tier says so.
fn tier_may_log(what: &str, now: std::time::Instant) -> bool {
    static LOGGED: std::sync::Mutex<Vec<(String, std::time::Instant)>> =
        std::sync::Mutex::new(Vec::new());
    let mut logged = LOGGED.lock().unwrap_or_else(|e| e.into_inner());
    match logged.iter_mut().find(|(tier, _)| tier == what) {
        Some((_, at)) if now.duration_since(*at) < Duration::from_secs(1) => false,
        Some((_, at)) => {
            *at = now;
            true
        }
        None => {
            logged.push((what.to_owned(), now));
            true
        }
    }
}

/// An accept loop's record of failed accepts: how long to pause, and when it last logged.
#[derive(Debug, Default)]
pub struct AcceptFailures {
    pause: Duration,
    logged: Option<std::time::Instant>,
    unlogged: u64,
}

impl AcceptFailures {
    /// An accept succeeded: the next failure pauses briefly again.
    pub fn succeeded(&mut self) {
        self.pause = Duration::ZERO;
    }

    /// An accept failed with `error`: logs (at most once a second, with the count) and
    /// pauses; false if shutdown was requested meanwhile.
    pub async fn pause(&mut self, what: &str, error: &std::io::Error, shutdown: &Shutdown) -> bool {
        let now = std::time::Instant::now();
        let pause = self.failed(now, |count| {
            let turn = tier_may_log(what, now);
            if turn {
                tracing::warn!(%error, failures = count, "{what}: accept failed");
            }
            turn
        });
        tokio::select! {
            () = tokio::time::sleep(pause) => true,
            () = shutdown.requested() => false,
        }
    }

    const FIRST_PAUSE: Duration = Duration::from_millis(10);
    const LONGEST_PAUSE: Duration = Duration::from_secs(1);

    /// Counts a failure at `now`, calls `log` with the failures since the last line when a
    /// second has passed since it (`log` says whether it wrote the line: if not, they are
    /// counted into the next), and gives the pause before the next accept.
    fn failed(&mut self, now: std::time::Instant, log: impl FnOnce(u64) -> bool) -> Duration {
        self.unlogged += 1;
        if self
            .logged
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
            && log(self.unlogged)
        {
            self.unlogged = 0;
            self.logged = Some(now);
        }
        self.pause = (self.pause * 2).clamp(Self::FIRST_PAUSE, Self::LONGEST_PAUSE);
        self.pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_accepts_back_off_and_log_once_a_second() {
        let mut failures = AcceptFailures::default();
        let start = std::time::Instant::now();
        let mut lines = Vec::new();
        let mut pauses = Vec::new();
        // 200 failures over 4 s, 20 ms apart.
        for i in 0..200u64 {
            let now = start + Duration::from_millis(20 * i);
            pauses.push(failures.failed(now, |count| {
                lines.push(count);
                true
            }));
        }
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(lines[0], 1);
        assert_eq!(lines.iter().sum::<u64>() + failures.unlogged, 200);
        assert_eq!(pauses[0], Duration::from_millis(10));
        assert_eq!(pauses[1], Duration::from_millis(20));
        assert_eq!(
            *pauses.last().unwrap_or(&Duration::ZERO),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn the_listeners_of_one_tier_log_one_line_a_second_between_them() {
        let start = std::time::Instant::now();
        let (mut tcp, mut unix) = (AcceptFailures::default(), AcceptFailures::default());
        let mut lines = Vec::new();
        for i in 0..100u64 {
            let now = start + Duration::from_millis(20 * i);
            for (name, failures) in [("tcp", &mut tcp), ("unix", &mut unix)] {
                failures.failed(now, |count| {
                    let turn = tier_may_log("test-tier", now);
                    if turn {
                        lines.push((name, count));
                    }
                    turn
                });
            }
        }
        // Two seconds of failures on both: two lines, and no failure left uncounted.
        assert_eq!(lines.len(), 2, "{lines:?}");
        let counted: u64 = lines.iter().map(|(_, count)| count).sum();
        assert_eq!(counted + tcp.unlogged + unix.unlogged, 200);
    }
}
