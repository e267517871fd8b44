//! Where every area of the CLUSTER partition lives, computed from data size and granularity.
//!
//! Offsets are relative to the start of the CLUSTER partition (the head of the data device
//! for internal metadata, or the start of a separate metadata device). Everything is
//! 4 KiB aligned. Order: superblock A (block 0), superblock B (block 1), activity log,
//! snapshot slot A, snapshot slot B, log ring; the data partition starts at the next
//! 1 MiB boundary after the CLUSTER partition (internal) or at 0 of the data device
//! (external). The superblock records every area, so nothing is found by data size at a
//! fixed offset and a later version can grow the volume.

use super::{
    AL_EXTENT_BYTES, AL_SLOT_COUNT_MAX, AL_SLOT_COUNT_MIN, DATA_ALIGNMENT_BYTES,
    GRANULARITY_BYTES_MAX, GRANULARITY_BYTES_MIN, LOG_AREA_BYTES_DEFAULT, LOG_AREA_BYTES_MIN,
    LOGICAL_BLOCK_BYTES_MAX, LOGICAL_BLOCK_BYTES_MIN, META_BLOCK_BYTES, MIRROR_NAME_BYTES_MAX,
    REGION_COUNT_MAX, activity_log, round_down, round_up, snapshot,
};

/// One area of the CLUSTER partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Area {
    pub offset: u64,
    pub size: u64,
}

impl Area {
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.size)
    }
}

/// Where the CLUSTER partition is relative to the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Placement {
    /// At the head of the data device; the data partition follows it.
    Internal,
    /// On a separate metadata device; the data partition starts at `data_offset` (0).
    External,
}

impl Placement {
    pub fn to_u32(self) -> u32 {
        match self {
            Placement::Internal => 1,
            Placement::External => 2,
        }
    }

    pub fn from_u32(value: u32) -> Option<Placement> {
        match value {
            1 => Some(Placement::Internal),
            2 => Some(Placement::External),
            _ => None,
        }
    }
}

/// The validated geometry of one mirror disk. Private invariants: every area aligned, in
/// bounds, large enough and disjoint; see [`Layout::validate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Layout {
    pub cluster_bytes: u64,
    pub placement: Placement,
    pub data_offset: u64,
    pub data_bytes: u64,
    pub logical_block_bytes: u32,
    pub granularity_bytes: u32,
    pub al_extent_bytes: u32,
    pub al_slot_count: u32,
    pub al: Area,
    pub snapshot_a: Area,
    pub snapshot_b: Area,
    pub log: Area,
}

/// Superblock copies are at fixed places: the reader must find them without knowing
/// anything else.
pub const SUPERBLOCK_A: Area = Area {
    offset: 0,
    size: META_BLOCK_BYTES,
};
pub const SUPERBLOCK_B: Area = Area {
    offset: META_BLOCK_BYTES,
    size: META_BLOCK_BYTES,
};

/// Why a geometry (requested or decoded) is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayoutError {
    GranularityNotPowerOfTwo {
        granularity_bytes: u32,
    },
    GranularityOutOfRange {
        granularity_bytes: u32,
    },
    LogicalBlockSizeInvalid {
        logical_block_bytes: u32,
    },
    AlExtentSizeInvalid {
        al_extent_bytes: u32,
    },
    AlSlotCountOutOfRange {
        al_slot_count: u32,
    },
    DataSizeZero,
    DataSizeNotMultipleOfLogicalBlock {
        data_bytes: u64,
        logical_block_bytes: u32,
    },
    /// More than 2^32 regions; `granularity_needed` is the smallest that fits.
    TooManyRegions {
        data_bytes: u64,
        granularity_needed: u64,
    },
    ClusterSizeNotAligned {
        cluster_bytes: u64,
    },
    ClusterSizeTooSmall {
        cluster_bytes: u64,
        minimum_bytes: u64,
    },
    AreaMisaligned {
        area: &'static str,
    },
    AreaOutOfBounds {
        area: &'static str,
    },
    AreaTooSmall {
        area: &'static str,
        size: u64,
        minimum: u64,
    },
    AreasOverlap {
        first: &'static str,
        second: &'static str,
    },
    DataOffsetInvalid {
        data_offset: u64,
    },
    PlacementInvalid {
        value: u32,
    },
}

