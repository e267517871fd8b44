//! Replication frames on the wire: the fixed 48-byte header, every frame type and its
//! payload, encode and decode, and [`FrameError`].
//!
//! All integers are little-endian, as on disk. Decoding is split in two so the shell can
//! read a large write payload straight into a pooled buffer: [`decode_header`] checks
//! everything the 48 header bytes can tell (magic, type, flags, reserved bytes, payload
//! length bound, unused fields, ranges) before a single payload byte is read, and
//! [`verify`] checks the crc32c over header and payload, then parses the payload. Only a
//! frame that passed `verify` may reach the disk. `docs/replication-protocol.md` is the
//! byte-for-byte specification; the offsets below are its table.

use super::{
    AUTH_PROOF_BYTES, BITMAP_CHUNK_BYTES_MAX, NONCE_BYTES, PROTOCOL_VERSION_MIN,
    REFUSE_MESSAGE_BYTES_MAX, VERIFY_DIGEST_BYTES, VERIFY_REPLY_BYTES_MAX,
};
use crate::constants::NBD_PAYLOAD_BYTES_MAX;
use crate::core::meta::{DiskState, Flags, Generations, Role};

/// "MDRP" (mirrordisk replication protocol) as the first four bytes of every frame.
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"MDRP");

/// magic 4 + type 2 + flags 2 + reserved 4 + payload length 4 + epoch 8 + seq 8 +
/// offset 8 + length 4 + crc32c 4.
pub const FRAME_HEADER_BYTES: usize = 48;

const OFF_MAGIC: usize = 0;
const OFF_TYPE: usize = 4;
const OFF_FLAGS: usize = 6;
const OFF_RESERVED: usize = 8;
const OFF_PAYLOAD_BYTES: usize = 12;
const OFF_EPOCH: usize = 16;
const OFF_SEQ: usize = 24;
const OFF_OFFSET: usize = 32;
const OFF_LENGTH: usize = 40;
const OFF_CRC: usize = 44;

/// Hello payload: versions 2+2, node id 4, expected peer id 4, logical block size 4,
/// mirror UUID 16, data size 8, granularity 4, reserved 4, epoch proposal 8, nonce 32.
pub const HELLO_PAYLOAD_BYTES: u32 = 88;
/// Auth payload: one HMAC-SHA256 proof.
pub const AUTH_PAYLOAD_BYTES: u32 = AUTH_PROOF_BYTES as u32;
/// Refuse payload: reason code 4, then the UTF-8 message (the rest of the payload).
pub const REFUSE_HEADER_BYTES: u32 = 4;
/// State payload: generations 4×8, disk state 4, role 4, flags 4, intent 4, dirty
/// bytes 8, reserved 8.
pub const STATE_PAYLOAD_BYTES: u32 = 64;
/// Nack payload: the errno, u32.
pub const NACK_PAYLOAD_BYTES: u32 = 4;

/// Header flag bits. A bit a frame type does not allow is a [`FrameError::UnknownFlags`].
pub mod frame_flag {
    /// Write, WriteZeroes, Trim: the peer makes the write durable before acking it
    /// (RWF_DSYNC), as the NBD client's FUA asked.
    pub const FUA: u16 = 1 << 0;
    /// BitmapChunk: this is the last chunk of the bitmap.
    pub const LAST: u16 = 1 << 1;
}

/// Every frame type of protocol version 1. Codes are grouped: 1-15 handshake and
/// control, 16-31 replicated I/O and its acks, 32-47 liveness, 48-63 resync. Any other
/// code is a [`FrameError::UnknownType`] (the link is dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameType {
    Hello,
    Auth,
    Refuse,
    State,
    Write,
    WriteZeroes,
    Trim,
    Flush,
    Ack,
    Nack,
    FlushAck,
    KeepAlive,
    KeepAliveAck,
    ResyncData,
    ResyncAck,
    /// The sync source has copied everything (and a FlushAck covers it): the target
    /// records the finish, then answers with State.
    ResyncDone,
    BitmapChunk,
    /// Online verify: hash the range and answer with per-region digests.
    VerifyRequest,
    /// The digests (SHA-256, one per region of the bitmap granularity) of a range.
    VerifyReply,
}

/// Which header fields a frame type gives meaning to; the others must be zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fields {
    /// seq, offset, length (the byte range) and a payload of exactly `length` bytes.
    Data,
    /// seq, offset, length (the byte range); no payload.
    Range,
    /// seq only (for keep-alives, seq carries the nonce).
    Seq,
    /// offset only (BitmapChunk: the chunk's offset in the serialized bitmap).
    Offset,
    /// None: everything is in the payload.
    PayloadOnly,
}

/// How long a frame type's payload may be, as `(min, max)` bytes; `Data` frames are
/// additionally bound to their `length` field.
type PayloadBounds = (u32, u32);

impl FrameType {
    /// Every type, for exhaustive tests.
    pub const ALL: [FrameType; 19] = [
        FrameType::Hello,
        FrameType::Auth,
        FrameType::Refuse,
        FrameType::State,
        FrameType::Write,
        FrameType::WriteZeroes,
        FrameType::Trim,
        FrameType::Flush,
        FrameType::Ack,
        FrameType::Nack,
        FrameType::FlushAck,
        FrameType::KeepAlive,
        FrameType::KeepAliveAck,
        FrameType::ResyncData,
        FrameType::ResyncAck,
        FrameType::ResyncDone,
        FrameType::BitmapChunk,
        FrameType::VerifyRequest,
        FrameType::VerifyReply,
    ];

    /// The type code on the wire.
    pub fn code(self) -> u16 {
        match self {
            FrameType::Hello => 1,
            FrameType::Auth => 2,
            FrameType::Refuse => 3,
            FrameType::State => 4,
            FrameType::Write => 16,
            FrameType::WriteZeroes => 17,
            FrameType::Trim => 18,
            FrameType::Flush => 19,
            FrameType::Ack => 20,
            FrameType::Nack => 21,
            FrameType::FlushAck => 22,
            FrameType::KeepAlive => 32,
            FrameType::KeepAliveAck => 33,
            FrameType::ResyncData => 48,
            FrameType::ResyncAck => 49,
            FrameType::BitmapChunk => 50,
            FrameType::ResyncDone => 51,
            FrameType::VerifyRequest => 52,
            FrameType::VerifyReply => 53,
        }
    }

    pub fn from_code(code: u16) -> Option<FrameType> {
        FrameType::ALL.into_iter().find(|kind| kind.code() == code)
    }

    /// The type's name, for logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            FrameType::Hello => "Hello",
            FrameType::Auth => "Auth",
            FrameType::Refuse => "Refuse",
            FrameType::State => "State",
            FrameType::Write => "Write",
            FrameType::WriteZeroes => "WriteZeroes",
            FrameType::Trim => "Trim",
            FrameType::Flush => "Flush",
            FrameType::Ack => "Ack",
            FrameType::Nack => "Nack",
            FrameType::FlushAck => "FlushAck",
            FrameType::KeepAlive => "KeepAlive",
            FrameType::KeepAliveAck => "KeepAliveAck",
            FrameType::ResyncData => "ResyncData",
            FrameType::ResyncAck => "ResyncAck",
            FrameType::ResyncDone => "ResyncDone",
            FrameType::VerifyRequest => "VerifyRequest",
            FrameType::VerifyReply => "VerifyReply",
            FrameType::BitmapChunk => "BitmapChunk",
        }
    }

    fn fields(self) -> Fields {
        match self {
            FrameType::Hello | FrameType::Auth | FrameType::Refuse | FrameType::State => {
                Fields::PayloadOnly
            }
            FrameType::Write | FrameType::ResyncData => Fields::Data,
            FrameType::WriteZeroes | FrameType::Trim | FrameType::VerifyRequest => Fields::Range,
            FrameType::Flush
            | FrameType::Ack
            | FrameType::Nack
            | FrameType::FlushAck
            | FrameType::KeepAlive
            | FrameType::KeepAliveAck
            | FrameType::ResyncAck
            | FrameType::ResyncDone
            | FrameType::VerifyReply => Fields::Seq,
            FrameType::BitmapChunk => Fields::Offset,
        }
    }

    fn allowed_flags(self) -> u16 {
        match self {
            FrameType::Write | FrameType::WriteZeroes | FrameType::Trim => frame_flag::FUA,
            FrameType::BitmapChunk => frame_flag::LAST,
            _ => 0,
        }
    }

    fn payload_bounds(self) -> PayloadBounds {
        let max_message = REFUSE_HEADER_BYTES + REFUSE_MESSAGE_BYTES_MAX as u32;
        match self {
            FrameType::Hello => (HELLO_PAYLOAD_BYTES, HELLO_PAYLOAD_BYTES),
            FrameType::Auth => (AUTH_PAYLOAD_BYTES, AUTH_PAYLOAD_BYTES),
            FrameType::Refuse => (REFUSE_HEADER_BYTES, max_message),
            FrameType::State => (STATE_PAYLOAD_BYTES, STATE_PAYLOAD_BYTES),
            FrameType::Write | FrameType::ResyncData => (1, NBD_PAYLOAD_BYTES_MAX),
            FrameType::Nack => (NACK_PAYLOAD_BYTES, NACK_PAYLOAD_BYTES),
            FrameType::BitmapChunk => (1, BITMAP_CHUNK_BYTES_MAX),
            FrameType::VerifyReply => (VERIFY_DIGEST_BYTES, VERIFY_REPLY_BYTES_MAX),
            FrameType::WriteZeroes
            | FrameType::Trim
            | FrameType::Flush
            | FrameType::Ack
            | FrameType::FlushAck
            | FrameType::KeepAlive
            | FrameType::KeepAliveAck
            | FrameType::ResyncAck
            | FrameType::ResyncDone
            | FrameType::VerifyRequest => (0, 0),
        }
    }
}

