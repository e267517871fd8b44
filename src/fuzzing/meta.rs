//! Fuzz checks for the CLUSTER partition decoders: superblock, journal replay, snapshot,
//! activity-log record.
//!
//! Each function takes arbitrary bytes, must never panic on them, and checks a property
//! beyond "no panic": a round trip (what decodes re-encodes to the same bytes or the same
//! value) or a structural invariant of the result.

use roaring::RoaringBitmap;

use crate::core::meta::activity_log::{self, AlRecord};
use crate::core::meta::codec::seal;
use crate::core::meta::journal::replay;
use crate::core::meta::journal_log::{self, JournalOp, LogBlock, LogRecord};
use crate::core::meta::snapshot::{self, SnapshotHeader};
use crate::core::meta::superblock::{self, Superblock};
use crate::core::meta::{JOURNAL_COMMIT_BLOCKS_MAX, META_BLOCK_BYTES};

/// Superblock: whatever decodes re-encodes to the identical 4 KiB, its layout validates,
/// and `pick` over two copies never panics and picks a copy that decodes.
pub fn superblock_decode(data: &[u8]) {
    let block = META_BLOCK_BYTES as usize;
    let first = &data[..data.len().min(block)];
    if let Ok(sb) = Superblock::decode(first) {
        assert_eq!(sb.layout.validate(), Ok(()));
        assert_eq!(
            sb.encode(),
            first,
            "decode then encode must give the same bytes"
        );
    }
    if data.len() >= 2 * block
        && let Ok(p) = superblock::pick(&data[..block], &data[block..2 * block], None)
    {
        let chosen = &data[p.copy.index() * block..(p.copy.index() + 1) * block];
        assert_eq!(Superblock::decode(chosen).as_ref(), Ok(&p.superblock));
    }
}

const FUZZ_UUID: [u8; 16] = [0xF0; 16];
const FUZZ_REGIONS: u64 = 1 << 20;
const FUZZ_RING_BLOCKS: u64 = 8;

/// Journal replay over a ring built from the input. The input is read as 16-byte block
/// descriptors (ring position, epoch and sequence offsets, op, range, damage) that are
/// encoded into valid, checksummed blocks — random bytes would almost never pass a
/// crc32c — and then optionally damaged. Checks: replay stops within one ring, every
/// bit is in range, the replayed count matches the stop sequence, and replaying the same
/// log again onto the result changes nothing (replay of a suffix is idempotent, the
/// property compaction relies on).
pub fn journal_replay(data: &[u8]) {
    let block = META_BLOCK_BYTES as usize;
    let mut log = vec![0u8; FUZZ_RING_BLOCKS as usize * block];
    let base_epoch = 5u64;
    let base_sequence = 100u64;
    for d in data.chunks_exact(16) {
        let position = u64::from(d[0]) % FUZZ_RING_BLOCKS;
        let epoch = base_epoch + u64::from(d[1] % 3) - 1;
        let sequence = base_sequence + u64::from(d[2] % 24);
        let op = if d[3] & 1 == 0 {
            JournalOp::Set
        } else {
            JournalOp::Clear
        };
        let start = u32::from_le_bytes([d[4], d[5], d[6], d[7]]) % FUZZ_REGIONS as u32;
        let count = 1 + u32::from_le_bytes([d[8], d[9], d[10], d[11]]) % 4096;
        let count = count.min(FUZZ_REGIONS as u32 - start);
        let commit_offset = u32::from(d[12]) % JOURNAL_COMMIT_BLOCKS_MAX as u32;
        let records = (0..=d[13] % 4)
            .map(|i| LogRecord {
                op,
                start: start.saturating_sub(u32::from(i)),
                count,
            })
            .collect();
        let encoded = journal_log::encode(
            &FUZZ_UUID,
            &LogBlock {
                epoch,
                sequence,
                commit_offset,
                records,
            },
        );
        let at = position as usize * block;
        log[at..at + block].copy_from_slice(&encoded);
        if d[14] & 1 == 1 {
            log[at + usize::from(d[15]) * 16 % block] ^= d[14] | 1;
        }
    }
    if !data.len().is_multiple_of(16) {
        // Leftover bytes land raw in block 0: arbitrary content must not panic either.
        let rest = &data[data.len() - data.len() % 16..];
        log[..rest.len()].copy_from_slice(rest);
    }
    let header = SnapshotHeader {
        epoch: base_epoch,
        sequence: base_sequence,
        region_count: FUZZ_REGIONS,
        granularity_bytes: 4096,
        coarsen_unit_regions: 1,
        payload_bytes: 0,
        payload_crc32c: 0,
    };
    let mut bitmap = RoaringBitmap::from([1, 2, 3, 500_000]);
    let report = replay(&mut bitmap, &header, &log, &FUZZ_UUID, FUZZ_REGIONS);
    assert!(report.blocks_replayed <= FUZZ_RING_BLOCKS);
    assert_eq!(
        report.stopped_at_sequence,
        base_sequence + 1 + report.blocks_replayed
    );
    assert!(bitmap.max().is_none_or(|m| u64::from(m) < FUZZ_REGIONS));
    let mut again = bitmap.clone();
    let second = replay(&mut again, &header, &log, &FUZZ_UUID, FUZZ_REGIONS);
    assert_eq!(second, report);
    assert_eq!(
        again, bitmap,
        "replaying the same blocks twice must be idempotent"
    );
}