impl std::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayoutError::GranularityNotPowerOfTwo { granularity_bytes } => {
                write!(f, "granularity {granularity_bytes} is not a power of two")
            }
            LayoutError::GranularityOutOfRange { granularity_bytes } => write!(
                f,
                "granularity {granularity_bytes} is outside {GRANULARITY_BYTES_MIN}..={GRANULARITY_BYTES_MAX}"
            ),
            LayoutError::LogicalBlockSizeInvalid {
                logical_block_bytes,
            } => write!(
                f,
                "logical block size {logical_block_bytes} is not a power of two in {LOGICAL_BLOCK_BYTES_MIN}..={LOGICAL_BLOCK_BYTES_MAX}"
            ),
            LayoutError::AlExtentSizeInvalid { al_extent_bytes } => {
                write!(
                    f,
                    "activity-log extent size {al_extent_bytes} is not {AL_EXTENT_BYTES}"
                )
            }
            LayoutError::AlSlotCountOutOfRange { al_slot_count } => write!(
                f,
                "activity-log slot count {al_slot_count} is outside {AL_SLOT_COUNT_MIN}..={AL_SLOT_COUNT_MAX}"
            ),
            LayoutError::DataSizeZero => write!(f, "data size is zero"),
            LayoutError::DataSizeNotMultipleOfLogicalBlock {
                data_bytes,
                logical_block_bytes,
            } => {
                write!(
                    f,
                    "data size {data_bytes} is not a multiple of {logical_block_bytes}"
                )
            }
            LayoutError::TooManyRegions {
                data_bytes,
                granularity_needed,
            } => write!(
                f,
                "data size {data_bytes} needs more than 2^32 regions; use a granularity of at least {granularity_needed}"
            ),
            LayoutError::ClusterSizeNotAligned { cluster_bytes } => {
                write!(
                    f,
                    "cluster size {cluster_bytes} is not a multiple of {META_BLOCK_BYTES}"
                )
            }
            LayoutError::ClusterSizeTooSmall {
                cluster_bytes,
                minimum_bytes,
            } => write!(
                f,
                "cluster size {cluster_bytes} is too small; the minimum for this data size and granularity is {minimum_bytes}"
            ),
            LayoutError::AreaMisaligned { area } => write!(f, "area {area} is not 4 KiB aligned"),
            LayoutError::AreaOutOfBounds { area } => {
                write!(f, "area {area} lies outside the CLUSTER partition")
            }
            LayoutError::AreaTooSmall {
                area,
                size,
                minimum,
            } => {
                write!(f, "area {area} is {size} bytes, needs at least {minimum}")
            }
            LayoutError::AreasOverlap { first, second } => {
                write!(f, "areas {first} and {second} overlap")
            }
            LayoutError::DataOffsetInvalid { data_offset } => {
                write!(f, "data offset {data_offset} is invalid for this placement")
            }
            LayoutError::PlacementInvalid { value } => write!(f, "placement {value} is unknown"),
        }
    }
}

impl std::error::Error for LayoutError {}

/// Inputs to `mirrorctl create`, before validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateParams {
    pub mirror_uuid: [u8; 16],
    pub name: String,
    pub node_id: u32,
    pub peer_node_id: u32,
    pub data_bytes: u64,
    pub granularity_bytes: u32,
    pub logical_block_bytes: u32,
    pub al_slot_count: u32,
    pub placement: Placement,
    /// `--cluster-size`: a requested CLUSTER partition size; `None` for the worst case.
    pub cluster_bytes: Option<u64>,
}

/// Why `create`'s inputs are refused (nothing is written).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CreateError {
    Layout(LayoutError),
    NameEmpty,
    NameTooLong {
        bytes: usize,
    },
    NameHasNul,
    NodeIsPeer {
        node_id: u32,
    },
    /// The device cannot hold the CLUSTER partition plus the data partition.
    DeviceTooSmall {
        device_bytes: u64,
        needed_bytes: u64,
    },
}

impl std::fmt::Display for CreateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CreateError::Layout(e) => e.fmt(f),
            CreateError::NameEmpty => write!(f, "mirror name is empty"),
            CreateError::NameTooLong { bytes } => {
                write!(
                    f,
                    "mirror name is {bytes} bytes; at most {MIRROR_NAME_BYTES_MAX}"
                )
            }
            CreateError::NameHasNul => write!(f, "mirror name contains a NUL byte"),
            CreateError::NodeIsPeer { node_id } => {
                write!(f, "node id {node_id} equals the peer node id")
            }
            CreateError::DeviceTooSmall {
                device_bytes,
                needed_bytes,
            } => write!(
                f,
                "device is {device_bytes} bytes; metadata plus data need {needed_bytes}"
            ),
        }
    }
}

