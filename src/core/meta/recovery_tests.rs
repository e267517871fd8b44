//! Recovery from damaged CLUSTER partitions, one case per test, and the bitmap memory check.

use roaring::RoaringBitmap;

use super::engine::{Gate, MetaEngine, Mode, RecoveryError, WriteId};
use super::journal::JournalRecoveryError;
use super::journal_log::{self, JournalOp, LogBlock, LogRecord};
use super::sim::{SimDisk, drive_io};
use super::snapshot;
use super::superblock::{CopyCondition, CopyId, PickError};
use super::{ByteRange, CreateParams, DiskState, META_BLOCK_BYTES};

const UUID: [u8; 16] = [0x42; 16];
const DATA_BYTES: u64 = 256 << 20;

/// An engine on a 256 MiB volume with a 4-block log ring, fully durable.
fn setup() -> (MetaEngine, SimDisk) {
    let mut p = CreateParams::new(UUID, "rt", 1, 2, DATA_BYTES);
    p.al_slot_count = 16;
    let log_offset = p.validate().unwrap().log.offset;
    p.cluster_bytes = Some(log_offset + 4 * META_BLOCK_BYTES);
    let (engine, image) = MetaEngine::create(&p).unwrap();
    assert_eq!(engine.layout().log_block_count(), 4);
    let disk = SimDisk::from_image(&image, engine.layout().cluster_bytes);
    (engine, disk)
}

/// One Broken-mode write of one region, driven until durable and acknowledged.
fn broken_write(e: &mut MetaEngine, disk: &mut SimDisk, id: u64, region: u64) {
    if e.mode() != Mode::Broken {
        e.set_mode(Mode::Broken, &[]);
    }
    let gate = e.handle_write_start(WriteId(id), ByteRange::new(region * 4096, 4096));
    assert_ne!(gate, Gate::Failed);
    drive_io(e, disk);
    while e.poll_ready().is_some() {}
    assert_eq!(e.poll_ackable(), Some(WriteId(id)));
    e.handle_write_done(WriteId(id), false);
}

fn log_block_offset(e: &MetaEngine, sequence: u64) -> usize {
    let l = e.layout();
    (l.log.offset + (sequence % l.log_block_count()) * META_BLOCK_BYTES) as usize
}

fn flip(image: &mut [u8], offset: usize) {
    image[offset + 100] ^= 0xFF;
}

fn recover(image: &[u8]) -> Result<MetaEngine, RecoveryError> {
    MetaEngine::recover(image, None).map(|(e, _)| e)
}

#[test]
fn one_superblock_copy_corrupt_recovers_from_the_other() {
    let (mut e, mut disk) = setup();
    e.update_superblock(|s| s.disk_state = DiskState::UpToDate);
    drive_io(&mut e, &mut disk); // copy A, sequence 3
    let image = disk.durable_image();
    let mut bad_a = image.clone();
    flip(&mut bad_a, 0);
    let (r, report) = MetaEngine::recover(&bad_a, None).unwrap();
    assert_eq!(
        (report.superblock_copy, r.superblock().sequence),
        (CopyId::B, 2)
    );
    assert_eq!(report.superblock_conditions[0], CopyCondition::Corrupt);
    assert_eq!(
        r.superblock().state.disk_state,
        DiskState::Inconsistent,
        "the older durable state"
    );
    let mut bad_b = image;
    flip(&mut bad_b, 4096);
    let (r, _) = MetaEngine::recover(&bad_b, None).unwrap();
    assert_eq!(r.superblock().state.disk_state, DiskState::UpToDate);
}

#[test]
fn both_superblock_copies_corrupt_is_a_clear_error() {
    let (_, disk) = setup();
    let mut image = disk.durable_image();
    flip(&mut image, 0);
    flip(&mut image, 4096);
    let err = recover(&image).unwrap_err();
    assert_eq!(
        err,
        RecoveryError::Superblock(PickError::NoValidCopy {
            conditions: [CopyCondition::Corrupt, CopyCondition::Corrupt]
        })
    );
    assert!(err.to_string().contains("refusing to guess"));
}

