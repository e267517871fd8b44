//! One checking function per fuzz target, shared by `fuzz/` and the corpus replay test.
//!
//! Each function takes arbitrary bytes, drives a pure decoder or state machine with
//! them, and asserts structural properties (not only "did not panic"): a failed
//! assertion here is a bug in the code under test. Nothing here does I/O.

pub mod meta;
pub mod repl;

use crate::constants::{
    NBD_BLOCK_SIZE_PREFERRED_BYTES, NBD_PAYLOAD_BYTES_MAX, NBD_WRITE_DISCARD_BYTES_MAX,
};
use crate::core::nbd::handshake::{
    CloseReason, EXPORT_NAME_REPLY_BYTES, ExportInfo, GREETING_BYTES, Handshake,
    OPTION_REPLY_HEADER_BYTES, Status,
};
use crate::core::nbd::reply::{SIMPLE_REPLY_BYTES, STRUCTURED_HEADER_BYTES, encode_reply};
use crate::core::nbd::request::{
    Command, Decision, FramingError, REQUEST_HEADER_BYTES, RequestHeader, TransmissionParams,
    decode_request_header, validate,
};
use crate::core::nbd::wire::{
    EXPORT_NAME_ZERO_PAD_BYTES, Errno, IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, REQUEST_MAGIC,
    Reader, SIMPLE_REPLY_MAGIC, STRING_BYTES_MAX, STRUCTURED_REPLY_MAGIC, cmd, cmd_flag,
    handshake_flag, info, opt, rep, reply_flag, reply_type, transmission_flag,
};

/// Input layout: byte 0 holds the settings (bits 0-2: how many chunk-size bytes
/// follow, bit 3: read-only export, bit 4: refused export, bit 5: 4096-byte minimum
/// block); then the chunk sizes (each byte + 1); the rest is the client's stream.
///
/// Checks: (1) consumed never exceeds the input; (2) the output, status and total
/// consumed are the same as when the whole stream is fed at once; (3) the output is a
/// valid sequence of server handshake messages; (4) once Ready or Closed nothing more
/// is consumed or produced; and a call right after a call consumes nothing (each call
/// consumes every complete message).
pub fn nbd_handshake(data: &[u8]) {
    let Some((&settings, rest)) = data.split_first() else {
        return;
    };
    let chunk_count = usize::from(settings & 0b111);
    let Some((chunk_sizes, stream)) = rest.split_at_checked(chunk_count) else {
        return;
    };
    let export = fuzz_export(settings);

    // Whole stream at once.
    let mut whole = Handshake::new(export.clone());
    let mut whole_output = whole.take_output();
    let whole_consumed = whole.handle_input(stream);
    assert!(whole_consumed <= stream.len());
    whole_output.extend(whole.take_output());

    // The same stream in chunks, the way the shell feeds it.
    let mut chunked = Handshake::new(export.clone());
    let mut output = chunked.take_output();
    let mut pending: Vec<u8> = Vec::new();
    let mut consumed_total = 0;
    let mut remaining = stream;
    let mut sizes = chunk_sizes.iter().cycle();
    while !remaining.is_empty() {
        let size = sizes
            .next()
            .map_or(remaining.len(), |&size| usize::from(size) + 1);
        let (chunk, tail) = remaining.split_at(size.min(remaining.len()));
        remaining = tail;
        pending.extend_from_slice(chunk);

        let was_final = chunked.status() != &Status::Negotiating;
        let consumed = chunked.handle_input(&pending);
        assert!(consumed <= pending.len(), "consumed more than the input");
        if was_final {
            assert_eq!(consumed, 0, "consumed input after the handshake ended");
        }
        pending.drain(..consumed);
        consumed_total += consumed;
        let produced = chunked.take_output();
        if was_final {
            assert!(
                produced.is_empty(),
                "produced output after the handshake ended"
            );
        }
        output.extend(produced);
        // Each call consumes every complete message, so an immediate repeat finds none.
        assert_eq!(
            chunked.handle_input(&pending),
            0,
            "a second call consumed more"
        );
        assert!(chunked.take_output().is_empty());
    }

    assert_eq!(
        output, whole_output,
        "output depends on how the input was split"
    );
    assert_eq!(
        consumed_total, whole_consumed,
        "consumption depends on the split"
    );
    assert_eq!(
        chunked.status(),
        whole.status(),
        "status depends on the split"
    );
    check_handshake_output(&output, whole.status(), &export);
}

