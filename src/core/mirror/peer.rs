//! The peer half of the engine: connection life cycle, the bitmap exchange at connect,
//! replication on the primary (transfer log, acks, peer flushes), applying on the
//! secondary (activity log first, overlapping writes and flush coverage in sequence
//! order), and resync as source and target.
//!
//! Only one side sends sequence-numbered data on a connection: the primary (client
//! writes) which is also always the sync source. A primary that the generation rules
//! find *behind* its peer refuses the connection instead.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rustc_hash::FxHashMap;

use roaring::RoaringBitmap;

use crate::core::meta::journal::Ticket;
use crate::core::meta::{self, DiskState, Flags, Gate, Mode, Role, SuperblockTicket, WriteId};
use crate::core::nbd::wire::Errno;
use crate::core::overlap::{Acquire, ByteRange};
use crate::core::repl::wire::NodeState;

use super::engine::{DiskPurpose, Engine, RoleChange, SplitBrainPolicy};
use super::generations::{self, Decision, NodeView, Outcome, Resync, Side};
use super::types::{Action, ClientOp, DataRef, PeerDataId, PeerMsg, ReqId, ResyncBufId};
use super::verify::VerifySource;

/// Bytes of serialized bitmap per BitmapChunk frame (the wire allows up to 1 MiB).
pub const BITMAP_CHUNK_BYTES: usize = 1 << 20;
/// Largest serialized bitmap accepted from a peer: the worst case for the largest
/// volume the format allows (16 TiB at 4 KiB: 4096 bitmap containers per TiB of
/// 8 KiB) with room for headers. Anything larger is a protocol violation.
pub const PEER_BITMAP_BYTES_MAX: usize = 16 * 4096 * 8200 + (1 << 20);
/// Bytes per resync request: large enough to stream, small enough to interleave with
/// client writes (a client write to a region being resynced waits for at most this).
pub const RESYNC_CHUNK_BYTES: u64 = 1 << 20;
/// Resync requests in flight when the client is idle: enough that thousands of
/// scattered 4 KiB regions are pipelined, not a round trip each...
pub const RESYNC_IN_FLIGHT_IDLE: usize = 256;
/// ...and at most this many bytes (16 whole chunks): keeps the link busy without
/// holding more buffer memory than that.
pub const RESYNC_IN_FLIGHT_IDLE_BYTES: u64 = 16 * RESYNC_CHUNK_BYTES;
/// Resync requests in flight while client requests are in flight: the application
/// keeps most of the bandwidth and the resync still progresses.
pub const RESYNC_IN_FLIGHT_BUSY: usize = 2;
/// While the application is busy the resync is also held to this rate (the lower of it
/// and `resync_rate`): like DRBD's c-min-rate, a floor that guarantees progress while
/// leaving the disk, the link and the CPU to the application. 64 MiB/s costs about 6 %
/// of a CPU in copies and checksums on each node (1 MiB ~ 0.9 ms, both nodes together,
/// measured on tmpfs) and still copies a TiB in under five hours of continuous load;
/// idle periods run at full speed.
pub const RESYNC_BUSY_RATE_BYTES_PER_S: u64 = 64 << 20;
/// The application counts as busy while it has requests in flight and for this long
/// after the last one, so the resync does not burst into the gaps between requests.
pub const RESYNC_BUSY_HOLD_MS: u64 = 100;
/// The peer half of a sync point started while a Primary drops its link: no FlushAck
/// carries this seq (sequence numbers start at 1), only the link-down completes it.
const PEER_FLUSH_AT_LINK_DOWN: u64 = u64::MAX;
/// A sync point is started once this many resync bytes are acknowledged by the target
/// but not yet covered by a peer flush. Only a flushed region's bit is cleared, so the
/// durable progress of a resync trails the copy by at most this plus one in-flight
/// window: a source that crashes (or a link that drops) repeats at most that much,
/// instead of everything copied since the last periodic sync point.
pub const RESYNC_CLEAN_BATCH_BYTES: u64 = 8 * RESYNC_CHUNK_BYTES;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConnPhase {
    /// Bitmaps are being exchanged; the primary keeps journaling.
    Exchanging,
    /// Writes replicate (and a resync may run).
    Replicating,
    /// Both disks are new: waiting for `rebuild --full --from`.
    WaitingForOperator,
}

/// One connection to the peer, from handshake to loss.
#[derive(Debug)]
pub(super) struct Conn {
    pub(super) epoch: u64,
    pub(super) peer: NodeState,
    pub(super) phase: ConnPhase,
    pub(super) decision: Decision,
    next_seq: u64,
    /// The engine asked the shell to close this connection: send nothing more.
    dropping: bool,
    /// Primary: replicated writes not yet covered by a peer FlushAck (seq -> range).
    pub(super) tlog: BTreeMap<u64, ByteRange>,
    /// Primary: replicated writes not yet acknowledged (seq -> request, sent at).
    pub(super) awaiting: BTreeMap<u64, (ReqId, u64)>,
    /// Flushes sent, not yet acknowledged (seq -> sent at).
    flushes_sent: BTreeMap<u64, u64>,
    peer_bitmap: Vec<u8>,
    /// Secondary: sequence numbers received and not yet completed locally.
    applying: BTreeSet<u64>,
    /// Secondary: peer flushes waiting for every lower sequence to complete.
    flushes_waiting: VecDeque<u64>,
    /// Secondary: completed app-write applies not yet covered by a local flush.
    applied_unflushed: Vec<u64>,
    /// Secondary: app-write applies covered by each local flush in flight.
    flush_covers: FxHashMap<u64, Vec<u64>>,
    pub(super) resync: Option<ResyncSource>,
    /// Target: set while a resync towards us runs.
    target: Option<TargetState>,
    /// Set while this node runs an online verify.
    pub(super) verify: Option<VerifySource>,
    /// Verify requests of a verify ended early (`abort_verify`): their replies are
    /// ignored when they arrive.
    pub(super) verify_abandoned: BTreeSet<u64>,
    /// Operator full copy (`start_full_sync`): its new current generation being made
    /// durable, and whether the link is then dropped (it was requested while
    /// replicating) or the rules are followed on this connection (waiting for the
    /// operator).
    full_sync_start: Option<(SuperblockTicket, bool)>,
}

impl Conn {
    fn new(epoch: u64, peer: NodeState, decision: Decision) -> Conn {
        Conn {
            epoch,
            peer,
            phase: ConnPhase::Exchanging,
            decision,
            next_seq: 1,
            dropping: false,
            tlog: BTreeMap::new(),
            awaiting: BTreeMap::new(),
            flushes_sent: BTreeMap::new(),
            peer_bitmap: Vec::new(),
            applying: BTreeSet::new(),
            flushes_waiting: VecDeque::new(),
            applied_unflushed: Vec::new(),
            flush_covers: FxHashMap::default(),
            resync: None,
            target: None,
            verify: None,
            verify_abandoned: BTreeSet::new(),
            full_sync_start: None,
        }
    }

    pub(super) fn is_replicating(&self) -> bool {
        self.phase == ConnPhase::Replicating && !self.dropping
    }

    /// Something is waiting for a peer flush (transfer log or acked resync data).
    pub(super) fn wants_flush(&self) -> bool {
        self.is_replicating()
            && (!self.tlog.is_empty() || self.resync.as_ref().is_some_and(|r| !r.acked.is_empty()))
    }

    pub(super) fn has_target(&self) -> bool {
        self.target.is_some()
    }

    pub(super) fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }
}

/// Where the target side of a resync is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TargetStage {
    /// The rules say the peer copies to us; waiting for its sync generation (State).
    AwaitingStart,
    /// Durably adopting the sync generation as Inconsistent.
    Marking(SuperblockTicket),
    /// Applying resync data.
    Applying,
    /// Durably taking the source's generations (after ResyncDone).
    Finishing(SuperblockTicket),
}

/// Target side of a resync.
#[derive(Debug)]
struct TargetState {
    full: bool,
    stage: TargetStage,
    /// Regions resync data was applied to: at the finish, only these bits are cleared
    /// (an on-demand rebuild copies the source's dirty regions, not ours).
    received: RoaringBitmap,
    /// ResyncDone arrived while the sync generation was still being made durable: the
    /// finish runs once it is (`TargetStage::Marking`).
    done_pending: bool,
}

/// Where the source side of a resync is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceStage {
    /// The peer's dirty regions (or every region) are being made durable in our journal.
    MarkingDirty(Ticket),
    /// The sync generation is being made durable.
    Starting(SuperblockTicket),
    /// Walking the bitmap.
    Walking,
    /// ResyncDone sent: waiting for the target to record its finish (its State).
    DoneSent,
    /// Recording our finish.
    Finishing(SuperblockTicket),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResyncOpPhase {
    Locking,
    Reading,
}

#[derive(Debug)]
struct ResyncOp {
    range: ByteRange,
    phase: ResyncOpPhase,
}

