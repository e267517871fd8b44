//! The demo's workload, as pure code: which writes go where (a fixed seed, so every
//! run writes the same), what each 4 KiB block must then contain, and the comparison
//! of what was read against that. No I/O: `demo` sends the writes and reads the bytes.
//!
//! Every block's content is a function of its index and a version (one per kind of
//! write), so nothing written needs to be kept in memory: a `Model` remembers one
//! version byte per block (16 MiB for a 64 GiB volume) and regenerates the rest.

use std::collections::BTreeSet;

/// The unit the model tracks: every write is aligned to it and a multiple of it.
pub const BLOCK_BYTES: u64 = 4096;
/// Size of the sequential writes of the first workload (and of the read-back chunks).
pub const SEQUENTIAL_WRITE_BYTES: u64 = 1 << 20;
/// Size of the scattered writes made while the peer is away: 16 regions of 4 KiB each.
pub const OUTAGE_WRITE_BYTES: u64 = 64 << 10;
/// The first workload writes sequentially over this fraction of the volume (at most
/// `SEQUENTIAL_BYTES_MAX`), as a database restore or a file copy would.
pub const SEQUENTIAL_FRACTION: u64 = 4;
pub const SEQUENTIAL_BYTES_MAX: u64 = 256 << 20;
/// Then this many random 4 KiB writes anywhere (at most one per 16 blocks).
pub const RANDOM_WRITE_COUNT: u64 = 1024;
/// While the peer is away, this fraction of the volume is written (at most
/// `OUTAGE_BYTES_MAX`): small against the volume, which is the point of FastSync.
pub const OUTAGE_FRACTION: u64 = 32;
pub const OUTAGE_BYTES_MAX: u64 = 64 << 20;

/// Versions: which kind of write last touched a block. 0 = never written (zeros).
pub const VERSION_SEQUENTIAL: u8 = 1;
pub const VERSION_RANDOM: u8 = 2;
pub const VERSION_OUTAGE: u8 = 3;

/// The fixed seed: the same workload every run, so two runs' reports compare.
const SEED: u64 = 0x6d69_7272_6f72_6469; // "mirrordi"

/// One write of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Write {
    pub offset: u64,
    pub length: u64,
    pub version: u8,
}

/// splitmix64 (Steele, Lea, Flood 2014): a tiny, well-mixed generator; not for
/// anything but test patterns.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The first workload: sequential 1 MiB writes from offset 0 over a quarter of the
/// volume, then random 4 KiB writes anywhere (some land in the sequential part and
/// overwrite it).
pub fn first_workload(data_bytes: u64) -> Vec<Write> {
    assert!(data_bytes >= SEQUENTIAL_WRITE_BYTES && data_bytes.is_multiple_of(BLOCK_BYTES));
    let sequential = (data_bytes / SEQUENTIAL_FRACTION).min(SEQUENTIAL_BYTES_MAX)
        / SEQUENTIAL_WRITE_BYTES
        * SEQUENTIAL_WRITE_BYTES;
    let mut writes: Vec<Write> = (0..sequential / SEQUENTIAL_WRITE_BYTES)
        .map(|i| Write {
            offset: i * SEQUENTIAL_WRITE_BYTES,
            length: SEQUENTIAL_WRITE_BYTES,
            version: VERSION_SEQUENTIAL,
        })
        .collect();
    let blocks = data_bytes / BLOCK_BYTES;
    let mut state = SEED;
    let count = RANDOM_WRITE_COUNT.min(blocks / 16);
    writes.extend((0..count).map(|_| Write {
        offset: splitmix64(&mut state) % blocks * BLOCK_BYTES,
        length: BLOCK_BYTES,
        version: VERSION_RANDOM,
    }));
    writes
}

/// The writes made while the peer is away: distinct 64 KiB-aligned regions spread over
/// the whole volume, in random order, about 1/32 of it.
pub fn outage_workload(data_bytes: u64) -> Vec<Write> {
    let slots = data_bytes / OUTAGE_WRITE_BYTES;
    assert!(slots >= 2, "volume too small for the outage workload");
    let count = ((data_bytes / OUTAGE_FRACTION).min(OUTAGE_BYTES_MAX) / OUTAGE_WRITE_BYTES)
        .clamp(1, slots / 2);
    let mut state = !SEED;
    let mut chosen = BTreeSet::new();
    let mut writes = Vec::with_capacity(count as usize);
    // At most half of the slots are chosen, so each draw succeeds with probability at
    // least 1/2 and this ends quickly.
    while (writes.len() as u64) < count {
        let slot = splitmix64(&mut state) % slots;
        if chosen.insert(slot) {
            writes.push(Write {
                offset: slot * OUTAGE_WRITE_BYTES,
                length: OUTAGE_WRITE_BYTES,
                version: VERSION_OUTAGE,
            });
        }
    }
    writes
}

