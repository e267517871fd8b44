//! The mirror export: runs the mirror engine for an NBD export. Client requests go into
//! the engine; its disk actions go to the local volume (data partition), its metadata
//! actions to an io_uring ring on the CLUSTER partition, its replies back to the
//! connections.
//!
//! Everything happens on the data-plane thread. Completions may arrive while the
//! engine's actions are being executed (a volume can complete a request inline), so
//! they are queued and fed to the engine by one draining loop, never re-entrantly.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

use rustc_hash::FxHashMap;
use std::rc::{Rc, Weak};
use std::time::Instant;

use tracing::error;

use crate::core::meta::{MetaIo, MetaIoId, MetaIoKind};
use crate::core::mirror::{Action, ClientOp, DataRef, DiskOp, DiskOpId, Engine, ReqId};
use crate::core::nbd::wire::Errno;
use crate::core::overlap::ByteRange;
use crate::shell::buffers::{Buf, BufferPool};
use crate::shell::disk::Backing;
use crate::shell::uring::{Completion, Op, Ring};
use crate::shell::volume::{
    Backend, BlockRequest, BufferLayout, IoSink, LocalVolume, ReadData, ReplyTag,
};

/// A client request the engine is working on.
#[derive(Debug)]
struct Pending {
    tag: ReplyTag,
    sink: Rc<dyn IoSink>,
    /// The request's buffer until its disk op takes it.
    buf: Option<Buf>,
    /// A read's data, from its disk op's completion until the reply.
    data: Option<ReadData>,
}

#[derive(Debug)]
enum Event {
    Disk {
        id: u64,
        result: Result<(), Errno>,
        data: Option<ReadData>,
    },
    Meta {
        id: u64,
        result: Result<(), i32>,
    },
}

/// See the module documentation.
#[derive(Debug)]
pub struct MirrorExport {
    me: Weak<MirrorExport>,
    volume: LocalVolume,
    meta_ring: RefCell<Ring>,
    /// Offset of the CLUSTER partition on the metadata device.
    meta_base: u64,
    engine: RefCell<Engine>,
    requests: RefCell<FxHashMap<ReqId, Pending>>,
    /// Disk op id -> the request whose buffer it uses.
    disk_ops: RefCell<FxHashMap<u64, Option<ReqId>>>,
    events: RefCell<VecDeque<Event>>,
    draining: Cell<bool>,
    started: Instant,
    meta_scratch: RefCell<Vec<Completion>>,
    /// A separate metadata device, kept open for as long as its ring uses it.
    _meta_device: Option<Backing>,
}

impl MirrorExport {
    pub fn new(
        volume: LocalVolume,
        meta_ring: Ring,
        meta_base: u64,
        engine: Engine,
        meta_device: Option<Backing>,
    ) -> Rc<MirrorExport> {
        Rc::new_cyclic(|me| MirrorExport {
            _meta_device: meta_device,
            me: me.clone(),
            volume,
            meta_ring: RefCell::new(meta_ring),
            meta_base,
            engine: RefCell::new(engine),
            requests: RefCell::new(FxHashMap::default()),
            disk_ops: RefCell::new(FxHashMap::default()),
            events: RefCell::new(VecDeque::new()),
            draining: Cell::new(false),
            started: Instant::now(),
            meta_scratch: RefCell::new(Vec::new()),
        })
    }

    pub fn volume(&self) -> &LocalVolume {
        &self.volume
    }

    pub fn meta_ring_fd(&self) -> std::os::fd::RawFd {
        self.meta_ring.borrow().fd()
    }

    /// Read access to the engine (status, stats).
    pub fn with_engine<T>(&self, f: impl FnOnce(&Engine) -> T) -> T {
        f(&self.engine.borrow())
    }

    /// A clean stop: see `Engine::shutdown`.
    pub fn begin_shutdown(&self) {
        self.engine.borrow_mut().shutdown();
        self.drain();
        self.flush_submissions();
    }