/// Source side of a resync: walks the dirty bitmap in region order.
#[derive(Debug)]
pub(super) struct ResyncSource {
    full: bool,
    /// Next region the current pass looks at.
    cursor: u64,
    /// Ops locking or reading (key = lock id = buffer id).
    ops: BTreeMap<u64, ResyncOp>,
    /// Sent, waiting for ResyncAck (seq -> range, sent at).
    sent: BTreeMap<u64, (ByteRange, u64)>,
    /// Bytes of `ops` and `sent` (kept as a sum: the pump reads it at every event).
    in_flight_bytes: u64,
    /// Acknowledged, waiting for a peer flush before their bits are cleared.
    acked: Vec<ByteRange>,
    /// Bytes of `acked`.
    acked_bytes: u64,
    /// Cleared when the flush with this seq is acknowledged.
    flushing: BTreeMap<u64, Vec<ByteRange>>,
    pub(super) total_bytes: u64,
    pub(super) done_bytes: u64,
    pub(super) paused: bool,
    started_ms: u64,
    tokens_bytes: u64,
    tokens_ms: u64,
    /// The busy-rate bucket (`RESYNC_BUSY_RATE_BYTES_PER_S`), refilled only while busy.
    busy_tokens_bytes: u64,
    busy_tokens_ms: u64,
    /// When a client request was last seen in flight (`None`: not since the start).
    client_seen_ms: Option<u64>,
    stage: SourceStage,
}

/// A write received from the peer, from arrival to its ack.
#[derive(Debug)]
pub(super) struct Apply {
    epoch: u64,
    seq: u64,
    range: ByteRange,
    kind: ApplyKind,
    data: Option<PeerDataId>,
    /// Tracked by the metadata engine (app writes go through the activity log).
    tracked: bool,
    locked: bool,
    result: Result<(), Errno>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ApplyKind {
    Write { fua: bool },
    Zeroes { fua: bool },
    Resync,
}

fn meta_range(range: ByteRange) -> meta::ByteRange {
    meta::ByteRange::new(range.start(), range.length())
}

impl Engine {
    fn conn(&mut self) -> &mut Conn {
        self.link.as_mut().expect("a connection")
    }

    /// The connection, if it is replicating (the peer receives client writes).
    pub(super) fn link_replicating_peer(&self) -> Option<&Conn> {
        self.link.as_ref().filter(|c| c.is_replicating())
    }

    pub(super) fn send(&mut self, msg: PeerMsg, data: Option<DataRef>) {
        if self.link.as_ref().is_some_and(|c| !c.dropping) {
            self.actions.push_back(Action::Send { msg, data });
        } else if let Some(data @ DataRef::Resync(_)) = data {
            self.actions.push_back(Action::Release(data));
        }
    }

    pub(super) fn send_state(&mut self) {
        // A resync source says nothing between its decision and its sync generation
        // being durable: a State then would name a bitmap generation the target might
        // adopt as the sync generation, or a sync generation a crash could still undo.
        // The State sent when the start is durable carries everything that changed.
        let starting = self
            .link
            .as_ref()
            .and_then(|c| c.resync.as_ref())
            .is_some_and(|r| {
                matches!(
                    r.stage,
                    SourceStage::MarkingDirty(_) | SourceStage::Starting(_)
                )
            });
        if starting {
            return;
        }
        let state = self.node_state();
        self.send(PeerMsg::State(state), None);
    }

    /// A Primary whose replicating link is being dropped (`drop_link`), until the shell
    /// reports it gone. The peer receives no more writes, but the transfer log is marked
    /// dirty and the new current generation made only in `handle_link_down`: until then
    /// nothing is submitted or answered (as under the generation hold that follows), so
    /// no write the peer lacks is acknowledged without a dirty bit and a new generation.
    pub(super) fn parting(&self) -> bool {
        self.role() == Role::Primary
            && self
                .link
                .as_ref()
                .is_some_and(|c| c.dropping && c.phase == ConnPhase::Replicating)
    }

    /// Asks the shell to close the connection; nothing more is sent on it.
    pub(super) fn drop_link(&mut self, reason: String) {
        if let Some(conn) = self.link.as_mut()
            && !conn.dropping
        {
            conn.dropping = true;
            self.actions.push_back(Action::DropLink { reason });
        }
    }

    /// Sends a client write to the peer when replicating; returns its sequence number.
    pub(super) fn replicate(&mut self, op: ClientOp, data: Option<DataRef>) -> Option<u64> {
        if self.role() != Role::Primary || self.link_replicating_peer().is_none() {
            return None;
        }
        let conn = self.conn();
        let seq = conn.take_seq();
        let (msg, range) = match op {
            ClientOp::Write { range, fua } => (PeerMsg::Write { seq, range, fua }, range),
            ClientOp::WriteZeroes { range, fua, .. } | ClientOp::Trim { range, fua } => {
                (PeerMsg::WriteZeroes { seq, range, fua }, range)
            }
            _ => unreachable!("only modifications are replicated"),
        };
        conn.tlog.insert(seq, range);
        self.stats.replicated_writes += 1;
        self.stats.replicated_bytes += range.length();
        self.send(msg, data);
        Some(seq)
    }

    /// Sends the peer half of a sync point; returns its sequence number.
    pub(super) fn send_peer_flush(&mut self) -> Option<u64> {
        // Only the side that sends sequenced data (the primary, or a resync source)
        // has anything for the peer to flush.
        let sends_data =
            self.role() == Role::Primary || self.link.as_ref().is_some_and(|c| c.resync.is_some());
        if !sends_data {
            return None;
        }
        if self.parting() {
            // The peer's half can no longer complete, and our flush alone does not make
            // the writes it covers durable on both sides: the sync point (and any FLUSH
            // it answers) waits for the link-down. That only *queues* the transfer log's
            // dirty marks; what keeps a FLUSH answered before they are durable safe is
            // the activity log: set_mode(Broken) turns every tracked write into a
            // Broken-class write, which stays pinned (its extent hot on disk) until its
            // own dirty bits are durable, and recovery treats hot extents as dirty.
            return Some(PEER_FLUSH_AT_LINK_DOWN);
        }
        self.link_replicating_peer()?;
        let now = self.now_ms;
        let conn = self.conn();
        let seq = conn.take_seq();
        conn.flushes_sent.insert(seq, now);
        if let Some(resync) = conn.resync.as_mut()
            && !resync.acked.is_empty()
        {
            let acked = std::mem::take(&mut resync.acked);
            resync.acked_bytes = 0;
            resync.flushing.insert(seq, acked);
        }
        self.send(PeerMsg::Flush { seq }, None);
        Some(seq)
    }

    // ----------------------------------------------------------------------------
    // Connection life cycle.
    // ----------------------------------------------------------------------------

    /// A handshake completed: `peer` is the peer's state as it sent it, and ours was sent
    /// as it is now (tests and the simulation take both states at link-up).
    pub fn handle_link_up(&mut self, epoch: u64, peer: NodeState) {
        let sent = self.node_state();
        self.handle_link_up_from(epoch, sent, peer);
    }

    /// A handshake completed in which we sent `sent` (our state when the handshake
    /// started) and the peer sent `peer`. The peer decides from `sent`: if our
    /// generations, role or flags changed since (the loss of a link this one replaced
    /// made a new current generation; an operator command ran meanwhile), the two nodes
    /// would decide differently — one copying to a peer that thinks it is in sync. Then
    /// the link is dropped at once, before the bitmaps, and the next connect decides on
    /// fresh state.
    pub fn handle_link_up_from(&mut self, epoch: u64, sent: NodeState, peer: NodeState) {
        assert!(
            self.link.is_none(),
            "link up while a connection is established"
        );
        self.last_epoch = self.last_epoch.max(epoch);
        self.peer_last = Some((peer, self.now_ms));
        self.connect_problem = None;
        let decision = generations::decide(&self.local_view(), &self.peer_view(&peer));
        self.link = Some(Conn::new(epoch, peer, decision));
        if let Some(reason) = &self.failed {
            // A failed disk neither replicates nor takes a resync.
            self.connect_problem = Some(format!(
                "the disk has failed ({reason}): not replicating until the agent restarts"
            ));
            self.drop_link("the local disk has failed".into());
            self.pump();
            return;
        }
        if !same_decision_inputs(&sent, &self.node_state()) {
            self.drop_link(
                "this node's state changed during the handshake: reconnecting to decide on the current state"
                    .into(),
            );
            self.pump();
            return;
        }
        if self.role() == Role::Primary && peer.role == Role::Primary {
            self.connect_problem =
                Some("both nodes are active (Primary): refusing to connect".into());
            self.drop_link("both nodes are Primary".into());
            self.pump();
            return;
        }
        // Both sides send their bitmap whatever the decision: the sync source needs the
        // union of both journals.
        let mut bytes = Vec::new();
        self.meta
            .dirty_bitmap()
            .serialize_into(&mut bytes)
            .expect("serializing to a Vec cannot fail");
        let mut chunks = bytes.chunks(BITMAP_CHUNK_BYTES).peekable();
        let mut offset = 0u64;
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            self.send(
                PeerMsg::BitmapChunk {
                    offset,
                    bytes: chunk.to_vec(),
                    last,
                },
                None,
            );
            offset += chunk.len() as u64;
        }
        self.pump();
    }

