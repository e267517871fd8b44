//! The local volume: executes validated block requests against the backing through the
//! io_uring ring — alignment by read-modify-write, zeroing fallbacks, overlap locks —
//! and hands each result back to whoever submitted it.
//!
//! One `LocalVolume` per export, shared (`Rc`) by all its connections on the data-plane
//! thread. Every request gets exactly one completion. Modifying requests (write, trim,
//! write-zeroes) lock their block-aligned range in a shared [`RangeLocks`], so a
//! read-modify-write of a partial block never races a neighbour's write to the same
//! block, from any connection.

use std::cell::RefCell;
use std::ops::Range;
use std::rc::Rc;

use slab::Slab;
use tracing::{debug, warn};

use crate::core::nbd::wire::Errno;
use crate::core::overlap::{Acquire, ByteRange, RangeLocks};
use crate::shell::buffers::{Buf, BufferPool};
use crate::shell::disk::{Backing, BackingKind};
use crate::shell::uring::{Completion, Op, Ring};

/// Size of the one zero-filled buffer used to emulate WRITE_ZEROES where the backing
/// supports no fallocate mode at all. Allocated once at start-up, outside the pool; zero
/// fills take turns using it, which is fine for a path real backings rarely take.
const ZERO_FILL_CHUNK_BYTES: usize = 1024 * 1024;

/// Identifies the reply a completion belongs to; opaque to the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTag {
    pub cookie: u64,
    pub is_read: bool,
}

/// Data of a successful read: a window into the buffer it was read into.
#[derive(Debug)]
pub struct ReadData {
    buf: Buf,
    range: Range<usize>,
    offset: u64,
}

impl ReadData {
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[self.range.clone()]
    }

    /// The export offset the data was read from.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

/// Receives exactly one completion per submitted request.
pub trait IoSink {
    fn complete(&self, tag: ReplyTag, result: Result<(), Errno>, data: Option<ReadData>);
}

/// Where a request's payload sits in its buffer: reads and writes that are not aligned
/// to the backing's block size use a buffer covering the aligned range around them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferLayout {
    pub buf_bytes: usize,
    pub data_start: usize,
}

/// A validated block request. Offsets and lengths are already checked against the
/// export size by the NBD validator.
#[derive(Debug)]
pub enum BlockRequest {
    /// `buf` has the layout from [`LocalVolume::layout`].
    Read {
        offset: u64,
        length: u32,
        buf: Buf,
    },
    /// `buf` has the layout from [`LocalVolume::layout`], payload at `data_start`.
    Write {
        offset: u64,
        length: u32,
        buf: Buf,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
        no_hole: bool,
        fast_zero: bool,
    },
    Cache {
        offset: u64,
        length: u32,
    },
}

/// What the NBD front end needs from whatever executes its requests: a plain local
/// volume (`mirrordisk serve` on a bare file) or the mirror engine's export.
pub trait Backend: std::fmt::Debug {
    /// Buffer size and payload position for a read or write of `length` at `offset`.
    fn layout(&self, offset: u64, length: u32) -> BufferLayout;
    /// The pool request buffers come from.
    fn pool(&self) -> &Rc<BufferPool>;
    /// Starts `request`; exactly one completion reaches `sink`, tagged `tag`.
    fn submit(&self, request: BlockRequest, tag: ReplyTag, sink: Rc<dyn IoSink>);
    /// Hands everything queued to the kernel; called before the caller waits.
    fn flush_submissions(&self);
}

impl Backend for LocalVolume {
    fn layout(&self, offset: u64, length: u32) -> BufferLayout {
        LocalVolume::layout(self, offset, length)
    }

    fn pool(&self) -> &Rc<BufferPool> {
        LocalVolume::pool(self)
    }

    fn submit(&self, request: BlockRequest, tag: ReplyTag, sink: Rc<dyn IoSink>) {
        LocalVolume::submit(self, request, tag, sink);
    }

    fn flush_submissions(&self) {
        LocalVolume::flush_submissions(self);
    }
}

/// Counters for status and benchmarks.
#[derive(Debug, Default, Clone, Copy)]
pub struct VolumeStats {
    pub reads: u64,
    pub writes: u64,
    pub read_modify_writes: u64,
    pub flushes: u64,
    pub zeroes: u64,
    pub trims: u64,
    pub errors: u64,
}

