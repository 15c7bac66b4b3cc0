//! The framed protocol between the agent and a plugin worker, over the worker's stdin/stdout.
//!
//! ```text
//! frame   = len:u32le kind:u8 payload[len - 1]
//! HELLO      worker→agent  JSON {"id", "version", "build_info", "abi_minor", "info": {...}}
//! LOAD_ERROR worker→agent  UTF-8 message; the worker exits
//! CALL       agent→worker  call_id:u64 deadline_unix_ms:u64 cap_len:u32 capability input…
//! CANCEL     agent→worker  call_id:u64
//! COMPLETE   worker→agent  call_id:u64 status:u32 output…
//! LOG        worker→agent  level:u32 message…
//! ```
//! Integers are little-endian. Closing the worker's stdin tells it to exit.

use std::io::{self, Read, Write};

/// `HELLO`.
pub const HELLO: u8 = 1;
/// `LOAD_ERROR`.
pub const LOAD_ERROR: u8 = 2;
/// `CALL`.
pub const CALL: u8 = 3;
/// `CANCEL`.
pub const CANCEL: u8 = 4;
/// `COMPLETE`.
pub const COMPLETE: u8 = 5;
/// `LOG`.
pub const LOG: u8 = 6;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// One of the kinds above.
    pub kind: u8,
    /// Everything after the kind byte.
    pub payload: Vec<u8>,
}

/// Encodes a frame header and payload parts into one buffer (one write, so frames written
/// from several threads under a lock never interleave).
pub fn encode(kind: u8, parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    out.push(kind);
    for part in parts {
        out.extend_from_slice(part);
    }
    out
}

/// A frame's length prefix, refused when empty or over `max_len` (a corrupt or hostile peer).
fn checked_len(prefix: [u8; 4], max_len: u32) -> io::Result<u32> {
    let len = u32::from_le_bytes(prefix);
    if len == 0 || len > max_len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    Ok(len)
}

/// Reads one frame; `Ok(None)` at a clean end of stream. Frames over `max_len` are an error.
pub fn read_blocking(reader: &mut impl Read, max_len: u32) -> io::Result<Option<Frame>> {
    let mut len = [0u8; 4];
    match reader.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = checked_len(len, max_len)?;
    let mut body = vec![0u8; len as usize];
    reader.read_exact(&mut body)?;
    let kind = body[0];
    body.remove(0);
    Ok(Some(Frame {
        kind,
        payload: body,
    }))
}

/// Reads one frame from an async stream; `Ok(None)` at a clean end of stream.
pub async fn read_async(
    reader: &mut (impl tokio::io::AsyncRead + Unpin),
    max_len: u32,
) -> io::Result<Option<Frame>> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    match reader.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = checked_len(len, max_len)?;
    let mut kind = [0u8; 1];
    reader.read_exact(&mut kind).await?;
    let mut payload = vec![0u8; len as usize - 1];
    reader.read_exact(&mut payload).await?;
    Ok(Some(Frame {
        kind: kind[0],
        payload,
    }))
}

/// Writes a frame and flushes.
pub fn write_blocking(writer: &mut impl Write, kind: u8, parts: &[&[u8]]) -> io::Result<()> {
    writer.write_all(&encode(kind, parts))?;
    writer.flush()
}

/// A CALL frame's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallFrame {
    /// The call id.
    pub call_id: u64,
    /// Unix ms; 0 for none.
    pub deadline_unix_ms: u64,
    /// The capability.
    pub capability: String,
    /// The envelope.
    pub input: Vec<u8>,
}

/// Encodes a CALL frame.
pub fn encode_call(call_id: u64, deadline_unix_ms: u64, capability: &str, input: &[u8]) -> Vec<u8> {
    let cap_len = u32::try_from(capability.len())
        .unwrap_or(u32::MAX)
        .to_le_bytes();
    encode(
        CALL,
        &[
            &call_id.to_le_bytes(),
            &deadline_unix_ms.to_le_bytes(),
            &cap_len,
            capability.as_bytes(),
            input,
        ],
    )
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    bytes
        .get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    bytes
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
}

/// Decodes a CALL payload.
pub fn decode_call(payload: &[u8]) -> Option<CallFrame> {
    let call_id = u64_at(payload, 0)?;
    let deadline_unix_ms = u64_at(payload, 8)?;
    let cap_len = u32_at(payload, 16)? as usize;
    let capability = std::str::from_utf8(payload.get(20..20 + cap_len)?)
        .ok()?
        .to_string();
    let input = payload.get(20 + cap_len..)?.to_vec();
    Some(CallFrame {
        call_id,
        deadline_unix_ms,
        capability,
        input,
    })
}

