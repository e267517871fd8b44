//! The metadata engine: gates data writes on durable metadata and orders metadata I/O.
//!
//! Sans-IO in the quinn style: inputs are `handle_*` calls, outputs are `poll_*`. The
//! shell executes every [`MetaIo`] (a write at an offset of the CLUSTER partition, or a
//! flush of the metadata device) and reports its completion with
//! [`MetaEngine::handle_io_done`]. A metadata write counts as durable only when a flush
//! issued after the write completed has completed; the engine issues those flushes.
//!
//! Write-path rules (docs/on-disk-format.md §Write path):
//! - Connected: writes set no bits. A write is submitted (locally or to the peer) only
//!   once every extent it touches is durably hot in the activity log; misses are
//!   group-committed into one AL record. It pins its extents until the caller says it is
//!   durable on both sides.
//! - Broken: every write logs its regions as dirty. It is submitted once its regions are
//!   covered by durable metadata: its extents already durably hot (submitted at once, the
//!   journal write runs in parallel, the extents stay pinned until the bits are durable),
//!   or else its bits durable in the journal (a cold write waits for one journal flush,
//!   not an AL transaction and then a journal flush). It is acknowledgeable only when its
//!   bits are in a durable log block and every earlier block is durable.
//! - Switch to Broken: every range the peer has not durably acknowledged, and every
//!   write still tracked, is logged dirty; nothing is acknowledged until that is durable.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rustc_hash::FxHashMap;
use std::ops::RangeInclusive;

use roaring::RoaringBitmap;

use super::activity_log::{self, ActivityLog, AlDecodeError};
use super::generation::{DiskState, Flags, Generations, Role};
use super::journal::{Journal, JournalCounters, JournalRecoveryError, ReplayReport, Ticket};
use super::journal_log::JournalOp;
use super::layout::{Area, CreateError, CreateParams, Layout};
use super::superblock::{
    self, CopyCondition, CopyId, Identity, PickError, Superblock, SuperblockState,
};
use super::{ByteRange, META_BLOCK_BYTES, RegionRange};

/// The caller's identifier of one data write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WriteId(pub u64);

/// Identifier of one metadata I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MetaIoId(pub u64);

/// One metadata I/O for the shell to execute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaIo {
    pub id: MetaIoId,
    pub kind: MetaIoKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaIoKind {
    /// Write `bytes` (a multiple of 4 KiB) at `offset` of the CLUSTER partition.
    Write { offset: u64, bytes: Vec<u8> },
    /// Make every completed write durable (fdatasync of the metadata device).
    Flush,
}

/// A failed metadata I/O, as the shell saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoError {
    pub errno: i32,
}

/// A metadata failure: the disk must be failed (detached); the engine accepts no more work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaError {
    Io { id: MetaIoId, error: IoError },
}

impl std::fmt::Display for MetaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetaError::Io { id, error } => {
                write!(
                    f,
                    "metadata I/O {} failed (errno {}): the disk is failed",
                    id.0, error.errno
                )
            }
        }
    }
}

impl std::error::Error for MetaError {}

/// The answer to `handle_write_start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Submit the write now (locally and to the peer).
    Submit,
    /// Wait: `poll_ready` yields the id when it may be submitted.
    Wait,
    /// The metadata has failed; fail the write.
    Failed,
}

/// Whether the peer is present.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Mode {
    Connected,
    Broken,
}

/// Ticket of a superblock update; durable when `superblock_durable` says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SuperblockTicket(pub u64);

/// Why recovery refuses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecoveryError {
    Superblock(PickError),
    /// The image handed in is shorter than the CLUSTER partition the superblock names.
    AreaTooShort {
        needed: u64,
        got: u64,
    },
    /// Neither activity-log record is valid: the hot extents are unknown.
    ActivityLogLost {
        conditions: [AlDecodeError; 2],
    },
    Journal(JournalRecoveryError),
}

impl std::fmt::Display for RecoveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecoveryError::Superblock(e) => e.fmt(f),
            RecoveryError::AreaTooShort { needed, got } => {
                write!(
                    f,
                    "CLUSTER partition image is {got} bytes, the superblock names {needed}"
                )
            }
            RecoveryError::ActivityLogLost { conditions } => write!(
                f,
                "both activity-log records are unusable ({:?}, {:?}); a full resync is required",
                conditions[0], conditions[1]
            ),
            RecoveryError::Journal(JournalRecoveryError::NoValidSnapshot { conditions }) => write!(
                f,
                "both bitmap snapshot slots are unusable ({:?}, {:?}); a full resync is required",
                conditions[0], conditions[1]
            ),
            RecoveryError::Journal(JournalRecoveryError::DurableMetadataLost { detail }) => write!(
                f,
                "bitmap journal damaged after it was written ({detail}); a full resync is required"
            ),
        }
    }
}

impl std::error::Error for RecoveryError {}

/// What recovery found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryReport {
    pub superblock_copy: CopyId,
    pub superblock_conditions: [CopyCondition; 2],
    pub al_slot: usize,
    pub al_sequence: u64,
    pub al_hot_extents: u64,
    pub replay: ReplayReport,
    /// Dirty regions from the journal alone, and after merging the hot extents.
    pub journal_dirty_regions: u64,
    pub dirty_regions: u64,
}

