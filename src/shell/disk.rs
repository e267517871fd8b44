//! Opening the backing (a regular file or a block device) and describing it: size, the
//! write unit that needs no read-modify-write, whether O_DIRECT is in use and the buffer
//! alignment it needs.
//!
//! Policy: O_DIRECT first (the page cache would only duplicate what the client caches,
//! and a FLUSH would have to write it back), falling back to buffered I/O, with an info
//! log, when the filesystem refuses O_DIRECT or cannot state its alignment. Block devices
//! are opened O_EXCL so a mounted (or otherwise claimed) device is refused. The file is
//! never created or truncated.

use std::fmt;
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::shell::buffers::BUFFER_ALIGN_BYTES;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingKind {
    RegularFile,
    BlockDevice,
}

/// An opened backing and the facts the data plane needs about it.
#[derive(Debug)]
pub struct Backing {
    pub file: File,
    pub path: PathBuf,
    pub kind: BackingKind,
    pub size_bytes: u64,
    /// 512 or 4096: the smallest unit a write can be done in without read-modify-write.
    /// With O_DIRECT, the DIO offset alignment rounded up to 512 or 4096; buffered, 512.
    pub logical_block_bytes: u32,
    /// Opened with O_DIRECT.
    pub direct_io: bool,
    /// Buffer address alignment O_DIRECT needs (statx STATX_DIOALIGN for files, the
    /// logical block size for block devices); 1 when buffered. Never above
    /// `BUFFER_ALIGN_BYTES`, so every pooled buffer qualifies.
    pub dio_mem_align_bytes: u32,
    pub read_only: bool,
}

#[derive(Debug)]
pub enum BackingError {
    NotFound(PathBuf),
    PermissionDenied(PathBuf),
    /// The path exists but is neither a regular file nor a block device; the second
    /// field says what it is ("a directory", "a character device", ...).
    NotFileOrBlockDevice(PathBuf, &'static str),
    Empty(PathBuf),
    /// EBUSY on the exclusive open of a block device: mounted or claimed elsewhere.
    Busy(PathBuf),
    Io(PathBuf, io::Error),
}

impl fmt::Display for BackingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackingError::NotFound(path) => {
                write!(f, "backing {}: no such file or device", path.display())
            }
            BackingError::PermissionDenied(path) => {
                write!(f, "backing {}: permission denied", path.display())
            }
            BackingError::NotFileOrBlockDevice(path, what) => write!(
                f,
                "backing {} is {what}, not a regular file or a block device",
                path.display()
            ),
            BackingError::Empty(path) => {
                write!(f, "backing {} is empty (0 bytes)", path.display())
            }
            BackingError::Busy(path) => write!(
                f,
                "backing {} is busy: the block device is mounted or held open exclusively \
                 by another program",
                path.display()
            ),
            BackingError::Io(path, error) => write!(f, "backing {}: {error}", path.display()),
        }
    }
}

impl std::error::Error for BackingError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BackingError::Io(_, error) => Some(error),
            _ => None,
        }
    }
}

impl BackingError {
    fn from_io(path: &Path, error: io::Error) -> BackingError {
        let path = path.to_path_buf();
        match error.kind() {
            io::ErrorKind::NotFound => BackingError::NotFound(path),
            io::ErrorKind::PermissionDenied => BackingError::PermissionDenied(path),
            _ if error.raw_os_error() == Some(libc::EBUSY) => BackingError::Busy(path),
            _ => BackingError::Io(path, error),
        }
    }
}