    /// The connection is gone (closed, failed, timed out, or dropped on request).
    /// `random` seeds the new generation a primary makes now.
    pub fn handle_link_down(&mut self, random: u64) {
        let Some(conn) = self.link.take() else {
            return;
        };
        self.abort_activation("the connection was lost");
        self.stats.link_losses += 1;
        let was_replicating = conn.phase == ConnPhase::Replicating;
        if self.role() == Role::Primary {
            // Every write the peer has not durably acknowledged is marked dirty, and no
            // write is answered before that is durable (DESIGN §5).
            let unacked: Vec<meta::ByteRange> =
                conn.tlog.values().map(|r| meta_range(*r)).collect();
            self.meta.set_mode(Mode::Broken, &unacked);
            // The metadata engine re-yields every write it still tracks once its bits
            // (and the transfer log's) are durable; an earlier "ackable" of those no
            // longer counts. A write it no longer tracks (its data write is done and its
            // own bits were durable already: admitted in a break, sent once the link
            // came up) is not yielded again, so its "ackable" stands; resetting it left
            // the request unanswered forever (found by the two-node simulation).
            for (req, request) in self.requests.iter_mut() {
                if request.op.modification().is_some() && self.meta.is_tracked(WriteId(req.0)) {
                    request.ackable = false;
                }
            }
            if was_replicating {
                // The writes in flight are ones the peer may not hold: a new current
                // generation, durable before anything more is submitted or answered.
                let ticket = self
                    .meta
                    .update_superblock(|s| s.generations.new_current(random));
                self.generation_hold = Some(ticket);
            }
        } else if self.disk_state == DiskState::UpToDate {
            // Cut off from the primary, we cannot know we are up to date any more.
            self.disk_state = DiskState::Consistent;
        } else if self.disk_state == DiskState::Inconsistent
            && self.meta.superblock().state.disk_state != DiskState::Inconsistent
        {
            // A resync target that never adopted the sync generation (nothing was
            // applied), or whose finish is written: the disk is whole again. Staying
            // Inconsistent in memory kept it so for good, since an in-sync connect never
            // lifts that (found by the two-node simulation).
            self.disk_state = DiskState::Consistent;
        }
        self.link_lost_cleanup(conn);
        self.pump();
    }

    fn link_lost_cleanup(&mut self, mut conn: Conn) {
        let verify = conn.verify.take();
        self.verify_link_lost(verify);
        for (_, (req, _)) in conn.awaiting {
            self.peer_write_settled(req, None);
        }
        // Applied writes waiting for a peer FLUSH: the engine's own sync points make them
        // durable now, so their activity-log extents can still go cold.
        let unflushed = conn
            .applied_unflushed
            .into_iter()
            .chain(conn.flush_covers.into_values().flatten());
        self.unsynced.extend(unflushed.map(WriteId));
        // Applies held for a resync-target marking were never applied: drop them (the
        // source keeps those regions dirty; the primary's transfer log marks its writes).
        for id in std::mem::take(&mut self.held_applies) {
            let apply = self.applies.remove(&id).expect("a held apply is live");
            if let Some(data) = apply.data {
                self.actions.push_back(Action::Release(DataRef::Peer(data)));
            }
            if apply.locked {
                self.release_lock(id);
            }
        }
        // Resync bits waiting for our half of the sync point stay set: the switch to
        // Broken has just marked the writes in flight dirty, some in those very regions,
        // and a late clear would erase their bits.
        if let Some(sync) = self.sync.as_mut() {
            sync.resync_clean.clear();
        }
        self.sync_peer_done(None);
        if let Some(resync) = conn.resync {
            // Buffers of reads already done and not yet sent: none are kept between a
            // read completing and its send, so only ops still reading hold one; their
            // completion releases it (`resync_read_done` finds no op).
            for (key, op) in resync.ops {
                if op.phase == ResyncOpPhase::Reading {
                    self.orphaned_resync_reads.insert(key);
                }
                if op.phase == ResyncOpPhase::Locking {
                    self.orphaned_resync_locks.insert(key);
                }
            }
        }
        self.finish_deactivate_if_synced();
    }

    /// A message from the peer on the current connection. Data messages come with the
    /// id under which the shell holds the payload.
    pub fn handle_peer(&mut self, msg: PeerMsg, data: Option<PeerDataId>) {
        if self.link.as_ref().is_none_or(|c| c.dropping) {
            if let Some(id) = data {
                self.actions.push_back(Action::Release(DataRef::Peer(id)));
            }
            return;
        }
        // Writes are applied only on a Secondary (the peer is the Primary), resync data
        // only on a Secondary that is this connection's sync target, i.e. durably
        // Inconsistent under the sync generation before the first one is applied.
        let refusal = match msg {
            PeerMsg::Write { .. } | PeerMsg::WriteZeroes { .. } if self.role() == Role::Primary => {
                Some("a replicated write sent to the Primary")
            }
            PeerMsg::ResyncData { .. }
                if self.role() == Role::Primary || !self.conn().has_target() =>
            {
                Some("resync data, but this node is not a resync target")
            }
            _ => None,
        };
        if let Some(refusal) = refusal {
            if let Some(id) = data {
                self.actions.push_back(Action::Release(DataRef::Peer(id)));
            }
            self.drop_link(format!("protocol violation: {refusal}"));
            self.pump();
            return;
        }
        let data_bytes = self.meta.layout().data_bytes;
        let in_bounds = |range: ByteRange| range.end() <= data_bytes;
        match msg {
            PeerMsg::State(state) => self.peer_state(state),
            PeerMsg::Write { seq, range, fua } if in_bounds(range) && data.is_some() => {
                self.receive(seq, range, ApplyKind::Write { fua }, data)
            }
            PeerMsg::WriteZeroes { seq, range, fua } if in_bounds(range) => {
                self.receive(seq, range, ApplyKind::Zeroes { fua }, None)
            }
            PeerMsg::ResyncData { seq, range } if in_bounds(range) && data.is_some() => {
                self.receive(seq, range, ApplyKind::Resync, data)
            }
            PeerMsg::Flush { seq } => {
                self.conn().flushes_waiting.push_back(seq);
                self.run_peer_flushes();
            }
            PeerMsg::Ack { seq } => match self.conn().awaiting.remove(&seq) {
                Some((req, _)) => self.peer_write_settled(req, None),
                None => self.drop_link(format!("protocol violation: Ack of unknown write {seq}")),
            },
            PeerMsg::Nack { seq, errno } => {
                // The peer's disk failed this write: treat the peer disk as failed. The
                // link loss marks every unacknowledged write (this one too) dirty.
                self.drop_link(format!(
                    "the peer's disk failed write {seq} (errno {errno})"
                ));
            }
            PeerMsg::FlushAck { seq } => self.peer_flush_acked(seq),
            PeerMsg::ResyncAck { seq } => self.resync_acked(seq),
            PeerMsg::ResyncDone { .. } => self.finish_target(),
            PeerMsg::VerifyRequest { seq, range } if in_bounds(range) => {
                self.serve_verify(seq, range)
            }
            PeerMsg::VerifyReply { seq, digests } => self.verify_reply(seq, digests),
            PeerMsg::BitmapChunk {
                offset,
                bytes,
                last,
            } => self.bitmap_chunk(offset, bytes, last),
            other => {
                if let Some(id) = data {
                    self.actions.push_back(Action::Release(DataRef::Peer(id)));
                }
                self.drop_link(format!(
                    "protocol violation: {other:?} is out of bounds or malformed"
                ));
            }
        }
        self.pump();
    }

    fn bitmap_chunk(&mut self, offset: u64, bytes: Vec<u8>, last: bool) {
        let conn = self.conn();
        if conn.phase != ConnPhase::Exchanging
            || offset != conn.peer_bitmap.len() as u64
            || conn.peer_bitmap.len() + bytes.len() > PEER_BITMAP_BYTES_MAX
        {
            self.drop_link("protocol violation: unexpected bitmap chunk".into());
            return;
        }
        conn.peer_bitmap.extend_from_slice(&bytes);
        if last {
            self.exchange_done();
        }
    }

    /// This node as the generation rules see it.
    fn local_view(&self) -> NodeView {
        let sb = self.meta.superblock();
        NodeView {
            node_id: sb.identity.node_id,
            generations: sb.state.generations,
            flags: sb.state.flags,
            role: sb.state.role,
            dirty: !self.meta.dirty_bitmap().is_empty(),
        }
    }