impl std::error::Error for CreateError {}

impl From<LayoutError> for CreateError {
    fn from(e: LayoutError) -> CreateError {
        CreateError::Layout(e)
    }
}

/// Checks a mirror name: non-empty UTF-8 (guaranteed by `&str`), at most 64 bytes, no NUL.
pub fn validate_name(name: &str) -> Result<(), CreateError> {
    if name.is_empty() {
        return Err(CreateError::NameEmpty);
    }
    if name.len() > MIRROR_NAME_BYTES_MAX {
        return Err(CreateError::NameTooLong { bytes: name.len() });
    }
    if name.bytes().any(|b| b == 0) {
        return Err(CreateError::NameHasNul);
    }
    Ok(())
}

impl CreateParams {
    /// Defaults for everything but identity and size.
    pub fn new(
        mirror_uuid: [u8; 16],
        name: &str,
        node_id: u32,
        peer_node_id: u32,
        data_bytes: u64,
    ) -> CreateParams {
        CreateParams {
            mirror_uuid,
            name: name.to_string(),
            node_id,
            peer_node_id,
            data_bytes,
            granularity_bytes: super::GRANULARITY_BYTES_DEFAULT,
            logical_block_bytes: 4096,
            al_slot_count: super::AL_SLOT_COUNT_DEFAULT,
            placement: Placement::Internal,
            cluster_bytes: None,
        }
    }

    /// Validates every input and computes the layout. Pure: nothing is written.
    pub fn validate(&self) -> Result<Layout, CreateError> {
        validate_name(&self.name)?;
        if self.node_id == self.peer_node_id {
            return Err(CreateError::NodeIsPeer {
                node_id: self.node_id,
            });
        }
        Ok(compute(self)?)
    }

    /// Also checks that a device of `device_bytes` holds metadata and data (internal) or
    /// the metadata (external, `device_bytes` is then the metadata device).
    pub fn validate_for_device(&self, device_bytes: u64) -> Result<Layout, CreateError> {
        let layout = self.validate()?;
        let needed_bytes = match layout.placement {
            Placement::Internal => layout.data_offset + layout.data_bytes,
            Placement::External => layout.cluster_bytes,
        };
        if device_bytes < needed_bytes {
            return Err(CreateError::DeviceTooSmall {
                device_bytes,
                needed_bytes,
            });
        }
        Ok(layout)
    }
}

fn check_geometry(
    data_bytes: u64,
    granularity_bytes: u32,
    logical_block_bytes: u32,
    al_extent_bytes: u32,
    al_slot_count: u32,
) -> Result<(), LayoutError> {
    if !granularity_bytes.is_power_of_two() {
        return Err(LayoutError::GranularityNotPowerOfTwo { granularity_bytes });
    }
    if !(GRANULARITY_BYTES_MIN..=GRANULARITY_BYTES_MAX).contains(&granularity_bytes) {
        return Err(LayoutError::GranularityOutOfRange { granularity_bytes });
    }
    if !logical_block_bytes.is_power_of_two()
        || !(LOGICAL_BLOCK_BYTES_MIN..=LOGICAL_BLOCK_BYTES_MAX).contains(&logical_block_bytes)
    {
        return Err(LayoutError::LogicalBlockSizeInvalid {
            logical_block_bytes,
        });
    }
    // Version 1 fixes the extent size; the field exists so a later version can change it.
    if al_extent_bytes != AL_EXTENT_BYTES {
        return Err(LayoutError::AlExtentSizeInvalid { al_extent_bytes });
    }
    if !(AL_SLOT_COUNT_MIN..=AL_SLOT_COUNT_MAX).contains(&al_slot_count) {
        return Err(LayoutError::AlSlotCountOutOfRange { al_slot_count });
    }
    if data_bytes == 0 {
        return Err(LayoutError::DataSizeZero);
    }
    if !data_bytes.is_multiple_of(u64::from(logical_block_bytes)) {
        return Err(LayoutError::DataSizeNotMultipleOfLogicalBlock {
            data_bytes,
            logical_block_bytes,
        });
    }
    let regions = data_bytes.div_ceil(u64::from(granularity_bytes));
    if regions > REGION_COUNT_MAX {
        let granularity_needed = data_bytes.div_ceil(REGION_COUNT_MAX).next_power_of_two();
        return Err(LayoutError::TooManyRegions {
            data_bytes,
            granularity_needed,
        });
    }
    Ok(())
}

