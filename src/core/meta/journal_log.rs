//! Codec for one 4 KiB journal log block: a batch of set/clear records.
//!
//! A block carries (snapshot epoch, sequence) and the mirror UUID in its header; replay
//! accepts a block only if both continue the snapshot it replays onto (see `journal`).
//! Blocks are never rewritten: every commit writes a fresh block at the next sequence.

use super::codec::{get_u32, get_u64, is_zero, put_u32, put_u64, seal, sealed_ok};
use super::{JOURNAL_COMMIT_BLOCKS_MAX, META_BLOCK_BYTES};

pub const LOG_MAGIC: [u8; 8] = *b"MDSKJLOG";
const BYTES: usize = META_BLOCK_BYTES as usize;
const OFF_UUID: usize = 8;
const OFF_EPOCH: usize = 24;
const OFF_SEQUENCE: usize = 32;
const OFF_COUNT: usize = 40;
const OFF_COMMIT_OFFSET: usize = 44;
const OFF_RECORDS: usize = 48;
/// Bytes per record: op u8, 3 zero bytes, start u32, count u32.
pub const LOG_RECORD_BYTES: usize = 12;
/// Records per block: (4096 - 48 header - 4 crc) / 12.
pub const LOG_RECORDS_PER_BLOCK_MAX: usize = (BYTES - OFF_RECORDS - 4) / LOG_RECORD_BYTES;

const OP_SET: u8 = 1;
const OP_CLEAR: u8 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JournalOp {
    /// The regions became dirty.
    Set,
    /// Both sides hold the regions' data durably.
    Clear,
}

/// Set or clear regions `[start, start + count)`; `count >= 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogRecord {
    pub op: JournalOp,
    pub start: u32,
    pub count: u32,
}