    /// The peer as the generation rules see it, from its last State.
    fn peer_view(&self, peer: &NodeState) -> NodeView {
        NodeView {
            node_id: self.meta.superblock().identity.peer_node_id,
            generations: peer.generations,
            flags: peer.flags,
            role: peer.role,
            dirty: peer.dirty_bytes > 0,
        }
    }

    /// Both bitmaps are known: act on the generation rules.
    fn exchange_done(&mut self) {
        // The decision was made at link-up, as the peer's was from the State we sent.
        // If our state changed while the bitmaps were exchanged (a role change) so that
        // the rules now say otherwise, the peer's decision is stale too: decide again.
        let peer = self.conn().peer;
        let now = generations::decide(&self.local_view(), &self.peer_view(&peer));
        if now != self.conn().decision {
            self.drop_link(format!(
                "this node's state changed while connecting (now: {now}): reconnecting to decide on the current state"
            ));
            return;
        }
        let conn = self.conn();
        let bytes = std::mem::take(&mut conn.peer_bitmap);
        let decision = conn.decision;
        let region_count = self.meta.layout().region_count();
        let peer_bits = match RoaringBitmap::deserialize_from(&bytes[..]) {
            Ok(bits) if bits.max().is_none_or(|m| u64::from(m) < region_count) => bits,
            _ => {
                self.drop_link("protocol violation: the peer's bitmap does not decode".into());
                return;
            }
        };
        self.act_on(decision, peer_bits);
    }

    /// Carries out a decision of the generation rules.
    fn act_on(&mut self, decision: Decision, peer_bits: RoaringBitmap) {
        self.conn().decision = decision;
        match decision.resync() {
            Some(Resync {
                from: Side::Local,
                full,
            }) => return self.start_source(full, peer_bits),
            Some(Resync {
                from: Side::Peer,
                full,
            }) => return self.start_target(full),
            None => {}
        }
        match decision.outcome {
            Outcome::InSync { .. } => {
                // Same data, nothing to copy: stale marks (forced, full-sync ...) go.
                let role = self.role();
                let flags = self.meta.superblock().state.flags;
                let mut settled = flags;
                generations::settle_flags(&mut settled, role);
                if settled != flags {
                    self.meta.update_superblock(|s| s.flags = settled);
                }
                self.start_replicating();
            }
            Outcome::SplitBrain { resolve_full } => {
                let local = self.local_view();
                let peer_state = self.conn().peer;
                let peer = self.peer_view(&peer_state);
                let ours = local.flags.contains(Flags::DISCARD_LOCAL);
                let theirs = peer.flags.contains(Flags::DISCARD_LOCAL);
                let zero_changes = self.split_brain_policy == SplitBrainPolicy::DiscardZeroChanges;
                let (we_discard, they_discard) = match (ours, theirs) {
                    (true, false) => (true, false),
                    (false, true) => (false, true),
                    (false, false) if zero_changes && !local.dirty && peer.dirty => (true, false),
                    (false, false) if zero_changes && local.dirty && !peer.dirty => (false, true),
                    _ => (false, false),
                };
                if we_discard && self.role() != Role::Primary {
                    return self.start_target(resolve_full);
                }
                if they_discard && peer.role != Role::Primary {
                    return self.start_source(resolve_full, peer_bits);
                }
                let how = if ours && theirs {
                    "both sides asked to discard their changes; clear it on one side"
                } else {
                    "resolve it with `mirrorctl resolve MIRROR --discard-local` on the side whose changes are to be dropped"
                };
                self.connect_problem = Some(format!("split brain: {decision}; {how}"));
                self.drop_link(format!("split brain: {decision}"));
            }
            Outcome::BothJustCreated => {
                self.conn().phase = ConnPhase::WaitingForOperator;
                self.connect_problem = Some(format!(
                    "{decision}: choose the source with `mirrorctl rebuild --full --from NODE`"
                ));
            }
            _ => {
                self.connect_problem = Some(format!("refusing to replicate: {decision}"));
                self.drop_link(decision.to_string());
            }
        }
    }

    fn start_replicating(&mut self) {
        let conn = self.conn();
        conn.phase = ConnPhase::Replicating;
        self.connect_problem = None;
        self.meta.set_mode(Mode::Connected, &[]);
        if self.meta.superblock().state.disk_state == DiskState::UpToDate
            && self.disk_state != DiskState::Inconsistent
        {
            self.disk_state = DiskState::UpToDate;
        }
        self.send_state();
    }

    /// We copy to the peer. Its dirty regions (or every region, for a full copy) join
    /// ours in our journal — durably, before the resync starts, so the set survives a
    /// crash of either side — then the sync generation is made durable and announced,
    /// then the bitmap is walked. Client writes replicate from this moment.
    fn start_source(&mut self, full: bool, peer_bits: RoaringBitmap) {
        let layout = *self.meta.layout();
        let granularity = u64::from(layout.granularity_bytes);
        let ranges: Vec<meta::ByteRange> = if full {
            vec![meta::ByteRange::new(0, layout.data_bytes)]
        } else {
            runs(&peer_bits)
                .map(|(start, end)| {
                    let offset = start * granularity;
                    meta::ByteRange::new(
                        offset,
                        (end * granularity).min(layout.data_bytes) - offset,
                    )
                })
                .collect()
        };
        let marked = self.meta.mark_dirty(&ranges);
        self.conn().phase = ConnPhase::Replicating;
        self.connect_problem = None;
        self.meta.set_mode(Mode::Connected, &[]);
        if self.meta.superblock().state.disk_state == DiskState::UpToDate {
            self.disk_state = DiskState::UpToDate;
        }
        let now = self.now_ms;
        self.conn().resync = Some(ResyncSource {
            full,
            cursor: 0,
            ops: BTreeMap::new(),
            sent: BTreeMap::new(),
            in_flight_bytes: 0,
            acked: Vec::new(),
            acked_bytes: 0,
            flushing: BTreeMap::new(),
            total_bytes: 0,
            done_bytes: 0,
            paused: false,
            started_ms: now,
            tokens_bytes: RESYNC_CHUNK_BYTES,
            tokens_ms: now,
            busy_tokens_bytes: RESYNC_CHUNK_BYTES,
            busy_tokens_ms: now,
            client_seen_ms: None,
            stage: SourceStage::MarkingDirty(marked),
        });
    }

    /// The peer copies to us: wait for its sync generation, then become durably
    /// Inconsistent before applying anything (`TargetStage`). Never on a Primary: its
    /// application would see data change under it, older data over its newer writes
    /// (the rules say TargetPrimary; this also covers a resync the peer started, e.g. a
    /// rebuild, that crossed our activation).
    fn start_target(&mut self, full: bool) {
        if self.role() == Role::Primary {
            self.connect_problem =
                Some("the peer would copy to this node, but it is active (Primary)".into());
            self.drop_link("refusing to be a resync target while Primary".into());
            return;
        }
        let conn = self.conn();
        conn.phase = ConnPhase::Replicating;
        conn.target = Some(TargetState {
            full,
            stage: TargetStage::AwaitingStart,
            received: RoaringBitmap::new(),
            done_pending: false,
        });
        self.connect_problem = None;
        self.meta.set_mode(Mode::Connected, &[]);
        self.disk_state = DiskState::Inconsistent;
        self.send_state();
        // The sync generation comes in a State the source sends after this decision,
        // once it is durable there. The State we decided from (the handshake's) names
        // the source's bitmap generation from before the start, not a sync generation:
        // adopting it made a target whose current the source then undid or left behind
        // (unrelated after a crash, or a refused finish; found by the two-node
        // simulation). Callers deciding on a fresh State adopt from that one.
    }

    /// Target: the source's State names a new sync generation (its bitmap generation,
    /// not yet ours): adopt it, durably, as an Inconsistent disk.
    fn maybe_adopt_sync_generation(&mut self, source: &NodeState) {
        let Some(target) = self.link.as_ref().and_then(|c| c.target.as_ref()) else {
            return;
        };
        let sync = source.generations.bitmap;
        let ours = self.generations().current;
        if target.stage != TargetStage::AwaitingStart
            || sync == meta::generation::GENERATION_NONE
            || sync == ours
            || !generations::names_sync_generation(&source.generations)
        {
            return;
        }
        let full = target.full;
        let mut result = Ok(());
        let ticket = self.meta.update_superblock(|s| {
            result =
                generations::start_resync_as_target(&mut s.generations, &mut s.flags, sync, full);
            s.disk_state = DiskState::Inconsistent;
            s.flags.remove(Flags::DISCARD_LOCAL);
        });
        match result {
            Ok(()) => {
                self.conn().target.as_mut().expect("checked").stage = TargetStage::Marking(ticket)
            }
            Err(error) => {
                self.connect_problem = Some(format!("cannot start the resync: {error}"));
                self.drop_link(format!("bad sync generation: {error}"));
            }
        }
    }

