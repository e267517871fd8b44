//! Runs one mirror engine for the agent: the generalisation of `mirror_export` with a
//! peer. Client requests come from the NBD front end (`Backend`), peer messages from
//! the replication link, completions from three io_uring rings; the engine's actions go
//! back out:
//!
//! - `Disk` → the local volume (data partition). Buffers are found by `DataRef`: a
//!   client request's buffer, a payload received from the peer, or a fresh pooled
//!   buffer for a resync read (kept until its `Send` or `Release`). A client write that
//!   is also sent to the peer shares one buffer (`Rc<Buf>`) with the send; its aligned
//!   disk write goes through a second ring that accepts a shared buffer
//!   (`Op::WriteShared`), so the payload is never copied.
//! - `Meta` → the ring on the CLUSTER partition.
//! - `Send` → the current link's ordered outgoing queue; `DropLink` → close it.
//! - `Reply` → the NBD connection; `Release` → free; `RoleChanged` → the waiting
//!   activate/deactivate.
//!
//! Completions can arrive while actions are executed (a volume completes some requests
//! inline), so they are queued and fed by one draining loop: the engine is never
//! re-entered. Disk actions are collected during a drain pass and submitted when the
//! engine has nothing more to say, so that the `Send` of a write (which follows its
//! `Disk` action) has taken its reference to the buffer before the disk write decides
//! whether it owns the buffer alone.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

use rustc_hash::FxHashMap;
use std::ops::Range;
use std::rc::{Rc, Weak};

use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use crate::core::meta::{Flags, MetaIo, MetaIoId, MetaIoKind, Role};
use crate::core::mirror::engine::SplitBrainPolicy;
use crate::core::mirror::generations::{NodeView, Outcome};
use crate::core::mirror::{
    Action, ClientOp, DataRef, Decision, DiskOp, DiskOpId, Engine, EngineStatus, PeerDataId,
    PeerMsg, ReqId, ResyncBufId, decide,
};
use crate::core::nbd::wire::Errno;
use crate::core::overlap::ByteRange;
use crate::core::repl::wire::NodeState;
use crate::core::repl::{HANDSHAKE_TIMEOUT_MS_DEFAULT, HandshakeConfig, VersionRange};
use crate::shell::agent::frames::{data_header, encode_control};
use crate::shell::agent::peer_link::{LinkOut, OutFrame};
use crate::shell::agent::{Clock, random_u64};
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
    /// A write's payload or a read's destination, until its disk op takes it. Shared
    /// with the frame that sends the write to the peer.
    buf: Option<Rc<Buf>>,
    /// Where the payload sits in `buf` (unaligned requests use a wider buffer).
    data: Range<usize>,
    /// A read's data, from its disk op's completion to the reply.
    read: Option<ReadData>,
}

/// Whose buffer a disk op uses, to route its completion.
#[derive(Debug, Clone, Copy)]
enum Owner {
    Nothing,
    Request(ReqId),
    Resync(u64),
    /// A verify read: hashed per region on completion, reported with handle_digests.
    Digest {
        region_bytes: u32,
    },
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

/// Counters the shell adds to the engine's status.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct ShellStats {
    pub peer_buffers_held: u64,
    pub resync_buffers_held: u64,
    pub shared_writes: u64,
    pub copied_writes: u64,
    pub refused_inactive: u64,
}

/// What the generation rules decided at the last connect (or what the operator
/// started), for status and the log: why a copy runs, and whether it is full.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DecisionRecord {
    /// E.g. "rule 60 (history-peer): this node is behind: full copy from the peer".
    pub text: String,
    /// A copy follows and it is full (every region).
    pub full_copy: bool,
    /// Agent clock (ms) when it was decided.
    pub at_ms: u64,
    /// The generation rules found a split brain (resolved or not).
    #[serde(default)]
    pub split_brain: bool,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Executor {
    me: Weak<Executor>,
    mirror: String,
    volume: LocalVolume,
    /// Where the data partition starts on the data device (for shared writes, which
    /// bypass the volume).
    data_offset: u64,
    /// Writes whose buffer is shared with a send (see the module documentation).
    write_ring: RefCell<Ring>,
    meta_ring: RefCell<Ring>,
    engine: RefCell<Engine>,
    clock: Clock,
    requests: RefCell<FxHashMap<ReqId, Pending>>,
    disk_ops: RefCell<FxHashMap<u64, Owner>>,
    /// Disk actions of the current drain pass, submitted when the engine is quiet.
    deferred: RefCell<Vec<(DiskOpId, Option<DataRef>, DiskOp)>>,
    /// Payloads received from the peer, until a disk op takes them (or `Release`).
    peer_data: RefCell<FxHashMap<u64, Buf>>,
    next_peer_data: Cell<u64>,
    /// Resync reads' data, from the read's completion to its `Send` (or `Release`).
    resync_bufs: RefCell<FxHashMap<u64, ReadData>>,
    events: RefCell<VecDeque<Event>>,
    draining: Cell<bool>,
    /// The established replication connection the engine is linked to.
    link: RefCell<Option<Rc<LinkOut>>>,
    /// The activate/deactivate waiting for `RoleChanged`.
    role_waiter: RefCell<Option<oneshot::Sender<Result<(), String>>>>,
    /// Client I/O is accepted (the disk is active and the export open).
    serving: Cell<bool>,
    failure_logged: Cell<bool>,
    /// The last connect decision (see [`DecisionRecord`]).
    decision: RefCell<Option<DecisionRecord>>,
    /// The policy the engine was given (to explain a split brain resolved by it).
    split_brain_policy: Cell<SplitBrainPolicy>,
    stats: Cell<ShellStats>,
    scratch: RefCell<Vec<Completion>>,
    /// A separate metadata device, kept open for as long as its ring uses it.
    _meta_device: Option<Backing>,
}