/// One way to zero a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZeroStep {
    /// fallocate calls, in order; all must succeed.
    Fallocate(&'static [i32]),
    /// Write zero buffers over the range (only when no fallocate mode worked).
    Fill,
}

/// What remains to be done for an in-flight request.
#[derive(Debug)]
enum OpState {
    Read { data: Range<usize>, offset: u64 },
    Write(WriteOp),
    Flush,
    Zero(ZeroOp),
    Cache,
}

#[derive(Debug)]
struct WriteOp {
    /// The block-aligned range written (equals the request's range when aligned).
    range: ByteRange,
    fua: bool,
    /// The buffer while the op owns it (it is inside the ring during disk I/O).
    buf: Option<Buf>,
    /// Payload bytes inside partial edge blocks, saved before the edges are read from
    /// disk into the same buffer and restored afterwards.
    stash: Vec<(usize, Vec<u8>)>,
    /// Edge blocks (buffer offsets) still to read before the write.
    edges: Vec<usize>,
    phase: WritePhase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WritePhase {
    Locking,
    ReadingEdge,
    Writing,
}

#[derive(Debug)]
struct ZeroOp {
    range: ByteRange,
    fua: bool,
    /// Strategies left to try, first is current.
    steps: Vec<ZeroStep>,
    /// Index of the next fallocate call within the current strategy.
    call: usize,
    /// Fill progress: next byte offset to write.
    fill_next: u64,
    fast_zero: bool,
    is_trim: bool,
    phase: ZeroPhase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZeroPhase {
    Locking,
    Working,
    WaitingForZeroBuffer,
    Syncing,
}

#[derive(Debug)]
struct Pending {
    tag: ReplyTag,
    sink: Rc<dyn IoSink>,
    state: OpState,
}

impl std::fmt::Debug for dyn IoSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IoSink")
    }
}

/// A completion ready for its sink: who, which reply, outcome, read data.
type Finished = (
    Rc<dyn IoSink>,
    ReplyTag,
    Result<(), Errno>,
    Option<ReadData>,
);

#[derive(Debug)]
struct State {
    ops: Slab<Pending>,
    locks: RangeLocks,
    /// The shared zero buffer, when not in the ring.
    zero_buf: Option<Buf>,
    /// Ops waiting for the zero buffer, in arrival order.
    zero_waiters: std::collections::VecDeque<usize>,
    stats: VolumeStats,
    /// Completions to deliver once the state is no longer borrowed.
    done: Vec<Finished>,
    /// Ring ops produced while handling an event, pushed once the state is released.
    to_push: Vec<(Op, u64)>,
}

/// The backing disk as seen by the NBD front end.
#[derive(Debug)]
pub struct LocalVolume {
    backing: Backing,
    /// Where the exported data starts on the backing (the data partition follows the
    /// CLUSTER partition); every request offset is relative to it.
    data_offset: u64,
    /// Bytes exported from `data_offset`.
    data_bytes: u64,
    /// Read-modify-write granularity: the logical block size with O_DIRECT, else 1.
    align_bytes: u64,
    ring: RefCell<Ring>,
    pool: Rc<BufferPool>,
    state: RefCell<State>,
    scratch: RefCell<Vec<Completion>>,
}

impl LocalVolume {
    /// Exports the whole backing.
    pub fn new(backing: Backing, ring: Ring, pool: Rc<BufferPool>) -> LocalVolume {
        let size = backing.size_bytes;
        LocalVolume::with_window(backing, 0, size, ring, pool)
    }