    /// The peer's state changed.
    fn peer_state(&mut self, state: NodeState) {
        self.peer_last = Some((state, self.now_ms));
        let conn = self.conn();
        let before = conn.peer;
        conn.peer = state;
        let phase = conn.phase;
        self.activation_handshake(&before, &state);
        if state.role == Role::Primary && self.role() == Role::Primary {
            self.connect_problem = Some("both nodes are active (Primary)".into());
            self.drop_link("both nodes are Primary".into());
            return;
        }
        if state.role == Role::Primary && before.role != Role::Primary {
            // A verify run from here holds each range until the peer's digests arrive;
            // the new Primary's writes to it would wait for our Ack, our apply of them
            // for that range, the peer's digests for its writes: a deadlock. Its State
            // precedes its first write, so ending the verify now breaks the cycle.
            self.abort_verify();
        }
        match phase {
            ConnPhase::WaitingForOperator if state.generations != before.generations => {
                // The operator chose a source on the other node: follow the rules again.
                let decision = generations::decide(&self.local_view(), &self.peer_view(&state));
                self.act_on(decision, RoaringBitmap::new());
                // That State may be the source's announcement of its sync generation.
                self.maybe_adopt_sync_generation(&state);
            }
            ConnPhase::Replicating => {
                let ours = self.generations().current;
                let sync = state.generations.bitmap;
                let conn = self.conn();
                let idle = conn.target.is_none() && conn.resync.is_none();
                if idle && state.generations.current != before.generations.current {
                    // Only a resync changes a current generation while connected (the
                    // target takes the sync generation, then the source's): outside one,
                    // the peer's data may no longer be ours. Decide again.
                    self.drop_link(
                        "the peer's current generation changed outside a resync: reconnecting to decide again"
                            .into(),
                    );
                    return;
                }
                // A source that was in sync with us started a resync (after a verify):
                // its State names a new sync generation over the current we share. New:
                // not the one its previous State named already, which is the resync we
                // just finished, named again by a State the source sent before it
                // recorded its own finish (taking that for a new start left us a target
                // forever; found by the two-node simulation).
                if idle
                    && state.generations.current == ours
                    && sync != meta::generation::GENERATION_NONE
                    && sync != ours
                    && sync != before.generations.bitmap
                {
                    self.start_target(false);
                }
                self.maybe_adopt_sync_generation(&state);
                self.maybe_finish_source(&state);
            }
            _ => {}
        }
    }

    /// Connected activation (`RoleChange::Confirming`): the peer's first State after our
    /// intent decides: it is Secondary and not becoming Primary, so the role is written;
    /// otherwise the activation is refused. A peer that announces the intent gets our
    /// State in answer (which refuses it if we are, or are becoming, Primary).
    fn activation_handshake(&mut self, before: &NodeState, state: &NodeState) {
        if let Some(RoleChange::Confirming { .. }) = self.role_change {
            if state.role == Role::Primary || state.intent == Role::Primary {
                self.abort_activation("the peer is active or being activated");
            } else {
                self.role_change = None;
                self.commit_activation(false, 0);
            }
            return;
        }
        if state.intent == Role::Primary && before.intent != Role::Primary {
            self.send_state();
        }
    }

    /// Target: the source says everything is copied and flushed (ResyncDone): take its
    /// generations — first, before the source records its own finish, so an
    /// interrupted finish leaves the *source* behind by nothing (a differential resync
    /// of an empty set), never the target behind by history (a full copy).
    fn finish_target(&mut self) {
        let Some(target) = self.link.as_ref().and_then(|c| c.target.as_ref()) else {
            self.drop_link("protocol violation: ResyncDone without a resync".into());
            return;
        };
        if let TargetStage::Marking(_) = target.stage {
            // Nothing to copy (an empty union of journals): the source sends ResyncDone
            // right after the State naming its sync generation, and our adoption of it
            // may not be durable yet. Finish once it is (found by the two-node
            // simulation: this was dropped as a protocol violation, forever).
            self.conn().target.as_mut().expect("checked").done_pending = true;
            return;
        }
        if target.stage != TargetStage::Applying {
            self.drop_link("protocol violation: ResyncDone before the resync started".into());
            return;
        }
        let source = self.conn().peer.generations;
        let role = self.role();
        // What was copied is in sync now. Our own bits outside it stay: at a connect
        // the source copies the union of both journals (so nothing stays), but an
        // on-demand rebuild copies only its own dirty regions.
        let layout = *self.meta.layout();
        let granularity = u64::from(layout.granularity_bytes);
        let received = std::mem::take(&mut self.conn().target.as_mut().expect("checked").received);
        let copied: Vec<meta::ByteRange> = runs(&received)
            .map(|(start, end)| {
                let offset = start * granularity;
                meta::ByteRange::new(offset, (end * granularity).min(layout.data_bytes) - offset)
            })
            .collect();
        self.meta.mark_clean(&copied);
        let mut result = Ok(());
        let ticket = self.meta.update_superblock(|s| {
            result = generations::finish_resync_as_target(
                &mut s.generations,
                &mut s.flags,
                role,
                &source,
            );
            if result.is_ok() {
                s.disk_state = DiskState::UpToDate;
            }
        });
        match result {
            Ok(()) => {
                self.conn().target.as_mut().expect("checked").stage = TargetStage::Finishing(ticket)
            }
            Err(error) => {
                self.connect_problem = Some(format!("cannot finish the resync: {error}"));
                self.drop_link(format!("resync finish refused: {error}"));
            }
        }
    }

    /// Source: the target recorded its finish (its State has our current generation and
    /// no resync mark): record ours.
    fn maybe_finish_source(&mut self, target: &NodeState) {
        let ours = self.generations();
        let Some(resync) = self.link.as_mut().and_then(|c| c.resync.as_mut()) else {
            return;
        };
        // The target's finish names our sync generation as its newest history. A State
        // with our current and no resync mark is not enough: when the copy started from
        // a current we already shared (rules 34 to 40), the target's State from before
        // it adopted the sync generation looks just like that, and taking it for the
        // finish recorded ours while the target never finished (found by the two-node
        // simulation).
        if resync.stage != SourceStage::DoneSent
            || target.generations.current != ours.current
            || target.generations.history[0] != ours.bitmap
            || target.flags.contains(Flags::RESYNC_IN_PROGRESS)
        {
            return;
        }
        let role = self.role();
        let ticket = self.meta.update_superblock(|s| {
            generations::finish_resync_as_source(&mut s.generations, &mut s.flags, role)
        });
        self.conn().resync.as_mut().expect("checked").stage = SourceStage::Finishing(ticket);
    }

    /// Steps of the resync that wait for durable metadata.
    pub(super) fn peer_superblock_waits_done(&mut self) -> bool {
        let mut progress = false;
        if let Some((ticket, reconnect)) = self.link.as_ref().and_then(|c| c.full_sync_start)
            && self.meta.superblock_durable(ticket)
        {
            self.conn().full_sync_start = None;
            if reconnect {
                self.drop_link(
                    "full copy from this node requested: reconnecting so that both nodes decide on its new generation"
                        .into(),
                );
            } else if self.conn().phase == ConnPhase::WaitingForOperator {
                let peer = self.conn().peer;
                let decision = generations::decide(&self.local_view(), &self.peer_view(&peer));
                self.act_on(decision, RoaringBitmap::new());
                self.send_state();
            }
            progress = true;
        }
        if let Some(stage) = self
            .link
            .as_ref()
            .and_then(|c| c.target.as_ref())
            .map(|t| t.stage)
        {
            match stage {
                TargetStage::Marking(ticket) if self.meta.superblock_durable(ticket) => {
                    let target = self.conn().target.as_mut().expect("live");
                    target.stage = TargetStage::Applying;
                    let done_pending = std::mem::take(&mut target.done_pending);
                    for id in std::mem::take(&mut self.held_applies) {
                        self.apply_locked(id);
                    }
                    self.send_state();
                    if done_pending {
                        self.finish_target();
                    }
                    progress = true;
                }
                TargetStage::Finishing(ticket) if self.meta.superblock_durable(ticket) => {
                    self.conn().target = None;
                    self.disk_state = DiskState::UpToDate;
                    self.send_state();
                    progress = true;
                }
                _ => {}
            }
        }
        if let Some(stage) = self
            .link
            .as_ref()
            .and_then(|c| c.resync.as_ref())
            .map(|r| r.stage)
        {
            match stage {
                SourceStage::MarkingDirty(ticket) if self.meta.journal_durable(ticket) => {
                    let peer = self.conn().peer.generations;
                    let full = self.conn().resync.as_ref().expect("live").full;
                    let ticket = self.meta.update_superblock(|s| {
                        generations::start_resync_as_source(
                            &mut s.generations,
                            &mut s.flags,
                            &peer,
                            full,
                        );
                    });
                    let layout = *self.meta.layout();
                    let total = meta::engine::dirty_bytes(self.meta.dirty_bitmap(), &layout);
                    let resync = self.conn().resync.as_mut().expect("live");
                    resync.stage = SourceStage::Starting(ticket);
                    resync.total_bytes = total;
                    progress = true;
                }
                SourceStage::Starting(ticket) if self.meta.superblock_durable(ticket) => {
                    // The State carrying the sync generation precedes every ResyncData.
                    self.conn().resync.as_mut().expect("live").stage = SourceStage::Walking;
                    self.send_state();
                    progress = true;
                }
                SourceStage::Finishing(ticket) if self.meta.superblock_durable(ticket) => {
                    self.conn().resync = None;
                    self.send_state();
                    progress = true;
                }
                _ => {}
            }
        }
        progress
    }

