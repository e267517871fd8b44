//! Encoders for transmission-phase replies: simple replies, the structured READ data
//! chunk header, and structured error chunks.
//!
//! The caller appends to its own output buffer so a reply header and the READ data
//! that follows it can share one send. Misuse (a zero-length data chunk, a "successful"
//! call for a data reply) is a bug in the caller and asserts.

use super::wire::{
    Errno, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, clamp_string, reply_flag, reply_type,
};

/// magic 4 + error 4 + cookie 8 (spec: Simple reply message).
pub const SIMPLE_REPLY_BYTES: usize = 16;
/// Structured chunk header (magic 4 + flags 2 + type 2 + cookie 8 + length 4 = 20)
/// plus the 8-byte offset that starts an NBD_REPLY_TYPE_OFFSET_DATA payload.
pub const READ_CHUNK_HEADER_BYTES: usize = 28;
/// Structured chunk header alone.
pub const STRUCTURED_HEADER_BYTES: usize = 20;
/// Fixed part of an NBD_REPLY_TYPE_ERROR payload: error 4 + message length 2.
pub const ERROR_PAYLOAD_FIXED_BYTES: usize = 6;

/// A simple reply. With `error == None` it reports success; for a successful READ
/// (structured replies off) the caller appends exactly `length` data bytes after it.
pub fn encode_simple_reply(out: &mut Vec<u8>, cookie: u64, error: Option<Errno>) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.map_or(0, Errno::wire).to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

fn encode_structured_header(
    out: &mut Vec<u8>,
    flags: u16,
    chunk_type: u16,
    cookie: u64,
    payload_bytes: u32,
) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&chunk_type.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&payload_bytes.to_be_bytes());
}

/// The header of the single NBD_REPLY_TYPE_OFFSET_DATA chunk (flagged DONE) that
/// answers a successful READ when structured replies are on; the caller appends
/// exactly `data_bytes` of data. We always answer a READ with one chunk, so the
/// reply is never fragmented.
pub fn encode_read_chunk_header(out: &mut Vec<u8>, cookie: u64, offset: u64, data_bytes: u32) {
    // Spec (Structured reply types): OFFSET_DATA length MUST be at least 9, i.e. at
    // least one data byte, and the 32-bit length field also carries the 8-byte offset.
    assert!(data_bytes > 0, "an OFFSET_DATA chunk must carry data");
    let payload_bytes = data_bytes
        .checked_add(8)
        .expect("READ data too large for one OFFSET_DATA chunk");
    encode_structured_header(
        out,
        reply_flag::DONE,
        reply_type::OFFSET_DATA,
        cookie,
        payload_bytes,
    );
    out.extend_from_slice(&offset.to_be_bytes());
}

/// An NBD_REPLY_TYPE_ERROR chunk flagged DONE: the whole reply to a failed request
/// when structured replies are on. The message is shown to the client's user; it is
/// cut to the spec's 4096-byte string limit.
pub fn encode_structured_error(out: &mut Vec<u8>, cookie: u64, errno: Errno, message: &str) {
    let message = clamp_string(message);
    // clamp_string bounds the message at 4096 bytes, so both casts are lossless.
    let message_bytes = message.len() as u16;
    let payload_bytes = (ERROR_PAYLOAD_FIXED_BYTES + message.len()) as u32;
    encode_structured_header(
        out,
        reply_flag::DONE,
        reply_type::ERROR,
        cookie,
        payload_bytes,
    );
    out.extend_from_slice(&errno.wire().to_be_bytes());
    out.extend_from_slice(&message_bytes.to_be_bytes());
    out.extend_from_slice(message.as_bytes());
}