/// Counters and gauges for status output.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct MetaStats {
    pub dirty_regions: u64,
    pub dirty_bytes: u64,
    pub journal_fill: f64,
    pub journal_epoch: u64,
    pub journal: JournalCounters,
    pub al_transactions: u64,
    pub al_hot_extents: u64,
    pub writes_tracked: u64,
    pub writes_waiting_al: u64,
    pub writes_waiting_journal: u64,
    pub flushes: u64,
}

/// The first image `create` writes. Order for the shell: zero `zero` areas and write
/// `body`, flush, then write `superblocks`, flush — so a crash during create leaves no
/// superblock pointing at an unwritten journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateImage {
    pub zero: Vec<Area>,
    pub body: Vec<(u64, Vec<u8>)>,
    pub superblocks: Vec<(u64, Vec<u8>)>,
}

impl CreateImage {
    /// The whole CLUSTER partition as bytes (tests, golden images, small devices).
    pub fn to_bytes(&self, cluster_bytes: u64) -> Vec<u8> {
        let mut area = vec![0u8; cluster_bytes as usize];
        for (offset, bytes) in self.body.iter().chain(&self.superblocks) {
            area[*offset as usize..*offset as usize + bytes.len()].copy_from_slice(bytes);
        }
        area
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    Superblock { version: u64 },
    ActivityLog { sequence: u64 },
    Journal { sequence: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// Covered by the AL (set no bits).
    Connected,
    /// Covered by journal bits.
    Broken,
}

/// Where a write is on its way to `poll_ackable`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ack {
    /// Its metadata condition does not hold yet.
    NotYet,
    /// Condition holds; waiting for the ack barrier of a switch to Broken.
    Held,
    /// In the `ackable` queue.
    Queued,
    /// Yielded by `poll_ackable` (since the last switch to Broken).
    Yielded,
}

#[derive(Clone, Debug)]
struct Tracked {
    regions: RegionRange,
    extents: RangeInclusive<u32>,
    class: Class,
    submitted: bool,
    pinned: bool,
    /// Bits logged and not yet known durable.
    journal_ticket: Option<Ticket>,
    ack: Ack,
    done: bool,
}

/// The superblock writer: one copy write in flight, the next only after it is durable.
#[derive(Debug)]
struct SuperblockWriter {
    superblock: Superblock,
    next_copy: CopyId,
    /// Bumped by every update; `durable_version` trails it.
    version: u64,
    durable_version: u64,
    in_flight: Option<u64>,
}

/// The metadata engine of one disk.
#[derive(Debug)]
pub struct MetaEngine {
    layout: Layout,
    uuid: [u8; 16],
    mode: Mode,
    failed: bool,
    /// False after recovery until the first snapshot (which makes the merged hot
    /// extents durable) is durable: until then every write waits.
    open: bool,
    sb: SuperblockWriter,
    al: ActivityLog,
    journal: Journal,
    writes: BTreeMap<WriteId, Tracked>,
    deferred: VecDeque<WriteId>,
    al_waiting: VecDeque<WriteId>,
    journal_waiting: BTreeSet<(Ticket, WriteId)>,
    /// No ack is emitted before this ticket is durable (set on a switch to Broken).
    ack_barrier: Ticket,
    ack_held: Vec<WriteId>,
    ready: VecDeque<WriteId>,
    ackable: VecDeque<WriteId>,
    out: VecDeque<MetaIo>,
    next_io_id: u64,
    writes_in_flight: FxHashMap<MetaIoId, Purpose>,
    completed_unflushed: Vec<Purpose>,
    flush_in_flight: Option<(MetaIoId, Vec<Purpose>)>,
    flushes: u64,
    /// A clean stop asked for an activity-log record without the unpinned extents.
    cool_requested: bool,
}

impl MetaEngine {
    /// Validates `params` and returns the engine plus the image to write. Generation
    /// "just created", state Inconsistent, role Secondary, full sync required.
    pub fn create(params: &CreateParams) -> Result<(MetaEngine, CreateImage), CreateError> {
        let layout = params.validate()?;
        let identity = Identity {
            mirror_uuid: params.mirror_uuid,
            node_id: params.node_id,
            peer_node_id: params.peer_node_id,
        };
        let mut sb = Superblock {
            sequence: 1,
            identity,
            name: params.name.clone(),
            layout,
            state: SuperblockState {
                generations: Generations::just_created(),
                disk_state: DiskState::Inconsistent,
                role: Role::Secondary,
                flags: Flags::FULL_SYNC_REQUIRED,
            },
        };
        let sb_a = sb.encode();
        sb.sequence = 2;
        let sb_b = sb.encode();
        let uuid = params.mirror_uuid;
        let al_record = activity_log::encode(
            &uuid,
            layout.al_slot_count,
            &activity_log::AlRecord {
                sequence: 1,
                extents: Vec::new(),
            },
        );
        let record_bytes = layout.al_record_bytes();
        let image = CreateImage {
            zero: vec![
                Area {
                    offset: layout.al.offset + record_bytes,
                    size: record_bytes,
                },
                Area {
                    offset: layout.snapshot_b.offset,
                    size: META_BLOCK_BYTES,
                },
                layout.log,
            ],
            body: vec![
                (layout.al.offset, al_record),
                (
                    layout.snapshot_a.offset,
                    Journal::initial_snapshot(&uuid, &layout),
                ),
            ],
            superblocks: vec![(CopyId::A.offset(), sb_a), (CopyId::B.offset(), sb_b)],
        };
        let engine = MetaEngine::new(
            SuperblockWriter {
                superblock: sb,
                next_copy: CopyId::A,
                version: 0,
                durable_version: 0,
                in_flight: None,
            },
            ActivityLog::created(layout.al_slot_count),
            Journal::created(uuid, layout),
            true,
        );
        Ok((engine, image))
    }