impl Executor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mirror: String,
        volume: LocalVolume,
        data_offset: u64,
        write_ring: Ring,
        meta_ring: Ring,
        engine: Engine,
        clock: Clock,
        meta_device: Option<Backing>,
    ) -> Rc<Executor> {
        Rc::new_cyclic(|me| Executor {
            me: me.clone(),
            mirror,
            volume,
            data_offset,
            write_ring: RefCell::new(write_ring),
            meta_ring: RefCell::new(meta_ring),
            engine: RefCell::new(engine),
            clock,
            requests: RefCell::new(FxHashMap::default()),
            disk_ops: RefCell::new(FxHashMap::default()),
            deferred: RefCell::new(Vec::new()),
            peer_data: RefCell::new(FxHashMap::default()),
            next_peer_data: Cell::new(0),
            resync_bufs: RefCell::new(FxHashMap::default()),
            events: RefCell::new(VecDeque::new()),
            draining: Cell::new(false),
            link: RefCell::new(None),
            role_waiter: RefCell::new(None),
            serving: Cell::new(false),
            failure_logged: Cell::new(false),
            decision: RefCell::new(None),
            split_brain_policy: Cell::new(SplitBrainPolicy::Disconnect),
            stats: Cell::new(ShellStats::default()),
            scratch: RefCell::new(Vec::new()),
            _meta_device: meta_device,
        })
    }

    pub fn volume(&self) -> &LocalVolume {
        &self.volume
    }

    pub fn ring_fds(&self) -> [std::os::fd::RawFd; 3] {
        [
            self.volume.ring_fd(),
            self.write_ring.borrow().fd(),
            self.meta_ring.borrow().fd(),
        ]
    }

    /// Read access to the engine (status, role, state).
    pub fn with_engine<T>(&self, f: impl FnOnce(&Engine) -> T) -> T {
        f(&self.engine.borrow())
    }

    /// The engine's status, with one addition: when both nodes are active the engine
    /// refuses the connection before it looks at the generations, but if they have
    /// diverged (the rules, run on the same inputs at link-up, said split brain) that
    /// refusal is a split brain and the problem says so — the split-brain watch reports
    /// it (log, hook) like any other.
    pub fn status(&self) -> EngineStatus {
        let mut status = self.engine.borrow().status();
        status.problem = self.explain_problem(&status);
        status
    }

    fn explain_problem(&self, status: &EngineStatus) -> Option<String> {
        let problem = status.problem.clone()?;
        let both_active = status.link.is_none()
            && status.role == Role::Primary
            && status
                .peer
                .as_ref()
                .is_some_and(|p| p.role == Role::Primary);
        let decision = self.decision.borrow();
        match decision.as_ref() {
            Some(d) if both_active && d.split_brain && !problem.starts_with("split brain") => {
                Some(format!(
                    "split brain: {}; both nodes are active (Primary), so the connection is refused: \
                     deactivate the node whose changes are to be dropped and run \
                     `mirrorctl resolve {} --discard-local` there",
                    d.text, self.mirror
                ))
            }
            _ => Some(problem),
        }
    }

    pub fn shell_stats(&self) -> ShellStats {
        ShellStats {
            peer_buffers_held: self.peer_data.borrow().len() as u64,
            resync_buffers_held: self.resync_bufs.borrow().len() as u64,
            ..self.stats.get()
        }
    }

    fn bump(&self, f: impl FnOnce(&mut ShellStats)) {
        let mut stats = self.stats.get();
        f(&mut stats);
        self.stats.set(stats);
    }

    /// No client request, disk op or metadata I/O in flight.
    pub fn idle(&self) -> bool {
        self.requests.borrow().is_empty()
            && self.disk_ops.borrow().is_empty()
            && self.deferred.borrow().is_empty()
            && self.meta_ring.borrow().in_flight() == 0
            && self.write_ring.borrow().in_flight() == 0
            && self.volume.in_flight() == 0
    }

    pub fn requests_in_flight(&self) -> usize {
        self.requests.borrow().len()
    }

    pub fn set_serving(&self, serving: bool) {
        self.serving.set(serving);
    }

    pub fn is_serving(&self) -> bool {
        self.serving.get()
    }

    /// Lets time pass for the engine: sync points, peer timeouts, resync pacing.
    pub fn tick(&self) {
        let now = self.clock.now_ms();
        self.engine.borrow_mut().handle_timeout(now);
        self.drain();
        self.flush_submissions();
    }

    // ------------------------------------------------------------------------------
    // The replication link.
    // ------------------------------------------------------------------------------

    /// What this node says in a handshake: its identity, sizes, epoch proposal and
    /// current state.
    pub fn handshake_config(
        &self,
        node_id: u32,
        peer_node_id: u32,
    ) -> (HandshakeConfig, NodeState) {
        let engine = self.engine.borrow();
        let superblock = engine.meta().superblock();
        let layout = engine.meta().layout();
        let config = HandshakeConfig {
            versions: VersionRange::SUPPORTED,
            mirror_uuid: superblock.identity.mirror_uuid,
            node_id,
            peer_node_id,
            data_bytes: layout.data_bytes,
            logical_block_bytes: layout.logical_block_bytes,
            granularity_bytes: layout.granularity_bytes,
            epoch_proposal: engine.next_epoch_proposal(),
            timeout_ms: HANDSHAKE_TIMEOUT_MS_DEFAULT,
        };
        (config, engine.node_state())
    }

    /// The connection the engine is linked to, if any.
    pub fn link(&self) -> Option<Rc<LinkOut>> {
        self.link.borrow().clone()
    }

    /// Sets the engine's after-split-brain policy (from the configuration).
    pub fn set_split_brain_policy(&self, policy: SplitBrainPolicy) {
        self.split_brain_policy.set(policy);
        self.engine.borrow_mut().set_split_brain_policy(policy);
    }

    /// The last connect decision, if any.
    pub fn decision(&self) -> Option<DecisionRecord> {
        self.decision.borrow().clone()
    }

    /// What the generation rules decide for this node and `peer` now: the same pure
    /// function on the same inputs as the engine's connect (`Engine::handle_link_up`),
    /// computed here for the log and status (the engine does not report it).
    fn decide_with(&self, peer: &NodeState) -> (Decision, String, bool) {
        let engine = self.engine.borrow();
        let sb = engine.meta().superblock();
        let local = NodeView {
            node_id: sb.identity.node_id,
            generations: sb.state.generations,
            flags: sb.state.flags,
            role: sb.state.role,
            dirty: !engine.meta().dirty_bitmap().is_empty(),
        };
        let remote = NodeView {
            node_id: sb.identity.peer_node_id,
            generations: peer.generations,
            flags: peer.flags,
            role: peer.role,
            dirty: peer.dirty_bytes > 0,
        };
        let decision = decide(&local, &remote);
        let mut text = decision.to_string();
        let mut resolved = false;
        if matches!(decision.outcome, Outcome::SplitBrain { .. }) {
            let ours = local.flags.contains(Flags::DISCARD_LOCAL);
            let theirs = remote.flags.contains(Flags::DISCARD_LOCAL);
            let zero = self.split_brain_policy.get() == SplitBrainPolicy::DiscardZeroChanges;
            resolved = true;
            match (ours, theirs) {
                (true, false) => text.push_str("; resolved: this node discards its changes (resolve --discard-local)"),
                (false, true) => text.push_str("; resolved: the peer discards its changes (resolve --discard-local)"),
                (false, false) if zero && local.dirty != remote.dirty => text.push_str(
                    "; after_split_brain = discard-zero-changes: the side without changes is overwritten",
                ),
                _ => resolved = false,
            }
        }
        (decision, text, resolved)
    }

    /// Records (and logs, when it changed) a connect decision. `resolved`: a split
    /// brain the resolution or the policy turns into a copy.
    fn record_decision(&self, decision: Decision, text: String, resolved: bool) {
        let full_copy = decision.resync().is_some_and(|r| r.full)
            || matches!(decision.outcome, Outcome::SplitBrain { resolve_full: true }) && resolved;
        let record = DecisionRecord {
            text,
            full_copy,
            at_ms: self.clock.now_ms(),
            split_brain: matches!(decision.outcome, Outcome::SplitBrain { .. }),
        };
        let changed = self
            .decision
            .borrow()
            .as_ref()
            .is_none_or(|d| d.text != record.text);
        if changed {
            if full_copy {
                warn!(
                    mirror = self.mirror,
                    decision = record.text,
                    "connect decision: FULL copy"
                );
            } else {
                info!(
                    mirror = self.mirror,
                    decision = record.text,
                    "connect decision"
                );
            }
        }
        self.decision.replace(Some(record));
    }

    /// A handshake completed and this connection won: the engine takes it over. `sent`
    /// is the State we sent in the handshake (what the peer decides from), `peer` the
    /// peer's.
    pub fn link_up(&self, link: Rc<LinkOut>, sent: NodeState, peer: NodeState) {
        let previous = self.link.replace(Some(link.clone()));
        assert!(previous.is_none(), "link up while another link is up");
        let (decision, text, resolved) = self.decide_with(&peer);
        self.record_decision(decision, text, resolved);
        self.engine
            .borrow_mut()
            .handle_link_up_from(link.epoch(), sent, peer);
        self.drain();
        self.flush_submissions();
    }

    /// The connection `conn_id` is gone. Returns false if the engine was not linked to
    /// it (a connection that lost the tie-break, or one already replaced).
    pub fn link_down(&self, conn_id: u64) -> bool {
        let current = self.link.borrow().as_ref().map(|l| l.conn_id());
        if current != Some(conn_id) {
            return false;
        }
        self.link.replace(None);
        self.engine.borrow_mut().handle_link_down(random_u64());
        self.drain();
        self.flush_submissions();
        true
    }

    /// A message from the peer on connection `conn_id`, with the payload of a Write or
    /// ResyncData. Dropped (false) when the engine is no longer linked to that
    /// connection. Submissions are batched: call `flush_submissions` before waiting.
    pub fn peer_message(&self, conn_id: u64, msg: PeerMsg, data: Option<Buf>) -> bool {
        let current = self.link.borrow().as_ref().map(|l| l.conn_id());
        if current != Some(conn_id) {
            return false;
        }
        let data_id = data.map(|buf| {
            let id = self.next_peer_data.get();
            self.next_peer_data.set(id + 1);
            self.peer_data.borrow_mut().insert(id, buf);
            PeerDataId(id)
        });
        // A State that ends a wait for the operator (the peer chose itself as the
        // source of a full copy) makes the engine decide again, on these inputs.
        let redecision = match &msg {
            PeerMsg::State(state)
                if self.link_state().as_deref() == Some("waiting-for-operator") =>
            {
                Some(self.decide_with(state))
            }
            _ => None,
        };
        self.engine.borrow_mut().handle_peer(msg, data_id);
        if let Some((decision, text, resolved)) = redecision
            && self.link_state().as_deref() != Some("waiting-for-operator")
        {
            self.record_decision(decision, text, resolved);
        }
        self.drain();
        true
    }

    // ------------------------------------------------------------------------------
    // Operator commands.
    // ------------------------------------------------------------------------------

    /// Starts making the disk active. `Ok(None)`: it already is. `Ok(Some(rx))`: the
    /// outcome arrives on `rx` once the new role is durable.
    pub fn activate(
        &self,
        forced: bool,
    ) -> Result<Option<oneshot::Receiver<Result<(), String>>>, String> {
        if self.engine.borrow().role() == Role::Primary {
            return Ok(None);
        }
        let (tx, rx) = oneshot::channel();
        self.role_waiter.replace(Some(tx));
        let result = self.engine.borrow_mut().activate(forced, random_u64());
        if let Err(error) = result {
            self.role_waiter.replace(None);
            return Err(error);
        }
        self.drain();
        self.flush_submissions();
        Ok(Some(rx))
    }

    /// Starts making the disk inactive (no client request may be in flight). Same
    /// answers as [`Executor::activate`].
    pub fn deactivate(&self) -> Result<Option<oneshot::Receiver<Result<(), String>>>, String> {
        if self.engine.borrow().role() == Role::Secondary {
            return Ok(None);
        }
        let (tx, rx) = oneshot::channel();
        self.role_waiter.replace(Some(tx));
        let result = self.engine.borrow_mut().deactivate();
        if let Err(error) = result {
            self.role_waiter.replace(None);
            return Err(error);
        }
        self.drain();
        self.flush_submissions();
        Ok(Some(rx))
    }

    /// A clean stop (client I/O stopped, link closed): final sync point, then the
    /// activity log is cooled (see `Engine::shutdown`).
    pub fn begin_shutdown(&self) {
        self.engine.borrow_mut().shutdown();
        self.drain();
        self.flush_submissions();
    }

    pub fn shutdown_complete(&self) -> bool {
        self.engine.borrow().shutdown_complete()
    }

    /// The engine's connection state (connecting, connected, sync-source,
    /// sync-target, waiting-for-operator, disconnecting), `None` without a connection.
    pub fn link_state(&self) -> Option<String> {
        self.engine
            .borrow()
            .status()
            .link
            .map(|l| l.state.to_string())
    }

    /// `rebuild --full --from <this node>`.
    pub fn start_full_sync(&self) -> Result<(), String> {
        let result = self.engine.borrow_mut().start_full_sync(random_u64());
        if result.is_ok() {
            self.decision.replace(Some(DecisionRecord {
                text: "operator: full copy from this node (mirrorctl rebuild --full --from)".into(),
                full_copy: true,
                at_ms: self.clock.now_ms(),
                split_brain: false,
            }));
        }
        self.drain();
        self.flush_submissions();
        result
    }

    /// `rebuild` while connected: copy what is dirty now (e.g. after a verify).
    pub fn start_differential_rebuild(&self) -> Result<(), String> {
        let result = self.engine.borrow_mut().start_differential_rebuild();
        if result.is_ok() {
            self.decision.replace(Some(DecisionRecord {
                text: "operator: differential copy of the dirty regions from this node (mirrorctl rebuild)".into(),
                full_copy: false,
                at_ms: self.clock.now_ms(),
                split_brain: false,
            }));
        }
        self.drain();
        self.flush_submissions();
        result
    }

    /// `resolve --discard-local`: persisted; applied at the next connect.
    pub fn resolve_discard_local(&self) -> Result<(), String> {
        let result = self.engine.borrow_mut().resolve_discard_local();
        self.drain();
        self.flush_submissions();
        result
    }

    /// `verify`: compare both sides by per-region hashes.
    pub fn start_verify(&self) -> Result<(), String> {
        let result = self.engine.borrow_mut().start_verify();
        self.drain();
        self.flush_submissions();
        result
    }

    /// `rebuild --pause | --resume`.
    pub fn set_resync_paused(&self, paused: bool) -> Result<(), String> {
        let result = self.engine.borrow_mut().set_resync_paused(paused);
        self.drain();
        self.flush_submissions();
        result
    }

    // ------------------------------------------------------------------------------
    // The draining loop.
    // ------------------------------------------------------------------------------

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
            if let Some(action) = action {
                self.execute(action);
                continue;
            }
            let deferred = std::mem::take(&mut *self.deferred.borrow_mut());
            if deferred.is_empty() {
                break;
            }
            for (id, data, op) in deferred {
                self.execute_disk(id, data, op);
            }
        }
        self.draining.set(false);
    }

    fn feed(&self, event: Event) {
        match event {
            Event::Disk { id, result, data } => {
                let owner = self
                    .disk_ops
                    .borrow_mut()
                    .remove(&id)
                    .expect("completion of an issued disk op");
                match (owner, data) {
                    (Owner::Request(req), Some(data)) => {
                        if let Some(pending) = self.requests.borrow_mut().get_mut(&req) {
                            pending.read = Some(data);
                        }
                    }
                    (Owner::Resync(key), Some(data)) => {
                        self.resync_bufs.borrow_mut().insert(key, data);
                    }
                    (Owner::Digest { region_bytes }, data) => {
                        let digests = result.map(|()| {
                            let bytes = data
                                .as_ref()
                                .expect("a successful read has data")
                                .as_slice();
                            region_digests(bytes, region_bytes as usize)
                        });
                        self.engine
                            .borrow_mut()
                            .handle_digests(DiskOpId(id), digests);
                        return;
                    }
                    _ => {}
                }
                self.engine
                    .borrow_mut()
                    .handle_disk_done(DiskOpId(id), result);
            }
            Event::Meta { id, result } => {
                self.engine
                    .borrow_mut()
                    .handle_meta_done(MetaIoId(id), result);
            }
        }
        if !self.failure_logged.get()
            && let Some(reason) = self.engine.borrow().failure()
        {
            self.failure_logged.set(true);
            error!(mirror = self.mirror, reason, "mirror disk failed");
        }
    }

    fn execute(&self, action: Action) {
        match action {
            Action::Disk { id, data, op } => self.deferred.borrow_mut().push((id, data, op)),
            Action::Meta(io) => self.execute_meta(io),
            Action::Reply { req, result } => {
                let pending = self
                    .requests
                    .borrow_mut()
                    .remove(&req)
                    .expect("reply to a known request");
                pending.sink.complete(pending.tag, result, pending.read);
            }
            Action::Send { msg, data } => self.send(msg, data),
            Action::Digest {
                id,
                range,
                region_bytes,
            } => {
                let length = range.length() as u32;
                let layout = self.volume.layout(range.start(), length);
                let request = BlockRequest::Read {
                    offset: range.start(),
                    length,
                    buf: self.get_buf(layout.buf_bytes),
                };
                self.disk_ops
                    .borrow_mut()
                    .insert(id.0, Owner::Digest { region_bytes });
                let sink: Rc<dyn IoSink> = self.me.upgrade().expect("the executor is alive");
                self.volume.submit(
                    request,
                    ReplyTag {
                        cookie: id.0,
                        is_read: true,
                    },
                    sink,
                );
            }
            Action::DropLink { reason } => {
                if let Some(link) = self.link.borrow().as_ref() {
                    info!(
                        mirror = self.mirror,
                        reason, "engine drops the replication link"
                    );
                    link.request_close(reason);
                }
            }
            Action::Release(DataRef::Resync(ResyncBufId(key))) => {
                self.resync_bufs.borrow_mut().remove(&key);
            }
            Action::Release(DataRef::Peer(PeerDataId(id))) => {
                // Usually already taken by its disk op; dropped here if it never was.
                self.peer_data.borrow_mut().remove(&id);
            }
            Action::Release(DataRef::Request(req)) => {
                debug!(
                    mirror = self.mirror,
                    ?req,
                    "release of a request buffer ignored"
                );
            }
            Action::RoleChanged { result } => match self.role_waiter.take() {
                Some(waiter) => {
                    let _ = waiter.send(result);
                }
                None => info!(mirror = self.mirror, ?result, "role changed"),
            },
        }
    }

    /// Queues a message on the link. Without a link (it just went away) the message
    /// is dropped, as the connection it was meant for is.
    fn send(&self, msg: PeerMsg, data: Option<DataRef>) {
        let link = self.link.borrow().clone();
        let frame = match data {
            None => {
                let Some(link) = &link else { return };
                let mut bytes = Vec::with_capacity(64);
                encode_control(&msg, link.epoch(), &mut bytes);
                OutFrame::Bytes(bytes)
            }
            Some(DataRef::Request(req)) => {
                let Some(link) = &link else { return };
                let requests = self.requests.borrow();
                let pending = requests.get(&req).expect("a sent write is in flight");
                let buf = pending
                    .buf
                    .clone()
                    .expect("a write's buffer is sent before its disk op takes it");
                let header = data_header(&msg, link.epoch(), &buf[pending.data.clone()]);
                OutFrame::Shared {
                    header,
                    buf,
                    range: pending.data.clone(),
                }
            }
            Some(DataRef::Resync(ResyncBufId(key))) => {
                let data = self
                    .resync_bufs
                    .borrow_mut()
                    .remove(&key)
                    .expect("resync data is sent after its read");
                let Some(link) = &link else { return };
                let header = data_header(&msg, link.epoch(), data.as_slice());
                OutFrame::Read { header, data }
            }
            Some(DataRef::Peer(id)) => unreachable!("peer data {id:?} is never sent back"),
        };
        if let Some(link) = link {
            link.push(frame);
        }
    }

    fn execute_disk(&self, id: DiskOpId, data: Option<DataRef>, op: DiskOp) {
        let length = |range: ByteRange| range.length() as u32;
        let mut owner = Owner::Nothing;
        let request = match (op, data) {
            (ClientOp::Read { range }, Some(DataRef::Request(req))) => {
                owner = Owner::Request(req);
                let buf = self.take_request_buf(req);
                let buf = Rc::try_unwrap(buf).expect("a read's buffer is never shared");
                BlockRequest::Read {
                    offset: range.start(),
                    length: length(range),
                    buf,
                }
            }
            (ClientOp::Read { range }, Some(DataRef::Resync(ResyncBufId(key)))) => {
                owner = Owner::Resync(key);
                let layout = self.volume.layout(range.start(), length(range));
                BlockRequest::Read {
                    offset: range.start(),
                    length: length(range),
                    buf: self.get_buf(layout.buf_bytes),
                }
            }
            (ClientOp::Write { range, fua }, Some(DataRef::Request(req))) => {
                let buf = self.take_request_buf(req);
                match Rc::try_unwrap(buf) {
                    Ok(buf) => BlockRequest::Write {
                        offset: range.start(),
                        length: length(range),
                        buf,
                        fua,
                    },
                    Err(shared) => match self.write_shared(id, range, fua, shared) {
                        None => return,
                        Some(request) => request,
                    },
                }
            }
            (ClientOp::Write { range, fua }, Some(DataRef::Peer(PeerDataId(pid)))) => {
                let buf = self
                    .peer_data
                    .borrow_mut()
                    .remove(&pid)
                    .expect("a peer payload is written once");
                BlockRequest::Write {
                    offset: range.start(),
                    length: length(range),
                    buf,
                    fua,
                }
            }
            (
                ClientOp::WriteZeroes {
                    range,
                    fua,
                    no_hole,
                    fast_zero,
                },
                None,
            ) => BlockRequest::WriteZeroes {
                offset: range.start(),
                length: length(range),
                fua,
                no_hole,
                fast_zero,
            },
            (ClientOp::Trim { range, fua }, None) => BlockRequest::Trim {
                offset: range.start(),
                length: length(range),
                fua,
            },
            (ClientOp::Flush, None) => BlockRequest::Flush,
            (ClientOp::Cache { range }, None) => BlockRequest::Cache {
                offset: range.start(),
                length: length(range),
            },
            (op, data) => unreachable!("disk op {op:?} with data {data:?}"),
        };
        let is_read = matches!(request, BlockRequest::Read { .. });
        self.disk_ops.borrow_mut().insert(id.0, owner);
        let sink: Rc<dyn IoSink> = self.me.upgrade().expect("the executor is alive");
        self.volume.submit(
            request,
            ReplyTag {
                cookie: id.0,
                is_read,
            },
            sink,
        );
    }

    /// A client write whose buffer is also being sent. An aligned one is written from
    /// the shared buffer through the shared-write ring (returns `None`); an unaligned
    /// one needs a read-modify-write, which mutates its buffer, so the volume gets a
    /// private copy.
    fn write_shared(
        &self,
        id: DiskOpId,
        range: ByteRange,
        fua: bool,
        shared: Rc<Buf>,
    ) -> Option<BlockRequest> {
        let layout = self.volume.layout(range.start(), range.length() as u32);
        let exact = layout
            == BufferLayout {
                buf_bytes: range.length() as usize,
                data_start: 0,
            };
        if exact && shared.len() == layout.buf_bytes {
            self.bump(|s| s.shared_writes += 1);
            self.disk_ops.borrow_mut().insert(id.0, Owner::Nothing);
            let len = shared.len();
            self.write_ring.borrow_mut().push(
                Op::WriteShared {
                    offset: self.data_offset + range.start(),
                    buf: shared,
                    range: 0..len,
                    fua,
                },
                id.0,
            );
            return None;
        }
        self.bump(|s| s.copied_writes += 1);
        let mut buf = self.get_buf(shared.len());
        buf.copy_from_slice(&shared);
        Some(BlockRequest::Write {
            offset: range.start(),
            length: range.length() as u32,
            buf,
            fua,
        })
    }

    fn take_request_buf(&self, req: ReqId) -> Rc<Buf> {
        self.requests
            .borrow_mut()
            .get_mut(&req)
            .and_then(|p| p.buf.take())
            .expect("a request's buffer is used by exactly one disk op")
    }

    /// A buffer for an engine-initiated read or a private copy. The engine bounds how
    /// many of these are in flight (resync window), so when the pool is exhausted by
    /// client requests an unpooled buffer is used rather than stalling the engine.
    fn get_buf(&self, bytes: usize) -> Buf {
        match self.volume.pool().try_get(bytes) {
            Some(buf) => buf,
            None => Buf::new_unpooled(bytes),
        }
    }

    fn execute_meta(&self, io: MetaIo) {
        let op = match io.kind {
            MetaIoKind::Write { offset, bytes } => {
                // 4 KiB multiples at 4 KiB offsets: one aligned copy satisfies O_DIRECT.
                let mut buf = Buf::new_unpooled(bytes.len());
                buf.copy_from_slice(&bytes);
                let range = 0..buf.len();
                Op::Write {
                    offset,
                    buf,
                    range,
                    fua: false,
                }
            }
            MetaIoKind::Flush => Op::Fsync,
        };
        self.meta_ring.borrow_mut().push(op, io.id.0);
    }

    // ------------------------------------------------------------------------------
    // Rings.
    // ------------------------------------------------------------------------------

    /// Drains the metadata ring's completions into the engine.
    pub fn process_meta_completions(&self) -> bool {
        let mut completions = self.scratch.take();
        self.meta_ring.borrow_mut().drain(&mut completions);
        let any = !completions.is_empty();
        for completion in completions.drain(..) {
            self.events.borrow_mut().push_back(Event::Meta {
                id: completion.token,
                result: completion.result.map(|_| ()),
            });
        }
        *self.scratch.borrow_mut() = completions;
        if any {
            self.drain();
        }
        any
    }

    /// Drains the shared-write ring's completions into the engine.
    pub fn process_write_completions(&self) -> bool {
        let mut completions = self.scratch.take();
        self.write_ring.borrow_mut().drain(&mut completions);
        let any = !completions.is_empty();
        for completion in completions.drain(..) {
            let result = completion.result.map(|_| ()).map_err(Errno::from_os);
            if let Err(errno) = result {
                warn!(mirror = self.mirror, ?errno, "shared-buffer write failed");
            }
            self.events.borrow_mut().push_back(Event::Disk {
                id: completion.token,
                result,
                data: None,
            });
        }
        *self.scratch.borrow_mut() = completions;
        if any {
            self.drain();
        }
        any
    }

    /// Submits all three rings, handling inline completions, until none has new work
    /// (a completion on one ring can queue work on another).
    pub fn flush_submissions(&self) {
        loop {
            self.volume.flush_submissions();
            if let Err(error) = self.write_ring.borrow_mut().submit() {
                panic!("io_uring submit failed on the shared-write ring: {error}");
            }
            if let Err(error) = self.meta_ring.borrow_mut().submit() {
                panic!("io_uring submit failed on the metadata ring: {error}");
            }
            let meta = self.process_meta_completions();
            let writes = self.process_write_completions();
            if !meta && !writes {
                break;
            }
        }
    }
}

