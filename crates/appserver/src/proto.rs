//! The framed protocol between the master and its workers.
//!
//! A frame is a one-byte kind, a little-endian `u32` payload length, then the payload. A
//! request frame (CGI variables and the start of the body) reaches a worker through the
//! shared queue ([`crate::queue`]); everything else goes over the worker's Unix socket. The
//! worker opens each exchange with `BEGIN` (which request it took), pulls body bytes with
//! `READ`, and answers with a head, body chunks and an end. Nothing the master sends is
//! unsolicited, so a response that ends early cannot leave stray body frames in the stream.

use std::io::{self, Read};

/// Frame kinds. Master → worker are below 10, worker → master from 10.
pub mod kind {
    /// A request: body flags, CGI variables, start of body. It comes in a cell of the shared
    /// queue, or over the socket when it was too large for one.
    pub const REQUEST: u8 = 1;
    /// Body bytes answering a `READ`; an empty payload marks the end of the body.
    pub const BODY: u8 = 2;
    /// The request body failed (client gone, or over the size limit).
    pub const BODY_ERROR: u8 = 3;
    /// The master's answer to a worker's hello: its slot in the shared region (`u32`); the
    /// region's descriptor comes attached (`SCM_RIGHTS`).
    pub const WELCOME: u8 = 6;
    /// Worker greeting: id, generation, pid.
    pub const HELLO: u8 = 10;
    /// The worker wants up to `u32` more body bytes.
    pub const READ: u8 = 11;
    /// Response status, reason and headers.
    pub const HEAD: u8 = 12;
    /// Response body bytes.
    pub const CHUNK: u8 = 13;
    /// The response is complete; the worker is idle.
    pub const END: u8 = 14;
    /// The application failed after the head was sent; the response must be cut short. The
    /// worker is idle.
    pub const ABORT: u8 = 15;
    /// Invalidate cached responses (`strata.purge_url`, `strata.purge_tags`): flags, then
    /// the URLs or tags; answered with `PURGED`.
    pub const PURGE: u8 = 16;
    /// How many cached objects a `PURGE` affected (`u32`).
    pub const PURGED: u8 = 4;
    /// Memcached protocol commands for the node's cache tier (`strata.django.StrataCache`);
    /// answered with `CACHE_REPLY`.
    pub const CACHE: u8 = 17;
    /// The cache tier's answers to a `CACHE` frame.
    pub const CACHE_REPLY: u8 = 5;
    /// The worker took a request from the shared queue: its id (`u64`) and whether the
    /// request must be sent over the socket (`u8`, 1 when it was too large for a cell).
    /// First of every exchange.
    pub const BEGIN: u8 = 18;
}

/// Bytes of a whole `BEGIN` frame, header included.
pub const BEGIN_FRAME: usize = 5 + 9;

/// Frames larger than this are a protocol error.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// Bytes a worker asks for per body read.
pub const READ_SIZE: u32 = 64 * 1024;

/// Body flag: the request frame carries the whole body.
pub const BODY_COMPLETE: u8 = 1;

/// `PURGE` flag: mark stale instead of removing.
pub const PURGE_SOFT: u8 = 1;
/// `PURGE` flag: the strings are surrogate keys, not URLs.
pub const PURGE_TAGS: u8 = 2;

/// Encodes a `PURGE` frame.
pub fn encode_purge(enc: &mut Encoder, flags: u8, items: &[String]) {
    enc.begin(kind::PURGE).u8(flags).u32(items.len() as u32);
    for item in items {
        enc.long(item.as_bytes());
    }
    enc.finish();
}

/// Decodes a `PURGE` payload into its flags and strings.
pub fn decode_purge(payload: &[u8]) -> Result<(u8, Vec<String>), ProtoError> {
    let mut dec = Decoder::new(payload);
    let flags = dec.u8()?;
    let count = dec.u32()? as usize;
    let mut items = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        items.push(String::from_utf8_lossy(dec.long()?).into_owned());
    }
    Ok((flags, items))
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("truncated frame payload")]
    Truncated,
    #[error("unexpected frame kind {0}")]
    UnexpectedKind(u8),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Builds frames into one buffer, so a whole exchange can go out in one write.
#[derive(Debug, Default)]
pub struct Encoder {
    buf: Vec<u8>,
    frame_start: usize,
}