    /// Exports `data_bytes` of the backing starting at `data_offset` (the data
    /// partition). The window must lie inside the backing and be block aligned.
    pub fn with_window(
        backing: Backing,
        data_offset: u64,
        data_bytes: u64,
        ring: Ring,
        pool: Rc<BufferPool>,
    ) -> LocalVolume {
        assert!(
            data_offset
                .checked_add(data_bytes)
                .is_some_and(|end| end <= backing.size_bytes)
        );
        assert!(data_offset.is_multiple_of(u64::from(backing.logical_block_bytes)));
        let align_bytes = if backing.direct_io {
            u64::from(backing.logical_block_bytes)
        } else {
            1
        };
        let mut zero_buf = Buf::new_unpooled(ZERO_FILL_CHUNK_BYTES);
        zero_buf.fill(0);
        LocalVolume {
            backing,
            data_offset,
            data_bytes,
            align_bytes,
            ring: RefCell::new(ring),
            pool,
            state: RefCell::new(State {
                ops: Slab::new(),
                locks: RangeLocks::new(),
                zero_buf: Some(zero_buf),
                zero_waiters: Default::default(),
                stats: VolumeStats::default(),
                done: Vec::new(),
                to_push: Vec::new(),
            }),
            scratch: RefCell::new(Vec::new()),
        }
    }

    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// Bytes exported (the data partition's size).
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    pub fn pool(&self) -> &Rc<BufferPool> {
        &self.pool
    }

    pub fn ring_fd(&self) -> std::os::fd::RawFd {
        self.ring.borrow().fd()
    }

    pub fn stats(&self) -> VolumeStats {
        self.state.borrow().stats
    }

    pub fn in_flight(&self) -> usize {
        self.state.borrow().ops.len()
    }

    /// Buffer size and payload position for a read or write of `length` at `offset`.
    pub fn layout(&self, offset: u64, length: u32) -> BufferLayout {
        let range = ByteRange::new(offset, u64::from(length)).expect("validated request");
        let aligned = range.align_out(self.align_bytes);
        BufferLayout {
            buf_bytes: aligned.length() as usize,
            data_start: (offset - aligned.start()) as usize,
        }
    }

    /// Starts `request`; its completion reaches `sink` exactly once, tagged with `tag`.
    /// Ring submissions are batched: call [`LocalVolume::flush_submissions`] before the
    /// caller next awaits anything.
    pub fn submit(&self, request: BlockRequest, tag: ReplyTag, sink: Rc<dyn IoSink>) {
        {
            let mut st = self.state.borrow_mut();
            self.start(&mut st, request, tag, sink);
        }
        self.after_event();
    }

    /// Submits everything queued to the kernel, then handles whatever completed inline
    /// (buffered and tmpfs I/O often complete inside the submit call), repeating until
    /// nothing new is queued. Cheap when nothing is queued.
    pub fn flush_submissions(&self) {
        loop {
            if let Err(error) = self.ring.borrow_mut().submit() {
                // The ring itself failing is not a request error we can answer: the
                // kernel refused io_uring_enter. Crash loudly rather than hang requests.
                panic!("io_uring submit failed: {error}");
            }
            if !self.process_completions() {
                break;
            }
        }
    }

    /// Drains the completion queue and advances every op it touches. Returns whether
    /// anything completed.
    pub fn process_completions(&self) -> bool {
        let mut completions = self.scratch.take();
        self.ring.borrow_mut().drain(&mut completions);
        let any = !completions.is_empty();
        for completion in completions.drain(..) {
            let mut st = self.state.borrow_mut();
            self.on_completion(&mut st, completion);
        }
        *self.scratch.borrow_mut() = completions;
        if any {
            self.after_event();
        }
        any
    }

    /// Pushes queued ring ops and delivers finished completions, outside the state borrow
    /// (a sink may run arbitrary code; it must not find the volume borrowed).
    fn after_event(&self) {
        let (to_push, done) = {
            let mut st = self.state.borrow_mut();
            (
                std::mem::take(&mut st.to_push),
                std::mem::take(&mut st.done),
            )
        };
        if !to_push.is_empty() {
            let mut ring = self.ring.borrow_mut();
            for (op, token) in to_push {
                ring.push(op, token);
            }
        }
        for (sink, tag, result, data) in done {
            sink.complete(tag, result, data);
        }
    }

