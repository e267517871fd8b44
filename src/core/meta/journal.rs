//! The bitmap journal: the in-memory dirty bitmap, group commit, compaction, and replay.
//!
//! Sequence numbers order everything durable in the journal. Log block `s` lives at ring
//! position `s mod ring_blocks`. A snapshot *occupies* a sequence `S` (no block is ever
//! written at `S`): it stands for every record with a sequence `<= S`, and replay
//! continues from `S + 1` with blocks of the snapshot's epoch. A record's *ticket* is
//! the sequence whose durability makes it durable; `durable_sequence` says which tickets
//! are satisfied.
//!
//! Ordering rules enforced here:
//! - One journal I/O in flight (a commit of fresh blocks, or a snapshot); the next is
//!   started only when the previous one is durable. So a block is durable only after
//!   every earlier block, and tickets are satisfied in order.
//! - A block is never rewritten; records arriving while a commit is in flight go into
//!   the next block (group commit).
//! - Compaction (ring full, or requested): the snapshot absorbs every pending record
//!   (their effects are already in the in-memory bitmap), is written to the other slot
//!   with epoch + 1, and logging resumes in the new epoch only after it is durable. One
//!   epoch never laps the ring, so replay can never meet a block of its own epoch from
//!   an earlier lap; a block of an older epoch stops replay.
//! - After recovery the journal first writes a snapshot (new epoch) before any block:
//!   blocks beyond the replay stop (written but not all durable before the crash) would
//!   otherwise look like a continuation of the new blocks' sequences.

use std::collections::VecDeque;

use roaring::RoaringBitmap;

use super::journal_log::{
    self, JournalOp, LOG_RECORDS_PER_BLOCK_MAX, LogBlock, LogDecodeError, LogRecord,
};
use super::layout::Layout;
use super::snapshot::{self, SnapshotDecodeError, SnapshotHeader};
use super::{JOURNAL_COMMIT_BLOCKS_MAX, META_BLOCK_BYTES, RegionRange};

/// The sequence whose durability makes a record durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(pub u64);

#[derive(Clone, Debug)]
struct PendingBlock {
    sequence: u64,
    records: Vec<LogRecord>,
}

/// What the journal has in flight.
#[derive(Clone, Debug)]
enum InFlight {
    /// Fresh log blocks `first..=last` of the current epoch.
    Blocks { last: u64, records: Vec<LogRecord> },
    /// A snapshot occupying `sequence`, epoch already switched in memory.
    Snapshot { sequence: u64 },
}

/// One journal write for the engine to issue: `bytes` at `offset` of the CLUSTER
/// partition; durable when a flush after its completion completes.
#[derive(Clone, Debug)]
pub struct JournalWrite {
    pub offset: u64,
    pub bytes: Vec<u8>,
    /// Sequence made durable by this write.
    pub sequence: u64,
    pub is_snapshot: bool,
}

/// Where replay stopped and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ReplayReport {
    pub snapshot_slot: usize,
    pub snapshot_epoch: u64,
    pub snapshot_sequence: u64,
    pub blocks_replayed: u64,
    /// The sequence at which replay stopped (first not replayed).
    pub stopped_at_sequence: u64,
    /// Why: "blank", "corrupt", "older-epoch", "other-sequence", "ring-end", ...
    pub stop_reason: String,
    /// Proof that a block that had been durable is unreadable (media corruption), found
    /// by scanning the whole ring after replay; `None` when the stop is a normal tear.
    pub durable_block_lost: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JournalRecoveryError {
    /// Neither snapshot slot holds a valid snapshot.
    NoValidSnapshot {
        conditions: [SnapshotDecodeError; 2],
    },
    /// Something that had been durable is unreadable (media corruption after the fact):
    /// a newer snapshot whose epoch's blocks are in the log, or a block of an earlier
    /// durable commit. Replaying what is left could drop dirty bits: refuse.
    DurableMetadataLost { detail: String },
}

/// Counters for `stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct JournalCounters {
    pub blocks_written: u64,
    pub commits: u64,
    pub snapshots_written: u64,
    pub records_logged: u64,
    /// Largest coarsening unit (regions) applied by the last snapshot; 1 = exact.
    pub last_coarsen_unit_regions: u32,
    pub coarsenings: u64,
}

