//! The record framing shared by every file: `[len u32 LE][crc32c u32 LE][payload]`,
//! the checksum covering the payload, the payload a postcard encoding.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::Corruption;

/// Bytes in a record header.
pub(crate) const HEADER_LEN: usize = 8;

/// Why a record could not be framed.
#[derive(Debug)]
pub(crate) enum FrameError {
    /// The payload would be this many bytes, over the maximum.
    TooLarge(u64),
    /// Encoding failed.
    Encode(postcard::Error),
}

/// Appends one framed record holding `value` to `buf`; returns the frame's
/// length. If the record is too large `buf` is left as it was; if encoding
/// fails its content is lost.
pub(crate) fn append_frame<T: Serialize + ?Sized>(
    buf: &mut Vec<u8>,
    value: &T,
    max_payload: u64,
) -> Result<usize, FrameError> {
    let start = buf.len();
    let mut out = std::mem::take(buf);
    out.extend_from_slice(&[0; HEADER_LEN]);
    let mut out = match postcard::to_extend(value, out) {
        Ok(out) => out,
        Err(e) => return Err(FrameError::Encode(e)),
    };
    let payload_len = (out.len() - start - HEADER_LEN) as u64;
    let len32 = match u32::try_from(payload_len) {
        Ok(len) if payload_len <= max_payload => len,
        _ => {
            out.truncate(start);
            *buf = out;
            return Err(FrameError::TooLarge(payload_len));
        }
    };
    let crc = crc32c::crc32c(&out[start + HEADER_LEN..]);
    out[start..start + 4].copy_from_slice(&len32.to_le_bytes());
    out[start + 4..start + HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    *buf = out;
    Ok(HEADER_LEN + len32 as usize)
}

/// Checks the header of the record at the start of `buf`: returns its
/// payload length and stored checksum, or what is wrong with it.
fn read_header(buf: &[u8], max_payload: u64) -> Result<(usize, u32), Corruption> {
    if buf.len() < HEADER_LEN {
        return Err(Corruption::ShortHeader {
            available: buf.len() as u64,
        });
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let stored = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let len64 = u64::from(len);
    if len == 0 {
        return Err(Corruption::ZeroLength);
    }
    if len64 > max_payload {
        return Err(Corruption::TooLong {
            len: len64,
            max: max_payload,
        });
    }
    let available = (buf.len() - HEADER_LEN) as u64;
    if len64 > available {
        return Err(Corruption::BeyondEnd {
            len: len64,
            available,
        });
    }
    Ok((len as usize, stored))
}

/// Reads the record at the start of `buf`: its payload and its whole length
/// (header included), or what is wrong with it.
pub(crate) fn read_frame(buf: &[u8], max_payload: u64) -> Result<(&[u8], usize), Corruption> {
    let (len, stored) = read_header(buf, max_payload)?;
    let payload = &buf[HEADER_LEN..HEADER_LEN + len];
    let computed = crc32c::crc32c(payload);
    if computed != stored {
        return Err(Corruption::Checksum { stored, computed });
    }
    Ok((payload, HEADER_LEN + len))
}

/// Decodes a whole payload as `T`; leftover bytes are an error.
pub(crate) fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, Corruption> {
    match postcard::take_from_bytes::<T>(payload) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(Corruption::TrailingBytes(rest.len() as u64)),
        Err(e) => Err(Corruption::Decode(e.to_string())),
    }
}

/// Whether a well-formed record of type `T` (checksum valid, payload decodes)
/// starts at any byte offset of `buf`. Used to tell a torn tail (nothing valid
/// after the damage) from damage in the middle of a file.
///
/// Candidates are decoded before their checksum is computed: random bytes
/// almost never decode, so the scan costs little more than one pass.
pub(crate) fn valid_record_within<T: DeserializeOwned>(buf: &[u8], max_payload: u64) -> bool {
    (0..buf.len().saturating_sub(HEADER_LEN - 1)).any(|at| {
        read_header(&buf[at..], max_payload).is_ok_and(|(len, stored)| {
            let payload = &buf[at + HEADER_LEN..at + HEADER_LEN + len];
            decode::<T>(payload).is_ok() && crc32c::crc32c(payload) == stored
        })
    })
}