    fn start(&self, st: &mut State, request: BlockRequest, tag: ReplyTag, sink: Rc<dyn IoSink>) {
        match request {
            BlockRequest::Read {
                offset,
                length,
                buf,
            } => {
                st.stats.reads += 1;
                let layout = self.layout(offset, length);
                assert_eq!(
                    buf.len(),
                    layout.buf_bytes,
                    "read buffer must follow layout()"
                );
                let read_offset = self.data_offset + offset - layout.data_start as u64;
                let data = layout.data_start..layout.data_start + length as usize;
                let state = OpState::Read { data, offset };
                let key = st.ops.insert(Pending { tag, sink, state });
                let range = 0..buf.len();
                st.to_push.push((
                    Op::Read {
                        offset: read_offset,
                        buf,
                        range,
                    },
                    key as u64,
                ));
            }
            BlockRequest::Write {
                offset,
                length,
                buf,
                fua,
            } => {
                st.stats.writes += 1;
                let layout = self.layout(offset, length);
                assert_eq!(
                    buf.len(),
                    layout.buf_bytes,
                    "write buffer must follow layout()"
                );
                let request = ByteRange::new(self.data_offset + offset, u64::from(length))
                    .expect("validated");
                let range = request.align_out(self.align_bytes);
                let (stash, edges) = self.edges(request, range, &buf);
                if !edges.is_empty() {
                    st.stats.read_modify_writes += 1;
                }
                let op = WriteOp {
                    range,
                    fua,
                    buf: Some(buf),
                    stash,
                    edges,
                    phase: WritePhase::Locking,
                };
                let key = st.ops.insert(Pending {
                    tag,
                    sink,
                    state: OpState::Write(op),
                });
                if st.locks.acquire(key as u64, range) == Acquire::Granted {
                    self.advance_write(st, key);
                }
            }
            BlockRequest::Flush => {
                st.stats.flushes += 1;
                let key = st.ops.insert(Pending {
                    tag,
                    sink,
                    state: OpState::Flush,
                });
                st.to_push.push((Op::Fsync, key as u64));
            }
            BlockRequest::Trim {
                offset,
                length,
                fua,
            } => {
                st.stats.trims += 1;
                let offset = self.data_offset + offset;
                self.start_zero(st, tag, sink, offset, length, fua, true, false, false);
            }
            BlockRequest::WriteZeroes {
                offset,
                length,
                fua,
                no_hole,
                fast_zero,
            } => {
                st.stats.zeroes += 1;
                let offset = self.data_offset + offset;
                self.start_zero(
                    st, tag, sink, offset, length, fua, false, no_hole, fast_zero,
                );
            }
            BlockRequest::Cache { offset, length } => {
                if self.backing.direct_io {
                    // O_DIRECT bypasses the page cache: there is nothing to prefetch into.
                    st.done.push((sink, tag, Ok(()), None));
                } else {
                    let key = st.ops.insert(Pending {
                        tag,
                        sink,
                        state: OpState::Cache,
                    });
                    let op = Op::Fadvise {
                        offset: self.data_offset + offset,
                        len: length,
                        advice: libc::POSIX_FADV_WILLNEED,
                    };
                    st.to_push.push((op, key as u64));
                }
            }
        }
    }

    /// For a write not aligned to the block size: which payload bytes lie in partial
    /// edge blocks (saved, to be restored after the edges are read), and the buffer
    /// offsets of the edge blocks to read.
    fn edges(
        &self,
        request: ByteRange,
        aligned: ByteRange,
        buf: &Buf,
    ) -> (Vec<(usize, Vec<u8>)>, Vec<usize>) {
        if request == aligned {
            return (Vec::new(), Vec::new());
        }
        let block = self.align_bytes as usize;
        let data_start = (request.start() - aligned.start()) as usize;
        let data_end = data_start + request.length() as usize;
        let last_block = buf.len() - block;
        let mut edges = Vec::new();
        if !data_start.is_multiple_of(block) {
            edges.push(0);
        }
        if !data_end.is_multiple_of(block) && !edges.contains(&last_block) {
            edges.push(last_block);
        }
        let stash = edges
            .iter()
            .map(|&edge| {
                let from = data_start.max(edge);
                let to = data_end.min(edge + block);
                (from, buf[from..to].to_vec())
            })
            .collect();
        (stash, edges)
    }