/// Opens `path` (a regular file or a block device; symlinks are followed) for the data
/// plane: O_RDONLY when `read_only`, otherwise O_RDWR; never O_CREAT or O_TRUNC.
pub fn open_backing(path: &Path, read_only: bool) -> Result<Backing, BackingError> {
    // stat before open: opening a FIFO would block, opening a directory read-write fails
    // with a less helpful EISDIR.
    let metadata = std::fs::metadata(path).map_err(|e| BackingError::from_io(path, e))?;
    let kind = backing_kind(path, &metadata)?;
    let backing = match kind {
        BackingKind::RegularFile => open_regular_file(path, read_only)?,
        BackingKind::BlockDevice => open_block_device(path, read_only)?,
    };
    if !backing
        .size_bytes
        .is_multiple_of(u64::from(backing.logical_block_bytes))
    {
        // An aligned O_DIRECT read of the last block meets end of file early, which the
        // ring reports as EIO: only whole blocks are usable.
        tracing::warn!(
            path = %backing.path.display(),
            size_bytes = backing.size_bytes,
            logical_block_bytes = backing.logical_block_bytes,
            "backing size is not a multiple of its logical block size; the partial last \
             block is unusable"
        );
    }
    tracing::debug!(
        path = %backing.path.display(),
        kind = ?backing.kind,
        size_bytes = backing.size_bytes,
        logical_block_bytes = backing.logical_block_bytes,
        direct_io = backing.direct_io,
        dio_mem_align_bytes = backing.dio_mem_align_bytes,
        read_only,
        "backing opened"
    );
    Ok(backing)
}

fn backing_kind(path: &Path, metadata: &Metadata) -> Result<BackingKind, BackingError> {
    let file_type = metadata.file_type();
    if file_type.is_file() {
        return Ok(BackingKind::RegularFile);
    }
    if file_type.is_block_device() {
        return Ok(BackingKind::BlockDevice);
    }
    let what = if file_type.is_dir() {
        "a directory"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "an unknown kind of file"
    };
    Err(BackingError::NotFileOrBlockDevice(path.to_path_buf(), what))
}

/// Opens with O_NOATIME where allowed (the file's owner or CAP_FOWNER; otherwise EPERM
/// and the open is repeated without it): reading the data never updates its atime, one
/// inode update fewer per read on filesystems that keep atimes (tmpfs, relatime).
fn open_with(path: &Path, read_only: bool, flags: libc::c_int) -> io::Result<File> {
    let open = |flags: libc::c_int| {
        OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(flags | libc::O_CLOEXEC)
            .open(path)
    };
    match open(flags | libc::O_NOATIME) {
        Err(error) if error.raw_os_error() == Some(libc::EPERM) => open(flags),
        result => result,
    }
}

/// Opens with O_DIRECT, or buffered when the filesystem refuses O_DIRECT (EINVAL).
fn open_preferring_direct(
    path: &Path,
    read_only: bool,
    extra_flags: libc::c_int,
) -> Result<(File, bool), BackingError> {
    match open_with(path, read_only, extra_flags | libc::O_DIRECT) {
        Ok(file) => Ok((file, true)),
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
            tracing::info!(
                path = %path.display(),
                "backing does not support O_DIRECT; using buffered I/O"
            );
            let file = open_with(path, read_only, extra_flags)
                .map_err(|e| BackingError::from_io(path, e))?;
            Ok((file, false))
        }
        Err(error) => Err(BackingError::from_io(path, error)),
    }
}

fn open_regular_file(path: &Path, read_only: bool) -> Result<Backing, BackingError> {
    let (file, mut direct_io) = open_preferring_direct(path, read_only, 0)?;
    // Re-check on the opened file: the path may have changed since the stat.
    let metadata = file
        .metadata()
        .map_err(|e| BackingError::Io(path.to_path_buf(), e))?;
    backing_kind(path, &metadata)?;
    if metadata.len() == 0 {
        return Err(BackingError::Empty(path.to_path_buf()));
    }
    let mut logical_block_bytes = 512;
    let mut dio_mem_align_bytes = 1;
    if direct_io {
        let report = dio_report(&file).map_err(|e| BackingError::Io(path.into(), e))?;
        if report == DioReport::NotReported {
            tracing::info!(
                path = %path.display(),
                "filesystem does not report its O_DIRECT alignment; assuming 4096"
            );
        }
        match usable_dio_alignment(report) {
            Ok((mem_align_bytes, block_bytes)) => {
                dio_mem_align_bytes = mem_align_bytes;
                logical_block_bytes = block_bytes;
            }
            Err(reason) => {
                tracing::info!(
                    path = %path.display(),
                    "backing O_DIRECT unusable ({reason}); using buffered I/O"
                );
                clear_o_direct(&file).map_err(|e| BackingError::Io(path.into(), e))?;
                direct_io = false;
            }
        }
    }
    Ok(Backing {
        file,
        path: path.to_path_buf(),
        kind: BackingKind::RegularFile,
        size_bytes: metadata.len(),
        logical_block_bytes,
        direct_io,
        dio_mem_align_bytes,
        read_only,
    })
}

