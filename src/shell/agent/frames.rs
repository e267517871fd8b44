//! Pure conversion between the engine's peer messages and replication frames: what a
//! received frame means for the link (engine message, keep-alive, refusal, violation)
//! and how an engine message is encoded (control frames whole; Write and ResyncData as
//! a header whose crc covers data sent from the caller's own buffer).

use crate::core::mirror::PeerMsg;
use crate::core::overlap::ByteRange;
use crate::core::repl::wire::{DataFrame, FRAME_HEADER_BYTES, Frame, RefuseReason};
use crate::core::repl::{encode, encode_data_header};

/// What a verified frame on an established link asks of the shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// Hand to the engine (with the payload buffer for Write and ResyncData).
    Engine(PeerMsg),
    /// Answer with KeepAliveAck(nonce).
    KeepAlive { nonce: u64 },
    /// Liveness only.
    KeepAliveAck,
    /// The peer ends the link and says why.
    Refused {
        reason: RefuseReason,
        message: String,
    },
}

/// Interprets a frame received after the handshake. `Err` is a protocol violation: the
/// link is dropped.
pub fn inbound(frame: &Frame<'_>) -> Result<Inbound, String> {
    let range = |offset: u64, length: u64| {
        ByteRange::new(offset, length).ok_or_else(|| format!("empty range at {offset}"))
    };
    let msg = match *frame {
        Frame::Hello(_) | Frame::Auth { .. } => {
            return Err(format!(
                "{} frame after the handshake completed",
                frame.kind()
            ));
        }
        Frame::Refuse { reason, message } => {
            return Ok(Inbound::Refused {
                reason,
                message: message.to_string(),
            });
        }
        Frame::KeepAlive { nonce } => return Ok(Inbound::KeepAlive { nonce }),
        Frame::KeepAliveAck { .. } => return Ok(Inbound::KeepAliveAck),
        Frame::State(state) => PeerMsg::State(state),
        Frame::Write {
            seq,
            offset,
            fua,
            data,
        } => PeerMsg::Write {
            seq,
            range: range(offset, data.len() as u64)?,
            fua,
        },
        // TRIM is replicated as WRITE_ZEROES by our engine; a Trim frame is applied the
        // same way, so both replicas stay byte-identical whatever the backing does.
        Frame::WriteZeroes {
            seq,
            offset,
            length,
            fua,
        }
        | Frame::Trim {
            seq,
            offset,
            length,
            fua,
        } => PeerMsg::WriteZeroes {
            seq,
            range: range(offset, u64::from(length))?,
            fua,
        },
        Frame::Flush { seq } => PeerMsg::Flush { seq },
        Frame::Ack { seq } => PeerMsg::Ack { seq },
        Frame::Nack { seq, errno } => PeerMsg::Nack { seq, errno },
        Frame::FlushAck { seq } => PeerMsg::FlushAck { seq },
        Frame::ResyncData { seq, offset, data } => PeerMsg::ResyncData {
            seq,
            range: range(offset, data.len() as u64)?,
        },
        Frame::ResyncAck { seq } => PeerMsg::ResyncAck { seq },
        Frame::ResyncDone { seq } => PeerMsg::ResyncDone { seq },
        Frame::VerifyRequest {
            seq,
            offset,
            length,
        } => PeerMsg::VerifyRequest {
            seq,
            range: range(offset, u64::from(length))?,
        },
        Frame::VerifyReply { seq, digests } => PeerMsg::VerifyReply {
            seq,
            digests: digests
                .chunks_exact(32)
                .map(|d| d.try_into().expect("32-byte chunks"))
                .collect(),
        },
        Frame::BitmapChunk {
            offset,
            last,
            bytes,
        } => PeerMsg::BitmapChunk {
            offset,
            bytes: bytes.to_vec(),
            last,
        },
    };
    Ok(Inbound::Engine(msg))
}

/// Whether the message is followed by data from a buffer (Write, ResyncData).
pub fn carries_data(msg: &PeerMsg) -> bool {
    matches!(msg, PeerMsg::Write { .. } | PeerMsg::ResyncData { .. })
}

/// Appends the whole frame of a message without data to `out`. Panics (a bug) for
/// Write and ResyncData: those go through [`data_header`].
pub fn encode_control(msg: &PeerMsg, epoch: u64, out: &mut Vec<u8>) {
    let length32 = |range: &ByteRange| {
        u32::try_from(range.length()).expect("a replicated request fits the NBD length")
    };
    let flat: Vec<u8>;
    let frame = match msg {
        PeerMsg::State(state) => Frame::State(*state),
        PeerMsg::WriteZeroes { seq, range, fua } => Frame::WriteZeroes {
            seq: *seq,
            offset: range.start(),
            length: length32(range),
            fua: *fua,
        },
        PeerMsg::Flush { seq } => Frame::Flush { seq: *seq },
        PeerMsg::Ack { seq } => Frame::Ack { seq: *seq },
        PeerMsg::Nack { seq, errno } => Frame::Nack {
            seq: *seq,
            errno: *errno,
        },
        PeerMsg::FlushAck { seq } => Frame::FlushAck { seq: *seq },
        PeerMsg::ResyncAck { seq } => Frame::ResyncAck { seq: *seq },
        PeerMsg::ResyncDone { seq } => Frame::ResyncDone { seq: *seq },
        PeerMsg::VerifyRequest { seq, range } => Frame::VerifyRequest {
            seq: *seq,
            offset: range.start(),
            length: length32(range),
        },
        PeerMsg::VerifyReply { seq, digests } => {
            flat = digests.concat();
            Frame::VerifyReply {
                seq: *seq,
                digests: &flat,
            }
        }
        PeerMsg::BitmapChunk {
            offset,
            bytes,
            last,
        } => Frame::BitmapChunk {
            offset: *offset,
            last: *last,
            bytes,
        },
        PeerMsg::Write { .. } | PeerMsg::ResyncData { .. } => {
            panic!("data message {msg:?} encoded as a control frame")
        }
    };
    encode(&frame, epoch, out);
}

