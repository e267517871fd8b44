//! Golden CLUSTER partition images: each format version's checked-in image decodes to
//! fixed expected fields, and re-encoding every decoded structure gives the same bytes.
//!
//! `tests/golden/meta_v1.img` was produced by `build_v1()` below. It is never rewritten
//! by the test run: set MIRRORDISK_REGEN_GOLDEN=1 to write a fresh one, and only when a
//! new format version is introduced (then add `meta_v2.img`, keep v1 and its test).

use mirrordisk::core::meta::activity_log;
use mirrordisk::core::meta::engine::{Gate, MetaEngine, MetaIoKind, Mode, WriteId};
use mirrordisk::core::meta::generation::Flags;
use mirrordisk::core::meta::journal_log;
use mirrordisk::core::meta::snapshot;
use mirrordisk::core::meta::superblock::{self, CopyCondition, CopyId, Superblock};
use mirrordisk::core::meta::{ByteRange, CreateParams, DiskState, META_BLOCK_BYTES, Role};

const V1_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/meta_v1.img");
const UUID: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

/// Executes every metadata I/O at once on an in-memory image.
fn drive(engine: &mut MetaEngine, image: &mut [u8]) {
    while let Some(io) = engine.poll_io() {
        if let MetaIoKind::Write { offset, bytes } = &io.kind {
            image[*offset as usize..*offset as usize + bytes.len()].copy_from_slice(bytes);
        }
        engine.handle_io_done(io.id, Ok(())).unwrap();
    }
}

fn write(engine: &mut MetaEngine, image: &mut [u8], id: u64, offset: u64, length: u64) {
    let gate = engine.handle_write_start(WriteId(id), ByteRange::new(offset, length));
    assert_ne!(gate, Gate::Failed);
    drive(engine, image);
    while engine.poll_ready().is_some() {}
    while engine.poll_ackable().is_some() {}
    engine.handle_write_done(WriteId(id), false);
}

/// The generator of the v1 image (a 64 MiB volume, 64 KiB CLUSTER partition).
fn build_v1() -> Vec<u8> {
    let mut p = CreateParams::new(UUID, "golden-v1", 1, 2, 64 << 20);
    p.al_slot_count = 16;
    p.cluster_bytes = Some(64 * 1024);
    let (mut e, create) = MetaEngine::create(&p).unwrap();
    let mut image = create.to_bytes(e.layout().cluster_bytes);
    write(&mut e, &mut image, 1, 12 << 20, 4096); // Connected: extent 3 becomes hot
    e.handle_write_durable(WriteId(1));
    e.set_mode(Mode::Broken, &[]);
    write(&mut e, &mut image, 2, 5 * 4096, 4096); // region 5
    write(&mut e, &mut image, 3, 6 * 4096, 3 * 4096); // regions 6..=8
    e.request_compaction();
    drive(&mut e, &mut image); // snapshot epoch 2
    write(&mut e, &mut image, 4, 9000 * 4096, 4096); // region 9000, epoch-2 block
    e.mark_clean(&[ByteRange::new(5 * 4096, 4096)]);
    drive(&mut e, &mut image);
    e.update_superblock(|s| {
        s.generations.new_current(0x1122_3344_5566_7788);
        s.disk_state = DiskState::UpToDate;
        s.role = Role::Primary;
        s.flags.insert(Flags::WAS_PRIMARY);
        s.flags.insert(Flags::CRASHED_PRIMARY);
    });
    drive(&mut e, &mut image);
    image
}

fn golden_v1() -> Vec<u8> {
    if std::env::var_os("MIRRORDISK_REGEN_GOLDEN").is_some() {
        std::fs::write(V1_PATH, build_v1()).unwrap();
    }
    std::fs::read(V1_PATH).expect("tests/golden/meta_v1.img is checked in")
}

