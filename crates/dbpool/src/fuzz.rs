//! Entry points of the fuzz targets (`fuzz/`), compiled only under `cfg(fuzzing)`.

use std::future::Future;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;

use crate::{prepared, scram, state, wire};

/// Runs a future that never waits (its reader is a byte slice) to its end.
fn now<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
    }
}

/// A client's first bytes: the startup packet (or a TLS, GSS or cancel request).
pub fn startup(data: &[u8]) {
    let mut reader = data;
    if let Ok(wire::Startup::Params { params, .. }) = now(wire::read_startup(&mut reader)) {
        assert!(params.iter().all(|(name, _)| !name.is_empty()));
    }
}

/// A logged-in client's messages, each read as the pooler reads that kind: simple and
/// extended queries (the session-state and prepared-statement scanners), Describe, Close.
pub fn frontend(data: &[u8]) {
    let mut reader = data;
    let mut buf = BytesMut::new();
    while let Ok(tag) = now(wire::read_message(&mut reader, &mut buf)) {
        let msg = &buf[..];
        let sql = match tag {
            b'Q' => msg
                .get(5..)
                .and_then(|b| prepared::cstr(b))
                .map(|(sql, _)| sql),
            b'P' => prepared::parse_text(msg),
            _ => None,
        };
        if let Some(sql) = sql {
            let _ = state::session_state(sql);
            let _ = state::ordinary(sql);
            let _ = state::plain_begin(sql);
            let _ = state::drops_all_statements(sql);
            let _ = state::drops_database(sql);
            let _ = state::deallocates(sql);
        }
        if tag == b'B' {
            if let Some((portal, _, rest)) = prepared::bind_parts(msg) {
                let rebound = prepared::rebind(portal, 7, rest);
                assert_eq!(prepared::bind_parts(&rebound).map(|p| p.2), Some(rest));
            }
        }
        if matches!(tag, b'D' | b'C') {
            let _ = prepared::target(msg);
        }
        let _ = wire::parameter_status_fields(msg);
    }
}

/// A SCRAM-SHA-256 login: client-first and client-final, split at the first NUL. Without
/// the password no client-final may pass.
pub fn scram(data: &[u8]) {
    static VERIFIER: OnceLock<scram::Verifier> = OnceLock::new();
    let verifier = VERIFIER.get_or_init(|| scram::Verifier::new("fuzz-password", b"salt"));
    let (first, last) = match data.iter().position(|b| *b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    if let Ok(exchange) = scram::server_first(first, &[7; 18], verifier) {
        assert!(
            exchange.verify(last).is_err(),
            "a login passed without the password"
        );
    }
}