    #[allow(clippy::too_many_arguments)]
    fn start_zero(
        &self,
        st: &mut State,
        tag: ReplyTag,
        sink: Rc<dyn IoSink>,
        offset: u64,
        length: u32,
        fua: bool,
        is_trim: bool,
        no_hole: bool,
        fast_zero: bool,
    ) {
        let range = ByteRange::new(offset, u64::from(length)).expect("validated request");
        let block_device = matches!(self.backing.kind, BackingKind::BlockDevice);
        if block_device && !range.is_aligned(u64::from(self.backing.logical_block_bytes)) {
            // Block devices only zero whole logical blocks; the spec lets us refuse
            // requests that ignore the advertised minimum block size, cleanly.
            if is_trim {
                // TRIM is advisory: trimming nothing is a correct answer.
                st.done.push((sink, tag, Ok(()), None));
            } else {
                st.stats.errors += 1;
                st.done.push((sink, tag, Err(Errno::Inval), None));
            }
            return;
        }
        let steps = zero_steps(is_trim, no_hole, fast_zero, block_device);
        let locked = range.align_out(self.align_bytes);
        let op = ZeroOp {
            range,
            fua,
            steps,
            call: 0,
            fill_next: range.start(),
            fast_zero,
            is_trim,
            phase: ZeroPhase::Locking,
        };
        let key = st.ops.insert(Pending {
            tag,
            sink,
            state: OpState::Zero(op),
        });
        if st.locks.acquire(key as u64, locked) == Acquire::Granted {
            self.advance_zero(st, key, None);
        }
    }

    fn on_completion(&self, st: &mut State, completion: Completion) {
        let key = completion.token as usize;
        let failed = completion.result.err();
        let kind = match &st.ops.get(key).expect("completion for a known op").state {
            OpState::Read { .. } => 0,
            OpState::Write(_) => 1,
            OpState::Flush | OpState::Cache => 2,
            OpState::Zero(_) => 3,
        };
        match kind {
            0 => {
                let Pending { tag, sink, state } = st.ops.remove(key);
                let OpState::Read { data, offset } = state else {
                    unreachable!()
                };
                let buf = completion.buf.expect("read returns its buffer");
                match failed {
                    None => {
                        let data = ReadData {
                            buf,
                            range: data,
                            offset,
                        };
                        st.done.push((sink, tag, Ok(()), Some(data)));
                    }
                    Some(errno) => self.fail(st, sink, tag, errno),
                }
            }
            1 => {
                let OpState::Write(op) = &mut st.ops[key].state else {
                    unreachable!()
                };
                op.buf = completion.buf;
                match failed {
                    None if op.phase == WritePhase::Writing => self.finish(st, key, Ok(())),
                    None => self.advance_write(st, key),
                    Some(errno) => self.finish(st, key, Err(errno)),
                }
            }
            2 => {
                let Pending { tag, sink, .. } = st.ops.remove(key);
                match failed {
                    None => st.done.push((sink, tag, Ok(()), None)),
                    Some(errno) => self.fail(st, sink, tag, errno),
                }
            }
            _ => {
                if let Some(buf) = completion.buf {
                    st.zero_buf = Some(buf);
                }
                self.advance_zero(st, key, Some(completion.result));
            }
        }
    }

    fn fail(&self, st: &mut State, sink: Rc<dyn IoSink>, tag: ReplyTag, errno: i32) {
        st.stats.errors += 1;
        let errno = Errno::from_os(errno);
        debug!(cookie = tag.cookie, ?errno, "request failed");
        st.done.push((sink, tag, Err(errno), None));
    }