#[derive(Debug)]
pub struct Journal {
    uuid: [u8; 16],
    layout: Layout,
    ring_blocks: u64,
    bitmap: RoaringBitmap,
    epoch: u64,
    /// Sequence occupied by the current epoch's snapshot.
    epoch_sequence: u64,
    /// Slot holding (or receiving) the current epoch's snapshot.
    snapshot_slot: usize,
    next_sequence: u64,
    pending: VecDeque<PendingBlock>,
    in_flight: Option<InFlight>,
    durable_sequence: u64,
    compaction_requested: bool,
    counters: JournalCounters,
}

impl Journal {
    /// State after `create` wrote an empty snapshot (epoch 1, sequence 0) to slot A.
    pub fn created(uuid: [u8; 16], layout: Layout) -> Journal {
        Journal::new(uuid, layout, RoaringBitmap::new(), 1, 0, 0, false)
    }

    fn new(
        uuid: [u8; 16],
        layout: Layout,
        bitmap: RoaringBitmap,
        epoch: u64,
        epoch_sequence: u64,
        slot: usize,
        compaction_requested: bool,
    ) -> Journal {
        Journal {
            uuid,
            layout,
            ring_blocks: layout.log_block_count(),
            bitmap,
            epoch,
            epoch_sequence,
            snapshot_slot: slot,
            next_sequence: epoch_sequence + 1,
            pending: VecDeque::new(),
            in_flight: None,
            durable_sequence: epoch_sequence,
            compaction_requested,
            counters: JournalCounters::default(),
        }
    }

    /// The initial snapshot image for `create` (epoch 1, sequence 0, empty).
    pub fn initial_snapshot(uuid: &[u8; 16], layout: &Layout) -> Vec<u8> {
        let bitmap = RoaringBitmap::new();
        let header = snapshot::header_for(
            1,
            0,
            layout.region_count(),
            layout.granularity_bytes,
            1,
            &bitmap,
        );
        snapshot::encode(uuid, &header, &bitmap)
    }

    pub fn bitmap(&self) -> &RoaringBitmap {
        &self.bitmap
    }