    fn new(sb: SuperblockWriter, al: ActivityLog, journal: Journal, open: bool) -> MetaEngine {
        MetaEngine {
            layout: sb.superblock.layout,
            uuid: sb.superblock.identity.mirror_uuid,
            mode: Mode::Connected,
            failed: false,
            open,
            sb,
            al,
            journal,
            writes: BTreeMap::new(),
            deferred: VecDeque::new(),
            al_waiting: VecDeque::new(),
            journal_waiting: BTreeSet::new(),
            ack_barrier: Ticket(0),
            ack_held: Vec::new(),
            ready: VecDeque::new(),
            ackable: VecDeque::new(),
            out: VecDeque::new(),
            next_io_id: 1,
            writes_in_flight: FxHashMap::default(),
            completed_unflushed: Vec::new(),
            flush_in_flight: None,
            flushes: 0,
            cool_requested: false,
        }
    }

    /// Recovers from the whole CLUSTER partition image. Picks the superblock, the newest
    /// AL record and the newest snapshot, replays the log, and adds every hot extent to
    /// the dirty set. The engine then writes a snapshot (new epoch) before it admits any
    /// write; `mode` starts Connected — the caller sets Broken when the peer is away.
    pub fn recover(
        area: &[u8],
        expected: Option<&Identity>,
    ) -> Result<(MetaEngine, RecoveryReport), RecoveryError> {
        let block = META_BLOCK_BYTES as usize;
        if area.len() < 2 * block {
            return Err(RecoveryError::AreaTooShort {
                needed: 2 * META_BLOCK_BYTES,
                got: area.len() as u64,
            });
        }
        let picked = superblock::pick(&area[..block], &area[block..2 * block], expected)
            .map_err(RecoveryError::Superblock)?;
        let sb = picked.superblock.clone();
        let layout = sb.layout;
        if (area.len() as u64) < layout.cluster_bytes {
            return Err(RecoveryError::AreaTooShort {
                needed: layout.cluster_bytes,
                got: area.len() as u64,
            });
        }
        let uuid = sb.identity.mirror_uuid;
        let record_bytes = layout.al_record_bytes() as usize;
        let al_base = layout.al.offset as usize;
        let al_slots = [
            &area[al_base..al_base + record_bytes],
            &area[al_base + record_bytes..al_base + 2 * record_bytes],
        ];
        let al_picked =
            activity_log::pick(al_slots, &uuid, layout.al_slot_count, layout.extent_count())
                .map_err(|conditions| RecoveryError::ActivityLogLost { conditions })?;
        let (mut journal, replay) =
            Journal::recover(area, uuid, layout).map_err(RecoveryError::Journal)?;
        let journal_dirty_regions = journal.bitmap().len();
        let per_extent = layout.regions_per_extent();
        for &e in &al_picked.record.extents {
            let start = u64::from(e) * per_extent;
            let end = (start + per_extent).min(layout.region_count());
            journal.insert_unlogged(RegionRange {
                start: start as u32,
                end,
            });
        }
        let report = RecoveryReport {
            superblock_copy: picked.copy,
            superblock_conditions: picked.conditions.clone(),
            al_slot: al_picked.slot,
            al_sequence: al_picked.record.sequence,
            al_hot_extents: al_picked.record.extents.len() as u64,
            replay,
            journal_dirty_regions,
            dirty_regions: journal.bitmap().len(),
        };
        let writer = SuperblockWriter {
            next_copy: picked.copy.other(),
            superblock: sb,
            version: 0,
            durable_version: 0,
            in_flight: None,
        };
        let al = ActivityLog::recovered(layout.al_slot_count, al_picked.slot, &al_picked.record);
        Ok((MetaEngine::new(writer, al, journal, false), report))
    }

    // ----------------------------------------------------------------------------
    // Getters.
    // ----------------------------------------------------------------------------

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb.superblock
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// Whether writes are admitted (false until the post-recovery snapshot is durable).
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// The in-memory dirty bitmap (a superset of the durable one, minus clears not yet durable).
    /// Writes waiting for activity-log slots (they need completed writes' extents to go
    /// cold: a sync point helps them).
    pub fn writes_waiting_al(&self) -> usize {
        self.al_waiting.len()
    }

    pub fn dirty_bitmap(&self) -> &RoaringBitmap {
        self.journal.bitmap()
    }

    pub fn hot_extents(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.al.hot_extents().collect();
        v.sort_unstable();
        v
    }

    pub fn stats(&self) -> MetaStats {
        let bitmap = self.journal.bitmap();
        MetaStats {
            dirty_regions: bitmap.len(),
            dirty_bytes: dirty_bytes(bitmap, &self.layout),
            journal_fill: self.journal.fill(),
            journal_epoch: self.journal.epoch(),
            journal: self.journal.counters(),
            al_transactions: self.al.transactions(),
            al_hot_extents: self.al.hot_count() as u64,
            writes_tracked: self.writes.len() as u64,
            writes_waiting_al: self.al_waiting.len() as u64,
            writes_waiting_journal: self.journal_waiting.len() as u64,
            flushes: self.flushes,
        }
    }

    // ----------------------------------------------------------------------------
    // Data writes.
    // ----------------------------------------------------------------------------