    /// Moves a write to its next phase: read the next edge block, or write.
    fn advance_write(&self, st: &mut State, key: usize) {
        let block = self.align_bytes as usize;
        let OpState::Write(op) = &mut st.ops[key].state else {
            unreachable!()
        };
        let mut buf = op
            .buf
            .take()
            .expect("write op owns its buffer between phases");
        if let Some(edge) = op.edges.pop() {
            op.phase = WritePhase::ReadingEdge;
            let offset = op.range.start() + edge as u64;
            let read = Op::Read {
                offset,
                buf,
                range: edge..edge + block,
            };
            st.to_push.push((read, key as u64));
            return;
        }
        for (at, bytes) in op.stash.drain(..) {
            buf[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        op.phase = WritePhase::Writing;
        let range = 0..buf.len();
        let write = Op::Write {
            offset: op.range.start(),
            buf,
            range,
            fua: op.fua,
        };
        st.to_push.push((write, key as u64));
    }

    /// Moves a zero/trim op forward; `result` is the outcome of its last ring op.
    fn advance_zero(&self, st: &mut State, key: usize, result: Option<Result<u32, i32>>) {
        let OpState::Zero(op) = &mut st.ops[key].state else {
            unreachable!()
        };
        match (op.phase, result) {
            (ZeroPhase::Locking, _) => op.phase = ZeroPhase::Working,
            (ZeroPhase::Syncing, Some(Ok(_))) => return self.finish(st, key, Ok(())),
            (ZeroPhase::Syncing, Some(Err(errno))) => return self.finish(st, key, Err(errno)),
            (ZeroPhase::Working, Some(Ok(written))) => match op.steps[0] {
                ZeroStep::Fallocate(calls) => {
                    op.call += 1;
                    if op.call == calls.len() {
                        return self.zero_done(st, key);
                    }
                }
                ZeroStep::Fill => {
                    op.fill_next += u64::from(written);
                    if op.fill_next >= op.range.end() {
                        return self.zero_done(st, key);
                    }
                }
            },
            (ZeroPhase::Working, Some(Err(errno))) => {
                let unsupported = errno == libc::EOPNOTSUPP || errno == libc::ENOSYS;
                if !(unsupported && matches!(op.steps[0], ZeroStep::Fallocate(_))) {
                    return self.finish(st, key, Err(errno));
                }
                // This strategy is not available here: try the next one.
                op.steps.remove(0);
                op.call = 0;
                if op.steps.is_empty() {
                    let outcome = if op.is_trim {
                        // TRIM is advisory (spec): leaving the data is a correct answer.
                        Ok(())
                    } else {
                        // Only reachable with FAST_ZERO (otherwise Fill is last):
                        // the spec's answer is ENOTSUP.
                        assert!(op.fast_zero);
                        Err(libc::EOPNOTSUPP)
                    };
                    return self.finish(st, key, outcome);
                }
            }
            (ZeroPhase::WaitingForZeroBuffer, None) => op.phase = ZeroPhase::Working,
            (phase, result) => panic!("zero op in {phase:?} got {result:?}"),
        }
        // Issue the current step.
        let OpState::Zero(op) = &mut st.ops[key].state else {
            unreachable!()
        };
        match op.steps[0] {
            ZeroStep::Fallocate(calls) => {
                let mode = calls[op.call];
                let fallocate = Op::Fallocate {
                    mode,
                    offset: op.range.start(),
                    len: op.range.length(),
                };
                st.to_push.push((fallocate, key as u64));
            }
            ZeroStep::Fill => {
                if !op.range.is_aligned(self.align_bytes) {
                    // O_DIRECT cannot write part of a block and this backing has no
                    // fallocate to zero it: refuse cleanly rather than corrupt.
                    return self.finish(st, key, Err(libc::EINVAL));
                }
                let Some(mut buf) = st.zero_buf.take() else {
                    op.phase = ZeroPhase::WaitingForZeroBuffer;
                    st.zero_waiters.push_back(key);
                    return;
                };
                let remaining = op.range.end() - op.fill_next;
                let chunk = remaining.min(ZERO_FILL_CHUNK_BYTES as u64) as usize;
                buf.set_len(chunk);
                let write = Op::Write {
                    offset: op.fill_next,
                    buf,
                    range: 0..chunk,
                    fua: false,
                };
                st.to_push.push((write, key as u64));
            }
        }
    }

    /// Zeroing finished: sync first when FUA was asked.
    fn zero_done(&self, st: &mut State, key: usize) {
        self.release_zero_buffer(st);
        let OpState::Zero(op) = &mut st.ops[key].state else {
            unreachable!()
        };
        if op.fua {
            op.phase = ZeroPhase::Syncing;
            st.to_push.push((Op::Fsync, key as u64));
        } else {
            self.finish(st, key, Ok(()));
        }
    }

    fn release_zero_buffer(&self, st: &mut State) {
        if st.zero_buf.is_some()
            && let Some(waiter) = st.zero_waiters.pop_front()
        {
            self.advance_zero(st, waiter, None);
        }
    }

    /// Completes a locked op: releases its range (starting whoever waited for it) and
    /// queues the reply.
    fn finish(&self, st: &mut State, key: usize, result: Result<(), i32>) {
        let pending = st.ops.remove(key);
        let mut granted = Vec::new();
        st.locks.release(key as u64, &mut granted);
        if let OpState::Zero(_) = pending.state {
            self.release_zero_buffer(st);
        }
        match result {
            Ok(()) => st.done.push((pending.sink, pending.tag, Ok(()), None)),
            Err(errno) => {
                warn!(cookie = pending.tag.cookie, errno, "write request failed");
                self.fail(st, pending.sink, pending.tag, errno);
            }
        }
        for waiter in granted {
            match st.ops[waiter as usize].state {
                OpState::Write(_) => self.advance_write(st, waiter as usize),
                OpState::Zero(_) => self.advance_zero(st, waiter as usize, None),
                _ => unreachable!("only modifying ops take range locks"),
            }
        }
    }
}

const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
/// Plain allocation (mode 0 with KEEP_SIZE): after a punch, leaves allocated zeroes.
const ALLOCATE: i32 = libc::FALLOC_FL_KEEP_SIZE;

const STEP_PUNCH: ZeroStep = ZeroStep::Fallocate(&[PUNCH]);
const STEP_ZERO_RANGE: ZeroStep = ZeroStep::Fallocate(&[ZERO_RANGE]);
const STEP_PUNCH_ALLOCATE: ZeroStep = ZeroStep::Fallocate(&[PUNCH, ALLOCATE]);

/// The strategies to zero a range, best first. Pure, so each chain is unit-tested.
///
/// - TRIM: punch a hole; if unsupported, nothing (TRIM is advisory).
/// - WRITE_ZEROES: punch (fast, deallocates), else zero-range, else write zeroes.
/// - with NO_HOLE: zero-range (stays allocated), else punch followed by allocate
///   (tmpfs has no zero-range), else write zeroes.
/// - FAST_ZERO: never write zeroes (the client asked us to fail instead). On a block
///   device zero-range may fall back to writing zeroes inside the kernel, so only punch
///   (which never falls back there) counts as fast; allocate is not supported there.
fn zero_steps(is_trim: bool, no_hole: bool, fast_zero: bool, block_device: bool) -> Vec<ZeroStep> {
    if is_trim {
        return vec![STEP_PUNCH];
    }
    let mut steps = match (no_hole, block_device) {
        (false, _) => vec![STEP_PUNCH, STEP_ZERO_RANGE],
        (true, false) => vec![STEP_ZERO_RANGE, STEP_PUNCH_ALLOCATE],
        (true, true) => vec![STEP_ZERO_RANGE],
    };
    if fast_zero {
        if block_device {
            steps = vec![STEP_PUNCH];
        }
    } else {
        steps.push(ZeroStep::Fill);
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use ZeroStep::Fill;

    #[test]
    fn trim_only_punches() {
        assert_eq!(zero_steps(true, false, false, false), vec![STEP_PUNCH]);
        assert_eq!(zero_steps(true, true, true, true), vec![STEP_PUNCH]);
    }

    #[test]
    fn write_zeroes_prefers_punch_then_zero_range_then_fill() {
        assert_eq!(
            zero_steps(false, false, false, false),
            vec![STEP_PUNCH, STEP_ZERO_RANGE, Fill]
        );
    }

    #[test]
    fn no_hole_avoids_leaving_a_hole() {
        assert_eq!(
            zero_steps(false, true, false, false),
            vec![STEP_ZERO_RANGE, STEP_PUNCH_ALLOCATE, Fill]
        );
        assert_eq!(
            zero_steps(false, true, false, true),
            vec![STEP_ZERO_RANGE, Fill]
        );
    }

    #[test]
    fn fast_zero_never_fills() {
        assert_eq!(
            zero_steps(false, false, true, false),
            vec![STEP_PUNCH, STEP_ZERO_RANGE]
        );
        assert_eq!(zero_steps(false, false, true, true), vec![STEP_PUNCH]);
        assert_eq!(zero_steps(false, true, true, true), vec![STEP_PUNCH]);
    }
}