/// The header of a Write or ResyncData frame carrying `data` (the crc covers it). The
/// data itself is sent from the caller's buffer, never copied into a frame.
pub fn data_header(msg: &PeerMsg, epoch: u64, data: &[u8]) -> [u8; FRAME_HEADER_BYTES] {
    let (kind, seq, range) = match msg {
        PeerMsg::Write { seq, range, fua } => (DataFrame::Write { fua: *fua }, *seq, range),
        PeerMsg::ResyncData { seq, range } => (DataFrame::ResyncData, *seq, range),
        other => panic!("{other:?} carries no data"),
    };
    assert_eq!(
        range.length(),
        data.len() as u64,
        "data length differs from the message's range"
    );
    encode_data_header(kind, epoch, seq, range.start(), data)
}

/// A keep-alive (or its answer) as bytes.
pub fn keepalive(nonce: u64, answer: bool, epoch: u64) -> Vec<u8> {
    let frame = if answer {
        Frame::KeepAliveAck { nonce }
    } else {
        Frame::KeepAlive { nonce }
    };
    let mut out = Vec::with_capacity(FRAME_HEADER_BYTES);
    encode(&frame, epoch, &mut out);
    out
}

/// A Refuse frame (the crossed-connect loser is closed with DuplicateConnection).
pub fn refuse(reason: RefuseReason, message: &str, epoch: u64) -> Vec<u8> {
    let mut out = Vec::new();
    encode(&Frame::Refuse { reason, message }, epoch, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::meta::{DiskState, Flags, Generations, Role};
    use crate::core::repl::wire::NodeState;
    use crate::core::repl::{decode_header, verify};

    fn decode(bytes: &[u8]) -> Inbound {
        let header_bytes: &[u8; FRAME_HEADER_BYTES] =
            bytes[..FRAME_HEADER_BYTES].try_into().unwrap();
        let header = decode_header(header_bytes).unwrap();
        assert_eq!(header.epoch(), 7);
        let frame = verify(&header, header_bytes, &bytes[FRAME_HEADER_BYTES..]).unwrap();
        inbound(&frame).unwrap()
    }

    fn range(start: u64, length: u64) -> ByteRange {
        ByteRange::new(start, length).unwrap()
    }

    #[test]
    fn control_messages_round_trip() {
        let state = NodeState {
            generations: Generations {
                current: 0x1234,
                bitmap: 9,
                history: [8, 7],
            },
            disk_state: DiskState::UpToDate,
            role: Role::Primary,
            flags: Flags::WAS_PRIMARY,
            intent: Role::Primary,
            dirty_bytes: 4096,
        };
        let messages = [
            PeerMsg::State(state),
            PeerMsg::WriteZeroes {
                seq: 3,
                range: range(4096, 8192),
                fua: true,
            },
            PeerMsg::Flush { seq: 4 },
            PeerMsg::Ack { seq: 5 },
            PeerMsg::Nack { seq: 6, errno: 5 },
            PeerMsg::FlushAck { seq: 7 },
            PeerMsg::ResyncAck { seq: 8 },
            PeerMsg::BitmapChunk {
                offset: 0,
                bytes: vec![1, 2, 3],
                last: true,
            },
        ];
        for msg in messages {
            let mut bytes = Vec::new();
            encode_control(&msg, 7, &mut bytes);
            assert_eq!(decode(&bytes), Inbound::Engine(msg.clone()), "{msg:?}");
        }
    }

    #[test]
    fn data_messages_round_trip_with_their_payload() {
        let data = vec![0xab; 8192];
        for msg in [
            PeerMsg::Write {
                seq: 11,
                range: range(1 << 20, 8192),
                fua: true,
            },
            PeerMsg::ResyncData {
                seq: 12,
                range: range(0, 8192),
            },
        ] {
            assert!(carries_data(&msg));
            let mut bytes = data_header(&msg, 7, &data).to_vec();
            bytes.extend_from_slice(&data);
            assert_eq!(decode(&bytes), Inbound::Engine(msg));
        }
    }

    #[test]
    fn a_trim_frame_is_applied_as_write_zeroes() {
        let mut bytes = Vec::new();
        encode(
            &Frame::Trim {
                seq: 1,
                offset: 0,
                length: 4096,
                fua: false,
            },
            7,
            &mut bytes,
        );
        assert_eq!(
            decode(&bytes),
            Inbound::Engine(PeerMsg::WriteZeroes {
                seq: 1,
                range: range(0, 4096),
                fua: false
            })
        );
    }

    #[test]
    fn keepalives_and_refusals_are_the_shells() {
        assert_eq!(
            decode(&keepalive(42, false, 7)),
            Inbound::KeepAlive { nonce: 42 }
        );
        assert_eq!(decode(&keepalive(42, true, 7)), Inbound::KeepAliveAck);
        assert_eq!(
            decode(&refuse(RefuseReason::DuplicateConnection, "dup", 7)),
            Inbound::Refused {
                reason: RefuseReason::DuplicateConnection,
                message: "dup".into()
            }
        );
    }

    #[test]
    fn handshake_frames_after_the_handshake_are_violations() {
        let frame = Frame::Auth { proof: [0; 32] };
        assert!(inbound(&frame).unwrap_err().contains("after the handshake"));
    }

    #[test]
    #[should_panic(expected = "carries no data")]
    fn a_control_message_has_no_data_header() {
        data_header(&PeerMsg::Ack { seq: 1 }, 1, &[0; 512]);
    }
}
