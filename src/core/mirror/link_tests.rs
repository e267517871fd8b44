//! Tests of the connection life cycle with two engines wired back to back: what a node
//! may acknowledge while its link is being dropped, forced activation while a connection
//! exists, the state both nodes decide from at a connect, who may apply resync data, and
//! the operator's commands while connected. Each test is a fixed sequence that broke a
//! data-safety rule (DESIGN §4–§5) before its fix.

use std::collections::{BTreeSet, VecDeque};

use super::engine::{Engine, EngineConfig};
use super::types::*;
use crate::core::meta::{CreateParams, DiskState, Flags, MetaEngine, MetaIo, Role};
use crate::core::nbd::wire::Errno;
use crate::core::overlap::ByteRange;
use crate::core::repl::wire::NodeState;

const MIB: u64 = 1 << 20;
/// The bitmap granularity (the default).
const REGION: u64 = 4096;
const PEER_TIMEOUT_MS: u64 = 10_000;
/// The engines' clock at the start (not 0: nothing should read "at time 0" as recent).
const START_MS: u64 = 1_000_000;

/// One node: metadata I/O completes at once; disk ops and digests wait until
/// `Pair::settle` completes them (or a test does), so a test controls what is in flight.
struct Node {
    id: u8,
    engine: Engine,
    disk: Vec<(DiskOpId, DiskOp)>,
    digests: Vec<(DiskOpId, ByteRange, u32)>,
    /// Sent on the current connection, not yet delivered.
    outbox: VecDeque<PeerMsg>,
    replies: Vec<(ReqId, Result<(), Errno>)>,
    role_changes: Vec<Result<(), String>>,
    dropped: Vec<String>,
    next_data: u64,
    /// `settle` leaves this node's disk ops in flight.
    hold_disk: bool,
    /// `settle` does not deliver what this node sends (a stalled direction).
    hold_sends: bool,
    /// Data writes on this node's disk fail with EIO.
    fail_writes: bool,
    /// Regions whose content here differs from the other node's (verify digests).
    differs: BTreeSet<u64>,
    /// Metadata I/O waits in `meta` instead of completing at once.
    hold_meta: bool,
    meta: Vec<MetaIo>,
}

impl Node {
    fn new(node_id: u32, peer_id: u32) -> Node {
        let mut params = CreateParams::new([9; 16], "t", node_id, peer_id, 64 * MIB);
        params.al_slot_count = 16;
        let (meta, _) = MetaEngine::create(&params).expect("valid params");
        let config = EngineConfig {
            lock_alignment_bytes: 4096,
            sync_interval_ms: 1000,
            peer_timeout_ms: PEER_TIMEOUT_MS,
            resync_rate_bytes_per_s: 0,
        };
        Node {
            id: node_id as u8,
            engine: Engine::new(config, meta, START_MS),
            disk: Vec::new(),
            digests: Vec::new(),
            outbox: VecDeque::new(),
            replies: Vec::new(),
            role_changes: Vec::new(),
            dropped: Vec::new(),
            next_data: 0,
            hold_disk: false,
            hold_sends: false,
            fail_writes: false,
            differs: BTreeSet::new(),
            hold_meta: false,
            meta: Vec::new(),
        }
    }

    /// Moves the engine's actions into the node; true if there were any.
    fn drain(&mut self, linked: bool) -> bool {
        let mut any = false;
        while let Some(action) = self.engine.poll_action() {
            any = true;
            match action {
                Action::Meta(io) if self.hold_meta => self.meta.push(io),
                Action::Meta(io) => self.engine.handle_meta_done(io.id, Ok(())),
                Action::Disk { id, op, .. } => self.disk.push((id, op)),
                Action::Digest {
                    id,
                    range,
                    region_bytes,
                } => self.digests.push((id, range, region_bytes)),
                Action::Reply { req, result } => self.replies.push((req, result)),
                Action::Send { msg, .. } if linked => self.outbox.push_back(msg),
                Action::Send { .. } | Action::Release(_) => {}
                Action::DropLink { reason } => self.dropped.push(reason),
                Action::RoleChanged { result } => self.role_changes.push(result),
            }
        }
        any
    }