#[test]
fn both_activity_log_records_corrupt_is_an_error() {
    let (e, disk) = setup();
    let mut image = disk.durable_image();
    let al = e.layout().al;
    flip(&mut image, al.offset as usize); // the only record; the other slot is blank
    assert!(matches!(
        recover(&image),
        Err(RecoveryError::ActivityLogLost { .. })
    ));
}

#[test]
fn recovery_adds_hot_extents_and_writes_a_snapshot_before_admitting_writes() {
    let (mut e, mut disk) = setup();
    assert_eq!(
        e.handle_write_start(WriteId(1), ByteRange::new(9 << 20, 4096)),
        Gate::Wait
    );
    drive_io(&mut e, &mut disk); // extent 2 durably hot; the write is in flight at the cut
    let (mut r, report) = MetaEngine::recover(&disk.durable_image(), None).unwrap();
    assert_eq!(report.al_hot_extents, 1);
    assert_eq!(report.journal_dirty_regions, 0);
    assert_eq!(
        r.dirty_bitmap().len(),
        1024,
        "one 4 MiB extent of 4 KiB regions"
    );
    assert!(r.dirty_bitmap().contains((9 << 20) / 4096));
    assert!(!r.is_open());
    assert_eq!(
        r.handle_write_start(WriteId(7), ByteRange::new(0, 4096)),
        Gate::Wait
    );
    let mut disk = SimDisk::from_bytes(disk.durable_image());
    drive_io(&mut r, &mut disk);
    assert!(r.is_open());
    // The merged extent is now durable in the journal on its own.
    let again = recover(&disk.durable_image()).unwrap();
    assert!(again.dirty_bitmap().contains((9 << 20) / 4096));
}

#[test]
fn torn_newest_snapshot_falls_back_to_the_older_one_and_replays() {
    let (mut e, mut disk) = setup();
    broken_write(&mut e, &mut disk, 1, 10); // epoch 1, block 1
    e.request_compaction();
    drive_io(&mut e, &mut disk); // snapshot epoch 2 in slot B; no epoch-2 block yet
    let mut image = disk.durable_image();
    let slot_b = e.layout().snapshot_b.offset as usize;
    image[slot_b + 200] ^= 1; // torn header
    let (r, report) = MetaEngine::recover(&image, None).unwrap();
    assert_eq!(
        (report.replay.snapshot_slot, report.replay.snapshot_epoch),
        (0, 1)
    );
    assert_eq!(report.replay.blocks_replayed, 1);
    assert!(r.dirty_bitmap().contains(10));
}

#[test]
fn lost_durable_snapshot_is_refused_not_replayed_around() {
    let (mut e, mut disk) = setup();
    broken_write(&mut e, &mut disk, 1, 10);
    e.request_compaction();
    drive_io(&mut e, &mut disk);
    broken_write(&mut e, &mut disk, 2, 20); // an epoch-2 block proves snapshot 2 was durable
    let mut image = disk.durable_image();
    let slot_b = e.layout().snapshot_b.offset as usize;
    image[slot_b + 200] ^= 1;
    assert!(matches!(
        recover(&image),
        Err(RecoveryError::Journal(
            JournalRecoveryError::DurableMetadataLost { .. }
        ))
    ));
}

#[test]
fn both_snapshot_slots_corrupt_is_an_error() {
    let (mut e, mut disk) = setup();
    e.request_compaction();
    drive_io(&mut e, &mut disk);
    let mut image = disk.durable_image();
    flip(&mut image, e.layout().snapshot_a.offset as usize);
    flip(&mut image, e.layout().snapshot_b.offset as usize);
    assert!(matches!(
        recover(&image),
        Err(RecoveryError::Journal(
            JournalRecoveryError::NoValidSnapshot { .. }
        ))
    ));
}