    fn regions_of(&self, range: ByteRange) -> RegionRange {
        assert!(
            range.length > 0 && range.end() <= self.layout.data_bytes,
            "write outside the data partition"
        );
        let g = u64::from(self.layout.granularity_bytes);
        RegionRange {
            start: (range.offset / g) as u32,
            end: range.end().div_ceil(g),
        }
    }

    fn extents_of(&self, range: ByteRange) -> RangeInclusive<u32> {
        let e = u64::from(self.layout.al_extent_bytes);
        let extents = (range.offset / e) as u32..=((range.end() - 1) / e) as u32;
        assert!(
            extents.clone().count() <= self.al.slot_count() as usize,
            "write spans more extents than AL slots"
        );
        extents
    }

    /// A data write wants to start. Every started write must later get exactly one
    /// `handle_write_done`.
    pub fn handle_write_start(&mut self, id: WriteId, range: ByteRange) -> Gate {
        if self.failed {
            return Gate::Failed;
        }
        let tracked = Tracked {
            regions: self.regions_of(range),
            extents: self.extents_of(range),
            class: match self.mode {
                Mode::Connected => Class::Connected,
                Mode::Broken => Class::Broken,
            },
            submitted: false,
            pinned: false,
            journal_ticket: None,
            ack: Ack::NotYet,
            done: false,
        };
        assert!(
            self.writes.insert(id, tracked).is_none(),
            "write id reused while tracked"
        );
        if !self.open {
            self.deferred.push_back(id);
            return Gate::Wait;
        }
        if self.admit(id) {
            Gate::Submit
        } else {
            Gate::Wait
        }
    }

    /// Runs the gate for a tracked, not yet submitted write. Returns true if it may be
    /// submitted now (the caller learns it from the return value or from `poll_ready`).
    fn admit(&mut self, id: WriteId) -> bool {
        let w = self.writes.get(&id).expect("tracked").clone();
        match w.class {
            Class::Connected => {
                if self.al.all_durably_hot(w.extents.clone()) {
                    self.al.pin(w.extents.clone());
                    self.al.touch(w.extents.clone());
                    let t = self.writes.get_mut(&id).expect("tracked");
                    t.pinned = true;
                    t.submitted = true;
                    self.emit_ack(id);
                    true
                } else {
                    self.al_waiting.push_back(id);
                    self.try_al_transaction();
                    false
                }
            }
            Class::Broken => {
                let ticket = self.journal.append(JournalOp::Set, w.regions);
                if self.journal.is_durable(ticket) {
                    self.writes.get_mut(&id).expect("tracked").submitted = true;
                    self.emit_ack(id);
                    return true;
                }
                let hot = self.al.all_durably_hot(w.extents.clone());
                if hot {
                    // Already covered by the durable AL: submit now, journal in parallel,
                    // keep the extents hot until the bits are durable.
                    self.al.pin(w.extents.clone());
                    self.al.touch(w.extents.clone());
                }
                let t = self.writes.get_mut(&id).expect("tracked");
                t.pinned = hot;
                t.submitted = hot;
                t.journal_ticket = Some(ticket);
                self.journal_waiting.insert((ticket, id));
                hot
            }
        }
    }

    /// The local data write completed. `durable_everywhere`: it is durable on both sides
    /// (Connected) — otherwise call `handle_write_durable` when it is. Broken-mode writes
    /// need nothing more: their journal bits release them.
    pub fn handle_write_done(&mut self, id: WriteId, durable_everywhere: bool) {
        let w = self.writes.get_mut(&id).expect("done for an unknown write");
        assert!(w.submitted, "done before the write was allowed to start");
        assert!(!w.done, "write done twice");
        w.done = true;
        if durable_everywhere {
            self.handle_write_durable(id);
        } else {
            self.maybe_forget(id);
        }
    }

    /// The write is durable on both sides: its extents may leave the hot set.
    pub fn handle_write_durable(&mut self, id: WriteId) {
        let Some(w) = self.writes.get_mut(&id) else {
            return;
        };
        if w.pinned && w.class == Class::Connected {
            w.pinned = false;
            let extents = w.extents.clone();
            self.al.unpin(extents);
            self.try_al_transaction();
        }
        self.maybe_forget(id);
    }

    fn maybe_forget(&mut self, id: WriteId) {
        let w = &self.writes[&id];
        if w.done && !w.pinned && w.journal_ticket.is_none() && w.ack == Ack::Yielded {
            self.writes.remove(&id);
        }
    }

    fn emit_ack(&mut self, id: WriteId) {
        let w = self.writes.get_mut(&id).expect("tracked");
        assert_eq!(w.ack, Ack::NotYet);
        if self.journal.is_durable(self.ack_barrier) {
            w.ack = Ack::Queued;
            self.ackable.push_back(id);
        } else {
            w.ack = Ack::Held;
            self.ack_held.push(id);
        }
    }

    /// Writes that may now be submitted (after `Gate::Wait`).
    pub fn poll_ready(&mut self) -> Option<WriteId> {
        self.ready.pop_front()
    }

    /// Writes whose metadata condition for acknowledgement holds. The caller acks a write
    /// when this has yielded it (since the last switch to Broken) and its data is durable
    /// where the protocol requires.
    pub fn poll_ackable(&mut self) -> Option<WriteId> {
        let id = self.ackable.pop_front()?;
        let w = self
            .writes
            .get_mut(&id)
            .expect("queued writes stay tracked");
        assert_eq!(w.ack, Ack::Queued);
        w.ack = Ack::Yielded;
        self.maybe_forget(id);
        Some(id)
    }