impl std::fmt::Display for FrameType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A decoded header: magic, type, flags, reserved bytes, payload bound, unused fields and
/// ranges checked; the crc is not (see [`verify`]). Only [`decode_header`] makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    kind: FrameType,
    flags: u16,
    payload_bytes: u32,
    epoch: u64,
    seq: u64,
    offset: u64,
    length: u32,
    crc: u32,
}

impl FrameHeader {
    pub fn kind(&self) -> FrameType {
        self.kind
    }

    /// Bytes of payload that follow the header (at most `NBD_PAYLOAD_BYTES_MAX`, and at
    /// most the type's own bound): the shell reads exactly this many, then calls
    /// [`verify`].
    pub fn payload_bytes(&self) -> u32 {
        self.payload_bytes
    }

    /// The connection epoch the sender stamped on the frame: 0 on Hello (and on a
    /// Refuse sent before the epoch was agreed), the established epoch on everything
    /// else. The engine drops a frame whose epoch is not the current connection's.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn length(&self) -> u32 {
        self.length
    }

    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// Whether the frame belongs to the connection with epoch `current`.
    pub fn is_epoch(&self, current: u64) -> bool {
        self.epoch == current
    }
}

/// Why bytes from the peer are not a frame. Every variant drops the link (the shell
/// then reconnects and the resync covers what was in flight); none of them lets a byte
/// of the frame reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The first four bytes are not "MDRP": we no longer know where frames start.
    BadMagic(u32),
    /// The reserved header bytes 8..12 are not zero.
    ReservedNonZero(u32),
    /// A type code this version does not define.
    UnknownType(u16),
    /// The declared payload length exceeds `NBD_PAYLOAD_BYTES_MAX` or the type's own
    /// maximum. Detected on the header, so the payload is never allocated.
    PayloadTooLarge { kind: FrameType, payload_bytes: u32 },
    /// The declared payload length is below the type's minimum, is not the type's fixed
    /// size, or (Write, ResyncData) differs from the `length` field.
    BadPayloadLength { kind: FrameType, payload_bytes: u32 },
    /// Flag bits the type does not allow.
    UnknownFlags { kind: FrameType, flags: u16 },
    /// A header field the type does not use is not zero.
    UnusedFieldNonZero {
        kind: FrameType,
        field: &'static str,
    },
    /// A zero-length range, or one whose end overflows u64.
    BadRange {
        kind: FrameType,
        offset: u64,
        length: u64,
    },
    /// The crc32c over header (crc field zeroed) and payload does not match: the frame
    /// was corrupted in transit. Never apply it.
    Checksum { received: u32, computed: u32 },
    /// The payload parsed to a value the protocol forbids (an unknown enum value, a
    /// non-zero reserved byte, a message that is not UTF-8, ...).
    Malformed {
        kind: FrameType,
        reason: &'static str,
    },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::BadMagic(magic) => write!(f, "bad frame magic {magic:#010x}"),
            FrameError::ReservedNonZero(value) => {
                write!(f, "reserved header bytes are {value:#010x}, not zero")
            }
            FrameError::UnknownType(code) => write!(f, "unknown frame type {code}"),
            FrameError::PayloadTooLarge {
                kind,
                payload_bytes,
            } => write!(
                f,
                "{kind} frame declares a payload of {payload_bytes} bytes, above its limit"
            ),
            FrameError::BadPayloadLength {
                kind,
                payload_bytes,
            } => write!(
                f,
                "{kind} frame declares a payload of {payload_bytes} bytes, not a valid size"
            ),
            FrameError::UnknownFlags { kind, flags } => {
                write!(f, "{kind} frame with flags {flags:#06x} it does not allow")
            }
            FrameError::UnusedFieldNonZero { kind, field } => {
                write!(f, "{kind} frame with non-zero unused field {field}")
            }
            FrameError::BadRange {
                kind,
                offset,
                length,
            } => write!(
                f,
                "{kind} frame with bad range offset {offset} length {length}"
            ),
            FrameError::Checksum { received, computed } => write!(
                f,
                "frame checksum mismatch: received {received:#010x}, computed {computed:#010x}"
            ),
            FrameError::Malformed { kind, reason } => write!(f, "malformed {kind} frame: {reason}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// The first frame each side sends. Its layout is frozen across protocol versions: it is
/// what versions are negotiated with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The range of protocol versions the sender speaks (`1 <= min <= max`).
    pub version_min: u16,
    pub version_max: u16,
    pub mirror_uuid: [u8; 16],
    /// The sender's node id.
    pub node_id: u32,
    /// The node id the sender expects the receiver to have (its configured peer).
    pub expected_peer_id: u32,
    /// Size of the data partition.
    pub data_bytes: u64,
    /// Logical block size of the sender's backing device.
    pub logical_block_bytes: u32,
    /// Dirty-bitmap granularity of the mirror set.
    pub granularity_bytes: u32,
    /// The sender's last connection epoch + 1 (never 0).
    pub epoch_proposal: u64,
    /// Fresh random bytes of the sender: the challenge the receiver's proof must cover.
    pub nonce: [u8; NONCE_BYTES],
}

impl Hello {
    /// The payload bytes, as sent. The handshake authenticates these bytes of both sides.
    pub fn encode_payload(&self) -> [u8; HELLO_PAYLOAD_BYTES as usize] {
        assert!(
            self.version_min >= PROTOCOL_VERSION_MIN && self.version_min <= self.version_max,
            "bad version range {}..={}",
            self.version_min,
            self.version_max
        );
        assert!(self.epoch_proposal >= 1, "epoch proposal 0");
        let mut b = [0u8; HELLO_PAYLOAD_BYTES as usize];
        put_u16(&mut b, 0, self.version_min);
        put_u16(&mut b, 2, self.version_max);
        put_u32(&mut b, 4, self.node_id);
        put_u32(&mut b, 8, self.expected_peer_id);
        put_u32(&mut b, 12, self.logical_block_bytes);
        b[16..32].copy_from_slice(&self.mirror_uuid);
        put_u64(&mut b, 32, self.data_bytes);
        put_u32(&mut b, 40, self.granularity_bytes);
        // 44..48 reserved, zero.
        put_u64(&mut b, 48, self.epoch_proposal);
        b[56..88].copy_from_slice(&self.nonce);
        b
    }

    fn decode(b: &[u8]) -> Result<Hello, FrameError> {
        let malformed = |reason| FrameError::Malformed {
            kind: FrameType::Hello,
            reason,
        };
        assert_eq!(b.len(), HELLO_PAYLOAD_BYTES as usize);
        let hello = Hello {
            version_min: get_u16(b, 0),
            version_max: get_u16(b, 2),
            node_id: get_u32(b, 4),
            expected_peer_id: get_u32(b, 8),
            logical_block_bytes: get_u32(b, 12),
            mirror_uuid: b[16..32].try_into().expect("16 bytes"),
            data_bytes: get_u64(b, 32),
            granularity_bytes: get_u32(b, 40),
            epoch_proposal: get_u64(b, 48),
            nonce: b[56..88].try_into().expect("32 bytes"),
        };
        if get_u32(b, 44) != 0 {
            return Err(malformed("reserved bytes are not zero"));
        }
        if hello.version_min < PROTOCOL_VERSION_MIN {
            return Err(malformed("version range starts at 0"));
        }
        if hello.version_min > hello.version_max {
            return Err(malformed("version range is empty (min > max)"));
        }
        if hello.epoch_proposal == 0 {
            return Err(malformed("epoch proposal is 0"));
        }
        Ok(hello)
    }
}

