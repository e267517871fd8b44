//! Generation identifiers (DRBD's current/bitmap/history scheme), disk state, role, flags.
//!
//! These are the persistent facts replication and failover decide on. This module only
//! defines the values, their on-disk numbers and the two transitions the metadata owns
//! (start a new current generation; finish a resync). Comparing two nodes' generations
//! at reconnect belongs to the replication work, which builds on these types.

/// The current generation of a disk that was just created and never written: DRBD's
/// `UUID_JUST_CREATED`. Two just-created disks are "unrelated but empty": the first sync
/// is a full copy in either direction.
pub const GENERATION_JUST_CREATED: u64 = 4;

/// Value of an absent bitmap or history generation.
pub const GENERATION_NONE: u64 = 0;

/// Generation identifiers as in DRBD: `current` names the data as it is now; `bitmap` is
/// the generation the peer was last in sync with while the dirty bitmap tracks changes
/// since (0 when the disks are in sync); `history` keeps the two previous bitmap
/// generations, newest first, so a reconnect can recognise an older common ancestor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Generations {
    pub current: u64,
    pub bitmap: u64,
    pub history: [u64; 2],
}

impl Generations {
    pub fn just_created() -> Generations {
        Generations {
            current: GENERATION_JUST_CREATED,
            bitmap: GENERATION_NONE,
            history: [GENERATION_NONE; 2],
        }
    }

    /// Starts a new current generation (before the first write the peer is not known to
    /// hold). The old current moves into the bitmap slot unless one is already there (the
    /// bitmap then still tracks since the older divergence point, so it must stay).
    /// `random` is the caller's fresh random value; the reserved values 0 and
    /// `GENERATION_JUST_CREATED` (and the current value) are remapped deterministically so
    /// a 1-in-2^64 draw cannot alias them.
    pub fn new_current(&mut self, random: u64) {
        let mut value = random;
        while value == GENERATION_NONE || value == GENERATION_JUST_CREATED || value == self.current
        {
            value = value.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
        }
        if self.bitmap == GENERATION_NONE {
            self.bitmap = self.current;
        }
        self.current = value;
    }

    /// A resync completed: the bitmap generation becomes history; the disks are in sync.
    pub fn resync_finished(&mut self) {
        if self.bitmap != GENERATION_NONE {
            self.history = [self.bitmap, self.history[0]];
            self.bitmap = GENERATION_NONE;
        }
    }

    /// Structural validity of decoded values: a current generation always exists.
    pub fn is_valid(&self) -> bool {
        self.current != GENERATION_NONE
    }
}

/// How far this disk's data can be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum DiskState {
    /// Partly written by a resync or never synced: unusable without forced-permit.
    Inconsistent,
    /// Known to lack writes the peer has (the peer told us, or we persisted it).
    Outdated,
    /// Consistent but up-to-dateness unproven (started without the peer).
    Consistent,
    /// Known to hold every acknowledged write.
    UpToDate,
}

impl DiskState {
    pub fn to_u32(self) -> u32 {
        match self {
            DiskState::Inconsistent => 1,
            DiskState::Outdated => 2,
            DiskState::Consistent => 3,
            DiskState::UpToDate => 4,
        }
    }

    pub fn from_u32(value: u32) -> Option<DiskState> {
        match value {
            1 => Some(DiskState::Inconsistent),
            2 => Some(DiskState::Outdated),
            3 => Some(DiskState::Consistent),
            4 => Some(DiskState::UpToDate),
            _ => None,
        }
    }
}

/// Whether this node serves the mirror.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Role {
    Secondary,
    Primary,
}

impl Role {
    pub fn to_u32(self) -> u32 {
        match self {
            Role::Secondary => 1,
            Role::Primary => 2,
        }
    }

    pub fn from_u32(value: u32) -> Option<Role> {
        match value {
            1 => Some(Role::Secondary),
            2 => Some(Role::Primary),
            _ => None,
        }
    }
}

/// Persistent flags. Unknown bits are refused on decode (a newer format that defines
/// one bumps the format version).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
pub struct Flags(u32);