/// statx STATX_DIOALIGN of an open file: `Some((mem_align, offset_align))` when the
/// filesystem reports it, `None` when it does not report it at all.
fn dio_alignment(file: &File) -> io::Result<Option<(u32, u32)>> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open for the duration of the call, the path is a valid empty C
    // string used with AT_EMPTY_PATH, and `stx` is a valid, writable statx buffer.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return Ok(None);
    }
    Ok(Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align)))
}

/// How the filesystem answered STATX_DIOALIGN for an O_DIRECT-opened file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DioReport {
    /// `(mem_align, offset_align)`; zeroes mean O_DIRECT is unsupported.
    Reported(u32, u32),
    /// Not reported, on tmpfs: its O_DIRECT is a page-cache copy (noop_direct_IO) with no
    /// alignment requirement. tmpfs does not report STATX_DIOALIGN (Linux 6.18).
    NotReportedTmpfs,
    /// Not reported by another filesystem that accepted the O_DIRECT open.
    NotReported,
}

fn dio_report(file: &File) -> io::Result<DioReport> {
    if let Some((mem_align, offset_align)) = dio_alignment(file)? {
        return Ok(DioReport::Reported(mem_align, offset_align));
    }
    let statfs = nix::sys::statfs::fstatfs(file)?;
    if statfs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC {
        Ok(DioReport::NotReportedTmpfs)
    } else {
        Ok(DioReport::NotReported)
    }
}

/// Decides whether O_DIRECT is usable with this report, returning
/// `(mem_align_bytes, logical_block_bytes)`, or why not.
fn usable_dio_alignment(report: DioReport) -> Result<(u32, u32), String> {
    let (mem_align, offset_align) = match report {
        DioReport::Reported(mem_align, offset_align) => (mem_align, offset_align),
        DioReport::NotReportedTmpfs => (512, 512),
        // The open succeeded, so O_DIRECT is supported; assume the strictest alignment
        // a 4Kn device can impose rather than fail at the first I/O.
        DioReport::NotReported => (4096, 4096),
    };
    if mem_align == 0 || offset_align == 0 {
        return Err("statx reports no O_DIRECT support".into());
    }
    if mem_align as usize > BUFFER_ALIGN_BYTES {
        return Err(format!(
            "buffer alignment {mem_align} exceeds the pool's {BUFFER_ALIGN_BYTES}"
        ));
    }
    match offset_align {
        1..=512 => Ok((mem_align, 512)),
        513..=4096 => Ok((mem_align, 4096)),
        _ => Err(format!("offset alignment {offset_align} exceeds 4096")),
    }
}

fn clear_o_direct(file: &File) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_retain(fcntl(file, FcntlArg::F_GETFL)?);
    fcntl(file, FcntlArg::F_SETFL(flags - OFlag::O_DIRECT))?;
    Ok(())
}

mod ioctl {
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t): device size in bytes.
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    // BLKSSZGET = _IO(0x12, 104) with an int result: logical sector size.
    nix::ioctl_read_bad!(blksszget, libc::BLKSSZGET, libc::c_int);
}

