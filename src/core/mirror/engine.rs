//! The engine state machine: client requests in, disk/metadata actions and replies out.
//!
//! A modifying request (write, write-zeroes, trim) goes through these steps:
//!
//! 1. **Overlap**: it locks its block-aligned range; a later overlapping request waits
//!    until this one has been answered (DESIGN §5: overlapping writes keep their order).
//! 2. **Gate**: the metadata engine admits it once its region is covered by durable
//!    metadata (a hot activity-log extent, or in a break its journal bits).
//! 3. **Submit** to the local disk.
//! 4. **Acknowledge** when the local write completed *and* the metadata engine says the
//!    write is ackable (in a break: its journal block and every earlier one durable).
//! 5. **Sync point**: completed writes become durable with the next local flush; only
//!    then may their activity-log extents go cold. Sync points start when a client
//!    FLUSH asks, when writes wait for activity-log slots, or every
//!    `sync_interval_ms`.
//!
//! A client FLUSH is answered by the first sync point that *starts* after it arrived,
//! so it covers every write acknowledged before it, on any connection.

use std::collections::{HashMap, VecDeque};

use crate::core::meta::{
    self, Gate, IoError, MetaEngine, MetaError, MetaIo, MetaIoId, Mode, WriteId,
};
use crate::core::nbd::wire::Errno;
use crate::core::overlap::{Acquire, ByteRange, RangeLocks};

/// A client request, numbered by the engine; never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReqId(pub u64);

/// A local disk operation issued by the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DiskOpId(pub u64);

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
    fn modification(&self) -> Option<(ByteRange, bool)> {
        match *self {
            ClientOp::Write { range, fua }
            | ClientOp::WriteZeroes { range, fua, .. }
            | ClientOp::Trim { range, fua } => Some((range, fua)),
            ClientOp::Read { .. } | ClientOp::Flush | ClientOp::Cache { .. } => None,
        }
    }
}

/// Local disk operations have the shape of client operations: the shell's volume
/// executes them (read-modify-write, zeroing strategies); a write's payload is the
/// buffer of the request it belongs to.
pub type DiskOp = ClientOp;

