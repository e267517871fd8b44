//! The activity log: the record codec and the in-memory hot set (LRU, pins, transactions).
//!
//! An AL record lists the FULL hot set (every hot extent number) with a sequence number.
//! Records alternate between two slots; recovery takes the newest valid record. A record
//! of 1024 extents (4 KiB of numbers plus a header) does not fit one 4 KiB block, so a
//! record spans `record_bytes(slots)` (8 KiB by default) and one crc32c covers it whole:
//! a tear between its blocks is detected like any other tear.
//!
//! Rules this module enforces (the engine calls it): a write may be submitted only when
//! every extent it touches is *durably hot* (in the last durable record and not being
//! evicted by the record in flight); an extent is evicted only when no write pins it
//! (pins are released when the write is durable on both sides or its dirty bits are
//! durable in the journal); one record in flight at a time, and the next record is built
//! only after the previous one is durable — otherwise a torn record n+1 over slot
//! (n-1) while record n is not yet durable would leave no valid record.

use std::collections::BTreeSet;

use rustc_hash::FxHashMap;

use super::codec::{get_u32, get_u64, is_zero, put_u32, put_u64, seal, sealed_ok};
use super::{META_BLOCK_BYTES, round_up};

pub const AL_MAGIC: [u8; 8] = *b"MDSKACTL";
/// Header bytes before the extent list (magic, uuid, sequence, counts, reserved).
pub const AL_HEADER_BYTES: u64 = 48;

const OFF_UUID: usize = 8;
const OFF_SEQUENCE: usize = 24;
const OFF_SLOTS: usize = 32;
const OFF_COUNT: usize = 36;
const OFF_RESERVED: usize = 40;
const OFF_EXTENTS: usize = 48;

/// Bytes of one AL record for `slots` slots: header + 4 bytes per slot + crc, rounded up
/// to whole 4 KiB blocks.
pub fn record_bytes(slots: u32) -> u64 {
    round_up(AL_HEADER_BYTES + 4 * u64::from(slots) + 4, META_BLOCK_BYTES)
}

/// One decoded AL record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlRecord {
    pub sequence: u64,
    /// Hot extents, strictly ascending.
    pub extents: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AlDecodeError {
    Blank,
    BadMagic,
    Corrupt,
    /// Valid record of another mirror set (left over from an earlier use of the device).
    ForeignMirror,
    SlotCountMismatch {
        found: u32,
    },
    TooManyExtents {
        count: u32,
    },
    ExtentsNotAscending,
    ExtentOutOfRange {
        extent: u32,
    },
    NonZeroPadding,
}

/// Encodes a record of `record_bytes(slots)` bytes.
pub fn encode(uuid: &[u8; 16], slots: u32, record: &AlRecord) -> Vec<u8> {
    assert!(record.extents.len() <= slots as usize);
    assert!(record.extents.windows(2).all(|w| w[0] < w[1]));
    let mut b = vec![0u8; record_bytes(slots) as usize];
    b[..8].copy_from_slice(&AL_MAGIC);
    b[OFF_UUID..OFF_UUID + 16].copy_from_slice(uuid);
    put_u64(&mut b, OFF_SEQUENCE, record.sequence);
    put_u32(&mut b, OFF_SLOTS, slots);
    put_u32(&mut b, OFF_COUNT, record.extents.len() as u32);
    for (i, e) in record.extents.iter().enumerate() {
        put_u32(&mut b, OFF_EXTENTS + 4 * i, *e);
    }
    seal(&mut b);
    b
}

