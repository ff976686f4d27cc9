//! The PostgreSQL wire protocol as the pooler needs it: the untyped startup packets, framing of
//! typed messages, and the few messages the pooler writes itself.

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest message accepted from a client (PostgreSQL's own limit for most messages is 1 GiB;
/// a pooler need not buffer more than a query).
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// Largest startup packet.
const MAX_STARTUP: usize = 10_000;

const PROTOCOL_3: i32 = 196_608;
const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;

/// What a client's first packet asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Startup {
    /// TLS (`tls`) or GSS encryption: answered `S` (TLS, when configured) or `N`, then the
    /// client sends its startup message.
    Encryption { tls: bool },
    /// A query cancel for a backend.
    Cancel { pid: i32, key: i32 },
    /// Protocol 3.x, with `user`, `database` and the other parameters; `minor` is the minor
    /// version asked for (the pooler speaks 3.0 and says so to a client asking more).
    Params {
        params: Vec<(String, String)>,
        minor: u16,
    },
}

/// Why a client's bytes were refused.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("invalid startup packet")]
    BadStartup,
    #[error("unsupported protocol version {0}")]
    Protocol(i32),
    #[error("message of {0} bytes is too large")]
    TooLarge(usize),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads one startup-phase packet.
pub async fn read_startup<R: AsyncRead + Unpin>(stream: &mut R) -> Result<Startup, WireError> {
    let len = stream.read_i32().await?;
    if !(8..=MAX_STARTUP as i32).contains(&len) {
        return Err(WireError::BadStartup);
    }
    let mut body = vec![0u8; len as usize - 4];
    stream.read_exact(&mut body).await?;
    let code = i32::from_be_bytes(body[..4].try_into().expect("4 bytes"));
    match code {
        SSL_REQUEST => Ok(Startup::Encryption { tls: true }),
        GSSENC_REQUEST => Ok(Startup::Encryption { tls: false }),
        CANCEL_REQUEST if body.len() == 12 => Ok(Startup::Cancel {
            pid: i32::from_be_bytes(body[4..8].try_into().expect("4 bytes")),
            key: i32::from_be_bytes(body[8..12].try_into().expect("4 bytes")),
        }),
        code if code >> 16 == PROTOCOL_3 >> 16 => {
            let mut params = Vec::new();
            let mut fields = body[4..].split(|b| *b == 0);
            while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
                if name.is_empty() {
                    break;
                }
                let text =
                    |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| WireError::BadStartup);
                params.push((text(name)?, text(value)?));
            }
            Ok(Startup::Params {
                params,
                minor: (code & 0xffff) as u16,
            })
        }
        other => Err(WireError::Protocol(other)),
    }
}

/// Longest message a client may send before it has logged in (a password or SASL
/// message), as PostgreSQL's own limit for them (`PG_MAX_AUTH_TOKEN_LENGTH`).
pub const MAX_AUTH_MESSAGE: usize = 65_535;

/// Reads one typed message (tag, length, body) whole into `buf`; returns its tag.
pub async fn read_message<R: AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut BytesMut,
) -> Result<u8, WireError> {
    read_message_up_to(stream, buf, MAX_MESSAGE).await
}

/// As [`read_message`], refusing a message longer than `max` bytes. The buffer grows as the
/// bytes arrive, never ahead of them: a length field that claims 64 MiB costs nothing until
/// the 64 MiB come.
pub async fn read_message_up_to<R: AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<u8, WireError> {
    let tag = stream.read_u8().await?;
    let len = stream.read_i32().await?;
    if len < 4 || len as usize > max {
        return Err(WireError::TooLarge(len.max(0) as usize));
    }
    buf.clear();
    buf.put_u8(tag);
    buf.put_i32(len);
    let mut remaining = len as usize - 4;
    while remaining > 0 {
        buf.reserve(remaining.min(64 * 1024));
        let read = (&mut *stream).take(remaining as u64).read_buf(buf).await?;
        if read == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        remaining -= read;
    }
    Ok(tag)
}