#[test]
fn v1_decodes_to_the_expected_fields() {
    let image = golden_v1();
    assert_eq!(image.len(), 64 * 1024);
    let picked = superblock::pick(&image[..4096], &image[4096..8192], None).unwrap();
    assert_eq!(picked.copy, CopyId::A);
    assert_eq!(
        picked.conditions,
        [
            CopyCondition::InUse { sequence: 3 },
            CopyCondition::Stale { sequence: 2 }
        ]
    );
    let sb = &picked.superblock;
    assert_eq!(sb.identity.mirror_uuid, UUID);
    assert_eq!(
        (
            sb.name.as_str(),
            sb.identity.node_id,
            sb.identity.peer_node_id
        ),
        ("golden-v1", 1, 2)
    );
    let l = &sb.layout;
    assert_eq!(
        (l.cluster_bytes, l.data_offset, l.data_bytes),
        (65536, 1 << 20, 64 << 20)
    );
    assert_eq!(
        (
            l.logical_block_bytes,
            l.granularity_bytes,
            l.al_extent_bytes,
            l.al_slot_count
        ),
        (4096, 4096, 4 << 20, 16)
    );
    assert_eq!((l.al.offset, l.al.size), (8192, 8192));
    assert_eq!((l.snapshot_a.offset, l.snapshot_a.size), (16384, 16384));
    assert_eq!((l.snapshot_b.offset, l.snapshot_b.size), (32768, 16384));
    assert_eq!((l.log.offset, l.log.size), (49152, 16384));
    let g = sb.state.generations;
    assert_eq!(
        (g.current, g.bitmap, g.history),
        (0x1122_3344_5566_7788, 4, [0, 0])
    );
    assert_eq!(
        (sb.state.disk_state, sb.state.role),
        (DiskState::UpToDate, Role::Primary)
    );
    assert_eq!(
        sb.state.flags.bits(),
        0b10_0011,
        "full-sync-required, was-primary, crashed-primary"
    );

    let (engine, report) = MetaEngine::recover(&image, None).unwrap();
    assert_eq!(
        (report.al_slot, report.al_sequence, report.al_hot_extents),
        (1, 2, 1)
    );
    assert_eq!(engine.hot_extents(), vec![3]);
    assert_eq!(
        (
            report.replay.snapshot_slot,
            report.replay.snapshot_epoch,
            report.replay.snapshot_sequence
        ),
        (1, 2, 3)
    );
    assert_eq!(
        (
            report.replay.blocks_replayed,
            report.replay.stopped_at_sequence
        ),
        (2, 6)
    );
    let journal: Vec<u32> = engine
        .dirty_bitmap()
        .iter()
        .filter(|r| !(3072..4096).contains(r))
        .collect();
    assert_eq!(
        journal,
        vec![6, 7, 8, 9000],
        "region 5 cleared; the extent-3 regions come from the AL"
    );
    assert_eq!(report.journal_dirty_regions, 4);
    assert_eq!(report.dirty_regions, 4 + 1024);
}

#[test]
fn v1_reencodes_to_the_same_bytes() {
    let image = golden_v1();
    for copy in [0usize, 4096] {
        let bytes = &image[copy..copy + 4096];
        assert_eq!(Superblock::decode(bytes).unwrap().encode(), bytes);
    }
    let sb = Superblock::decode(&image[..4096]).unwrap();
    let l = sb.layout;
    let record_bytes = l.al_record_bytes() as usize;
    for slot in 0..2 {
        let at = l.al.offset as usize + slot * record_bytes;
        let bytes = &image[at..at + record_bytes];
        let record = activity_log::decode(bytes, &UUID, l.al_slot_count, l.extent_count()).unwrap();
        assert_eq!(activity_log::encode(&UUID, l.al_slot_count, &record), bytes);
    }
    let mut valid_blocks = 0;
    for i in 0..l.log_block_count() as usize {
        let at = l.log.offset as usize + i * META_BLOCK_BYTES as usize;
        let bytes = &image[at..at + 4096];
        if let Ok(block) = journal_log::decode(bytes, &UUID, l.region_count()) {
            assert_eq!(journal_log::encode(&UUID, &block), bytes);
            valid_blocks += 1;
        }
    }
    assert_eq!(
        valid_blocks, 3,
        "epoch-1 block 2 is stale (block 1 was overwritten by 5), blocks 4 and 5 are live"
    );
    for slot in 0..2 {
        let area = l.snapshot_slot(slot);
        let bytes = &image[area.offset as usize..area.end() as usize];
        let (header, bitmap) =
            snapshot::decode(bytes, &UUID, l.region_count(), l.granularity_bytes).unwrap();
        let encoded = snapshot::encode(&UUID, &header, &bitmap);
        assert_eq!(encoded, &bytes[..encoded.len()]);
        assert!(bytes[encoded.len()..].iter().all(|&b| b == 0));
    }
}

#[test]
fn v1_inspect_view() {
    let view = mirrordisk::core::meta::inspect::inspect(&golden_v1()).unwrap();
    assert_eq!(
        (view.superblock_copy_in_use, view.superblock_sequence),
        ("A", 3)
    );
    assert_eq!(view.superblock_copies[1].condition, "stale");
    assert_eq!(
        view.flags,
        vec!["was-primary", "crashed-primary", "full-sync-required"]
    );
    let journal = view.journal.as_ref().unwrap();
    assert_eq!(
        (journal.dirty_regions, journal.dirty_bytes),
        (1028, 1028 * 4096)
    );
    assert_eq!(
        (journal.log_blocks_replayed, journal.log_ring_blocks),
        (2, 4)
    );
    let json = serde_json::to_string(&view).unwrap();
    assert!(json.contains("\"disk_state\":\"UpToDate\""));
}

#[test]
fn v1_generator_is_deterministic() {
    // The generator itself is part of the golden contract: it must still produce a
    // valid image with the same decoded content (bytes may differ only if the engine's
    // commit grouping changes, which is not a format change).
    let built = build_v1();
    let (a, _) = MetaEngine::recover(&built, None).unwrap();
    let (b, _) = MetaEngine::recover(&golden_v1(), None).unwrap();
    assert_eq!(a.dirty_bitmap(), b.dirty_bitmap());
    assert_eq!(a.superblock(), b.superblock());
}
