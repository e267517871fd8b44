//! The superblock: codec for one 4 KiB copy and the pure function that picks a copy.
//!
//! Two copies (A at block 0, B at block 1). Writes alternate: the next write goes to the
//! copy that does not hold the newest valid sequence, and only after the previous write
//! is durable, so at any moment at least one copy is a complete durable superblock.
//! [`pick`] decodes both, names each copy's condition, and returns the newest valid copy
//! or an error; it never guesses. Field table: docs/on-disk-format.md §Superblock.

use super::codec::{get_u32, get_u64, is_zero, put_u32, put_u64, seal, sealed_ok};
use super::generation::{DiskState, Flags, Generations, Role};
use super::layout::{Area, Layout, LayoutError, Placement, validate_name};
use super::{FORMAT_VERSION, META_BLOCK_BYTES, MIRROR_NAME_BYTES_MAX};

pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"MDSKSUPR";
const BYTES: usize = META_BLOCK_BYTES as usize;

// Field offsets (docs/on-disk-format.md §Superblock).
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_SEQUENCE: usize = 16;
const OFF_UUID: usize = 24;
const OFF_NAME: usize = 40;
const OFF_NODE: usize = 104;
const OFF_PEER: usize = 108;
const OFF_PLACEMENT: usize = 112;
const OFF_LOGICAL_BLOCK: usize = 116;
const OFF_DATA_OFFSET: usize = 120;
const OFF_DATA_BYTES: usize = 128;
const OFF_CLUSTER_BYTES: usize = 136;
const OFF_GRANULARITY: usize = 144;
const OFF_AL_EXTENT: usize = 148;
const OFF_AL_SLOTS: usize = 152;
const OFF_AREAS: usize = 160; // al, snapshot_a, snapshot_b, log: (offset u64, size u64) each
const OFF_DISK_STATE: usize = 224;
const OFF_ROLE: usize = 228;
const OFF_FLAGS: usize = 232;
const OFF_GEN_CURRENT: usize = 240;
const OFF_GEN_BITMAP: usize = 248;
const OFF_GEN_HISTORY: usize = 256;
const OFF_RESERVED_TAIL: usize = 272;
/// Reserved byte ranges that must be zero in version 1.
const RESERVED: [(usize, usize); 4] = [
    (12, 16),
    (156, 160),
    (236, 240),
    (OFF_RESERVED_TAIL, BYTES - 4),
];

/// Who this disk is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Identity {
    pub mirror_uuid: [u8; 16],
    pub node_id: u32,
    pub peer_node_id: u32,
}

/// The mutable part of the superblock: what replication and failover change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SuperblockState {
    pub generations: Generations,
    pub disk_state: DiskState,
    pub role: Role,
    pub flags: Flags,
}

/// One decoded, validated superblock copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub sequence: u64,
    pub identity: Identity,
    pub name: String,
    pub layout: Layout,
    pub state: SuperblockState,
}

/// A field that passed the checksum but is not valid for format version 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InvalidField {
    Version { version: u32 },
    ReservedNonZero { offset: usize },
    Name,
    NodeIsPeer,
    Placement { value: u32 },
    DiskState { value: u32 },
    Role { value: u32 },
    Flags { bits: u32 },
    Generation,
    Layout(LayoutError),
}

/// Why one copy cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Every byte is zero: never written.
    Blank,
    /// Not a mirrordisk superblock.
    BadMagic,
    /// Checksum mismatch: a torn write or media corruption (indistinguishable).
    Corrupt,
    /// Written by a newer mirrordisk.
    NewerFormat { version: u32 },
    /// Checksum fine but a field is not valid.
    Invalid(InvalidField),
}