    /// Completes every disk op and digest in flight (not those issued meanwhile).
    fn complete_io(&mut self, linked: bool) -> bool {
        let ops = std::mem::take(&mut self.disk);
        let digests = std::mem::take(&mut self.digests);
        let any = !ops.is_empty() || !digests.is_empty();
        for (id, op) in ops {
            let failed = self.fail_writes && matches!(op, ClientOp::Write { .. });
            let result = if failed { Err(Errno::Io) } else { Ok(()) };
            self.engine.handle_disk_done(id, result);
            self.drain(linked);
        }
        for (id, range, region_bytes) in digests {
            let region_bytes = u64::from(region_bytes);
            let first = range.start() / region_bytes;
            let end = range.end().div_ceil(region_bytes);
            let digests = (first..end)
                .map(|r| {
                    if self.differs.contains(&r) {
                        [self.id; 32]
                    } else {
                        [0; 32]
                    }
                })
                .collect();
            self.engine.handle_digests(id, Ok(digests));
            self.drain(linked);
        }
        any
    }

    /// Completes the held metadata I/O (and from now on all of it at once).
    fn release_meta(&mut self, linked: bool) {
        self.hold_meta = false;
        for io in std::mem::take(&mut self.meta) {
            self.engine.handle_meta_done(io.id, Ok(()));
            self.drain(linked);
        }
    }

    fn reply_of(&self, req: ReqId) -> Option<Result<(), Errno>> {
        self.replies
            .iter()
            .find(|(r, _)| *r == req)
            .map(|(_, result)| *result)
    }

    fn link_state(&self) -> Option<&'static str> {
        self.engine.link_status().map(|l| l.state)
    }

    fn current(&self) -> u64 {
        self.engine.generations().current
    }

    fn dirty(&self, offset: u64) -> bool {
        self.engine
            .meta()
            .dirty_bitmap()
            .contains((offset / REGION) as u32)
    }
}

struct Pair {
    nodes: [Node; 2],
    linked: bool,
    epoch: u64,
    now_ms: u64,
}

impl Pair {
    /// Two new disks, not connected.
    fn new() -> Pair {
        let mut p = Pair {
            nodes: [Node::new(1, 2), Node::new(2, 1)],
            linked: false,
            epoch: 0,
            now_ms: START_MS,
        };
        p.settle();
        p
    }

    /// Two new disks, connected, a full copy from node 1 done, both Secondary.
    fn synced() -> Pair {
        let mut p = Pair::new();
        p.connect();
        p.nodes[0]
            .engine
            .start_full_sync(11)
            .expect("both disks new");
        p.settle();
        for node in &p.nodes {
            assert_eq!(node.engine.disk_state(), DiskState::UpToDate);
            assert_eq!(node.link_state(), Some("connected"));
        }
        p
    }

    /// As `synced`, and node 1 active.
    fn synced_with_primary() -> Pair {
        let mut p = Pair::synced();
        p.nodes[0]
            .engine
            .activate(false, 12)
            .expect("UpToDate and connected");
        p.settle();
        assert_eq!(p.nodes[0].role_changes, vec![Ok(())]);
        assert_eq!(p.nodes[0].engine.role(), Role::Primary);
        p
    }

    /// A handshake completes; each node decides from the other's state now.
    fn connect(&mut self) {
        self.link_up();
        self.settle();
    }

    /// As `connect`, but nothing is delivered yet: both are still exchanging bitmaps.
    fn link_up(&mut self) {
        let states = [0, 1].map(|i| self.nodes[i].engine.node_state());
        self.link_up_with(states);
    }

    /// A handshake completes in which node `i` sent `sent[i]`, its state when the
    /// handshake started (the shell takes it then): nothing delivered yet.
    fn link_up_with(&mut self, sent: [NodeState; 2]) {
        self.epoch += 1;
        self.linked = true;
        for i in 0..2 {
            self.nodes[i]
                .engine
                .handle_link_up_from(self.epoch, sent[i], sent[1 - i]);
            self.nodes[i].drain(true);
        }
    }