/// A cancel request for backend `pid` with its secret `key`.
pub fn cancel_request(pid: i32, key: i32) -> [u8; 16] {
    let mut packet = [0u8; 16];
    packet[..4].copy_from_slice(&16i32.to_be_bytes());
    packet[4..8].copy_from_slice(&CANCEL_REQUEST.to_be_bytes());
    packet[8..12].copy_from_slice(&pid.to_be_bytes());
    packet[12..].copy_from_slice(&key.to_be_bytes());
    packet
}

fn message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// One message with `tag` and the body `fill` writes, on its own.
pub fn framed(tag: u8, fill: impl FnOnce(&mut BytesMut)) -> bytes::Bytes {
    let mut out = BytesMut::new();
    message(&mut out, tag, fill);
    out.freeze()
}

/// The length of the whole message at the front of `buf`, once all of it is there.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, WireError> {
    let Some(header) = buf.get(1..5) else {
        return Ok(None);
    };
    let len = i32::from_be_bytes(header.try_into().expect("4 bytes"));
    if len < 4 || len as usize > MAX_MESSAGE {
        return Err(WireError::TooLarge(len.max(0) as usize));
    }
    let total = 1 + len as usize;
    Ok((buf.len() >= total).then_some(total))
}

pub fn authentication_ok(out: &mut BytesMut) {
    message(out, b'R', |b| b.put_i32(0));
}

/// `AuthenticationMD5Password` with `salt`.
pub fn authentication_md5(out: &mut BytesMut, salt: [u8; 4]) {
    message(out, b'R', |b| {
        b.put_i32(5);
        b.put_slice(&salt);
    });
}

/// `AuthenticationSASL` offering SCRAM-SHA-256.
pub fn authentication_sasl(out: &mut BytesMut) {
    message(out, b'R', |b| {
        b.put_i32(10);
        b.put_slice(b"SCRAM-SHA-256\0\0");
    });
}

/// `AuthenticationSASLContinue` (11) or `AuthenticationSASLFinal` (12) with `data`.
pub fn authentication_sasl_step(out: &mut BytesMut, code: i32, data: &[u8]) {
    message(out, b'R', |b| {
        b.put_i32(code);
        b.put_slice(data);
    });
}

/// The name and value of a whole `ParameterStatus` message (framing included).
pub fn parameter_status_fields(message: &[u8]) -> Option<(String, String)> {
    let body = message.get(5..)?;
    let end = memchr::memchr(0, body)?;
    let rest = &body[end + 1..];
    let value_end = memchr::memchr(0, rest)?;
    Some((
        String::from_utf8_lossy(&body[..end]).into_owned(),
        String::from_utf8_lossy(&rest[..value_end]).into_owned(),
    ))
}

pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    message(out, b'S', |b| {
        b.put_slice(name.as_bytes());
        b.put_u8(0);
        b.put_slice(value.as_bytes());
        b.put_u8(0);
    });
}

pub fn backend_key_data(out: &mut BytesMut, pid: i32, key: i32) {
    message(out, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(key);
    });
}

/// `NegotiateProtocolVersion`: the pooler speaks 3.0 and none of the `_pq_.` options.
pub fn negotiate_protocol_version(out: &mut BytesMut, unknown: &[&str]) {
    message(out, b'v', |b| {
        // The newest version spoken, whole (major << 16 | minor), as PostgreSQL sends it.
        b.put_i32(PROTOCOL_3);
        b.put_i32(unknown.len() as i32);
        for name in unknown {
            b.put_slice(name.as_bytes());
            b.put_u8(0);
        }
    });
}

/// A simple `Query`.
pub fn query(out: &mut BytesMut, sql: &str) {
    message(out, b'Q', |b| {
        b.put_slice(sql.as_bytes());
        b.put_u8(0);
    });
}

pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    message(out, b'Z', |b| b.put_u8(status));
}

