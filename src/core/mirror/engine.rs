//! The engine state machine: client requests, peer messages and link events in; disk,
//! metadata and network actions and replies out.
//!
//! A client write on the primary goes through these steps (DESIGN §4–§5):
//!
//! 1. **Overlap**: it locks its block-aligned range; a later overlapping request (or a
//!    resync read) waits until this one has been answered, i.e. completed on both sides.
//! 2. **Gate**: the metadata engine admits it once its region is covered by durable
//!    metadata (a hot activity-log extent; in a break, its journal bits). While a new
//!    generation is being made durable after a link loss, nothing is admitted.
//! 3. **Submit** to the local disk and, when replicating, **send** to the peer — the same
//!    buffer, at the same time. The write enters the transfer log.
//! 4. **Acknowledge** when the local write completed, the peer acknowledged it (or the
//!    link broke and the write is in the durable journal), and the metadata engine says
//!    it may be (journal durable in a break; new generation durable after a link loss).
//! 5. **Sync point**: a local flush and a peer FLUSH together make every write answered
//!    before the sync point durable on both sides; then their activity-log extents may
//!    go cold and the transfer log drops them. Sync points start on a client FLUSH (the
//!    first sync point *started* after it answers it), on activity-log pressure, when
//!    the transfer log is long, or every `sync_interval_ms`.
//!
//! On link loss the primary marks every write still in the transfer log dirty and makes
//! a new current generation durable before it acknowledges anything else. The peer's
//! side of replication (applying, flush coverage) is in `apply.rs`; connection set-up,
//! the bitmap exchange and resync are in `peer.rs`.

use std::collections::{BTreeSet, VecDeque};

use rustc_hash::FxHashMap;

use crate::core::meta::{
    self, DiskState, Flags, Gate, Generations, IoError, MetaEngine, MetaError, MetaIoId, Mode,
    Role, SuperblockTicket, WriteId,
};
use crate::core::nbd::wire::Errno;
use crate::core::overlap::{Acquire, ByteRange, RangeLocks};
use crate::core::repl::wire::NodeState;

use super::peer::{Apply, Conn, LinkStatus};
use super::types::{Action, ClientOp, DataRef, DiskOp, DiskOpId, ReqId};
use super::verify::{ServeVerify, VerifyStatus};

/// Lock and metadata-write ids of client requests are their `ReqId`s (below this);
/// peer applies and resync reads take ids from this point up, so the spaces never meet.
pub(super) const INTERNAL_ID_BASE: u64 = 1 << 62;

/// A sync point is started once this many replicated writes wait in the transfer log:
/// bounds the log (and the resync a link loss costs) under a steady write load.
pub const TRANSFER_LOG_SYNC_WRITES: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Modifying requests lock their range aligned out to this (the backing's logical
    /// block), so read-modify-write of a partial block is ordered with its neighbours.
    pub lock_alignment_bytes: u64,
    /// Longest time a completed write may wait for the sync point that makes it durable
    /// on both sides.
    pub sync_interval_ms: u64,
    /// A peer that leaves a write, flush or resync request unanswered this long is
    /// treated as failed and the link is dropped (DRBD's ko-count).
    pub peer_timeout_ms: u64,
    /// Resync bandwidth cap; 0 = only the adaptive in-flight limit.
    pub resync_rate_bytes_per_s: u64,
}

/// Counters for status and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct EngineStats {
    pub requests_in_flight: u64,
    pub writes: u64,
    pub reads: u64,
    pub client_flushes: u64,
    pub sync_points: u64,
    pub errors: u64,
    pub replicated_writes: u64,
    pub replicated_bytes: u64,
    pub applied_writes: u64,
    pub resync_bytes_sent: u64,
    pub resync_bytes_received: u64,
    pub link_losses: u64,
}

/// What to do when both sides wrote after parting (DRBD's after-sb-0pri). Off by
/// default: a split brain is reported and nothing moves until the operator resolves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SplitBrainPolicy {
    /// Report, disconnect, wait for `mirrorctl resolve`.
    #[default]
    Disconnect,
    /// If exactly one side has no changes since parting (an empty journal), it gives
    /// them up — it has none — and resyncs from the other.
    DiscardZeroChanges,
}

/// The peer as last heard of.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerStatus {
    pub role: Role,
    pub disk_state: DiskState,
    pub generations: Generations,
    /// How long ago the peer last told us its state.
    pub age_ms: u64,
}

/// What `mirrorctl status` shows for one mirror on one node.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineStatus {
    pub role: Role,
    pub disk_state: DiskState,
    pub generations: Generations,
    pub flags: Vec<&'static str>,
    pub failure: Option<String>,
    /// Why the mirror does not replicate, if it does not (split brain, waiting...).
    pub problem: Option<String>,
    pub link: Option<LinkStatus>,
    pub verify: Option<VerifyStatus>,
    pub peer: Option<PeerStatus>,
    pub dirty_bytes: u64,
    pub stats: EngineStats,
    pub meta: meta::MetaStats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Waiting for an overlapping earlier request to finish.
    Locking,
    /// Waiting for the metadata engine (or a new generation) to admit it.
    Gating,
    /// Issued to the disk (reads, cache, admitted writes).
    Submitted,
    /// A client FLUSH waiting for its sync point.
    Flushing,
}