/// Decodes a COMPLETE payload: call id, status, output.
pub fn decode_complete(payload: &[u8]) -> Option<(u64, u32, &[u8])> {
    Some((u64_at(payload, 0)?, u32_at(payload, 8)?, payload.get(12..)?))
}

/// Decodes a CANCEL payload.
pub fn decode_cancel(payload: &[u8]) -> Option<u64> {
    u64_at(payload, 0)
}

/// Decodes a LOG payload: level, message.
pub fn decode_log(payload: &[u8]) -> Option<(u32, &[u8])> {
    Some((u32_at(payload, 0)?, payload.get(4..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_frames_round_trip() {
        let bytes = encode_call(7, 99, "list_accounts", b"{\"a\":1}");
        let frame = read_blocking(&mut bytes.as_slice(), 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(frame.kind, CALL);
        let call = decode_call(&frame.payload).unwrap();
        assert_eq!(
            call,
            CallFrame {
                call_id: 7,
                deadline_unix_ms: 99,
                capability: "list_accounts".into(),
                input: b"{\"a\":1}".to_vec()
            }
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// What a worker writes is as untrusted as the library it hosts, which shares its
        /// memory: any bytes give frames, a clean end or an error, and never a frame over the
        /// limit.
        #[test]
        fn any_bytes_from_a_worker_give_frames_or_an_error(
            // Length prefixes mostly small, then bytes that may or may not match them.
            pieces in proptest::collection::vec(
                (0u32..80, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)),
                0..8,
            ),
            max_len in 1u32..64,
        ) {
            let stream: Vec<u8> = pieces
                .iter()
                .flat_map(|(len, bytes)| len.to_le_bytes().into_iter().chain(bytes.iter().copied()))
                .collect();
            // The agent reads a worker's frames with `read_async`; the worker reads the agent's
            // with `read_blocking`. Both see the same frames and stop at the same place.
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let (mut blocking, mut nonblocking) = (stream.as_slice(), stream.as_slice());
            let mut total = 0;
            loop {
                let frame = read_blocking(&mut blocking, max_len);
                let same = runtime.block_on(read_async(&mut nonblocking, max_len));
                proptest::prop_assert_eq!(
                    frame.as_ref().map_err(io::Error::kind),
                    same.as_ref().map_err(io::Error::kind)
                );
                let Ok(Some(frame)) = frame else { break };
                proptest::prop_assert!(frame.payload.len() < max_len as usize);
                total += 5 + frame.payload.len();
                let _ = (decode_call(&frame.payload), decode_complete(&frame.payload));
                let _ = (decode_cancel(&frame.payload), decode_log(&frame.payload));
            }
            proptest::prop_assert!(total <= stream.len());
        }

        #[test]
        fn call_and_complete_frames_round_trip(
            call_id in proptest::prelude::any::<u64>(),
            deadline in proptest::prelude::any::<u64>(),
            capability in "\\PC{0,40}",
            input in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100),
            status in proptest::prelude::any::<u32>(),
        ) {
            let bytes = encode_call(call_id, deadline, &capability, &input);
            let frame = read_blocking(&mut bytes.as_slice(), 1 << 20).unwrap().unwrap();
            proptest::prop_assert_eq!(frame.kind, CALL);
            proptest::prop_assert_eq!(
                decode_call(&frame.payload),
                Some(CallFrame { call_id, deadline_unix_ms: deadline, capability, input: input.clone() })
            );
            let bytes = encode(COMPLETE, &[&call_id.to_le_bytes(), &status.to_le_bytes(), &input]);
            let frame = read_blocking(&mut bytes.as_slice(), 1 << 20).unwrap().unwrap();
            proptest::prop_assert_eq!(decode_complete(&frame.payload), Some((call_id, status, &input[..])));
        }
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        assert!(read_blocking(&mut [0u8, 0, 0, 0].as_slice(), 100).is_err());
        assert!(read_blocking(&mut [255u8, 255, 255, 255, 1].as_slice(), 100).is_err());
        assert!(read_blocking(&mut [5u8, 0, 0, 0, 1].as_slice(), 100).is_err());
        assert_eq!(read_blocking(&mut [].as_slice(), 100).unwrap(), None);
        assert_eq!(decode_call(&[1, 2, 3]), None);
        assert_eq!(decode_complete(&[1; 11]), None);
        let huge_cap = [0u8; 16]
            .iter()
            .chain(&u32::MAX.to_le_bytes())
            .copied()
            .collect::<Vec<_>>();
        assert_eq!(decode_call(&huge_cap), None);
    }
}
