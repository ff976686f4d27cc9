//! Entry points of the fuzz targets (`fuzz/`), compiled only under `cfg(fuzzing)`.

use std::io::Cursor;

use crate::proto::{self, kind};

/// What a compromised worker could send the master: a stream of frames, each decoded as
/// the master decodes that kind. Whatever comes, the master gets an answer or an error,
/// never a panic; a response head it accepts has a valid status and only valid headers.
pub fn worker_frames(data: &[u8]) {
    let mut reader = Cursor::new(data);
    let mut payload = Vec::new();
    while let Ok(Some(frame)) = proto::read_frame(&mut reader, &mut payload) {
        match frame {
            kind::HEAD => {
                if let Ok(response) = crate::master::head_response(frame, &payload) {
                    let status = response.status().as_u16();
                    assert!((100..=999).contains(&status));
                }
            }
            kind::PURGE => {
                if let Ok((_, items)) = proto::decode_purge(&payload) {
                    assert!(items.iter().map(String::len).sum::<usize>() <= payload.len());
                }
            }
            kind::REQUEST => {
                if let Ok(request) = proto::decode_request(&payload) {
                    assert!(request.body.len() <= payload.len());
                }
            }
            _ => {}
        }
    }
}