impl LogRecord {
    pub fn end(&self) -> u64 {
        u64::from(self.start) + u64::from(self.count)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogBlock {
    pub epoch: u64,
    pub sequence: u64,
    /// Position of this block within the commit (one write) that wrote it: the commit
    /// began at `sequence - commit_offset`. Lets recovery tell a torn commit (legal)
    /// from a lost block of an earlier, durable commit (media corruption).
    pub commit_offset: u32,
    pub records: Vec<LogRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogDecodeError {
    Blank,
    BadMagic,
    Corrupt,
    ForeignMirror,
    TooManyRecords { count: u32 },
    CommitOffsetInvalid { commit_offset: u32 },
    UnknownOp { op: u8 },
    EmptyRange,
    RangeOutOfBounds { start: u32, count: u32 },
    NonZeroPadding,
}

pub fn encode(uuid: &[u8; 16], block: &LogBlock) -> Vec<u8> {
    assert!(!block.records.is_empty() && block.records.len() <= LOG_RECORDS_PER_BLOCK_MAX);
    let mut b = vec![0u8; BYTES];
    b[..8].copy_from_slice(&LOG_MAGIC);
    b[OFF_UUID..OFF_UUID + 16].copy_from_slice(uuid);
    put_u64(&mut b, OFF_EPOCH, block.epoch);
    put_u64(&mut b, OFF_SEQUENCE, block.sequence);
    put_u32(&mut b, OFF_COUNT, block.records.len() as u32);
    assert!(u64::from(block.commit_offset) < JOURNAL_COMMIT_BLOCKS_MAX);
    assert!(u64::from(block.commit_offset) <= block.sequence);
    put_u32(&mut b, OFF_COMMIT_OFFSET, block.commit_offset);
    for (i, r) in block.records.iter().enumerate() {
        assert!(r.count >= 1);
        let o = OFF_RECORDS + LOG_RECORD_BYTES * i;
        b[o] = match r.op {
            JournalOp::Set => OP_SET,
            JournalOp::Clear => OP_CLEAR,
        };
        put_u32(&mut b, o + 4, r.start);
        put_u32(&mut b, o + 8, r.count);
    }
    seal(&mut b);
    b
}

/// Decodes one block. `region_count` bounds the record ranges.
pub fn decode(b: &[u8], uuid: &[u8; 16], region_count: u64) -> Result<LogBlock, LogDecodeError> {
    if b.len() != BYTES {
        return Err(LogDecodeError::Corrupt);
    }
    if is_zero(b) {
        return Err(LogDecodeError::Blank);
    }
    if b[..8] != LOG_MAGIC {
        return Err(LogDecodeError::BadMagic);
    }
    if !sealed_ok(b) {
        return Err(LogDecodeError::Corrupt);
    }
    if b[OFF_UUID..OFF_UUID + 16] != uuid[..] {
        return Err(LogDecodeError::ForeignMirror);
    }
    let count = get_u32(b, OFF_COUNT);
    if count as usize > LOG_RECORDS_PER_BLOCK_MAX {
        return Err(LogDecodeError::TooManyRecords { count });
    }
    let sequence = get_u64(b, OFF_SEQUENCE);
    let commit_offset = get_u32(b, OFF_COMMIT_OFFSET);
    if u64::from(commit_offset) >= JOURNAL_COMMIT_BLOCKS_MAX || u64::from(commit_offset) > sequence
    {
        return Err(LogDecodeError::CommitOffsetInvalid { commit_offset });
    }
    let end = OFF_RECORDS + LOG_RECORD_BYTES * count as usize;
    if !is_zero(&b[end..BYTES - 4]) {
        return Err(LogDecodeError::NonZeroPadding);
    }
    let mut records = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let o = OFF_RECORDS + LOG_RECORD_BYTES * i;
        let op = match b[o] {
            OP_SET => JournalOp::Set,
            OP_CLEAR => JournalOp::Clear,
            op => return Err(LogDecodeError::UnknownOp { op }),
        };
        if !is_zero(&b[o + 1..o + 4]) {
            return Err(LogDecodeError::NonZeroPadding);
        }
        let start = get_u32(b, o + 4);
        let count = get_u32(b, o + 8);
        if count == 0 {
            return Err(LogDecodeError::EmptyRange);
        }
        let record = LogRecord { op, start, count };
        if record.end() > region_count {
            return Err(LogDecodeError::RangeOutOfBounds { start, count });
        }
        records.push(record);
    }
    Ok(LogBlock {
        epoch: get_u64(b, OFF_EPOCH),
        sequence,
        commit_offset,
        records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UUID: [u8; 16] = [5; 16];

    fn block(records: Vec<LogRecord>) -> LogBlock {
        LogBlock {
            epoch: 3,
            sequence: 41,
            commit_offset: 2,
            records,
        }
    }

    fn set(start: u32, count: u32) -> LogRecord {
        LogRecord {
            op: JournalOp::Set,
            start,
            count,
        }
    }

    #[test]
    fn capacity() {
        assert_eq!(LOG_RECORDS_PER_BLOCK_MAX, 337);
    }

    #[test]
    fn round_trip() {
        let blk = block(vec![
            set(1, 2),
            LogRecord {
                op: JournalOp::Clear,
                start: 0,
                count: 100,
            },
        ]);
        assert_eq!(decode(&encode(&UUID, &blk), &UUID, 100), Ok(blk));
    }

    #[test]
    fn decode_errors() {
        let good = encode(&UUID, &block(vec![set(1, 2)]));
        assert_eq!(decode(&[0u8; 4096], &UUID, 100), Err(LogDecodeError::Blank));
        let mut b = good.clone();
        b[1] = 0;
        assert_eq!(decode(&b, &UUID, 100), Err(LogDecodeError::BadMagic));
        let mut b = good.clone();
        b[60] ^= 1;
        assert_eq!(decode(&b, &UUID, 100), Err(LogDecodeError::Corrupt));
        assert_eq!(
            decode(&good[..512], &UUID, 100),
            Err(LogDecodeError::Corrupt)
        );
        assert_eq!(
            decode(&good, &[0; 16], 100),
            Err(LogDecodeError::ForeignMirror)
        );
        let mut b = good.clone();
        put_u32(&mut b, OFF_COUNT, 400);
        seal(&mut b);
        assert_eq!(
            decode(&b, &UUID, 100),
            Err(LogDecodeError::TooManyRecords { count: 400 })
        );
        let mut b = good.clone();
        put_u32(&mut b, OFF_COMMIT_OFFSET, 16);
        seal(&mut b);
        assert_eq!(
            decode(&b, &UUID, 100),
            Err(LogDecodeError::CommitOffsetInvalid { commit_offset: 16 })
        );
        let mut b = good.clone();
        b[OFF_RECORDS] = 7;
        seal(&mut b);
        assert_eq!(
            decode(&b, &UUID, 100),
            Err(LogDecodeError::UnknownOp { op: 7 })
        );
        let mut b = good.clone();
        put_u32(&mut b, OFF_RECORDS + 8, 0);
        seal(&mut b);
        assert_eq!(decode(&b, &UUID, 100), Err(LogDecodeError::EmptyRange));
        assert_eq!(
            decode(&good, &UUID, 2),
            Err(LogDecodeError::RangeOutOfBounds { start: 1, count: 2 })
        );
        let mut b = good.clone();
        b[3000] = 1;
        seal(&mut b);
        assert_eq!(decode(&b, &UUID, 100), Err(LogDecodeError::NonZeroPadding));
        let mut b = good;
        b[OFF_RECORDS + 1] = 1;
        seal(&mut b);
        assert_eq!(decode(&b, &UUID, 100), Err(LogDecodeError::NonZeroPadding));
    }

    proptest! {
        #[test]
        fn prop_round_trip(epoch: u64, sequence in 15u64.., commit_offset in 0u32..16,
                           recs in proptest::collection::vec((any::<bool>(), 0u32..1_000_000, 1u32..1000), 1..=337)) {
            let records = recs.into_iter()
                .map(|(c, start, count)| LogRecord { op: if c { JournalOp::Clear } else { JournalOp::Set }, start, count })
                .collect();
            let blk = LogBlock { epoch, sequence, commit_offset, records };
            prop_assert_eq!(decode(&encode(&UUID, &blk), &UUID, 2_000_000), Ok(blk));
        }
    }
}