/// The one entry point for replies that carry no data:
/// - structured replies off: a simple reply (success or errno). For a successful READ
///   this is the header and the caller appends exactly `length` data bytes.
/// - structured replies on, success: a simple reply (allowed for every command but
///   READ, spec: Simple reply message);
/// - structured replies on, failure: an NBD_REPLY_TYPE_ERROR chunk with the message.
///   For READ this is mandatory ("MUST NOT use a simple reply for NBD_CMD_READ, even
///   for an early NBD_EINVAL"); for the others the spec says the server SHOULD prefer
///   it because the message reaches the user.
///
/// A successful READ with structured replies needs its data chunk: use
/// [`encode_read_chunk_header`]. Calling this for one is a bug and asserts.
pub fn encode_reply(
    out: &mut Vec<u8>,
    structured: bool,
    is_read: bool,
    cookie: u64,
    result: Result<(), (Errno, &str)>,
) {
    match result {
        Ok(()) => {
            assert!(
                !(structured && is_read),
                "a successful structured READ needs its data chunk: use encode_read_chunk_header"
            );
            encode_simple_reply(out, cookie, None);
        }
        Err((errno, message)) if structured => {
            encode_structured_error(out, cookie, errno, message);
        }
        Err((errno, _message)) => encode_simple_reply(out, cookie, Some(errno)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::nbd::wire::STRING_BYTES_MAX;

    #[test]
    fn simple_success_reply_is_byte_exact() {
        let mut out = Vec::new();
        encode_simple_reply(&mut out, 0x0102_0304_0506_0708, None);
        assert_eq!(
            out,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(out.len(), SIMPLE_REPLY_BYTES);
    }

    #[test]
    fn simple_error_reply_carries_the_errno() {
        let mut out = Vec::new();
        encode_simple_reply(&mut out, 7, Some(Errno::NoSpc));
        assert_eq!(
            out,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28, 0, 0, 0, 0, 0, 0, 0, 7]
        );
    }

    #[test]
    fn read_chunk_header_is_byte_exact() {
        let mut out = vec![0xaa]; // appends, never clears
        encode_read_chunk_header(&mut out, 9, 0x1000, 512);
        assert_eq!(
            out,
            [
                0xaa, // pre-existing byte
                0x66, 0x8e, 0x33, 0xef, // magic
                0, 1, // flags: DONE
                0, 1, // type: OFFSET_DATA
                0, 0, 0, 0, 0, 0, 0, 9, // cookie
                0, 0, 2, 8, // length: 8 + 512
                0, 0, 0, 0, 0, 0, 0x10, 0, // offset
            ]
        );
        assert_eq!(out.len() - 1, READ_CHUNK_HEADER_BYTES);
    }

    #[test]
    #[should_panic(expected = "must carry data")]
    fn read_chunk_without_data_is_a_bug() {
        encode_read_chunk_header(&mut Vec::new(), 1, 0, 0);
    }

    #[test]
    #[should_panic(expected = "too large")]
    fn read_chunk_whose_length_overflows_is_a_bug() {
        encode_read_chunk_header(&mut Vec::new(), 1, 0, u32::MAX - 7);
    }

    #[test]
    fn structured_error_is_byte_exact() {
        let mut out = Vec::new();
        encode_structured_error(&mut out, 3, Errno::Inval, "bad");
        assert_eq!(
            out,
            [
                0x66, 0x8e, 0x33, 0xef, // magic
                0, 1, // flags: DONE
                0x80, 1, // type: ERROR
                0, 0, 0, 0, 0, 0, 0, 3, // cookie
                0, 0, 0, 9, // length: 6 + 3
                0, 0, 0, 22, // error
                0, 3, // message length
                b'b', b'a', b'd',
            ]
        );
    }

    #[test]
    fn structured_error_message_is_capped_at_the_string_limit() {
        let mut out = Vec::new();
        let message = "x".repeat(STRING_BYTES_MAX + 100);
        encode_structured_error(&mut out, 3, Errno::Io, &message);
        let expected_payload = ERROR_PAYLOAD_FIXED_BYTES + STRING_BYTES_MAX;
        assert_eq!(out.len(), STRUCTURED_HEADER_BYTES + expected_payload);
        assert_eq!(&out[16..20], &(expected_payload as u32).to_be_bytes());
        assert_eq!(&out[24..26], &(STRING_BYTES_MAX as u16).to_be_bytes());
    }

    #[test]
    fn encode_reply_uses_simple_replies_without_structured() {
        for is_read in [false, true] {
            let mut out = Vec::new();
            encode_reply(&mut out, false, is_read, 5, Err((Errno::Perm, "read-only")));
            let mut expected = Vec::new();
            encode_simple_reply(&mut expected, 5, Some(Errno::Perm));
            assert_eq!(out, expected);
        }
        for is_read in [false, true] {
            let mut out = Vec::new();
            encode_reply(&mut out, false, is_read, 5, Ok(()));
            let mut expected = Vec::new();
            encode_simple_reply(&mut expected, 5, None);
            assert_eq!(out, expected);
        }
    }

    #[test]
    fn encode_reply_with_structured_sends_simple_success_and_structured_errors() {
        let mut out = Vec::new();
        encode_reply(&mut out, true, false, 5, Ok(()));
        let mut expected = Vec::new();
        encode_simple_reply(&mut expected, 5, None);
        assert_eq!(out, expected);

        for is_read in [false, true] {
            let mut out = Vec::new();
            encode_reply(&mut out, true, is_read, 5, Err((Errno::Inval, "why")));
            let mut expected = Vec::new();
            encode_structured_error(&mut expected, 5, Errno::Inval, "why");
            assert_eq!(out, expected);
        }
    }

    #[test]
    #[should_panic(expected = "needs its data chunk")]
    fn encode_reply_for_a_successful_structured_read_is_a_bug() {
        encode_reply(&mut Vec::new(), true, true, 5, Ok(()));
    }
}