    // ----------------------------------------------------------------------------
    // Primary: acks and flushes from the peer, timeouts.
    // ----------------------------------------------------------------------------

    fn peer_flush_acked(&mut self, seq: u64) {
        let conn = self.conn();
        if conn.flushes_sent.remove(&seq).is_none() {
            self.drop_link(format!(
                "protocol violation: FlushAck of unknown flush {seq}"
            ));
            return;
        }
        // Everything sent before the flush is durable on the peer.
        conn.tlog.retain(|s, _| *s > seq);
        let mut clean: Vec<meta::ByteRange> = Vec::new();
        if let Some(resync) = conn.resync.as_mut() {
            let done: Vec<u64> = resync.flushing.range(..=seq).map(|(s, _)| *s).collect();
            for s in done {
                for range in resync.flushing.remove(&s).expect("listed") {
                    clean.push(meta_range(range));
                }
            }
        }
        // Cleared when the whole sync point completes (`SyncPoint::resync_clean`): our
        // local flush must have made our copy of those regions durable too. Every peer
        // flush belongs to the sync point in flight; if not, the bits stay dirty and the
        // next pass copies those regions again.
        if let Some(sync) = self.sync.as_mut().filter(|s| s.peer_seq == Some(seq)) {
            sync.resync_clean.extend(clean);
        }
        self.sync_peer_done(Some(seq));
    }

    pub(super) fn check_peer_timeouts(&mut self) {
        let Some(conn) = self.link.as_ref() else {
            return;
        };
        let deadline = self.now_ms.saturating_sub(self.config.peer_timeout_ms);
        let oldest_write = conn.awaiting.values().map(|(_, at)| *at).min();
        let oldest_flush = conn.flushes_sent.values().copied().min();
        let oldest_resync = conn
            .resync
            .as_ref()
            // Sequence numbers grow with time: the lowest was sent first.
            .and_then(|r| r.sent.first_key_value().map(|(_, (_, at))| *at));
        let confirming = match self.role_change {
            Some(RoleChange::Confirming { since_ms }) => Some(since_ms),
            _ => None,
        };
        let stalled = [oldest_write, oldest_flush, oldest_resync, confirming]
            .into_iter()
            .flatten()
            .any(|at| at < deadline);
        if stalled && !conn.dropping {
            let timeout = self.config.peer_timeout_ms;
            self.drop_link(format!(
                "the peer did not answer within {timeout} ms: treating it as failed"
            ));
        }
    }

    // ----------------------------------------------------------------------------
    // Secondary: applying the peer's writes.
    // ----------------------------------------------------------------------------

    fn receive(&mut self, seq: u64, range: ByteRange, kind: ApplyKind, data: Option<PeerDataId>) {
        let epoch = self.conn().epoch;
        if self.failed.is_some() {
            if let Some(id) = data {
                self.actions.push_back(Action::Release(DataRef::Peer(id)));
            }
            self.send(PeerMsg::Nack { seq, errno: 5 }, None);
            return;
        }
        if kind == ApplyKind::Resync {
            self.stats.resync_bytes_received += range.length();
        }
        self.conn().applying.insert(seq);
        let id = self.next_internal();
        let apply = Apply {
            epoch,
            seq,
            range,
            kind,
            data,
            tracked: false,
            locked: false,
            result: Ok(()),
        };
        self.applies.insert(id, apply);
        // Locks are taken in arrival (= sequence) order, so overlapping writes apply in
        // the order the primary sent them; non-overlapping ones in any order.
        let locked = range.align_out(self.config.lock_alignment_bytes);
        if self.locks.acquire(id, locked) == Acquire::Granted {
            self.apply_locked(id);
        }
    }

    /// A lock taken by an internal id (an apply or a resync read) was granted.
    pub(super) fn internal_lock_granted(&mut self, id: u64) {
        if self.applies.contains_key(&id) {
            self.apply_locked(id);
        } else if self.orphaned_resync_locks.remove(&id) {
            self.release_lock(id);
        } else if self.verify_serving.contains_key(&id) {
            self.serve_verify_locked(id);
        } else if self.is_verify_op(id) {
            self.verify_locked(id);
        } else {
            self.resync_locked(id);
        }
    }

    /// The apply holds its range: app writes go through the activity log first.
    pub(super) fn apply_locked(&mut self, id: u64) {
        let hold = self
            .link
            .as_ref()
            .and_then(|c| c.target.as_ref())
            .is_some_and(|t| {
                matches!(
                    t.stage,
                    TargetStage::AwaitingStart | TargetStage::Marking(_)
                )
            });
        let apply = self.applies.get_mut(&id).expect("a live apply");
        apply.locked = true;
        if hold {
            // Resync target not yet durably Inconsistent under the sync generation:
            // hold everything (a crash must not leave mixed data looking consistent).
            self.held_applies.push_back(id);
            return;
        }
        let range = apply.range;
        match apply.kind {
            ApplyKind::Resync => self.apply_admitted(id),
            ApplyKind::Write { .. } | ApplyKind::Zeroes { .. } => {
                apply.tracked = true;
                match self.meta.handle_write_start(WriteId(id), meta_range(range)) {
                    Gate::Submit => self.apply_admitted(id),
                    Gate::Wait => {}
                    Gate::Failed => {
                        let apply = self.applies.get_mut(&id).expect("live");
                        apply.tracked = false;
                        apply.result = Err(Errno::Io);
                        self.apply_finished(id);
                    }
                }
            }
        }
    }

    /// The metadata engine admitted the apply (or it needs no admission): write it.
    pub(super) fn apply_admitted(&mut self, id: u64) {
        let apply = self.applies.get_mut(&id).expect("a live apply");
        let range = apply.range;
        let (op, data) = match apply.kind {
            ApplyKind::Write { fua } => (
                ClientOp::Write { range, fua },
                apply.data.take().map(DataRef::Peer),
            ),
            ApplyKind::Resync => (
                ClientOp::Write { range, fua: false },
                apply.data.take().map(DataRef::Peer),
            ),
            ApplyKind::Zeroes { fua } => (
                ClientOp::WriteZeroes {
                    range,
                    fua,
                    no_hole: false,
                    fast_zero: false,
                },
                None,
            ),
        };
        self.issue(DiskPurpose::Apply(id), data, op);
    }

    pub(super) fn apply_disk_done(&mut self, id: u64, result: Result<(), Errno>) {
        let apply = self.applies.get_mut(&id).expect("a live apply");
        apply.result = result;
        let range = apply.range;
        if apply.tracked {
            self.meta.handle_write_done(WriteId(id), false);
        }
        self.apply_finished(id);
        if let Err(errno) = result {
            // The peer holds this write and we do not. The Nack makes it drop the link
            // and mark the range dirty; here too the range is marked, and the disk
            // stops as a primary's does on a local write error: it takes no connection
            // (no resync onto it) and no activation until the agent restarts.
            self.meta.mark_dirty(&[meta_range(range)]);
            self.fail_with(format!(
                "write from the peer failed ({errno:?}): the disk is failed"
            ));
        }
    }

    /// Answers the peer, releases the range, and lets waiting flushes proceed.
    fn apply_finished(&mut self, id: u64) {
        let apply = self.applies.remove(&id).expect("a live apply");
        if let Some(data) = apply.data {
            self.actions.push_back(Action::Release(DataRef::Peer(data)));
        }
        if apply.locked {
            self.release_lock(id);
        }
        self.stats.applied_writes += 1;
        let same_link = self.link.as_ref().is_some_and(|c| c.epoch == apply.epoch);
        if !same_link {
            // Nobody will FLUSH for it on that connection: our own sync point will.
            if apply.tracked && apply.result.is_ok() {
                self.unsynced.push(WriteId(id));
            }
            return;
        }
        let seq = apply.seq;
        match (apply.kind, apply.result) {
            (ApplyKind::Resync, Ok(())) => {
                let granularity = u64::from(self.meta.layout().granularity_bytes);
                if let Some(target) = self.link.as_mut().and_then(|c| c.target.as_mut()) {
                    let first = apply.range.start() / granularity;
                    let end = apply.range.end().div_ceil(granularity);
                    target.received.insert_range(first as u32..end as u32);
                }
                self.send(PeerMsg::ResyncAck { seq }, None)
            }
            (_, Ok(())) => self.send(PeerMsg::Ack { seq }, None),
            (_, Err(errno)) => self.send(
                PeerMsg::Nack {
                    seq,
                    errno: errno.wire(),
                },
                None,
            ),
        }
        let conn = self.conn();
        conn.applying.remove(&seq);
        if apply.tracked && apply.result.is_ok() {
            conn.applied_unflushed.push(id);
        }
        self.run_peer_flushes();
    }