impl Flags {
    /// This node was Primary at some point since the last sync (DRBD MDF_WAS_PRIMARY).
    pub const WAS_PRIMARY: Flags = Flags(1 << 0);
    /// Set while Primary, cleared on clean demotion: found set at start = crashed primary.
    pub const CRASHED_PRIMARY: Flags = Flags(1 << 1);
    /// The peer persisted Outdated; this node may write without it.
    pub const PEER_OUTDATED: Flags = Flags(1 << 2);
    /// Activated through forced-permit; up-to-dateness was asserted by the operator.
    pub const FORCED: Flags = Flags(1 << 3);
    /// A resync into this disk is in progress (it is Inconsistent until it finishes).
    pub const RESYNC_IN_PROGRESS: Flags = Flags(1 << 4);
    /// The next sync must be a full copy (set at create; DRBD MDF_FULL_SYNC).
    pub const FULL_SYNC_REQUIRED: Flags = Flags(1 << 5);
    /// The operator resolved a split brain by giving up this side's changes
    /// (`mirrorctl resolve --discard-local`): at the next connect this side becomes the
    /// resync target. Cleared when that resync starts.
    pub const DISCARD_LOCAL: Flags = Flags(1 << 6);

    /// Every bit version 1 defines.
    pub const ALL: Flags = Flags((1 << 7) - 1);

    pub const fn empty() -> Flags {
        Flags(0)
    }

    pub fn bits(self) -> u32 {
        self.0
    }

    /// `None` if any bit is unknown to this format version.
    pub fn from_bits(bits: u32) -> Option<Flags> {
        if bits & !Flags::ALL.0 != 0 {
            None
        } else {
            Some(Flags(bits))
        }
    }

    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn insert(&mut self, other: Flags) {
        self.0 |= other.0;
    }

    pub fn remove(&mut self, other: Flags) {
        self.0 &= !other.0;
    }

    /// Names of the set flags, for `inspect`.
    pub fn names(self) -> Vec<&'static str> {
        let all = [
            (Flags::WAS_PRIMARY, "was-primary"),
            (Flags::CRASHED_PRIMARY, "crashed-primary"),
            (Flags::PEER_OUTDATED, "peer-outdated"),
            (Flags::FORCED, "forced"),
            (Flags::DISCARD_LOCAL, "discard-local"),
            (Flags::RESYNC_IN_PROGRESS, "resync-in-progress"),
            (Flags::FULL_SYNC_REQUIRED, "full-sync-required"),
        ];
        all.iter()
            .filter(|(f, _)| self.contains(*f))
            .map(|(_, n)| *n)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_current_moves_old_current_to_bitmap_once() {
        let mut g = Generations::just_created();
        g.new_current(100);
        assert_eq!(
            g,
            Generations {
                current: 100,
                bitmap: GENERATION_JUST_CREATED,
                history: [0, 0]
            }
        );
        g.new_current(200);
        assert_eq!(
            g.bitmap, GENERATION_JUST_CREATED,
            "bitmap keeps the older divergence point"
        );
        assert_eq!(g.current, 200);
        g.resync_finished();
        assert_eq!(
            g,
            Generations {
                current: 200,
                bitmap: 0,
                history: [GENERATION_JUST_CREATED, 0]
            }
        );
    }

    #[test]
    fn new_current_never_takes_reserved_values() {
        for r in [0, GENERATION_JUST_CREATED] {
            let mut g = Generations::just_created();
            g.new_current(r);
            assert!(g.current != 0 && g.current != GENERATION_JUST_CREATED);
        }
    }

    #[test]
    fn enum_numbers_round_trip() {
        for s in [
            DiskState::Inconsistent,
            DiskState::Outdated,
            DiskState::Consistent,
            DiskState::UpToDate,
        ] {
            assert_eq!(DiskState::from_u32(s.to_u32()), Some(s));
        }
        for r in [Role::Secondary, Role::Primary] {
            assert_eq!(Role::from_u32(r.to_u32()), Some(r));
        }
        assert_eq!(DiskState::from_u32(0), None);
        assert_eq!(Role::from_u32(3), None);
        assert_eq!(Flags::from_bits(1 << 7), None);
        assert_eq!(Flags::from_bits(Flags::ALL.bits()), Some(Flags::ALL));
    }
}
