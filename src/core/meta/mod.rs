//! The CLUSTER partition: on-disk metadata codecs and the sans-IO metadata engine.
//!
//! This module does no I/O. It encodes and decodes the superblock, the activity log, the
//! bitmap journal (snapshots and log blocks), computes the partition layout, and runs the
//! metadata engine that gates data writes on durable metadata. The shell executes the
//! [`engine::MetaIo`] it asks for and reports completions. The byte-level specification is
//! `docs/on-disk-format.md`; every constant that appears there is defined below.
//!
//! Files: `codec` (little-endian helpers), `layout` (where every area lives), `generation`
//! (generation identifiers, disk state, role, flags), `superblock` (codec and the pure
//! copy-picking function), `activity_log` (AL record codec, hot set with LRU), `journal_log`
//! (log block codec), `snapshot` (snapshot slot codec, coarsening), `journal` (in-memory
//! dirty bitmap, group commit, compaction, replay), `engine` (ties them to the write path),
//! `inspect` (the operator's view), `sim` (test-only simulated disk and crash simulation),
//! `recovery_tests` (test-only: damaged partitions, one case per test; bitmap memory).

pub mod activity_log;
pub(crate) mod codec;
pub mod engine;
pub mod generation;
pub mod inspect;
pub mod journal;
pub mod journal_log;
pub mod layout;
pub mod snapshot;
pub mod superblock;

#[cfg(test)]
mod recovery_tests;
#[cfg(test)]
mod sim;

pub use engine::{
    Gate, IoError, MetaEngine, MetaError, MetaIo, MetaIoId, MetaIoKind, MetaStats, Mode,
    RecoveryError, RecoveryReport, SuperblockTicket, WriteId,
};
pub use generation::{DiskState, Flags, Generations, Role};
pub use layout::{Area, CreateParams, Layout, LayoutError, Placement};
pub use superblock::{CopyCondition, CopyId, Identity, PickError, Picked, Superblock};

use crate::constants::{KIB, MIB};

// ---------------------------------------------------------------------------------------
// Limits and format constants. Each one is named once, with the reason for its value.
// ---------------------------------------------------------------------------------------

/// Size of every metadata block and the alignment of every area. 4 KiB is the page size
/// and the largest logical block size we support, so an aligned 4 KiB write is one
/// O_DIRECT write on every backing device we accept.
pub const META_BLOCK_BYTES: u64 = 4 * KIB;

/// Unit in which a disk may tear a write (the classic sector). The crash simulation tears
/// at this granularity; every record's checksum covers whole blocks so a tear is detected.
pub const SECTOR_BYTES: u64 = 512;

/// The format this code writes. It reads every version up to and including this one.
/// Any change of a block layout, including giving meaning to a reserved byte, bumps it.
pub const FORMAT_VERSION: u32 = 1;

/// Smallest bitmap granularity: one page; finer regions would multiply bitmap size for
/// no gain, since clients write whole pages.
pub const GRANULARITY_BYTES_MIN: u32 = 4 * KIB as u32;
/// Largest granularity: coarser regions make a resync copy too much clean data per write.
pub const GRANULARITY_BYTES_MAX: u32 = MIB as u32;
/// Default granularity: the page size, so one 4 KiB write dirties one region.
pub const GRANULARITY_BYTES_DEFAULT: u32 = 4 * KIB as u32;

/// Region indices are `u32` (a `RoaringBitmap`, whose 32-bit portable serialization is the
/// one every roaring implementation reads). This caps a volume at 2^32 regions: 16 TiB at
/// 4 KiB granularity, 4 PiB at 1 MiB. `create` refuses larger volumes with a message
/// naming the granularity that would fit.
pub const REGION_COUNT_MAX: u64 = 1 << 32;