    // ----------------------------------------------------------------------------
    // Modes and explicit bitmap changes.
    // ----------------------------------------------------------------------------

    /// Switches mode. On a switch to Broken, `unacked` are the ranges of every write the
    /// peer has not durably acknowledged (the transfer log): they and every tracked write
    /// are logged dirty, and no write is acknowledged before that is durable.
    pub fn set_mode(&mut self, mode: Mode, unacked: &[ByteRange]) {
        self.mode = mode;
        if mode == Mode::Connected {
            return;
        }
        let mut barrier = self.journal.durable_ticket();
        for r in unacked {
            if r.length > 0 {
                let regions = self.regions_of(*r);
                barrier = barrier.max(self.journal.append(JournalOp::Set, regions));
            }
        }
        let connected: Vec<WriteId> = self
            .writes
            .iter()
            .filter(|(id, w)| w.class == Class::Connected && !self.deferred.contains(id))
            .map(|(id, _)| *id)
            .collect();
        self.al_waiting.retain(|id| !connected.contains(id));
        for id in connected {
            let regions = self.writes[&id].regions;
            let ticket = self.journal.append(JournalOp::Set, regions);
            barrier = barrier.max(ticket);
            let w = self.writes.get_mut(&id).expect("tracked");
            w.class = Class::Broken;
            w.ack = Ack::NotYet;
            if let Some(old) = w.journal_ticket.replace(ticket) {
                self.journal_waiting.remove(&(old, id));
            }
            self.journal_waiting.insert((ticket, id));
        }
        // Deferred (not yet admitted) writes are gated under Broken rules when admitted.
        for id in self.deferred.iter() {
            self.writes.get_mut(id).expect("tracked").class = Class::Broken;
        }
        // Writes already acknowledgeable wait for the barrier too, and are yielded again
        // once it is durable: the caller forgets earlier yields at a switch to Broken.
        // That includes writes yielded already and still tracked (a Broken-class write
        // whose data write has not completed, from an earlier break): without a second
        // yield the caller would never acknowledge them (found by the two-node
        // simulation). Converted writes are re-yielded when their new bits are durable.
        let mut queued: Vec<WriteId> = self
            .ackable
            .drain(..)
            .chain(self.ack_held.drain(..))
            .collect();
        queued.extend(
            self.writes
                .iter()
                .filter(|(_, w)| w.ack == Ack::Yielded)
                .map(|(id, _)| *id),
        );
        for id in queued {
            let w = self.writes.get_mut(&id).expect("tracked");
            if w.ack != Ack::NotYet {
                w.ack = Ack::Held;
                self.ack_held.push(id);
            }
        }
        self.ack_barrier = self.ack_barrier.max(barrier);
        // Nothing new may have been logged (every region already durably dirty, e.g.
        // during a resync): then no journal write completes to release what waits on
        // already-durable tickets or on the barrier, so release it now (found by the
        // two-node simulation).
        self.journal_progress();
    }

    /// Whether `id` is tracked: started and not yet forgotten (forgotten once done,
    /// yielded, and no longer pinning extents or waiting for journal bits).
    pub fn is_tracked(&self, id: WriteId) -> bool {
        self.writes.contains_key(&id)
    }

    /// Marks regions dirty (e.g. a negative ack from the peer). Partial regions count.
    pub fn mark_dirty(&mut self, ranges: &[ByteRange]) -> Ticket {
        let mut ticket = self.journal.durable_ticket();
        for r in ranges.iter().filter(|r| r.length > 0) {
            let regions = self.regions_of(*r);
            ticket = ticket.max(self.journal.append(JournalOp::Set, regions));
        }
        ticket
    }

    /// Marks regions clean: only when both sides hold their data durably. Only regions
    /// wholly inside a range are cleared.
    pub fn mark_clean(&mut self, ranges: &[ByteRange]) -> Ticket {
        let g = u64::from(self.layout.granularity_bytes);
        let mut ticket = self.journal.durable_ticket();
        for r in ranges.iter().filter(|r| r.length > 0) {
            assert!(r.end() <= self.layout.data_bytes);
            let start = r.offset.div_ceil(g);
            let end = if r.end() == self.layout.data_bytes {
                self.layout.region_count()
            } else {
                r.end() / g
            };
            if start < end {
                ticket = ticket.max(self.journal.append(
                    JournalOp::Clear,
                    RegionRange {
                        start: start as u32,
                        end,
                    },
                ));
            }
        }
        ticket
    }

    pub fn journal_durable(&self, ticket: Ticket) -> bool {
        self.journal.is_durable(ticket)
    }

    /// Asks for a compaction (a snapshot in a new epoch) at the next opportunity.
    pub fn request_compaction(&mut self) {
        self.journal.request_compaction();
    }

    // ----------------------------------------------------------------------------
    // Superblock.
    // ----------------------------------------------------------------------------

    /// Changes the mutable superblock state. The change is written to the next copy and
    /// flushed; act on it (or acknowledge it to anyone) only once `superblock_durable`.
    pub fn update_superblock(&mut self, f: impl FnOnce(&mut SuperblockState)) -> SuperblockTicket {
        f(&mut self.sb.superblock.state);
        assert!(self.sb.superblock.state.generations.is_valid());
        self.sb.version += 1;
        SuperblockTicket(self.sb.version)
    }

    pub fn superblock_durable(&self, ticket: SuperblockTicket) -> bool {
        ticket.0 <= self.sb.durable_version
    }

