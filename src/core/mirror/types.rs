//! The mirror engine's vocabulary: what goes in (client requests, peer messages, link
//! events, completions) and what comes out (actions for the shell).

use crate::core::meta::MetaIo;
use crate::core::nbd::wire::Errno;
use crate::core::overlap::ByteRange;
use crate::core::repl::wire::NodeState;

/// A client request, numbered by the engine; never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReqId(pub u64);

/// A local disk operation issued by the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DiskOpId(pub u64);

/// A data payload received from the peer (a Write or ResyncData frame), numbered by the
/// shell, which holds the buffer until the engine's disk op takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerDataId(pub u64);

/// A buffer the engine asks the shell to allocate for a resync read (sync source).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResyncBufId(pub u64);

/// Which buffer holds the data of a disk operation or an outgoing frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataRef {
    /// A client request's buffer: a write's payload or a read's destination.
    Request(ReqId),
    /// A payload received from the peer. Used by exactly one disk op, which consumes it.
    Peer(PeerDataId),
    /// A resync buffer (source side): a disk read fills it (the shell allocates it for
    /// that read), a `Send` of ResyncData consumes it, or a `Release` frees it.
    Resync(ResyncBufId),
}

/// A validated block request, in data-partition byte offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientOp {
    Read {
        range: ByteRange,
    },
    Write {
        range: ByteRange,
        fua: bool,
    },
    WriteZeroes {
        range: ByteRange,
        fua: bool,
        no_hole: bool,
        fast_zero: bool,
    },
    Trim {
        range: ByteRange,
        fua: bool,
    },
    Flush,
    Cache {
        range: ByteRange,
    },
}

impl ClientOp {
    /// The range a modifying request changes, and whether it asked for FUA.
    pub fn modification(&self) -> Option<(ByteRange, bool)> {
        match *self {
            ClientOp::Write { range, fua }
            | ClientOp::WriteZeroes { range, fua, .. }
            | ClientOp::Trim { range, fua } => Some((range, fua)),
            ClientOp::Read { .. } | ClientOp::Flush | ClientOp::Cache { .. } => None,
        }
    }
}

/// Local disk operations have the shape of client operations: the shell's volume
/// executes them (read-modify-write, zeroing strategies).
pub type DiskOp = ClientOp;

/// Messages between the engines of the two nodes. The shell carries them in
/// `core::repl::wire` frames stamped with the connection's epoch; a message whose
/// frame carries data (Write, ResyncData) comes with a `DataRef`/`PeerDataId`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMsg {
    /// The sender's state changed (role, disk state, generations, intent).
    State(NodeState),
    /// A replicated client write; `range.length()` data bytes follow.
    Write {
        seq: u64,
        range: ByteRange,
        fua: bool,
    },
    /// A replicated WRITE_ZEROES; TRIM is replicated as this too, so both replicas stay
    /// byte-identical whatever each backing does on discard.
    WriteZeroes {
        seq: u64,
        range: ByteRange,
        fua: bool,
    },
    /// Make every write with a smaller sequence number durable, then answer FlushAck.
    Flush {
        seq: u64,
    },
    /// The write `seq` is applied (and durable, if it had FUA).
    Ack {
        seq: u64,
    },
    /// The write `seq` failed on the peer's disk (Linux errno).
    Nack {
        seq: u64,
        errno: u32,
    },
    FlushAck {
        seq: u64,
    },
    /// Resync data from the sync source; `range.length()` data bytes follow.
    ResyncData {
        seq: u64,
        range: ByteRange,
    },
    ResyncAck {
        seq: u64,
    },
    /// The source copied everything and a peer flush covers it: the target records the
    /// finish (taking the source's generation) and answers with State.
    ResyncDone {
        seq: u64,
    },
    /// Online verify: hash `range` region by region and answer VerifyReply.
    VerifyRequest {
        seq: u64,
        range: ByteRange,
    },
    /// The per-region digests of a VerifyRequest's range, in region order.
    VerifyReply {
        seq: u64,
        digests: Vec<[u8; 32]>,
    },
    /// A chunk of the sender's serialized dirty bitmap (roaring portable format).
    BitmapChunk {
        offset: u64,
        bytes: Vec<u8>,
        last: bool,
    },
}

/// What the shell must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run `op` on the local data partition; report with `handle_disk_done(id, ..)`.
    /// `data` names the buffer holding (or receiving) the data, if the op has any.
    Disk {
        id: DiskOpId,
        data: Option<DataRef>,
        op: DiskOp,
    },
    /// Run a metadata I/O on the CLUSTER partition; report with `handle_meta_done`.
    Meta(MetaIo),
    /// Answer the client request (exactly once per `ReqId`). For a successful read,
    /// the data is what its disk read returned into the request's buffer.
    Reply {
        req: ReqId,
        result: Result<(), Errno>,
    },
    /// Send `msg` to the peer on the current connection, followed by `data` for Write
    /// and ResyncData. Sends are ordered: the shell writes them in the order given.
    Send { msg: PeerMsg, data: Option<DataRef> },
    /// Close the peer connection; the shell then reports `handle_link_down`.
    DropLink { reason: String },
    /// The engine no longer needs this resync buffer; free it.
    Release(DataRef),
    /// Read `range` of the local data partition and hash it, one SHA-256 digest per
    /// `region_bytes`; report with `handle_digests(id, ..)` (online verify).
    Digest {
        id: DiskOpId,
        range: ByteRange,
        region_bytes: u32,
    },
    /// The outcome of an `activate`/`deactivate` request.
    RoleChanged { result: Result<(), String> },
}