    /// The connection is gone (the shell closed it): what is in flight on it is lost.
    fn cut(&mut self) {
        self.linked = false;
        for (i, node) in self.nodes.iter_mut().enumerate() {
            node.outbox.clear();
            node.engine.handle_link_down(100 + i as u64);
        }
        self.settle();
    }

    fn deliver(&mut self, from: usize) -> bool {
        let mut any = false;
        while let Some(msg) = self.nodes[from].outbox.pop_front() {
            any = true;
            let to = &mut self.nodes[1 - from];
            let data =
                matches!(msg, PeerMsg::Write { .. } | PeerMsg::ResyncData { .. }).then(|| {
                    to.next_data += 1;
                    PeerDataId(to.next_data)
                });
            to.engine.handle_peer(msg, data);
            to.drain(self.linked);
        }
        any
    }

    /// Delivers the oldest message `from` sent, if any.
    fn deliver_one(&mut self, from: usize) {
        let rest = std::mem::take(&mut self.nodes[from].outbox);
        let mut rest = rest.into_iter();
        self.nodes[from].outbox.extend(rest.next());
        self.deliver(from);
        let newer = std::mem::take(&mut self.nodes[from].outbox);
        self.nodes[from].outbox = rest.chain(newer).collect();
    }

    /// Runs everything not held (deliveries, disk completions) until nothing moves.
    fn settle(&mut self) {
        loop {
            let mut progress = false;
            for i in 0..2 {
                progress |= self.nodes[i].drain(self.linked);
                if !self.nodes[i].hold_disk {
                    progress |= self.nodes[i].complete_io(self.linked);
                }
                if !self.nodes[i].hold_sends {
                    progress |= self.deliver(i);
                }
            }
            if !progress {
                return;
            }
        }
    }

    fn client(&mut self, i: usize, op: ClientOp) -> ReqId {
        let req = self.nodes[i].engine.handle_client(op);
        self.settle();
        req
    }

    fn advance(&mut self, ms: u64) {
        self.now_ms += ms;
        for node in &mut self.nodes {
            node.engine.handle_timeout(self.now_ms);
        }
        self.settle();
    }
}

fn write(offset: u64, length: u64) -> ClientOp {
    ClientOp::Write {
        range: ByteRange::new(offset, length).unwrap(),
        fua: false,
    }
}

#[test]
fn nothing_is_acknowledged_while_a_primary_drops_its_link() {
    // F1: the engine drops the link (here: the peer stopped answering); until the shell
    // reports the link gone, a new write used to be neither replicated nor journaled yet
    // acknowledged, and a FLUSH answered on the local flush alone — a write the peer
    // lacks, acknowledged without a dirty bit or a new current generation.
    let mut p = Pair::synced_with_primary();
    let shared = p.nodes[1].current();
    p.nodes[0].hold_sends = true;
    let stalled = p.client(0, write(0, 4096));
    assert_eq!(
        p.nodes[0].reply_of(stalled),
        None,
        "waits for the peer's Ack"
    );
    p.advance(PEER_TIMEOUT_MS + 1);
    assert_eq!(p.nodes[0].dropped.len(), 1, "{:?}", p.nodes[0].dropped);
    let late = p.client(0, write(8 * MIB, 4096));
    let flush = p.client(0, ClientOp::Flush);
    assert_eq!(p.nodes[0].reply_of(late), None, "answered while dropping");
    assert_eq!(p.nodes[0].reply_of(flush), None, "answered while dropping");
    p.cut();
    for req in [stalled, late, flush] {
        assert_eq!(p.nodes[0].reply_of(req), Some(Ok(())));
    }
    assert!(p.nodes[0].dirty(0) && p.nodes[0].dirty(8 * MIB));
    assert_ne!(p.nodes[0].current(), shared, "a new current generation");
}

