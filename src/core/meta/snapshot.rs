//! Codec for a bitmap snapshot slot (header block + roaring portable payload) and coarsening.
//!
//! A slot holds one full dirty bitmap in roaring's standard portable serialization
//! (github.com/RoaringBitmap/RoaringFormatSpec, 32-bit), preceded by a 4 KiB header with
//! the journal epoch and sequence the snapshot stands for and a crc32c of the payload.
//! Slots are sized for the worst case of the whole bitmap; when a smaller slot was
//! requested and the bitmap does not fit, [`fit`] coarsens it — it only ever ADDS bits.

use roaring::RoaringBitmap;

use super::codec::{get_u32, get_u64, is_zero, put_u32, put_u64, seal, sealed_ok};
use super::{META_BLOCK_BYTES, round_up};

pub const SNAPSHOT_MAGIC: [u8; 8] = *b"MDSKSNAP";
const HEADER: usize = META_BLOCK_BYTES as usize;
const OFF_UUID: usize = 8;
const OFF_EPOCH: usize = 24;
const OFF_SEQUENCE: usize = 32;
const OFF_REGIONS: usize = 40;
const OFF_GRANULARITY: usize = 48;
const OFF_UNIT: usize = 52;
const OFF_PAYLOAD_BYTES: usize = 56;
const OFF_PAYLOAD_CRC: usize = 64;
const OFF_RESERVED: usize = 68;

/// Regions per roaring container (the high 16 bits of a region index pick the container).
const CHUNK_REGIONS: u64 = 1 << 16;

/// Worst-case serialized size of a bitmap over `regions` regions after `optimize()`:
/// every container at most 8192 bytes (an array of 4096 values or a bitset; a run
/// container is only kept when smaller), plus the header: cookie and count (8), the run
/// flags (one bit per container), a 4-byte description and a 4-byte offset per container.
pub fn payload_bytes_worst(regions: u64) -> u64 {
    let c = regions.div_ceil(CHUNK_REGIONS);
    8 + c.div_ceil(8) + 8 * c + 8192 * c
}

/// Serialized size of the coarsest bitmap: every container one full run (2 + 4 bytes).
/// Coarsening always reaches a bitmap no larger than this.
pub fn payload_bytes_coarsest(regions: u64) -> u64 {
    let c = regions.div_ceil(CHUNK_REGIONS);
    8 + c.div_ceil(8) + 8 * c + 6 * c
}

/// Slot size that holds any bitmap exactly: header block + worst-case payload.
pub fn slot_bytes_worst(regions: u64) -> u64 {
    META_BLOCK_BYTES + round_up(payload_bytes_worst(regions), META_BLOCK_BYTES)
}

/// Smallest slot accepted: header block + the coarsest payload.
pub fn slot_bytes_min(regions: u64) -> u64 {
    META_BLOCK_BYTES + round_up(payload_bytes_coarsest(regions), META_BLOCK_BYTES)
}

/// The header of one snapshot slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// Epoch of the log that continues this snapshot.
    pub epoch: u64,
    /// The journal sequence this snapshot occupies; replay starts at `sequence + 1`.
    pub sequence: u64,
    pub region_count: u64,
    pub granularity_bytes: u32,
    /// Largest coarsening unit applied, in regions (1 = exact).
    pub coarsen_unit_regions: u32,
    pub payload_bytes: u64,
    pub payload_crc32c: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotDecodeError {
    Blank,
    BadMagic,
    Corrupt,
    ForeignMirror,
    ReservedNonZero,
    /// The header describes another geometry (region count or granularity).
    GeometryMismatch,
    PayloadTooLarge {
        payload_bytes: u64,
    },
    PayloadCorrupt,
    /// The payload passed its checksum but is not a valid portable roaring bitmap.
    BitmapInvalid,
    /// The bitmap ended before `payload_bytes`.
    TrailingBytes,
    BitOutOfRange {
        region: u32,
    },
}