#[derive(Debug)]
pub(super) struct Request {
    pub(super) op: ClientOp,
    pub(super) phase: Phase,
    pub(super) locked: bool,
    pub(super) local_done: bool,
    /// The metadata engine's ack condition holds (always true once yielded).
    pub(super) ackable: bool,
    /// Sent to the peer and not yet acknowledged by it.
    pub(super) peer_seq: Option<u64>,
    /// Passed to the metadata engine (`handle_write_start`) already.
    pub(super) meta_started: bool,
    pub(super) error: Option<Errno>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DiskPurpose {
    Request(ReqId),
    Sync,
    /// A write received from the peer (apply id).
    Apply(u64),
    /// A flush the peer asked for: the connection's epoch and the flush's seq (its
    /// FlushAck belongs to that connection only).
    PeerFlush {
        epoch: u64,
        seq: u64,
    },
    /// A resync read on the sync source (resync op key).
    ResyncRead(u64),
    /// Digests for our own verify (verify op key).
    Digest(u64),
    /// Digests the peer asked for (serving id).
    DigestServe(u64),
    /// Digests whose verify went away with its connection.
    DigestOrphan,
}

#[derive(Debug)]
pub(super) struct SyncPoint {
    pub(super) disk_op: DiskOpId,
    pub(super) local_done: bool,
    /// The peer FLUSH sent with this sync point, while it is outstanding.
    pub(super) peer_seq: Option<u64>,
    /// Writes answered before the flush was issued: durable once both halves completed.
    pub(super) covers: Vec<WriteId>,
    pub(super) flushes: Vec<ReqId>,
    pub(super) result: Result<(), Errno>,
    /// Resync ranges the peer's half made durable on the target: their bits are cleared
    /// once our half is durable too (a copied region may hold a write of ours still in
    /// our volatile cache; clearing its bit before that let a crash of this node lose
    /// the write while the target kept it, the disks differing where no journal says
    /// so; found by the two-node simulation).
    pub(super) resync_clean: Vec<meta::ByteRange>,
}

/// A pending role change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RoleChange {
    /// A connected activation waiting for the peer to confirm, over the live link, that
    /// it is neither Primary nor becoming it (our State with intent Primary is sent; the
    /// peer's next State decides). Without it a node whose link had silently died took
    /// its stale "peer is Secondary" for the truth while the peer, having dropped the
    /// link, acknowledged writes it lacks (found by the two-node simulation).
    Confirming {
        since_ms: u64,
    },
    Activate(SuperblockTicket),
    Deactivate(Option<SuperblockTicket>),
}

/// The engine. See the module documentation for the rules it enforces.
#[derive(Debug)]
pub struct Engine {
    pub(super) config: EngineConfig,
    pub(super) meta: MetaEngine,
    pub(super) locks: RangeLocks,
    pub(super) requests: FxHashMap<ReqId, Request>,
    pub(super) next_req: u64,
    pub(super) next_disk_op: u64,
    pub(super) next_internal_id: u64,
    pub(super) disk_ops: FxHashMap<DiskOpId, DiskPurpose>,
    pub(super) actions: VecDeque<Action>,
    /// Writes answered but not yet covered by a completed sync point.
    pub(super) unsynced: Vec<WriteId>,
    pub(super) sync: Option<SyncPoint>,
    /// Client FLUSHes waiting for the next sync point to start.
    pub(super) flush_waiters: Vec<ReqId>,
    pub(super) now_ms: u64,
    pub(super) last_sync_ms: u64,
    pub(super) failed: Option<String>,
    pub(super) stats: EngineStats,
    /// This disk's state as the cluster should see it now (not always what is on disk:
    /// a node that started without its peer says Consistent, never UpToDate).
    pub(super) disk_state: DiskState,
    pub(super) link: Option<Conn>,
    /// The last connection epoch seen; the next handshake proposes one more.
    pub(super) last_epoch: u64,
    /// A new current generation not yet durable: no write is submitted or answered.
    pub(super) generation_hold: Option<SuperblockTicket>,
    /// Writes the metadata engine admitted while the generation hold was on.
    pub(super) held_ready: Vec<ReqId>,
    /// The last state the peer told us, and when.
    pub(super) peer_last: Option<(NodeState, u64)>,
    /// Why the last connection could not replicate (split brain, unrelated disks ...).
    pub(super) connect_problem: Option<String>,
    pub(super) role_change: Option<RoleChange>,
    /// Verify requests from the peer being served (id -> request).
    pub(super) verify_serving: FxHashMap<u64, ServeVerify>,
    /// The outcome of the last verify, once it ended.
    pub(super) last_verify: Option<VerifyStatus>,
    /// What to do when the generation rules find a split brain.
    pub(super) split_brain_policy: SplitBrainPolicy,
    /// A clean stop is under way (`shutdown`); `cooled` once the activity-log record
    /// without the unpinned extents has been requested.
    pub(super) shutting_down: bool,
    pub(super) cooled: bool,
    /// Writes received from the peer, from arrival to their answer (apply id -> apply).
    pub(super) applies: FxHashMap<u64, Apply>,
    /// Applies waiting for the resync-target marking to become durable.
    pub(super) held_applies: VecDeque<u64>,
    /// Resync reads whose connection went away while they read: release on completion.
    pub(super) orphaned_resync_reads: BTreeSet<u64>,
    /// Resync ops whose connection went away while they waited for a lock.
    pub(super) orphaned_resync_locks: BTreeSet<u64>,
}