    /// Starts the local flush for every peer FLUSH whose lower sequences all completed.
    fn run_peer_flushes(&mut self) {
        loop {
            let conn = self.conn();
            let Some(&seq) = conn.flushes_waiting.front() else {
                return;
            };
            if conn.applying.range(..seq).next().is_some() {
                return;
            }
            conn.flushes_waiting.pop_front();
            let covers = std::mem::take(&mut conn.applied_unflushed);
            conn.flush_covers.insert(seq, covers);
            let epoch = conn.epoch;
            self.issue(DiskPurpose::PeerFlush { epoch, seq }, None, ClientOp::Flush);
        }
    }

    pub(super) fn peer_flush_done(&mut self, epoch: u64, seq: u64, result: Result<(), Errno>) {
        // A flush asked for on an earlier connection: its covers went to `unsynced` when
        // that connection was lost, and its FlushAck must not reach the current one,
        // where the same seq names a different flush (found by the two-node simulation).
        let same_link = self.link.as_ref().is_some_and(|c| c.epoch == epoch);
        let covers = if same_link {
            self.link
                .as_mut()
                .and_then(|c| c.flush_covers.remove(&seq))
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        match result {
            Ok(()) if !same_link => {}
            Ok(()) => {
                for id in covers {
                    self.meta.handle_write_durable(WriteId(id));
                }
                self.send(PeerMsg::FlushAck { seq }, None);
            }
            Err(errno) => {
                self.fail_with(format!(
                    "flush for the peer failed ({errno:?}): the disk is failed"
                ));
                self.drop_link("local disk failed".into());
            }
        }
    }

    // ----------------------------------------------------------------------------
    // Resync, source side.
    // ----------------------------------------------------------------------------

    /// Starts resync reads within the pacing limits; finishes the resync when nothing
    /// is left. Returns whether anything happened.
    pub(super) fn resync_step(&mut self) -> bool {
        let client_in_flight = !self.requests.is_empty();
        let now = self.now_ms;
        let rate = self.config.resync_rate_bytes_per_s;
        let granularity = u64::from(self.meta.layout().granularity_bytes);
        let region_count = self.meta.layout().region_count();
        let data_bytes = self.meta.layout().data_bytes;
        let Some(conn) = self.link.as_mut().filter(|c| c.is_replicating()) else {
            return false;
        };
        let Some(resync) = conn.resync.as_mut() else {
            return false;
        };
        if resync.paused || resync.stage != SourceStage::Walking {
            return false;
        }
        if rate > 0 {
            let elapsed = now.saturating_sub(resync.tokens_ms);
            resync.tokens_bytes =
                (resync.tokens_bytes + rate * elapsed / 1000).min(rate.max(RESYNC_CHUNK_BYTES));
            resync.tokens_ms = now;
        }
        if client_in_flight {
            resync.client_seen_ms = Some(now);
        }
        let client_busy = resync
            .client_seen_ms
            .is_some_and(|seen| now.saturating_sub(seen) < RESYNC_BUSY_HOLD_MS);
        if client_busy {
            // Refilled at the busy rate, at most one chunk banked: no burst after a pause.
            let elapsed = now.saturating_sub(resync.busy_tokens_ms);
            resync.busy_tokens_bytes = (resync.busy_tokens_bytes
                + RESYNC_BUSY_RATE_BYTES_PER_S * elapsed / 1000)
                .min(RESYNC_CHUNK_BYTES);
        } else {
            resync.busy_tokens_bytes = RESYNC_CHUNK_BYTES;
        }
        resync.busy_tokens_ms = now;
        let limit = if client_busy {
            RESYNC_IN_FLIGHT_BUSY
        } else {
            RESYNC_IN_FLIGHT_IDLE
        };
        if resync.ops.len() + resync.sent.len() >= limit || resync.cursor >= region_count {
            // The window is full (the usual case at every other event) or the pass is
            // walked: nothing to start.
            return self.maybe_finish_resync();
        }
        let mut in_flight_bytes = resync.in_flight_bytes;
        let mut progress = false;
        let bitmap = self.meta.dirty_bitmap();
        let max_regions = (RESYNC_CHUNK_BYTES / granularity).max(1);
        // One iterator for the whole step (not a fresh range query per request): the
        // set regions from the cursor on, in order.
        let mut dirty = bitmap
            .range(resync.cursor.min(u64::from(u32::MAX)) as u32..)
            .map(u64::from)
            .peekable();
        let mut starts: Vec<ByteRange> = Vec::new();
        while resync.ops.len() + resync.sent.len() + starts.len() < limit
            && resync.cursor < region_count
        {
            if rate > 0 && resync.tokens_bytes < RESYNC_CHUNK_BYTES.min(granularity) {
                break;
            }
            if client_busy && resync.busy_tokens_bytes < RESYNC_CHUNK_BYTES.min(granularity) {
                break;
            }
            if in_flight_bytes >= RESYNC_IN_FLIGHT_IDLE_BYTES {
                break;
            }
            let Some(first) = dirty.next() else {
                resync.cursor = region_count;
                break;
            };
            let mut end = first + 1;
            while end < region_count && end - first < max_regions && dirty.peek() == Some(&end) {
                dirty.next();
                end += 1;
            }
            resync.cursor = end;
            let offset = first * granularity;
            let range = ByteRange::new(offset, (end * granularity).min(data_bytes) - offset)
                .expect("non-empty run");
            if rate > 0 {
                resync.tokens_bytes = resync.tokens_bytes.saturating_sub(range.length());
            }
            if client_busy {
                resync.busy_tokens_bytes = resync.busy_tokens_bytes.saturating_sub(range.length());
            }
            in_flight_bytes += range.length();
            starts.push(range);
        }
        for range in starts {
            progress = true;
            let key = self.next_internal();
            let resync = self
                .link
                .as_mut()
                .and_then(|c| c.resync.as_mut())
                .expect("checked above");
            resync.in_flight_bytes += range.length();
            resync.ops.insert(
                key,
                ResyncOp {
                    range,
                    phase: ResyncOpPhase::Locking,
                },
            );
            let locked = range.align_out(self.config.lock_alignment_bytes);
            if self.locks.acquire(key, locked) == Acquire::Granted {
                self.resync_locked(key);
            }
        }
        progress | self.maybe_finish_resync()
    }

    /// The resync op holds its range (no client write to it is in flight): read it.
    fn resync_locked(&mut self, key: u64) {
        let op = self
            .link
            .as_mut()
            .and_then(|c| c.resync.as_mut())
            .and_then(|r| r.ops.get_mut(&key))
            .expect("a lock granted to a live resync op");
        op.phase = ResyncOpPhase::Reading;
        let range = op.range;
        self.issue(
            DiskPurpose::ResyncRead(key),
            Some(DataRef::Resync(ResyncBufId(key))),
            ClientOp::Read { range },
        );
    }

    /// Read done: send it (the lock is released only after the send is queued, so a
    /// client write to this range is sent after it and applies after it).
    pub(super) fn resync_read_done(&mut self, key: u64, result: Result<(), Errno>) {
        let buf = DataRef::Resync(ResyncBufId(key));
        let op = self
            .link
            .as_mut()
            .and_then(|c| c.resync.as_mut())
            .and_then(|r| r.ops.remove(&key));
        let Some(op) = op else {
            // The connection that wanted it is gone.
            self.orphaned_resync_reads.remove(&key);
            self.actions.push_back(Action::Release(buf));
            self.release_lock(key);
            return;
        };
        if let Err(errno) = result {
            if let Some(resync) = self.link.as_mut().and_then(|c| c.resync.as_mut()) {
                resync.in_flight_bytes -= op.range.length();
            }
            self.actions.push_back(Action::Release(buf));
            self.release_lock(key);
            self.fail_with(format!(
                "resync read failed ({errno:?}): the disk is failed"
            ));
            self.drop_link("local disk failed during resync".into());
            return;
        }
        let now = self.now_ms;
        let conn = self.conn();
        let seq = conn.take_seq();
        conn.resync
            .as_mut()
            .expect("live")
            .sent
            .insert(seq, (op.range, now));
        self.stats.resync_bytes_sent += op.range.length();
        self.send(
            PeerMsg::ResyncData {
                seq,
                range: op.range,
            },
            Some(buf),
        );
        self.release_lock(key);
    }

    fn resync_acked(&mut self, seq: u64) {
        let Some(resync) = self.link.as_mut().and_then(|c| c.resync.as_mut()) else {
            self.drop_link(format!(
                "protocol violation: ResyncAck {seq} without a resync"
            ));
            return;
        };
        match resync.sent.remove(&seq) {
            Some((range, _)) => {
                resync.in_flight_bytes -= range.length();
                resync.done_bytes += range.length();
                resync.acked.push(range);
                resync.acked_bytes += range.length();
                if resync.acked_bytes >= RESYNC_CLEAN_BATCH_BYTES {
                    self.maybe_start_sync(false);
                }
            }
            None => self.drop_link(format!(
                "protocol violation: ResyncAck of unknown seq {seq}"
            )),
        }
    }

    /// At the end of a pass: flush what is acknowledged, start another pass if bits
    /// remain, or tell the target everything is copied.
    fn maybe_finish_resync(&mut self) -> bool {
        let sync_idle = self.sync.is_none();
        let bitmap_empty = self.meta.dirty_bitmap().is_empty();
        let region_count = self.meta.layout().region_count();
        let Some(resync) = self.link.as_mut().and_then(|c| c.resync.as_mut()) else {
            return false;
        };
        if resync.stage != SourceStage::Walking
            || resync.cursor < region_count
            || !resync.ops.is_empty()
            || !resync.sent.is_empty()
        {
            return false;
        }
        assert_eq!(
            resync.in_flight_bytes, 0,
            "resync in-flight bytes out of step"
        );
        if !resync.acked.is_empty() || !resync.flushing.is_empty() {
            if sync_idle && !resync.acked.is_empty() {
                self.maybe_start_sync(false);
                return true;
            }
            return false;
        }
        if !bitmap_empty {
            // Cleared bits are gone; what remains was dirtied again or failed: go again.
            resync.cursor = 0;
            return true;
        }
        resync.stage = SourceStage::DoneSent;
        let seq = self.conn().take_seq();
        self.send(PeerMsg::ResyncDone { seq }, None);
        true
    }

    /// Operator: copy everything from this node to the peer (`rebuild --full --from
    /// here`). This node declares its data authoritative: a new current generation and
    /// FULL_SYNC_REQUIRED, so the rules on both sides make it the source of a full copy.
    pub fn start_full_sync(&mut self, random: u64) -> Result<(), String> {
        let Some(conn) = self.link.as_ref().filter(|c| !c.dropping) else {
            return Err("the peer is not connected".into());
        };
        if conn.phase == ConnPhase::Exchanging {
            return Err("the connection is still being set up; try again".into());
        }
        if conn.resync.is_some() || conn.target.is_some() || conn.full_sync_start.is_some() {
            return Err("a resync is already running".into());
        }
        if conn.peer.role == Role::Primary {
            return Err(
                "the peer is active (Primary): a full copy would overwrite its data".into(),
            );
        }
        if self.disk_state == DiskState::Inconsistent
            && self.generations().current != meta::generation::GENERATION_JUST_CREATED
        {
            return Err(
                "this disk is Inconsistent (an unfinished resync target): it cannot be a source"
                    .into(),
            );
        }
        let replicating = conn.phase == ConnPhase::Replicating;
        let ticket = self.meta.update_superblock(|s| {
            s.generations.new_current(random);
            s.disk_state = DiskState::UpToDate;
            s.flags.insert(Flags::FULL_SYNC_REQUIRED);
            s.flags.remove(Flags::RESYNC_IN_PROGRESS);
        });
        self.disk_state = DiskState::UpToDate;
        // Nothing is announced or acted on before the new generation is durable
        // (`peer_superblock_waits_done`). Then, waiting for the operator, the rules
        // are followed on this connection (rule 30: the peer is behind, full). While
        // replicating, the peer is in sync with our old generation and would take the
        // copy as plain writes, never marked Inconsistent: the link is dropped, the next
        // connect finds the peer behind (rule 70/80) and FULL_SYNC_REQUIRED makes the
        // copy full.
        self.conn().full_sync_start = Some((ticket, replicating));
        self.pump();
        Ok(())
    }

    /// Operator, after a split brain: give up this side's changes. Persisted (the
    /// DISCARD_LOCAL flag), so at the next connect — even after a restart — this side
    /// becomes the resync target of a differential copy over both journals.
    pub fn resolve_discard_local(&mut self) -> Result<(), String> {
        if self.link.as_ref().is_some_and(|c| c.is_replicating()) {
            return Err(
                "the mirror is connected and replicating: there is no split brain to resolve"
                    .into(),
            );
        }
        if self.role() == Role::Primary {
            return Err("this node is active: deactivate it before discarding its changes".into());
        }
        self.meta
            .update_superblock(|s| s.flags.insert(Flags::DISCARD_LOCAL));
        self.connect_problem = Some(
            "split brain resolution pending: this side will give up its changes when it reconnects"
                .into(),
        );
        self.pump();
        Ok(())
    }

    /// Operator: copy what is marked dirty now (e.g. what a verify found) to the peer,
    /// while connected; the same resync as after a reconnect, differential.
    pub fn start_differential_rebuild(&mut self) -> Result<(), String> {
        let role = self.role();
        let Some(conn) = self.link.as_ref().filter(|c| c.is_replicating()) else {
            return Err("the mirror is not connected and replicating".into());
        };
        if conn.resync.is_some() || conn.target.is_some() {
            return Err("a resync is already running".into());
        }
        if conn.verify.is_some() {
            return Err("a verify is running: rebuild after it finishes".into());
        }
        if role == Role::Secondary && conn.peer.role == Role::Primary {
            return Err(
                "run rebuild on the active node: it copies from the node it runs on".into(),
            );
        }
        if self.meta.dirty_bitmap().is_empty() {
            return Err("nothing is marked dirty: the disks are in sync".into());
        }
        self.start_source(false, RoaringBitmap::new());
        self.pump();
        Ok(())
    }

    /// Operator: pause or resume a running resync (this node is its source).
    pub fn set_resync_paused(&mut self, paused: bool) -> Result<(), String> {
        match self.link.as_mut().and_then(|c| c.resync.as_mut()) {
            Some(resync) => {
                resync.paused = paused;
                self.pump();
                Ok(())
            }
            None => Err("no resync is running with this node as its source".into()),
        }
    }
}

/// Whether two states of one node lead the generation rules (and the split-brain
/// resolution) to the same decision: generations, role and flags.
fn same_decision_inputs(a: &NodeState, b: &NodeState) -> bool {
    a.generations == b.generations && a.role == b.role && a.flags == b.flags
}

/// Maximal runs `[start, end)` of set bits.
fn runs(bits: &RoaringBitmap) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut iter = bits.iter().map(u64::from).peekable();
    std::iter::from_fn(move || {
        let start = iter.next()?;
        let mut end = start + 1;
        while iter.peek() == Some(&end) {
            iter.next();
            end += 1;
        }
        Some((start, end))
    })
}