impl Superblock {
    /// Encodes one copy. Asserts the invariants: encoding an invalid superblock is a bug.
    pub fn encode(&self) -> Vec<u8> {
        validate_name(&self.name).expect("superblock name valid");
        assert_ne!(self.identity.node_id, self.identity.peer_node_id);
        assert_eq!(self.layout.validate(), Ok(()));
        assert!(self.state.generations.is_valid());
        let mut b = vec![0u8; BYTES];
        b[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&SUPERBLOCK_MAGIC);
        put_u32(&mut b, OFF_VERSION, FORMAT_VERSION);
        put_u64(&mut b, OFF_SEQUENCE, self.sequence);
        b[OFF_UUID..OFF_UUID + 16].copy_from_slice(&self.identity.mirror_uuid);
        b[OFF_NAME..OFF_NAME + self.name.len()].copy_from_slice(self.name.as_bytes());
        put_u32(&mut b, OFF_NODE, self.identity.node_id);
        put_u32(&mut b, OFF_PEER, self.identity.peer_node_id);
        let l = &self.layout;
        put_u32(&mut b, OFF_PLACEMENT, l.placement.to_u32());
        put_u32(&mut b, OFF_LOGICAL_BLOCK, l.logical_block_bytes);
        put_u64(&mut b, OFF_DATA_OFFSET, l.data_offset);
        put_u64(&mut b, OFF_DATA_BYTES, l.data_bytes);
        put_u64(&mut b, OFF_CLUSTER_BYTES, l.cluster_bytes);
        put_u32(&mut b, OFF_GRANULARITY, l.granularity_bytes);
        put_u32(&mut b, OFF_AL_EXTENT, l.al_extent_bytes);
        put_u32(&mut b, OFF_AL_SLOTS, l.al_slot_count);
        for (i, area) in [l.al, l.snapshot_a, l.snapshot_b, l.log].iter().enumerate() {
            put_u64(&mut b, OFF_AREAS + 16 * i, area.offset);
            put_u64(&mut b, OFF_AREAS + 16 * i + 8, area.size);
        }
        let s = &self.state;
        put_u32(&mut b, OFF_DISK_STATE, s.disk_state.to_u32());
        put_u32(&mut b, OFF_ROLE, s.role.to_u32());
        put_u32(&mut b, OFF_FLAGS, s.flags.bits());
        put_u64(&mut b, OFF_GEN_CURRENT, s.generations.current);
        put_u64(&mut b, OFF_GEN_BITMAP, s.generations.bitmap);
        put_u64(&mut b, OFF_GEN_HISTORY, s.generations.history[0]);
        put_u64(&mut b, OFF_GEN_HISTORY + 8, s.generations.history[1]);
        seal(&mut b);
        // What we write must read back as itself.
        assert_eq!(Superblock::decode(&b).as_ref(), Ok(self));
        b
    }