#[test]
fn corrupt_last_log_block_stops_replay_there() {
    // The newest block corrupt: exactly what a torn, never-acknowledged commit looks like.
    let (mut e, mut disk) = setup();
    broken_write(&mut e, &mut disk, 1, 10); // block 1
    broken_write(&mut e, &mut disk, 2, 20); // block 2
    let mut image = disk.durable_image();
    flip(&mut image, log_block_offset(&e, 2));
    let (r, report) = MetaEngine::recover(&image, None).unwrap();
    assert_eq!(
        (
            report.replay.blocks_replayed,
            report.replay.stopped_at_sequence
        ),
        (1, 2)
    );
    assert_eq!(report.replay.stop_reason, "corrupt");
    assert!(r.dirty_bitmap().contains(10) && !r.dirty_bitmap().contains(20));
}

#[test]
fn corrupt_log_block_in_the_middle_of_durable_commits_is_refused() {
    // Block 2 was durable before block 3 was written (one commit at a time), so a valid
    // block 3 behind an unreadable block 2 is media corruption of acknowledged state.
    let (mut e, mut disk) = setup();
    broken_write(&mut e, &mut disk, 1, 10);
    broken_write(&mut e, &mut disk, 2, 20);
    broken_write(&mut e, &mut disk, 3, 30);
    let mut image = disk.durable_image();
    flip(&mut image, log_block_offset(&e, 2));
    let err = recover(&image).unwrap_err();
    assert!(
        matches!(
            err,
            RecoveryError::Journal(JournalRecoveryError::DurableMetadataLost { .. })
        ),
        "{err}"
    );
}

#[test]
fn torn_first_block_of_a_multi_block_commit_stops_replay_without_error() {
    // 400 scattered regions need two blocks, written by one commit: a crash may keep the
    // second and lose the first. Nothing in that commit was acknowledged: stop, no error.
    let (mut e, mut disk) = setup();
    let ranges: Vec<ByteRange> = (0..400)
        .map(|i| ByteRange::new(i * 2 * 4096, 4096))
        .collect();
    let ticket = e.mark_dirty(&ranges);
    drive_io(&mut e, &mut disk);
    assert!(e.journal_durable(ticket));
    let mut image = disk.durable_image();
    flip(&mut image, log_block_offset(&e, 1));
    let (r, report) = MetaEngine::recover(&image, None).unwrap();
    assert_eq!(report.replay.blocks_replayed, 0);
    assert_eq!(report.replay.durable_block_lost, None);
    assert!(r.dirty_bitmap().is_empty());
}

#[test]
fn stale_lap_after_compaction_never_replays() {
    // Built explicitly: the snapshot (epoch 2, sequence 4) has region 7 dirty; the live
    // epoch-2 block 5 sets region 9; ring positions 2 and 3 still hold epoch-1 blocks
    // whose CLEAR of region 7 would wipe a live bit if replayed — one with the very
    // sequence replay expects next (as after a recovery reused sequences).
    let (e, disk) = setup();
    let l = *e.layout();
    let mut image = disk.durable_image();
    let mut bitmap = RoaringBitmap::from([7]);
    bitmap.optimize();
    let header = snapshot::header_for(2, 4, l.region_count(), l.granularity_bytes, 1, &bitmap);
    let slot = snapshot::encode(&UUID, &header, &bitmap);
    image[l.snapshot_b.offset as usize..l.snapshot_b.offset as usize + slot.len()]
        .copy_from_slice(&slot);
    let put = |image: &mut Vec<u8>, epoch: u64, sequence: u64, op: JournalOp, region: u32| {
        let block = LogBlock {
            epoch,
            sequence,
            commit_offset: 0,
            records: vec![LogRecord {
                op,
                start: region,
                count: 1,
            }],
        };
        let at = (l.log.offset + (sequence % 4) * META_BLOCK_BYTES) as usize;
        image[at..at + 4096].copy_from_slice(&journal_log::encode(&UUID, &block));
    };
    put(&mut image, 2, 5, JournalOp::Set, 9);
    put(&mut image, 1, 6, JournalOp::Clear, 7); // position 2: stale, older epoch
    put(&mut image, 1, 3, JournalOp::Clear, 7); // position 3: stale, older lap
    let (r, report) = MetaEngine::recover(&image, None).unwrap();
    assert_eq!(
        (report.replay.snapshot_epoch, report.replay.blocks_replayed),
        (2, 1)
    );
    assert_eq!(report.replay.stop_reason, "older-epoch");
    assert!(
        r.dirty_bitmap().contains(7),
        "a stale clear must never replay"
    );
    assert!(r.dirty_bitmap().contains(9));
}

