//! The disk's io_uring ring: a synchronous push / submit / drain wrapper over one ring
//! with the backing registered as fixed file 0. No async here: the data-plane driver
//! polls `Ring::fd()` (tokio AsyncFd) and calls `drain` when it is readable.
//!
//! Hot path: `push` writes one SQE into the shared ring (no syscall, no allocation once
//! the slab has grown to the working depth); `submit` is one io_uring_enter for the
//! whole batch; `drain` reads CQEs from shared memory without a syscall. Short reads and
//! writes are resubmitted for the remainder under the same token and reported once.
//!
//! Setup flags: SINGLE_ISSUER (one thread submits; `Ring` is `!Send` through the `Buf`s
//! it holds), COOP_TASKRUN (completions that need task work are not announced by an
//! IPI; they are run the next time the thread enters the kernel, which the tokio thread
//! does constantly, and a thread sleeping in epoll_wait is still woken) and SUBMIT_ALL
//! (one bad SQE does not stall the rest of a batch). DEFER_TASKRUN is deliberately NOT
//! used: measured on Linux 6.18 (a pipe read completed by another thread), a completion
//! that needs task work, as every interrupt-completed read or write does, then never
//! wakes an epoll_wait on the ring fd; the CQE only appears after an
//! io_uring_enter(GETEVENTS), which an epoll-driven loop never issues.
//!
//! Threads: measured on Linux 6.18, tmpfs does not take io_uring's non-blocking attempt,
//! so every tmpfs read and write (O_DIRECT or buffered) is handed to an io-wq worker
//! thread ("iou-wrk-<tid>", kernel-owned; writes to one file are serialised on one
//! worker, as tmpfs serialises them on the inode lock anyway). ext4 O_DIRECT needs no
//! worker (issued inline, completed by the device interrupt); ext4 buffered reads
//! complete inline, buffered writes go to a worker.
//!
//! Inline transfers: on a memory-backed file (tmpfs) a read or write of at most
//! `INLINE_IO_BYTES_MAX` bytes is not given to the ring at all: `submit` performs it with
//! preadv2/pwritev2 (a memory copy; it cannot wait for a device) and its completion is
//! reported by the next `drain`, exactly as if the kernel had completed it during the
//! submit. Everything else about an operation (slots, short transfers, retries, drop)
//! is the same on both paths.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;

use io_uring::{IoUring, Probe, cqueue, opcode, squeue, types};

use crate::constants::{INLINE_IO_BYTES_MAX, URING_ENTRIES};
use crate::shell::buffers::Buf;

/// One disk operation. Read and Write own their buffer until it comes back in the
/// `Completion`; they transfer `buf[range]` (`range` within `buf.len()`, usually
/// `0..buf.len()`), so a read-modify-write can read one edge block into the middle of
/// the buffer it will write.
#[derive(Debug)]
pub enum Op {
    /// Reads `range.len()` bytes at `offset` into `buf[range]`.
    Read {
        offset: u64,
        buf: Buf,
        range: Range<usize>,
    },
    /// Writes `buf[range]` at `offset`; `fua` adds RWF_DSYNC (durable on completion).
    Write {
        offset: u64,
        buf: Buf,
        range: Range<usize>,
        fua: bool,
    },
    /// Writes `buf[range]` at `offset` from a buffer shared with other readers (the
    /// node agent sends the same client write to the peer from it, DESIGN §5: "the local
    /// write and the send start together and share one buffer"). The ring holds one
    /// reference until the CQE is reaped; nobody can mutate the buffer meanwhile (an
    /// `Rc` hands out only shared access). The completion carries no buffer: the
    /// reference is dropped.
    WriteShared {
        offset: u64,
        buf: Rc<Buf>,
        range: Range<usize>,
        fua: bool,
    },
    /// fdatasync.
    Fsync,
    /// fallocate(2) with `FALLOC_FL_*` `mode` (punch hole | keep size, zero range |
    /// keep size). An unsupported mode completes with `Err(EOPNOTSUPP)`.
    Fallocate { mode: i32, offset: u64, len: u64 },
    /// posix_fadvise(2), e.g. `POSIX_FADV_WILLNEED` for NBD_CMD_CACHE.
    Fadvise { offset: u64, len: u32, advice: i32 },
}

/// The outcome of one pushed `Op`.
#[derive(Debug)]
pub struct Completion {
    pub token: u64,
    /// Total bytes transferred for Read/Write (always `range.len()`), 0 for the other
    /// ops; or a positive errno. A read that meets end of file first is `Err(EIO)`.
    pub result: Result<u32, i32>,
    /// The Read/Write buffer, handed back whatever the result.
    pub buf: Option<Buf>,
}

#[derive(Debug)]
pub enum RingError {
    Setup(io::Error),
    RegisterFile(io::Error),
    Probe(io::Error),
    OpcodeUnsupported(&'static str),
    FeatureUnsupported(&'static str),
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RingError::Setup(error) => {
                write!(f, "io_uring setup failed: {error}")?;
                if matches!(error.raw_os_error(), Some(libc::EPERM | libc::ENOSYS)) {
                    write!(
                        f,
                        " (io_uring may be disabled: sysctl kernel.io_uring_disabled)"
                    )?;
                }
                Ok(())
            }
            RingError::RegisterFile(error) => {
                write!(f, "registering the backing with io_uring failed: {error}")
            }
            RingError::Probe(error) => write!(f, "probing io_uring opcodes failed: {error}"),
            RingError::OpcodeUnsupported(name) => {
                write!(f, "io_uring opcode {name} not supported by this kernel")
            }
            RingError::FeatureUnsupported(name) => {
                write!(f, "io_uring feature {name} not supported by this kernel")
            }
        }
    }
}

impl std::error::Error for RingError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RingError::Setup(error) | RingError::RegisterFile(error) | RingError::Probe(error) => {
                Some(error)
            }
            RingError::OpcodeUnsupported(_) | RingError::FeatureUnsupported(_) => None,
        }
    }
}

/// Every opcode the ring issues, probed at start-up.
pub const OPCODES_REQUIRED: [(u8, &str); 6] = [
    (opcode::Read::CODE, "READ"),
    (opcode::Write::CODE, "WRITE"),
    (opcode::Fsync::CODE, "FSYNC"),
    (opcode::Fallocate::CODE, "FALLOCATE"),
    (opcode::Fadvise::CODE, "FADVISE"),
    // Used only when the ring is dropped with operations in flight.
    (opcode::AsyncCancel2::CODE, "ASYNC_CANCEL"),
];

/// Consecutive resubmissions of one operation that made no progress (EINTR, EAGAIN)
/// before its errno is reported. A transfer that makes progress resets the count, and
/// progress is bounded by the length, so every operation completes.
pub const RETRIES_WITHOUT_PROGRESS_MAX: u32 = 16;

/// Token of the completion `run_to_completion` returns.
pub const RUN_TO_COMPLETION_TOKEN: u64 = u64::MAX;

/// The backing, registered as fixed file 0.
const BACKING: types::Fixed = types::Fixed(0);

/// user_data of the cancel SQE pushed on drop; never a slot index.
const CANCEL_USER_DATA: u64 = u64::MAX;

/// CQEs copied out of the ring per step of `drain`.
const CQE_BATCH: usize = 64;

struct InFlight {
    token: u64,
    op: Op,
    progress: Progress,
}

/// Bookkeeping of one operation across resubmissions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Progress {
    done_bytes: u32,
    retries_count: u32,
}

#[derive(Debug, PartialEq, Eq)]
enum Step {
    Complete(Result<u32, i32>),
    Resubmit,
}