/// Decodes one record slot. `extent_count` is the number of extents of the volume.
pub fn decode(
    b: &[u8],
    uuid: &[u8; 16],
    slots: u32,
    extent_count: u64,
) -> Result<AlRecord, AlDecodeError> {
    if b.len() as u64 != record_bytes(slots) {
        return Err(AlDecodeError::Corrupt);
    }
    if is_zero(b) {
        return Err(AlDecodeError::Blank);
    }
    if b[..8] != AL_MAGIC {
        return Err(AlDecodeError::BadMagic);
    }
    if !sealed_ok(b) {
        return Err(AlDecodeError::Corrupt);
    }
    if b[OFF_UUID..OFF_UUID + 16] != uuid[..] {
        return Err(AlDecodeError::ForeignMirror);
    }
    let found = get_u32(b, OFF_SLOTS);
    if found != slots {
        return Err(AlDecodeError::SlotCountMismatch { found });
    }
    let count = get_u32(b, OFF_COUNT);
    if count > slots {
        return Err(AlDecodeError::TooManyExtents { count });
    }
    let end = OFF_EXTENTS + 4 * count as usize;
    if !is_zero(&b[OFF_RESERVED..OFF_EXTENTS]) || !is_zero(&b[end..b.len() - 4]) {
        return Err(AlDecodeError::NonZeroPadding);
    }
    let extents: Vec<u32> = (0..count as usize)
        .map(|i| get_u32(b, OFF_EXTENTS + 4 * i))
        .collect();
    if !extents.windows(2).all(|w| w[0] < w[1]) {
        return Err(AlDecodeError::ExtentsNotAscending);
    }
    if let Some(&extent) = extents.iter().find(|&&e| u64::from(e) >= extent_count) {
        return Err(AlDecodeError::ExtentOutOfRange { extent });
    }
    Ok(AlRecord {
        sequence: get_u64(b, OFF_SEQUENCE),
        extents,
    })
}

/// Recovery choice between the two record slots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlPicked {
    pub slot: usize,
    pub record: AlRecord,
    pub conditions: [Result<u64, AlDecodeError>; 2],
}

/// Newest valid record; `None` with both conditions when neither is valid. Equal
/// sequences cannot happen (each record gets a fresh one); if they do, the record with
/// more extents is taken (a superset is always safe).
pub fn pick(
    slots_bytes: [&[u8]; 2],
    uuid: &[u8; 16],
    slots: u32,
    extent_count: u64,
) -> Result<AlPicked, [AlDecodeError; 2]> {
    let d = [
        decode(slots_bytes[0], uuid, slots, extent_count),
        decode(slots_bytes[1], uuid, slots, extent_count),
    ];
    let conditions = [
        d[0].as_ref().map(|r| r.sequence).map_err(Clone::clone),
        d[1].as_ref().map(|r| r.sequence).map_err(Clone::clone),
    ];
    let slot = match (&d[0], &d[1]) {
        (Ok(a), Ok(b)) => {
            if (a.sequence, a.extents.len()) >= (b.sequence, b.extents.len()) {
                0
            } else {
                1
            }
        }
        (Ok(_), Err(_)) => 0,
        (Err(_), Ok(_)) => 1,
        (Err(a), Err(b)) => return Err([a.clone(), b.clone()]),
    };
    let record = d[slot].clone().expect("picked slot valid");
    Ok(AlPicked {
        slot,
        record,
        conditions,
    })
}

/// A record being written.
#[derive(Clone, Debug)]
struct InFlight {
    sequence: u64,
    extents: BTreeSet<u32>,
}

/// The in-memory activity log.
#[derive(Debug)]
pub struct ActivityLog {
    slot_count: u32,
    /// Content of the newest durable record.
    durable: BTreeSet<u32>,
    /// The newest record built (in flight or durable), with last-use ticks for LRU.
    current: FxHashMap<u32, u64>,
    in_flight: Option<InFlight>,
    /// Writes in progress per extent; a pinned extent is never evicted.
    pins: FxHashMap<u32, u32>,
    tick: u64,
    next_sequence: u64,
    /// Slot the next record goes to (the one not holding the newest valid record).
    next_slot: usize,
    transactions: u64,
}

impl ActivityLog {
    /// State after `create` wrote an empty record with sequence 1 to slot 0.
    pub fn created(slot_count: u32) -> ActivityLog {
        ActivityLog::recovered(
            slot_count,
            0,
            &AlRecord {
                sequence: 1,
                extents: Vec::new(),
            },
        )
    }

