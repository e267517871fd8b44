//! The CLUSTER partition on a real device: detecting signatures before `create`
//! overwrites anything, writing the initial image, and reading the area back at start.
//!
//! These are start-up and operator paths (synchronous `pread`/`pwrite` on a buffered
//! descriptor); the running agent writes metadata through the io_uring ring.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::core::meta::engine::CreateImage;
use crate::core::meta::superblock::{self, Picked};
use crate::core::meta::{META_BLOCK_BYTES, PickError};

/// Bytes read from the head of a device to look for known signatures; covers the
/// btrfs superblock at 64 KiB and the ISO 9660 descriptor at 32 KiB.
const SIGNATURE_PROBE_BYTES: usize = 68 * 1024;

/// A device opened for metadata work, with its size.
#[derive(Debug)]
pub struct MetaDevice {
    pub file: File,
    pub size_bytes: u64,
    pub is_block_device: bool,
}

/// Opens `path` buffered, read-write or read-only. Block devices are opened O_EXCL so a
/// mounted or otherwise claimed device is refused.
pub fn open_device(path: &Path, write: bool) -> Result<MetaDevice, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file_type = meta.file_type();
    let is_block_device = file_type.is_block_device();
    if !is_block_device && !file_type.is_file() {
        return Err(format!(
            "{}: not a regular file or block device",
            path.display()
        ));
    }
    let mut options = OpenOptions::new();
    options.read(true).write(write);
    if is_block_device {
        options.custom_flags(libc::O_EXCL);
    }
    let file = options.open(path).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => format!("{}: device is busy (mounted or in use)", path.display()),
        _ => format!("{}: {e}", path.display()),
    })?;
    let size_bytes =
        device_size(&file, is_block_device).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(MetaDevice {
        file,
        size_bytes,
        is_block_device,
    })
}

fn device_size(file: &File, is_block_device: bool) -> io::Result<u64> {
    if !is_block_device {
        return Ok(file.metadata()?.len());
    }
    use std::os::fd::AsRawFd;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Names of every known signature at the head of the device: mirrordisk metadata,
/// filesystems, partition tables, volume managers, swap. Empty when the head looks unused.
pub fn probe_signatures(file: &File) -> io::Result<Vec<&'static str>> {
    let mut head = vec![0u8; SIGNATURE_PROBE_BYTES];
    let read = read_up_to(file, 0, &mut head)?;
    head.truncate(read);
    Ok(signatures_in(&head))
}

fn read_up_to(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Pure: which signatures the first bytes of a device carry.
pub fn signatures_in(head: &[u8]) -> Vec<&'static str> {
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    let block = META_BLOCK_BYTES as usize;
    let mut found = Vec::new();
    if head.len() >= 2 * block && superblock::has_magic(&head[..block], &head[block..2 * block]) {
        found.push("mirrordisk metadata");
    }
    if at(1080, &[0x53, 0xEF]) {
        found.push("ext2/3/4 filesystem");
    }
    if at(0, b"XFSB") {
        found.push("XFS filesystem");
    }
    if at(65536 + 64, b"_BHRfS_M") {
        found.push("btrfs filesystem");
    }
    if at(0, b"LUKS\xba\xbe") {
        found.push("LUKS encrypted volume");
    }
    if (0..4).any(|sector| at(sector * 512, b"LABELONE")) {
        found.push("LVM physical volume");
    }
    if at(512, b"EFI PART") || at(4096, b"EFI PART") {
        found.push("GPT partition table");
    }
    if at(510, &[0x55, 0xAA]) {
        found.push("DOS partition table or boot sector");
    }
    if at(4096 - 10, b"SWAPSPACE2") || at(4096 - 10, b"SWAP-SPACE") {
        found.push("swap area");
    }
    if at(32769, b"CD001") {
        found.push("ISO 9660 filesystem");
    }
    found
}