fn meta_range(range: ByteRange) -> meta::ByteRange {
    meta::ByteRange::new(range.start(), range.length())
}

impl Engine {
    /// Wraps a created or recovered metadata engine. Any metadata I/O it needs before
    /// admitting writes (recovery writes a fresh snapshot) is queued at once.
    ///
    /// A disk recovered with role Primary was active when the node went down without
    /// deactivating: it comes back inactive and marked crashed-primary (its activity
    /// log may hold writes the peer lacks). A node starting without its peer never
    /// claims UpToDate (DESIGN §4).
    pub fn new(config: EngineConfig, meta: MetaEngine, now_ms: u64) -> Engine {
        assert!(config.lock_alignment_bytes.is_power_of_two());
        assert!(config.sync_interval_ms > 0 && config.peer_timeout_ms > 0);
        let on_disk = meta.superblock().state;
        let disk_state = match on_disk.disk_state {
            DiskState::UpToDate => DiskState::Consistent,
            other => other,
        };
        let mut engine = Engine {
            config,
            meta,
            locks: RangeLocks::new(),
            requests: FxHashMap::default(),
            next_req: 0,
            next_disk_op: 0,
            next_internal_id: INTERNAL_ID_BASE,
            disk_ops: FxHashMap::default(),
            actions: VecDeque::new(),
            unsynced: Vec::new(),
            sync: None,
            flush_waiters: Vec::new(),
            now_ms,
            last_sync_ms: now_ms,
            failed: None,
            stats: EngineStats::default(),
            disk_state,
            link: None,
            last_epoch: 0,
            generation_hold: None,
            held_ready: Vec::new(),
            peer_last: None,
            connect_problem: None,
            role_change: None,
            verify_serving: FxHashMap::default(),
            last_verify: None,
            split_brain_policy: SplitBrainPolicy::Disconnect,
            shutting_down: false,
            cooled: false,
            applies: FxHashMap::default(),
            held_applies: VecDeque::new(),
            orphaned_resync_reads: BTreeSet::new(),
            orphaned_resync_locks: BTreeSet::new(),
        };
        if on_disk.role == Role::Primary {
            // Went down while active: come back inactive; CRASHED_PRIMARY (set while
            // Primary) stays, so the generation rules know its activity log may hold
            // writes the peer lacks.
            engine.meta.update_superblock(|s| {
                s.role = Role::Secondary;
                s.flags.insert(Flags::CRASHED_PRIMARY);
            });
        }
        engine.pump();
        engine
    }