/// The layout formula (docs/on-disk-format.md §Layout).
fn compute(p: &CreateParams) -> Result<Layout, LayoutError> {
    check_geometry(
        p.data_bytes,
        p.granularity_bytes,
        p.logical_block_bytes,
        AL_EXTENT_BYTES,
        p.al_slot_count,
    )?;
    let regions = p.data_bytes.div_ceil(u64::from(p.granularity_bytes));
    let al_size = 2 * activity_log::record_bytes(p.al_slot_count);
    let fixed = 2 * META_BLOCK_BYTES + al_size;
    let slot_worst = snapshot::slot_bytes_worst(regions);
    let slot_min = snapshot::slot_bytes_min(regions);
    let (log_size, slot_size, cluster_bytes) = match p.cluster_bytes {
        None => {
            let cluster = fixed + 2 * slot_worst + LOG_AREA_BYTES_DEFAULT;
            (LOG_AREA_BYTES_DEFAULT, slot_worst, cluster)
        }
        Some(requested) => {
            if !requested.is_multiple_of(META_BLOCK_BYTES) {
                return Err(LayoutError::ClusterSizeNotAligned {
                    cluster_bytes: requested,
                });
            }
            let minimum_bytes = fixed + 2 * slot_min + LOG_AREA_BYTES_MIN;
            if requested < minimum_bytes {
                return Err(LayoutError::ClusterSizeTooSmall {
                    cluster_bytes: requested,
                    minimum_bytes,
                });
            }
            // A quarter of what is left goes to the log (within its bounds), the rest is
            // split between the two snapshot slots (never beyond the worst case).
            let spare = requested - fixed;
            let log = round_down(spare / 4, META_BLOCK_BYTES)
                .clamp(LOG_AREA_BYTES_MIN, LOG_AREA_BYTES_DEFAULT);
            let slot = round_down((spare - log) / 2, META_BLOCK_BYTES).min(slot_worst);
            if slot < slot_min {
                return Err(LayoutError::ClusterSizeTooSmall {
                    cluster_bytes: requested,
                    minimum_bytes,
                });
            }
            (log, slot, requested)
        }
    };
    let al = Area {
        offset: 2 * META_BLOCK_BYTES,
        size: al_size,
    };
    let snapshot_a = Area {
        offset: al.end(),
        size: slot_size,
    };
    let snapshot_b = Area {
        offset: snapshot_a.end(),
        size: slot_size,
    };
    let log = Area {
        offset: snapshot_b.end(),
        size: log_size,
    };
    assert!(log.end() <= cluster_bytes);
    let data_offset = match p.placement {
        Placement::Internal => round_up(cluster_bytes, DATA_ALIGNMENT_BYTES),
        Placement::External => 0,
    };
    let layout = Layout {
        cluster_bytes,
        placement: p.placement,
        data_offset,
        data_bytes: p.data_bytes,
        logical_block_bytes: p.logical_block_bytes,
        granularity_bytes: p.granularity_bytes,
        al_extent_bytes: AL_EXTENT_BYTES,
        al_slot_count: p.al_slot_count,
        al,
        snapshot_a,
        snapshot_b,
        log,
    };
    // The formula must produce what the decoder accepts.
    assert_eq!(layout.validate(), Ok(()));
    Ok(layout)
}

impl Layout {
    /// Number of dirty-bitmap regions (the last one may be partial).
    pub fn region_count(&self) -> u64 {
        self.data_bytes.div_ceil(u64::from(self.granularity_bytes))
    }

    /// Number of activity-log extents (the last one may be partial).
    pub fn extent_count(&self) -> u64 {
        self.data_bytes.div_ceil(u64::from(self.al_extent_bytes))
    }

    /// Regions per activity-log extent.
    pub fn regions_per_extent(&self) -> u64 {
        u64::from(self.al_extent_bytes / self.granularity_bytes)
    }

    pub fn al_record_bytes(&self) -> u64 {
        activity_log::record_bytes(self.al_slot_count)
    }

    pub fn log_block_count(&self) -> u64 {
        self.log.size / META_BLOCK_BYTES
    }