/// Applies one CQE result to an operation's progress. `transfer_len_bytes` is the full
/// length of a Read/Write, `None` for the other ops. Pure, so the remainder logic is
/// tested without provoking the kernel into short transfers.
fn advance(progress: &mut Progress, transfer_len_bytes: Option<u32>, res: i32) -> Step {
    if res < 0 {
        let errno = -res;
        let transient = errno == libc::EINTR || errno == libc::EAGAIN;
        if transient && progress.retries_count < RETRIES_WITHOUT_PROGRESS_MAX {
            progress.retries_count += 1;
            return Step::Resubmit;
        }
        return Step::Complete(Err(errno));
    }
    let Some(len_bytes) = transfer_len_bytes else {
        return Step::Complete(Ok(0));
    };
    let transferred = res as u32;
    let remaining = len_bytes - progress.done_bytes;
    assert!(
        transferred <= remaining,
        "kernel reported {transferred} bytes for a {remaining}-byte transfer"
    );
    if transferred == 0 && remaining > 0 {
        // End of file for a read; a write that cannot progress. Both are I/O errors to
        // an NBD client, and resubmitting would loop.
        return Step::Complete(Err(libc::EIO));
    }
    progress.done_bytes += transferred;
    progress.retries_count = 0;
    if progress.done_bytes == len_bytes {
        Step::Complete(Ok(len_bytes))
    } else {
        Step::Resubmit
    }
}

/// Fails with the first required opcode `is_supported` rejects.
fn check_opcodes(is_supported: impl Fn(u8) -> bool) -> Result<(), RingError> {
    match OPCODES_REQUIRED
        .iter()
        .find(|(code, _)| !is_supported(*code))
    {
        Some((_, name)) => Err(RingError::OpcodeUnsupported(name)),
        None => Ok(()),
    }
}

/// Whether a ring may perform small transfers inline (module comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InlineIo {
    /// Inline when the file is memory-backed (tmpfs).
    Auto,
    /// Always through io_uring (tests of the ring itself).
    Never,
}

/// The disk ring. Single-threaded; see the module comment for the setup flags.
pub struct Ring {
    ring: IoUring,
    /// Operations pushed and not yet completed, indexed by SQE user_data.
    slots: Vec<Option<InFlight>>,
    free_slots: Vec<u32>,
    in_flight_count: usize,
    /// SQEs that found the SQ full and the kernel unwilling to take more (EBUSY,
    /// EAGAIN); moved into the SQ by the next `submit`. Empty in normal operation.
    backlog: VecDeque<squeue::Entry>,
    /// Completions `run_to_completion` reaped for other operations; `drain` hands them
    /// out first.
    stash: Vec<Completion>,
    awaited_slot: Option<u32>,
    awaited: Option<Completion>,
    /// Set on drop: operations are no longer resubmitted.
    closing: bool,
    /// Our own descriptor of the backing when small transfers are done inline.
    inline_fd: Option<OwnedFd>,
    /// Slots whose (remaining) transfer `submit` performs inline, in push order.
    inline_queue: Vec<u32>,
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("fd", &self.ring.as_raw_fd())
            .field("in_flight_count", &self.in_flight_count)
            .field("backlog_len", &self.backlog.len())
            .field("inline", &self.inline_fd.is_some())
            .finish()
    }
}

impl Ring {
    /// Creates the ring (`URING_ENTRIES` SQEs), registers `fd` as fixed file 0 and
    /// probes every opcode in `OPCODES_REQUIRED`; small transfers are inline when the
    /// file is memory-backed ([`InlineIo::Auto`]). `fd` must stay a valid descriptor
    /// until this returns; afterwards the ring holds its own reference to the file.
    pub fn new(fd: RawFd) -> Result<Ring, RingError> {
        Ring::with_inline(fd, InlineIo::Auto)
    }

    /// [`Ring::new`] with the inline choice made by the caller.
    pub fn with_inline(fd: RawFd, inline: InlineIo) -> Result<Ring, RingError> {
        let inline_fd = match inline {
            InlineIo::Auto => inline_descriptor(fd).map_err(RingError::Setup)?,
            InlineIo::Never => None,
        };
        let ring = build_ring()?;
        if !ring.params().is_feature_nodrop() {
            return Err(RingError::FeatureUnsupported("NODROP"));
        }
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(RingError::Probe)?;
        check_opcodes(|code| probe.is_supported(code))?;
        ring.submitter()
            .register_files(&[fd])
            .map_err(RingError::RegisterFile)?;
        let slots_initial = 2 * URING_ENTRIES as usize;
        Ok(Ring {
            ring,
            slots: Vec::with_capacity(slots_initial),
            free_slots: Vec::with_capacity(slots_initial),
            in_flight_count: 0,
            backlog: VecDeque::new(),
            stash: Vec::new(),
            awaited_slot: None,
            awaited: None,
            closing: false,
            inline_fd,
            inline_queue: Vec::new(),
        })
    }

    /// Queues `op` as one SQE (handing the kernel what is already queued first if the SQ
    /// is full). Never waits for completions. Panics (a caller bug) if a Read/Write range
    /// lies outside its buffer or is longer than u32::MAX (requests are bounded by
    /// NBD_PAYLOAD_BYTES_MAX).
    pub fn push(&mut self, op: Op, token: u64) {
        self.push_slot(op, token);
    }

    /// Performs the queued inline transfers (their completions wait for `drain`), then
    /// hands everything else queued to the kernel in one io_uring_enter; returns how many
    /// SQEs it took. A no-op without a system call when nothing is queued. EINTR is
    /// retried. On EBUSY/EAGAIN (the kernel is short of resources) the entries stay
    /// queued: drain completions and submit again.
    pub fn submit(&mut self) -> io::Result<usize> {
        self.run_inline();
        let mut submitted_count = 0;
        loop {
            self.refill_from_backlog();
            if self.ring.submission().is_empty() {
                return Ok(submitted_count);
            }
            let count = self.enter(0)?;
            submitted_count += count;
            if self.backlog.is_empty() || count == 0 {
                return Ok(submitted_count);
            }
        }
    }