/// Snapshot: a payload that decodes re-serializes to a bitmap that decodes equal; a
/// whole slot that decodes re-encodes with the same header fields and payload.
pub fn snapshot_decode(data: &[u8]) {
    if let Ok(bitmap) = snapshot::decode_payload(data, 1 << 32) {
        let mut bytes = Vec::new();
        bitmap
            .serialize_into(&mut bytes)
            .expect("serialize into a Vec");
        assert_eq!(
            snapshot::decode_payload(&bytes, 1 << 32).as_ref(),
            Ok(&bitmap)
        );
    }
    if let Ok(header) = snapshot::decode_header(data, &FUZZ_UUID)
        && let Ok((h, bitmap)) = snapshot::decode(
            data,
            &FUZZ_UUID,
            header.region_count,
            header.granularity_bytes,
        )
    {
        assert_eq!(h, header);
        let mut optimized = bitmap.clone();
        optimized.optimize();
        let rebuilt = snapshot::header_for(
            h.epoch,
            h.sequence,
            h.region_count,
            h.granularity_bytes,
            h.coarsen_unit_regions,
            &optimized,
        );
        let slot = snapshot::encode(&FUZZ_UUID, &rebuilt, &optimized);
        let (h2, b2) = snapshot::decode(&slot, &FUZZ_UUID, h.region_count, h.granularity_bytes)
            .expect("re-encoded slot decodes");
        assert_eq!(
            (h2.epoch, h2.sequence, h2.region_count),
            (h.epoch, h.sequence, h.region_count)
        );
        assert_eq!(b2, bitmap);
    }
}

/// Activity-log record: the input's first four bytes choose the slot count (1..=1024)
/// and the volume's extent count, the rest fills the record (zero-padded). It is decoded
/// as it is, and again after sealing it (a valid crc32c, so the field checks behind the
/// checksum are reached). Whatever decodes re-encodes to the identical bytes and holds
/// strictly ascending, in-range extents.
pub fn activity_log_decode(data: &[u8]) {
    let Some((head, body)) = data.split_first_chunk::<4>() else {
        return;
    };
    let slots = 1 + u32::from(u16::from_le_bytes([head[0], head[1]])) % 1024;
    let extent_count = 1 + u64::from(u16::from_le_bytes([head[2], head[3]]));
    let mut record = vec![0u8; activity_log::record_bytes(slots) as usize];
    let n = body.len().min(record.len());
    record[..n].copy_from_slice(&body[..n]);
    check_al_record(&record, slots, extent_count);
    seal(&mut record);
    check_al_record(&record, slots, extent_count);
}