    pub fn meta(&self) -> &MetaEngine {
        &self.meta
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            requests_in_flight: self.requests.len() as u64,
            ..self.stats
        }
    }

    /// Why the engine refuses writes, if it does (a metadata or disk failure).
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    pub fn role(&self) -> Role {
        self.meta.superblock().state.role
    }

    pub fn disk_state(&self) -> DiskState {
        self.disk_state
    }

    pub fn generations(&self) -> Generations {
        self.meta.superblock().state.generations
    }

    /// Whether client I/O is served: the disk is active (Primary) here.
    pub fn is_active(&self) -> bool {
        self.role() == Role::Primary && !matches!(self.role_change, Some(RoleChange::Activate(_)))
    }

    /// What this node tells the peer in the handshake and in State messages.
    pub fn node_state(&self) -> NodeState {
        let state = self.meta.superblock().state;
        let flags = state.flags;
        NodeState {
            generations: state.generations,
            disk_state: self.disk_state,
            role: state.role,
            flags,
            intent: match self.role_change {
                Some(RoleChange::Confirming { .. }) => Role::Primary,
                _ => state.role,
            },
            dirty_bytes: meta::engine::dirty_bytes(self.meta.dirty_bitmap(), self.meta.layout()),
        }
    }

    /// Everything `mirrorctl status` shows about this mirror, as this node sees it.
    pub fn status(&self) -> EngineStatus {
        let state = self.meta.superblock().state;
        EngineStatus {
            role: self.role(),
            disk_state: self.disk_state,
            generations: state.generations,
            flags: state.flags.names(),
            failure: self.failed.clone(),
            problem: self.connect_problem.clone(),
            link: self.link_status(),
            verify: self.verify_status(),
            peer: self.peer_last.map(|(s, at)| PeerStatus {
                role: s.role,
                disk_state: s.disk_state,
                generations: s.generations,
                age_ms: self.now_ms.saturating_sub(at),
            }),
            dirty_bytes: meta::engine::dirty_bytes(self.meta.dirty_bitmap(), self.meta.layout()),
            stats: self.stats(),
            meta: self.meta.stats(),
        }
    }

    pub fn set_split_brain_policy(&mut self, policy: SplitBrainPolicy) {
        self.split_brain_policy = policy;
    }

    /// The epoch to propose in the next handshake.
    pub fn next_epoch_proposal(&self) -> u64 {
        self.last_epoch + 1
    }

    /// Enters a mirror break with no peer configured at all (`serve --broken`): every
    /// write sets its journal bits from now on.
    pub fn set_broken(&mut self) {
        assert!(self.link.is_none());
        self.meta.set_mode(Mode::Broken, &[]);
        self.pump();
    }

    /// The next action for the shell, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// A new client request. Its id comes back in exactly one `Action::Reply`. The
    /// shell only submits requests while the disk is active (or for `serve`).
    pub fn handle_client(&mut self, op: ClientOp) -> ReqId {
        let id = ReqId(self.next_req);
        self.next_req += 1;
        assert!(self.next_req < INTERNAL_ID_BASE);
        // TRIM is executed as WRITE_ZEROES, here and on the peer: both replicas stay
        // byte-identical whatever each backing does with a discard.
        let op = match op {
            ClientOp::Trim { range, fua } => ClientOp::WriteZeroes {
                range,
                fua,
                no_hole: false,
                fast_zero: false,
            },
            other => other,
        };
        let request = Request {
            op,
            phase: Phase::Submitted,
            locked: false,
            local_done: false,
            ackable: false,
            peer_seq: None,
            meta_started: false,
            error: None,
        };
        self.requests.insert(id, request);
        match op {
            ClientOp::Read { .. } | ClientOp::Cache { .. } => {
                self.stats.reads += 1;
                self.issue(DiskPurpose::Request(id), Some(DataRef::Request(id)), op);
            }
            ClientOp::Flush => {
                self.stats.client_flushes += 1;
                self.requests.get_mut(&id).expect("just inserted").phase = Phase::Flushing;
                self.flush_waiters.push(id);
                self.maybe_start_sync(true);
            }
            ClientOp::Write { range, .. }
            | ClientOp::WriteZeroes { range, .. }
            | ClientOp::Trim { range, .. } => {
                self.stats.writes += 1;
                if self.failed.is_some() {
                    self.reply(id, Err(Errno::Io));
                } else if let Some(errno) = self.refuse_zeroing(&op) {
                    self.reply(id, Err(errno));
                } else {
                    let locked = range.align_out(self.config.lock_alignment_bytes);
                    self.requests.get_mut(&id).expect("just inserted").phase = Phase::Locking;
                    if self.locks.acquire(id.0, locked) == Acquire::Granted {
                        self.gate(id);
                    }
                }
            }
        }
        self.pump();
        id
    }

    /// Zeroing requests both replicas could not carry out identically are refused
    /// before either side acts: FAST_ZERO while a peer is connected (its backing may
    /// not be fast: the spec's answer is ENOTSUP), and ranges not aligned to the
    /// logical block (a block device cannot zero part of a block; the spec lets us
    /// refuse requests that ignore the advertised minimum block size).
    fn refuse_zeroing(&self, op: &ClientOp) -> Option<Errno> {
        let ClientOp::WriteZeroes {
            range, fast_zero, ..
        } = *op
        else {
            return None;
        };
        if !range.is_aligned(self.config.lock_alignment_bytes) {
            return Some(Errno::Inval);
        }
        (fast_zero && self.link.is_some()).then_some(Errno::NotSup)
    }

    /// A local disk operation finished (`Err` carries the errno as the client sees it).
    pub fn handle_disk_done(&mut self, id: DiskOpId, result: Result<(), Errno>) {
        let purpose = self
            .disk_ops
            .remove(&id)
            .expect("completion for an issued disk op");
        match purpose {
            DiskPurpose::Sync => self.sync_local_done(id, result),
            DiskPurpose::Request(req) => self.request_disk_done(req, result),
            DiskPurpose::Apply(apply) => self.apply_disk_done(apply, result),
            DiskPurpose::PeerFlush { epoch, seq } => self.peer_flush_done(epoch, seq, result),
            DiskPurpose::ResyncRead(key) => self.resync_read_done(key, result),
            DiskPurpose::Digest(_) | DiskPurpose::DigestServe(_) | DiskPurpose::DigestOrphan => {
                panic!("digest ops complete through handle_digests")
            }
        }
        self.pump();
    }

    fn request_disk_done(&mut self, req: ReqId, result: Result<(), Errno>) {
        let request = self
            .requests
            .get_mut(&req)
            .expect("disk op of a live request");
        request.local_done = true;
        match request.op.modification() {
            None => self.reply(req, result),
            Some((range, fua)) => {
                if let Err(errno) = result {
                    self.stats.errors += 1;
                    request.error = Some(errno);
                }
                // Durable everywhere now only if FUA and nobody else must confirm it;
                // otherwise a sync point (local flush + peer flush) will say so.
                let everywhere = fua && result.is_ok() && self.link.is_none();
                self.meta.handle_write_done(WriteId(req.0), everywhere);
                self.maybe_complete(req);
                if let Err(errno) = result {
                    // The peer may hold this write and we do not: the range is marked
                    // dirty (the write's activity-log pin, never released since a failed
                    // write is never synced, also keeps its extent hot; this does not
                    // rely on that), and this disk stops here (DRBD detaches on a local
                    // write error for the same reason).
                    self.meta.mark_dirty(&[meta_range(range)]);
                    self.fail_with(format!(
                        "local write failed ({errno:?}): the disk is failed"
                    ));
                }
            }
        }
    }

    /// A metadata I/O finished. A failure fails the disk: writes are refused from then on.
    pub fn handle_meta_done(&mut self, id: MetaIoId, result: Result<(), i32>) {
        let outcome = self
            .meta
            .handle_io_done(id, result.map_err(|errno| IoError { errno }));
        if let Err(error) = outcome {
            self.fail(error);
        }
        self.pump();
    }

    /// Time passes: periodic sync points, peer timeouts, resync pacing.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.now_ms = now_ms.max(self.now_ms);
        if self.now_ms.saturating_sub(self.last_sync_ms) >= self.config.sync_interval_ms {
            self.maybe_start_sync(false);
        }
        self.check_peer_timeouts();
        self.pump();
    }

    /// When the shell should next call `handle_timeout`.
    pub fn next_timeout_ms(&self) -> u64 {
        self.last_sync_ms + self.config.sync_interval_ms
    }

    pub(super) fn issue(
        &mut self,
        purpose: DiskPurpose,
        data: Option<DataRef>,
        op: DiskOp,
    ) -> DiskOpId {
        let id = DiskOpId(self.next_disk_op);
        self.next_disk_op += 1;
        self.disk_ops.insert(id, purpose);
        self.actions.push_back(Action::Disk { id, data, op });
        id
    }

    pub(super) fn next_internal(&mut self) -> u64 {
        let id = self.next_internal_id;
        self.next_internal_id += 1;
        id
    }

    /// The request holds its range: ask the metadata engine whether it may start.
    pub(super) fn gate(&mut self, req: ReqId) {
        let request = self.requests.get_mut(&req).expect("gating a live request");
        request.locked = true;
        request.phase = Phase::Gating;
        if self.generation_hold.is_some() || self.parting() {
            // Admitted when the new generation is durable (see `release_generation_hold`).
            return;
        }
        self.admit(req);
    }

    fn admit(&mut self, req: ReqId) {
        let request = self
            .requests
            .get_mut(&req)
            .expect("admitting a live request");
        request.meta_started = true;
        let (range, _) = request.op.modification().expect("only writes are gated");
        match self
            .meta
            .handle_write_start(WriteId(req.0), meta_range(range))
        {
            Gate::Submit => self.submit_write(req),
            Gate::Wait => {}
            Gate::Failed => {
                self.requests.get_mut(&req).expect("live").error = Some(Errno::Io);
                self.finish_write(req);
            }
        }
    }

    /// A new generation became durable: submit what the metadata engine admitted
    /// meanwhile, admit every write that waited for it, answer what is complete.
    pub(super) fn release_generation_hold(&mut self) {
        self.generation_hold = None;
        for req in std::mem::take(&mut self.held_ready) {
            if self
                .requests
                .get(&req)
                .is_some_and(|r| r.phase == Phase::Gating)
            {
                self.submit_write(req);
            }
        }
        let mut waiting: Vec<ReqId> = self
            .requests
            .iter()
            .filter(|(_, r)| r.phase == Phase::Gating && r.locked && !r.meta_started)
            .map(|(id, _)| *id)
            .collect();
        waiting.sort();
        for req in waiting {
            if self
                .requests
                .get(&req)
                .is_some_and(|r| r.phase == Phase::Gating)
            {
                self.admit(req);
            }
        }
        let mut ready: Vec<ReqId> = self
            .requests
            .iter()
            .filter(|(_, r)| r.local_done)
            .map(|(id, _)| *id)
            .collect();
        // In request order: replies (and the sync points they join) do not depend on
        // the map's iteration order.
        ready.sort();
        for req in ready {
            self.maybe_complete(req);
        }
    }

    /// Local write and (when replicating) the send to the peer start together on the
    /// same buffer (DESIGN §5); the write enters the transfer log.
    fn submit_write(&mut self, req: ReqId) {
        let request = self
            .requests
            .get_mut(&req)
            .expect("submitting a live request");
        assert_eq!(request.phase, Phase::Gating);
        request.phase = Phase::Submitted;
        let op = request.op;
        let data = matches!(op, ClientOp::Write { .. }).then_some(DataRef::Request(req));
        self.issue(DiskPurpose::Request(req), data, op);
        if let Some(seq) = self.replicate(op, data) {
            self.requests.get_mut(&req).expect("live").peer_seq = Some(seq);
            self.link
                .as_mut()
                .expect("replicating")
                .awaiting
                .insert(seq, (req, self.now_ms));
        }
    }

    /// The peer acknowledged (or can no longer acknowledge) the request's write.
    pub(super) fn peer_write_settled(&mut self, req: ReqId, error: Option<Errno>) {
        if let Some(request) = self.requests.get_mut(&req) {
            request.peer_seq = None;
            if let (Some(errno), None) = (error, request.error) {
                request.error = Some(errno);
            }
            self.maybe_complete(req);
        }
    }

    /// Answers a write once every half of its acknowledgement condition holds.
    pub(super) fn maybe_complete(&mut self, req: ReqId) {
        let Some(request) = self.requests.get(&req) else {
            return;
        };
        if request.op.modification().is_none() {
            return;
        }
        if request.error.is_some() {
            if request.local_done && request.peer_seq.is_none() {
                self.finish_write(req);
            }
            return;
        }
        let ready = request.local_done
            && request.ackable
            && request.peer_seq.is_none()
            && self.generation_hold.is_none()
            && !self.parting();
        if ready {
            self.finish_write(req);
        }
    }

    /// Replies to a write and releases its range, admitting whoever waited for it.
    pub(super) fn finish_write(&mut self, req: ReqId) {
        let request = self.requests.get(&req).expect("finishing a live request");
        let result = request.error.map_or(Ok(()), Err);
        let locked = request.locked;
        if result.is_ok() {
            self.unsynced.push(WriteId(req.0));
        }
        self.reply(req, result);
        if locked {
            self.release_lock(req.0);
        }
    }

    /// Releases a range lock and moves every request it was blocking forward.
    pub(super) fn release_lock(&mut self, lock_id: u64) {
        let mut granted = Vec::new();
        self.locks.release(lock_id, &mut granted);
        for waiter in granted {
            if waiter < INTERNAL_ID_BASE {
                let waiter = ReqId(waiter);
                if self.failed.is_some() {
                    let request = self.requests.get_mut(&waiter).expect("live");
                    request.error = Some(Errno::Io);
                    request.locked = true;
                    self.finish_write(waiter);
                } else {
                    self.gate(waiter);
                }
            } else {
                self.internal_lock_granted(waiter);
            }
        }
    }

    pub(super) fn reply(&mut self, req: ReqId, result: Result<(), Errno>) {
        let request = self.requests.remove(&req).expect("one reply per request");
        if result.is_err() && request.op.modification().is_none() {
            self.stats.errors += 1;
        }
        self.actions.push_back(Action::Reply { req, result });
    }

    /// Starts a sync point if none is in flight and one is useful. `forced`: a client
    /// FLUSH needs one even when no write is waiting to become durable.
    pub(super) fn maybe_start_sync(&mut self, forced: bool) {
        if self.sync.is_some() {
            return;
        }
        let peer_work = self.link.as_ref().is_some_and(|c| c.wants_flush());
        if self.unsynced.is_empty() && self.flush_waiters.is_empty() && !forced && !peer_work {
            self.last_sync_ms = self.now_ms;
            return;
        }
        let id = self.issue(DiskPurpose::Sync, None, ClientOp::Flush);
        let peer_seq = self.send_peer_flush();
        self.sync = Some(SyncPoint {
            disk_op: id,
            local_done: false,
            peer_seq,
            covers: std::mem::take(&mut self.unsynced),
            flushes: std::mem::take(&mut self.flush_waiters),
            result: Ok(()),
            resync_clean: Vec::new(),
        });
        self.last_sync_ms = self.now_ms;
        self.stats.sync_points += 1;
    }

    fn sync_local_done(&mut self, id: DiskOpId, result: Result<(), Errno>) {
        let sync = self.sync.as_mut().expect("a sync point is in flight");
        assert_eq!(sync.disk_op, id);
        sync.local_done = true;
        if let Err(errno) = result {
            sync.result = Err(errno);
        }
        self.maybe_finish_sync();
    }

    /// The peer's half of the sync point completed (FlushAck) or became moot (link lost).
    pub(super) fn sync_peer_done(&mut self, seq: Option<u64>) {
        if let Some(sync) = self.sync.as_mut()
            && (seq.is_none() || sync.peer_seq == seq)
        {
            sync.peer_seq = None;
            self.maybe_finish_sync();
        }
    }

    fn maybe_finish_sync(&mut self) {
        let done = self
            .sync
            .as_ref()
            .is_some_and(|s| s.local_done && s.peer_seq.is_none());
        if !done {
            return;
        }
        let sync = self.sync.take().expect("checked");
        match sync.result {
            Ok(()) => {
                for write in sync.covers {
                    self.meta.handle_write_durable(write);
                }
                if !sync.resync_clean.is_empty() {
                    self.meta.mark_clean(&sync.resync_clean);
                }
                for flush in sync.flushes {
                    self.reply(flush, Ok(()));
                }
            }
            Err(errno) => {
                // fdatasync failed: what it covered may be lost. Fail the disk; the
                // covered writes stay pinned in the activity log, so a restart treats
                // their extents as dirty.
                for flush in sync.flushes {
                    self.reply(flush, Err(errno));
                }
                self.fail_with(format!(
                    "local flush failed ({errno:?}): the disk is failed"
                ));
            }
        }
        if !self.flush_waiters.is_empty() {
            self.maybe_start_sync(true);
        }
        self.finish_deactivate_if_synced();
        self.maybe_cool();
    }

    /// A clean stop: the shell has stopped client I/O and closed (or is closing) the
    /// peer link. A final sync point makes every completed write durable, then the
    /// activity log is rewritten without the extents that are durable everywhere, so the
    /// next start does not resync regions that are in sync. `shutdown_complete` says when
    /// that is done.
    pub fn shutdown(&mut self) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        self.maybe_start_sync(true);
        self.pump();
        self.maybe_cool();
    }

    fn maybe_cool(&mut self) {
        if self.shutting_down && !self.cooled && self.sync.is_none() && self.requests.is_empty() {
            self.cooled = true;
            self.meta.cool_activity_log();
            self.pump();
        }
    }

    /// The clean stop asked for by `shutdown` has reached the disk (the shell still waits
    /// for its metadata ring to drain).
    pub fn shutdown_complete(&self) -> bool {
        self.cooled && self.sync.is_none() && !self.meta.activity_log_cooling()
    }

    fn fail(&mut self, error: MetaError) {
        self.fail_with(error.to_string());
    }

    /// Fails the disk: every write not yet on the disk is answered EIO; writes already
    /// submitted are answered EIO when their disk op returns.
    pub(super) fn fail_with(&mut self, reason: String) {
        if self.failed.is_none() {
            self.failed = Some(reason);
        }
        let waiting: Vec<ReqId> = self
            .requests
            .iter()
            .filter(|(_, r)| r.op.modification().is_some())
            .map(|(id, _)| *id)
            .collect();
        for req in waiting {
            let Some(request) = self.requests.get_mut(&req) else {
                continue;
            };
            request.error.get_or_insert(Errno::Io);
            match request.phase {
                // Still queued behind a lock: answered when granted (`release_lock`).
                Phase::Locking => {}
                Phase::Gating => {
                    request.peer_seq = None;
                    self.finish_write(req);
                }
                Phase::Submitted => self.maybe_complete(req),
                Phase::Flushing => unreachable!("flushes are not modifications"),
            }
        }
    }

    /// Moves metadata engine outputs into actions until nothing changes.
    pub(super) fn pump(&mut self) {
        loop {
            let mut progress = false;
            while let Some(id) = self.meta.poll_ready() {
                progress = true;
                if id.0 >= INTERNAL_ID_BASE {
                    self.apply_admitted(id.0);
                    continue;
                }
                let req = ReqId(id.0);
                if self
                    .requests
                    .get(&req)
                    .is_some_and(|r| r.phase == Phase::Gating)
                {
                    if self.generation_hold.is_some() || self.parting() {
                        self.held_ready.push(req);
                    } else {
                        self.submit_write(req);
                    }
                }
            }
            while let Some(id) = self.meta.poll_ackable() {
                progress = true;
                if id.0 >= INTERNAL_ID_BASE {
                    continue;
                }
                let req = ReqId(id.0);
                if let Some(request) = self.requests.get_mut(&req) {
                    request.ackable = true;
                    self.maybe_complete(req);
                }
            }
            while let Some(io) = self.meta.poll_io() {
                progress = true;
                self.actions.push_back(Action::Meta(io));
            }
            if let Some(ticket) = self.generation_hold
                && self.meta.superblock_durable(ticket)
            {
                self.release_generation_hold();
                progress = true;
            }
            if self.superblock_waits_done() {
                progress = true;
            }
            // Writes waiting for activity-log slots wait for the sync point that lets
            // completed writes' extents go cold: start it now rather than at the timer.
            if self.sync.is_none() && !self.unsynced.is_empty() && self.meta.writes_waiting_al() > 0
            {
                self.maybe_start_sync(false);
                progress = true;
            }
            if self.sync.is_none()
                && self
                    .link
                    .as_ref()
                    .is_some_and(|c| c.tlog.len() >= TRANSFER_LOG_SYNC_WRITES)
            {
                self.maybe_start_sync(false);
                progress = true;
            }
            if self.resync_step() {
                progress = true;
            }
            if self.verify_step() {
                progress = true;
            }
            if !progress {
                break;
            }
        }
    }

    /// Completes role changes and other steps that waited for a superblock write.
    fn superblock_waits_done(&mut self) -> bool {
        let mut progress = false;
        match self.role_change {
            Some(RoleChange::Activate(ticket)) if self.meta.superblock_durable(ticket) => {
                self.role_change = None;
                self.actions
                    .push_back(Action::RoleChanged { result: Ok(()) });
                self.send_state();
                progress = true;
            }
            Some(RoleChange::Deactivate(Some(ticket))) if self.meta.superblock_durable(ticket) => {
                self.role_change = None;
                self.actions
                    .push_back(Action::RoleChanged { result: Ok(()) });
                self.send_state();
                progress = true;
            }
            _ => {}
        }
        if self.peer_superblock_waits_done() {
            progress = true;
        }
        progress
    }

    /// Makes this disk active (Primary). Allowed for an UpToDate disk whose connected
    /// peer is not Primary, or — disconnected — only with `forced` (forced-permit: the
    /// data cannot be proven up to date; a new generation marked forced is made). The
    /// outcome arrives as `Action::RoleChanged` once the new role is durable.
    pub fn activate(&mut self, forced: bool, random: u64) -> Result<(), String> {
        if self.role() == Role::Primary {
            return Ok(());
        }
        if self.role_change.is_some() {
            return Err("a role change is already in progress".into());
        }
        if let Some(reason) = &self.failed {
            return Err(format!("the disk has failed: {reason}"));
        }
        let connected = self.link.as_ref().is_some_and(|c| c.is_replicating());
        if !connected && self.link.is_some() {
            // Not even forced: the connect decision (who copies to whom, or "in sync")
            // was made from the generations and role at link-up and is still to be
            // carried out; a forced generation now would make it copy over this node's
            // new writes, or leave them uncopied while both claim to be in sync.
            let why = self
                .connect_problem
                .clone()
                .unwrap_or_else(|| "the connection is still being set up".into());
            let way_out = if forced {
                "; forced-permit is refused while a connection exists: wait for it, or run                  `mirrorctl break` first and retry once the status shows no connection"
            } else {
                ""
            };
            return Err(format!(
                "the peer is connected but the mirror is not replicating ({why}){way_out}"
            ));
        }
        if connected {
            let peer = self.link.as_ref().expect("connected").peer;
            if peer.role == Role::Primary {
                return Err("the peer is active (Primary); deactivate it first".into());
            }
            if peer.intent == Role::Primary {
                return Err("the peer is being activated".into());
            }
            if self.disk_state != DiskState::UpToDate {
                return Err(format!(
                    "the disk is {:?}, not UpToDate: wait for the resync to finish",
                    self.disk_state
                ));
            }
            // The peer as last heard of may be stale (a link that died silently): the
            // role is written only once the peer confirms over the link.
            self.role_change = Some(RoleChange::Confirming {
                since_ms: self.now_ms,
            });
            self.send_state();
            self.pump();
            return Ok(());
        } else if !forced {
            let state = self.disk_state;
            return Err(format!(
                "the peer is not connected, so this disk ({state:?}) cannot be proven up to date; \
                 use forced-permit to activate it anyway"
            ));
        } else if self.disk_state == DiskState::Inconsistent {
            return Err("the disk is Inconsistent (a resync target that did not finish): refusing even forced activation".into());
        }
        self.commit_activation(forced, random);
        Ok(())
    }

    /// Writes the new role (and, `forced` while disconnected, the forced generation);
    /// `Action::RoleChanged` follows once it is durable.
    pub(super) fn commit_activation(&mut self, forced: bool, random: u64) {
        let connected = self.link.as_ref().is_some_and(|c| c.is_replicating());
        // WAS_PRIMARY and CRASHED_PRIMARY are "set while Primary": a node that goes
        // down without deactivating comes back with them (generation rule 40/41).
        // A pending `resolve --discard-local` is cancelled by any activation: it gave up
        // the changes made before, never the writes this node is about to acknowledge.
        if self
            .meta
            .superblock()
            .state
            .flags
            .contains(Flags::DISCARD_LOCAL)
        {
            self.connect_problem = None;
        }
        let ticket = self.meta.update_superblock(|s| {
            s.role = Role::Primary;
            s.flags.insert(Flags::WAS_PRIMARY);
            s.flags.insert(Flags::CRASHED_PRIMARY);
            s.flags.remove(Flags::DISCARD_LOCAL);
            if forced && !connected {
                super::generations::forced_permit(&mut s.generations, &mut s.flags, random);
                s.disk_state = DiskState::UpToDate;
            }
        });
        if forced && !connected {
            self.disk_state = DiskState::UpToDate;
            self.meta.set_mode(Mode::Broken, &[]);
        }
        self.role_change = Some(RoleChange::Activate(ticket));
        self.pump();
    }

    /// A connected activation ends without a new role: the peer refused it or the link
    /// went away before it confirmed.
    pub(super) fn abort_activation(&mut self, why: &str) {
        if let Some(RoleChange::Confirming { .. }) = self.role_change {
            self.role_change = None;
            self.actions.push_back(Action::RoleChanged {
                result: Err(format!("activation not confirmed by the peer: {why}")),
            });
            self.send_state();
        }
    }

    /// Makes this disk inactive (Secondary). The shell has already stopped the export
    /// and drained its requests; a final sync point makes everything durable on both
    /// sides first. The outcome arrives as `Action::RoleChanged`.
    pub fn deactivate(&mut self) -> Result<(), String> {
        if self.role() == Role::Secondary && self.role_change.is_none() {
            return Ok(());
        }
        if self.role_change.is_some() {
            return Err("a role change is already in progress".into());
        }
        if !self.requests.is_empty() {
            return Err("client requests are still in flight; stop the export first".into());
        }
        self.role_change = Some(RoleChange::Deactivate(None));
        self.maybe_start_sync(true);
        self.pump();
        self.finish_deactivate_if_synced();
        Ok(())
    }

    /// Once no sync point is outstanding and every answered write is covered by a
    /// completed one, the new role is written. A sync point already in flight when
    /// `deactivate` was called covers only the writes answered before it started: the
    /// rest need one more (found by the two-node simulation: writes answered meanwhile
    /// were lost in a power cut after a completed deactivation).
    pub(super) fn finish_deactivate_if_synced(&mut self) {
        if self.role_change == Some(RoleChange::Deactivate(None))
            && self.sync.is_none()
            && !self.unsynced.is_empty()
        {
            self.maybe_start_sync(true);
        }
        if self.role_change == Some(RoleChange::Deactivate(None)) && self.sync.is_none() {
            // A clean demotion: the marks that only hold while Primary go.
            let ticket = self.meta.update_superblock(|s| {
                s.role = Role::Secondary;
                s.flags.remove(Flags::WAS_PRIMARY);
                s.flags.remove(Flags::CRASHED_PRIMARY);
            });
            self.role_change = Some(RoleChange::Deactivate(Some(ticket)));
            self.pump();
        }
    }
}