/// A node's replication-relevant state, sent in the State frame once both sides are
/// authenticated (and again by the engine whenever it changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeState {
    pub generations: Generations,
    pub disk_state: DiskState,
    pub role: Role,
    pub flags: Flags,
    /// What the node means to become on this connection: Primary if it is (or is about
    /// to be) active, Secondary otherwise.
    pub intent: Role,
    /// Bytes marked dirty in the node's journal (regions × granularity).
    pub dirty_bytes: u64,
}

impl NodeState {
    fn encode_payload(&self) -> [u8; STATE_PAYLOAD_BYTES as usize] {
        assert!(
            self.generations.is_valid(),
            "state without a current generation"
        );
        let mut b = [0u8; STATE_PAYLOAD_BYTES as usize];
        put_u64(&mut b, 0, self.generations.current);
        put_u64(&mut b, 8, self.generations.bitmap);
        put_u64(&mut b, 16, self.generations.history[0]);
        put_u64(&mut b, 24, self.generations.history[1]);
        put_u32(&mut b, 32, self.disk_state.to_u32());
        put_u32(&mut b, 36, self.role.to_u32());
        put_u32(&mut b, 40, self.flags.bits());
        put_u32(&mut b, 44, self.intent.to_u32());
        put_u64(&mut b, 48, self.dirty_bytes);
        // 56..64 reserved, zero.
        b
    }

    fn decode(b: &[u8]) -> Result<NodeState, FrameError> {
        let malformed = |reason| FrameError::Malformed {
            kind: FrameType::State,
            reason,
        };
        assert_eq!(b.len(), STATE_PAYLOAD_BYTES as usize);
        let generations = Generations {
            current: get_u64(b, 0),
            bitmap: get_u64(b, 8),
            history: [get_u64(b, 16), get_u64(b, 24)],
        };
        if !generations.is_valid() {
            return Err(malformed("no current generation"));
        }
        let disk_state =
            DiskState::from_u32(get_u32(b, 32)).ok_or(malformed("unknown disk state"))?;
        let role = Role::from_u32(get_u32(b, 36)).ok_or(malformed("unknown role"))?;
        let flags = Flags::from_bits(get_u32(b, 40)).ok_or(malformed("unknown state flags"))?;
        let intent = Role::from_u32(get_u32(b, 44)).ok_or(malformed("unknown intent"))?;
        if get_u64(b, 56) != 0 {
            return Err(malformed("reserved bytes are not zero"));
        }
        Ok(NodeState {
            generations,
            disk_state,
            role,
            flags,
            intent,
            dirty_bytes: get_u64(b, 48),
        })
    }
}

/// Why a side ends the connection, as sent in a Refuse frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefuseReason {
    /// The two version ranges do not overlap.
    ProtocolVersion,
    /// The peer's mirror-set UUID is not ours: the disk belongs to another mirror.
    MirrorMismatch,
    /// The peer's node id is not the peer configured for this mirror.
    UnexpectedPeer,
    /// The peer claims our own node id.
    NodeIdConflict,
    /// The peer expects to talk to another node than us.
    PeerExpectsOtherNode,
    DataSizeMismatch,
    BlockSizeMismatch,
    GranularityMismatch,
    /// The peer's proof did not verify. The message says no more than that.
    AuthenticationFailed,
    /// A frame out of order, a wrong epoch, a reflected nonce.
    ProtocolViolation,
    /// The handshake did not finish before its deadline.
    Timeout,
    /// Crossed connects: this connection lost the tie-break (see `tiebreak`).
    DuplicateConnection,
    /// A code this version does not know (from a newer peer); kept for the log.
    Unknown(u32),
}

impl RefuseReason {
    /// Every known reason, for exhaustive tests.
    pub const KNOWN: [RefuseReason; 12] = [
        RefuseReason::ProtocolVersion,
        RefuseReason::MirrorMismatch,
        RefuseReason::UnexpectedPeer,
        RefuseReason::NodeIdConflict,
        RefuseReason::PeerExpectsOtherNode,
        RefuseReason::DataSizeMismatch,
        RefuseReason::BlockSizeMismatch,
        RefuseReason::GranularityMismatch,
        RefuseReason::AuthenticationFailed,
        RefuseReason::ProtocolViolation,
        RefuseReason::Timeout,
        RefuseReason::DuplicateConnection,
    ];

    pub fn code(self) -> u32 {
        match self {
            RefuseReason::ProtocolVersion => 1,
            RefuseReason::MirrorMismatch => 2,
            RefuseReason::UnexpectedPeer => 3,
            RefuseReason::NodeIdConflict => 4,
            RefuseReason::PeerExpectsOtherNode => 5,
            RefuseReason::DataSizeMismatch => 6,
            RefuseReason::BlockSizeMismatch => 7,
            RefuseReason::GranularityMismatch => 8,
            RefuseReason::AuthenticationFailed => 9,
            RefuseReason::ProtocolViolation => 10,
            RefuseReason::Timeout => 11,
            RefuseReason::DuplicateConnection => 12,
            RefuseReason::Unknown(code) => code,
        }
    }

    /// `None` for 0, which no reason uses; an unassigned code becomes `Unknown`.
    pub fn from_code(code: u32) -> Option<RefuseReason> {
        if code == 0 {
            return None;
        }
        let known = RefuseReason::KNOWN.into_iter().find(|r| r.code() == code);
        Some(known.unwrap_or(RefuseReason::Unknown(code)))
    }

    pub fn name(self) -> &'static str {
        match self {
            RefuseReason::ProtocolVersion => "no common protocol version",
            RefuseReason::MirrorMismatch => "disk belongs to another mirror",
            RefuseReason::UnexpectedPeer => "unexpected peer node",
            RefuseReason::NodeIdConflict => "node id conflict",
            RefuseReason::PeerExpectsOtherNode => "peer expects another node",
            RefuseReason::DataSizeMismatch => "data size mismatch",
            RefuseReason::BlockSizeMismatch => "logical block size mismatch",
            RefuseReason::GranularityMismatch => "bitmap granularity mismatch",
            RefuseReason::AuthenticationFailed => "authentication failed",
            RefuseReason::ProtocolViolation => "protocol violation",
            RefuseReason::Timeout => "handshake timed out",
            RefuseReason::DuplicateConnection => "duplicate connection",
            RefuseReason::Unknown(_) => "unknown reason",
        }
    }
}

impl std::fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RefuseReason::Unknown(code) => write!(f, "unknown reason {code}"),
            known => f.write_str(known.name()),
        }
    }
}

/// One frame, header fields and payload together. Borrowed parts point into the
/// payload buffer given to [`verify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    Hello(Hello),
    Auth {
        proof: [u8; AUTH_PROOF_BYTES],
    },
    Refuse {
        reason: RefuseReason,
        /// UTF-8, at most `REFUSE_MESSAGE_BYTES_MAX` bytes.
        message: &'a str,
    },
    State(NodeState),
    /// A replicated application write.
    Write {
        seq: u64,
        offset: u64,
        fua: bool,
        data: &'a [u8],
    },
    WriteZeroes {
        seq: u64,
        offset: u64,
        length: u32,
        fua: bool,
    },
    /// Replicated only when both backings guarantee zeroes after discard; otherwise the
    /// primary sends WriteZeroes (DESIGN §5).
    Trim {
        seq: u64,
        offset: u64,
        length: u32,
        fua: bool,
    },
    Flush {
        seq: u64,
    },
    /// The write, write-zeroes or trim `seq` is applied on the peer.
    Ack {
        seq: u64,
    },
    /// The peer failed to apply `seq` with `errno` (a Linux errno, never 0).
    Nack {
        seq: u64,
        errno: u32,
    },
    /// The flush `seq` is durable on the peer.
    FlushAck {
        seq: u64,
    },
    KeepAlive {
        nonce: u64,
    },
    KeepAliveAck {
        nonce: u64,
    },
    /// Resync: data of the up-to-date side for the range.
    ResyncData {
        seq: u64,
        offset: u64,
        data: &'a [u8],
    },
    ResyncAck {
        seq: u64,
    },
    ResyncDone {
        seq: u64,
    },
    VerifyRequest {
        seq: u64,
        offset: u64,
        length: u32,
    },
    /// `digests` is a whole number of `VERIFY_DIGEST_BYTES` digests.
    VerifyReply {
        seq: u64,
        digests: &'a [u8],
    },
    /// A chunk of a serialized roaring bitmap (dirty-bitmap exchange), at byte `offset`
    /// of the serialization; `last` on the final chunk.
    BitmapChunk {
        offset: u64,
        last: bool,
        bytes: &'a [u8],
    },
}

