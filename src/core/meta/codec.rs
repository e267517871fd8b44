//! Little-endian field access and the trailing-crc32c convention shared by every block.
//!
//! Every metadata block or record ends with a crc32c (Castagnoli) of all bytes before it,
//! stored little-endian in its last four bytes. Field offsets are fixed by the format
//! spec; these helpers panic on an out-of-bounds offset because that is a bug in the
//! codec (the buffer sizes are constants), never a property of the input.

pub(crate) fn get_u32(buf: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(buf[offset..offset + 4].try_into().expect("4 bytes"))
}

pub(crate) fn get_u64(buf: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(buf[offset..offset + 8].try_into().expect("8 bytes"))
}

pub(crate) fn put_u32(buf: &mut [u8], offset: usize, value: u32) {
    buf[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

pub(crate) fn put_u64(buf: &mut [u8], offset: usize, value: u64) {
    buf[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
}

/// Writes the trailing checksum of `buf` (all bytes but the last four).
pub(crate) fn seal(buf: &mut [u8]) {
    let n = buf.len();
    assert!(n >= 8);
    let crc = crc32c::crc32c(&buf[..n - 4]);
    put_u32(buf, n - 4, crc);
}

/// Whether the trailing checksum of `buf` matches its contents.
pub(crate) fn sealed_ok(buf: &[u8]) -> bool {
    let n = buf.len();
    n >= 8 && crc32c::crc32c(&buf[..n - 4]) == get_u32(buf, n - 4)
}

pub(crate) fn is_zero(buf: &[u8]) -> bool {
    buf.iter().all(|&b| b == 0)
}