fn fuzz_export(settings: u8) -> ExportInfo {
    ExportInfo {
        name: "disk0".to_string(),
        description: "fuzzed export".to_string(),
        // Not a multiple of anything interesting, and not OPTION_REPLY_MAGIC, so the
        // EXPORT_NAME answer cannot be mistaken for an option reply.
        size_bytes: 0x0000_0001_2345_6000,
        read_only: settings & 0b1000 != 0,
        block_size_min_bytes: if settings & 0b10_0000 != 0 { 4096 } else { 512 },
        block_size_preferred_bytes: NBD_BLOCK_SIZE_PREFERRED_BYTES,
        block_size_max_bytes: NBD_PAYLOAD_BYTES_MAX,
        refusal: (settings & 0b1_0000 != 0).then(|| "mirror inactive on this node".to_string()),
    }
}

/// Parses everything the server sent and checks it is well-formed and consistent with
/// the final status.
fn check_handshake_output(output: &[u8], status: &Status, export: &ExportInfo) {
    let mut reader = Reader::new(output);
    let greeting = reader
        .take(GREETING_BYTES)
        .expect("greeting is always sent");
    assert_eq!(&greeting[0..8], &NBDMAGIC.to_be_bytes());
    assert_eq!(&greeting[8..16], &IHAVEOPT.to_be_bytes());
    let flags = handshake_flag::FIXED_NEWSTYLE | handshake_flag::NO_ZEROES;
    assert_eq!(&greeting[16..18], &flags.to_be_bytes());

    let mut last_reply: Option<(u32, u32)> = None;
    let mut info_export_seen = false;
    while reader.remaining() >= 8 && output_starts_with_reply_magic(&reader) {
        let (option, reply_type, payload) = read_option_reply(&mut reader);
        check_option_reply(option, reply_type, payload, export);
        if reply_type == rep::INFO && payload.starts_with(&info::EXPORT.to_be_bytes()) {
            info_export_seen = true;
        }
        if reply_type == rep::ACK && matches!(option, opt::INFO | opt::GO) {
            // Spec: at least NBD_INFO_EXPORT before a successful INFO/GO.
            assert!(info_export_seen, "ACK to INFO/GO without NBD_INFO_EXPORT");
        }
        if reply_type == rep::ACK || rep::is_error(reply_type) {
            info_export_seen = false;
        }
        last_reply = Some((option, reply_type));
    }

    match status {
        Status::Ready(negotiated) => {
            assert_eq!(negotiated.export_name, export.name);
            assert_eq!(negotiated.transmission_flags, export.transmission_flags());
            assert!(
                export.refusal.is_none(),
                "a refused export entered transmission"
            );
            if reader.is_empty() {
                assert_eq!(
                    last_reply,
                    Some((opt::GO, rep::ACK)),
                    "Ready without GO's ACK"
                );
            } else {
                check_export_name_answer(reader.take(reader.remaining()).unwrap(), export);
            }
        }
        Status::Closed(CloseReason::ClientAborted) => {
            assert!(reader.is_empty());
            assert_eq!(last_reply, Some((opt::ABORT, rep::ACK)));
        }
        Status::Closed(_) | Status::Negotiating => {
            assert!(
                reader.is_empty(),
                "trailing bytes that are not an option reply"
            );
            // While negotiating, every option got a final reply (an ACK or an error).
            if let Some((_, reply_type)) = last_reply {
                assert!(
                    reply_type == rep::ACK || rep::is_error(reply_type),
                    "option answer left unfinished"
                );
            }
        }
    }
}

fn output_starts_with_reply_magic(reader: &Reader<'_>) -> bool {
    reader.clone().u64() == Some(OPTION_REPLY_MAGIC)
}

fn read_option_reply<'a>(reader: &mut Reader<'a>) -> (u32, u32, &'a [u8]) {
    let header = reader
        .take(OPTION_REPLY_HEADER_BYTES)
        .expect("truncated option reply");
    let mut header = Reader::new(header);
    assert_eq!(header.u64(), Some(OPTION_REPLY_MAGIC));
    let option = header.u32().unwrap();
    let reply_type = header.u32().unwrap();
    let length = header.u32().unwrap() as usize;
    let payload = reader.take(length).expect("option reply payload truncated");
    (option, reply_type, payload)
}