    /// Decodes one copy (exactly 4096 bytes). Untrusted input: errors, never panics.
    pub fn decode(b: &[u8]) -> Result<Superblock, DecodeError> {
        if b.len() != BYTES {
            return Err(DecodeError::Corrupt);
        }
        if is_zero(b) {
            return Err(DecodeError::Blank);
        }
        if b[OFF_MAGIC..OFF_MAGIC + 8] != SUPERBLOCK_MAGIC {
            return Err(DecodeError::BadMagic);
        }
        if !sealed_ok(b) {
            return Err(DecodeError::Corrupt);
        }
        let invalid = |f| Err(DecodeError::Invalid(f));
        let version = get_u32(b, OFF_VERSION);
        if version > FORMAT_VERSION {
            return Err(DecodeError::NewerFormat { version });
        }
        if version == 0 {
            return invalid(InvalidField::Version { version });
        }
        for (start, end) in RESERVED {
            if let Some(i) = b[start..end].iter().position(|&x| x != 0) {
                return invalid(InvalidField::ReservedNonZero { offset: start + i });
            }
        }
        let name_field = &b[OFF_NAME..OFF_NAME + MIRROR_NAME_BYTES_MAX];
        let name_len = name_field
            .iter()
            .position(|&x| x == 0)
            .unwrap_or(MIRROR_NAME_BYTES_MAX);
        if !is_zero(&name_field[name_len..]) {
            return invalid(InvalidField::Name);
        }
        let Ok(name) = std::str::from_utf8(&name_field[..name_len]) else {
            return invalid(InvalidField::Name);
        };
        if validate_name(name).is_err() {
            return invalid(InvalidField::Name);
        }
        let identity = Identity {
            mirror_uuid: b[OFF_UUID..OFF_UUID + 16].try_into().expect("16 bytes"),
            node_id: get_u32(b, OFF_NODE),
            peer_node_id: get_u32(b, OFF_PEER),
        };
        if identity.node_id == identity.peer_node_id {
            return invalid(InvalidField::NodeIsPeer);
        }
        let placement_value = get_u32(b, OFF_PLACEMENT);
        let Some(placement) = Placement::from_u32(placement_value) else {
            return invalid(InvalidField::Placement {
                value: placement_value,
            });
        };
        let area = |i: usize| Area {
            offset: get_u64(b, OFF_AREAS + 16 * i),
            size: get_u64(b, OFF_AREAS + 16 * i + 8),
        };
        let layout = Layout {
            cluster_bytes: get_u64(b, OFF_CLUSTER_BYTES),
            placement,
            data_offset: get_u64(b, OFF_DATA_OFFSET),
            data_bytes: get_u64(b, OFF_DATA_BYTES),
            logical_block_bytes: get_u32(b, OFF_LOGICAL_BLOCK),
            granularity_bytes: get_u32(b, OFF_GRANULARITY),
            al_extent_bytes: get_u32(b, OFF_AL_EXTENT),
            al_slot_count: get_u32(b, OFF_AL_SLOTS),
            al: area(0),
            snapshot_a: area(1),
            snapshot_b: area(2),
            log: area(3),
        };
        if let Err(e) = layout.validate() {
            return invalid(InvalidField::Layout(e));
        }
        let value = get_u32(b, OFF_DISK_STATE);
        let Some(disk_state) = DiskState::from_u32(value) else {
            return invalid(InvalidField::DiskState { value });
        };
        let value = get_u32(b, OFF_ROLE);
        let Some(role) = Role::from_u32(value) else {
            return invalid(InvalidField::Role { value });
        };
        let bits = get_u32(b, OFF_FLAGS);
        let Some(flags) = Flags::from_bits(bits) else {
            return invalid(InvalidField::Flags { bits });
        };
        let generations = Generations {
            current: get_u64(b, OFF_GEN_CURRENT),
            bitmap: get_u64(b, OFF_GEN_BITMAP),
            history: [get_u64(b, OFF_GEN_HISTORY), get_u64(b, OFF_GEN_HISTORY + 8)],
        };
        if !generations.is_valid() {
            return invalid(InvalidField::Generation);
        }
        Ok(Superblock {
            sequence: get_u64(b, OFF_SEQUENCE),
            identity,
            name: name.to_string(),
            layout,
            state: SuperblockState {
                generations,
                disk_state,
                role,
                flags,
            },
        })
    }
}

/// Which copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum CopyId {
    A,
    B,
}

impl CopyId {
    pub fn index(self) -> usize {
        match self {
            CopyId::A => 0,
            CopyId::B => 1,
        }
    }

    pub fn other(self) -> CopyId {
        match self {
            CopyId::A => CopyId::B,
            CopyId::B => CopyId::A,
        }
    }

    pub fn offset(self) -> u64 {
        self.index() as u64 * META_BLOCK_BYTES
    }
}

/// The condition of one copy as [`pick`] found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyCondition {
    /// Valid and the newest: the copy in use.
    InUse {
        sequence: u64,
    },
    /// Valid but older than the copy in use (normal: the previous write).
    Stale {
        sequence: u64,
    },
    Blank,
    BadMagic,
    /// Torn or corrupt: checksum mismatch.
    Corrupt,
    NewerFormat {
        version: u32,
    },
    Invalid(InvalidField),
    /// Valid, but belongs to another mirror set or another node.
    Foreign {
        identity: Identity,
    },
}