impl Frame<'_> {
    pub fn kind(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::Hello,
            Frame::Auth { .. } => FrameType::Auth,
            Frame::Refuse { .. } => FrameType::Refuse,
            Frame::State(_) => FrameType::State,
            Frame::Write { .. } => FrameType::Write,
            Frame::WriteZeroes { .. } => FrameType::WriteZeroes,
            Frame::Trim { .. } => FrameType::Trim,
            Frame::Flush { .. } => FrameType::Flush,
            Frame::Ack { .. } => FrameType::Ack,
            Frame::Nack { .. } => FrameType::Nack,
            Frame::FlushAck { .. } => FrameType::FlushAck,
            Frame::KeepAlive { .. } => FrameType::KeepAlive,
            Frame::KeepAliveAck { .. } => FrameType::KeepAliveAck,
            Frame::ResyncData { .. } => FrameType::ResyncData,
            Frame::ResyncAck { .. } => FrameType::ResyncAck,
            Frame::ResyncDone { .. } => FrameType::ResyncDone,
            Frame::VerifyRequest { .. } => FrameType::VerifyRequest,
            Frame::VerifyReply { .. } => FrameType::VerifyReply,
            Frame::BitmapChunk { .. } => FrameType::BitmapChunk,
        }
    }
}

/// Decodes and checks a header. Everything but the crc is checked here, so a hostile
/// length is refused before the payload is read or allocated.
pub fn decode_header(bytes: &[u8; FRAME_HEADER_BYTES]) -> Result<FrameHeader, FrameError> {
    let magic = get_u32(bytes, OFF_MAGIC);
    if magic != FRAME_MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let reserved = get_u32(bytes, OFF_RESERVED);
    if reserved != 0 {
        return Err(FrameError::ReservedNonZero(reserved));
    }
    let code = get_u16(bytes, OFF_TYPE);
    let kind = FrameType::from_code(code).ok_or(FrameError::UnknownType(code))?;
    let header = FrameHeader {
        kind,
        flags: get_u16(bytes, OFF_FLAGS),
        payload_bytes: get_u32(bytes, OFF_PAYLOAD_BYTES),
        epoch: get_u64(bytes, OFF_EPOCH),
        seq: get_u64(bytes, OFF_SEQ),
        offset: get_u64(bytes, OFF_OFFSET),
        length: get_u32(bytes, OFF_LENGTH),
        crc: get_u32(bytes, OFF_CRC),
    };
    check_payload_bytes(&header)?;
    if header.flags & !kind.allowed_flags() != 0 {
        return Err(FrameError::UnknownFlags {
            kind,
            flags: header.flags,
        });
    }
    check_fields(&header)?;
    Ok(header)
}

fn check_payload_bytes(header: &FrameHeader) -> Result<(), FrameError> {
    let (kind, payload_bytes) = (header.kind, header.payload_bytes);
    let (min, max) = kind.payload_bounds();
    if payload_bytes > max || payload_bytes > NBD_PAYLOAD_BYTES_MAX {
        return Err(FrameError::PayloadTooLarge {
            kind,
            payload_bytes,
        });
    }
    let data_mismatch = kind.fields() == Fields::Data && payload_bytes != header.length;
    if payload_bytes < min || data_mismatch {
        return Err(FrameError::BadPayloadLength {
            kind,
            payload_bytes,
        });
    }
    Ok(())
}

fn check_fields(header: &FrameHeader) -> Result<(), FrameError> {
    let kind = header.kind;
    let fields = kind.fields();
    let uses_seq = matches!(fields, Fields::Data | Fields::Range | Fields::Seq);
    let uses_offset = matches!(fields, Fields::Data | Fields::Range | Fields::Offset);
    let uses_length = matches!(fields, Fields::Data | Fields::Range);
    let unused = |field| Err(FrameError::UnusedFieldNonZero { kind, field });
    if !uses_seq && header.seq != 0 {
        return unused("seq");
    }
    if !uses_offset && header.offset != 0 {
        return unused("offset");
    }
    if !uses_length && header.length != 0 {
        return unused("length");
    }
    let range_length = match fields {
        Fields::Data | Fields::Range => u64::from(header.length),
        Fields::Offset => u64::from(header.payload_bytes),
        Fields::Seq | Fields::PayloadOnly => return Ok(()),
    };
    if range_length == 0 || header.offset.checked_add(range_length).is_none() {
        return Err(FrameError::BadRange {
            kind,
            offset: header.offset,
            length: range_length,
        });
    }
    Ok(())
}

/// crc32c over the header with its crc field zeroed, then the payload.
fn frame_crc(header_bytes: &[u8; FRAME_HEADER_BYTES], payload: &[u8]) -> u32 {
    let mut zeroed = *header_bytes;
    zeroed[OFF_CRC..OFF_CRC + 4].fill(0);
    crc32c::crc32c_append(crc32c::crc32c(&zeroed), payload)
}

/// Checks the crc32c over header and payload, then parses the payload. `header` must be
/// what [`decode_header`] returned for `header_bytes`, and `payload` exactly
/// `header.payload_bytes()` long (both are the caller's invariants, asserted).
pub fn verify<'a>(
    header: &FrameHeader,
    header_bytes: &[u8; FRAME_HEADER_BYTES],
    payload: &'a [u8],
) -> Result<Frame<'a>, FrameError> {
    assert_eq!(
        decode_header(header_bytes).as_ref(),
        Ok(header),
        "header does not come from these bytes"
    );
    assert_eq!(
        payload.len(),
        header.payload_bytes as usize,
        "payload length differs from the header's"
    );
    let computed = frame_crc(header_bytes, payload);
    if computed != header.crc {
        return Err(FrameError::Checksum {
            received: header.crc,
            computed,
        });
    }
    parse_payload(header, payload)
}

fn parse_payload<'a>(header: &FrameHeader, payload: &'a [u8]) -> Result<Frame<'a>, FrameError> {
    let (seq, offset, length) = (header.seq, header.offset, header.length);
    let fua = header.flags & frame_flag::FUA != 0;
    let frame = match header.kind {
        FrameType::Hello => Frame::Hello(Hello::decode(payload)?),
        FrameType::Auth => Frame::Auth {
            proof: payload.try_into().expect("Auth payload size checked"),
        },
        FrameType::Refuse => parse_refuse(payload)?,
        FrameType::State => Frame::State(NodeState::decode(payload)?),
        FrameType::Write => Frame::Write {
            seq,
            offset,
            fua,
            data: payload,
        },
        FrameType::WriteZeroes => Frame::WriteZeroes {
            seq,
            offset,
            length,
            fua,
        },
        FrameType::Trim => Frame::Trim {
            seq,
            offset,
            length,
            fua,
        },
        FrameType::Flush => Frame::Flush { seq },
        FrameType::Ack => Frame::Ack { seq },
        FrameType::Nack => {
            let errno = get_u32(payload, 0);
            if errno == 0 {
                return Err(FrameError::Malformed {
                    kind: FrameType::Nack,
                    reason: "errno 0",
                });
            }
            Frame::Nack { seq, errno }
        }
        FrameType::FlushAck => Frame::FlushAck { seq },
        FrameType::KeepAlive => Frame::KeepAlive { nonce: seq },
        FrameType::KeepAliveAck => Frame::KeepAliveAck { nonce: seq },
        FrameType::ResyncData => Frame::ResyncData {
            seq,
            offset,
            data: payload,
        },
        FrameType::ResyncAck => Frame::ResyncAck { seq },
        FrameType::ResyncDone => Frame::ResyncDone { seq },
        FrameType::VerifyRequest => Frame::VerifyRequest {
            seq,
            offset,
            length,
        },
        FrameType::VerifyReply => {
            if !payload.len().is_multiple_of(VERIFY_DIGEST_BYTES as usize) {
                return Err(FrameError::Malformed {
                    kind: FrameType::VerifyReply,
                    reason: "not a whole number of digests",
                });
            }
            Frame::VerifyReply {
                seq,
                digests: payload,
            }
        }
        FrameType::BitmapChunk => Frame::BitmapChunk {
            offset,
            last: header.flags & frame_flag::LAST != 0,
            bytes: payload,
        },
    };
    Ok(frame)
}