fn check_option_reply(option: u32, reply_type: u32, payload: &[u8], export: &ExportInfo) {
    match reply_type {
        rep::ACK => assert!(payload.is_empty(), "ACK carries no data"),
        rep::SERVER => {
            assert_eq!(option, opt::LIST);
            let mut reader = Reader::new(payload);
            let name_bytes = reader.u32().expect("SERVER reply has a name length") as usize;
            assert_eq!(reader.take(name_bytes), Some(export.name.as_bytes()));
        }
        rep::INFO => {
            assert!(matches!(option, opt::INFO | opt::GO));
            let mut reader = Reader::new(payload);
            match reader.u16().expect("INFO reply has a type") {
                info::EXPORT => {
                    assert_eq!(payload.len(), info::EXPORT_REPLY_BYTES as usize);
                    assert_eq!(reader.u64(), Some(export.size_bytes));
                    assert_eq!(reader.u16(), Some(export.transmission_flags()));
                }
                info::BLOCK_SIZE => {
                    assert_eq!(payload.len(), info::BLOCK_SIZE_REPLY_BYTES as usize);
                    assert_eq!(reader.u32(), Some(export.block_size_min_bytes));
                }
                info::NAME => assert_eq!(&payload[2..], export.name.as_bytes()),
                info::DESCRIPTION => assert_eq!(&payload[2..], export.description.as_bytes()),
                other => panic!("unexpected information type {other}"),
            }
        }
        error if rep::is_error(error) => {
            assert!(payload.len() <= STRING_BYTES_MAX, "error message too long");
            assert!(
                std::str::from_utf8(payload).is_ok(),
                "error message is not UTF-8"
            );
            assert!(
                matches!(
                    error,
                    rep::ERR_UNSUP | rep::ERR_INVALID | rep::ERR_UNKNOWN | rep::ERR_POLICY
                ),
                "unexpected error reply {error:#x}"
            );
        }
        other => panic!("unexpected reply type {other}"),
    }
}

fn check_export_name_answer(answer: &[u8], export: &ExportInfo) {
    assert!(
        answer.len() == EXPORT_NAME_REPLY_BYTES
            || answer.len() == EXPORT_NAME_REPLY_BYTES + EXPORT_NAME_ZERO_PAD_BYTES,
        "EXPORT_NAME answer of {} bytes",
        answer.len()
    );
    let mut reader = Reader::new(answer);
    assert_eq!(reader.u64(), Some(export.size_bytes));
    assert_eq!(reader.u16(), Some(export.transmission_flags()));
    assert!(
        answer[EXPORT_NAME_REPLY_BYTES..]
            .iter()
            .all(|&byte| byte == 0)
    );
}