impl CopyCondition {
    /// Short operator-facing name.
    pub fn name(&self) -> &'static str {
        match self {
            CopyCondition::InUse { .. } => "in-use",
            CopyCondition::Stale { .. } => "stale",
            CopyCondition::Blank => "blank",
            CopyCondition::BadMagic => "bad-magic",
            CopyCondition::Corrupt => "torn-or-corrupt",
            CopyCondition::NewerFormat { .. } => "newer-format",
            CopyCondition::Invalid(_) => "invalid",
            CopyCondition::Foreign { .. } => "foreign",
        }
    }
}

/// The copy to trust.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Picked {
    pub copy: CopyId,
    pub superblock: Superblock,
    /// Conditions of copy A and copy B.
    pub conditions: [CopyCondition; 2],
}

/// Why no copy can be trusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PickError {
    /// Neither copy is a valid superblock (both blank means "no metadata here").
    NoValidCopy { conditions: [CopyCondition; 2] },
    /// A copy was written by a newer mirrordisk: upgrade rather than read stale state.
    NewerFormat { version: u32 },
    /// A valid copy belongs to another mirror set or node.
    ForeignMirror { found: Identity },
    /// Both copies are valid but name different mirrors, or carry the same sequence
    /// with different contents: something other than mirrordisk wrote here.
    CopiesDisagree,
}

impl PickError {
    pub fn is_blank(&self) -> bool {
        matches!(
            self,
            PickError::NoValidCopy {
                conditions: [CopyCondition::Blank, CopyCondition::Blank]
            }
        )
    }
}

impl std::fmt::Display for PickError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PickError::NoValidCopy { conditions } if self.is_blank() => {
                let _ = conditions;
                write!(
                    f,
                    "no mirrordisk metadata: both superblock copies are blank"
                )
            }
            PickError::NoValidCopy { conditions } => write!(
                f,
                "both superblock copies are unusable (A: {}, B: {}); refusing to guess",
                conditions[0].name(),
                conditions[1].name()
            ),
            PickError::NewerFormat { version } => write!(
                f,
                "metadata format version {version} is newer than this mirrordisk supports ({FORMAT_VERSION}); upgrade mirrordisk"
            ),
            PickError::ForeignMirror { found } => write!(
                f,
                "metadata belongs to another mirror or node (node {} peer {})",
                found.node_id, found.peer_node_id
            ),
            PickError::CopiesDisagree => {
                write!(f, "the two superblock copies disagree on identity")
            }
        }
    }
}

impl std::error::Error for PickError {}

/// Whether a block pair carries mirrordisk superblock magic in either copy (valid or
/// not): `create` refuses such a device without `--force`.
pub fn has_magic(a: &[u8], b: &[u8]) -> bool {
    [a, b]
        .iter()
        .any(|x| x.len() >= 8 && x[..8] == SUPERBLOCK_MAGIC)
}