    /// No request and no metadata I/O in flight.
    pub fn idle(&self) -> bool {
        self.requests.borrow().is_empty()
            && self.disk_ops.borrow().is_empty()
            && self.meta_ring.borrow().in_flight() == 0
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Lets time pass for the engine (periodic sync points).
    pub fn tick(&self) {
        let now = self.now_ms();
        self.engine.borrow_mut().handle_timeout(now);
        self.drain();
        self.flush_submissions();
    }

    /// Runs everything the engine has queued, feeding back completions, until idle.
    pub fn drain(&self) {
        if self.draining.replace(true) {
            return;
        }
        loop {
            let event = self.events.borrow_mut().pop_front();
            if let Some(event) = event {
                self.feed(event);
                continue;
            }
            let action = self.engine.borrow_mut().poll_action();
            match action {
                Some(action) => self.execute(action),
                None => break,
            }
        }
        self.draining.set(false);
    }

    fn feed(&self, event: Event) {
        match event {
            Event::Disk { id, result, data } => {
                let req = self
                    .disk_ops
                    .borrow_mut()
                    .remove(&id)
                    .expect("completion of an issued disk op");
                if let (Some(req), Some(data)) = (req, data)
                    && let Some(pending) = self.requests.borrow_mut().get_mut(&req)
                {
                    pending.data = Some(data);
                }
                self.engine
                    .borrow_mut()
                    .handle_disk_done(DiskOpId(id), result);
            }
            Event::Meta { id, result } => {
                self.engine
                    .borrow_mut()
                    .handle_meta_done(MetaIoId(id), result);
                if let Some(reason) = self.engine.borrow().failure() {
                    error!(reason, "mirror disk failed");
                }
            }
        }
    }

    fn execute(&self, action: Action) {
        match action {
            Action::Disk { id, data, op } => {
                let req = match data {
                    None => None,
                    Some(DataRef::Request(req)) => Some(req),
                    Some(other) => unreachable!("serve has no peer, so no {other:?} data"),
                };
                self.execute_disk(id, req, op)
            }
            Action::Send { .. }
            | Action::DropLink { .. }
            | Action::Release(_)
            | Action::RoleChanged { .. }
            | Action::Digest { .. } => {
                unreachable!("serve has no peer and changes no roles: {action:?}")
            }
            Action::Meta(io) => self.execute_meta(io),
            Action::Reply { req, result } => {
                let pending = self
                    .requests
                    .borrow_mut()
                    .remove(&req)
                    .expect("reply to a known request");
                pending.sink.complete(pending.tag, result, pending.data);
            }
        }
    }

    fn take_buf(&self, req: Option<ReqId>) -> Buf {
        let req = req.expect("data ops belong to a request");
        self.requests
            .borrow_mut()
            .get_mut(&req)
            .and_then(|p| p.buf.take())
            .expect("the request's buffer is used by exactly one disk op")
    }

    fn execute_disk(&self, id: DiskOpId, req: Option<ReqId>, op: DiskOp) {
        let length = |range: ByteRange| range.length() as u32;
        let (request, is_read) = match op {
            ClientOp::Read { range } => {
                let buf = self.take_buf(req);
                (
                    BlockRequest::Read {
                        offset: range.start(),
                        length: length(range),
                        buf,
                    },
                    true,
                )
            }
            ClientOp::Write { range, fua } => {
                let buf = self.take_buf(req);
                (
                    BlockRequest::Write {
                        offset: range.start(),
                        length: length(range),
                        buf,
                        fua,
                    },
                    false,
                )
            }
            ClientOp::WriteZeroes {
                range,
                fua,
                no_hole,
                fast_zero,
            } => (
                BlockRequest::WriteZeroes {
                    offset: range.start(),
                    length: length(range),
                    fua,
                    no_hole,
                    fast_zero,
                },
                false,
            ),
            ClientOp::Trim { range, fua } => (
                BlockRequest::Trim {
                    offset: range.start(),
                    length: length(range),
                    fua,
                },
                false,
            ),
            ClientOp::Flush => (BlockRequest::Flush, false),
            ClientOp::Cache { range } => (
                BlockRequest::Cache {
                    offset: range.start(),
                    length: length(range),
                },
                false,
            ),
        };
        self.disk_ops.borrow_mut().insert(id.0, req);
        let sink: Rc<dyn IoSink> = self
            .me
            .upgrade()
            .expect("the export is alive while it runs");
        self.volume.submit(
            request,
            ReplyTag {
                cookie: id.0,
                is_read,
            },
            sink,
        );
    }

    fn execute_meta(&self, io: MetaIo) {
        let op = match io.kind {
            MetaIoKind::Write { offset, bytes } => {
                // Metadata writes are 4 KiB multiples at 4 KiB offsets: one aligned copy
                // satisfies O_DIRECT. Their size is bounded by the engine (a snapshot slot).
                let mut buf = Buf::new_unpooled(bytes.len());
                buf.copy_from_slice(&bytes);
                let range = 0..buf.len();
                Op::Write {
                    offset: self.meta_base + offset,
                    buf,
                    range,
                    fua: false,
                }
            }
            MetaIoKind::Flush => Op::Fsync,
        };
        self.meta_ring.borrow_mut().push(op, io.id.0);
    }

    /// Drains the metadata ring's completions into the engine.
    pub fn process_meta_completions(&self) -> bool {
        let mut completions = self.meta_scratch.take();
        self.meta_ring.borrow_mut().drain(&mut completions);
        let any = !completions.is_empty();
        for completion in completions.drain(..) {
            let result = completion.result.map(|_| ());
            self.events.borrow_mut().push_back(Event::Meta {
                id: completion.token,
                result,
            });
        }
        *self.meta_scratch.borrow_mut() = completions;
        if any {
            self.drain();
        }
        any
    }
}

impl IoSink for MirrorExport {
    fn complete(&self, tag: ReplyTag, result: Result<(), Errno>, data: Option<ReadData>) {
        self.events.borrow_mut().push_back(Event::Disk {
            id: tag.cookie,
            result,
            data,
        });
        self.drain();
    }
}

impl Backend for MirrorExport {
    fn layout(&self, offset: u64, length: u32) -> BufferLayout {
        self.volume.layout(offset, length)
    }