fn check_al_record(record: &[u8], slots: u32, extent_count: u64) {
    if let Ok(r) = activity_log::decode(record, &FUZZ_UUID, slots, extent_count) {
        assert!(r.extents.len() <= slots as usize);
        assert!(r.extents.windows(2).all(|w| w[0] < w[1]));
        assert!(r.extents.iter().all(|&e| u64::from(e) < extent_count));
        assert_eq!(
            activity_log::encode(&FUZZ_UUID, slots, &r),
            record,
            "decode then encode must give the same bytes"
        );
    }
}

/// Seed inputs for the CLUSTER partition targets (used to write fuzz/corpus and by tests).
pub fn seed_corpus() -> Vec<(&'static str, String, Vec<u8>)> {
    use crate::core::meta::engine::MetaEngine;
    use crate::core::meta::layout::CreateParams;
    let mut seeds = Vec::new();
    let mut p = CreateParams::new(FUZZ_UUID, "fuzz", 1, 2, 64 << 20);
    p.al_slot_count = 16;
    p.cluster_bytes = Some(64 * 1024);
    let (_, image) = MetaEngine::create(&p).expect("valid");
    let mut two = Vec::new();
    for (_, sb) in &image.superblocks {
        two.extend_from_slice(sb);
    }
    seeds.push(("meta_superblock", "create_pair".to_string(), two));
    seeds.push((
        "meta_superblock",
        "create_a".to_string(),
        image.superblocks[0].1.clone(),
    ));
    let mut descriptors = Vec::new();
    for i in 0..8u8 {
        descriptors.extend_from_slice(&[
            i + 1,
            1,
            i,
            i & 1,
            i,
            0,
            0,
            0,
            3,
            0,
            0,
            0,
            0,
            i % 3,
            0,
            0,
        ]);
    }
    seeds.push((
        "meta_journal_replay",
        "in_order".to_string(),
        descriptors.clone(),
    ));
    descriptors[16 * 3 + 14] = 1;
    seeds.push((
        "meta_journal_replay",
        "damaged_middle".to_string(),
        descriptors,
    ));
    let mut bm = RoaringBitmap::new();
    bm.insert_range(0..70_000);
    bm.extend([100_000, 100_002, 200_000]);
    bm.extend((300_000..310_000).step_by(2));
    bm.optimize();
    let mut payload = Vec::new();
    bm.serialize_into(&mut payload).expect("vec");
    seeds.push(("meta_snapshot", "payload_mixed".to_string(), payload));
    let slots: u32 = 64;
    let record = activity_log::encode(
        &FUZZ_UUID,
        slots,
        &AlRecord {
            sequence: 7,
            extents: vec![0, 3, 17, 900],
        },
    );
    let mut input = Vec::new();
    input.extend_from_slice(&((slots - 1) as u16).to_le_bytes());
    input.extend_from_slice(&999u16.to_le_bytes());
    input.extend_from_slice(&record);
    seeds.push((
        "meta_activity_log",
        "record_four_extents".to_string(),
        input,
    ));
    let header = snapshot::header_for(3, 17, 1 << 20, 4096, 1, &bm);
    seeds.push((
        "meta_snapshot",
        "slot_mixed".to_string(),
        snapshot::encode(&FUZZ_UUID, &header, &bm),
    ));
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_pass_their_checks() {
        for (target, _, bytes) in seed_corpus() {
            match target {
                "meta_superblock" => superblock_decode(&bytes),
                "meta_journal_replay" => journal_replay(&bytes),
                "meta_snapshot" => snapshot_decode(&bytes),
                "meta_activity_log" => activity_log_decode(&bytes),
                other => panic!("unknown target {other}"),
            }
        }
    }

    #[test]
    fn checks_survive_garbage() {
        let mut x = 1u64;
        for len in [0usize, 1, 15, 16, 100, 4096, 8192, 9000] {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (x >> 56) as u8
                })
                .collect();
            superblock_decode(&bytes);
            journal_replay(&bytes);
            snapshot_decode(&bytes);
            activity_log_decode(&bytes);
        }
    }
}