/// Size of one activity-log extent. DRBD's value: large enough that a sequential stream
/// costs one AL transaction per 4 MiB, small enough that the resync after a crash copies
/// at most slots × 4 MiB (4 GiB with the default slot count).
pub const AL_EXTENT_BYTES: u32 = 4 * MIB as u32;

/// Default number of hot extents: 4 GiB of hot working set (DRBD's default is 1237).
pub const AL_SLOT_COUNT_DEFAULT: u32 = 1024;
/// Fewest slots: one maximum-size write (32 MiB NBD payload, unaligned) spans 9 extents
/// and must fit in the hot set with room to spare, or it could never be admitted.
pub const AL_SLOT_COUNT_MIN: u32 = 16;
/// Most slots: 64 GiB of hot extents, a 64 KiB AL record; more would make every
/// post-crash resync copy more than a full copy of many volumes.
pub const AL_SLOT_COUNT_MAX: u32 = 16384;

/// Longest mirror name in bytes (UTF-8, no NUL): fits a fixed superblock field and any
/// sane resource name.
pub const MIRROR_NAME_BYTES_MAX: usize = 64;

/// Default size of the journal log ring: 4096 blocks. Each commit writes at least one
/// fresh block and a compaction rewrites one snapshot, so a 4096-block ring means at most
/// one snapshot write per 4096 commits (at 1 TiB and a worst-case bitmap, 32 MiB per
/// 4096 commits = 8 KiB per commit amortised; typical snapshots are far smaller). Log
/// records are only written for regions that become dirty or clean, so a steady workload
/// on already-dirty regions writes no log at all. 16 MiB is noise next to any data size.
pub const LOG_AREA_BYTES_DEFAULT: u64 = 16 * MIB;
/// Smallest log ring: four blocks, enough for the ring and compaction logic to make
/// progress. Only reached through `--cluster-size` on tiny volumes and in tests.
pub const LOG_AREA_BYTES_MIN: u64 = 4 * META_BLOCK_BYTES;

/// Most log blocks written by one journal commit (one write + one flush). Bounds the
/// write size when a large batch of records piled up behind a compaction.
pub const JOURNAL_COMMIT_BLOCKS_MAX: u64 = 16;

/// The data partition of an internal-metadata device starts at a multiple of this, the
/// alignment partitioning tools use, so data I/O stays aligned on every device geometry.
pub const DATA_ALIGNMENT_BYTES: u64 = MIB;

/// Logical block sizes accepted: the sector sizes Linux block devices report.
pub const LOGICAL_BLOCK_BYTES_MIN: u32 = 512;
pub const LOGICAL_BLOCK_BYTES_MAX: u32 = 4 * KIB as u32;

// ---------------------------------------------------------------------------------------
// Shared small types.
// ---------------------------------------------------------------------------------------

/// A byte range of the data partition (offset relative to the data partition start).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct ByteRange {
    pub offset: u64,
    pub length: u64,
}

impl ByteRange {
    pub fn new(offset: u64, length: u64) -> ByteRange {
        assert!(offset.checked_add(length).is_some());
        ByteRange { offset, length }
    }

    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// A half-open range of region indices `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegionRange {
    pub start: u32,
    /// Exclusive; `u64` so a range may end at `REGION_COUNT_MAX`.
    pub end: u64,
}

impl RegionRange {
    pub fn is_empty(&self) -> bool {
        u64::from(self.start) >= self.end
    }

    pub fn overlaps(&self, other: &RegionRange) -> bool {
        u64::from(self.start) < other.end && u64::from(other.start) < self.end
    }

    pub fn count(&self) -> u64 {
        self.end.saturating_sub(u64::from(self.start))
    }
}

/// Round `value` up to a multiple of `to` (a power of two or any non-zero unit).
pub(crate) fn round_up(value: u64, to: u64) -> u64 {
    assert!(to > 0);
    value.div_ceil(to) * to
}

pub(crate) fn round_down(value: u64, to: u64) -> u64 {
    assert!(to > 0);
    value / to * to
}