    /// The ring's file descriptor: readable when completions are available (register it
    /// with tokio's AsyncFd, then call `drain`).
    pub fn fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// Moves every available completion into `out`, with Read/Write buffers handed back.
    /// Short transfers are not reported: their remainder is queued instead, so call
    /// `submit` after `drain` (it is free when nothing is queued).
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.stash);
        self.reap(out);
    }

    /// Operations pushed and not yet reported by `drain` (queued or in the kernel).
    pub fn in_flight(&self) -> usize {
        // Completions filed for `drain` (inline transfers, run_to_completion's others)
        // are not reported yet either.
        self.in_flight_count + self.stash.len()
    }

    /// `submit`, then blocks until at least `want` completions are available (or an
    /// overflow was flushed). For tools and tests; the data plane polls `fd()` instead.
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<usize> {
        self.run_inline();
        self.refill_from_backlog();
        // Inline completions already filed count towards `want`.
        self.enter(want.saturating_sub(self.stash.len()))
    }

    /// Pushes `op`, submits and blocks until it completes. For start-up metadata I/O and
    /// tests, not the data path. Completions of other operations that arrive meanwhile
    /// are kept for the next `drain`. The result's token is `RUN_TO_COMPLETION_TOKEN`.
    /// Panics if io_uring_enter fails for a reason other than EINTR/EAGAIN/EBUSY (the
    /// ring is ours, so that is a bug).
    pub fn run_to_completion(&mut self, op: Op) -> Completion {
        let slot = self.push_slot(op, RUN_TO_COMPLETION_TOKEN);
        self.awaited_slot = Some(slot);
        loop {
            self.run_inline();
            let mut others = std::mem::take(&mut self.stash);
            self.reap(&mut others);
            self.stash = others;
            if let Some(completion) = self.awaited.take() {
                self.awaited_slot = None;
                return completion;
            }
            self.refill_from_backlog();
            if let Err(error) = self.enter(1)
                && !matches!(error.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY))
            {
                panic!("io_uring_enter failed while waiting for a completion: {error}");
            }
        }
    }

    fn push_slot(&mut self, op: Op, token: u64) -> u32 {
        let checked = match &op {
            Op::Read { buf, range, .. } | Op::Write { buf, range, .. } => Some((buf.len(), range)),
            Op::WriteShared { buf, range, .. } => Some((buf.len(), range)),
            Op::Fsync | Op::Fallocate { .. } | Op::Fadvise { .. } => None,
        };
        if let Some((buf_len, range)) = checked {
            assert!(
                range.start <= range.end && range.end <= buf_len,
                "transfer range {range:?} outside a {buf_len}-byte buffer"
            );
            assert!(
                u32::try_from(range.len()).is_ok(),
                "a {}-byte transfer exceeds one io_uring request",
                range.len()
            );
        }
        let in_flight = InFlight {
            token,
            op,
            progress: Progress::default(),
        };
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                debug_assert!(self.slots[slot as usize].is_none());
                self.slots[slot as usize] = Some(in_flight);
                slot
            }
            None => {
                self.slots.push(Some(in_flight));
                u32::try_from(self.slots.len() - 1).expect("slot index fits u32")
            }
        };
        self.in_flight_count += 1;
        self.queue_slot(slot);
        slot
    }

    /// Builds the SQE for the (remaining part of the) operation in `slot` and queues it,
    /// or queues it for an inline transfer.
    fn queue_slot(&mut self, slot: u32) {
        let in_flight = self.slots[slot as usize]
            .as_mut()
            .expect("queued slot is busy");
        let done = in_flight.progress.done_bytes;
        if self.inline_fd.is_some() {
            let transfer = match &in_flight.op {
                Op::Read { range, .. }
                | Op::Write { range, .. }
                | Op::WriteShared { range, .. } => Some(range.len()),
                Op::Fsync | Op::Fallocate { .. } | Op::Fadvise { .. } => None,
            };
            if transfer.is_some_and(|len| len - done as usize <= INLINE_IO_BYTES_MAX) {
                self.inline_queue.push(slot);
                return;
            }
        }
        let entry = match &mut in_flight.op {
            Op::Read { offset, buf, range } => {
                let remaining = &mut buf[range.start + done as usize..range.end];
                opcode::Read::new(BACKING, remaining.as_mut_ptr(), remaining.len() as u32)
                    .offset(*offset + u64::from(done))
                    .build()
            }
            Op::Write {
                offset,
                buf,
                range,
                fua,
            } => {
                let remaining = &buf[range.start + done as usize..range.end];
                let rw_flags = if *fua { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(BACKING, remaining.as_ptr(), remaining.len() as u32)
                    .offset(*offset + u64::from(done))
                    .rw_flags(rw_flags)
                    .build()
            }
            Op::WriteShared {
                offset,
                buf,
                range,
                fua,
            } => {
                let remaining = &buf[range.start + done as usize..range.end];
                let rw_flags = if *fua { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(BACKING, remaining.as_ptr(), remaining.len() as u32)
                    .offset(*offset + u64::from(done))
                    .rw_flags(rw_flags)
                    .build()
            }
            Op::Fsync => opcode::Fsync::new(BACKING)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Fallocate { mode, offset, len } => opcode::Fallocate::new(BACKING, *len)
                .offset(*offset)
                .mode(*mode)
                .build(),
            Op::Fadvise {
                offset,
                len,
                advice,
            } => opcode::Fadvise::new(BACKING, libc::off_t::from(*len), *advice)
                .offset(*offset)
                .build(),
        };
        self.queue(entry.user_data(u64::from(slot)));
    }

    /// Performs every queued inline transfer, in order, and files its completion for
    /// `drain` (a short transfer queues its remainder, performed in the same call).
    fn run_inline(&mut self) {
        while !self.inline_queue.is_empty() {
            let slots = std::mem::take(&mut self.inline_queue);
            let mut done = std::mem::take(&mut self.stash);
            for slot in slots {
                let res = self.transfer_inline(slot);
                self.handle_cqe(u64::from(slot), res, &mut done);
            }
            self.stash = done;
        }
    }

    /// One preadv2/pwritev2 for the remaining part of the transfer in `slot`, returning
    /// what a CQE would: bytes transferred or a negative errno.
    fn transfer_inline(&mut self, slot: u32) -> i32 {
        let fd = self
            .inline_fd
            .as_ref()
            .expect("inline transfers need the inline descriptor")
            .as_raw_fd();
        let in_flight = self.slots[slot as usize]
            .as_mut()
            .expect("queued slot is busy");
        let done = in_flight.progress.done_bytes as usize;
        let transferred = match &mut in_flight.op {
            Op::Read { offset, buf, range } => {
                let remaining = &mut buf[range.start + done..range.end];
                let iov = libc::iovec {
                    iov_base: remaining.as_mut_ptr().cast(),
                    iov_len: remaining.len(),
                };
                let at = (*offset + done as u64) as libc::off_t;
                // SAFETY: `iov` describes `remaining`, memory of the slot's Buf that this
                // call exclusively borrows for its duration; `fd` is our open descriptor.
                unsafe { libc::preadv2(fd, &iov, 1, at, 0) }
            }
            Op::Write {
                offset,
                buf,
                range,
                fua,
            } => {
                let remaining = &buf[range.start + done..range.end];
                write_inline(fd, remaining, *offset + done as u64, *fua)
            }
            Op::WriteShared {
                offset,
                buf,
                range,
                fua,
            } => {
                let remaining = &buf[range.start + done..range.end];
                write_inline(fd, remaining, *offset + done as u64, *fua)
            }
            Op::Fsync | Op::Fallocate { .. } | Op::Fadvise { .. } => {
                unreachable!("only reads and writes are done inline")
            }
        };
        if transferred < 0 {
            -io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        } else {
            // At most INLINE_IO_BYTES_MAX, so it fits.
            transferred as i32
        }
    }

    fn queue(&mut self, entry: squeue::Entry) {
        if self.backlog.is_empty() {
            if self.push_sq(&entry) {
                return;
            }
            // SQ full: hand the kernel what is queued, then try again.
            if let Err(error) = self.enter(0) {
                tracing::debug!(%error, "io_uring submit with a full SQ failed; backlogging");
            }
            if self.push_sq(&entry) {
                return;
            }
        }
        self.backlog.push_back(entry);
    }

    fn push_sq(&mut self, entry: &squeue::Entry) -> bool {
        // SAFETY: every pointer in the entry refers to the heap memory of a Buf owned by
        // the slot named in its user_data (for WriteShared: a strong `Rc` reference the
        // slot holds, which keeps the Buf alive and, shared, unmutated). That memory does
        // not move when the Buf does, and the slot keeps the Buf until the entry's CQE
        // has been reaped (Drop waits for every in-flight operation before the Bufs are
        // released).
        unsafe { self.ring.submission().push(entry) }.is_ok()
    }

    fn refill_from_backlog(&mut self) {
        while let Some(entry) = self.backlog.front() {
            let entry = entry.clone();
            if !self.push_sq(&entry) {
                return;
            }
            self.backlog.pop_front();
        }
    }

    /// io_uring_enter for what is in the SQ, waiting for `want` completions; retries
    /// EINTR. With an overflowed CQ the crate adds GETEVENTS, which flushes the kernel's
    /// overflow list into the CQ.
    fn enter(&mut self, want: usize) -> io::Result<usize> {
        loop {
            match self.ring.submit_and_wait(want) {
                Err(error) if error.raw_os_error() == Some(libc::EINTR) => continue,
                result => return result,
            }
        }
    }

    /// Turns every available CQE into a completion (or a resubmission).
    fn reap(&mut self, out: &mut Vec<Completion>) {
        let mut batch = [const { MaybeUninit::<cqueue::Entry>::uninit() }; CQE_BATCH];
        let mut overflow_flushed = false;
        loop {
            let entries = self.ring.completion().fill(&mut batch);
            if entries.is_empty() {
                // NODROP keeps CQEs that found the CQ full in a kernel list; only an
                // io_uring_enter moves them into the CQ. Once per empty CQ: a failing
                // enter must not spin.
                if !overflow_flushed && self.ring.submission().cq_overflow() {
                    overflow_flushed = true;
                    if let Err(error) = self.enter(0) {
                        tracing::debug!(%error, "flushing io_uring CQ overflow failed");
                    }
                    continue;
                }
                return;
            }
            overflow_flushed = false;
            for entry in entries.iter() {
                self.handle_cqe(entry.user_data(), entry.result(), out);
            }
        }
    }

    fn handle_cqe(&mut self, user_data: u64, res: i32, out: &mut Vec<Completion>) {
        if user_data == CANCEL_USER_DATA {
            return;
        }
        let slot = user_data as u32;
        let in_flight = self.slots[slot as usize]
            .as_mut()
            .expect("CQE for an operation that is not in flight");
        let transfer_len_bytes = match &in_flight.op {
            Op::Read { range, .. } | Op::Write { range, .. } | Op::WriteShared { range, .. } => {
                Some(range.len() as u32)
            }
            Op::Fsync | Op::Fallocate { .. } | Op::Fadvise { .. } => None,
        };
        let result = match advance(&mut in_flight.progress, transfer_len_bytes, res) {
            Step::Resubmit if !self.closing => {
                self.queue_slot(slot);
                return;
            }
            // Closing: report rather than resubmit.
            Step::Resubmit => Err(if res < 0 { -res } else { libc::ECANCELED }),
            Step::Complete(result) => result,
        };
        let in_flight = self.slots[slot as usize].take().expect("slot is busy");
        self.free_slots.push(slot);
        self.in_flight_count -= 1;
        let buf = match in_flight.op {
            Op::Read { buf, .. } | Op::Write { buf, .. } => Some(buf),
            Op::WriteShared { .. } | Op::Fsync | Op::Fallocate { .. } | Op::Fadvise { .. } => None,
        };
        let completion = Completion {
            token: in_flight.token,
            result,
            buf,
        };
        if self.awaited_slot == Some(slot) {
            self.awaited = Some(completion);
        } else {
            out.push(completion);
        }
    }
}

impl Drop for Ring {
    /// The kernel may still write into (or read from) the buffers of in-flight
    /// operations, so they are cancelled where possible and waited for before the
    /// buffers return to the pool. If waiting fails, the buffers are leaked instead.
    fn drop(&mut self) {
        if self.in_flight_count == 0 {
            return;
        }
        self.closing = true;
        // Inline transfers not yet performed touch no buffer: report them cancelled.
        let mut discarded = Vec::new();
        for slot in std::mem::take(&mut self.inline_queue) {
            self.handle_cqe(u64::from(slot), -libc::ECANCELED, &mut discarded);
        }
        discarded.clear();
        if self.in_flight_count == 0 {
            return;
        }
        // Queued behind everything else, so it reaches the kernel after every operation
        // it may cancel. Operations that are already running (block I/O) just finish.
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(CANCEL_USER_DATA);
        self.queue(cancel);
        let mut discarded = Vec::new();
        while self.in_flight_count > 0 {
            self.refill_from_backlog();
            if let Err(error) = self.enter(1)
                && !matches!(error.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY))
            {
                tracing::error!(%error, "io_uring wait on drop failed; leaking in-flight buffers");
                for in_flight in self.slots.iter_mut().filter_map(Option::take) {
                    std::mem::forget(in_flight);
                }
                return;
            }
            self.reap(&mut discarded);
            discarded.clear();
        }
    }
}