#[test]
fn forced_permit_is_refused_while_a_connection_is_being_set_up() {
    // F2: forced-permit was accepted while the link was up but not replicating. Here
    // both decided "in sync" at link-up; the forced node then wrote, and the decision
    // carried out afterwards started replicating without copying those writes: both
    // UpToDate and connected, the peer lacking acknowledged writes (a switchover loses
    // them). With the other decisions it copied over the live Primary.
    let mut p = Pair::synced();
    p.cut();
    p.link_up();
    assert_eq!(p.nodes[0].link_state(), Some("connecting"));
    let refused = p.nodes[0].engine.activate(true, 99);
    let message = refused.expect_err("forced-permit while connecting");
    assert!(message.contains("mirrorctl break"), "{message}");
    assert_eq!(p.nodes[0].engine.role(), Role::Secondary);
    p.settle();
    assert_eq!(p.nodes[0].link_state(), Some("connected"));
    // The way out the refusal names: break (the link goes), then forced-permit.
    p.cut();
    p.nodes[0].engine.activate(true, 99).expect("no connection");
    p.settle();
    assert_eq!(p.nodes[0].engine.role(), Role::Primary);
}

#[test]
fn a_primary_never_becomes_a_resync_target() {
    // F2: a rebuild started on one Secondary crossed the activation of the other: the
    // new Primary received the sync generation while idle and replicating, became the
    // target (Inconsistent, while serving) and applied resync data under its
    // application, older data over its newer writes.
    let mut p = Pair::synced();
    p.nodes[1].differs.insert(5);
    p.nodes[1]
        .engine
        .start_verify()
        .expect("in sync, both Secondary");
    p.settle();
    p.nodes[1].differs.clear();
    assert!(p.nodes[1].dirty(5 * REGION), "the verify marked region 5");
    p.nodes[1].hold_sends = true;
    p.nodes[1]
        .engine
        .start_differential_rebuild()
        .expect("dirty, both Secondary");
    p.settle();
    p.nodes[0]
        .engine
        .activate(false, 12)
        .expect("UpToDate, peer Secondary");
    p.settle();
    // A connected activation waits for the peer's confirmation, held with its sends.
    assert_eq!(p.nodes[0].engine.role(), Role::Secondary);
    p.nodes[1].hold_sends = false;
    p.settle();
    assert_eq!(p.nodes[0].engine.role(), Role::Primary);
    assert_ne!(p.nodes[0].engine.disk_state(), DiskState::Inconsistent);
    assert_eq!(p.nodes[0].engine.stats().resync_bytes_received, 0);
    assert_eq!(p.nodes[0].dropped.len(), 1, "{:?}", p.nodes[0].dropped);
}

#[test]
fn forced_permit_cancels_a_pending_discard_of_local_changes() {
    // F4: `resolve --discard-local` persisted DISCARD_LOCAL; a forced-permit on the same
    // node (the peer still away) kept it, so at the next connect the split brain was
    // "resolved" by overwriting everything the node acknowledged since the permit.
    let mut p = Pair::synced_with_primary();
    p.cut();
    p.nodes[1].engine.activate(true, 21).expect("disconnected");
    p.nodes[0].engine.deactivate().expect("no requests");
    p.settle();
    p.nodes[0]
        .engine
        .resolve_discard_local()
        .expect("Secondary, not connected");
    p.nodes[0].engine.activate(true, 22).expect("disconnected");
    p.settle();
    assert_eq!(p.nodes[0].engine.role(), Role::Primary);
    let w = p.client(0, write(0, 4096));
    assert_eq!(p.nodes[0].reply_of(w), Some(Ok(())));
    assert!(
        !p.nodes[0]
            .engine
            .meta()
            .superblock()
            .state
            .flags
            .contains(Flags::DISCARD_LOCAL)
    );
    // The service moves back to node 2; node 1 is deactivated and reconnects.
    p.nodes[0].engine.deactivate().expect("no requests");
    p.settle();
    p.connect();
    assert_ne!(p.nodes[0].engine.disk_state(), DiskState::Inconsistent);
    assert_eq!(p.nodes[0].engine.stats().resync_bytes_received, 0);
    let problem = p.nodes[0].engine.status().problem.unwrap_or_default();
    assert!(problem.contains("split brain"), "{problem}");
}