/// Picks the copy to trust from the two 4 KiB blocks. Rules, in order:
/// 1. any copy of a newer format → `NewerFormat` (reading the older copy would act on
///    stale state);
/// 2. a valid copy whose identity differs from `expected` → `ForeignMirror`;
/// 3. two valid copies that differ in identity or name, or have equal sequences and
///    different contents → `CopiesDisagree`;
/// 4. the valid copy with the higher sequence is used; the other is `Stale` or names
///    why it is not valid;
/// 5. no valid copy → `NoValidCopy` with both conditions.
pub fn pick(a: &[u8], b: &[u8], expected: Option<&Identity>) -> Result<Picked, PickError> {
    let decoded = [Superblock::decode(a), Superblock::decode(b)];
    for d in &decoded {
        if let Err(DecodeError::NewerFormat { version }) = d {
            return Err(PickError::NewerFormat { version: *version });
        }
    }
    let mut conditions: [CopyCondition; 2] = [CopyCondition::Blank, CopyCondition::Blank];
    for (i, d) in decoded.iter().enumerate() {
        conditions[i] = match d {
            Ok(sb) => match expected {
                Some(e) if *e != sb.identity => CopyCondition::Foreign {
                    identity: sb.identity,
                },
                _ => CopyCondition::InUse {
                    sequence: sb.sequence,
                },
            },
            Err(DecodeError::Blank) => CopyCondition::Blank,
            Err(DecodeError::BadMagic) => CopyCondition::BadMagic,
            Err(DecodeError::Corrupt) => CopyCondition::Corrupt,
            Err(DecodeError::NewerFormat { version }) => {
                CopyCondition::NewerFormat { version: *version }
            }
            Err(DecodeError::Invalid(f)) => CopyCondition::Invalid(f.clone()),
        };
    }
    for c in &conditions {
        if let CopyCondition::Foreign { identity } = c {
            return Err(PickError::ForeignMirror { found: *identity });
        }
    }
    let chosen = match (&decoded[0], &decoded[1]) {
        (Ok(x), Ok(y)) => {
            if x.identity != y.identity || x.name != y.name {
                return Err(PickError::CopiesDisagree);
            }
            if x.sequence == y.sequence {
                if x != y {
                    return Err(PickError::CopiesDisagree);
                }
                CopyId::A
            } else if x.sequence > y.sequence {
                CopyId::A
            } else {
                CopyId::B
            }
        }
        (Ok(_), Err(_)) => CopyId::A,
        (Err(_), Ok(_)) => CopyId::B,
        (Err(_), Err(_)) => return Err(PickError::NoValidCopy { conditions }),
    };
    let other = chosen.other().index();
    if let CopyCondition::InUse { sequence } = conditions[other] {
        conditions[other] = CopyCondition::Stale { sequence };
    }
    let superblock = decoded[chosen.index()]
        .clone()
        .expect("chosen copy is valid");
    Ok(Picked {
        copy: chosen,
        superblock,
        conditions,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::core::meta::layout::CreateParams;
    use proptest::prelude::*;

    pub(crate) fn sample(sequence: u64) -> Superblock {
        let p = CreateParams::new([0xAB; 16], "mirror-0", 1, 2, 1 << 30);
        Superblock {
            sequence,
            identity: Identity {
                mirror_uuid: p.mirror_uuid,
                node_id: 1,
                peer_node_id: 2,
            },
            name: p.name.clone(),
            layout: p.validate().unwrap(),
            state: SuperblockState {
                generations: Generations::just_created(),
                disk_state: DiskState::Inconsistent,
                role: Role::Secondary,
                flags: Flags::FULL_SYNC_REQUIRED,
            },
        }
    }

    fn resealed(mut b: Vec<u8>, offset: usize, value: u32) -> Vec<u8> {
        put_u32(&mut b, offset, value);
        seal(&mut b);
        b
    }

    #[test]
    fn round_trip() {
        let sb = sample(9);
        assert_eq!(Superblock::decode(&sb.encode()), Ok(sb));
    }

    #[test]
    fn decode_blank() {
        assert_eq!(Superblock::decode(&[0u8; 4096]), Err(DecodeError::Blank));
    }

    #[test]
    fn decode_bad_magic() {
        let mut b = sample(1).encode();
        b[0] ^= 1;
        assert_eq!(Superblock::decode(&b), Err(DecodeError::BadMagic));
    }

    #[test]
    fn decode_corrupt_and_wrong_length() {
        let mut b = sample(1).encode();
        b[2000] ^= 1;
        assert_eq!(Superblock::decode(&b), Err(DecodeError::Corrupt));
        assert_eq!(Superblock::decode(&b[..100]), Err(DecodeError::Corrupt));
    }

    #[test]
    fn decode_torn_at_every_sector() {
        let old = sample(1).encode();
        let mut newer = sample(2);
        newer.state.disk_state = DiskState::UpToDate;
        let new = newer.encode();
        for sectors in 1..8 {
            let mut torn = old.clone();
            torn[..sectors * 512].copy_from_slice(&new[..sectors * 512]);
            assert_eq!(
                Superblock::decode(&torn),
                Err(DecodeError::Corrupt),
                "{sectors}"
            );
        }
    }

    #[test]
    fn decode_newer_format() {
        let b = resealed(sample(1).encode(), OFF_VERSION, 2);
        assert_eq!(
            Superblock::decode(&b),
            Err(DecodeError::NewerFormat { version: 2 })
        );
    }

    #[test]
    fn decode_version_zero() {
        let b = resealed(sample(1).encode(), OFF_VERSION, 0);
        assert_eq!(
            Superblock::decode(&b),
            Err(DecodeError::Invalid(InvalidField::Version { version: 0 }))
        );
    }

    #[test]
    fn decode_reserved_nonzero() {
        let b = resealed(sample(1).encode(), 3000, 1);
        assert_eq!(
            Superblock::decode(&b),
            Err(DecodeError::Invalid(InvalidField::ReservedNonZero {
                offset: 3000
            }))
        );
    }

    #[test]
    fn decode_bad_name() {
        let mut b = sample(1).encode();
        b[OFF_NAME + 20] = b'x'; // after the NUL terminator
        seal(&mut b);
        assert_eq!(
            Superblock::decode(&b),
            Err(DecodeError::Invalid(InvalidField::Name))
        );
        let mut b = sample(1).encode();
        b[OFF_NAME] = 0xFF; // not UTF-8
        seal(&mut b);
        assert_eq!(
            Superblock::decode(&b),
            Err(DecodeError::Invalid(InvalidField::Name))
        );
        let mut b = sample(1).encode();
        b[OFF_NAME..OFF_NAME + 64].fill(0); // empty
        seal(&mut b);
        assert_eq!(
            Superblock::decode(&b),
            Err(DecodeError::Invalid(InvalidField::Name))
        );
    }

    #[test]
    fn decode_node_is_peer() {
        let b = resealed(sample(1).encode(), OFF_PEER, 1);
        assert_eq!(
            Superblock::decode(&b),
            Err(DecodeError::Invalid(InvalidField::NodeIsPeer))
        );
    }

    #[test]
    fn decode_bad_enums_and_flags() {
        let b = resealed(sample(1).encode(), OFF_PLACEMENT, 9);
        assert_eq!(
            Superblock::decode(&b),
            Err(DecodeError::Invalid(InvalidField::Placement { value: 9 }))
        );
        let b = resealed(sample(1).encode(), OFF_DISK_STATE, 9);
        assert_eq!(
            Superblock::decode(&b),
            Err(DecodeError::Invalid(InvalidField::DiskState { value: 9 }))
        );
        let b = resealed(sample(1).encode(), OFF_ROLE, 0);
        assert_eq!(
            Superblock::decode(&b),
            Err(DecodeError::Invalid(InvalidField::Role { value: 0 }))
        );
        let b = resealed(sample(1).encode(), OFF_FLAGS, 1 << 31);
        assert_eq!(
            Superblock::decode(&b),
            Err(DecodeError::Invalid(InvalidField::Flags { bits: 1 << 31 }))
        );
    }

    #[test]
    fn decode_zero_generation() {
        let mut b = sample(1).encode();
        put_u64(&mut b, OFF_GEN_CURRENT, 0);
        seal(&mut b);
        assert_eq!(
            Superblock::decode(&b),
            Err(DecodeError::Invalid(InvalidField::Generation))
        );
    }

    #[test]
    fn decode_bad_layout() {
        let b = resealed(sample(1).encode(), OFF_GRANULARITY, 12288);
        assert!(matches!(
            Superblock::decode(&b),
            Err(DecodeError::Invalid(InvalidField::Layout(
                LayoutError::GranularityNotPowerOfTwo { .. }
            )))
        ));
        let mut b = sample(1).encode();
        put_u64(&mut b, OFF_AREAS + 48, 3 * 4096); // log offset onto the AL
        seal(&mut b);
        assert!(matches!(
            Superblock::decode(&b),
            Err(DecodeError::Invalid(InvalidField::Layout(_)))
        ));
    }

    #[test]
    fn pick_newest_of_two_valid() {
        let (a, b) = (sample(3).encode(), sample(4).encode());
        let p = pick(&a, &b, None).unwrap();
        assert_eq!(p.copy, CopyId::B);
        assert_eq!(
            p.conditions,
            [
                CopyCondition::Stale { sequence: 3 },
                CopyCondition::InUse { sequence: 4 }
            ]
        );
        let p = pick(&b, &a, None).unwrap();
        assert_eq!(p.copy, CopyId::A);
    }

    #[test]
    fn pick_survives_one_corrupt_copy() {
        let a = sample(5).encode();
        let mut b = sample(6).encode();
        b[100] ^= 0xFF;
        let p = pick(&a, &b, None).unwrap();
        assert_eq!(p.copy, CopyId::A);
        assert_eq!(p.superblock.sequence, 5);
        assert_eq!(p.conditions[1], CopyCondition::Corrupt);
    }

    #[test]
    fn pick_both_corrupt_is_an_error() {
        let mut a = sample(5).encode();
        let mut b = sample(6).encode();
        a[100] ^= 1;
        b[100] ^= 1;
        assert_eq!(
            pick(&a, &b, None),
            Err(PickError::NoValidCopy {
                conditions: [CopyCondition::Corrupt, CopyCondition::Corrupt]
            })
        );
    }

    #[test]
    fn pick_both_blank() {
        let e = pick(&[0u8; 4096], &[0u8; 4096], None).unwrap_err();
        assert!(e.is_blank());
    }

    #[test]
    fn pick_refuses_newer_format_even_with_an_older_valid_copy() {
        let a = sample(5).encode();
        let b = resealed(sample(6).encode(), OFF_VERSION, 7);
        assert_eq!(
            pick(&a, &b, None),
            Err(PickError::NewerFormat { version: 7 })
        );
    }

    #[test]
    fn pick_refuses_foreign() {
        let a = sample(5).encode();
        let other = Identity {
            mirror_uuid: [1; 16],
            node_id: 1,
            peer_node_id: 2,
        };
        assert!(matches!(
            pick(&a, &[0u8; 4096], Some(&other)),
            Err(PickError::ForeignMirror { .. })
        ));
        let own = sample(5).identity;
        assert!(pick(&a, &[0u8; 4096], Some(&own)).is_ok());
    }

    #[test]
    fn pick_refuses_disagreeing_copies() {
        let a = sample(5).encode();
        let mut other = sample(6);
        other.identity.mirror_uuid = [2; 16];
        assert_eq!(
            pick(&a, &other.encode(), None),
            Err(PickError::CopiesDisagree)
        );
        let mut same_seq = sample(5);
        same_seq.state.role = Role::Primary;
        assert_eq!(
            pick(&a, &same_seq.encode(), None),
            Err(PickError::CopiesDisagree)
        );
    }

    proptest! {
        #[test]
        fn prop_round_trip(sequence: u64, cur in 1u64.., bm: u64, h0: u64, h1: u64, flags in 0u32..64,
                           ds in 1u32..=4, role in 1u32..=2, node: u32, peer: u32, uuid: [u8; 16],
                           name in "[a-z0-9._-]{1,64}") {
            prop_assume!(node != peer);
            let mut sb = sample(sequence);
            sb.identity = Identity { mirror_uuid: uuid, node_id: node, peer_node_id: peer };
            sb.name = name;
            sb.state = SuperblockState {
                generations: Generations { current: cur, bitmap: bm, history: [h0, h1] },
                disk_state: DiskState::from_u32(ds).unwrap(),
                role: Role::from_u32(role).unwrap(),
                flags: Flags::from_bits(flags).unwrap(),
            };
            let bytes = sb.encode();
            prop_assert_eq!(Superblock::decode(&bytes), Ok(sb));
        }

        #[test]
        fn prop_decode_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 4096)) {
            let _ = Superblock::decode(&bytes);
        }
    }
}