    fn poll_superblock_write(&mut self) -> Option<MetaIo> {
        // Next copy only after the previous write is durable: then one copy is always a
        // complete durable superblock, whatever happens to the one being written.
        if self.sb.in_flight.is_some() || self.sb.version == self.sb.durable_version {
            return None;
        }
        self.sb.superblock.sequence += 1;
        let bytes = self.sb.superblock.encode();
        self.sb.in_flight = Some(self.sb.version);
        let offset = self.sb.next_copy.offset();
        Some(self.write_io(
            offset,
            bytes,
            Purpose::Superblock {
                version: self.sb.version,
            },
        ))
    }

    // ----------------------------------------------------------------------------
    // Metadata I/O.
    // ----------------------------------------------------------------------------

    fn write_io(&mut self, offset: u64, bytes: Vec<u8>, purpose: Purpose) -> MetaIo {
        assert!(
            offset.is_multiple_of(META_BLOCK_BYTES)
                && (bytes.len() as u64).is_multiple_of(META_BLOCK_BYTES)
        );
        assert!(offset + bytes.len() as u64 <= self.layout.cluster_bytes);
        let id = MetaIoId(self.next_io_id);
        self.next_io_id += 1;
        self.writes_in_flight.insert(id, purpose);
        MetaIo {
            id,
            kind: MetaIoKind::Write { offset, bytes },
        }
    }

    /// Asks for an activity-log record with only the pinned extents (a clean stop: what
    /// is durable everywhere need not be resynced after a restart). Written as soon as no
    /// other record is in flight and no write waits for a slot.
    pub fn cool_activity_log(&mut self) {
        self.cool_requested = true;
        self.try_cool();
    }

    /// A cooling record is requested or in flight.
    pub fn activity_log_cooling(&self) -> bool {
        self.cool_requested || self.al.in_flight()
    }

    fn try_cool(&mut self) {
        if !self.cool_requested || self.al.in_flight() || !self.al_waiting.is_empty() || self.failed
        {
            return;
        }
        self.cool_requested = false;
        if let Some((sequence, slot, extents)) = self.al.build_cooled() {
            let bytes = activity_log::encode(
                &self.uuid,
                self.layout.al_slot_count,
                &activity_log::AlRecord { sequence, extents },
            );
            let offset = self.layout.al.offset + slot as u64 * self.layout.al_record_bytes();
            let io = self.write_io(offset, bytes, Purpose::ActivityLog { sequence });
            self.out.push_back(io);
        }
    }

    fn try_al_transaction(&mut self) {
        if self.al.in_flight() || self.al_waiting.is_empty() || self.failed {
            return;
        }
        let waiting: Vec<RangeInclusive<u32>> = self
            .al_waiting
            .iter()
            .map(|id| self.writes[id].extents.clone())
            .collect();
        if let Some((sequence, slot, extents)) = self.al.build(&waiting) {
            let bytes = activity_log::encode(
                &self.uuid,
                self.layout.al_slot_count,
                &activity_log::AlRecord { sequence, extents },
            );
            let offset = self.layout.al.offset + slot as u64 * self.layout.al_record_bytes();
            let io = self.write_io(offset, bytes, Purpose::ActivityLog { sequence });
            self.out.push_back(io);
        }
    }

    /// The next metadata I/O to execute, if any. Journal records accumulate until this is
    /// called with no journal write in flight: that is the group commit.
    pub fn poll_io(&mut self) -> Option<MetaIo> {
        if self.failed {
            return None;
        }
        if let Some(io) = self.out.pop_front() {
            return Some(io);
        }
        if let Some(io) = self.poll_superblock_write() {
            return Some(io);
        }
        if let Some(w) = self.journal.poll_write() {
            return Some(self.write_io(
                w.offset,
                w.bytes,
                Purpose::Journal {
                    sequence: w.sequence,
                },
            ));
        }
        if self.flush_in_flight.is_none() && !self.completed_unflushed.is_empty() {
            let id = MetaIoId(self.next_io_id);
            self.next_io_id += 1;
            self.flushes += 1;
            self.flush_in_flight = Some((id, std::mem::take(&mut self.completed_unflushed)));
            return Some(MetaIo {
                id,
                kind: MetaIoKind::Flush,
            });
        }
        None
    }

    /// A metadata I/O completed. An error fails the engine: every later gate answers
    /// `Failed` and the caller must fail the disk.
    #[must_use = "a metadata I/O error fails the disk"]
    pub fn handle_io_done(
        &mut self,
        id: MetaIoId,
        result: Result<(), IoError>,
    ) -> Result<(), MetaError> {
        if let Err(error) = result {
            self.failed = true;
            return Err(MetaError::Io { id, error });
        }
        if let Some(purpose) = self.writes_in_flight.remove(&id) {
            // Written, not yet durable: the next flush covers it.
            self.completed_unflushed.push(purpose);
            return Ok(());
        }
        let (flush_id, covered) = self
            .flush_in_flight
            .take()
            .expect("completion of an unknown I/O");
        assert_eq!(flush_id, id, "completion of an unknown I/O");
        for purpose in covered {
            self.on_durable(purpose);
        }
        Ok(())
    }