    pub fn counters(&self) -> JournalCounters {
        self.counters
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn durable_sequence(&self) -> u64 {
        self.durable_sequence
    }

    pub fn is_durable(&self, ticket: Ticket) -> bool {
        ticket.0 <= self.durable_sequence
    }

    /// Ticket satisfied now (for records already durable).
    pub fn durable_ticket(&self) -> Ticket {
        Ticket(self.durable_sequence)
    }

    /// Fraction of the ring used by the current epoch (0.0 ..= 1.0).
    pub fn fill(&self) -> f64 {
        let used = self
            .next_sequence
            .saturating_sub(self.epoch_sequence + 1)
            .min(self.ring_blocks);
        used as f64 / self.ring_blocks as f64
    }

    /// Applies a record to the in-memory bitmap and queues it for the log. Returns the
    /// ticket. A set whose regions are all already set is not logged again: its ticket is
    /// the newest outstanding one that set any of them (or the durable one).
    pub fn append(&mut self, op: JournalOp, range: RegionRange) -> Ticket {
        assert!(!range.is_empty() && range.end <= self.layout.region_count());
        let (start, end_inclusive) = (range.start, (range.end - 1) as u32);
        if op == JournalOp::Set && self.bitmap.contains_range(start..=end_inclusive) {
            return self.outstanding_ticket(range);
        }
        if op == JournalOp::Clear
            // Not `range_cardinality`: on a bitmap container it counts from the
            // container's start, which made every resync clear cost ~1k words.
            && self.bitmap.range(start..=end_inclusive).next().is_none()
            && !self.pending_or_in_flight_touches(range)
        {
            return self.durable_ticket(); // nothing set, nothing outstanding: no-op
        }
        match op {
            JournalOp::Set => self.bitmap.insert_range(start..=end_inclusive),
            JournalOp::Clear => self.bitmap.remove_range(start..=end_inclusive),
        };
        let mut ticket = Ticket(0);
        let mut at = u64::from(range.start);
        while at < range.end {
            let count = (range.end - at).min(u64::from(u32::MAX));
            ticket = self.push_record(LogRecord {
                op,
                start: at as u32,
                count: count as u32,
            });
            at += count;
        }
        ticket
    }

    fn push_record(&mut self, record: LogRecord) -> Ticket {
        self.counters.records_logged += 1;
        let open = self
            .pending
            .back()
            .is_some_and(|b| b.records.len() < LOG_RECORDS_PER_BLOCK_MAX);
        if !open {
            let sequence = self.next_sequence;
            self.next_sequence += 1;
            self.pending.push_back(PendingBlock {
                sequence,
                records: Vec::new(),
            });
        }
        let block = self.pending.back_mut().expect("open block");
        block.records.push(record);
        Ticket(block.sequence)
    }

    fn pending_or_in_flight_touches(&self, range: RegionRange) -> bool {
        let touches = |r: &LogRecord| {
            RegionRange {
                start: r.start,
                end: r.end(),
            }
            .overlaps(&range)
        };
        self.pending.iter().any(|b| b.records.iter().any(touches))
            || matches!(&self.in_flight, Some(InFlight::Blocks { records, .. }) if records.iter().any(touches))
            || matches!(self.in_flight, Some(InFlight::Snapshot { .. }))
    }

    /// The newest not-yet-durable sequence that set any region of `range`.
    fn outstanding_ticket(&self, range: RegionRange) -> Ticket {
        let sets = |r: &LogRecord| {
            r.op == JournalOp::Set
                && RegionRange {
                    start: r.start,
                    end: r.end(),
                }
                .overlaps(&range)
        };
        let mut ticket = self.durable_ticket();
        match &self.in_flight {
            Some(InFlight::Blocks { last, records }) if records.iter().any(sets) => {
                ticket = ticket.max(Ticket(*last))
            }
            // Bits in memory while a snapshot is in flight (coarsened or absorbed ones
            // included) are durable only when the snapshot is.
            Some(InFlight::Snapshot { sequence }) => ticket = ticket.max(Ticket(*sequence)),
            _ => {}
        }
        for b in &self.pending {
            if b.records.iter().any(sets) {
                ticket = ticket.max(Ticket(b.sequence));
            }
        }
        ticket
    }

    /// Asks for a compaction at the next opportunity (tests, clean shutdown).
    pub fn request_compaction(&mut self) {
        self.compaction_requested = true;
    }

    pub fn has_work(&self) -> bool {
        self.in_flight.is_none() && (self.compaction_requested || !self.pending.is_empty())
    }

    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Starts the next journal I/O if none is in flight.
    pub fn poll_write(&mut self) -> Option<JournalWrite> {
        if self.in_flight.is_some() {
            return None;
        }
        let ring_full = self
            .pending
            .front()
            .is_some_and(|b| b.sequence > self.epoch_sequence + self.ring_blocks);
        if self.compaction_requested || ring_full {
            return Some(self.start_snapshot());
        }
        let first = self.pending.front()?.sequence;
        let mut blocks = Vec::new();
        while let Some(b) = self.pending.front() {
            let pos = b.sequence % self.ring_blocks;
            let contiguous = blocks.is_empty() || pos != 0;
            let in_epoch = b.sequence <= self.epoch_sequence + self.ring_blocks;
            if !contiguous || !in_epoch || blocks.len() as u64 == JOURNAL_COMMIT_BLOCKS_MAX {
                break;
            }
            blocks.push(self.pending.pop_front().expect("front"));
        }
        assert!(!blocks.is_empty());
        let mut bytes = Vec::with_capacity(blocks.len() * META_BLOCK_BYTES as usize);
        let mut records = Vec::new();
        for (i, b) in blocks.iter().enumerate() {
            assert_eq!(b.sequence, first + i as u64);
            assert!(
                b.sequence > self.epoch_sequence
                    && b.sequence <= self.epoch_sequence + self.ring_blocks
            );
            let block = LogBlock {
                epoch: self.epoch,
                sequence: b.sequence,
                commit_offset: i as u32,
                records: b.records.clone(),
            };
            bytes.extend_from_slice(&journal_log::encode(&self.uuid, &block));
            records.extend_from_slice(&b.records);
        }
        let last = blocks.last().expect("non-empty").sequence;
        self.counters.blocks_written += blocks.len() as u64;
        self.counters.commits += 1;
        self.in_flight = Some(InFlight::Blocks { last, records });
        Some(JournalWrite {
            offset: self.layout.log.offset + (first % self.ring_blocks) * META_BLOCK_BYTES,
            bytes,
            sequence: last,
            is_snapshot: false,
        })
    }

    fn start_snapshot(&mut self) -> JournalWrite {
        self.compaction_requested = false;
        // The snapshot absorbs every pending record: their effects are in `bitmap`.
        let sequence = match self.pending.back() {
            Some(b) => b.sequence,
            None => {
                self.next_sequence += 1;
                self.next_sequence - 1
            }
        };
        self.pending.clear();
        assert_eq!(self.next_sequence, sequence + 1);
        let slot = 1 - self.snapshot_slot;
        let area = self.layout.snapshot_slot(slot);
        let capacity = area.size - META_BLOCK_BYTES;
        let region_count = self.layout.region_count();
        let unit = snapshot::fit(
            &mut self.bitmap,
            capacity,
            self.layout.regions_per_extent(),
            region_count,
        );
        if unit > 1 {
            self.counters.coarsenings += 1;
        }
        self.counters.last_coarsen_unit_regions = unit;
        self.epoch += 1;
        self.epoch_sequence = sequence;
        self.snapshot_slot = slot;
        let header = snapshot::header_for(
            self.epoch,
            sequence,
            region_count,
            self.layout.granularity_bytes,
            unit,
            &self.bitmap,
        );
        let bytes = snapshot::encode(&self.uuid, &header, &self.bitmap);
        assert!(bytes.len() as u64 <= area.size);
        self.counters.snapshots_written += 1;
        self.in_flight = Some(InFlight::Snapshot { sequence });
        JournalWrite {
            offset: area.offset,
            bytes,
            sequence,
            is_snapshot: true,
        }
    }

    /// The journal write for `sequence` is durable.
    pub fn write_durable(&mut self, sequence: u64) {
        let done = match self.in_flight.take() {
            Some(InFlight::Blocks { last, .. }) => last,
            Some(InFlight::Snapshot { sequence }) => sequence,
            None => panic!("journal durable without a write in flight"),
        };
        assert_eq!(done, sequence);
        assert!(sequence > self.durable_sequence);
        self.durable_sequence = sequence;
    }

    /// Adds regions straight to the bitmap without logging: only for recovery (the
    /// forced first snapshot makes them durable).
    pub fn insert_unlogged(&mut self, range: RegionRange) {
        assert!(
            self.compaction_requested,
            "unlogged bits need the recovery snapshot"
        );
        if !range.is_empty() {
            self.bitmap
                .insert_range(range.start..=(range.end - 1) as u32);
        }
    }

    /// Recovers the journal from the CLUSTER partition image: newest valid snapshot +
    /// replay. The result has a compaction requested (see the module docs).
    pub fn recover(
        area: &[u8],
        uuid: [u8; 16],
        layout: Layout,
    ) -> Result<(Journal, ReplayReport), JournalRecoveryError> {
        let region_count = layout.region_count();
        let slot_bytes = |s: usize| {
            let a = layout.snapshot_slot(s);
            &area[a.offset as usize..a.end() as usize]
        };
        let decoded = [0, 1].map(|s| {
            snapshot::decode(slot_bytes(s), &uuid, region_count, layout.granularity_bytes)
        });
        let slot = match (&decoded[0], &decoded[1]) {
            (Ok((a, _)), Ok((b, _))) => {
                if (a.epoch, a.sequence) >= (b.epoch, b.sequence) {
                    0
                } else {
                    1
                }
            }
            (Ok(_), Err(_)) => 0,
            (Err(_), Ok(_)) => 1,
            (Err(a), Err(b)) => {
                return Err(JournalRecoveryError::NoValidSnapshot {
                    conditions: [a.clone(), b.clone()],
                });
            }
        };
        let [a, b] = decoded;
        let (header, mut bitmap) = if slot == 0 { a } else { b }.expect("chosen snapshot valid");
        let log = &area[layout.log.offset as usize..layout.log.end() as usize];
        let mut report = replay(&mut bitmap, &header, log, &uuid, region_count);
        report.snapshot_slot = slot;
        if let Some(detail) = report.durable_block_lost.clone() {
            return Err(JournalRecoveryError::DurableMetadataLost { detail });
        }
        let mut journal = Journal::new(
            uuid,
            layout,
            bitmap,
            header.epoch,
            header.sequence,
            slot,
            true,
        );
        journal.next_sequence = report.stopped_at_sequence;
        journal.durable_sequence = report.stopped_at_sequence - 1;
        Ok((journal, report))
    }
}

/// Replays the log ring `log` onto `bitmap` (decoded from the snapshot `header`).
/// Accepts block `s` only if it decodes, has the snapshot's epoch and sequence `s`;
/// stops at the first that does not, and after one full ring at most.
pub fn replay(
    bitmap: &mut RoaringBitmap,
    header: &SnapshotHeader,
    log: &[u8],
    uuid: &[u8; 16],
    region_count: u64,
) -> ReplayReport {
    let ring_blocks = log.len() as u64 / META_BLOCK_BYTES;
    assert!(ring_blocks > 0);
    let mut sequence = header.sequence + 1;
    let mut blocks_replayed = 0;
    let stop_reason = loop {
        if blocks_replayed == ring_blocks {
            break "ring-end".to_string();
        }
        let pos = (sequence % ring_blocks) as usize * META_BLOCK_BYTES as usize;
        let block = match journal_log::decode(
            &log[pos..pos + META_BLOCK_BYTES as usize],
            uuid,
            region_count,
        ) {
            Ok(b) => b,
            Err(e) => break log_error_name(&e).to_string(),
        };
        if block.epoch != header.epoch {
            break if block.epoch < header.epoch {
                "older-epoch"
            } else {
                "newer-epoch"
            }
            .to_string();
        }
        if block.sequence != sequence {
            break "other-sequence".to_string();
        }
        for r in &block.records {
            let range = r.start..=(r.end() - 1) as u32;
            match r.op {
                JournalOp::Set => bitmap.insert_range(range),
                JournalOp::Clear => bitmap.remove_range(range),
            };
        }
        blocks_replayed += 1;
        sequence += 1;
    };
    // A torn commit may leave later blocks of the same commit valid after the stop: that
    // is normal (none of them was acknowledged). Any valid block of a newer epoch, or of
    // a commit that began after the stop, proves something durable was lost.
    let mut durable_block_lost = None;
    for i in 0..ring_blocks as usize {
        let at = i * META_BLOCK_BYTES as usize;
        let Ok(block) =
            journal_log::decode(&log[at..at + META_BLOCK_BYTES as usize], uuid, region_count)
        else {
            continue;
        };
        if block.epoch > header.epoch {
            durable_block_lost = Some(format!(
                "log block of epoch {} found, but the newest valid snapshot has epoch {}: a durable snapshot is unreadable",
                block.epoch, header.epoch
            ));
            break;
        }
        let commit_start = block.sequence - u64::from(block.commit_offset);
        if block.epoch == header.epoch && block.sequence > sequence && commit_start > sequence {
            durable_block_lost = Some(format!(
                "log block {} of a later commit is valid but block {sequence} is not: a durable block is unreadable",
                block.sequence
            ));
            break;
        }
    }
    ReplayReport {
        durable_block_lost,
        snapshot_slot: 0,
        snapshot_epoch: header.epoch,
        snapshot_sequence: header.sequence,
        blocks_replayed,
        stopped_at_sequence: sequence,
        stop_reason,
    }
}

fn log_error_name(e: &LogDecodeError) -> &'static str {
    match e {
        LogDecodeError::Blank => "blank",
        LogDecodeError::BadMagic => "bad-magic",
        LogDecodeError::Corrupt => "corrupt",
        LogDecodeError::ForeignMirror => "foreign",
        _ => "invalid",
    }
}