/// Input layout: byte 0 settings (bit 0 read-only, bit 1 structured replies, bit 2
/// force a good magic, bits 3-7 clear one advertised flag each: FLUSH, TRIM,
/// WRITE_ZEROES+FAST_ZERO, FAST_ZERO, CACHE); byte 1 picks the payload maximum;
/// bytes 2..10 the export size; then a 28-byte request header.
///
/// Checks: the header round-trips; `validate` is deterministic; and every decision
/// respects the spec rules it enforces (see the asserts), including that a rejected
/// WRITE discards exactly its payload and that the error reply encodes well.
pub fn nbd_request(data: &[u8]) {
    let mut reader = Reader::new(data);
    let (Some(settings), Some(size_selector), Some(size_bytes)) =
        (reader.take(1), reader.take(1), reader.u64())
    else {
        return;
    };
    let (settings, size_selector) = (settings[0], size_selector[0]);
    let Some(header_bytes) = reader.take(REQUEST_HEADER_BYTES) else {
        return;
    };
    let mut header_bytes: [u8; REQUEST_HEADER_BYTES] = header_bytes.try_into().unwrap();
    if settings & 0b100 != 0 {
        header_bytes[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    }
    let params = fuzz_params(settings, size_selector, size_bytes);

    let header = match decode_request_header(&header_bytes) {
        Ok(header) => header,
        Err(FramingError::BadMagic(magic)) => {
            assert_ne!(magic, REQUEST_MAGIC);
            assert_eq!(magic.to_be_bytes(), header_bytes[0..4]);
            return;
        }
        Err(other) => panic!("decode returned {other:?}"),
    };
    assert_eq!(header.encode(), header_bytes, "header does not round-trip");

    let decision = validate(&header, &params);
    assert_eq!(
        decision,
        validate(&header, &params),
        "validate is not deterministic"
    );
    check_decision(&header, &params, decision);
}

fn fuzz_params(settings: u8, size_selector: u8, size_bytes: u64) -> TransmissionParams {
    use transmission_flag as tf;
    let read_only = settings & 0b1 != 0;
    let structured_replies = settings & 0b10 != 0;
    let export = ExportInfo {
        name: String::new(),
        description: String::new(),
        size_bytes,
        read_only,
        block_size_min_bytes: 512,
        block_size_preferred_bytes: NBD_BLOCK_SIZE_PREFERRED_BYTES,
        block_size_max_bytes: NBD_PAYLOAD_BYTES_MAX,
        refusal: None,
    };
    let mut flags = export.transmission_flags();
    let clearable = [
        tf::SEND_FLUSH,
        tf::SEND_TRIM,
        tf::SEND_WRITE_ZEROES | tf::SEND_FAST_ZERO,
        tf::SEND_FAST_ZERO,
        tf::SEND_CACHE,
    ];
    for (bit, flag) in clearable.into_iter().enumerate() {
        if settings & (0b1000 << bit) != 0 {
            flags &= !flag;
        }
    }
    if structured_replies && size_selector & 0x80 != 0 {
        flags |= tf::SEND_DF;
    }
    // Small maxima make the length checks reachable with small inputs.
    let payload_bytes_max = match size_selector & 0b11 {
        0 => NBD_PAYLOAD_BYTES_MAX,
        1 => 4096,
        2 => 1,
        _ => NBD_WRITE_DISCARD_BYTES_MAX,
    };
    TransmissionParams {
        size_bytes,
        read_only,
        structured_replies,
        transmission_flags: flags,
        payload_bytes_max,
        write_discard_bytes_max: NBD_WRITE_DISCARD_BYTES_MAX,
    }
}

fn check_decision(header: &RequestHeader, params: &TransmissionParams, decision: Decision) {
    use transmission_flag as tf;
    let advertised = |flag: u16| params.transmission_flags & flag != 0;
    match decision {
        Decision::Execute(request) => {
            assert_eq!(request.cookie(), header.cookie);
            assert_eq!(request.offset(), header.offset);
            assert_eq!(request.length(), header.length);
            assert_eq!(header.flags & !cmd_flag::KNOWN, 0, "unknown flag executed");
            assert_eq!(
                header.flags & (cmd_flag::REQ_ONE | cmd_flag::PAYLOAD_LEN),
                0
            );
            if header.flags & cmd_flag::FUA != 0 {
                assert!(advertised(tf::SEND_FUA), "FUA executed without SEND_FUA");
            }
            if header.flags & cmd_flag::DF != 0 {
                assert_eq!(request.command(), Command::Read);
                assert!(advertised(tf::SEND_DF));
            }
            let command = request.command();
            if matches!(command, Command::Flush) {
                assert_eq!(header.kind, cmd::FLUSH);
                assert!(advertised(tf::SEND_FLUSH));
                assert_eq!((header.offset, header.length), (0, 0));
                return;
            }
            let end = header.offset.checked_add(u64::from(header.length));
            assert!(
                end.is_some_and(|end| end <= params.size_bytes),
                "executed past the end"
            );
            assert!(header.length > 0, "zero-length request executed");
            let writes = matches!(
                command,
                Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. }
            );
            assert!(
                !(writes && params.read_only),
                "write executed on a read-only export"
            );
            match command {
                Command::Read => {
                    assert_eq!(header.kind, cmd::READ);
                    assert!(header.length <= params.payload_bytes_max);
                    assert_eq!(request.payload_bytes(), 0);
                }
                Command::Write { fua } => {
                    assert_eq!(header.kind, cmd::WRITE);
                    assert!(header.length <= params.payload_bytes_max);
                    assert_eq!(request.payload_bytes(), header.length);
                    assert_eq!(fua, header.flags & cmd_flag::FUA != 0);
                    assert_eq!(header.flags & !cmd_flag::FUA, 0);
                }
                Command::Trim { fua } => {
                    assert_eq!(header.kind, cmd::TRIM);
                    assert!(advertised(tf::SEND_TRIM));
                    assert_eq!(fua, request.is_fua());
                    assert_eq!(header.flags & !cmd_flag::FUA, 0);
                }
                Command::WriteZeroes {
                    fua,
                    no_hole,
                    fast_zero,
                } => {
                    assert_eq!(header.kind, cmd::WRITE_ZEROES);
                    assert!(advertised(tf::SEND_WRITE_ZEROES));
                    assert!(!fast_zero || advertised(tf::SEND_FAST_ZERO));
                    assert_eq!(fua, header.flags & cmd_flag::FUA != 0);
                    assert_eq!(no_hole, header.flags & cmd_flag::NO_HOLE != 0);
                    assert_eq!(fast_zero, header.flags & cmd_flag::FAST_ZERO != 0);
                }
                Command::Cache => {
                    assert_eq!(header.kind, cmd::CACHE);
                    assert!(!request.is_fua());
                }
                Command::Flush => unreachable!("handled above"),
            }
            if !matches!(command, Command::Write { .. }) {
                assert_eq!(request.payload_bytes(), 0);
            }
        }
        Decision::Reject {
            cookie,
            errno,
            discard_bytes,
            reason,
        } => {
            assert_eq!(cookie, header.cookie);
            assert!(!reason.is_empty());
            if header.kind == cmd::WRITE {
                assert_eq!(discard_bytes, header.length, "rejected WRITE out of sync");
                assert!(discard_bytes <= params.write_discard_bytes_max);
            } else {
                assert_eq!(discard_bytes, 0, "discard on a command without payload");
            }
            assert!(
                matches!(
                    errno,
                    Errno::Inval | Errno::Perm | Errno::NoSpc | Errno::Overflow
                ),
                "validate produced {errno:?}"
            );
            if errno == Errno::Perm {
                assert!(params.read_only);
            }
            if errno == Errno::Overflow {
                assert!(header.kind == cmd::READ && params.structured_replies);
            }
            if errno == Errno::NoSpc {
                assert!(matches!(header.kind, cmd::WRITE | cmd::WRITE_ZEROES));
            }
            check_error_reply(
                params.structured_replies,
                header.kind == cmd::READ,
                cookie,
                errno,
                reason,
            );
        }
        Decision::Disconnect => assert_eq!(header.kind, cmd::DISC),
        Decision::Close(FramingError::WritePayloadTooLarge(length)) => {
            assert_eq!(header.kind, cmd::WRITE);
            assert_eq!(length, header.length);
            assert!(length > params.write_discard_bytes_max);
        }
        Decision::Close(other) => panic!("validate closed with {other:?}"),
    }
}