    fn on_durable(&mut self, purpose: Purpose) {
        match purpose {
            Purpose::Superblock { version } => {
                assert_eq!(self.sb.in_flight.take(), Some(version));
                self.sb.durable_version = version;
                self.sb.next_copy = self.sb.next_copy.other();
            }
            Purpose::ActivityLog { sequence } => {
                self.al.record_durable(sequence);
                self.try_cool();
                self.admit_al_waiters();
                self.try_al_transaction();
            }
            Purpose::Journal { sequence } => {
                self.journal.write_durable(sequence);
                self.journal_progress();
                if !self.open {
                    self.open = true;
                    while let Some(id) = self.deferred.pop_front() {
                        if self.admit(id) {
                            self.ready.push_back(id);
                        }
                    }
                }
            }
        }
    }

    fn admit_al_waiters(&mut self) {
        let waiting: Vec<WriteId> = self.al_waiting.drain(..).collect();
        for id in waiting {
            let extents = self.writes[&id].extents.clone();
            if self.al.all_durably_hot(extents.clone()) {
                self.al.pin(extents.clone());
                self.al.touch(extents);
                let w = self.writes.get_mut(&id).expect("tracked");
                w.pinned = true;
                w.submitted = true;
                self.ready.push_back(id);
                self.emit_ack(id);
            } else {
                self.al_waiting.push_back(id);
            }
        }
    }

