//! Overlap tracking: which byte ranges have a modifying request in flight, and which
//! requests wait for them.
//!
//! Two users rely on it. The NBD front end serialises read-modify-write of a partial
//! block against every other write touching that block (a client that ignores the
//! advertised minimum block size must not lose a neighbour's bytes). Replication holds
//! an overlapping write until the earlier one has completed on both sides (DESIGN §5),
//! so both replicas apply overlapping writes in the same order.
//!
//! Rules: active ranges never overlap each other; waiters are granted in arrival order
//! among those that overlap (a later request never overtakes an earlier overlapping one),
//! while non-overlapping requests proceed independently.

use std::collections::{BTreeMap, VecDeque};

use rustc_hash::FxHashMap;

/// A half-open byte range `[start, end)`; never empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    start: u64,
    end: u64,
}

impl ByteRange {
    /// `None` when the range would be empty or overflow `u64`.
    pub fn new(start: u64, length: u64) -> Option<ByteRange> {
        let end = start.checked_add(length)?;
        (length > 0).then_some(ByteRange { start, end })
    }

    pub fn start(&self) -> u64 {
        self.start
    }

    pub fn end(&self) -> u64 {
        self.end
    }

    pub fn length(&self) -> u64 {
        self.end - self.start
    }

    pub fn overlaps(&self, other: &ByteRange) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// The smallest range aligned to `block_bytes` (a power of two) containing this one.
    pub fn align_out(&self, block_bytes: u64) -> ByteRange {
        assert!(block_bytes.is_power_of_two());
        let start = self.start & !(block_bytes - 1);
        let end = self.end.next_multiple_of(block_bytes);
        ByteRange { start, end }
    }

    pub fn is_aligned(&self, block_bytes: u64) -> bool {
        assert!(block_bytes.is_power_of_two());
        self.start.is_multiple_of(block_bytes) && self.end.is_multiple_of(block_bytes)
    }
}

/// Outcome of [`RangeLocks::acquire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquire {
    /// The range is now held by the caller's id; release it when the request completes.
    Granted,
    /// The range overlaps an active or earlier waiting request; the id is granted later,
    /// reported by [`RangeLocks::release`].
    Queued,
}

/// Exclusive locks on byte ranges, keyed by request id. Single-threaded, no I/O.
#[derive(Debug, Default)]
pub struct RangeLocks {
    /// Active ranges keyed by start. Disjoint, so their ends are sorted too.
    active: BTreeMap<u64, (u64, u64)>,
    /// Request id -> its active range start, for release.
    active_by_id: FxHashMap<u64, u64>,
    /// Requests waiting for an overlapping one to finish, in arrival order.
    waiting: VecDeque<(u64, ByteRange)>,
}

impl RangeLocks {
    pub fn new() -> RangeLocks {
        RangeLocks::default()
    }

    pub fn active_count(&self) -> usize {
        self.active.len()
    }

    pub fn waiting_count(&self) -> usize {
        self.waiting.len()
    }

    /// Takes `range` for `id`, or queues it behind what it overlaps.
    pub fn acquire(&mut self, id: u64, range: ByteRange) -> Acquire {
        assert!(
            !self.active_by_id.contains_key(&id),
            "request id {id} already holds a range"
        );
        assert!(
            !self.waiting.iter().any(|(w, _)| *w == id),
            "request id {id} is already waiting"
        );
        let blocked_by_waiter = self.waiting.iter().any(|(_, w)| w.overlaps(&range));
        if blocked_by_waiter || self.overlaps_active(&range) {
            self.waiting.push_back((id, range));
            Acquire::Queued
        } else {
            self.insert_active(id, range);
            Acquire::Granted
        }
    }

    /// Releases the range held by `id` and appends to `granted` every waiting id that now
    /// holds its range, in arrival order.
    pub fn release(&mut self, id: u64, granted: &mut Vec<u64>) {
        let start = self
            .active_by_id
            .remove(&id)
            .unwrap_or_else(|| panic!("request id {id} released a range it does not hold"));
        let removed = self.active.remove(&start);
        assert!(matches!(removed, Some((_, owner)) if owner == id));
        if self.waiting.is_empty() {
            return;
        }
        // A waiter is granted when it overlaps no active range and no earlier waiter
        // that is still waiting; the scan keeps arrival order among overlapping ones.
        let mut still_waiting: Vec<ByteRange> = Vec::new();
        let mut index = 0;
        while index < self.waiting.len() {
            let (waiter, range) = self.waiting[index];
            let blocked =
                still_waiting.iter().any(|w| w.overlaps(&range)) || self.overlaps_active(&range);
            if blocked {
                still_waiting.push(range);
                index += 1;
            } else {
                self.waiting.remove(index);
                self.insert_active(waiter, range);
                granted.push(waiter);
            }
        }
    }

    fn overlaps_active(&self, range: &ByteRange) -> bool {
        // Active ranges are disjoint and sorted by start, hence also by end: the last one
        // starting before `range.end` has the largest end among all that could overlap.
        self.active
            .range(..range.end)
            .next_back()
            .is_some_and(|(_, (end, _))| *end > range.start)
    }