#[test]
fn both_nodes_decide_on_the_state_the_other_holds() {
    // F3: the State a node sends is taken when its handshake starts. Here the primary's
    // old link is replaced by a new connection (crossed connect) after that: the
    // replaced link's loss made a new current generation, so the primary decided "the
    // peer is behind: I copy" while the peer, deciding from the stale State, found them
    // in sync, became UpToDate without being a target and applied the resync data as
    // plain writes (out of write order, never marked Inconsistent).
    let mut p = Pair::synced_with_primary();
    let sent = [0, 1].map(|i| p.nodes[i].engine.node_state());
    p.linked = false;
    for node in &mut p.nodes {
        node.outbox.clear();
    }
    p.nodes[0].engine.handle_link_down(7);
    p.settle();
    assert_ne!(p.nodes[0].current(), sent[0].generations.current);
    let w = p.client(0, write(0, 4096));
    assert_eq!(p.nodes[0].reply_of(w), Some(Ok(())));
    p.nodes[1].engine.handle_link_down(8);
    let received = p.nodes[1].engine.stats().resync_bytes_received;
    p.link_up_with(sent);
    p.settle();
    assert_eq!(p.nodes[1].engine.stats().resync_bytes_received, received);
    assert_eq!(p.nodes[0].dropped.len(), 1, "{:?}", p.nodes[0].dropped);
    // The next connect decides on fresh state: node 2 is a proper target.
    p.cut();
    p.connect();
    assert!(p.nodes[1].engine.stats().resync_bytes_received > received);
    for node in &p.nodes {
        assert_eq!(node.link_state(), Some("connected"));
        assert_eq!(node.engine.disk_state(), DiskState::UpToDate);
    }
    assert_eq!(
        p.nodes[0].engine.generations(),
        p.nodes[1].engine.generations()
    );
}

#[test]
fn resync_data_and_writes_are_refused_by_a_node_that_must_not_apply_them() {
    // F3: the engine applied ResyncData whenever linked (also with no resync at all, and
    // on a Primary) and Write frames on a Primary.
    let mut p = Pair::synced_with_primary();
    let range = ByteRange::new(0, 4096).unwrap();
    p.nodes[1]
        .engine
        .handle_peer(PeerMsg::ResyncData { seq: 1, range }, Some(PeerDataId(99)));
    p.nodes[1].drain(true);
    assert!(p.nodes[1].disk.is_empty(), "applied: {:?}", p.nodes[1].disk);
    assert_eq!(p.nodes[1].dropped.len(), 1);
    p.cut();
    p.connect();
    p.nodes[0].engine.handle_peer(
        PeerMsg::Write {
            seq: 1,
            range,
            fua: false,
        },
        Some(PeerDataId(99)),
    );
    p.nodes[0].drain(true);
    assert!(p.nodes[0].disk.is_empty(), "applied: {:?}", p.nodes[0].disk);
    assert_eq!(p.nodes[0].dropped.len(), 1);
}

#[test]
fn a_changed_current_generation_of_an_idle_peer_drops_the_link() {
    // F3: while replicating, a peer whose current generation changed outside a resync
    // was silently taken as still in sync.
    let mut p = Pair::synced();
    let mut state = p.nodes[0].engine.node_state();
    state.generations.new_current(0x5151);
    p.nodes[1].engine.handle_peer(PeerMsg::State(state), None);
    p.nodes[1].drain(true);
    assert_eq!(p.nodes[1].dropped.len(), 1, "{:?}", p.nodes[1].dropped);
}

#[test]
fn a_full_copy_requested_while_replicating_reconnects_first() {
    // F3: `rebuild --full --from` while replicating made a new current and started a
    // full copy at once; the peer, idle and UpToDate, ignored the new generation and
    // applied every ResyncData as plain writes, never marked Inconsistent.
    let mut p = Pair::synced();
    let received = p.nodes[1].engine.stats().resync_bytes_received;
    p.nodes[0]
        .engine
        .start_full_sync(31)
        .expect("connected, idle");
    p.settle();
    assert_eq!(p.nodes[1].engine.stats().resync_bytes_received, received);
    assert_eq!(p.nodes[0].dropped.len(), 1, "{:?}", p.nodes[0].dropped);
    p.cut();
    p.connect();
    assert_eq!(
        p.nodes[1].engine.stats().resync_bytes_received - received,
        64 * MIB,
        "a full copy to a proper target"
    );
    for node in &p.nodes {
        assert_eq!(node.link_state(), Some("connected"));
        assert_eq!(node.engine.disk_state(), DiskState::UpToDate);
    }
}