impl Encoder {
    /// An empty encoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty encoder with room for `bytes`.
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            buf: Vec::with_capacity(bytes),
            frame_start: 0,
        }
    }

    /// Starts a frame of `kind`; its length is filled in by [`Encoder::finish`].
    pub fn begin(&mut self, kind: u8) -> &mut Self {
        self.frame_start = self.buf.len();
        self.buf.push(kind);
        self.buf.extend_from_slice(&[0; 4]);
        self
    }

    /// Completes the frame started by [`Encoder::begin`].
    pub fn finish(&mut self) {
        let len = (self.buf.len() - self.frame_start - 5) as u32;
        self.buf[self.frame_start + 1..self.frame_start + 5].copy_from_slice(&len.to_le_bytes());
    }

    /// Appends a whole frame.
    pub fn frame(&mut self, kind: u8, payload: &[u8]) {
        self.begin(kind).raw(payload).finish();
    }

    pub fn u8(&mut self, value: u8) -> &mut Self {
        self.buf.push(value);
        self
    }

    pub fn u16(&mut self, value: u16) -> &mut Self {
        self.buf.extend_from_slice(&value.to_le_bytes());
        self
    }

    pub fn u32(&mut self, value: u32) -> &mut Self {
        self.buf.extend_from_slice(&value.to_le_bytes());
        self
    }

    pub fn u64(&mut self, value: u64) -> &mut Self {
        self.buf.extend_from_slice(&value.to_le_bytes());
        self
    }

    /// Bytes with a `u16` length prefix (names).
    pub fn short(&mut self, bytes: &[u8]) -> &mut Self {
        let len = bytes.len().min(u16::MAX as usize);
        self.u16(len as u16).raw(&bytes[..len])
    }

    /// Bytes with a `u32` length prefix (values).
    pub fn long(&mut self, bytes: &[u8]) -> &mut Self {
        self.u32(bytes.len() as u32).raw(bytes)
    }

    /// Bytes without a prefix.
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self
    }

    /// The encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Empties the buffer, keeping its capacity.
    pub fn clear(&mut self) {
        self.buf.clear();
    }
}

/// Reads fields from a frame payload.
#[derive(Debug)]
pub struct Decoder<'a> {
    rest: &'a [u8],
}

impl<'a> Decoder<'a> {
    pub fn new(payload: &'a [u8]) -> Self {
        Self { rest: payload }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.rest.len() < n {
            return Err(ProtoError::Truncated);
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    pub fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    pub fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    pub fn short(&mut self) -> Result<&'a [u8], ProtoError> {
        let len = self.u16()? as usize;
        self.take(len)
    }

    pub fn long(&mut self) -> Result<&'a [u8], ProtoError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    /// Whatever is left of the payload.
    pub fn rest(self) -> &'a [u8] {
        self.rest
    }
}

/// Parses a frame header into kind and payload length.
pub fn parse_header(header: [u8; 5]) -> Result<(u8, usize), ProtoError> {
    let len = u32::from_le_bytes(header[1..5].try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(ProtoError::TooLarge(len));
    }
    Ok((header[0], len))
}

/// Reads one frame, blocking; `Ok(None)` on a clean end of stream.
pub fn read_frame(reader: &mut impl Read, payload: &mut Vec<u8>) -> Result<Option<u8>, ProtoError> {
    let mut header = [0u8; 5];
    match reader.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let (kind, len) = parse_header(header)?;
    payload.clear();
    payload.resize(len, 0);
    reader.read_exact(payload)?;
    Ok(Some(kind))
}

/// A request as the worker receives it.
#[derive(Debug)]
pub struct RequestFrame<'a> {
    pub body_complete: bool,
    pub vars: Vec<(&'a [u8], &'a [u8])>,
    pub body: &'a [u8],
}

/// Encodes a request frame. `vars` holds `count` pairs already encoded as `short` key and
/// `long` value (see [`Encoder::short`], [`Encoder::long`]).
pub fn encode_request(
    enc: &mut Encoder,
    body_complete: bool,
    count: u32,
    vars: &[u8],
    body: &[u8],
) {
    begin_request(enc);
    enc.raw(vars);
    finish_request(enc, body_complete, count, body);
}

/// Starts a request frame; its variables are appended next, then [`finish_request`]. So the
/// master builds the variables straight into the frame.
pub fn begin_request(enc: &mut Encoder) {
    enc.begin(kind::REQUEST).u8(0).u32(0);
}

/// Finishes a request frame begun with [`begin_request`]: body flags, the count of variables
/// appended, the start of the body.
pub fn finish_request(enc: &mut Encoder, body_complete: bool, count: u32, body: &[u8]) {
    let at = enc.frame_start + 5;
    enc.buf[at] = if body_complete { BODY_COMPLETE } else { 0 };
    enc.buf[at + 1..at + 5].copy_from_slice(&count.to_le_bytes());
    enc.raw(body).finish();
}

/// Bytes a request frame has before its variables.
pub const REQUEST_PREFIX: usize = 10;