/// Status of the connection, for `mirrorctl status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinkStatus {
    pub state: &'static str,
    pub epoch: u64,
    pub transfer_log_writes: u64,
    pub awaiting_acks: u64,
    pub resync: Option<ResyncStatus>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ResyncStatus {
    pub role: &'static str,
    pub full: bool,
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub paused: bool,
    pub elapsed_ms: u64,
}

impl Engine {
    pub(super) fn link_status(&self) -> Option<LinkStatus> {
        let conn = self.link.as_ref()?;
        let state = match (conn.phase, conn.dropping) {
            (_, true) => "disconnecting",
            (ConnPhase::Exchanging, _) => "connecting",
            (ConnPhase::WaitingForOperator, _) => "waiting-for-operator",
            (ConnPhase::Replicating, _) if conn.resync.is_some() => "sync-source",
            (ConnPhase::Replicating, _) if conn.target.is_some() => "sync-target",
            (ConnPhase::Replicating, _) => "connected",
        };
        let resync = if let Some(r) = &conn.resync {
            Some(ResyncStatus {
                role: "source",
                full: r.full,
                total_bytes: r.total_bytes,
                done_bytes: r.done_bytes,
                paused: r.paused,
                elapsed_ms: self.now_ms.saturating_sub(r.started_ms),
            })
        } else {
            conn.target.as_ref().map(|_| ResyncStatus {
                role: "target",
                full: false,
                total_bytes: 0,
                done_bytes: self.stats.resync_bytes_received,
                paused: false,
                elapsed_ms: 0,
            })
        };
        Some(LinkStatus {
            state,
            epoch: conn.epoch,
            transfer_log_writes: conn.tlog.len() as u64,
            awaiting_acks: conn.awaiting.len() as u64,
            resync,
        })
    }
}