#[test]
fn a_role_change_while_connecting_that_keeps_the_decision_keeps_the_link() {
    // The check when the bitmaps are exchanged re-decides; it used to drop the link on
    // any change of this node's state, also a deactivation that leaves the decision
    // (this node is ahead: it copies) as it was (found by the two-node simulation).
    let mut p = Pair::synced_with_primary();
    p.cut();
    let w = p.client(0, write(0, 4096));
    assert_eq!(p.nodes[0].reply_of(w), Some(Ok(())));
    p.link_up();
    p.nodes[0].engine.deactivate().expect("no requests");
    p.settle();
    assert_eq!(p.nodes[0].engine.role(), Role::Secondary);
    assert!(p.nodes.iter().all(|n| n.dropped.is_empty()));
    for node in &p.nodes {
        assert_eq!(node.link_state(), Some("connected"));
        assert_eq!(node.engine.disk_state(), DiskState::UpToDate);
    }
}

#[test]
fn a_secondary_whose_disk_fails_a_write_stops_replicating() {
    // M2: a secondary answered a failed write with a Nack and went on as if healthy:
    // UpToDate in memory, reconnecting at once and taking a resync onto the disk that
    // had just failed.
    let mut p = Pair::synced_with_primary();
    p.nodes[1].fail_writes = true;
    let w = p.client(0, write(0, 4096));
    assert!(
        p.nodes[1].engine.failure().is_some(),
        "the secondary's disk failed"
    );
    assert_eq!(p.nodes[0].dropped.len(), 1, "the Nack drops the link");
    p.cut();
    assert_eq!(p.nodes[0].reply_of(w), Some(Ok(())), "on the local write");
    assert!(p.nodes[0].dirty(0));
    let received = p.nodes[1].engine.stats().resync_bytes_received;
    p.connect();
    assert_eq!(p.nodes[1].dropped.len(), 1, "{:?}", p.nodes[1].dropped);
    assert_eq!(p.nodes[1].engine.stats().resync_bytes_received, received);
    assert_ne!(p.nodes[1].link_state(), Some("sync-target"));
    let problem = p.nodes[1].engine.status().problem.unwrap_or_default();
    assert!(problem.contains("failed"), "{problem}");
}

#[test]
fn a_full_copy_announces_its_generation_once_it_is_durable() {
    // M5: `rebuild --full --from` (both disks new) sent its State with the new current
    // generation before that generation was durable; the peer re-decided on it.
    let mut p = Pair::new();
    p.connect();
    assert_eq!(p.nodes[0].link_state(), Some("waiting-for-operator"));
    p.nodes[0].hold_meta = true;
    p.nodes[0]
        .engine
        .start_full_sync(41)
        .expect("both disks new");
    p.nodes[0].drain(true);
    let new_current = p.nodes[0].current();
    let announced = |node: &Node| {
        node.outbox
            .iter()
            .any(|m| matches!(m, PeerMsg::State(s) if s.generations.current == new_current))
    };
    assert!(
        !announced(&p.nodes[0]),
        "announced before it is durable: {:?}",
        p.nodes[0].outbox
    );
    p.nodes[0].release_meta(true);
    assert!(announced(&p.nodes[0]));
    p.settle();
    for node in &p.nodes {
        assert_eq!(node.link_state(), Some("connected"));
        assert_eq!(node.engine.disk_state(), DiskState::UpToDate);
    }
}