/// pwritev2 of `data` at `offset`, with RWF_DSYNC for FUA; the raw return value.
fn write_inline(fd: RawFd, data: &[u8], offset: u64, fua: bool) -> isize {
    let iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let flags = if fua { libc::RWF_DSYNC } else { 0 };
    // SAFETY: `iov` describes `data`, which the kernel only reads during the call; `fd`
    // is our open descriptor.
    unsafe { libc::pwritev2(fd, &iov, 1, offset as libc::off_t, flags) }
}

/// A descriptor of our own for inline transfers when `fd` is a file on a memory-backed
/// filesystem (tmpfs), `None` otherwise.
fn inline_descriptor(fd: RawFd) -> io::Result<Option<OwnedFd>> {
    // SAFETY: the caller guarantees `fd` is open for the duration of `Ring::new`.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    // Only a regular file: a block device's node lives on devtmpfs, which reports the
    // tmpfs magic, and a device must keep the asynchronous ring path.
    let stat = nix::sys::stat::fstat(borrowed)?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Ok(None);
    }
    let statfs = nix::sys::statfs::fstatfs(borrowed)?;
    let kind = statfs.filesystem_type();
    if kind != nix::sys::statfs::TMPFS_MAGIC {
        return Ok(None);
    }
    // SAFETY: F_DUPFD_CLOEXEC on an open descriptor; no memory is involved.
    let duplicate = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if duplicate < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `duplicate` is a descriptor fcntl just opened for us and nothing else owns.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(duplicate) }))
}

