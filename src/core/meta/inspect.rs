//! The operator's view of a CLUSTER partition (`mirrorctl inspect`), as a serializable struct.
//!
//! Built read-only from an image of the partition: the superblock pick (which copy is in
//! use and the condition of the other), every header field, the activity log, the
//! journal (snapshot, replay, fill) and the dirty set a recovery would produce.

use super::engine::{MetaEngine, dirty_bytes};
use super::generation::{DiskState, Generations, Role};
use super::layout::Layout;
use super::superblock::{self, CopyCondition, PickError};
use super::{FORMAT_VERSION, META_BLOCK_BYTES};

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CopyView {
    pub copy: &'static str,
    pub condition: &'static str,
    pub sequence: Option<u64>,
    pub detail: String,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct InspectView {
    pub format_version: u32,
    pub mirror_uuid: String,
    pub name: String,
    pub node_id: u32,
    pub peer_node_id: u32,
    pub superblock_copy_in_use: &'static str,
    pub superblock_sequence: u64,
    pub superblock_copies: Vec<CopyView>,
    pub layout: Layout,
    pub generations: Generations,
    pub disk_state: DiskState,
    pub role: Role,
    pub flags: Vec<&'static str>,
    /// Filled when the activity log and journal recover; otherwise `recovery_error` says why.
    pub journal: Option<JournalView>,
    pub recovery_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct JournalView {
    pub al_slot: usize,
    pub al_sequence: u64,
    pub al_hot_extents: u64,
    pub snapshot_slot: usize,
    pub snapshot_epoch: u64,
    pub snapshot_sequence: u64,
    pub log_blocks_replayed: u64,
    pub log_ring_blocks: u64,
    /// Used fraction of the log ring in the current epoch.
    pub journal_fill: f64,
    pub replay_stop_reason: String,
    /// Dirty regions in the journal, and after adding the hot extents (what a recovery yields).
    pub journal_dirty_regions: u64,
    pub dirty_regions: u64,
    pub dirty_bytes: u64,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn copy_view(copy: &'static str, c: &CopyCondition) -> CopyView {
    let sequence = match c {
        CopyCondition::InUse { sequence } | CopyCondition::Stale { sequence } => Some(*sequence),
        _ => None,
    };
    let detail = match c {
        CopyCondition::Invalid(f) => format!("{f:?}"),
        CopyCondition::NewerFormat { version } => format!("version {version}"),
        _ => String::new(),
    };
    CopyView {
        copy,
        condition: c.name(),
        sequence,
        detail,
    }
}

/// Inspects a CLUSTER partition image (at least the two superblock blocks; the journal
/// part is shown when the whole partition is given).
pub fn inspect(area: &[u8]) -> Result<InspectView, PickError> {
    let block = META_BLOCK_BYTES as usize;
    let (a, b) = if area.len() >= 2 * block {
        (&area[..block], &area[block..2 * block])
    } else {
        (area, area)
    };
    let picked = superblock::pick(a, b, None)?;
    let sb = &picked.superblock;
    let (journal, recovery_error) = match MetaEngine::recover(area, None) {
        Ok((engine, report)) => {
            let ring = sb.layout.log_block_count();
            let view = JournalView {
                al_slot: report.al_slot,
                al_sequence: report.al_sequence,
                al_hot_extents: report.al_hot_extents,
                snapshot_slot: report.replay.snapshot_slot,
                snapshot_epoch: report.replay.snapshot_epoch,
                snapshot_sequence: report.replay.snapshot_sequence,
                log_blocks_replayed: report.replay.blocks_replayed,
                log_ring_blocks: ring,
                journal_fill: report.replay.blocks_replayed as f64 / ring as f64,
                replay_stop_reason: report.replay.stop_reason.clone(),
                journal_dirty_regions: report.journal_dirty_regions,
                dirty_regions: report.dirty_regions,
                dirty_bytes: dirty_bytes(engine.dirty_bitmap(), &sb.layout),
            };
            (Some(view), None)
        }
        Err(e) => (None, Some(e.to_string())),
    };
    Ok(InspectView {
        format_version: FORMAT_VERSION,
        mirror_uuid: hex(&sb.identity.mirror_uuid),
        name: sb.name.clone(),
        node_id: sb.identity.node_id,
        peer_node_id: sb.identity.peer_node_id,
        superblock_copy_in_use: if picked.copy.index() == 0 { "A" } else { "B" },
        superblock_sequence: sb.sequence,
        superblock_copies: vec![
            copy_view("A", &picked.conditions[0]),
            copy_view("B", &picked.conditions[1]),
        ],
        layout: sb.layout,
        generations: sb.state.generations,
        disk_state: sb.state.disk_state,
        role: sb.state.role,
        flags: sb.state.flags.names(),
        journal,
        recovery_error,
    })
}