    fn pool(&self) -> &Rc<BufferPool> {
        self.volume.pool()
    }

    fn submit(&self, request: BlockRequest, tag: ReplyTag, sink: Rc<dyn IoSink>) {
        let range = |offset: u64, length: u32| {
            ByteRange::new(offset, u64::from(length)).expect("validated request")
        };
        let (op, buf) = match request {
            BlockRequest::Read {
                offset,
                length,
                buf,
            } => (
                ClientOp::Read {
                    range: range(offset, length),
                },
                Some(buf),
            ),
            BlockRequest::Write {
                offset,
                length,
                buf,
                fua,
            } => (
                ClientOp::Write {
                    range: range(offset, length),
                    fua,
                },
                Some(buf),
            ),
            BlockRequest::Flush => (ClientOp::Flush, None),
            BlockRequest::Trim {
                offset,
                length,
                fua,
            } => (
                ClientOp::Trim {
                    range: range(offset, length),
                    fua,
                },
                None,
            ),
            BlockRequest::WriteZeroes {
                offset,
                length,
                fua,
                no_hole,
                fast_zero,
            } => (
                ClientOp::WriteZeroes {
                    range: range(offset, length),
                    fua,
                    no_hole,
                    fast_zero,
                },
                None,
            ),
            BlockRequest::Cache { offset, length } => (
                ClientOp::Cache {
                    range: range(offset, length),
                },
                None,
            ),
        };
        let req = self.engine.borrow_mut().handle_client(op);
        self.requests.borrow_mut().insert(
            req,
            Pending {
                tag,
                sink,
                buf,
                data: None,
            },
        );
        self.drain();
    }

    /// Submits both rings, handling inline completions, until neither has new work
    /// (a metadata completion can admit data writes, a data completion can queue
    /// metadata writes).
    fn flush_submissions(&self) {
        loop {
            self.volume.flush_submissions();
            if let Err(error) = self.meta_ring.borrow_mut().submit() {
                panic!("io_uring submit failed on the metadata ring: {error}");
            }
            if !self.process_meta_completions() {
                break;
            }
        }
    }
}