/// An `ErrorResponse` with severity FATAL or ERROR, a SQLSTATE and a message.
pub fn error_response(out: &mut BytesMut, severity: &str, code: &str, text: &str) {
    message(out, b'E', |b| {
        for (field, value) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', code),
            (b'M', text),
        ] {
            b.put_u8(field);
            b.put_slice(value.as_bytes());
            b.put_u8(0);
        }
        b.put_u8(0);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: i32, rest: &[u8]) -> Vec<u8> {
        let mut p = ((8 + rest.len()) as i32).to_be_bytes().to_vec();
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(rest);
        p
    }

    #[tokio::test]
    async fn startup_packets() {
        let bytes = packet(PROTOCOL_3, b"user\0app\0database\0db\0\0");
        assert_eq!(
            read_startup(&mut &bytes[..]).await.unwrap(),
            Startup::Params {
                params: vec![
                    ("user".into(), "app".into()),
                    ("database".into(), "db".into())
                ],
                minor: 0
            }
        );
        let ssl = packet(SSL_REQUEST, b"");
        assert_eq!(
            read_startup(&mut &ssl[..]).await.unwrap(),
            Startup::Encryption { tls: true }
        );
        let mut cancel = packet(CANCEL_REQUEST, &7i32.to_be_bytes());
        cancel.extend_from_slice(&9i32.to_be_bytes());
        cancel[3] = 16;
        assert_eq!(
            read_startup(&mut &cancel[..]).await.unwrap(),
            Startup::Cancel { pid: 7, key: 9 }
        );
        let newer = packet(PROTOCOL_3 + 2, b"user\0app\0\0");
        assert!(matches!(
            read_startup(&mut &newer[..]).await.unwrap(),
            Startup::Params { minor: 2, .. }
        ));
        assert!(read_startup(&mut &packet(1234, b"")[..]).await.is_err());
        assert!(read_startup(&mut &[0xff, 0xff, 0xff, 0xff][..])
            .await
            .is_err());
    }

    #[tokio::test]
    async fn typed_messages_are_framed_whole() {
        let mut out = BytesMut::new();
        ready_for_query(&mut out, b'I');
        error_response(&mut out, "ERROR", "08P01", "bad");
        let mut reader = &out[..];
        let mut buf = BytesMut::new();
        assert_eq!(read_message(&mut reader, &mut buf).await.unwrap(), b'Z');
        assert_eq!(&buf[..], b"Z\0\0\0\x05I");
        assert_eq!(read_message(&mut reader, &mut buf).await.unwrap(), b'E');
        assert!(read_message(&mut &b"Q\0\0\0\x01"[..], &mut buf)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn a_claimed_length_costs_nothing_until_the_bytes_come() {
        // A message that claims 60 MiB and brings 10 bytes: refused for its end, with no
        // 60 MiB allocated (seen while fuzzing: the buffer was sized from the claim, before login too).
        let mut claim = b"p".to_vec();
        claim.extend_from_slice(&(60i32 << 20).to_be_bytes());
        claim.extend_from_slice(b"0123456789");
        let mut buf = BytesMut::new();
        assert!(read_message(&mut &claim[..], &mut buf).await.is_err());
        assert!(
            buf.capacity() < 1 << 20,
            "{} bytes reserved",
            buf.capacity()
        );
        // Before login, 64 KiB is the most a message may be.
        assert!(matches!(
            read_message_up_to(&mut &claim[..], &mut buf, MAX_AUTH_MESSAGE).await,
            Err(WireError::TooLarge(_))
        ));
        let mut whole = b"p".to_vec();
        whole.extend_from_slice(&(4 + 200_000i32).to_be_bytes());
        whole.extend(std::iter::repeat_n(b'x', 200_000));
        assert_eq!(read_message(&mut &whole[..], &mut buf).await.unwrap(), b'p');
        assert_eq!(buf.len(), 5 + 200_000);
    }
}