    fn journal_progress(&mut self) {
        let durable = self.journal.durable_sequence();
        let mut unpinned = false;
        while let Some(&(ticket, id)) = self.journal_waiting.first() {
            if ticket.0 > durable {
                break;
            }
            self.journal_waiting.pop_first();
            let w = self.writes.get_mut(&id).expect("tracked");
            w.journal_ticket = None;
            if !w.submitted {
                w.submitted = true;
                self.ready.push_back(id);
            }
            if w.pinned {
                w.pinned = false;
                let extents = w.extents.clone();
                self.al.unpin(extents);
                unpinned = true;
            }
            self.emit_ack(id);
            self.maybe_forget(id);
        }
        if self.journal.is_durable(self.ack_barrier) && !self.ack_held.is_empty() {
            for id in std::mem::take(&mut self.ack_held) {
                let w = self.writes.get_mut(&id).expect("held writes stay tracked");
                assert_eq!(w.ack, Ack::Held);
                w.ack = Ack::Queued;
                self.ackable.push_back(id);
            }
        }
        if unpinned {
            self.try_al_transaction();
        }
    }
}

/// Bytes covered by the dirty regions (the last region may be partial).
pub fn dirty_bytes(bitmap: &RoaringBitmap, layout: &Layout) -> u64 {
    let g = u64::from(layout.granularity_bytes);
    let mut bytes = bitmap.len() * g;
    let last = layout.region_count() - 1;
    if bitmap.contains(last as u32) {
        bytes -= last * g + g - layout.data_bytes;
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::meta::sim::{SimDisk, drive_io};

    fn params() -> CreateParams {
        let mut p = CreateParams::new([1; 16], "t", 1, 2, 256 << 20);
        p.al_slot_count = 16;
        p
    }

    fn engine() -> (MetaEngine, SimDisk) {
        let p = params();
        let (engine, image) = MetaEngine::create(&p).unwrap();
        let disk = SimDisk::from_image(&image, engine.layout().cluster_bytes);
        (engine, disk)
    }

    #[test]
    fn connected_hit_submits_at_once_and_miss_waits_for_al() {
        let (mut e, mut disk) = engine();
        assert_eq!(
            e.handle_write_start(WriteId(1), ByteRange::new(0, 4096)),
            Gate::Wait
        );
        drive_io(&mut e, &mut disk);
        assert_eq!(e.poll_ready(), Some(WriteId(1)));
        assert_eq!(e.poll_ackable(), Some(WriteId(1)));
        assert_eq!(
            e.handle_write_start(WriteId(2), ByteRange::new(8192, 4096)),
            Gate::Submit
        );
        assert_eq!(e.stats().al_transactions, 1);
        assert_eq!(e.stats().dirty_regions, 0, "connected writes set no bits");
    }

    #[test]
    fn broken_cold_write_waits_for_journal_and_hot_write_submits_at_once() {
        let (mut e, mut disk) = engine();
        assert_eq!(
            e.handle_write_start(WriteId(1), ByteRange::new(0, 4096)),
            Gate::Wait
        );
        drive_io(&mut e, &mut disk);
        e.poll_ready();
        e.poll_ackable();
        e.handle_write_done(WriteId(1), true);
        e.set_mode(Mode::Broken, &[]);
        assert_eq!(
            e.handle_write_start(WriteId(2), ByteRange::new(4096, 4096)),
            Gate::Submit,
            "hot extent"
        );
        assert_eq!(e.poll_ackable(), None, "bits not yet durable");
        assert_eq!(
            e.handle_write_start(WriteId(3), ByteRange::new(100 << 20, 4096)),
            Gate::Wait,
            "cold extent"
        );
        drive_io(&mut e, &mut disk);
        assert_eq!(e.poll_ready(), Some(WriteId(3)));
        let acks: Vec<_> = std::iter::from_fn(|| e.poll_ackable()).collect();
        assert_eq!(acks, vec![WriteId(2), WriteId(3)]);
        assert_eq!(
            e.stats().al_transactions,
            1,
            "no AL transaction for the cold write"
        );
        assert_eq!(e.stats().dirty_regions, 2);
    }

    #[test]
    fn switch_to_broken_holds_acks_until_transfer_log_durable() {
        let (mut e, mut disk) = engine();
        e.handle_write_start(WriteId(1), ByteRange::new(0, 4096));
        drive_io(&mut e, &mut disk);
        e.poll_ready();
        assert_eq!(e.poll_ackable(), Some(WriteId(1)));
        e.handle_write_done(WriteId(1), false);
        e.set_mode(
            Mode::Broken,
            &[ByteRange::new(0, 4096), ByteRange::new(1 << 20, 8192)],
        );
        assert_eq!(
            e.handle_write_start(WriteId(2), ByteRange::new(4096, 4096)),
            Gate::Submit
        );
        assert_eq!(e.poll_ackable(), None);
        drive_io(&mut e, &mut disk);
        let acks: Vec<_> = std::iter::from_fn(|| e.poll_ackable()).collect();
        assert_eq!(
            acks,
            vec![WriteId(1), WriteId(2)],
            "write 1 re-permitted after the switch"
        );
        assert_eq!(e.stats().dirty_regions, 4);
        e.handle_write_done(WriteId(2), false);
        assert_eq!(e.stats().writes_tracked, 0);
    }

    #[test]
    fn switch_to_broken_re_yields_a_write_whose_bits_are_already_durable() {
        // Regression (two-node simulation): a connected write to regions already durably
        // dirty (e.g. during a resync) logs nothing new at the switch, so no journal
        // write completes to re-yield it; it must be re-yielded at once.
        let (mut e, mut disk) = engine();
        e.set_mode(Mode::Broken, &[]);
        e.handle_write_start(WriteId(1), ByteRange::new(0, 4096));
        drive_io(&mut e, &mut disk);
        assert_eq!(e.poll_ready(), Some(WriteId(1)));
        assert_eq!(e.poll_ackable(), Some(WriteId(1)));
        e.handle_write_done(WriteId(1), false);
        e.set_mode(Mode::Connected, &[]);
        e.handle_write_start(WriteId(2), ByteRange::new(0, 4096));
        drive_io(&mut e, &mut disk);
        assert_eq!(e.poll_ready(), Some(WriteId(2)));
        assert_eq!(e.poll_ackable(), Some(WriteId(2)));
        e.set_mode(Mode::Broken, &[ByteRange::new(0, 4096)]);
        assert_eq!(e.poll_io(), None, "nothing new to log");
        drive_io(&mut e, &mut disk);
        assert_eq!(e.poll_ackable(), Some(WriteId(2)), "re-yielded");
        e.handle_write_done(WriteId(2), false);
        assert_eq!(e.stats().writes_tracked, 0);
    }

    #[test]
    fn switch_to_broken_re_yields_a_yielded_broken_write_still_in_flight() {
        // Regression (two-node simulation): a write admitted in an earlier break, yielded,
        // its data write still running across a reconnect and the next link loss. The
        // caller forgets earlier yields at a switch to Broken, so it must come again.
        let (mut e, mut disk) = engine();
        e.set_mode(Mode::Broken, &[]);
        e.handle_write_start(WriteId(1), ByteRange::new(0, 4096));
        drive_io(&mut e, &mut disk);
        assert_eq!(e.poll_ready(), Some(WriteId(1)));
        assert_eq!(e.poll_ackable(), Some(WriteId(1)));
        e.set_mode(Mode::Connected, &[]);
        e.set_mode(Mode::Broken, &[ByteRange::new(1 << 20, 4096)]);
        assert_eq!(e.poll_ackable(), None, "waits for the transfer-log bits");
        drive_io(&mut e, &mut disk);
        assert_eq!(e.poll_ackable(), Some(WriteId(1)), "re-yielded");
        e.handle_write_done(WriteId(1), false);
        assert_eq!(e.stats().writes_tracked, 0);
    }

    #[test]
    fn superblock_updates_alternate_copies() {
        let (mut e, mut disk) = engine();
        let t = e.update_superblock(|s| s.disk_state = DiskState::UpToDate);
        assert!(!e.superblock_durable(t));
        drive_io(&mut e, &mut disk);
        assert!(e.superblock_durable(t));
        let image = disk.durable_image();
        let p = superblock::pick(&image[..4096], &image[4096..8192], None).unwrap();
        assert_eq!((p.copy, p.superblock.sequence), (CopyId::A, 3));
        e.update_superblock(|s| s.role = Role::Primary);
        drive_io(&mut e, &mut disk);
        let image = disk.durable_image();
        let p = superblock::pick(&image[..4096], &image[4096..8192], None).unwrap();
        assert_eq!(
            (p.copy, p.superblock.sequence, p.superblock.state.role),
            (CopyId::B, 4, Role::Primary)
        );
    }

    #[test]
    fn io_error_fails_the_engine() {
        let (mut e, _) = engine();
        e.handle_write_start(WriteId(1), ByteRange::new(0, 4096));
        let io = e.poll_io().unwrap();
        assert!(e.handle_io_done(io.id, Err(IoError { errno: 5 })).is_err());
        assert_eq!(
            e.handle_write_start(WriteId(2), ByteRange::new(0, 4096)),
            Gate::Failed
        );
        assert_eq!(e.poll_io(), None);
    }

    #[test]
    fn dirty_bytes_counts_partial_last_region() {
        let mut p = params();
        p.data_bytes = (256 << 20) + 512;
        p.logical_block_bytes = 512;
        let (e, _) = MetaEngine::create(&p).unwrap();
        let mut bm = RoaringBitmap::new();
        bm.insert((e.layout().region_count() - 1) as u32);
        bm.insert(0);
        assert_eq!(dirty_bytes(&bm, e.layout()), 4096 + 512);
    }
}