#[test]
fn a_verify_on_a_secondary_ends_when_the_peer_becomes_primary() {
    // M1: a verify run from a Secondary holds its lock on a range until the peer's
    // digests arrive. The peer activated meanwhile and wrote to that range: its write
    // waited for our Ack, our apply of it for our verify lock, and the peer's digests
    // for its write — a deadlock the peer timeout ended by dropping the link.
    let mut p = Pair::synced();
    p.nodes[0]
        .engine
        .activate(false, 12)
        .expect("UpToDate, peer Secondary");
    p.nodes[0].drain(true);
    if p.nodes[0].engine.role() != Role::Primary {
        // The activation waits for node 2's confirmation: let its request get there.
        p.deliver(0);
    }
    p.nodes[1]
        .engine
        .start_verify()
        .expect("in sync, both Secondary");
    p.nodes[1].drain(true);
    // Whatever the activation needs from node 2 (States), not its verify requests.
    while matches!(p.nodes[1].outbox.front(), Some(PeerMsg::State(_))) {
        p.deliver_one(1);
    }
    assert_eq!(p.nodes[0].engine.role(), Role::Primary);
    let w = p.nodes[0].engine.handle_client(write(0, 4096));
    p.nodes[0].drain(true);
    p.nodes[0].complete_io(true);
    p.deliver(0);
    p.settle();
    assert_eq!(p.nodes[0].reply_of(w), Some(Ok(())));
    assert!(p.nodes.iter().all(|n| n.dropped.is_empty()));
    let verify = p.nodes[1].engine.status().verify.expect("a verify ran");
    assert!(!verify.running);
    assert_eq!(p.nodes[1].link_state(), Some("connected"));
}

#[test]
fn a_rebuild_keeps_the_targets_own_dirty_bits() {
    // M3: an on-demand rebuild copies the source's dirty regions only (the target's
    // bitmap is not exchanged), yet the target cleared all its bits at the finish:
    // regions its own verify had found different were forgotten, though never copied.
    let mut p = Pair::synced();
    p.nodes[1].differs.insert(5);
    p.nodes[1]
        .engine
        .start_verify()
        .expect("in sync, both Secondary");
    p.settle();
    p.nodes[1].differs.clear();
    p.nodes[0].differs.insert(9);
    p.nodes[0]
        .engine
        .start_verify()
        .expect("in sync, both Secondary");
    p.settle();
    assert!(p.nodes[1].dirty(5 * REGION) && !p.nodes[1].dirty(9 * REGION));
    assert!(p.nodes[0].dirty(9 * REGION) && !p.nodes[0].dirty(5 * REGION));
    p.nodes[0]
        .engine
        .start_differential_rebuild()
        .expect("dirty, both Secondary");
    p.settle();
    for node in &p.nodes {
        assert_eq!(node.link_state(), Some("connected"));
        assert_eq!(node.engine.disk_state(), DiskState::UpToDate);
    }
    assert!(!p.nodes[0].dirty(9 * REGION), "copied");
    assert!(p.nodes[1].dirty(5 * REGION), "never copied: still dirty");
}

#[test]
fn a_flush_from_an_earlier_connection_is_not_acknowledged_on_the_next() {
    // Found by the two-node simulation: the secondary completed a peer FLUSH received on
    // a connection lost meanwhile and sent its FlushAck on the new connection, where the
    // same seq names another flush (or none: the primary dropped the link as a protocol
    // violation).
    let mut p = Pair::synced_with_primary();
    let w = p.client(0, write(0, 4096));
    assert_eq!(p.nodes[0].reply_of(w), Some(Ok(())));
    p.nodes[1].hold_disk = true;
    p.client(0, ClientOp::Flush);
    let flushes: Vec<DiskOpId> = p.nodes[1]
        .disk
        .iter()
        .filter(|(_, op)| *op == ClientOp::Flush)
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(flushes.len(), 1, "the peer flush is in flight");
    p.nodes[1].disk.retain(|(_, op)| *op != ClientOp::Flush);
    p.cut();
    p.connect();
    assert!(p.nodes[1].link_state().is_some());
    p.nodes[1].engine.handle_disk_done(flushes[0], Ok(()));
    p.nodes[1].drain(true);
    assert!(
        !p.nodes[1]
            .outbox
            .iter()
            .any(|m| matches!(m, PeerMsg::FlushAck { .. })),
        "FlushAck of an earlier connection's flush: {:?}",
        p.nodes[1].outbox
    );
    p.nodes[1].hold_disk = false;
    p.settle();
    assert!(p.nodes.iter().all(|n| n.dropped.is_empty()));
}