    /// State after recovery found `record` in `slot`.
    pub fn recovered(slot_count: u32, slot: usize, record: &AlRecord) -> ActivityLog {
        assert!(slot < 2);
        ActivityLog {
            slot_count,
            durable: record.extents.iter().copied().collect(),
            current: record.extents.iter().map(|&e| (e, 0)).collect(),
            in_flight: None,
            pins: FxHashMap::default(),
            tick: 1,
            next_sequence: record.sequence + 1,
            next_slot: 1 - slot,
            transactions: 0,
        }
    }

    pub fn slot_count(&self) -> u32 {
        self.slot_count
    }

    /// Hot and safe to submit into: durable, and not being evicted by the record in flight.
    pub fn is_durably_hot(&self, extent: u32) -> bool {
        self.durable.contains(&extent) && self.current.contains_key(&extent)
    }

    pub fn all_durably_hot(&self, extents: std::ops::RangeInclusive<u32>) -> bool {
        extents.into_iter().all(|e| self.is_durably_hot(e))
    }

    pub fn touch(&mut self, extents: std::ops::RangeInclusive<u32>) {
        self.tick += 1;
        for e in extents {
            if let Some(t) = self.current.get_mut(&e) {
                *t = self.tick;
            }
        }
    }

    pub fn pin(&mut self, extents: std::ops::RangeInclusive<u32>) {
        for e in extents {
            *self.pins.entry(e).or_insert(0) += 1;
        }
    }