fn parse_refuse(payload: &[u8]) -> Result<Frame<'_>, FrameError> {
    let malformed = |reason| FrameError::Malformed {
        kind: FrameType::Refuse,
        reason,
    };
    let reason = RefuseReason::from_code(get_u32(payload, 0)).ok_or(malformed("reason 0"))?;
    let message = std::str::from_utf8(&payload[REFUSE_HEADER_BYTES as usize..])
        .map_err(|_| malformed("message is not UTF-8"))?;
    Ok(Frame::Refuse { reason, message })
}

/// The header fields of a frame about to be encoded.
struct Fields64 {
    flags: u16,
    seq: u64,
    offset: u64,
    length: u32,
}

/// Appends the whole frame (header and payload) to `out`. For Write and ResyncData the
/// shell usually sends the data from its own buffer instead: see [`encode_data_header`].
/// Frames we build are asserted valid: a frame we could not decode is a bug.
pub fn encode(frame: &Frame<'_>, epoch: u64, out: &mut Vec<u8>) {
    let (fields, payload) = fields_and_payload(frame);
    let header = encode_header(frame.kind(), epoch, &fields, &payload);
    out.extend_from_slice(&header);
    out.extend_from_slice(&payload);
}

/// The small payload of `frame` (or the borrowed data of data frames, copied) and the
/// header fields.
fn fields_and_payload(frame: &Frame<'_>) -> (Fields64, Vec<u8>) {
    let flag = |set: bool, bit: u16| if set { bit } else { 0 };
    let plain = |seq| Fields64 {
        flags: 0,
        seq,
        offset: 0,
        length: 0,
    };
    match *frame {
        Frame::Hello(hello) => (plain(0), hello.encode_payload().to_vec()),
        Frame::Auth { proof } => (plain(0), proof.to_vec()),
        Frame::Refuse { reason, message } => {
            assert!(
                message.len() <= REFUSE_MESSAGE_BYTES_MAX,
                "refusal too long"
            );
            assert_eq!(
                RefuseReason::from_code(reason.code()),
                Some(reason),
                "refuse code {} does not round-trip",
                reason.code()
            );
            let mut payload = reason.code().to_le_bytes().to_vec();
            payload.extend_from_slice(message.as_bytes());
            (plain(0), payload)
        }
        Frame::State(state) => (plain(0), state.encode_payload().to_vec()),
        Frame::Write {
            seq,
            offset,
            fua,
            data,
        } => (data_fields(seq, offset, fua, data), data.to_vec()),
        Frame::ResyncData { seq, offset, data } => {
            (data_fields(seq, offset, false, data), data.to_vec())
        }
        Frame::VerifyRequest {
            seq,
            offset,
            length,
        } => {
            let fields = Fields64 {
                flags: 0,
                seq,
                offset,
                length,
            };
            (fields, Vec::new())
        }
        Frame::VerifyReply { seq, digests } => {
            assert!(
                !digests.is_empty() && digests.len() % VERIFY_DIGEST_BYTES as usize == 0,
                "VerifyReply of {} bytes",
                digests.len()
            );
            (plain(seq), digests.to_vec())
        }
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
        } => {
            let fields = Fields64 {
                flags: flag(fua, frame_flag::FUA),
                seq,
                offset,
                length,
            };
            (fields, Vec::new())
        }
        Frame::Flush { seq }
        | Frame::Ack { seq }
        | Frame::FlushAck { seq }
        | Frame::ResyncAck { seq }
        | Frame::ResyncDone { seq }
        | Frame::KeepAlive { nonce: seq }
        | Frame::KeepAliveAck { nonce: seq } => (plain(seq), Vec::new()),
        Frame::Nack { seq, errno } => {
            assert_ne!(errno, 0, "Nack without an errno");
            (plain(seq), errno.to_le_bytes().to_vec())
        }
        Frame::BitmapChunk {
            offset,
            last,
            bytes,
        } => {
            let fields = Fields64 {
                flags: flag(last, frame_flag::LAST),
                seq: 0,
                offset,
                length: 0,
            };
            (fields, bytes.to_vec())
        }
    }
}

fn data_fields(seq: u64, offset: u64, fua: bool, data: &[u8]) -> Fields64 {
    assert!(
        !data.is_empty() && data.len() <= NBD_PAYLOAD_BYTES_MAX as usize,
        "data frame of {} bytes",
        data.len()
    );
    Fields64 {
        flags: if fua { frame_flag::FUA } else { 0 },
        seq,
        offset,
        length: data.len() as u32,
    }
}

fn encode_header(
    kind: FrameType,
    epoch: u64,
    fields: &Fields64,
    payload: &[u8],
) -> [u8; FRAME_HEADER_BYTES] {
    let payload_bytes = u32::try_from(payload.len()).expect("payload fits u32");
    let mut b = [0u8; FRAME_HEADER_BYTES];
    put_u32(&mut b, OFF_MAGIC, FRAME_MAGIC);
    put_u16(&mut b, OFF_TYPE, kind.code());
    put_u16(&mut b, OFF_FLAGS, fields.flags);
    put_u32(&mut b, OFF_PAYLOAD_BYTES, payload_bytes);
    put_u64(&mut b, OFF_EPOCH, epoch);
    put_u64(&mut b, OFF_SEQ, fields.seq);
    put_u64(&mut b, OFF_OFFSET, fields.offset);
    put_u32(&mut b, OFF_LENGTH, fields.length);
    let crc = frame_crc(&b, payload);
    put_u32(&mut b, OFF_CRC, crc);
    // Everything the header says must be what the decoder accepts (TigerBeetle: assert
    // on encode too). The crc is checked by `verify`, the payload's own rules below.
    let decoded = decode_header(&b)
        .unwrap_or_else(|error| panic!("encoded an invalid {kind} header: {error}"));
    assert_eq!(decoded.crc, crc);
    b
}

/// Which data-carrying frame [`encode_data_header`] builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFrame {
    Write { fua: bool },
    ResyncData,
}

/// The header of a Write or ResyncData frame whose payload is `data`, with the crc over
/// header and data. The shell sends these 48 bytes, then `data` from its own (pooled)
/// buffer, so the data is never copied into a frame buffer.
pub fn encode_data_header(
    kind: DataFrame,
    epoch: u64,
    seq: u64,
    offset: u64,
    data: &[u8],
) -> [u8; FRAME_HEADER_BYTES] {
    let (frame_type, fua) = match kind {
        DataFrame::Write { fua } => (FrameType::Write, fua),
        DataFrame::ResyncData => (FrameType::ResyncData, false),
    };
    encode_header(
        frame_type,
        epoch,
        &data_fields(seq, offset, fua, data),
        data,
    )
}

fn get_u16(b: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes(b[offset..offset + 2].try_into().expect("2 bytes"))
}

fn get_u32(b: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(b[offset..offset + 4].try_into().expect("4 bytes"))
}

fn get_u64(b: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(b[offset..offset + 8].try_into().expect("8 bytes"))
}