/// Encodes a full slot image: header block followed by the payload, padded to 4 KiB.
pub fn encode(uuid: &[u8; 16], header: &SnapshotHeader, bitmap: &RoaringBitmap) -> Vec<u8> {
    let mut payload = Vec::with_capacity(bitmap.serialized_size());
    bitmap
        .serialize_into(&mut payload)
        .expect("serialize into a Vec");
    assert_eq!(payload.len() as u64, header.payload_bytes);
    let mut b = vec![0u8; HEADER + round_up(payload.len() as u64, META_BLOCK_BYTES) as usize];
    b[..8].copy_from_slice(&SNAPSHOT_MAGIC);
    b[OFF_UUID..OFF_UUID + 16].copy_from_slice(uuid);
    put_u64(&mut b, OFF_EPOCH, header.epoch);
    put_u64(&mut b, OFF_SEQUENCE, header.sequence);
    put_u64(&mut b, OFF_REGIONS, header.region_count);
    put_u32(&mut b, OFF_GRANULARITY, header.granularity_bytes);
    put_u32(&mut b, OFF_UNIT, header.coarsen_unit_regions);
    put_u64(&mut b, OFF_PAYLOAD_BYTES, payload.len() as u64);
    put_u32(&mut b, OFF_PAYLOAD_CRC, crc32c::crc32c(&payload));
    seal(&mut b[..HEADER]);
    b[HEADER..HEADER + payload.len()].copy_from_slice(&payload);
    b
}

/// Builds a header for `bitmap` (which must already be optimized).
pub fn header_for(
    epoch: u64,
    sequence: u64,
    region_count: u64,
    granularity_bytes: u32,
    unit: u32,
    bitmap: &RoaringBitmap,
) -> SnapshotHeader {
    SnapshotHeader {
        epoch,
        sequence,
        region_count,
        granularity_bytes,
        coarsen_unit_regions: unit,
        payload_bytes: bitmap.serialized_size() as u64,
        payload_crc32c: 0, // filled by encode; decode reports the stored value
    }
}

/// Decodes the header block of a slot.
pub fn decode_header(b: &[u8], uuid: &[u8; 16]) -> Result<SnapshotHeader, SnapshotDecodeError> {
    if b.len() < HEADER {
        return Err(SnapshotDecodeError::Corrupt);
    }
    let b = &b[..HEADER];
    if is_zero(b) {
        return Err(SnapshotDecodeError::Blank);
    }
    if b[..8] != SNAPSHOT_MAGIC {
        return Err(SnapshotDecodeError::BadMagic);
    }
    if !sealed_ok(b) {
        return Err(SnapshotDecodeError::Corrupt);
    }
    if b[OFF_UUID..OFF_UUID + 16] != uuid[..] {
        return Err(SnapshotDecodeError::ForeignMirror);
    }
    if !is_zero(&b[OFF_RESERVED..HEADER - 4]) {
        return Err(SnapshotDecodeError::ReservedNonZero);
    }
    Ok(SnapshotHeader {
        epoch: get_u64(b, OFF_EPOCH),
        sequence: get_u64(b, OFF_SEQUENCE),
        region_count: get_u64(b, OFF_REGIONS),
        granularity_bytes: get_u32(b, OFF_GRANULARITY),
        coarsen_unit_regions: get_u32(b, OFF_UNIT),
        payload_bytes: get_u64(b, OFF_PAYLOAD_BYTES),
        payload_crc32c: get_u32(b, OFF_PAYLOAD_CRC),
    })
}

/// Decodes a whole slot (`b` is the slot area). Checks geometry, payload checksum, the
/// roaring structure, that the payload is consumed exactly and every bit is in range.
pub fn decode(
    b: &[u8],
    uuid: &[u8; 16],
    region_count: u64,
    granularity_bytes: u32,
) -> Result<(SnapshotHeader, RoaringBitmap), SnapshotDecodeError> {
    let header = decode_header(b, uuid)?;
    if header.region_count != region_count || header.granularity_bytes != granularity_bytes {
        return Err(SnapshotDecodeError::GeometryMismatch);
    }
    let capacity = (b.len() - HEADER) as u64;
    if header.payload_bytes > capacity {
        return Err(SnapshotDecodeError::PayloadTooLarge {
            payload_bytes: header.payload_bytes,
        });
    }
    let payload = &b[HEADER..HEADER + header.payload_bytes as usize];
    if crc32c::crc32c(payload) != header.payload_crc32c {
        return Err(SnapshotDecodeError::PayloadCorrupt);
    }
    let bitmap = decode_payload(payload, region_count)?;
    Ok((header, bitmap))
}

/// Decodes a portable roaring payload that must be consumed exactly, bits < region_count.
pub fn decode_payload(
    payload: &[u8],
    region_count: u64,
) -> Result<RoaringBitmap, SnapshotDecodeError> {
    let mut cursor = payload;
    let bitmap = RoaringBitmap::deserialize_from(&mut cursor)
        .map_err(|_| SnapshotDecodeError::BitmapInvalid)?;
    if !cursor.is_empty() {
        return Err(SnapshotDecodeError::TrailingBytes);
    }
    if let Some(max) = bitmap.max()
        && u64::from(max) >= region_count
    {
        return Err(SnapshotDecodeError::BitOutOfRange { region: max });
    }
    Ok(bitmap)
}