impl IoSink for Executor {
    fn complete(&self, tag: ReplyTag, result: Result<(), Errno>, data: Option<ReadData>) {
        self.events.borrow_mut().push_back(Event::Disk {
            id: tag.cookie,
            result,
            data,
        });
        self.drain();
    }
}

impl Backend for Executor {
    fn layout(&self, offset: u64, length: u32) -> BufferLayout {
        self.volume.layout(offset, length)
    }

    fn pool(&self) -> &Rc<BufferPool> {
        self.volume.pool()
    }

    fn submit(&self, request: BlockRequest, tag: ReplyTag, sink: Rc<dyn IoSink>) {
        if !self.serving.get() {
            // The export is being stopped or was never started here: "not ready".
            self.bump(|s| s.refused_inactive += 1);
            sink.complete(tag, Err(Errno::Shutdown), None);
            return;
        }
        let range = |offset: u64, length: u32| {
            ByteRange::new(offset, u64::from(length)).expect("validated request")
        };
        let with_buf = |offset: u64, length: u32, buf: Buf| {
            let layout = self.volume.layout(offset, length);
            let data = layout.data_start..layout.data_start + length as usize;
            (Some(Rc::new(buf)), data)
        };
        let ((buf, data), op) = match request {
            BlockRequest::Read {
                offset,
                length,
                buf,
            } => (
                with_buf(offset, length, buf),
                ClientOp::Read {
                    range: range(offset, length),
                },
            ),
            BlockRequest::Write {
                offset,
                length,
                buf,
                fua,
            } => (
                with_buf(offset, length, buf),
                ClientOp::Write {
                    range: range(offset, length),
                    fua,
                },
            ),
            BlockRequest::Flush => ((None, 0..0), ClientOp::Flush),
            BlockRequest::Trim {
                offset,
                length,
                fua,
            } => (
                (None, 0..0),
                ClientOp::Trim {
                    range: range(offset, length),
                    fua,
                },
            ),
            BlockRequest::WriteZeroes {
                offset,
                length,
                fua,
                no_hole,
                fast_zero,
            } => (
                (None, 0..0),
                ClientOp::WriteZeroes {
                    range: range(offset, length),
                    fua,
                    no_hole,
                    fast_zero,
                },
            ),
            BlockRequest::Cache { offset, length } => (
                (None, 0..0),
                ClientOp::Cache {
                    range: range(offset, length),
                },
            ),
        };
        let req = self.engine.borrow_mut().handle_client(op);
        self.requests.borrow_mut().insert(
            req,
            Pending {
                tag,
                sink,
                buf,
                data,
                read: None,
            },
        );
        self.drain();
    }

    fn flush_submissions(&self) {
        Executor::flush_submissions(self);
    }
}

/// One SHA-256 digest per `region_bytes` of `data` (the last region may be short):
/// what online verify compares between the nodes.
fn region_digests(data: &[u8], region_bytes: usize) -> Vec<[u8; 32]> {
    use sha2::{Digest, Sha256};
    data.chunks(region_bytes)
        .map(|region| Sha256::digest(region).into())
        .collect()
}
