//! The zygote: a single-threaded process that imports and warms the application once, then
//! forks warm workers on the master's request.
//!
//! It is the one process in Strata that forks without exec. It never starts a thread (no
//! tokio, no Python threads before a fork), so a forked worker inherits a consistent
//! interpreter. It is started by the master re-executing the binary with
//! [`control::ROLE_ENV`] set; its standard input is the control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use pyo3::prelude::*;
use rustix::event::{poll, PollFd, PollFlags};
use rustix::process::{waitpid, WaitOptions};

use crate::control::{self, FromZygote, ToZygote, ZygoteSpec};
use crate::{proctitle, python, worker};

/// Runs the zygote; returns the process exit code.
pub fn main() -> i32 {
    let ctl = match take_control_socket() {
        Ok(ctl) => ctl,
        Err(error) => {
            eprintln!("strata zygote: no control socket on stdin: {error}");
            return 2;
        }
    };
    let mut reader = BufReader::new(ctl.try_clone().expect("dup control socket"));
    let mut writer = ctl;
    let mut line = String::new();
    let spec: ZygoteSpec = match reader
        .read_line(&mut line)
        .map(|_| control::from_line(&line))
    {
        Ok(Ok(spec)) => spec,
        other => {
            eprintln!("strata zygote: bad spec from master: {other:?}");
            return 2;
        }
    };
    strata_core::logging::init(&spec.log.level, spec.log.json);
    proctitle::set(&format!("strata zygote gen={}", spec.generation));
    // If the master dies, so does the zygote; its workers see their socket close and exit.
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM));

    // Everything before serving (import, warm-up, forks, each worker's warm-up) yields the CPU
    // to the workers that are serving; a worker returns to normal priority before its hello.
    let niced = lower_priority(spec.app.warmup_nice);
    Python::initialize();
    Python::attach(|py| {
        let app = match python::initialise(py, &spec)
            .map_err(|err| python::format_error(py, &err))
            .and_then(|()| python::load_app(py, &spec))
        {
            Ok(app) => app,
            Err(error) => {
                send(&mut writer, &FromZygote::Failed { error });
                return 1;
            }
        };
        if let Err(error) = python::warm_up(py, &spec, &app, false) {
            send(&mut writer, &FromZygote::Failed { error });
            return 1;
        }
        if let Err(err) = prepare_for_forks(py) {
            let error = python::format_error(py, &err);
            send(&mut writer, &FromZygote::Failed { error });
            return 1;
        }
        send(&mut writer, &FromZygote::Ready);
        tracing::info!(generation = spec.generation, "zygote ready");
        serve(py, &spec, &app, reader, writer, niced)
    })
}

/// Lowers this process's priority to `nice` if it will be allowed to raise it back to 0
/// (root, or an `RLIMIT_NICE` that permits nice 0); true if it did.
fn lower_priority(nice: i32) -> bool {
    if nice == 0 {
        return false;
    }
    let may_restore = rustix::process::geteuid().is_root()
        || rustix::process::getrlimit(rustix::process::Resource::Nice)
            .current
            .is_none_or(|limit| limit >= 20);
    may_restore && rustix::process::setpriority_process(None, nice).is_ok()
}

/// Takes the control socket from standard input and puts `/dev/null` in its place, so the
/// application cannot read the control channel by accident.
fn take_control_socket() -> std::io::Result<UnixStream> {
    let fd = rustix::io::dup(std::io::stdin())?;
    let null = std::fs::File::open("/dev/null")?;
    rustix::stdio::dup2_stdin(&null)?;
    Ok(UnixStream::from(fd))
}

/// Collects garbage once and freezes what survives, so workers do not dirty the shared pages
/// by scanning them; collection stays off in the zygote and is turned back on in each worker.
fn prepare_for_forks(py: Python<'_>) -> PyResult<()> {
    let gc = py.import("gc")?;
    gc.call_method0("collect")?;
    gc.call_method0("disable")?;
    gc.call_method0("freeze")?;
    Ok(())
}

fn send(writer: &mut UnixStream, message: &FromZygote) {
    if let Err(error) = writer.write_all(control::to_line(message).as_bytes()) {
        tracing::warn!(%error, "control socket write failed");
    }
}

/// The zygote's loop: fork on request, reap and report exited workers.
fn serve(
    py: Python<'_>,
    spec: &ZygoteSpec,
    app: &Bound<'_, PyAny>,
    mut reader: BufReader<UnixStream>,
    mut writer: UnixStream,
    niced: bool,
) -> i32 {
    let fork = match py.import("os").and_then(|os| os.getattr("fork")) {
        Ok(fork) => fork,
        Err(err) => {
            tracing::error!("os.fork unavailable: {}", python::format_error(py, &err));
            return 1;
        }
    };
    let mut quitting = false;
    let mut children = 0usize;
    let mut line = String::new();
    loop {
        children -= reap(&mut writer);
        if quitting && children == 0 {
            return 0;
        }
        if reader.buffer().is_empty() && !readable(reader.get_ref(), Duration::from_millis(200)) {
            continue;
        }
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) if !quitting => {
                // The master is gone: nothing will ask for workers again.
                quitting = true;
            }
            Ok(0) | Err(_) => std::thread::sleep(Duration::from_millis(50)),
            Ok(_) => match control::from_line::<ToZygote>(&line) {
                Ok(ToZygote::Fork { id }) => {
                    py.import("gc")
                        .and_then(|gc| gc.call_method0("freeze"))
                        .ok();
                    match fork.call0().and_then(|pid| pid.extract::<i32>()) {
                        Ok(0) => {
                            drop(reader);
                            drop(writer);
                            worker::run(py, spec, id, app, niced);
                        }
                        Ok(pid) => {
                            children += 1;
                            send(
                                &mut writer,
                                &FromZygote::Forked {
                                    id,
                                    pid: pid as u32,
                                },
                            );
                        }
                        Err(err) => {
                            tracing::error!("fork failed: {}", python::format_error(py, &err));
                        }
                    }
                }
                Ok(ToZygote::Quit) => {
                    // An old generation's exit is background work too.
                    let _ = rustix::process::setpriority_process(None, 19);
                    quitting = true;
                }
                Err(error) => tracing::warn!(%error, line = line.trim(), "bad control message"),
            },
        }
    }
}

fn readable(stream: &UnixStream, timeout: Duration) -> bool {
    let timeout = rustix::time::Timespec {
        tv_sec: timeout.as_secs() as _,
        tv_nsec: timeout.subsec_nanos() as _,
    };
    let mut fds = [PollFd::new(stream, PollFlags::IN)];
    matches!(poll(&mut fds, Some(&timeout)), Ok(n) if n > 0)
}

/// Reaps every exited child and reports it; returns how many were reaped.
fn reap(writer: &mut UnixStream) -> usize {
    let mut reaped = 0;
    while let Ok(Some((pid, status))) = waitpid(None, WaitOptions::NOHANG) {
        reaped += 1;
        let status = if let Some(code) = status.exit_status() {
            format!("exit code {code}")
        } else if let Some(signal) = status.terminating_signal() {
            format!("killed by {}", signal_name(signal))
        } else {
            format!("status {}", status.as_raw())
        };
        send(
            writer,
            &FromZygote::Exited {
                pid: pid.as_raw_nonzero().get() as u32,
                status,
            },
        );
    }
    reaped
}

fn signal_name(signal: i32) -> String {
    let name = match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        _ => return format!("signal {signal}"),
    };
    name.to_string()
}