#[test]
fn activation_waits_for_the_peer_to_confirm_over_the_link() {
    // Found by the two-node simulation: a node whose link had died silently (nothing
    // arrived from the peer any more) activated on its stale "the peer is Secondary",
    // while the peer had dropped the link, become the one the application used, and
    // acknowledged writes this node lacked. A connected activation now needs the peer's
    // answer over the live link.
    let mut p = Pair::synced();
    p.nodes[1].hold_sends = true;
    p.nodes[0]
        .engine
        .activate(false, 12)
        .expect("UpToDate, peer Secondary as last heard of");
    p.settle();
    assert_eq!(p.nodes[0].engine.role(), Role::Secondary, "no answer yet");
    assert!(p.nodes[0].role_changes.is_empty());
    p.advance(PEER_TIMEOUT_MS + 1);
    assert_eq!(p.nodes[0].dropped.len(), 1, "{:?}", p.nodes[0].dropped);
    p.cut();
    assert_eq!(p.nodes[0].engine.role(), Role::Secondary);
    assert!(matches!(p.nodes[0].role_changes[..], [Err(_)]));
    // Over a live link the peer's answer lets it through.
    p.nodes[1].hold_sends = false;
    p.connect();
    p.nodes[0].engine.activate(false, 13).expect("connected");
    p.settle();
    assert_eq!(p.nodes[0].engine.role(), Role::Primary);
    assert!(matches!(p.nodes[0].role_changes[..], [Err(_), Ok(())]));
}

#[test]
fn an_empty_resync_finishes_on_both_sides_in_order() {
    // Found by the two-node simulation, from the rule-34 state (the source missed the
    // finish of the previous resync, same current on both sides, nothing dirty):
    // - the target got ResyncDone (nothing to copy) while its adoption of the sync
    //   generation was not durable yet and dropped the link as a protocol violation;
    // - the source took the target's State from before the start (same current, no
    //   resync mark) for the target's finish and recorded its own while the target had
    //   not finished.
    let mut p = Pair::new();
    const C: u64 = 0x0C0C_0C0C_0C0C_0C0C;
    const B: u64 = 0x0B0B_0B0B_0B0B_0B0B;
    const X: u64 = 0x1111_1111_1111_1111;
    let s = B.wrapping_add(1 << 48);
    let gens = [(C, s, [B, X]), (C, 0, [s, B])];
    for (node, (current, bitmap, history)) in p.nodes.iter_mut().zip(gens) {
        node.engine.meta.update_superblock(|st| {
            st.generations = crate::core::meta::Generations {
                current,
                bitmap,
                history,
            };
            st.disk_state = DiskState::UpToDate;
        });
    }
    p.settle();
    p.link_up();
    p.deliver_one(1); // node 2's bitmap: node 1 decides (rule 34, it is the source)
    p.nodes[1].hold_sends = true;
    p.nodes[1].hold_meta = true;
    p.settle();
    assert!(p.nodes[1].dropped.is_empty(), "{:?}", p.nodes[1].dropped);
    assert_eq!(p.nodes[0].link_state(), Some("sync-source"));
    // The target's State from before its start reaches the source only now.
    p.nodes[1].hold_sends = false;
    p.settle();
    assert_eq!(
        p.nodes[0].link_state(),
        Some("sync-source"),
        "not finished yet"
    );
    p.nodes[1].release_meta(true);
    p.settle();
    for node in &p.nodes {
        assert!(node.dropped.is_empty(), "{:?}", node.dropped);
        assert_eq!(node.link_state(), Some("connected"));
        assert_eq!(node.engine.disk_state(), DiskState::UpToDate);
    }
    assert_eq!(
        p.nodes[0].engine.generations(),
        p.nodes[1].engine.generations()
    );
}