    pub fn snapshot_slot(&self, slot: usize) -> Area {
        assert!(slot < 2);
        if slot == 0 {
            self.snapshot_a
        } else {
            self.snapshot_b
        }
    }

    /// Structural validation of a decoded (untrusted) layout: returns an error, never
    /// panics, for any field values.
    pub fn validate(&self) -> Result<(), LayoutError> {
        check_geometry(
            self.data_bytes,
            self.granularity_bytes,
            self.logical_block_bytes,
            self.al_extent_bytes,
            self.al_slot_count,
        )?;
        if !self.cluster_bytes.is_multiple_of(META_BLOCK_BYTES) {
            return Err(LayoutError::ClusterSizeNotAligned {
                cluster_bytes: self.cluster_bytes,
            });
        }
        let regions = self.region_count();
        let areas = [
            ("superblock_a", SUPERBLOCK_A, META_BLOCK_BYTES),
            ("superblock_b", SUPERBLOCK_B, META_BLOCK_BYTES),
            (
                "activity_log",
                self.al,
                2 * activity_log::record_bytes(self.al_slot_count),
            ),
            (
                "snapshot_a",
                self.snapshot_a,
                snapshot::slot_bytes_min(regions),
            ),
            (
                "snapshot_b",
                self.snapshot_b,
                snapshot::slot_bytes_min(regions),
            ),
            ("log", self.log, LOG_AREA_BYTES_MIN),
        ];
        for (name, area, minimum) in areas {
            if !area.offset.is_multiple_of(META_BLOCK_BYTES)
                || !area.size.is_multiple_of(META_BLOCK_BYTES)
            {
                return Err(LayoutError::AreaMisaligned { area: name });
            }
            if area
                .offset
                .checked_add(area.size)
                .is_none_or(|end| end > self.cluster_bytes)
            {
                return Err(LayoutError::AreaOutOfBounds { area: name });
            }
            if area.size < minimum {
                return Err(LayoutError::AreaTooSmall {
                    area: name,
                    size: area.size,
                    minimum,
                });
            }
        }
        // The AL area holds exactly two records: the reader must know where they are.
        if self.al.size != 2 * activity_log::record_bytes(self.al_slot_count) {
            return Err(LayoutError::AreaTooSmall {
                area: "activity_log",
                size: self.al.size,
                minimum: 2 * activity_log::record_bytes(self.al_slot_count),
            });
        }
        for (i, (first, a, _)) in areas.iter().enumerate() {
            for (second, b, _) in areas.iter().skip(i + 1) {
                if a.offset < b.end() && b.offset < a.end() {
                    return Err(LayoutError::AreasOverlap { first, second });
                }
            }
        }
        let data_offset_ok = self.data_offset.is_multiple_of(DATA_ALIGNMENT_BYTES)
            && self.data_offset.checked_add(self.data_bytes).is_some()
            && match self.placement {
                Placement::Internal => self.data_offset >= self.cluster_bytes,
                Placement::External => true,
            };
        if !data_offset_ok {
            return Err(LayoutError::DataOffsetInvalid {
                data_offset: self.data_offset,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constants::{GIB, MIB};

    fn params(data_bytes: u64) -> CreateParams {
        CreateParams::new([7; 16], "m0", 1, 2, data_bytes)
    }

    #[test]
    fn layout_sizes_for_reference_volumes() {
        for (data, expected_data_offset_mib) in [(GIB, 17), (64 * GIB, 21), (1024 * GIB, 81)] {
            let layout = params(data).validate().unwrap();
            println!(
                "data {} GiB: cluster {} bytes ({:.2} MiB), slot {} bytes, log {} bytes, data offset {} MiB",
                data / GIB,
                layout.cluster_bytes,
                layout.cluster_bytes as f64 / MIB as f64,
                layout.snapshot_a.size,
                layout.log.size,
                layout.data_offset / MIB
            );
            assert_eq!(layout.data_offset / MIB, expected_data_offset_mib);
        }
    }

    #[test]
    fn external_placement_starts_data_at_zero() {
        let mut p = params(GIB);
        p.placement = Placement::External;
        let layout = p.validate().unwrap();
        assert_eq!(layout.data_offset, 0);
    }

    #[test]
    fn refuses_bad_granularity() {
        let mut p = params(GIB);
        p.granularity_bytes = 3 * 4096;
        assert!(matches!(
            p.validate(),
            Err(CreateError::Layout(
                LayoutError::GranularityNotPowerOfTwo { .. }
            ))
        ));
        p.granularity_bytes = 2048;
        assert!(matches!(
            p.validate(),
            Err(CreateError::Layout(
                LayoutError::GranularityOutOfRange { .. }
            ))
        ));
        p.granularity_bytes = 2 * 1024 * 1024;
        assert!(matches!(
            p.validate(),
            Err(CreateError::Layout(
                LayoutError::GranularityOutOfRange { .. }
            ))
        ));
    }

    #[test]
    fn refuses_too_many_regions() {
        let p = params(17 * 1024 * GIB);
        assert_eq!(
            p.validate(),
            Err(CreateError::Layout(LayoutError::TooManyRegions {
                data_bytes: 17 * 1024 * GIB,
                granularity_needed: 8192
            }))
        );
        let mut p = params(17 * 1024 * GIB);
        p.granularity_bytes = 8192;
        assert!(p.validate().is_ok());
    }

    #[test]
    fn refuses_bad_identity_inputs() {
        let mut p = params(GIB);
        p.peer_node_id = p.node_id;
        assert_eq!(p.validate(), Err(CreateError::NodeIsPeer { node_id: 1 }));
        let mut p = params(GIB);
        p.name = String::new();
        assert_eq!(p.validate(), Err(CreateError::NameEmpty));
        p.name = "x".repeat(65);
        assert_eq!(p.validate(), Err(CreateError::NameTooLong { bytes: 65 }));
        p.name = "a\0b".into();
        assert_eq!(p.validate(), Err(CreateError::NameHasNul));
        let mut p = params(0);
        assert_eq!(
            p.validate(),
            Err(CreateError::Layout(LayoutError::DataSizeZero))
        );
        p.data_bytes = 4097;
        assert!(matches!(
            p.validate(),
            Err(CreateError::Layout(
                LayoutError::DataSizeNotMultipleOfLogicalBlock { .. }
            ))
        ));
        let mut p = params(GIB);
        p.al_slot_count = 8;
        assert!(matches!(
            p.validate(),
            Err(CreateError::Layout(
                LayoutError::AlSlotCountOutOfRange { .. }
            ))
        ));
    }

    #[test]
    fn cluster_size_request() {
        let mut p = params(GIB);
        p.cluster_bytes = Some(4096 * 10);
        let Err(CreateError::Layout(LayoutError::ClusterSizeTooSmall { minimum_bytes, .. })) =
            p.validate()
        else {
            panic!("expected too small");
        };
        p.cluster_bytes = Some(minimum_bytes);
        let layout = p.validate().unwrap();
        assert_eq!(layout.cluster_bytes, minimum_bytes);
        assert!(layout.snapshot_a.size < snapshot::slot_bytes_worst(layout.region_count()));
        p.cluster_bytes = Some(minimum_bytes + 1);
        assert!(matches!(
            p.validate(),
            Err(CreateError::Layout(
                LayoutError::ClusterSizeNotAligned { .. }
            ))
        ));
    }

    #[test]
    fn device_too_small() {
        let p = params(GIB);
        assert!(matches!(
            p.validate_for_device(GIB),
            Err(CreateError::DeviceTooSmall { .. })
        ));
        assert!(p.validate_for_device(2 * GIB).is_ok());
    }

    #[test]
    fn validate_rejects_overlap_and_bounds() {
        let layout = params(GIB).validate().unwrap();
        let mut bad = layout;
        bad.log.offset = bad.snapshot_b.offset;
        assert!(matches!(
            bad.validate(),
            Err(LayoutError::AreasOverlap { .. })
        ));
        let mut bad = layout;
        bad.log.size = bad.cluster_bytes;
        assert!(matches!(
            bad.validate(),
            Err(LayoutError::AreaOutOfBounds { .. })
        ));
        let mut bad = layout;
        bad.log.offset += 1;
        assert!(matches!(
            bad.validate(),
            Err(LayoutError::AreaMisaligned { .. })
        ));
        let mut bad = layout;
        bad.data_offset = 4096;
        assert!(matches!(
            bad.validate(),
            Err(LayoutError::DataOffsetInvalid { .. })
        ));
        let mut bad = layout;
        bad.log.offset = u64::MAX - 4095;
        assert!(matches!(
            bad.validate(),
            Err(LayoutError::AreaOutOfBounds { .. })
        ));
    }
}