    fn insert_active(&mut self, id: u64, range: ByteRange) {
        debug_assert!(!self.overlaps_active(&range));
        self.active.insert(range.start, (range.end, id));
        self.active_by_id.insert(id, range.start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn r(start: u64, length: u64) -> ByteRange {
        ByteRange::new(start, length).unwrap()
    }

    #[test]
    fn byte_range_rejects_empty_and_overflow() {
        assert!(ByteRange::new(0, 0).is_none());
        assert!(ByteRange::new(u64::MAX, 1).is_none());
        assert_eq!(r(10, 5).end(), 15);
    }

    #[test]
    fn align_out_covers_partial_blocks() {
        let a = r(4097, 10).align_out(4096);
        assert_eq!((a.start(), a.end()), (4096, 8192));
        let b = r(4095, 2).align_out(4096);
        assert_eq!((b.start(), b.end()), (0, 8192));
        assert!(r(4096, 4096).is_aligned(4096));
        assert!(!r(4096, 512).is_aligned(4096));
    }

    #[test]
    fn disjoint_ranges_are_granted_together() {
        let mut locks = RangeLocks::new();
        assert_eq!(locks.acquire(1, r(0, 4096)), Acquire::Granted);
        assert_eq!(locks.acquire(2, r(4096, 4096)), Acquire::Granted);
        assert_eq!(locks.active_count(), 2);
    }

    #[test]
    fn overlapping_range_waits_and_is_granted_on_release() {
        let mut locks = RangeLocks::new();
        assert_eq!(locks.acquire(1, r(0, 8192)), Acquire::Granted);
        assert_eq!(locks.acquire(2, r(4096, 4096)), Acquire::Queued);
        let mut granted = Vec::new();
        locks.release(1, &mut granted);
        assert_eq!(granted, vec![2]);
    }

    #[test]
    fn later_waiter_never_overtakes_earlier_overlapping_waiter() {
        let mut locks = RangeLocks::new();
        assert_eq!(locks.acquire(1, r(0, 4096)), Acquire::Granted);
        assert_eq!(locks.acquire(2, r(0, 8192)), Acquire::Queued);
        // Overlaps waiter 2 but not the active range: must still queue behind 2.
        assert_eq!(locks.acquire(3, r(4096, 4096)), Acquire::Queued);
        // Overlaps nothing: proceeds.
        assert_eq!(locks.acquire(4, r(16384, 4096)), Acquire::Granted);
        let mut granted = Vec::new();
        locks.release(1, &mut granted);
        assert_eq!(granted, vec![2]);
        granted.clear();
        locks.release(2, &mut granted);
        assert_eq!(granted, vec![3]);
    }

    #[test]
    #[should_panic(expected = "does not hold")]
    fn releasing_unknown_id_is_a_bug() {
        RangeLocks::new().release(9, &mut Vec::new());
    }

    proptest! {
        /// Model check: at every step the active set is pairwise disjoint, every request
        /// is granted eventually, and overlapping requests are granted in arrival order.
        #[test]
        fn grants_are_disjoint_ordered_and_complete(
            ops in proptest::collection::vec((0u64..64, 1u64..8, any::<bool>()), 1..200)
        ) {
            let mut locks = RangeLocks::new();
            let mut ranges: HashMap<u64, ByteRange> = HashMap::new();
            let mut active: Vec<u64> = Vec::new();
            let mut grant_order: Vec<u64> = Vec::new();
            let mut next_id = 0u64;
            for (start, len, release_first) in ops {
                if release_first && !active.is_empty() {
                    let id = active.remove(0);
                    let mut granted = Vec::new();
                    locks.release(id, &mut granted);
                    grant_order.extend(&granted);
                    active.extend(granted);
                }
                let id = next_id;
                next_id += 1;
                let range = r(start * 512, len * 512);
                ranges.insert(id, range);
                if locks.acquire(id, range) == Acquire::Granted {
                    grant_order.push(id);
                    active.push(id);
                }
                for (i, a) in active.iter().enumerate() {
                    for b in &active[i + 1..] {
                        prop_assert!(!ranges[a].overlaps(&ranges[b]));
                    }
                }
            }
            while !active.is_empty() {
                let id = active.remove(0);
                let mut granted = Vec::new();
                locks.release(id, &mut granted);
                grant_order.extend(&granted);
                active.extend(granted);
            }
            prop_assert_eq!(grant_order.len() as u64, next_id);
            prop_assert_eq!(locks.waiting_count(), 0);
            // Overlapping pairs were granted in id (arrival) order.
            let position: HashMap<u64, usize> =
                grant_order.iter().enumerate().map(|(i, id)| (*id, i)).collect();
            for a in 0..next_id {
                for b in a + 1..next_id {
                    if ranges[&a].overlaps(&ranges[&b]) {
                        prop_assert!(position[&a] < position[&b]);
                    }
                }
            }
        }
    }
}