fn build_ring() -> Result<IoUring, RingError> {
    let preferred = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_submit_all()
        .build(URING_ENTRIES);
    match preferred {
        Ok(ring) => Ok(ring),
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
            tracing::info!(
                "io_uring SINGLE_ISSUER/COOP_TASKRUN/SUBMIT_ALL unsupported; using a plain ring"
            );
            IoUring::builder()
                .build(URING_ENTRIES)
                .map_err(RingError::Setup)
        }
        Err(error) => Err(RingError::Setup(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shell::buffers::BufferPool;
    use crate::shell::disk::open_backing;
    use std::fs::{File, OpenOptions};
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::{Path, PathBuf};
    use std::rc::Rc;

    const KIB: usize = 1024;
    const MIB: usize = 1024 * KIB;

    /// A temp file of a given size, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(dir: &Path, tag: &str, size_bytes: u64) -> TempFile {
            static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = dir.join(format!(
                "mirrordisk-uring-test-{}-{tag}-{n}",
                std::process::id()
            ));
            File::create(&path).unwrap().set_len(size_bytes).unwrap();
            TempFile(path)
        }

        fn open(&self, direct: bool) -> File {
            let flags = if direct { libc::O_DIRECT } else { 0 };
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(flags)
                .open(&self.0)
                .unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn read(offset: u64, buf: Buf) -> Op {
        let range = 0..buf.len();
        Op::Read { offset, buf, range }
    }

    fn write(offset: u64, buf: Buf, fua: bool) -> Op {
        let range = 0..buf.len();
        Op::Write {
            offset,
            buf,
            range,
            fua,
        }
    }

    fn filled(pool: &Rc<BufferPool>, len: usize, byte: u8) -> Buf {
        let mut buf = pool.try_get(len).unwrap();
        buf.fill(byte);
        buf
    }

    fn read_at(ring: &mut Ring, pool: &Rc<BufferPool>, offset: u64, len: usize) -> Vec<u8> {
        let buf = filled(pool, len, 0xee);
        let completion = ring.run_to_completion(read(offset, buf));
        assert_eq!(completion.result, Ok(len as u32));
        completion.buf.unwrap().to_vec()
    }

    /// Submits and drains until `count` completions have arrived.
    fn wait_all(ring: &mut Ring, count: usize) -> Vec<Completion> {
        let mut out = Vec::new();
        loop {
            ring.submit().unwrap();
            ring.drain(&mut out);
            if out.len() >= count {
                assert_eq!(out.len(), count);
                return out;
            }
            ring.submit_and_wait(1).unwrap();
        }
    }

    // ---- bookkeeping (pure) ----

    #[test]
    fn advance_completes_a_full_transfer() {
        let mut progress = Progress::default();
        assert_eq!(
            advance(&mut progress, Some(4096), 4096),
            Step::Complete(Ok(4096))
        );
    }

    #[test]
    fn advance_resubmits_the_remainder_of_a_short_transfer() {
        let mut progress = Progress::default();
        assert_eq!(advance(&mut progress, Some(8192), 4096), Step::Resubmit);
        assert_eq!(progress.done_bytes, 4096);
        assert_eq!(advance(&mut progress, Some(8192), 1000), Step::Resubmit);
        assert_eq!(progress.done_bytes, 5096);
        assert_eq!(
            advance(&mut progress, Some(8192), 3096),
            Step::Complete(Ok(8192))
        );
    }

    #[test]
    fn advance_reports_eio_when_a_read_meets_end_of_file() {
        let mut progress = Progress::default();
        assert_eq!(advance(&mut progress, Some(8192), 4096), Step::Resubmit);
        assert_eq!(
            advance(&mut progress, Some(8192), 0),
            Step::Complete(Err(libc::EIO))
        );
        let mut fresh = Progress::default();
        assert_eq!(
            advance(&mut fresh, Some(512), 0),
            Step::Complete(Err(libc::EIO))
        );
    }

    #[test]
    fn advance_retries_eintr_and_eagain_a_bounded_number_of_times() {
        let mut progress = Progress::default();
        for _ in 0..RETRIES_WITHOUT_PROGRESS_MAX {
            assert_eq!(
                advance(&mut progress, Some(4096), -libc::EAGAIN),
                Step::Resubmit
            );
        }
        assert_eq!(
            advance(&mut progress, Some(4096), -libc::EINTR),
            Step::Complete(Err(libc::EINTR))
        );
        let mut fsync = Progress::default();
        assert_eq!(advance(&mut fsync, None, -libc::EINTR), Step::Resubmit);
        assert_eq!(advance(&mut fsync, None, 0), Step::Complete(Ok(0)));
    }

    #[test]
    fn advance_progress_resets_the_retry_count() {
        let mut progress = Progress::default();
        for _ in 0..RETRIES_WITHOUT_PROGRESS_MAX {
            advance(&mut progress, Some(8192), -libc::EINTR);
        }
        assert_eq!(advance(&mut progress, Some(8192), 4096), Step::Resubmit);
        assert_eq!(progress.retries_count, 0);
        assert_eq!(
            advance(&mut progress, Some(8192), -libc::EINTR),
            Step::Resubmit
        );
    }

    #[test]
    fn advance_passes_other_errors_through() {
        let mut progress = Progress::default();
        assert_eq!(
            advance(&mut progress, None, -libc::EOPNOTSUPP),
            Step::Complete(Err(libc::EOPNOTSUPP))
        );
        assert_eq!(
            advance(&mut progress, Some(4096), -libc::ENOSPC),
            Step::Complete(Err(libc::ENOSPC))
        );
        assert_eq!(advance(&mut progress, Some(0), 0), Step::Complete(Ok(0)));
    }

    #[test]
    #[should_panic(expected = "kernel reported")]
    fn advance_asserts_the_kernel_never_overshoots() {
        advance(&mut Progress::default(), Some(4096), 8192);
    }

    #[test]
    fn probe_failure_names_the_missing_opcode() {
        let error = check_opcodes(|code| code != opcode::Fallocate::CODE).unwrap_err();
        assert_eq!(
            error.to_string(),
            "io_uring opcode FALLOCATE not supported by this kernel"
        );
        assert!(check_opcodes(|_| true).is_ok());
    }

    // ---- against the kernel ----

    /// 4 KiB and 64 KiB transfers (inline on tmpfs with `InlineIo::Auto`) mixed with a
    /// 1 MiB one (always the ring).
    fn round_trip(dir: &Path, direct: bool, inline: InlineIo) {
        let temp = TempFile::new(dir, "rt", 4 * MIB as u64);
        let file = temp.open(direct);
        let pool = BufferPool::new(8 * MIB);
        let mut ring = Ring::with_inline(file.as_raw_fd(), inline).unwrap();
        let writes: [(u64, usize, u8, bool); 4] = [
            (0, 4 * KIB, 0x11, false),
            (8 * KIB as u64, 64 * KIB, 0x22, true),
            (MIB as u64, MIB, 0x33, false),
            (4 * MIB as u64 - 4096, 4 * KIB, 0x44, true),
        ];
        for (token, &(offset, len, byte, fua)) in writes.iter().enumerate() {
            let buf = filled(&pool, len, byte);
            ring.push(write(offset, buf, fua), token as u64);
        }
        assert_eq!(ring.in_flight(), 4);
        let mut completions = wait_all(&mut ring, 4);
        completions.sort_by_key(|c| c.token);
        for (completion, &(_, len, _, _)) in completions.iter().zip(&writes) {
            assert_eq!(completion.result, Ok(len as u32));
            assert_eq!(completion.buf.as_ref().unwrap().len(), len);
        }
        assert_eq!(ring.in_flight(), 0);
        drop(completions);
        assert_eq!(ring.run_to_completion(Op::Fsync).result, Ok(0));
        for &(offset, len, byte, _) in &writes {
            let data = read_at(&mut ring, &pool, offset, len);
            assert!(data.iter().all(|&b| b == byte), "{dir:?} direct={direct}");
        }
        assert_eq!(read_at(&mut ring, &pool, 4096, 4096), vec![0; 4096]);
        drop(ring);
        assert_eq!(pool.bytes_in_use(), 0);
    }

    #[test]
    fn round_trip_ext4_direct() {
        round_trip(&std::env::temp_dir(), true, InlineIo::Auto);
    }

    #[test]
    fn round_trip_ext4_buffered() {
        round_trip(&std::env::temp_dir(), false, InlineIo::Auto);
    }

    #[test]
    fn round_trip_tmpfs_direct() {
        round_trip(Path::new("/dev/shm"), true, InlineIo::Auto);
        round_trip(Path::new("/dev/shm"), true, InlineIo::Never);
    }

    #[test]
    fn round_trip_tmpfs_buffered() {
        round_trip(Path::new("/dev/shm"), false, InlineIo::Auto);
        round_trip(Path::new("/dev/shm"), false, InlineIo::Never);
    }

    #[test]
    fn inline_is_chosen_for_tmpfs_only() {
        let tmpfs = TempFile::new(Path::new("/dev/shm"), "kind", MIB as u64);
        let ext4 = TempFile::new(&std::env::temp_dir(), "kind", MIB as u64);
        let (reader, _writer) = nix::unistd::pipe().unwrap();
        assert!(
            Ring::new(tmpfs.open(true).as_raw_fd())
                .unwrap()
                .inline_fd
                .is_some()
        );
        assert!(
            Ring::new(ext4.open(true).as_raw_fd())
                .unwrap()
                .inline_fd
                .is_none()
        );
        assert!(Ring::new(reader.as_raw_fd()).unwrap().inline_fd.is_none());
        // /dev/null's node is on devtmpfs (tmpfs magic) but it is not a regular file.
        let null = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .unwrap();
        assert!(Ring::new(null.as_raw_fd()).unwrap().inline_fd.is_none());
        let never = Ring::with_inline(tmpfs.open(true).as_raw_fd(), InlineIo::Never).unwrap();
        assert!(never.inline_fd.is_none());
    }

    /// An inline transfer is performed by `submit`, with no SQE and no io-wq worker, and
    /// reported by the next `drain`; one just above the limit goes to the ring.
    #[test]
    fn small_tmpfs_transfers_complete_at_submit_without_a_worker() {
        std::thread::spawn(|| {
            let temp = TempFile::new(Path::new("/dev/shm"), "inline", 4 * MIB as u64);
            let file = temp.open(true);
            let pool = BufferPool::new(4 * MIB);
            let mut ring = Ring::new(file.as_raw_fd()).unwrap();
            ring.push(write(0, filled(&pool, INLINE_IO_BYTES_MAX, 0x3c), true), 1);
            let mut out = Vec::new();
            ring.drain(&mut out);
            assert!(out.is_empty(), "performed only by submit");
            assert_eq!(ring.in_flight(), 1);
            assert_eq!(ring.submit().unwrap(), 0, "no SQE for an inline transfer");
            ring.drain(&mut out);
            assert_eq!(
                (out[0].token, out[0].result),
                (1, Ok(INLINE_IO_BYTES_MAX as u32))
            );
            assert_eq!(ring.in_flight(), 0);
            assert_eq!(io_wq_workers_of_this_thread().0, 0);
            let data = read_at(&mut ring, &pool, 0, INLINE_IO_BYTES_MAX);
            assert!(data.iter().all(|&b| b == 0x3c));
            let above = INLINE_IO_BYTES_MAX + 4096;
            ring.push(write(MIB as u64, filled(&pool, above, 0x4d), false), 2);
            assert_eq!(ring.submit().unwrap(), 1, "the larger transfer is an SQE");
            let done = wait_all(&mut ring, 1);
            assert_eq!((done[0].token, done[0].result), (2, Ok(above as u32)));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn dropping_the_ring_reports_unperformed_inline_transfers() {
        let temp = TempFile::new(Path::new("/dev/shm"), "dropinline", MIB as u64);
        let file = temp.open(true);
        let pool = BufferPool::new(MIB);
        let mut ring = Ring::new(file.as_raw_fd()).unwrap();
        ring.push(write(0, filled(&pool, 4096, 0x5e), false), 1);
        assert_eq!(pool.bytes_in_use(), 4096);
        drop(ring);
        assert_eq!(pool.bytes_in_use(), 0, "the buffer came back");
        let mut ring = Ring::new(file.as_raw_fd()).unwrap();
        assert_eq!(
            read_at(&mut ring, &pool, 0, 4096),
            vec![0; 4096],
            "never written"
        );
    }

    #[test]
    fn inline_errors_are_reported_like_ring_errors() {
        let temp = TempFile::new(Path::new("/dev/shm"), "inline-eof", 8192);
        let file = temp.open(true);
        let pool = BufferPool::new(MIB);
        let mut ring = Ring::new(file.as_raw_fd()).unwrap();
        assert!(ring.inline_fd.is_some());
        let crossing = ring.run_to_completion(read(4096, filled(&pool, 16 * KIB, 0)));
        assert_eq!(crossing.result, Err(libc::EIO));
        assert_eq!(crossing.buf.unwrap().len(), 16 * KIB);
        let read_only = OpenOptions::new().read(true).open(&temp.0).unwrap();
        let mut ring = Ring::new(read_only.as_raw_fd()).unwrap();
        assert!(ring.inline_fd.is_some());
        let completion = ring.run_to_completion(write(0, filled(&pool, 4096, 1), false));
        assert_eq!(completion.result, Err(libc::EBADF));
    }

    #[test]
    fn round_trip_through_open_backing() {
        let temp = TempFile::new(Path::new("/dev/shm"), "backing", MIB as u64);
        let backing = open_backing(&temp.0, false).unwrap();
        assert!(backing.direct_io);
        let pool = BufferPool::new(MIB);
        let mut ring = Ring::new(backing.file.as_raw_fd()).unwrap();
        let buf = filled(&pool, 4096, 0x5a);
        let written = ring.run_to_completion(write(4096, buf, true));
        assert_eq!(written.result, Ok(4096));
        assert_eq!(written.token, RUN_TO_COMPLETION_TOKEN);
        assert_eq!(read_at(&mut ring, &pool, 4096, 4096), vec![0x5a; 4096]);
        // tmpfs takes O_DIRECT at 512-byte granularity, as open_backing says.
        assert_eq!(backing.logical_block_bytes, 512);
        let mut sector = filled(&pool, 4096, 0x6b);
        sector.set_len(512);
        let written = ring.run_to_completion(write(512, sector, false));
        assert_eq!(written.result, Ok(512));
        let data = read_at(&mut ring, &pool, 0, 4096);
        assert_eq!(&data[..512], &[0; 512][..]);
        assert_eq!(&data[512..1024], &[0x6b; 512][..]);
        assert_eq!(&data[1024..], &[0; 3072][..]);
    }

    /// A read-modify-write reads one edge block into the middle of the buffer it then
    /// writes: only `buf[range]` is transferred.
    #[test]
    fn ranges_transfer_only_part_of_the_buffer() {
        let temp = TempFile::new(Path::new("/dev/shm"), "range", MIB as u64);
        let file = temp.open(true);
        let pool = BufferPool::new(MIB);
        let mut ring = Ring::new(file.as_raw_fd()).unwrap();
        let mut buf = filled(&pool, 3 * 4096, 0x77);
        buf[4096..8192].fill(0x99);
        let written = ring.run_to_completion(Op::Write {
            offset: 65536,
            buf,
            range: 4096..8192,
            fua: false,
        });
        assert_eq!(written.result, Ok(4096));
        let read_back = ring.run_to_completion(Op::Read {
            offset: 65536,
            buf: filled(&pool, 3 * 4096, 0x11),
            range: 8192..12288,
        });
        assert_eq!(read_back.result, Ok(4096));
        let data = read_back.buf.unwrap();
        assert!(
            data[..8192].iter().all(|&b| b == 0x11),
            "untouched outside the range"
        );
        assert!(data[8192..].iter().all(|&b| b == 0x99));
        assert_eq!(read_at(&mut ring, &pool, 65536 + 4096, 4096), vec![0; 4096]);
    }

    /// A shared buffer is written while another owner still reads it, and comes back
    /// to that owner alone once the write completed.
    #[test]
    fn shared_write_keeps_the_buffer_for_its_other_owner() {
        let temp = TempFile::new(Path::new("/dev/shm"), "shared", MIB as u64);
        let file = temp.open(true);
        let pool = BufferPool::new(MIB);
        let mut ring = Ring::new(file.as_raw_fd()).unwrap();
        let shared = Rc::new(filled(&pool, 2 * 4096, 0x5a));
        let written = ring.run_to_completion(Op::WriteShared {
            offset: 8192,
            buf: Rc::clone(&shared),
            range: 4096..8192,
            fua: true,
        });
        assert_eq!(written.result, Ok(4096));
        assert!(written.buf.is_none(), "a shared write hands no buffer back");
        assert_eq!(
            Rc::strong_count(&shared),
            1,
            "the ring dropped its reference"
        );
        assert_eq!(read_at(&mut ring, &pool, 8192, 4096), vec![0x5a; 4096]);
        assert!(shared.iter().all(|&b| b == 0x5a));
    }

    #[test]
    #[should_panic(expected = "outside a")]
    fn a_range_beyond_the_buffer_panics() {
        let temp = TempFile::new(Path::new("/dev/shm"), "badrange", MIB as u64);
        let file = temp.open(false);
        let pool = BufferPool::new(MIB);
        let mut ring = Ring::new(file.as_raw_fd()).unwrap();
        let buf = filled(&pool, 4096, 0);
        ring.push(
            Op::Read {
                offset: 0,
                buf,
                range: 0..4097,
            },
            0,
        );
    }

    fn punch_and_zero(dir: &Path, zero_range_supported: bool) {
        let temp = TempFile::new(dir, "falloc", 64 * KIB as u64);
        let file = temp.open(true);
        let pool = BufferPool::new(MIB);
        let mut ring = Ring::new(file.as_raw_fd()).unwrap();
        let buf = filled(&pool, 64 * KIB, 0xff);
        let written = ring.run_to_completion(write(0, buf, false));
        assert_eq!(written.result, Ok(64 * KIB as u32));
        let punch = ring.run_to_completion(Op::Fallocate {
            mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset: 4096,
            len: 4096,
        });
        assert_eq!(punch.result, Ok(0));
        assert!(punch.buf.is_none());
        let zero = ring.run_to_completion(Op::Fallocate {
            mode: libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset: 16 * KIB as u64,
            len: 8192,
        });
        if zero_range_supported {
            assert_eq!(zero.result, Ok(0));
        } else {
            assert_eq!(zero.result, Err(libc::EOPNOTSUPP));
        }
        let data = read_at(&mut ring, &pool, 0, 64 * KIB);
        for (index, chunk) in data.chunks(4096).enumerate() {
            let zeroed = index == 1 || (zero_range_supported && (index == 4 || index == 5));
            let expected = if zeroed { 0 } else { 0xff };
            assert!(chunk.iter().all(|&b| b == expected), "block {index}");
        }
        assert_eq!(file.metadata().unwrap().len(), 64 * KIB as u64);
    }

    #[test]
    fn punch_hole_and_zero_range_read_back_as_zeros_on_ext4() {
        punch_and_zero(&std::env::temp_dir(), true);
    }

    /// tmpfs punches holes but has no FALLOC_FL_ZERO_RANGE: the ring reports
    /// EOPNOTSUPP for that op (callers fall back to writing zeroes).
    #[test]
    fn punch_hole_on_tmpfs_and_zero_range_is_eopnotsupp() {
        punch_and_zero(Path::new("/dev/shm"), false);
    }

    #[test]
    fn fadvise_willneed_succeeds() {
        let temp = TempFile::new(&std::env::temp_dir(), "fadvise", MIB as u64);
        let file = temp.open(false);
        let mut ring = Ring::new(file.as_raw_fd()).unwrap();
        let completion = ring.run_to_completion(Op::Fadvise {
            offset: 0,
            len: MIB as u32,
            advice: libc::POSIX_FADV_WILLNEED,
        });
        assert_eq!(completion.result, Ok(0));
    }

    #[test]
    fn read_crossing_end_of_file_is_eio_and_returns_the_buffer() {
        let temp = TempFile::new(&std::env::temp_dir(), "eof", 8192);
        let file = temp.open(true);
        let pool = BufferPool::new(MIB);
        let mut ring = Ring::new(file.as_raw_fd()).unwrap();
        // The kernel returns 4096 bytes, the remainder read at 8192 returns 0.
        let crossing = ring.run_to_completion(read(4096, filled(&pool, 16 * KIB, 0)));
        assert_eq!(crossing.result, Err(libc::EIO));
        assert_eq!(crossing.buf.unwrap().len(), 16 * KIB);
        let beyond = ring.run_to_completion(read(8192, filled(&pool, 4096, 0)));
        assert_eq!(beyond.result, Err(libc::EIO));
        assert_eq!(ring.in_flight(), 0);
    }

    #[test]
    fn write_on_a_read_only_file_reports_ebadf() {
        let temp = TempFile::new(&std::env::temp_dir(), "rofile", 8192);
        let backing = open_backing(&temp.0, true).unwrap();
        let pool = BufferPool::new(MIB);
        let mut ring = Ring::new(backing.file.as_raw_fd()).unwrap();
        let completion = ring.run_to_completion(write(0, filled(&pool, 4096, 1), false));
        assert_eq!(completion.result, Err(libc::EBADF));
    }

    /// A real short transfer: a pipe hands over what it holds, so an 8-byte read of a
    /// pipe holding 3 bytes returns 3 and the ring must read the other 5 (arriving
    /// later) into the rest of the same buffer before reporting once.
    #[test]
    fn short_read_is_resubmitted_for_the_remainder() {
        let (reader, writer) = nix::unistd::pipe().unwrap();
        nix::unistd::write(&writer, b"abc").unwrap();
        let pool = BufferPool::new(MIB);
        let mut ring = Ring::new(reader.as_raw_fd()).unwrap();
        ring.push(read(0, filled(&pool, 8, 0)), 42);
        ring.submit().unwrap();
        let mut out = Vec::new();
        ring.drain(&mut out);
        assert!(out.is_empty(), "3 of 8 bytes must not be reported");
        assert_eq!(ring.in_flight(), 1);
        let late_writer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            nix::unistd::write(&writer, b"defgh").unwrap();
        });
        let completions = wait_all(&mut ring, 1);
        late_writer.join().unwrap();
        assert_eq!(completions[0].token, 42);
        assert_eq!(completions[0].result, Ok(8));
        assert_eq!(&completions[0].buf.as_ref().unwrap()[..], b"abcdefgh");
    }

    /// More operations than the SQ (512) and the CQ (1024) hold, pushed before a single
    /// drain: push must submit when the SQ is full, and drain must flush the kernel's
    /// CQ overflow list. Every token comes back exactly once.
    #[test]
    fn a_burst_larger_than_both_queues_completes_every_token_once() {
        let ops_count = 3000;
        let temp = TempFile::new(Path::new("/dev/shm"), "burst", (ops_count * 4096) as u64);
        let file = temp.open(true);
        let pool = BufferPool::new(ops_count * 4096);
        let mut ring = Ring::with_inline(file.as_raw_fd(), InlineIo::Never).unwrap();
        for index in 0..ops_count {
            let buf = filled(&pool, 4096, index as u8);
            let offset = (index * 4096) as u64;
            ring.push(write(offset, buf, false), index as u64);
        }
        let completions = wait_all(&mut ring, ops_count);
        let mut seen = vec![false; ops_count];
        for completion in &completions {
            assert_eq!(completion.result, Ok(4096));
            assert!(!std::mem::replace(
                &mut seen[completion.token as usize],
                true
            ));
        }
        assert_eq!(ring.in_flight(), 0);
        drop(completions);
        assert_eq!(
            read_at(&mut ring, &pool, 2999 * 4096, 4096),
            vec![2999u16 as u8; 4096]
        );
    }

    #[test]
    fn run_to_completion_keeps_other_completions_for_drain() {
        for inline in [InlineIo::Auto, InlineIo::Never] {
            let temp = TempFile::new(Path::new("/dev/shm"), "stash", MIB as u64);
            let file = temp.open(true);
            let pool = BufferPool::new(MIB);
            let mut ring = Ring::with_inline(file.as_raw_fd(), inline).unwrap();
            ring.push(write(0, filled(&pool, 4096, 7), false), 7);
            assert_eq!(ring.run_to_completion(Op::Fsync).result, Ok(0));
            let mut out = Vec::new();
            ring.drain(&mut out);
            assert_eq!(out.len(), 1, "{inline:?}");
            assert_eq!((out[0].token, out[0].result), (7, Ok(4096)));
        }
    }

    #[test]
    fn dropping_the_ring_cancels_and_waits_for_in_flight_operations() {
        let (reader, _writer) = nix::unistd::pipe().unwrap();
        let pool = BufferPool::new(MIB);
        let mut ring = Ring::new(reader.as_raw_fd()).unwrap();
        ring.push(read(0, filled(&pool, 4096, 0)), 1);
        ring.submit().unwrap();
        assert_eq!(pool.bytes_in_use(), 4096);
        drop(ring);
        assert_eq!(
            pool.bytes_in_use(),
            0,
            "the buffer came back after the cancel"
        );
    }

    /// The driver contract: the ring fd becomes readable when an operation completes
    /// asynchronously (here a pipe read finished by another thread, which needs task
    /// work, the case DEFER_TASKRUN breaks), and `drain` then finds the completion
    /// without any further io_uring_enter.
    #[test]
    fn ring_fd_polls_readable_on_async_completion_and_drain_needs_no_enter() {
        let (reader, writer) = nix::unistd::pipe().unwrap();
        let pool = BufferPool::new(MIB);
        let mut ring = Ring::new(reader.as_raw_fd()).unwrap();
        ring.push(read(0, filled(&pool, 4, 0)), 9);
        ring.submit().unwrap();
        let late_writer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            nix::unistd::write(&writer, b"ping").unwrap();
        });
        let started = std::time::Instant::now();
        let mut poll_fd = libc::pollfd {
            fd: ring.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: poll_fd is a valid pollfd array of length 1 for the whole call.
            let ready = unsafe { libc::poll(&mut poll_fd, 1, 5000) };
            if ready < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            assert_eq!(ready, 1, "ring fd never became readable");
            break;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(4));
        late_writer.join().unwrap();
        let mut out = Vec::new();
        ring.drain(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].token, out[0].result), (9, Ok(4)));
        assert_eq!(&out[0].buf.as_ref().unwrap()[..], b"ping");
    }

    #[test]
    fn slots_are_reused_across_operations() {
        let temp = TempFile::new(Path::new("/dev/shm"), "reuse", MIB as u64);
        let file = temp.open(true);
        let pool = BufferPool::new(MIB);
        let mut ring = Ring::with_inline(file.as_raw_fd(), InlineIo::Never).unwrap();
        for round in 0..100u64 {
            for index in 0..8 {
                let buf = filled(&pool, 4096, round as u8);
                ring.push(write(index * 4096, buf, false), index);
            }
            wait_all(&mut ring, 8);
        }
        assert_eq!(ring.slots.len(), 8);
    }

    // ---- sanity benchmark: is the ring the bottleneck? ----

    #[derive(Debug, Default)]
    struct BenchReport {
        write_iops: f64,
        read_iops: f64,
        /// Most io-wq workers ("iou-wrk-<submitting tid>") seen alive at once.
        io_wq_workers_max: usize,
        /// CPU time those workers used during the write and the read phase, in ms.
        io_wq_cpu_ms: [f64; 2],
    }

    /// (count, CPU ns) of the io-wq workers serving this thread's rings.
    fn io_wq_workers_of_this_thread() -> (usize, u64) {
        let name = format!("iou-wrk-{}", nix::unistd::gettid());
        let mut count = 0;
        let mut cpu_ns = 0;
        for entry in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            if comm.trim() != name {
                continue;
            }
            count += 1;
            let schedstat = std::fs::read_to_string(entry.path().join("schedstat"));
            let on_cpu_ns = schedstat
                .ok()
                .and_then(|s| s.split(' ').next()?.parse().ok());
            cpu_ns += on_cpu_ns.unwrap_or(0u64);
        }
        (count, cpu_ns)
    }

    /// `ops_count` random `block_bytes` writes, then as many random reads, at
    /// `queue_depth`.
    fn bench(
        dir: &Path,
        direct: bool,
        block_bytes: usize,
        ops_count: u64,
        queue_depth: u64,
    ) -> BenchReport {
        let size_bytes = 256 * MIB as u64;
        let temp = TempFile::new(dir, "bench", 0);
        let file = temp.open(direct);
        nix::fcntl::fallocate(
            &file,
            nix::fcntl::FallocateFlags::empty(),
            0,
            size_bytes as i64,
        )
        .unwrap();
        let blocks_count = size_bytes / block_bytes as u64;
        let pool = BufferPool::new(queue_depth as usize * block_bytes);
        let mut ring = Ring::new(file.as_raw_fd()).unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next_offset = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % blocks_count) * block_bytes as u64
        };
        let mut report = BenchReport::default();
        let note_workers = |report: &mut BenchReport| {
            let (count, cpu_ns) = io_wq_workers_of_this_thread();
            report.io_wq_workers_max = report.io_wq_workers_max.max(count);
            cpu_ns
        };
        for phase in 0..2 {
            let cpu_ns_before = note_workers(&mut report);
            let make_op = |buf: Buf, offset: u64| {
                if phase == 0 {
                    write(offset, buf, false)
                } else {
                    read(offset, buf)
                }
            };
            let started = std::time::Instant::now();
            let mut issued = 0;
            let mut completed = 0;
            for _ in 0..queue_depth {
                ring.push(
                    make_op(filled(&pool, block_bytes, 0xa5), next_offset()),
                    issued,
                );
                issued += 1;
            }
            let mut out = Vec::with_capacity(queue_depth as usize);
            while completed < ops_count {
                ring.submit().unwrap();
                ring.drain(&mut out);
                if out.is_empty() {
                    ring.submit_and_wait(1).unwrap();
                    continue;
                }
                for completion in out.drain(..) {
                    assert_eq!(completion.result, Ok(block_bytes as u32));
                    completed += 1;
                    if completed % 8192 == 0 {
                        note_workers(&mut report);
                    }
                    if issued < ops_count {
                        ring.push(make_op(completion.buf.unwrap(), next_offset()), issued);
                        issued += 1;
                    }
                }
            }
            let iops = ops_count as f64 / started.elapsed().as_secs_f64();
            if phase == 0 {
                report.write_iops = iops;
            } else {
                report.read_iops = iops;
            }
            let cpu_ns = note_workers(&mut report).saturating_sub(cpu_ns_before);
            report.io_wq_cpu_ms[phase] = cpu_ns as f64 / 1e6;
        }
        report
    }

    /// Not a timing assertion: prints random write/read rates through the ring (4 KiB at
    /// QD32 on tmpfs and ext4, O_DIRECT and buffered; 1 MiB at QD16 on tmpfs) and how
    /// much io-wq worker time each needed. `MIRRORDISK_RING_BENCH_OPS` overrides the
    /// operation count (defaults: 100k for tmpfs O_DIRECT 4 KiB, 20k for the other 4 KiB
    /// runs, 2k for 1 MiB).
    #[test]
    fn sanity_bench_random_io() {
        let ops_override: Option<u64> = std::env::var("MIRRORDISK_RING_BENCH_OPS")
            .ok()
            .and_then(|v| v.parse().ok());
        let tmpfs = Path::new("/dev/shm");
        let ext4: &'static Path = std::env::temp_dir().leak();
        let configs = [
            ("tmpfs", tmpfs, true, 4 * KIB, 32, 100_000),
            ("tmpfs", tmpfs, false, 4 * KIB, 32, 20_000),
            ("ext4", ext4, true, 4 * KIB, 32, 20_000),
            ("ext4", ext4, false, 4 * KIB, 32, 20_000),
            ("tmpfs", tmpfs, true, MIB, 16, 2_000),
        ];
        for (fs, dir, direct, block_bytes, queue_depth, ops_default) in configs {
            let ops_count = ops_override.unwrap_or(ops_default);
            // A fresh thread per configuration: io-wq workers are per submitting thread
            // and linger for seconds, so they would otherwise carry over.
            let report =
                std::thread::spawn(move || bench(dir, direct, block_bytes, ops_count, queue_depth))
                    .join()
                    .unwrap();
            let mb_per_s = |iops: f64| iops * block_bytes as f64 / 1e6;
            println!(
                "ring bench {fs} {}: {ops_count} x {} KiB QD{queue_depth}: \
                 randwrite {:.0} IOPS ({:.0} MB/s), randread {:.0} IOPS ({:.0} MB/s); \
                 io-wq workers seen: {}, their CPU ms (writes, reads): {:.1}, {:.1}",
                if direct { "O_DIRECT" } else { "buffered" },
                block_bytes / KIB,
                report.write_iops,
                mb_per_s(report.write_iops),
                report.read_iops,
                mb_per_s(report.read_iops),
                report.io_wq_workers_max,
                report.io_wq_cpu_ms[0],
                report.io_wq_cpu_ms[1],
            );
        }
    }
}
