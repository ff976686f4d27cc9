//! The master's end of one worker's socket: frame reads (waiting, or only from what is
//! already buffered) and writes.

use tokio::io::{AsyncBufRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use super::dispatch::Slot;
use crate::proto::{self, ProtoError};

/// A connected worker, with what the master knows about it.
pub struct WorkerConn {
    pub id: u32,
    pub pid: u32,
    pub generation: u32,
    /// Its slot in the shared region.
    pub slot: Slot,
    pub reader: BufReader<OwnedReadHalf>,
    pub writer: OwnedWriteHalf,
    /// Recycle after this many requests.
    pub limit: u64,
}

impl WorkerConn {
    /// Reads the next frame into `payload`; returns its kind.
    pub async fn read_frame(&mut self, payload: &mut Vec<u8>) -> Result<u8, ProtoError> {
        let mut header = [0u8; 5];
        self.reader.read_exact(&mut header).await?;
        let (kind, len) = proto::parse_header(header)?;
        payload.clear();
        payload.resize(len, 0);
        self.reader.read_exact(payload).await?;
        Ok(kind)
    }

    /// Reads the `BEGIN` that opens the worker's next exchange: the request's id, and
    /// whether the worker needs the request sent over the socket.
    pub async fn read_begin(&mut self) -> Result<(u64, bool), ProtoError> {
        let mut frame = [0u8; proto::BEGIN_FRAME];
        self.reader.read_exact(&mut frame).await?;
        let (kind, len) = proto::parse_header(frame[..5].try_into().expect("5 bytes"))?;
        if kind != proto::kind::BEGIN || len != 9 {
            return Err(ProtoError::UnexpectedKind(kind));
        }
        let mut dec = proto::Decoder::new(&frame[5..]);
        Ok((dec.u64()?, dec.u8()? != 0))
    }

    /// Takes a frame of one of `kinds` that is already whole in the read buffer, without
    /// waiting; any other frame stays where it is.
    pub fn buffered_frame(&mut self, payload: &mut Vec<u8>, kinds: &[u8]) -> Option<u8> {
        let buffer = self.reader.buffer();
        let header: [u8; 5] = buffer.get(..5)?.try_into().ok()?;
        let (kind, len) = proto::parse_header(header).ok()?;
        if !kinds.contains(&kind) {
            return None;
        }
        let frame = buffer.get(5..5 + len)?;
        payload.clear();
        payload.extend_from_slice(frame);
        std::pin::Pin::new(&mut self.reader).consume(5 + len);
        Some(kind)
    }

    /// Writes encoded frames.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes).await
    }
}