    pub fn unpin(&mut self, extents: std::ops::RangeInclusive<u32>) {
        for e in extents {
            let n = self.pins.get_mut(&e).expect("unpin of an unpinned extent");
            *n -= 1;
            if *n == 0 {
                self.pins.remove(&e);
            }
        }
    }

    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    pub fn hot_extents(&self) -> impl Iterator<Item = u32> + '_ {
        self.current.keys().copied()
    }

    pub fn hot_count(&self) -> usize {
        self.current.len()
    }

    pub fn transactions(&self) -> u64 {
        self.transactions
    }

    /// Builds the next record for the waiting writes' extent sets, in FIFO order (no
    /// overtaking: a write that does not fit stops the batch, so a large write cannot
    /// starve). Evicts least-recently-used unpinned extents that no admitted write needs.
    /// Returns the (sequence, slot, extents) to write, or `None` if nothing changes.
    pub fn build(
        &mut self,
        waiting: &[std::ops::RangeInclusive<u32>],
    ) -> Option<(u64, usize, Vec<u32>)> {
        assert!(
            self.in_flight.is_none(),
            "one AL record in flight at a time"
        );
        let mut next: BTreeSet<u32> = self.current.keys().copied().collect();
        let mut protected: BTreeSet<u32> = BTreeSet::new();
        let mut candidates: Vec<(u64, u32)> = self
            .current
            .iter()
            .filter(|(e, _)| !self.pins.contains_key(e))
            .map(|(&e, &t)| (t, e))
            .collect();
        candidates.sort_unstable();
        let mut candidates = candidates.into_iter();
        let mut changed = false;
        for extents in waiting {
            let missing: Vec<u32> = extents.clone().filter(|e| !next.contains(e)).collect();
            protected.extend(extents.clone());
            let free = self.slot_count as usize - next.len();
            let mut evict = Vec::new();
            if missing.len() > free {
                let needed = missing.len() - free;
                let lookahead = candidates.clone();
                for (_, e) in lookahead.filter(|(_, e)| !protected.contains(e) && next.contains(e))
                {
                    evict.push(e);
                    if evict.len() == needed {
                        break;
                    }
                }
                if evict.len() < needed {
                    break; // all slots pinned or protected: this write waits (a bound)
                }
            }
            for e in &evict {
                next.remove(e);
            }
            candidates = candidates
                .filter(|(_, e)| !evict.contains(e))
                .collect::<Vec<_>>()
                .into_iter();
            next.extend(missing.iter().copied());
            changed |= !missing.is_empty();
        }
        if !changed {
            return None;
        }
        Some(self.commit(next))
    }

    /// Builds a record keeping only the pinned extents: every unpinned extent's writes
    /// are durable on both sides (or their bits in the journal), so it may go cold. Used
    /// on a clean stop, so a restart does not resync what is already in sync. `None` if
    /// nothing would change.
    pub fn build_cooled(&mut self) -> Option<(u64, usize, Vec<u32>)> {
        assert!(
            self.in_flight.is_none(),
            "one AL record in flight at a time"
        );
        let next: BTreeSet<u32> = self
            .current
            .keys()
            .copied()
            .filter(|e| self.pins.contains_key(e))
            .collect();
        if next.len() == self.current.len() && self.durable.len() == next.len() {
            return None;
        }
        Some(self.commit(next))
    }

    /// Makes `next` the hot set and the record in flight.
    fn commit(&mut self, next: BTreeSet<u32>) -> (u64, usize, Vec<u32>) {
        assert!(next.len() <= self.slot_count as usize);
        self.tick += 1;
        let tick = self.tick;
        self.current.retain(|e, _| next.contains(e));
        for &e in &next {
            self.current.entry(e).or_insert(tick);
        }
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let slot = self.next_slot;
        self.next_slot = 1 - slot;
        self.in_flight = Some(InFlight {
            sequence,
            extents: next.clone(),
        });
        self.transactions += 1;
        (sequence, slot, next.into_iter().collect())
    }

    /// The record with `sequence` is durable.
    pub fn record_durable(&mut self, sequence: u64) {
        let f = self.in_flight.take().expect("AL record in flight");
        assert_eq!(f.sequence, sequence);
        self.durable = f.extents;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UUID: [u8; 16] = [3; 16];

    fn encoded(seq: u64, extents: &[u32]) -> Vec<u8> {
        encode(
            &UUID,
            1024,
            &AlRecord {
                sequence: seq,
                extents: extents.to_vec(),
            },
        )
    }

    #[test]
    fn record_size() {
        assert_eq!(record_bytes(1024), 8192);
        assert_eq!(record_bytes(16), 4096);
        assert_eq!(record_bytes(1011), 4096);
        assert_eq!(record_bytes(1012), 8192);
    }

    #[test]
    fn round_trip_full_set() {
        let extents: Vec<u32> = (0..1024).map(|i| i * 3).collect();
        let b = encoded(77, &extents);
        assert_eq!(
            decode(&b, &UUID, 1024, 10_000),
            Ok(AlRecord {
                sequence: 77,
                extents
            })
        );
    }

    #[test]
    fn tear_between_halves_detected() {
        let old = encoded(1, &(0..1024).collect::<Vec<_>>());
        let new = encoded(2, &(1..1025).collect::<Vec<_>>());
        for sectors in 1..16 {
            let mut torn = old.clone();
            torn[..sectors * 512].copy_from_slice(&new[..sectors * 512]);
            assert_eq!(
                decode(&torn, &UUID, 1024, 10_000),
                Err(AlDecodeError::Corrupt)
            );
        }
    }

    #[test]
    fn decode_errors() {
        assert_eq!(
            decode(&[0u8; 8192], &UUID, 1024, 100),
            Err(AlDecodeError::Blank)
        );
        let mut b = encoded(1, &[1]);
        b[0] = b'X';
        assert_eq!(decode(&b, &UUID, 1024, 100), Err(AlDecodeError::BadMagic));
        let mut b = encoded(1, &[1]);
        b[5000] = 1;
        assert_eq!(decode(&b, &UUID, 1024, 100), Err(AlDecodeError::Corrupt));
        assert_eq!(
            decode(&encoded(1, &[1]), &[9; 16], 1024, 100),
            Err(AlDecodeError::ForeignMirror)
        );
        assert_eq!(
            decode(&encoded(1, &[1])[..4096], &UUID, 1024, 100),
            Err(AlDecodeError::Corrupt)
        );
        let mut b = encoded(1, &[1]);
        put_u32(&mut b, OFF_SLOTS, 512);
        seal(&mut b);
        assert_eq!(
            decode(&b, &UUID, 1024, 100),
            Err(AlDecodeError::SlotCountMismatch { found: 512 })
        );
        let mut b = encoded(1, &[1]);
        put_u32(&mut b, OFF_COUNT, 2000);
        seal(&mut b);
        assert_eq!(
            decode(&b, &UUID, 1024, 100),
            Err(AlDecodeError::TooManyExtents { count: 2000 })
        );
        let mut b = encoded(1, &[1, 2]);
        put_u32(&mut b, OFF_EXTENTS, 5);
        seal(&mut b);
        assert_eq!(
            decode(&b, &UUID, 1024, 100),
            Err(AlDecodeError::ExtentsNotAscending)
        );
        assert_eq!(
            decode(&encoded(1, &[1, 200]), &UUID, 1024, 100),
            Err(AlDecodeError::ExtentOutOfRange { extent: 200 })
        );
        let mut b = encoded(1, &[1]);
        b[7000] = 1;
        seal(&mut b);
        assert_eq!(
            decode(&b, &UUID, 1024, 100),
            Err(AlDecodeError::NonZeroPadding)
        );
    }

    #[test]
    fn pick_newest_valid() {
        let a = encoded(4, &[1]);
        let b = encoded(5, &[2]);
        assert_eq!(pick([&a, &b], &UUID, 1024, 100).unwrap().slot, 1);
        let mut torn = b.clone();
        torn[100] ^= 1;
        let p = pick([&a, &torn], &UUID, 1024, 100).unwrap();
        assert_eq!((p.slot, p.record.extents.clone()), (0, vec![1]));
        assert!(pick([&torn, &torn], &UUID, 1024, 100).is_err());
    }

    #[test]
    fn lru_evicts_unpinned_least_recent() {
        let mut al = ActivityLog::created(16);
        let (_, slot, ext) = al
            .build(&(0..16).map(|e| e..=e).collect::<Vec<_>>())
            .unwrap();
        assert_eq!((slot, ext.len()), (1, 16));
        al.record_durable(2);
        al.touch(0..=0);
        al.pin(1..=1);
        let (_, slot, ext) = al.build(&[100..=101]).unwrap();
        assert_eq!(slot, 0);
        assert!(ext.contains(&0) && ext.contains(&1) && !ext.contains(&2) && !ext.contains(&3));
        assert!(!al.is_durably_hot(100), "not durable before the record is");
        assert!(!al.is_durably_hot(2), "being evicted");
        al.record_durable(3);
        assert!(al.is_durably_hot(100) && al.is_durably_hot(101));
    }

    #[test]
    fn all_pinned_means_wait() {
        let mut al = ActivityLog::created(16);
        al.build(&[0..=15]).unwrap();
        al.record_durable(2);
        al.pin(0..=15);
        assert_eq!(al.build(&[20..=20]), None);
        al.unpin(3..=3);
        let (_, _, ext) = al.build(&[20..=20]).unwrap();
        assert!(ext.contains(&20) && !ext.contains(&3));
    }

    #[test]
    fn fifo_batch_stops_at_first_misfit() {
        let mut al = ActivityLog::created(16);
        let (_, _, ext) = al.build(&[0..=9, 10..=19, 30..=30]).unwrap();
        assert_eq!(
            ext,
            (0..=9).collect::<Vec<_>>(),
            "second write does not fit, third must not overtake"
        );
    }

    proptest! {
        #[test]
        fn prop_round_trip(seq: u64, set in proptest::collection::btree_set(0u32..100_000, 0..1024)) {
            let extents: Vec<u32> = set.into_iter().collect();
            let b = encode(&UUID, 1024, &AlRecord { sequence: seq, extents: extents.clone() });
            prop_assert_eq!(decode(&b, &UUID, 1024, 100_000), Ok(AlRecord { sequence: seq, extents }));
        }
    }
}