/// What the shell must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run `op` on the local data partition; report with `handle_disk_done(id, ..)`.
    /// `req` names the client request whose buffer holds the data, if any.
    Disk {
        id: DiskOpId,
        req: Option<ReqId>,
        op: DiskOp,
    },
    /// Run a metadata I/O on the CLUSTER partition; report with `handle_meta_done`.
    Meta(MetaIo),
    /// Answer the client request (exactly once per `ReqId`). For a successful read,
    /// the data is what its disk read returned.
    Reply {
        req: ReqId,
        result: Result<(), Errno>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Modifying requests lock their range aligned out to this (the backing's logical
    /// block), so read-modify-write of a partial block is ordered with its neighbours.
    pub lock_alignment_bytes: u64,
    /// Longest time a completed write may wait for the sync point that makes it durable
    /// (and lets its activity-log extent go cold).
    pub sync_interval_ms: u64,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for an overlapping earlier request to finish.
    Locking,
    /// Waiting for the metadata engine to admit it.
    Gating,
    /// Issued to the disk (reads, cache, admitted writes).
    Submitted,
    /// A client FLUSH waiting for its sync point.
    Flushing,
}

#[derive(Debug)]
struct Request {
    op: ClientOp,
    phase: Phase,
    locked: bool,
    local_done: bool,
    /// The metadata engine's ack condition holds (always true once yielded).
    ackable: bool,
    error: Option<Errno>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DiskPurpose {
    Request(ReqId),
    Sync,
}

#[derive(Debug)]
struct SyncPoint {
    disk_op: DiskOpId,
    /// Writes that completed before the flush was issued: durable once it completes.
    covers: Vec<WriteId>,
    flushes: Vec<ReqId>,
}

/// The engine. See the module documentation for the rules it enforces.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    meta: MetaEngine,
    locks: RangeLocks,
    requests: HashMap<ReqId, Request>,
    next_req: u64,
    next_disk_op: u64,
    disk_ops: HashMap<DiskOpId, DiskPurpose>,
    actions: VecDeque<Action>,
    /// Writes answered but not yet covered by a completed sync point.
    unsynced: Vec<WriteId>,
    sync: Option<SyncPoint>,
    /// Client FLUSHes waiting for the next sync point to start.
    flush_waiters: Vec<ReqId>,
    now_ms: u64,
    last_sync_ms: u64,
    failed: Option<String>,
    stats: EngineStats,
}

fn meta_range(range: ByteRange) -> meta::ByteRange {
    meta::ByteRange::new(range.start(), range.length())
}

impl Engine {
    /// Wraps a created or recovered metadata engine. Any metadata I/O it needs before
    /// admitting writes (recovery writes a fresh snapshot) is queued at once.
    pub fn new(config: EngineConfig, meta: MetaEngine, now_ms: u64) -> Engine {
        assert!(config.lock_alignment_bytes.is_power_of_two());
        assert!(config.sync_interval_ms > 0);
        let mut engine = Engine {
            config,
            meta,
            locks: RangeLocks::new(),
            requests: HashMap::new(),
            next_req: 0,
            next_disk_op: 0,
            disk_ops: HashMap::new(),
            actions: VecDeque::new(),
            unsynced: Vec::new(),
            sync: None,
            flush_waiters: Vec::new(),
            now_ms,
            last_sync_ms: now_ms,
            failed: None,
            stats: EngineStats::default(),
        };
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

    /// Enters a mirror break: from now on every write sets its journal bits. With no
    /// peer there is no transfer log to mark.
    pub fn set_broken(&mut self) {
        self.meta.set_mode(Mode::Broken, &[]);
        self.pump();
    }

    /// The next action for the shell, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// A new client request. Its id comes back in exactly one `Action::Reply`.
    pub fn handle_client(&mut self, op: ClientOp) -> ReqId {
        let id = ReqId(self.next_req);
        self.next_req += 1;
        let request = Request {
            op,
            phase: Phase::Submitted,
            locked: false,
            local_done: false,
            ackable: false,
            error: None,
        };
        self.requests.insert(id, request);
        match op {
            ClientOp::Read { .. } | ClientOp::Cache { .. } => {
                self.stats.reads += 1;
                self.issue(DiskPurpose::Request(id), Some(id), op);
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

    /// A local disk operation finished (`Err` carries the errno as the client sees it).
    pub fn handle_disk_done(&mut self, id: DiskOpId, result: Result<(), Errno>) {
        let purpose = self
            .disk_ops
            .remove(&id)
            .expect("completion for an issued disk op");
        match purpose {
            DiskPurpose::Sync => self.sync_done(id, result),
            DiskPurpose::Request(req) => {
                let request = self
                    .requests
                    .get_mut(&req)
                    .expect("disk op of a live request");
                request.local_done = true;
                match request.op.modification() {
                    None => self.reply(req, result),
                    Some((_, fua)) => {
                        if let Err(errno) = result {
                            self.stats.errors += 1;
                            request.error = Some(errno);
                        }
                        // A FUA write is durable on completion; others wait for a sync point.
                        self.meta
                            .handle_write_done(WriteId(req.0), fua && result.is_ok());
                        self.maybe_complete(req);
                    }
                }
            }
        }
        self.pump();
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

    /// Time passes: starts the periodic sync point.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.now_ms = now_ms.max(self.now_ms);
        if self.now_ms.saturating_sub(self.last_sync_ms) >= self.config.sync_interval_ms {
            self.maybe_start_sync(false);
        }
        self.pump();
    }

    /// When the shell should next call `handle_timeout`.
    pub fn next_timeout_ms(&self) -> u64 {
        self.last_sync_ms + self.config.sync_interval_ms
    }

    fn issue(&mut self, purpose: DiskPurpose, req: Option<ReqId>, op: DiskOp) {
        let id = DiskOpId(self.next_disk_op);
        self.next_disk_op += 1;
        self.disk_ops.insert(id, purpose);
        self.actions.push_back(Action::Disk { id, req, op });
    }

    /// The request holds its range: ask the metadata engine whether it may start.
    fn gate(&mut self, req: ReqId) {
        let request = self.requests.get_mut(&req).expect("gating a live request");
        request.locked = true;
        let (range, _) = request.op.modification().expect("only writes are gated");
        request.phase = Phase::Gating;
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

    fn submit_write(&mut self, req: ReqId) {
        let request = self
            .requests
            .get_mut(&req)
            .expect("submitting a live request");
        assert_eq!(request.phase, Phase::Gating);
        request.phase = Phase::Submitted;
        let op = request.op;
        self.issue(DiskPurpose::Request(req), Some(req), op);
    }

    /// Answers a write once both halves of its acknowledgement condition hold.
    fn maybe_complete(&mut self, req: ReqId) {
        let Some(request) = self.requests.get(&req) else {
            return;
        };
        let ready = request.local_done && (request.ackable || request.error.is_some());
        if ready {
            self.finish_write(req);
        }
    }

    /// Replies to a write and releases its range, admitting whoever waited for it.
    fn finish_write(&mut self, req: ReqId) {
        let request = self.requests.get(&req).expect("finishing a live request");
        let result = request.error.map_or(Ok(()), Err);
        let (_, fua) = request.op.modification().expect("a write");
        let locked = request.locked;
        if result.is_ok() && !fua {
            self.unsynced.push(WriteId(req.0));
        }
        self.reply(req, result);
        if locked {
            let mut granted = Vec::new();
            self.locks.release(req.0, &mut granted);
            for waiter in granted {
                let waiter = ReqId(waiter);
                if self.failed.is_some() {
                    self.requests.get_mut(&waiter).expect("live").error = Some(Errno::Io);
                    self.requests.get_mut(&waiter).expect("live").locked = true;
                    self.finish_write(waiter);
                } else {
                    self.gate(waiter);
                }
            }
        }
    }

    fn reply(&mut self, req: ReqId, result: Result<(), Errno>) {
        let request = self.requests.remove(&req).expect("one reply per request");
        if result.is_err() && request.op.modification().is_none() {
            self.stats.errors += 1;
        }
        self.actions.push_back(Action::Reply { req, result });
    }

    /// Starts a sync point if none is in flight and one is useful. `forced`: a client
    /// FLUSH needs one even when no write is waiting to become durable.
    fn maybe_start_sync(&mut self, forced: bool) {
        if self.sync.is_some() {
            return;
        }
        if self.unsynced.is_empty() && self.flush_waiters.is_empty() && !forced {
            self.last_sync_ms = self.now_ms;
            return;
        }
        let id = DiskOpId(self.next_disk_op);
        self.next_disk_op += 1;
        self.disk_ops.insert(id, DiskPurpose::Sync);
        self.actions.push_back(Action::Disk {
            id,
            req: None,
            op: ClientOp::Flush,
        });
        self.sync = Some(SyncPoint {
            disk_op: id,
            covers: std::mem::take(&mut self.unsynced),
            flushes: std::mem::take(&mut self.flush_waiters),
        });
        self.last_sync_ms = self.now_ms;
        self.stats.sync_points += 1;
    }

    fn sync_done(&mut self, id: DiskOpId, result: Result<(), Errno>) {
        let sync = self.sync.take().expect("a sync point is in flight");
        assert_eq!(sync.disk_op, id);
        match result {
            Ok(()) => {
                for write in sync.covers {
                    self.meta.handle_write_durable(write);
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
    }

    fn fail(&mut self, error: MetaError) {
        self.fail_with(error.to_string());
    }

    /// Fails the disk: every write not yet on the disk is answered EIO; writes already
    /// submitted are answered EIO when their disk op returns.
    fn fail_with(&mut self, reason: String) {
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
                // Still holding nothing: answer now; its range was never locked.
                Phase::Locking => {}
                Phase::Gating => self.finish_write(req),
                Phase::Submitted => self.maybe_complete(req),
                Phase::Flushing => unreachable!("flushes are not modifications"),
            }
        }
    }

    /// Moves metadata engine outputs into actions until nothing changes.
    fn pump(&mut self) {
        loop {
            let mut progress = false;
            while let Some(id) = self.meta.poll_ready() {
                progress = true;
                let req = ReqId(id.0);
                if self
                    .requests
                    .get(&req)
                    .is_some_and(|r| r.phase == Phase::Gating)
                {
                    self.submit_write(req);
                }
            }
            while let Some(id) = self.meta.poll_ackable() {
                progress = true;
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
            // Writes waiting for activity-log slots wait for the sync point that lets
            // completed writes' extents go cold: start it now rather than at the timer.
            if self.sync.is_none() && !self.unsynced.is_empty() && self.meta.writes_waiting_al() > 0
            {
                self.maybe_start_sync(false);
                progress = true;
            }
            if !progress {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::meta::{CreateParams, MetaIoKind};

    const MIB: u64 = 1 << 20;

    /// Drives an engine: metadata I/O completes at once against an in-memory area;
    /// disk ops are held until the test completes them, so it controls interleavings.
    struct Harness {
        engine: Engine,
        area: Vec<u8>,
        disk: Vec<(DiskOpId, Option<ReqId>, DiskOp)>,
        replies: Vec<(ReqId, Result<(), Errno>)>,
        fail_meta: bool,
    }

    impl Harness {
        fn new(al_slots: u32) -> Harness {
            let mut params = CreateParams::new([7; 16], "t", 1, 2, 256 * MIB);
            params.al_slot_count = al_slots;
            let (meta, image) = MetaEngine::create(&params).expect("valid params");
            let area = image.to_bytes(meta.layout().cluster_bytes);
            let config = EngineConfig {
                lock_alignment_bytes: 4096,
                sync_interval_ms: 1000,
            };
            let mut h = Harness {
                engine: Engine::new(config, meta, 0),
                area,
                disk: Vec::new(),
                replies: Vec::new(),
                fail_meta: false,
            };
            h.run();
            h
        }

        fn run(&mut self) {
            while let Some(action) = self.engine.poll_action() {
                match action {
                    Action::Meta(io) => {
                        if let MetaIoKind::Write { offset, bytes } = &io.kind {
                            let at = *offset as usize;
                            self.area[at..at + bytes.len()].copy_from_slice(bytes);
                        }
                        let result = if self.fail_meta {
                            Err(libc_eio())
                        } else {
                            Ok(())
                        };
                        self.engine.handle_meta_done(io.id, result);
                    }
                    Action::Disk { id, req, op } => self.disk.push((id, req, op)),
                    Action::Reply { req, result } => self.replies.push((req, result)),
                }
            }
        }

        fn client(&mut self, op: ClientOp) -> ReqId {
            let id = self.engine.handle_client(op);
            self.run();
            id
        }

        /// Completes every held disk op (oldest first), repeatedly, until none is left.
        fn complete_disk(&mut self) {
            while !self.disk.is_empty() {
                let (id, _, _) = self.disk.remove(0);
                self.engine.handle_disk_done(id, Ok(()));
                self.run();
            }
        }

        fn reply_of(&self, req: ReqId) -> Option<Result<(), Errno>> {
            self.replies
                .iter()
                .find(|(r, _)| *r == req)
                .map(|(_, result)| *result)
        }

        fn disk_writes_for(&self, req: ReqId) -> usize {
            self.disk.iter().filter(|(_, r, _)| *r == Some(req)).count()
        }
    }

    fn libc_eio() -> i32 {
        5
    }

    fn write(offset: u64, length: u64) -> ClientOp {
        ClientOp::Write {
            range: ByteRange::new(offset, length).unwrap(),
            fua: false,
        }
    }

    #[test]
    fn write_is_answered_after_its_disk_write() {
        let mut h = Harness::new(64);
        let w = h.client(write(0, 4096));
        assert_eq!(
            h.disk_writes_for(w),
            1,
            "admitted once the AL record is durable"
        );
        assert_eq!(h.reply_of(w), None);
        h.complete_disk();
        assert_eq!(h.reply_of(w), Some(Ok(())));
    }

    #[test]
    fn overlapping_write_waits_for_the_earlier_one() {
        let mut h = Harness::new(64);
        let first = h.client(write(0, 8192));
        let second = h.client(write(4096, 4096));
        let unrelated = h.client(write(MIB, 4096));
        assert_eq!(h.disk_writes_for(first), 1);
        assert_eq!(h.disk_writes_for(second), 0, "overlaps an unanswered write");
        assert_eq!(h.disk_writes_for(unrelated), 1);
        h.complete_disk();
        assert_eq!(h.reply_of(first), Some(Ok(())));
        assert_eq!(h.reply_of(second), Some(Ok(())));
        let first_at = h.replies.iter().position(|(r, _)| *r == first).unwrap();
        let second_at = h.replies.iter().position(|(r, _)| *r == second).unwrap();
        assert!(first_at < second_at);
    }

    #[test]
    fn unaligned_writes_in_one_block_are_serialised() {
        let mut h = Harness::new(64);
        let a = h.client(write(0, 512));
        let b = h.client(write(1024, 512));
        assert_eq!(h.disk_writes_for(a), 1);
        assert_eq!(
            h.disk_writes_for(b),
            0,
            "same 4 KiB block: read-modify-write must not race"
        );
        h.complete_disk();
        assert_eq!(h.reply_of(b), Some(Ok(())));
    }

    #[test]
    fn flush_is_answered_by_a_sync_point_started_after_it() {
        let mut h = Harness::new(64);
        let w = h.client(write(0, 4096));
        h.complete_disk();
        assert_eq!(h.reply_of(w), Some(Ok(())));
        let f = h.client(ClientOp::Flush);
        let flushes: Vec<_> = h
            .disk
            .iter()
            .filter(|(_, req, op)| req.is_none() && *op == ClientOp::Flush)
            .collect();
        assert_eq!(flushes.len(), 1, "the flush starts a sync point");
        // A second FLUSH while the first sync point is in flight needs a new one.
        let g = h.client(ClientOp::Flush);
        h.engine.handle_disk_done(h.disk[0].0, Ok(()));
        h.disk.remove(0);
        h.run();
        assert_eq!(h.reply_of(f), Some(Ok(())));
        assert_eq!(
            h.reply_of(g),
            None,
            "g arrived after the first flush was issued"
        );
        h.complete_disk();
        assert_eq!(h.reply_of(g), Some(Ok(())));
    }

    #[test]
    fn broken_mode_answers_only_after_the_journal_is_durable() {
        let mut h = Harness::new(64);
        h.engine.set_broken();
        h.run();
        let w = h.engine.handle_client(write(8 * MIB, 4096));
        // Do not run metadata I/O yet: the write must not be submitted (cold extent) nor
        // answered before its journal block is durable.
        let mut held_meta = Vec::new();
        while let Some(action) = h.engine.poll_action() {
            match action {
                Action::Meta(io) => held_meta.push(io),
                Action::Disk { id, req, op } => h.disk.push((id, req, op)),
                Action::Reply { req, result } => h.replies.push((req, result)),
            }
        }
        assert_eq!(
            h.disk_writes_for(w),
            0,
            "cold extent waits for its journal bits"
        );
        assert!(!held_meta.is_empty());
        for io in held_meta {
            if let MetaIoKind::Write { offset, bytes } = &io.kind {
                let at = *offset as usize;
                h.area[at..at + bytes.len()].copy_from_slice(bytes);
            }
            h.engine.handle_meta_done(io.id, Ok(()));
            h.run();
        }
        assert_eq!(h.disk_writes_for(w), 1);
        h.complete_disk();
        assert_eq!(h.reply_of(w), Some(Ok(())));
        assert!(h.engine.meta().stats().dirty_regions >= 1);
    }

    #[test]
    fn writes_waiting_for_activity_log_slots_start_a_sync_point() {
        // Few slots, writes to distinct extents: without sync points started on
        // pressure, the writes past the slot count would wait for the timer.
        let slots = crate::core::meta::AL_SLOT_COUNT_MIN;
        let mut h = Harness::new(slots);
        let extent = 4 * MIB;
        let mut ids = Vec::new();
        for i in 0..(slots as u64 * 3) {
            ids.push(h.client(write(i * extent, 4096)));
            h.complete_disk();
        }
        for id in ids {
            assert_eq!(
                h.reply_of(id),
                Some(Ok(())),
                "never stuck behind a full activity log"
            );
        }
        assert!(h.engine.stats().sync_points > 0);
    }

    #[test]
    fn periodic_sync_point_on_timeout() {
        let mut h = Harness::new(64);
        let w = h.client(write(0, 4096));
        h.complete_disk();
        assert_eq!(h.reply_of(w), Some(Ok(())));
        h.engine.handle_timeout(999);
        h.run();
        assert!(h.disk.is_empty(), "not yet due");
        h.engine.handle_timeout(1000);
        h.run();
        assert_eq!(h.disk.len(), 1, "sync point due");
        h.complete_disk();
        assert_eq!(h.engine.stats().sync_points, 1);
    }

    #[test]
    fn read_passes_through_without_locking() {
        let mut h = Harness::new(64);
        let w = h.client(write(0, 4096));
        let r = h.client(ClientOp::Read {
            range: ByteRange::new(0, 4096).unwrap(),
        });
        assert_eq!(
            h.disk_writes_for(r),
            1,
            "reads are not ordered against writes"
        );
        h.complete_disk();
        assert_eq!(h.reply_of(r), Some(Ok(())));
        assert_eq!(h.reply_of(w), Some(Ok(())));
    }

    #[test]
    fn disk_error_is_reported_and_other_writes_continue() {
        let mut h = Harness::new(64);
        let w = h.client(write(0, 4096));
        let (id, _, _) = h.disk.remove(0);
        h.engine.handle_disk_done(id, Err(Errno::Io));
        h.run();
        assert_eq!(h.reply_of(w), Some(Err(Errno::Io)));
    }

    #[test]
    fn metadata_failure_fails_pending_and_new_writes() {
        let mut h = Harness::new(64);
        h.fail_meta = true;
        h.engine.set_broken();
        h.run();
        let w = h.client(write(0, 4096));
        h.complete_disk();
        assert_eq!(h.reply_of(w), Some(Err(Errno::Io)));
        assert!(h.engine.failure().is_some());
        let later = h.client(write(MIB, 4096));
        assert_eq!(h.reply_of(later), Some(Err(Errno::Io)));
    }

    #[test]
    fn every_request_gets_exactly_one_reply() {
        let mut h = Harness::new(16);
        let mut ids = Vec::new();
        for i in 0..200u64 {
            let op = match i % 5 {
                0 => ClientOp::Flush,
                1 => ClientOp::Read {
                    range: ByteRange::new((i % 7) * 4096, 4096).unwrap(),
                },
                _ => write(((i * 7919) % 64) * MIB / 2, 4096 * (1 + i % 3)),
            };
            ids.push(h.client(op));
            if i % 3 == 0 {
                h.complete_disk();
            }
        }
        h.complete_disk();
        for id in &ids {
            let count = h.replies.iter().filter(|(r, _)| r == id).count();
            assert_eq!(count, 1, "request {id:?}");
        }
        assert_eq!(h.engine.stats().requests_in_flight, 0);
    }
}