/// Fills `out` (one block) with the content of block `index` at `version`; version 0
/// is a block never written: zeros.
pub fn fill_block(index: u64, version: u8, out: &mut [u8]) {
    assert_eq!(out.len() as u64, BLOCK_BYTES);
    if version == 0 {
        out.fill(0);
        return;
    }
    let mut state = SEED ^ index.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ (u64::from(version) << 56);
    for word in out.chunks_exact_mut(8) {
        word.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
}

/// What every block of the volume must contain: one version byte per block.
#[derive(Debug, Clone)]
pub struct Model {
    versions: Vec<u8>,
}

impl Model {
    pub fn new(data_bytes: u64) -> Model {
        assert!(data_bytes.is_multiple_of(BLOCK_BYTES));
        Model {
            versions: vec![0; (data_bytes / BLOCK_BYTES) as usize],
        }
    }

    /// The bytes of `write`, to send.
    pub fn content(write: &Write) -> Vec<u8> {
        let mut data = vec![0u8; write.length as usize];
        let first = write.offset / BLOCK_BYTES;
        for (i, block) in data.chunks_exact_mut(BLOCK_BYTES as usize).enumerate() {
            fill_block(first + i as u64, write.version, block);
        }
        data
    }

    /// Records that `write` was acknowledged.
    pub fn record(&mut self, write: &Write) {
        assert!(
            write.offset.is_multiple_of(BLOCK_BYTES) && write.length.is_multiple_of(BLOCK_BYTES)
        );
        let first = (write.offset / BLOCK_BYTES) as usize;
        let count = (write.length / BLOCK_BYTES) as usize;
        self.versions[first..first + count].fill(write.version);
    }

    /// Bytes written at least once.
    pub fn written_bytes(&self) -> u64 {
        self.versions.iter().filter(|v| **v != 0).count() as u64 * BLOCK_BYTES
    }

    /// The written parts of the volume as ranges `(offset, length)` of at most
    /// `max_bytes`, in order: what to read back through an export.
    pub fn written_ranges(&self, max_bytes: u64) -> Vec<(u64, u64)> {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (index, version) in self.versions.iter().enumerate() {
            if *version == 0 {
                continue;
            }
            let offset = index as u64 * BLOCK_BYTES;
            match ranges.last_mut() {
                Some((start, length)) if *start + *length == offset && *length < max_bytes => {
                    *length += BLOCK_BYTES;
                }
                _ => ranges.push((offset, BLOCK_BYTES)),
            }
        }
        ranges
    }

    /// Checks `data`, read at `offset`, against the model. The error names the first
    /// block that differs.
    pub fn check(&self, offset: u64, data: &[u8]) -> Result<(), String> {
        assert!(
            offset.is_multiple_of(BLOCK_BYTES) && (data.len() as u64).is_multiple_of(BLOCK_BYTES)
        );
        let mut expected = vec![0u8; BLOCK_BYTES as usize];
        let first = offset / BLOCK_BYTES;
        for (i, block) in data.chunks_exact(BLOCK_BYTES as usize).enumerate() {
            let index = first + i as u64;
            let version = self.versions[index as usize];
            fill_block(index, version, &mut expected);
            if block != expected.as_slice() {
                let what = match version {
                    0 => "zeros (never written)".to_string(),
                    v => format!("the data of write kind {v}"),
                };
                return Err(format!(
                    "the 4 KiB block at offset {} differs from what was written: expected {what}",
                    index * BLOCK_BYTES
                ));
            }
        }
        Ok(())
    }
}

/// The offset of the first byte where `a` and `b` differ (`None` if equal).
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    assert_eq!(a.len(), b.len());
    if a == b {
        return None;
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_first_workload_is_a_sequential_quarter_then_random_blocks() {
        let writes = first_workload(256 * MIB);
        let sequential: Vec<_> = writes
            .iter()
            .filter(|w| w.version == VERSION_SEQUENTIAL)
            .collect();
        assert_eq!(sequential.len(), 64);
        assert_eq!(sequential.last().unwrap().offset, 63 * MIB);
        let random: Vec<_> = writes
            .iter()
            .filter(|w| w.version == VERSION_RANDOM)
            .collect();
        assert_eq!(random.len() as u64, RANDOM_WRITE_COUNT);
        assert!(random.iter().all(|w| w.length == BLOCK_BYTES
            && w.offset.is_multiple_of(BLOCK_BYTES)
            && w.offset < 256 * MIB));
        // Spread: both halves of the volume are hit.
        assert!(random.iter().any(|w| w.offset < 128 * MIB));
        assert!(random.iter().any(|w| w.offset >= 128 * MIB));
        assert_eq!(first_workload(256 * MIB), writes, "deterministic");
        // Capped on large volumes, scaled down on small ones.
        let big = first_workload(64 << 30);
        assert_eq!(
            big.iter()
                .filter(|w| w.version == VERSION_SEQUENTIAL)
                .count() as u64,
            SEQUENTIAL_BYTES_MAX / MIB
        );
        let small = first_workload(8 * MIB);
        assert_eq!(small.len(), 2 + 128);
    }

    #[test]
    fn the_outage_writes_are_distinct_regions_of_a_32nd() {
        let writes = outage_workload(256 * MIB);
        assert_eq!(writes.len(), 128);
        let offsets: BTreeSet<u64> = writes.iter().map(|w| w.offset).collect();
        assert_eq!(offsets.len(), writes.len(), "distinct");
        assert!(writes.iter().all(
            |w| w.offset.is_multiple_of(OUTAGE_WRITE_BYTES) && w.offset + w.length <= 256 * MIB
        ));
        assert_eq!(
            outage_workload(1 << 40).len() as u64,
            OUTAGE_BYTES_MAX / OUTAGE_WRITE_BYTES
        );
        assert_eq!(outage_workload(2 * OUTAGE_WRITE_BYTES).len(), 1);
    }

    #[test]
    fn blocks_differ_by_index_and_version() {
        let mut a = vec![0u8; BLOCK_BYTES as usize];
        let mut b = a.clone();
        fill_block(5, 1, &mut a);
        fill_block(5, 2, &mut b);
        assert_ne!(a, b);
        fill_block(6, 1, &mut b);
        assert_ne!(a, b);
        fill_block(5, 1, &mut b);
        assert_eq!(a, b);
        fill_block(5, 0, &mut b);
        assert!(b.iter().all(|x| *x == 0));
    }

    #[test]
    fn the_model_checks_what_was_written_and_names_the_first_difference() {
        let mut model = Model::new(MIB);
        let write = Write {
            offset: 8192,
            length: 3 * BLOCK_BYTES,
            version: VERSION_OUTAGE,
        };
        let data = Model::content(&write);
        model.record(&write);
        model.record(&Write {
            offset: 0,
            length: BLOCK_BYTES,
            version: VERSION_RANDOM,
        });
        assert_eq!(model.written_bytes(), 4 * BLOCK_BYTES);
        assert_eq!(
            model.written_ranges(MIB),
            vec![(0, BLOCK_BYTES), (8192, 3 * BLOCK_BYTES)]
        );
        assert_eq!(
            model.written_ranges(2 * BLOCK_BYTES),
            vec![(0, 4096), (8192, 8192), (16384, 4096)]
        );
        model.check(8192, &data).unwrap();
        let zeros = vec![0u8; BLOCK_BYTES as usize];
        model.check(4096, &zeros).unwrap();
        let mut bad = data.clone();
        bad[5000] ^= 1;
        let error = model.check(8192, &bad).unwrap_err();
        assert!(error.contains("offset 12288"), "{error}");
        let error = model.check(0, &zeros).unwrap_err();
        assert!(
            error.contains("offset 0") && error.contains("kind 2"),
            "{error}"
        );
    }

    #[test]
    fn first_difference_finds_the_first_byte() {
        assert_eq!(first_difference(b"abcd", b"abcd"), None);
        assert_eq!(first_difference(b"abcd", b"abxx"), Some(2));
    }
}