/// Writes a fresh CLUSTER partition at `base`: zeroed areas and the body first, made
/// durable, then both superblocks, made durable — so a crash in between leaves no
/// superblock pointing at an unwritten area.
pub fn write_create_image(file: &File, base: u64, image: &CreateImage) -> io::Result<()> {
    const ZERO_CHUNK_BYTES: usize = 1 << 20;
    let zeroes = vec![0u8; ZERO_CHUNK_BYTES];
    for area in &image.zero {
        let mut offset = area.offset;
        let end = area.end();
        while offset < end {
            let n = ((end - offset) as usize).min(ZERO_CHUNK_BYTES);
            file.write_all_at(&zeroes[..n], base + offset)?;
            offset += n as u64;
        }
    }
    for (offset, bytes) in &image.body {
        file.write_all_at(bytes, base + offset)?;
    }
    file.sync_data()?;
    for (offset, bytes) in &image.superblocks {
        file.write_all_at(bytes, base + offset)?;
    }
    file.sync_data()
}

/// Why the CLUSTER partition could not be read.
#[derive(Debug)]
pub enum ReadAreaError {
    Io(io::Error),
    Superblock(PickError),
}

impl std::fmt::Display for ReadAreaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadAreaError::Io(e) => write!(f, "reading the CLUSTER partition: {e}"),
            ReadAreaError::Superblock(e) => write!(f, "{e}"),
        }
    }
}

/// Reads the whole CLUSTER partition at `base`: the two superblocks first, to learn
/// its size from the newest valid copy, then everything.
pub fn read_area(file: &File, base: u64) -> Result<(Vec<u8>, Picked), ReadAreaError> {
    let block = META_BLOCK_BYTES as usize;
    let mut head = vec![0u8; 2 * block];
    let got = read_up_to(file, base, &mut head).map_err(ReadAreaError::Io)?;
    if got < head.len() {
        return Err(ReadAreaError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "device too small to hold superblocks",
        )));
    }
    let picked = superblock::pick(&head[..block], &head[block..], None)
        .map_err(ReadAreaError::Superblock)?;
    let cluster_bytes = picked.superblock.layout.cluster_bytes as usize;
    let mut area = vec![0u8; cluster_bytes];
    let got = read_up_to(file, base, &mut area).map_err(ReadAreaError::Io)?;
    if got < cluster_bytes {
        return Err(ReadAreaError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the CLUSTER partition needs {cluster_bytes} bytes, the device has {got}"),
        )));
    }
    Ok((area, picked))
}

/// Whether the head of `file` carries mirrordisk metadata (either superblock copy).
pub fn has_metadata(file: &File) -> io::Result<bool> {
    let block = META_BLOCK_BYTES as usize;
    let mut head = vec![0u8; 2 * block];
    let got = read_up_to(file, 0, &mut head)?;
    Ok(got == head.len() && superblock::has_magic(&head[..block], &head[block..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_head_has_no_signature() {
        assert!(signatures_in(&vec![0u8; SIGNATURE_PROBE_BYTES]).is_empty());
    }

    #[test]
    fn ext4_magic_is_found() {
        let mut head = vec![0u8; SIGNATURE_PROBE_BYTES];
        head[1080] = 0x53;
        head[1081] = 0xEF;
        assert_eq!(signatures_in(&head), vec!["ext2/3/4 filesystem"]);
    }

    #[test]
    fn gpt_and_protective_mbr_are_found() {
        let mut head = vec![0u8; SIGNATURE_PROBE_BYTES];
        head[510] = 0x55;
        head[511] = 0xAA;
        head[512..520].copy_from_slice(b"EFI PART");
        let found = signatures_in(&head);
        assert!(found.contains(&"GPT partition table"));
        assert!(found.contains(&"DOS partition table or boot sector"));
    }

    #[test]
    fn short_head_is_not_misread() {
        assert!(signatures_in(&[0x55]).is_empty());
    }
}