/// Sets every region of each `unit`-aligned block of regions that holds a set bit.
pub fn coarsen(bitmap: &mut RoaringBitmap, unit: u64, region_count: u64) {
    assert!(unit >= 1);
    let mut units = Vec::new();
    let mut it = bitmap.iter();
    while let Some(v) = it.next() {
        let start = u64::from(v) / unit * unit;
        let end = (start + unit).min(region_count);
        units.push((start, end));
        if end >= region_count {
            break;
        }
        it.advance_to(end as u32);
    }
    for (start, end) in units {
        bitmap.insert_range(start as u32..=(end - 1) as u32);
    }
}

/// Makes `bitmap` serialize within `capacity` bytes: optimize; if still too large,
/// coarsen to `first_unit` regions (one AL extent), then double the unit until it fits.
/// Returns the unit applied (1 = untouched). Never removes a bit. Asserts that the
/// coarsest bitmap fits, which the layout guarantees (slot >= `slot_bytes_min`).
pub fn fit(bitmap: &mut RoaringBitmap, capacity: u64, first_unit: u64, region_count: u64) -> u32 {
    assert!(capacity >= payload_bytes_coarsest(region_count));
    bitmap.optimize();
    if bitmap.serialized_size() as u64 <= capacity {
        return 1;
    }
    let mut unit = first_unit.max(1);
    loop {
        coarsen(bitmap, unit, region_count);
        bitmap.optimize();
        if bitmap.serialized_size() as u64 <= capacity {
            return unit.min(u64::from(u32::MAX)) as u32;
        }
        assert!(unit < region_count, "the coarsest bitmap always fits");
        unit *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UUID: [u8; 16] = [8; 16];
    const REGIONS: u64 = 300_000;

    fn image(bitmap: &mut RoaringBitmap) -> Vec<u8> {
        bitmap.optimize();
        let h = header_for(2, 10, REGIONS, 4096, 1, bitmap);
        let mut slot = encode(&UUID, &h, bitmap);
        slot.resize(slot_bytes_worst(REGIONS) as usize, 0);
        slot
    }

    #[test]
    fn round_trip() {
        let mut bm: RoaringBitmap = (0..100_000).step_by(7).collect();
        bm.insert_range(200_000..=250_000);
        let slot = image(&mut bm);
        let (h, decoded) = decode(&slot, &UUID, REGIONS, 4096).unwrap();
        assert_eq!((h.epoch, h.sequence), (2, 10));
        assert_eq!(decoded, bm);
    }

    #[test]
    fn worst_case_bound_holds() {
        // Every container a bitset, and run-heavy containers that optimize must shrink.
        let mut bm: RoaringBitmap = (0..REGIONS as u32).step_by(2).collect();
        bm.optimize();
        assert!(bm.serialized_size() as u64 <= payload_bytes_worst(REGIONS));
        let mut full = RoaringBitmap::new();
        full.insert_range(0..REGIONS as u32);
        full.optimize();
        assert!(full.serialized_size() as u64 <= payload_bytes_coarsest(REGIONS));
    }

    #[test]
    fn decode_blank_badmagic_corrupt_foreign() {
        let mut bm = RoaringBitmap::from([1, 2, 3]);
        let slot = image(&mut bm);
        assert_eq!(
            decode(&vec![0; slot.len()], &UUID, REGIONS, 4096),
            Err(SnapshotDecodeError::Blank)
        );
        let mut b = slot.clone();
        b[0] = 0;
        assert_eq!(
            decode(&b, &UUID, REGIONS, 4096),
            Err(SnapshotDecodeError::BadMagic)
        );
        let mut b = slot.clone();
        b[30] ^= 1;
        assert_eq!(
            decode(&b, &UUID, REGIONS, 4096),
            Err(SnapshotDecodeError::Corrupt)
        );
        assert_eq!(
            decode(&slot, &[0; 16], REGIONS, 4096),
            Err(SnapshotDecodeError::ForeignMirror)
        );
        assert_eq!(
            decode(&slot[..100], &UUID, REGIONS, 4096),
            Err(SnapshotDecodeError::Corrupt)
        );
    }

    #[test]
    fn decode_reserved_and_geometry() {
        let mut bm = RoaringBitmap::from([1]);
        let slot = image(&mut bm);
        let mut b = slot.clone();
        b[1000] = 1;
        seal(&mut b[..HEADER]);
        assert_eq!(
            decode(&b, &UUID, REGIONS, 4096),
            Err(SnapshotDecodeError::ReservedNonZero)
        );
        assert_eq!(
            decode(&slot, &UUID, REGIONS + 1, 4096),
            Err(SnapshotDecodeError::GeometryMismatch)
        );
        assert_eq!(
            decode(&slot, &UUID, REGIONS, 8192),
            Err(SnapshotDecodeError::GeometryMismatch)
        );
    }

    #[test]
    fn decode_payload_errors() {
        let mut bm = RoaringBitmap::from([1, 5]);
        let slot = image(&mut bm);
        let mut b = slot.clone();
        b[HEADER + 9] ^= 1;
        assert_eq!(
            decode(&b, &UUID, REGIONS, 4096),
            Err(SnapshotDecodeError::PayloadCorrupt)
        );
        let mut b = slot.clone();
        put_u64(&mut b, OFF_PAYLOAD_BYTES, 1 << 40);
        seal(&mut b[..HEADER]);
        assert_eq!(
            decode(&b, &UUID, REGIONS, 4096),
            Err(SnapshotDecodeError::PayloadTooLarge {
                payload_bytes: 1 << 40
            })
        );
        // A valid checksum over bytes that are not a roaring bitmap.
        let mut b = slot.clone();
        b[HEADER..HEADER + 4].copy_from_slice(&[9, 9, 9, 9]);
        let n = get_u64(&b, OFF_PAYLOAD_BYTES) as usize;
        let crc = crc32c::crc32c(&b[HEADER..HEADER + n]);
        put_u32(&mut b, OFF_PAYLOAD_CRC, crc);
        seal(&mut b[..HEADER]);
        assert_eq!(
            decode(&b, &UUID, REGIONS, 4096),
            Err(SnapshotDecodeError::BitmapInvalid)
        );
        // Trailing bytes after a valid bitmap.
        let mut b = slot.clone();
        let n = n + 2;
        put_u64(&mut b, OFF_PAYLOAD_BYTES, n as u64);
        let crc = crc32c::crc32c(&b[HEADER..HEADER + n]);
        put_u32(&mut b, OFF_PAYLOAD_CRC, crc);
        seal(&mut b[..HEADER]);
        assert_eq!(
            decode(&b, &UUID, REGIONS, 4096),
            Err(SnapshotDecodeError::TrailingBytes)
        );
        assert_eq!(
            decode(&slot, &UUID, 5, 4096),
            Err(SnapshotDecodeError::GeometryMismatch)
        );
        assert_eq!(
            decode_payload(
                &slot[HEADER..HEADER + get_u64(&slot, OFF_PAYLOAD_BYTES) as usize],
                5
            ),
            Err(SnapshotDecodeError::BitOutOfRange { region: 5 })
        );
    }

    #[test]
    fn fit_coarsens_and_only_adds() {
        let original: RoaringBitmap = (0..REGIONS as u32).step_by(3).collect();
        let mut bm = original.clone();
        let capacity = payload_bytes_coarsest(REGIONS) + 64;
        let unit = fit(&mut bm, capacity, 1024, REGIONS);
        assert!(unit >= 1024);
        assert!(bm.serialized_size() as u64 <= capacity);
        assert!(original.is_subset(&bm));
        assert!(bm.max().unwrap() < REGIONS as u32);
    }

    #[test]
    fn fit_leaves_small_bitmaps_alone() {
        let original = RoaringBitmap::from([1, 1000, 100_000]);
        let mut bm = original.clone();
        assert_eq!(fit(&mut bm, payload_bytes_worst(REGIONS), 1024, REGIONS), 1);
        assert_eq!(bm, original);
    }

    proptest! {
        #[test]
        fn prop_round_trip(bits in proptest::collection::vec(0u32..REGIONS as u32, 0..2000),
                           ranges in proptest::collection::vec((0u32..REGIONS as u32, 1u32..5000), 0..20)) {
            let mut bm: RoaringBitmap = bits.into_iter().collect();
            for (s, n) in ranges {
                bm.insert_range(s..(s.saturating_add(n)).min(REGIONS as u32));
            }
            let slot = image(&mut bm);
            let (_, decoded) = decode(&slot, &UUID, REGIONS, 4096).unwrap();
            prop_assert_eq!(decoded, bm);
        }

        #[test]
        fn prop_fit_is_superset_within_capacity(bits in proptest::collection::vec(0u32..REGIONS as u32, 0..5000), extra in 0u64..40_000) {
            let original: RoaringBitmap = bits.into_iter().collect();
            let mut bm = original.clone();
            let capacity = payload_bytes_coarsest(REGIONS) + extra;
            fit(&mut bm, capacity, 1024, REGIONS);
            prop_assert!(original.is_subset(&bm));
            prop_assert!(bm.serialized_size() as u64 <= capacity);
        }
    }
}
