//! `mirrorctl` commands that work on a device directly (no agent): `create` writes a
//! fresh CLUSTER partition, `inspect` dumps it.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::core::meta::engine::dirty_bytes;
use crate::core::meta::generation::{GENERATION_JUST_CREATED, GENERATION_NONE};
use crate::core::meta::inspect::{InspectView, inspect};
use crate::core::meta::{
    CopyId, CreateParams, DiskState, Flags, Generations, Layout, MetaEngine, Placement,
};
use crate::shell::disk::open_backing;
use crate::shell::metadata::{open_device, probe_signatures, read_area, write_create_image};

/// Everything `mirrorctl create` was given.
#[derive(Debug, Clone)]
pub struct CreateArgs {
    pub device: PathBuf,
    pub mirror: String,
    pub node: u32,
    pub peer: u32,
    pub metadata: Option<PathBuf>,
    pub data_bytes: Option<u64>,
    pub cluster_bytes: Option<u64>,
    pub granularity_bytes: u32,
    pub al_slot_count: u32,
    pub mirror_uuid: Option<[u8; 16]>,
    pub force: bool,
    /// Both disks are brand-new and identical (e.g. all zeros): start UpToDate with a
    /// generation derived from the mirror UUID, skipping the first full copy.
    pub blank: bool,
}

/// The mirror-set UUID both nodes derive from the mirror's name, so `create` run
/// independently on each node yields disks that recognise each other, and disks of
/// differently named mirrors never do. `--uuid` overrides it.
pub fn mirror_uuid_for(name: &str) -> [u8; 16] {
    let digest = Sha256::new()
        .chain_update(b"mirrordisk mirror-set v1\0")
        .chain_update(name.as_bytes())
        .finalize();
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&digest[..16]);
    uuid
}

/// Parses a UUID written as 32 hex digits, dashes allowed anywhere.
pub fn parse_uuid(text: &str) -> Result<[u8; 16], String> {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("{text:?} is not a UUID (32 hex digits)"));
    }
    let mut uuid = [0u8; 16];
    for (i, byte) in uuid.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("checked hex");
    }
    Ok(uuid)
}

