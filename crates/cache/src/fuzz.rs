//! Entry points of the fuzz targets (`fuzz/`), compiled only under `cfg(fuzzing)`.

use bytes::BytesMut;

use crate::out::Out;
use crate::server::{run_buffered, Context, Flow};

/// Text and meta commands as a client sends them. The first byte says where the stream is
/// cut into two reads: the answers must not depend on it (a limit or a parse that changed
/// with TCP's segmentation was a bug once).
pub fn commands(data: &[u8]) {
    let Some((&cut, data)) = data.split_first() else {
        return;
    };
    let whole = feed(&[data]);
    let at = usize::from(cut) * data.len() / 255;
    let split = feed(&[&data[..at], &data[at..]]);
    // `stats`, `me` and `watch` report clocks and counters that differ between two runs.
    let timed = [&b"stats"[..], b"me ", b"watch"]
        .iter()
        .any(|word| data.windows(word.len()).any(|w| w == *word));
    if !timed {
        assert_eq!(
            String::from_utf8_lossy(&whole),
            String::from_utf8_lossy(&split),
            "the answers depend on where the stream was cut (at {at})"
        );
    }
}

/// The answers to `reads`, one after another, on a fresh small store.
fn feed(reads: &[&[u8]]) -> Vec<u8> {
    let ctx = Context::new(1 << 20, 64 << 10, 16);
    let (mut buf, mut skip, mut out) = (BytesMut::new(), 0, Out::default());
    for read in reads {
        buf.extend_from_slice(read);
        match run_buffered(&mut buf, &mut skip, 1, &ctx, &mut out) {
            Flow::Read => {}
            Flow::Close | Flow::Watch(_) => break,
        }
    }
    out.to_vec()
}