/// Decodes a request frame's payload.
pub fn decode_request(payload: &[u8]) -> Result<RequestFrame<'_>, ProtoError> {
    let mut dec = Decoder::new(payload);
    let body_complete = dec.u8()? & BODY_COMPLETE != 0;
    let count = dec.u32()? as usize;
    let mut vars = Vec::with_capacity(count.min(256));
    for _ in 0..count {
        vars.push((dec.short()?, dec.long()?));
    }
    Ok(RequestFrame {
        body_complete,
        vars,
        body: dec.rest(),
    })
}

/// A response head as the master receives it.
#[derive(Debug)]
pub struct HeadFrame<'a> {
    pub status: u16,
    pub reason: &'a [u8],
    pub headers: Vec<(&'a [u8], &'a [u8])>,
}

/// Encodes a response head frame.
pub fn encode_head<'a>(
    enc: &mut Encoder,
    status: u16,
    reason: &[u8],
    headers: impl ExactSizeIterator<Item = (&'a [u8], &'a [u8])>,
) {
    enc.begin(kind::HEAD)
        .u16(status)
        .short(reason)
        .u32(headers.len() as u32);
    for (name, value) in headers {
        enc.short(name).long(value);
    }
    enc.finish();
}

/// Decodes a response head frame's payload.
pub fn decode_head(payload: &[u8]) -> Result<HeadFrame<'_>, ProtoError> {
    let mut dec = Decoder::new(payload);
    let status = dec.u16()?;
    let reason = dec.short()?;
    let count = dec.u32()? as usize;
    let mut headers = Vec::with_capacity(count.min(256));
    for _ in 0..count {
        headers.push((dec.short()?, dec.long()?));
    }
    Ok(HeadFrame {
        status,
        reason,
        headers,
    })
}

/// Encodes a worker greeting.
pub fn encode_hello(enc: &mut Encoder, id: u32, generation: u32, pid: u32) {
    enc.begin(kind::HELLO)
        .u32(id)
        .u32(generation)
        .u32(pid)
        .finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_frame(bytes: &[u8]) -> (u8, Vec<u8>) {
        let mut payload = Vec::new();
        let kind = read_frame(&mut &bytes[..], &mut payload).unwrap().unwrap();
        (kind, payload)
    }

    #[test]
    fn purge_round_trips() {
        let mut enc = Encoder::new();
        let items = vec!["example.com/a?b=1".to_owned(), "/é".to_owned()];
        encode_purge(&mut enc, PURGE_SOFT | PURGE_TAGS, &items);
        let (kind, payload) = one_frame(enc.bytes());
        assert_eq!(kind, kind::PURGE);
        assert_eq!(
            decode_purge(&payload).unwrap(),
            (PURGE_SOFT | PURGE_TAGS, items)
        );
        assert!(decode_purge(&payload[..payload.len() - 1]).is_err());
    }

    #[test]
    fn request_round_trips() {
        let vars = [
            (&b"REQUEST_METHOD"[..], &b"POST"[..]),
            (b"PATH_INFO", b"/a b"),
        ];
        let mut encoded = Encoder::new();
        for (key, value) in vars {
            encoded.short(key).long(value);
        }
        let mut enc = Encoder::new();
        encode_request(&mut enc, true, 2, encoded.bytes(), b"body");
        let (kind, payload) = one_frame(enc.bytes());
        assert_eq!(kind, kind::REQUEST);
        let request = decode_request(&payload).unwrap();
        assert!(request.body_complete);
        assert_eq!(request.vars, vars);
        assert_eq!(request.body, b"body");
    }

    #[test]
    fn head_round_trips() {
        let mut enc = Encoder::new();
        let headers = [(&b"Content-Type"[..], &b"text/plain"[..])];
        encode_head(&mut enc, 404, b"Not Found", headers.iter().copied());
        enc.frame(kind::END, b"");
        let (kind, payload) = one_frame(enc.bytes());
        assert_eq!(kind, kind::HEAD);
        let head = decode_head(&payload).unwrap();
        assert_eq!((head.status, head.reason), (404, &b"Not Found"[..]));
        assert_eq!(head.headers, headers);
    }

    #[test]
    fn truncated_and_oversized_frames_are_errors() {
        assert!(matches!(decode_head(&[1, 0]), Err(ProtoError::Truncated)));
        let mut header = [kind::CHUNK, 0, 0, 0, 0];
        header[1..].copy_from_slice(&(MAX_FRAME as u32 + 1).to_le_bytes());
        assert!(matches!(parse_header(header), Err(ProtoError::TooLarge(_))));
        let mut payload = Vec::new();
        assert!(read_frame(&mut &[][..], &mut payload).unwrap().is_none());
        assert!(read_frame(&mut &[kind::END, 9, 0, 0, 0, 1][..], &mut payload).is_err());
    }
}