#[test]
fn compaction_cycles_through_the_ring_and_recovers() {
    let (mut e, mut disk) = setup();
    for i in 0..40 {
        broken_write(&mut e, &mut disk, i + 1, 100 + i * 3);
    }
    // 40 single-block commits on a 4-block ring: a snapshot every fifth sequence.
    assert_eq!(
        e.stats().journal.snapshots_written,
        8,
        "{:?}",
        e.stats().journal
    );
    let r = recover(&disk.durable_image()).unwrap();
    for i in 0..40 {
        assert!(r.dirty_bitmap().contains((100 + i * 3) as u32));
    }
}

/// Bitmap memory at 1 TiB / 4 KiB (2^28 regions). Roaring does not report its heap use;
/// we count each container's store (array: 2 bytes per value; bitset: 8 KiB; run: 4
/// bytes per run + 2) plus 64 bytes per container for the container struct and vector
/// slack — an overestimate.
fn memory_bytes(bitmap: &RoaringBitmap) -> u64 {
    let s = bitmap.statistics();
    2 * u64::from(s.n_values_array_containers)
        + 8192 * u64::from(s.n_bitset_containers)
        + s.n_bytes_run_containers
        + 64 * u64::from(s.n_containers)
}

#[test]
fn bitmap_memory_for_one_tib() {
    let regions: u32 = 1 << 28;
    let mut full = RoaringBitmap::new();
    full.insert_range(0..regions);
    full.optimize();
    let full_bytes = memory_bytes(&full);
    println!(
        "1 TiB fully dirty at 4 KiB: {} containers, ~{} bytes in memory, {} bytes serialized",
        full.statistics().n_containers,
        full_bytes,
        full.serialized_size()
    );
    assert!(
        full_bytes < 1 << 20,
        "fully dirty 1 TiB must stay under 1 MiB"
    );

    // 10 % of regions dirty at random: one 65536-region pattern with exactly 6554
    // random bits, rotated differently for every container (the memory depends only on
    // each container's cardinality, and a 10 % sample puts ~6554 in each).
    let mut rng = super::sim::SimRng::new(10);
    let mut pattern = vec![0u8; 8192];
    let mut set = 0;
    while set < 6554 {
        let bit = rng.below(65536) as usize;
        if pattern[bit / 8] & (1 << (bit % 8)) == 0 {
            pattern[bit / 8] |= 1 << (bit % 8);
            set += 1;
        }
    }
    let mut bytes = vec![0u8; (regions / 8) as usize];
    for (key, chunk) in bytes.chunks_mut(8192).enumerate() {
        let r = (key * 37) % 8192;
        chunk[..8192 - r].copy_from_slice(&pattern[r..]);
        chunk[8192 - r..].copy_from_slice(&pattern[..r]);
    }
    let mut sparse = RoaringBitmap::from_lsb0_bytes(0, &bytes);
    assert_eq!(sparse.len(), 6554 * 4096);
    sparse.optimize();
    let sparse_bytes = memory_bytes(&sparse);
    println!(
        "1 TiB with 10 % random 4 KiB regions dirty: {} regions, ~{} bytes ({:.1} MiB) in memory, {} bytes serialized",
        sparse.len(),
        sparse_bytes,
        sparse_bytes as f64 / (1 << 20) as f64,
        sparse.serialized_size()
    );
    assert!(sparse_bytes <= 33 << 20);
}