fn open_block_device(path: &Path, read_only: bool) -> Result<Backing, BackingError> {
    // O_EXCL without O_CREAT on a block device claims it exclusively: EBUSY if mounted.
    let (file, direct_io) = open_preferring_direct(path, read_only, libc::O_EXCL)?;
    let io_error = |e: nix::Error| BackingError::Io(path.to_path_buf(), io::Error::from(e));
    let mut size_bytes: u64 = 0;
    // SAFETY: the fd is an open block device; BLKGETSIZE64 writes one u64 to the pointer.
    unsafe { ioctl::blkgetsize64(file.as_raw_fd(), &mut size_bytes) }.map_err(io_error)?;
    let mut sector_bytes: libc::c_int = 0;
    // SAFETY: the fd is an open block device; BLKSSZGET writes one int to the pointer.
    unsafe { ioctl::blksszget(file.as_raw_fd(), &mut sector_bytes) }.map_err(io_error)?;
    if size_bytes == 0 {
        return Err(BackingError::Empty(path.to_path_buf()));
    }
    let sector_bytes = u32::try_from(sector_bytes).unwrap_or(0);
    let logical_block_bytes = match sector_bytes {
        0 => {
            return Err(BackingError::Io(
                path.to_path_buf(),
                io::Error::other("BLKSSZGET reported a logical block size of 0"),
            ));
        }
        1..=512 => 512,
        513..=4096 => 4096,
        _ => {
            return Err(BackingError::Io(
                path.to_path_buf(),
                io::Error::other(format!(
                    "logical block size {sector_bytes} exceeds the supported 4096"
                )),
            ));
        }
    };
    Ok(Backing {
        file,
        path: path.to_path_buf(),
        kind: BackingKind::BlockDevice,
        size_bytes,
        logical_block_bytes: if direct_io { logical_block_bytes } else { 512 },
        direct_io,
        dio_mem_align_bytes: if direct_io { sector_bytes } else { 1 },
        read_only,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    /// A uniquely named temp path, removed (file or directory) when dropped.
    struct TempPath(PathBuf);

    impl TempPath {
        fn new(dir: &Path, tag: &str) -> TempPath {
            static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            TempPath(dir.join(format!(
                "mirrordisk-disk-test-{}-{tag}-{n}",
                std::process::id()
            )))
        }

        fn file(dir: &Path, tag: &str, size_bytes: u64) -> TempPath {
            let temp = TempPath::new(dir, tag);
            let file = File::create(&temp.0).unwrap();
            file.set_len(size_bytes).unwrap();
            temp
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    fn flags_of(file: &File) -> i32 {
        nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_GETFL).unwrap()
    }

    #[test]
    fn missing_file_is_not_found() {
        let temp = TempPath::new(&std::env::temp_dir(), "missing");
        let error = open_backing(&temp.0, false).unwrap_err();
        assert!(matches!(&error, BackingError::NotFound(p) if *p == temp.0));
        assert!(error.to_string().contains("no such file or device"));
    }

    #[test]
    fn directory_is_refused_with_what_it_is() {
        let temp = TempPath::new(&std::env::temp_dir(), "dir");
        std::fs::create_dir(&temp.0).unwrap();
        let error = open_backing(&temp.0, false).unwrap_err();
        assert!(matches!(
            error,
            BackingError::NotFileOrBlockDevice(_, "a directory")
        ));
        assert!(
            error
                .to_string()
                .contains("is a directory, not a regular file")
        );
    }

    #[test]
    fn character_device_is_refused() {
        let error = open_backing(Path::new("/dev/null"), true).unwrap_err();
        assert!(matches!(
            error,
            BackingError::NotFileOrBlockDevice(_, "a character device")
        ));
    }

    #[test]
    fn fifo_is_refused_without_blocking() {
        let temp = TempPath::new(&std::env::temp_dir(), "fifo");
        nix::unistd::mkfifo(&temp.0, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let error = open_backing(&temp.0, false).unwrap_err();
        assert!(matches!(
            error,
            BackingError::NotFileOrBlockDevice(_, "a FIFO")
        ));
    }

    #[test]
    fn empty_file_is_refused_and_left_alone() {
        let temp = TempPath::file(&std::env::temp_dir(), "empty", 0);
        let error = open_backing(&temp.0, false).unwrap_err();
        assert!(matches!(error, BackingError::Empty(_)));
        assert!(error.to_string().contains("is empty"));
        assert_eq!(std::fs::metadata(&temp.0).unwrap().len(), 0);
    }

    /// Root bypasses mode bits, so the open runs on a thread whose filesystem uid is
    /// `nobody`: the kernel then drops CAP_DAC_OVERRIDE from that thread's effective set
    /// (capabilities(7)), and a mode-000 file is refused with EACCES as for any user.
    /// The thread exits afterwards, so no other test sees the changed credentials.
    #[test]
    fn unreadable_file_is_permission_denied() {
        let temp = TempPath::file(&std::env::temp_dir(), "mode000", 4096);
        std::fs::set_permissions(&temp.0, std::fs::Permissions::from_mode(0o000)).unwrap();
        let path = temp.0.clone();
        let result = std::thread::spawn(move || {
            // SAFETY: setfsuid only changes this thread's filesystem uid; it takes no
            // pointers. The thread ends right after the open.
            unsafe { libc::setfsuid(65534) };
            open_backing(&path, true).map(|_| ())
        })
        .join()
        .unwrap();
        let error = result.unwrap_err();
        assert!(matches!(&error, BackingError::PermissionDenied(p) if *p == temp.0));
        assert!(error.to_string().contains("permission denied"));
    }

    fn check_regular_file(dir: &Path, tag: &str) -> Backing {
        let temp = TempPath::file(dir, tag, 1 << 20);
        let backing = open_backing(&temp.0, false).unwrap();
        assert_eq!(backing.kind, BackingKind::RegularFile);
        assert_eq!(backing.size_bytes, 1 << 20);
        assert!(
            backing.direct_io,
            "{tag}: this machine's {dir:?} accepts O_DIRECT"
        );
        assert_ne!(flags_of(&backing.file) & libc::O_DIRECT, 0);
        assert!([512, 4096].contains(&backing.logical_block_bytes));
        assert!(backing.dio_mem_align_bytes >= 1);
        assert!(backing.dio_mem_align_bytes as usize <= BUFFER_ALIGN_BYTES);
        assert_eq!(flags_of(&backing.file) & libc::O_ACCMODE, libc::O_RDWR);
        assert_eq!(std::fs::metadata(&temp.0).unwrap().len(), 1 << 20);
        backing
    }

    #[test]
    fn regular_file_on_ext4_opens_direct() {
        let backing = check_regular_file(&std::env::temp_dir(), "ext4");
        // This machine's ext4 reports 512/512 through STATX_DIOALIGN.
        assert_eq!(backing.logical_block_bytes, 512);
    }

    #[test]
    fn regular_file_on_tmpfs_opens_direct() {
        let backing = check_regular_file(Path::new("/dev/shm"), "tmpfs");
        assert_eq!(backing.logical_block_bytes, 512);
    }

    #[test]
    fn read_only_opens_o_rdonly() {
        let temp = TempPath::file(&std::env::temp_dir(), "ro", 8192);
        let backing = open_backing(&temp.0, true).unwrap();
        assert!(backing.read_only);
        assert_eq!(flags_of(&backing.file) & libc::O_ACCMODE, libc::O_RDONLY);
        let mut file = &backing.file;
        assert!(file.write_all(&[0; 512]).is_err());
    }

    #[test]
    fn symlink_to_a_file_is_followed() {
        let target = TempPath::file(&std::env::temp_dir(), "target", 4096);
        let link = TempPath::new(&std::env::temp_dir(), "link");
        std::os::unix::fs::symlink(&target.0, &link.0).unwrap();
        assert_eq!(open_backing(&link.0, true).unwrap().size_bytes, 4096);
    }

    #[test]
    fn dio_alignment_policy() {
        use DioReport::*;
        assert_eq!(usable_dio_alignment(Reported(512, 512)), Ok((512, 512)));
        assert_eq!(usable_dio_alignment(Reported(4, 1)), Ok((4, 512)));
        assert_eq!(usable_dio_alignment(Reported(512, 2048)), Ok((512, 4096)));
        assert_eq!(usable_dio_alignment(Reported(4096, 4096)), Ok((4096, 4096)));
        assert_eq!(usable_dio_alignment(NotReportedTmpfs), Ok((512, 512)));
        assert_eq!(usable_dio_alignment(NotReported), Ok((4096, 4096)));
        assert!(usable_dio_alignment(Reported(0, 0)).is_err());
        assert!(usable_dio_alignment(Reported(8192, 512)).is_err());
        assert!(usable_dio_alignment(Reported(512, 8192)).is_err());
    }

    #[test]
    fn tmpfs_does_not_report_dioalign_and_is_recognised() {
        let temp = TempPath::file(Path::new("/dev/shm"), "report", 4096);
        let file = open_with(&temp.0, false, libc::O_DIRECT).unwrap();
        assert_eq!(dio_report(&file).unwrap(), DioReport::NotReportedTmpfs);
        let temp = TempPath::file(&std::env::temp_dir(), "report", 4096);
        let file = open_with(&temp.0, false, libc::O_DIRECT).unwrap();
        assert!(matches!(dio_report(&file).unwrap(), DioReport::Reported(m, o) if m > 0 && o > 0));
    }

    #[test]
    fn clearing_o_direct_keeps_the_file_usable() {
        let temp = TempPath::file(&std::env::temp_dir(), "clear", 4096);
        let file = open_with(&temp.0, false, libc::O_DIRECT).unwrap();
        clear_o_direct(&file).unwrap();
        assert_eq!(flags_of(&file) & libc::O_DIRECT, 0);
        let mut file = &file;
        file.write_all(b"unaligned is fine when buffered").unwrap();
    }

    /// A loop device over a temp file, detached (and the file removed) when dropped.
    struct LoopDevice {
        device: PathBuf,
        _backing_file: TempPath,
    }

    impl LoopDevice {
        fn new(sector_bytes: u32) -> LoopDevice {
            let backing_file = TempPath::file(&std::env::temp_dir(), "loop", 8 << 20);
            let output = Command::new("losetup")
                .args([
                    "--find",
                    "--show",
                    "--sector-size",
                    &sector_bytes.to_string(),
                ])
                .arg(&backing_file.0)
                .output()
                .expect("losetup (util-linux) is needed for the block device tests");
            assert!(
                output.status.success(),
                "losetup failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let device = PathBuf::from(String::from_utf8(output.stdout).unwrap().trim());
            LoopDevice {
                device,
                _backing_file: backing_file,
            }
        }
    }

    impl Drop for LoopDevice {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
        }
    }

    #[test]
    fn loop_block_device_is_described_and_claimed_exclusively() {
        for sector_bytes in [512, 4096] {
            let device = LoopDevice::new(sector_bytes);
            let backing = open_backing(&device.device, false).unwrap();
            assert_eq!(backing.kind, BackingKind::BlockDevice);
            assert_eq!(backing.size_bytes, 8 << 20);
            assert!(backing.direct_io);
            assert_eq!(backing.logical_block_bytes, sector_bytes);
            assert_eq!(backing.dio_mem_align_bytes, sector_bytes);
            let second = open_backing(&device.device, true).unwrap_err();
            assert!(matches!(&second, BackingError::Busy(p) if *p == device.device));
            assert!(second.to_string().contains("is busy"));
            drop(backing);
            assert!(open_backing(&device.device, true).unwrap().read_only);
        }
    }
}