pub fn format_uuid(uuid: &[u8; 16]) -> String {
    let hex: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Writes fresh metadata. Refuses (writing nothing) a device that is too small or
/// carries any known signature, unless `force`.
pub fn create(args: &CreateArgs) -> Result<String, String> {
    // The data device: its size and logical block decide the layout. Opening it also
    // refuses a mounted block device (O_EXCL).
    let data = open_backing(&args.device, false).map_err(|e| e.to_string())?;
    let logical_block_bytes = data.logical_block_bytes.max(512);
    let data_device_bytes = data.size_bytes;
    drop(data);
    let meta_path: &Path = args.metadata.as_deref().unwrap_or(&args.device);
    let meta = open_device(meta_path, true)?;
    let signatures =
        probe_signatures(&meta.file).map_err(|e| format!("{}: {e}", meta_path.display()))?;
    if !signatures.is_empty() && !args.force {
        return Err(format!(
            "{} already holds: {}; refusing to overwrite it (use --force if you mean to)",
            meta_path.display(),
            signatures.join(", ")
        ));
    }
    let placement = if args.metadata.is_some() {
        Placement::External
    } else {
        Placement::Internal
    };
    let mut params = CreateParams::new(
        args.mirror_uuid
            .unwrap_or_else(|| mirror_uuid_for(&args.mirror)),
        &args.mirror,
        args.node,
        args.peer,
        args.data_bytes.unwrap_or(data_device_bytes),
    );
    params.granularity_bytes = args.granularity_bytes;
    params.logical_block_bytes = logical_block_bytes;
    params.al_slot_count = args.al_slot_count;
    params.placement = placement;
    params.cluster_bytes = args.cluster_bytes;
    if args.data_bytes.is_none() {
        params.data_bytes = largest_data_partition(&params, data_device_bytes)?;
    }
    let layout = match placement {
        Placement::Internal => params.validate_for_device(data_device_bytes),
        Placement::External => {
            if params.data_bytes > data_device_bytes {
                return Err(format!(
                    "--data-size {} is larger than {} ({} bytes)",
                    params.data_bytes,
                    args.device.display(),
                    data_device_bytes
                ));
            }
            params.validate_for_device(meta.size_bytes)
        }
    }
    .map_err(|e| e.to_string())?;
    let (engine, mut image) = MetaEngine::create(&params).map_err(|e| e.to_string())?;
    if args.blank {
        image.superblocks = blank_superblocks(&engine);
    }
    write_create_image(&meta.file, 0, &image)
        .map_err(|e| format!("{}: writing metadata: {e}", meta_path.display()))?;
    Ok(describe_layout(
        &args.mirror,
        &params.mirror_uuid,
        &layout,
        args.blank,
    ))
}

/// The current generation of a `--blank` disk: derived from the mirror UUID alone, so
/// `create --blank` run independently on both nodes gives both disks the same
/// generation, and the first connection finds them in sync (no full copy). Never one
/// of the reserved values (none, just created).
pub fn blank_generation(mirror_uuid: &[u8; 16]) -> u64 {
    let digest = Sha256::new()
        .chain_update(b"mirrordisk blank generation v1\0")
        .chain_update(mirror_uuid)
        .finalize();
    let mut value = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
    while value == GENERATION_NONE || value == GENERATION_JUST_CREATED {
        value = value.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    }
    value
}

/// The two superblock copies of a `--blank` disk: as `MetaEngine::create` made them,
/// but UpToDate, without FULL_SYNC_REQUIRED, and with the blank generation. Re-encoded
/// with the same sequence numbers (A = 1, B = 2) as the created ones.
fn blank_superblocks(engine: &MetaEngine) -> Vec<(u64, Vec<u8>)> {
    let mut superblock = engine.superblock().clone();
    superblock.state.generations = Generations {
        current: blank_generation(&superblock.identity.mirror_uuid),
        bitmap: GENERATION_NONE,
        history: [GENERATION_NONE; 2],
    };
    superblock.state.disk_state = DiskState::UpToDate;
    superblock.state.flags.remove(Flags::FULL_SYNC_REQUIRED);
    superblock.sequence = 1;
    let a = superblock.encode();
    superblock.sequence = 2;
    let b = superblock.encode();
    vec![(CopyId::A.offset(), a), (CopyId::B.offset(), b)]
}

/// For a device without `--data-size`: the largest data partition that fits after its
/// own CLUSTER partition (whose size depends on the data size, hence the iteration;
/// it shrinks monotonically and settles in a few rounds).
fn largest_data_partition(params: &CreateParams, device_bytes: u64) -> Result<u64, String> {
    let block = u64::from(params.logical_block_bytes).max(4096);
    let mut trial = params.clone();
    if params.placement == Placement::External {
        trial.data_bytes = device_bytes / block * block;
        return Ok(trial.data_bytes);
    }
    trial.data_bytes = device_bytes / block * block;
    for _ in 0..8 {
        let layout = trial.validate().map_err(|e| e.to_string())?;
        let fits = device_bytes.saturating_sub(layout.data_offset) / block * block;
        if fits == 0 {
            return Err(format!(
                "a {device_bytes}-byte device is too small for any data partition"
            ));
        }
        if fits >= trial.data_bytes {
            return Ok(trial.data_bytes);
        }
        trial.data_bytes = fits;
    }
    Ok(trial.data_bytes)
}

fn describe_layout(name: &str, uuid: &[u8; 16], layout: &Layout, blank: bool) -> String {
    let state = if blank {
        "UpToDate (--blank: no first full copy; both disks must really be identical, e.g. new and all zeros)"
    } else {
        "Inconsistent (needs its first full copy: mirrorctl rebuild --full)"
    };
    format!(
        "created mirror {name} (uuid {})\n  CLUSTER partition: {} bytes ({:?})\n  data partition: offset {}, {} bytes\n  granularity {} bytes, activity log {} x {} bytes\n  state: {state}",
        format_uuid(uuid),
        layout.cluster_bytes,
        layout.placement,
        layout.data_offset,
        layout.data_bytes,
        layout.granularity_bytes,
        layout.al_slot_count,
        layout.al_extent_bytes
    )
}

/// What `mirrorctl inspect` prints.
#[derive(Debug, serde::Serialize)]
pub struct InspectReport {
    #[serde(flatten)]
    pub view: InspectView,
    /// With `--regions`: the dirty byte ranges `[start, end)` of the data partition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_ranges: Option<Vec<[u64; 2]>>,
}

pub fn inspect_device(device: &Path, regions: bool) -> Result<InspectReport, String> {
    let file = std::fs::File::open(device).map_err(|e| format!("{}: {e}", device.display()))?;
    let (area, _) = read_area(&file, 0).map_err(|e| format!("{}: {e}", device.display()))?;
    let view = inspect(&area).map_err(|e| format!("{}: {e}", device.display()))?;
    let dirty_ranges = if regions {
        let (engine, _) =
            MetaEngine::recover(&area, None).map_err(|e| format!("{}: {e}", device.display()))?;
        let layout = engine.layout();
        let granularity = u64::from(layout.granularity_bytes);
        let mut ranges: Vec<[u64; 2]> = Vec::new();
        for region in engine.dirty_bitmap() {
            let start = u64::from(region) * granularity;
            let end = (start + granularity).min(layout.data_bytes);
            match ranges.last_mut() {
                Some(last) if last[1] == start => last[1] = end,
                _ => ranges.push([start, end]),
            }
        }
        debug_assert_eq!(
            ranges.iter().map(|r| r[1] - r[0]).sum::<u64>(),
            dirty_bytes(engine.dirty_bitmap(), layout)
        );
        Some(ranges)
    } else {
        None
    };
    Ok(InspectReport { view, dirty_ranges })
}

/// The human-readable form of an inspect report.
pub fn render_inspect(report: &InspectReport) -> String {
    let v = &report.view;
    let mut out = String::new();
    let mut line = |k: &str, val: String| out.push_str(&format!("{k:<24} {val}\n"));
    line("mirror", format!("{} ({})", v.name, v.mirror_uuid));
    line("format version", v.format_version.to_string());
    line("node / peer", format!("{} / {}", v.node_id, v.peer_node_id));
    line("disk state", format!("{:?}", v.disk_state));
    line("role", format!("{:?}", v.role));
    line(
        "flags",
        if v.flags.is_empty() {
            "-".into()
        } else {
            v.flags.join(", ")
        },
    );
    line(
        "generations",
        format!(
            "current {:016x} bitmap {:016x} history {:016x} {:016x}",
            v.generations.current,
            v.generations.bitmap,
            v.generations.history[0],
            v.generations.history[1]
        ),
    );
    line(
        "superblock in use",
        format!(
            "{} (sequence {})",
            v.superblock_copy_in_use, v.superblock_sequence
        ),
    );
    for copy in &v.superblock_copies {
        line(
            &format!("  copy {}", copy.copy),
            format!("{} {}", copy.condition, copy.detail),
        );
    }
    line(
        "CLUSTER partition",
        format!(
            "{} bytes ({:?})",
            v.layout.cluster_bytes, v.layout.placement
        ),
    );
    line(
        "data partition",
        format!(
            "offset {}, {} bytes",
            v.layout.data_offset, v.layout.data_bytes
        ),
    );
    line(
        "granularity",
        format!("{} bytes", v.layout.granularity_bytes),
    );
    match &v.journal {
        Some(j) => {
            line(
                "activity log",
                format!(
                    "{} hot extents (record {}, sequence {})",
                    j.al_hot_extents, j.al_slot, j.al_sequence
                ),
            );
            line("journal fill", format!("{:.1} %", j.journal_fill * 100.0));
            line(
                "dirty",
                format!("{} regions, {} bytes", j.dirty_regions, j.dirty_bytes),
            );
        }
        None => line("journal", v.recovery_error.clone().unwrap_or_default()),
    }
    if let Some(ranges) = &report.dirty_ranges {
        for r in ranges {
            out.push_str(&format!("  dirty [{}, {})\n", r[0], r[1]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_from_name_is_stable_and_distinct() {
        assert_eq!(mirror_uuid_for("db"), mirror_uuid_for("db"));
        assert_ne!(mirror_uuid_for("db"), mirror_uuid_for("db2"));
    }

    #[test]
    fn blank_generation_is_shared_and_never_reserved() {
        let uuid = mirror_uuid_for("db");
        assert_eq!(blank_generation(&uuid), blank_generation(&uuid));
        assert_ne!(
            blank_generation(&uuid),
            blank_generation(&mirror_uuid_for("db2"))
        );
        assert_ne!(blank_generation(&uuid), GENERATION_JUST_CREATED);
        assert_ne!(blank_generation(&uuid), GENERATION_NONE);
    }

    #[test]
    fn uuid_round_trips() {
        let uuid = mirror_uuid_for("x");
        assert_eq!(parse_uuid(&format_uuid(&uuid)).unwrap(), uuid);
        assert!(parse_uuid("xyz").is_err());
    }
}
