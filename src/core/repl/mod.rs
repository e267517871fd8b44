//! The replication protocol between the two nodes of a mirror set, as pure codecs and a
//! pure handshake state machine.
//!
//! No I/O, no clock, no randomness: the shell reads frames off the socket, hands the
//! bytes to [`wire`], feeds the decoded frames to [`handshake::Handshake`] (then to the
//! replication engine), and sends the bytes they produce. Nonces, the cluster secret and
//! `now` are inputs. The byte-level specification is `docs/replication-protocol.md`;
//! every constant it names is defined here or in [`wire`].
//!
//! - `wire`: the 48-byte frame header, every frame type, encode/decode, `FrameError`.
//! - `handshake`: Hello / Auth / State exchange, version negotiation, mutual HMAC
//!   authentication, connection epochs, refusals (`Handshake`).
//! - `tiebreak`: which of two crossed simultaneous connections survives.

pub mod handshake;
pub mod tiebreak;
pub mod wire;

pub use handshake::{
    ClusterSecret, Established, Failure, Handshake, HandshakeConfig, PeerInfo, SecretError, Status,
    VersionRange,
};
pub use tiebreak::{Initiator, crossed_connect_survivor, keep_connection};
pub use wire::{
    FRAME_HEADER_BYTES, Frame, FrameError, FrameHeader, FrameType, Hello, NodeState, RefuseReason,
    decode_header, encode, encode_data_header, verify,
};

use crate::constants::MIB;

// ---------------------------------------------------------------------------------------
// Limits and protocol constants. Each one is named once, with the reason for its value.
// ---------------------------------------------------------------------------------------

/// Lowest protocol version this code speaks. Versions start at 1 so that 0 can never be
/// mistaken for a valid range bound in a zeroed buffer.
pub const PROTOCOL_VERSION_MIN: u16 = 1;
/// Highest protocol version this code speaks. A change to any frame layout after Hello,
/// or to the meaning of a field, bumps it; the Hello layout itself is frozen forever
/// because it is what versions are negotiated with.
pub const PROTOCOL_VERSION_MAX: u16 = 1;

/// Bytes of each side's handshake nonce: 256 bits, so two honest handshakes never reuse
/// a nonce (birthday bound 2^128) and an old proof can never match a new challenge.
pub const NONCE_BYTES: usize = 32;

/// Bytes of an authentication proof: one HMAC-SHA256 output, sent untruncated.
pub const AUTH_PROOF_BYTES: usize = 32;

/// Shortest cluster secret accepted: 128 bits, below which HMAC-SHA256's strength is
/// the secret's, and guessing becomes conceivable. `head -c 32 /dev/urandom` exceeds it.
pub const CLUSTER_SECRET_BYTES_MIN: usize = 16;
/// Longest cluster secret accepted: bounds what a secret file may make us hold; HMAC
/// hashes keys longer than one SHA-256 block (64 bytes) anyway, so length adds nothing.
pub const CLUSTER_SECRET_BYTES_MAX: usize = 4096;

/// Longest human-readable message in a Refuse frame. Long enough for every refusal we
/// write (they name both sides' values), short enough that a hostile peer cannot make
/// us buffer or log much.
pub const REFUSE_MESSAGE_BYTES_MAX: usize = 1024;

/// Largest BitmapChunk payload. A worst-case serialized roaring bitmap of 2^32 regions
/// is about 512 MiB, so 1 MiB chunks bound one frame's buffer while a full exchange is
/// still only a few hundred frames.
pub const BITMAP_CHUNK_BYTES_MAX: u32 = MIB as u32;

/// Bytes of one online-verify digest: SHA-256, far wider than the crc32c that guards
/// frames, so two different regions practically never compare equal.
pub const VERIFY_DIGEST_BYTES: u32 = 32;

/// Largest VerifyReply payload: 2048 digests, a 8 MiB range at the 4 KiB default
/// granularity (the engine asks for 1 MiB at a time).
pub const VERIFY_REPLY_BYTES_MAX: u32 = 2048 * VERIFY_DIGEST_BYTES;

/// Default handshake deadline: from connect (or accept) to Established. The exchange is
/// three round trips of small frames, so 10 s only expires when the peer is stuck or
/// hostile; the shell then drops the connection and reconnects with backoff.
pub const HANDSHAKE_TIMEOUT_MS_DEFAULT: u64 = 10_000;