fn put_u16(b: &mut [u8], offset: usize, value: u16) {
    b[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
}

fn put_u32(b: &mut [u8], offset: usize, value: u32) {
    b[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

fn put_u64(b: &mut [u8], offset: usize, value: u64) {
    b[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn split(bytes: &[u8]) -> (&[u8; FRAME_HEADER_BYTES], &[u8]) {
        let (header, payload) = bytes.split_at(FRAME_HEADER_BYTES);
        (header.try_into().unwrap(), payload)
    }

    /// Decodes one whole frame the way the shell does: header first, then the payload.
    fn decode_all(bytes: &[u8]) -> Result<(FrameHeader, Frame<'_>), FrameError> {
        let (header_bytes, payload) = split(bytes);
        let header = decode_header(header_bytes)?;
        assert_eq!(payload.len(), header.payload_bytes() as usize);
        Ok((header, verify(&header, header_bytes, payload)?))
    }

    fn encoded(frame: &Frame<'_>, epoch: u64) -> Vec<u8> {
        let mut out = Vec::new();
        encode(frame, epoch, &mut out);
        out
    }

    /// Rewrites the crc after a test edited the header, so the edit reaches the check
    /// under test instead of `Checksum`.
    fn reseal(bytes: &mut [u8]) {
        let (header, payload) = bytes.split_at_mut(FRAME_HEADER_BYTES);
        let header: &mut [u8; FRAME_HEADER_BYTES] = header.try_into().unwrap();
        let crc = frame_crc(header, payload);
        put_u32(header, OFF_CRC, crc);
    }

    fn sample_hello() -> Hello {
        Hello {
            version_min: 1,
            version_max: 1,
            mirror_uuid: [7; 16],
            node_id: 1,
            expected_peer_id: 2,
            data_bytes: 1 << 30,
            logical_block_bytes: 512,
            granularity_bytes: 4096,
            epoch_proposal: 5,
            nonce: [9; NONCE_BYTES],
        }
    }

    fn sample_state() -> NodeState {
        NodeState {
            generations: Generations {
                current: 0x1111,
                bitmap: 0x2222,
                history: [0x3333, 0],
            },
            disk_state: DiskState::UpToDate,
            role: Role::Primary,
            flags: Flags::WAS_PRIMARY,
            intent: Role::Primary,
            dirty_bytes: 4096,
        }
    }

    fn ack() -> Vec<u8> {
        encoded(&Frame::Ack { seq: 1 }, 3)
    }

    #[test]
    fn magic_spells_mdrp_and_header_is_48_bytes() {
        assert_eq!(&FRAME_MAGIC.to_le_bytes(), b"MDRP");
        assert_eq!(ack().len(), FRAME_HEADER_BYTES);
        assert_eq!(OFF_CRC + 4, FRAME_HEADER_BYTES);
    }

    #[test]
    fn type_codes_are_unique_and_round_trip() {
        for kind in FrameType::ALL {
            assert_eq!(FrameType::from_code(kind.code()), Some(kind));
        }
        let mut codes: Vec<u16> = FrameType::ALL.iter().map(|k| k.code()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), FrameType::ALL.len());
        for code in RefuseReason::KNOWN.map(RefuseReason::code) {
            assert_eq!(RefuseReason::from_code(code).unwrap().code(), code);
        }
        assert_eq!(RefuseReason::from_code(0), None);
        assert_eq!(RefuseReason::from_code(99), Some(RefuseReason::Unknown(99)));
    }

    /// The byte layout of docs/replication-protocol.md, checked on one Write.
    #[test]
    fn write_frame_matches_the_documented_layout() {
        let data = [0xAB; 8];
        let bytes = encoded(
            &Frame::Write {
                seq: 0x0102_0304_0506_0708,
                offset: 0x1000,
                fua: true,
                data: &data,
            },
            0x2A,
        );
        let mut expected = Vec::new();
        expected.extend_from_slice(b"MDRP");
        expected.extend_from_slice(&[16, 0]); // type Write
        expected.extend_from_slice(&[1, 0]); // flags FUA
        expected.extend_from_slice(&[0; 4]); // reserved
        expected.extend_from_slice(&[8, 0, 0, 0]); // payload bytes
        expected.extend_from_slice(&[0x2A, 0, 0, 0, 0, 0, 0, 0]); // epoch
        expected.extend_from_slice(&[8, 7, 6, 5, 4, 3, 2, 1]); // seq
        expected.extend_from_slice(&[0, 0x10, 0, 0, 0, 0, 0, 0]); // offset
        expected.extend_from_slice(&[8, 0, 0, 0]); // length
        let mut zeroed = expected.clone();
        zeroed.extend_from_slice(&[0; 4]);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&zeroed), &data);
        expected.extend_from_slice(&crc.to_le_bytes());
        expected.extend_from_slice(&data);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn hello_and_state_payloads_match_the_documented_layout() {
        let hello = sample_hello().encode_payload();
        assert_eq!(&hello[0..4], &[1, 0, 1, 0]);
        assert_eq!(&hello[4..8], &1u32.to_le_bytes());
        assert_eq!(&hello[8..12], &2u32.to_le_bytes());
        assert_eq!(&hello[12..16], &512u32.to_le_bytes());
        assert_eq!(&hello[16..32], &[7; 16]);
        assert_eq!(&hello[32..40], &(1u64 << 30).to_le_bytes());
        assert_eq!(&hello[40..44], &4096u32.to_le_bytes());
        assert_eq!(&hello[44..48], &[0; 4]);
        assert_eq!(&hello[48..56], &5u64.to_le_bytes());
        assert_eq!(&hello[56..88], &[9; 32]);
        let state = sample_state().encode_payload();
        assert_eq!(&state[0..8], &0x1111u64.to_le_bytes());
        assert_eq!(&state[8..16], &0x2222u64.to_le_bytes());
        assert_eq!(&state[16..24], &0x3333u64.to_le_bytes());
        assert_eq!(&state[24..32], &[0; 8]);
        assert_eq!(
            &state[32..48],
            &[4, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0]
        );
        assert_eq!(&state[48..56], &4096u64.to_le_bytes());
        assert_eq!(&state[56..64], &[0; 8]);
    }

    #[test]
    fn data_header_plus_data_equals_the_whole_frame() {
        let data = vec![5u8; 4096];
        for (kind, frame) in [
            (
                DataFrame::Write { fua: false },
                Frame::Write {
                    seq: 9,
                    offset: 8192,
                    fua: false,
                    data: &data,
                },
            ),
            (
                DataFrame::Write { fua: true },
                Frame::Write {
                    seq: 9,
                    offset: 8192,
                    fua: true,
                    data: &data,
                },
            ),
            (
                DataFrame::ResyncData,
                Frame::ResyncData {
                    seq: 9,
                    offset: 8192,
                    data: &data,
                },
            ),
        ] {
            let mut split_form = encode_data_header(kind, 7, 9, 8192, &data).to_vec();
            split_form.extend_from_slice(&data);
            assert_eq!(split_form, encoded(&frame, 7));
        }
    }

    #[test]
    fn header_exposes_epoch_and_fields() {
        let bytes = encoded(
            &Frame::WriteZeroes {
                seq: 4,
                offset: 512,
                length: 1024,
                fua: true,
            },
            77,
        );
        let (header, _) = decode_all(&bytes).unwrap();
        assert_eq!(header.epoch(), 77);
        assert!(header.is_epoch(77) && !header.is_epoch(76));
        assert_eq!(
            (header.seq(), header.offset(), header.length()),
            (4, 512, 1024)
        );
        assert_eq!(header.flags(), frame_flag::FUA);
        assert_eq!(header.payload_bytes(), 0);
        assert_eq!(header.kind(), FrameType::WriteZeroes);
    }

    #[test]
    fn bad_magic() {
        let mut bytes = ack();
        bytes[0] = b'X';
        let magic = u32::from_le_bytes(*b"XDRP");
        assert_eq!(decode_all(&bytes).unwrap_err(), FrameError::BadMagic(magic));
    }

    #[test]
    fn reserved_non_zero() {
        let mut bytes = ack();
        bytes[OFF_RESERVED + 3] = 1;
        reseal(&mut bytes);
        assert_eq!(
            decode_all(&bytes).unwrap_err(),
            FrameError::ReservedNonZero(1 << 24)
        );
    }

    #[test]
    fn unknown_type() {
        for code in [0u16, 5, 15, 23, 34, 54, 0xFFFF] {
            let mut bytes = ack();
            put_u16(&mut bytes, OFF_TYPE, code);
            reseal(&mut bytes);
            assert_eq!(
                decode_all(&bytes).unwrap_err(),
                FrameError::UnknownType(code)
            );
        }
    }

    #[test]
    fn payload_too_large_is_refused_on_the_header_alone() {
        // A Write claiming more than NBD_PAYLOAD_BYTES_MAX: only the 48 header bytes
        // exist, so decode_header must refuse without wanting the payload.
        let mut header = encode_data_header(DataFrame::Write { fua: false }, 1, 1, 0, &[1]);
        let huge = NBD_PAYLOAD_BYTES_MAX + 1;
        put_u32(&mut header, OFF_PAYLOAD_BYTES, huge);
        put_u32(&mut header, OFF_LENGTH, huge);
        assert_eq!(
            decode_header(&header).unwrap_err(),
            FrameError::PayloadTooLarge {
                kind: FrameType::Write,
                payload_bytes: huge
            }
        );
        put_u32(&mut header, OFF_PAYLOAD_BYTES, u32::MAX);
        assert!(matches!(
            decode_header(&header),
            Err(FrameError::PayloadTooLarge { .. })
        ));
        // Above a small type's own maximum.
        let mut bytes = ack();
        put_u32(&mut bytes, OFF_PAYLOAD_BYTES, 1);
        let header: [u8; FRAME_HEADER_BYTES] = bytes[..FRAME_HEADER_BYTES].try_into().unwrap();
        assert_eq!(
            decode_header(&header).unwrap_err(),
            FrameError::PayloadTooLarge {
                kind: FrameType::Ack,
                payload_bytes: 1
            }
        );
        let mut chunk = encoded(
            &Frame::BitmapChunk {
                offset: 0,
                last: false,
                bytes: &[1],
            },
            1,
        );
        put_u32(&mut chunk, OFF_PAYLOAD_BYTES, BITMAP_CHUNK_BYTES_MAX + 1);
        let header: [u8; FRAME_HEADER_BYTES] = chunk[..FRAME_HEADER_BYTES].try_into().unwrap();
        assert!(matches!(
            decode_header(&header),
            Err(FrameError::PayloadTooLarge {
                kind: FrameType::BitmapChunk,
                ..
            })
        ));
    }

    #[test]
    fn bad_payload_length() {
        let header_of = |bytes: &[u8]| -> [u8; FRAME_HEADER_BYTES] {
            bytes[..FRAME_HEADER_BYTES].try_into().unwrap()
        };
        // A fixed-size payload one byte short.
        let mut hello = encoded(&Frame::Hello(sample_hello()), 0);
        put_u32(&mut hello, OFF_PAYLOAD_BYTES, HELLO_PAYLOAD_BYTES - 1);
        assert_eq!(
            decode_header(&header_of(&hello)).unwrap_err(),
            FrameError::BadPayloadLength {
                kind: FrameType::Hello,
                payload_bytes: HELLO_PAYLOAD_BYTES - 1
            }
        );
        // A Write whose payload differs from its length field.
        let mut write = encoded(
            &Frame::Write {
                seq: 1,
                offset: 0,
                fua: false,
                data: &[1, 2],
            },
            1,
        );
        put_u32(&mut write, OFF_LENGTH, 3);
        assert_eq!(
            decode_header(&header_of(&write)).unwrap_err(),
            FrameError::BadPayloadLength {
                kind: FrameType::Write,
                payload_bytes: 2
            }
        );
        // A Refuse without its reason code.
        let mut refuse = encoded(
            &Frame::Refuse {
                reason: RefuseReason::Timeout,
                message: "",
            },
            0,
        );
        put_u32(&mut refuse, OFF_PAYLOAD_BYTES, 3);
        assert!(matches!(
            decode_header(&header_of(&refuse)),
            Err(FrameError::BadPayloadLength {
                kind: FrameType::Refuse,
                payload_bytes: 3
            })
        ));
    }

    #[test]
    fn unknown_flags() {
        let mut bytes = ack();
        put_u16(&mut bytes, OFF_FLAGS, frame_flag::FUA);
        reseal(&mut bytes);
        assert_eq!(
            decode_all(&bytes).unwrap_err(),
            FrameError::UnknownFlags {
                kind: FrameType::Ack,
                flags: frame_flag::FUA
            }
        );
        // LAST is a BitmapChunk flag, not a Write flag; bit 15 is nobody's.
        for flags in [frame_flag::LAST, 1 << 15] {
            let mut write = encoded(
                &Frame::Write {
                    seq: 1,
                    offset: 0,
                    fua: false,
                    data: &[1],
                },
                1,
            );
            put_u16(&mut write, OFF_FLAGS, flags);
            reseal(&mut write);
            assert_eq!(
                decode_all(&write).unwrap_err(),
                FrameError::UnknownFlags {
                    kind: FrameType::Write,
                    flags
                }
            );
        }
    }

    #[test]
    fn unused_field_non_zero() {
        for (offset, field) in [(OFF_OFFSET, "offset"), (OFF_LENGTH, "length")] {
            let mut bytes = ack();
            bytes[offset] = 1;
            reseal(&mut bytes);
            assert_eq!(
                decode_all(&bytes).unwrap_err(),
                FrameError::UnusedFieldNonZero {
                    kind: FrameType::Ack,
                    field
                }
            );
        }
        let mut hello = encoded(&Frame::Hello(sample_hello()), 0);
        hello[OFF_SEQ] = 1;
        reseal(&mut hello);
        assert_eq!(
            decode_all(&hello).unwrap_err(),
            FrameError::UnusedFieldNonZero {
                kind: FrameType::Hello,
                field: "seq"
            }
        );
    }

    #[test]
    fn bad_range() {
        // Zero-length WriteZeroes.
        let mut zeroes = encoded(
            &Frame::WriteZeroes {
                seq: 1,
                offset: 0,
                length: 1,
                fua: false,
            },
            1,
        );
        put_u32(&mut zeroes, OFF_LENGTH, 0);
        reseal(&mut zeroes);
        assert_eq!(
            decode_all(&zeroes).unwrap_err(),
            FrameError::BadRange {
                kind: FrameType::WriteZeroes,
                offset: 0,
                length: 0
            }
        );
        // A Trim whose end overflows u64.
        let mut trim = encoded(
            &Frame::Trim {
                seq: 1,
                offset: 0,
                length: 2,
                fua: false,
            },
            1,
        );
        put_u64(&mut trim, OFF_OFFSET, u64::MAX);
        reseal(&mut trim);
        assert_eq!(
            decode_all(&trim).unwrap_err(),
            FrameError::BadRange {
                kind: FrameType::Trim,
                offset: u64::MAX,
                length: 2
            }
        );
        // A Write at the very end of the u64 space.
        let mut write = encoded(
            &Frame::Write {
                seq: 1,
                offset: 0,
                fua: false,
                data: &[1, 2],
            },
            1,
        );
        put_u64(&mut write, OFF_OFFSET, u64::MAX - 1);
        reseal(&mut write);
        assert!(matches!(
            decode_all(&write),
            Err(FrameError::BadRange {
                kind: FrameType::Write,
                ..
            })
        ));
    }

    #[test]
    fn checksum() {
        let mut bytes = encoded(
            &Frame::Write {
                seq: 1,
                offset: 0,
                fua: false,
                data: &[1, 2, 3],
            },
            1,
        );
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        assert!(matches!(
            decode_all(&bytes),
            Err(FrameError::Checksum { .. })
        ));
        let mut bytes = ack();
        bytes[OFF_SEQ] ^= 1;
        let Err(FrameError::Checksum { received, computed }) = decode_all(&bytes) else {
            panic!("a flipped seq bit must fail the checksum");
        };
        assert_ne!(received, computed);
    }

    /// Each payload rule its own case: (frame, byte offset in the payload, new value,
    /// expected reason).
    #[test]
    fn malformed_payloads() {
        let hello = encoded(&Frame::Hello(sample_hello()), 0);
        let state = encoded(&Frame::State(sample_state()), 1);
        let nack = encoded(&Frame::Nack { seq: 1, errno: 5 }, 1);
        let refuse = encoded(
            &Frame::Refuse {
                reason: RefuseReason::Timeout,
                message: "ab",
            },
            0,
        );
        /// (frame, byte offset in the payload, new bytes, expected kind and reason)
        type Case<'a> = (&'a Vec<u8>, usize, &'a [u8], FrameType, &'static str);
        let cases: [Case<'_>; 14] = [
            (
                &hello,
                0,
                &[0, 0],
                FrameType::Hello,
                "version range starts at 0",
            ),
            (
                &hello,
                0,
                &[2, 0],
                FrameType::Hello,
                "version range is empty (min > max)",
            ),
            (
                &hello,
                44,
                &[1],
                FrameType::Hello,
                "reserved bytes are not zero",
            ),
            (&hello, 48, &[0; 8], FrameType::Hello, "epoch proposal is 0"),
            (
                &state,
                0,
                &[0; 8],
                FrameType::State,
                "no current generation",
            ),
            (&state, 32, &[5], FrameType::State, "unknown disk state"),
            (&state, 36, &[0], FrameType::State, "unknown role"),
            (&state, 43, &[0x80], FrameType::State, "unknown state flags"),
            (&state, 44, &[3], FrameType::State, "unknown intent"),
            (
                &state,
                63,
                &[1],
                FrameType::State,
                "reserved bytes are not zero",
            ),
            (&nack, 0, &[0, 0, 0, 0], FrameType::Nack, "errno 0"),
            (&refuse, 0, &[0, 0, 0, 0], FrameType::Refuse, "reason 0"),
            (
                &refuse,
                4,
                &[0xFF],
                FrameType::Refuse,
                "message is not UTF-8",
            ),
            (
                &refuse,
                5,
                &[0xC3],
                FrameType::Refuse,
                "message is not UTF-8",
            ),
        ];
        for (frame, at, value, kind, reason) in cases {
            let mut bytes = frame.clone();
            let at = FRAME_HEADER_BYTES + at;
            bytes[at..at + value.len()].copy_from_slice(value);
            reseal(&mut bytes);
            assert_eq!(
                decode_all(&bytes).unwrap_err(),
                FrameError::Malformed { kind, reason },
                "{kind} with {value:?} at {at}"
            );
        }
    }

    #[test]
    #[should_panic(expected = "payload length differs")]
    fn verify_asserts_the_payload_length() {
        let bytes = ack();
        let (header_bytes, _) = split(&bytes);
        let header = decode_header(header_bytes).unwrap();
        let _ = verify(&header, header_bytes, &[0]);
    }

    #[test]
    #[should_panic(expected = "data frame of 0 bytes")]
    fn encoding_an_empty_write_is_a_bug() {
        encode_data_header(DataFrame::Write { fua: false }, 1, 1, 0, &[]);
    }

    #[test]
    #[should_panic(expected = "encoded an invalid Trim header")]
    fn encoding_an_overflowing_range_is_a_bug() {
        let frame = Frame::Trim {
            seq: 1,
            offset: u64::MAX,
            length: 1,
            fua: false,
        };
        encoded(&frame, 1);
    }

    #[test]
    #[should_panic(expected = "does not round-trip")]
    fn encoding_a_known_code_as_unknown_is_a_bug() {
        let frame = Frame::Refuse {
            reason: RefuseReason::Unknown(1),
            message: "",
        };
        encoded(&frame, 1);
    }

    /// An owned description of any valid frame, for property tests.
    #[derive(Debug, Clone)]
    struct Sample {
        selector: usize,
        epoch: u64,
        seq: u64,
        offset: u64,
        length: u32,
        flag: bool,
        number: u32,
        data: Vec<u8>,
        message: String,
        hello: Hello,
        state: NodeState,
        proof: [u8; AUTH_PROOF_BYTES],
    }

    impl Sample {
        fn frame(&self) -> Frame<'_> {
            let (seq, fua) = (self.seq, self.flag);
            let data = &self.data[..];
            let data_offset = self.offset.min(u64::MAX - data.len() as u64);
            let length = self.length.max(1);
            let range_offset = self.offset.min(u64::MAX - u64::from(length));
            match self.selector {
                0 => Frame::Hello(self.hello),
                1 => Frame::Auth { proof: self.proof },
                2 => Frame::Refuse {
                    reason: RefuseReason::from_code(self.number.max(1)).unwrap(),
                    message: &self.message,
                },
                3 => Frame::State(self.state),
                4 => Frame::Write {
                    seq,
                    offset: data_offset,
                    fua,
                    data,
                },
                5 => Frame::WriteZeroes {
                    seq,
                    offset: range_offset,
                    length,
                    fua,
                },
                6 => Frame::Trim {
                    seq,
                    offset: range_offset,
                    length,
                    fua,
                },
                7 => Frame::Flush { seq },
                8 => Frame::Ack { seq },
                9 => Frame::Nack {
                    seq,
                    errno: self.number.max(1),
                },
                10 => Frame::FlushAck { seq },
                11 => Frame::KeepAlive { nonce: seq },
                12 => Frame::KeepAliveAck { nonce: seq },
                13 => Frame::ResyncData {
                    seq,
                    offset: data_offset,
                    data,
                },
                14 => Frame::ResyncAck { seq },
                15 => Frame::ResyncDone { seq },
                16 => Frame::VerifyRequest {
                    seq,
                    offset: range_offset,
                    length,
                },
                17 => Frame::VerifyReply {
                    seq,
                    digests: if data.len() >= 32 {
                        &data[..data.len() / 32 * 32]
                    } else {
                        &self.proof[..]
                    },
                },
                _ => Frame::BitmapChunk {
                    offset: data_offset,
                    last: fua,
                    bytes: data,
                },
            }
        }
    }

    fn hello_strategy() -> impl Strategy<Value = Hello> {
        (
            (1u16..=u16::MAX, any::<u16>()),
            any::<[u8; 16]>(),
            (any::<u32>(), any::<u32>(), any::<u64>()),
            (any::<u32>(), any::<u32>(), 1u64..),
            any::<[u8; NONCE_BYTES]>(),
        )
            .prop_map(
                |((min, span), uuid, (node, peer, size), (block, granularity, epoch), nonce)| {
                    Hello {
                        version_min: min,
                        version_max: min.saturating_add(span),
                        mirror_uuid: uuid,
                        node_id: node,
                        expected_peer_id: peer,
                        data_bytes: size,
                        logical_block_bytes: block,
                        granularity_bytes: granularity,
                        epoch_proposal: epoch,
                        nonce,
                    }
                },
            )
    }

    fn state_strategy() -> impl Strategy<Value = NodeState> {
        (
            (1u64.., any::<u64>(), any::<u64>(), any::<u64>()),
            (1u32..=4, 1u32..=2, 0..=Flags::ALL.bits(), 1u32..=2),
            any::<u64>(),
        )
            .prop_map(
                |((current, bitmap, h0, h1), (disk, role, flags, intent), dirty)| NodeState {
                    generations: Generations {
                        current,
                        bitmap,
                        history: [h0, h1],
                    },
                    disk_state: DiskState::from_u32(disk).unwrap(),
                    role: Role::from_u32(role).unwrap(),
                    flags: Flags::from_bits(flags).unwrap(),
                    intent: Role::from_u32(intent).unwrap(),
                    dirty_bytes: dirty,
                },
            )
    }

    fn sample_strategy() -> impl Strategy<Value = Sample> {
        (
            (0usize..19, any::<u64>(), any::<u64>(), any::<u64>()),
            (any::<u32>(), any::<bool>(), any::<u32>()),
            prop::collection::vec(any::<u8>(), 1..300),
            "\\PC{0,60}",
            hello_strategy(),
            state_strategy(),
            any::<[u8; AUTH_PROOF_BYTES]>(),
        )
            .prop_map(
                |(
                    (selector, epoch, seq, offset),
                    (length, flag, number),
                    data,
                    message,
                    hello,
                    state,
                    proof,
                )| Sample {
                    selector,
                    epoch,
                    seq,
                    offset,
                    length,
                    flag,
                    number,
                    data,
                    message,
                    hello,
                    state,
                    proof,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Every frame type: encode, decode, get the same frame and epoch back, and
        /// encode again to the same bytes.
        #[test]
        fn every_frame_round_trips(sample in sample_strategy()) {
            let frame = sample.frame();
            let bytes = encoded(&frame, sample.epoch);
            let (header, decoded) = decode_all(&bytes).unwrap();
            prop_assert_eq!(decoded, frame);
            prop_assert_eq!(header.epoch(), sample.epoch);
            prop_assert_eq!(header.kind(), frame.kind());
            prop_assert_eq!(encoded(&decoded, header.epoch()), bytes);
        }

        /// Any single corrupted byte, header or payload: an error (a header error, or
        /// Checksum), never a frame. crc32c detects every burst of up to 32 bits.
        #[test]
        fn a_corrupted_byte_is_never_a_frame(
            sample in sample_strategy(),
            position in any::<prop::sample::Index>(),
            xor in 1u8..,
        ) {
            let mut bytes = encoded(&sample.frame(), sample.epoch);
            let at = position.index(bytes.len());
            bytes[at] ^= xor;
            let (header_bytes, payload) = split(&bytes);
            if let Ok(header) = decode_header(header_bytes) {
                // A corrupted length field may ask for more bytes than were sent (the
                // shell would wait, then time out) or fewer (verify sees a prefix).
                let wanted = header.payload_bytes() as usize;
                if let Some(prefix) = payload.get(..wanted) {
                    let result = verify(&header, header_bytes, prefix);
                    prop_assert!(result.is_err(), "corruption at {} accepted: {:?}", at, result);
                    if !(OFF_PAYLOAD_BYTES..OFF_PAYLOAD_BYTES + 4).contains(&at) {
                        let checksum = matches!(result, Err(FrameError::Checksum { .. }));
                        prop_assert!(checksum, "corruption at {} gave {:?}", at, result);
                    }
                }
            }
        }

        /// decode_header never panics on any 48 bytes.
        #[test]
        fn arbitrary_headers_never_panic(bytes in any::<[u8; FRAME_HEADER_BYTES]>()) {
            let _ = decode_header(&bytes);
        }
    }
}