/// The reply the shell would send for a rejection parses back to the same cookie
/// and errno.
fn check_error_reply(structured: bool, is_read: bool, cookie: u64, errno: Errno, reason: &str) {
    let mut out = Vec::new();
    encode_reply(&mut out, structured, is_read, cookie, Err((errno, reason)));
    let mut reader = Reader::new(&out);
    if structured {
        assert_eq!(reader.u32(), Some(STRUCTURED_REPLY_MAGIC));
        assert_eq!(reader.u16(), Some(reply_flag::DONE));
        assert_eq!(reader.u16(), Some(reply_type::ERROR));
        assert_eq!(reader.u64(), Some(cookie));
        let length = reader.u32().unwrap() as usize;
        assert_eq!(out.len(), STRUCTURED_HEADER_BYTES + length);
        assert_eq!(reader.u32(), Some(errno.wire()));
        let message_bytes = usize::from(reader.u16().unwrap());
        assert_eq!(reader.take(message_bytes), Some(reason.as_bytes()));
        assert!(reader.is_empty());
    } else {
        assert_eq!(out.len(), SIMPLE_REPLY_BYTES);
        assert_eq!(reader.u32(), Some(SIMPLE_REPLY_MAGIC));
        assert_eq!(reader.u32(), Some(errno.wire()));
        assert_eq!(reader.u64(), Some(cookie));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_inputs_are_ignored() {
        nbd_handshake(&[]);
        nbd_request(&[]);
        nbd_request(&[0; 10]);
    }

    #[test]
    fn a_go_handshake_passes_the_checks_in_any_chunking() {
        let mut stream = 3u32.to_be_bytes().to_vec();
        stream.extend_from_slice(&IHAVEOPT.to_be_bytes());
        stream.extend_from_slice(&opt::GO.to_be_bytes());
        stream.extend_from_slice(&6u32.to_be_bytes());
        stream.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        for chunking in [
            vec![0u8],
            vec![1, 0],
            vec![3, 0, 4, 9],
            vec![7, 1, 2, 3, 4, 5, 6, 7],
        ] {
            let mut data = chunking;
            data.extend_from_slice(&stream);
            nbd_handshake(&data);
        }
    }

    #[test]
    fn a_valid_write_passes_the_checks() {
        let mut data = vec![0b100, 0];
        data.extend_from_slice(&(1u64 << 30).to_be_bytes());
        data.extend_from_slice(
            &RequestHeader {
                flags: cmd_flag::FUA,
                kind: cmd::WRITE,
                cookie: 1,
                offset: 0,
                length: 512,
            }
            .encode(),
        );
        nbd_request(&data);
    }
}
