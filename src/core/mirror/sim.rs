//! Seeded two-node simulation of the mirror engine (test only): both nodes' engines over
//! a simulated link, simulated data disks and simulated CLUSTER partitions.
//!
//! Everything is driven by one `u64` seed: one seed is one exact run. A failure panics
//! with the seed, the step, the invariant and the last events; to replay it, set
//! `REPLAY_SEED` (and `REPLAY_TRACE` to print every event) in the tests below and run
//! `cargo test --release --lib sim_replay -- --nocapture`.
//!
//! The model:
//! - **Data disk**: 4 KiB blocks (the engine's lock alignment and the volume's logical
//!   block), each holding a *write version* (unique per client write; the initial
//!   contents are versions 1 and 2, different on the two nodes). A completed write lands
//!   in a volatile cache; a flush makes durable what had completed when it was issued;
//!   FUA writes are durable at completion. At a power cut every block with cached or
//!   in-flight writes independently ends with its durable version or any one of those
//!   writes (so any subset of unflushed writes survives, multi-block writes tear).
//! - **CLUSTER partition**: bytes with the same cache semantics; a power cut loses, keeps
//!   or tears (at 512-byte boundaries) every non-durable 4 KiB block.
//! - **Link**: one ordered queue per direction. A cut delivers a random prefix of what is
//!   in flight, then `handle_link_down` on each side; sends after the cut are lost. A
//!   reconnect calls `handle_link_up(max(next_epoch_proposal), peer.node_state())` on both.
//!   Stalls hold a direction past the peer timeout.
//! - **Buffers**: a write's buffer carries its version; a peer payload gets a
//!   `PeerDataId`; resync reads fill `ResyncBufId` buffers with the versions read.
//! - **Operator / failover manager**: first full sync from a random node, activation of an
//!   UpToDate connected node, failover (drain, deactivate, activate the peer), plain
//!   deactivation, forced activation of a disconnected node (never while the other node
//!   is active), crashes of either or both nodes, link cuts and stalls.
//!
//! Invariants (each names the DESIGN rule it checks; see `Sim::fail` call sites):
//! 1. No acknowledged write lost (§5 synchronous mode, NBD FLUSH/FUA contract): the active
//!    node's view holds every acknowledged write's version or a newer one. A power cut of
//!    the primary may lose acknowledged writes that no FLUSH/FUA/deactivation made
//!    durable (`Floor::loose` falls back to `Floor::strict`). A forced activation waives
//!    what the forced node lacked (issue 5). Checked at every ack, every read, every
//!    activation, periodically, at settle points, and for a hypothetical double power cut
//!    followed by the rebuild the generation rules choose. Never a rebuild in the wrong
//!    direction: at every reconnect the source the rules choose holds every
//!    acknowledged write.
//! 2. The disks never differ in a region no journal records (§4 activity log + bitmap
//!    journal, issue 4 Tests): at every reconnect, blocks where the views differ (or a
//!    write is in flight) lie in the union of both dirty bitmaps; after a hypothetical
//!    power cut of both nodes, blocks where the crash images differ lie in the union of
//!    the *recovered* bitmaps (which include the hot extents) — unless the generations
//!    demand a full copy.
//! 3. Resync never writes an older version over a newer application write (§5).
//! 4. Overlapping writes are applied in the same order on both sides (§5): every
//!    application write lands on each node over an older version, and overlapping
//!    writes are acknowledged in submission order.
//! 5. After a resync completes and the link is idle, both data partitions are identical
//!    and both disks are UpToDate with empty bitmaps (§5 "on return", issue 5).
//! 6. Every client request gets exactly one reply; every `PeerDataId` and resync buffer
//!    is used or released exactly once; nothing leaks at settle points.
//! 7. At most one active node (§2 "at most one node"); a node activates only when
//!    UpToDate and connected, or forced (§4 disk states, issue 4 hooks); generations
//!    never report split brain / unrelated disks unless a forced activation happened,
//!    and always report it when both nodes acknowledged writes the other may lack
//!    since they last held the same data (`Sim::apart`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use roaring::RoaringBitmap;

use super::engine::{Engine, EngineConfig};
use super::generations::{Decision, NodeView, Outcome, Side, decide};
use super::types::{Action, ClientOp, DataRef, DiskOpId, PeerDataId, PeerMsg, ReqId, ResyncBufId};
use crate::core::meta::{
    CreateParams, DiskState, META_BLOCK_BYTES, MetaEngine, MetaIo, MetaIoId, MetaIoKind, Role,
    SECTOR_BYTES,
};
use crate::core::nbd::wire::Errno;
use crate::core::overlap::ByteRange;

const BLOCK: u64 = 4096;
const MIB: u64 = 1 << 20;
/// Initial (never written) contents of each node's data partition: they differ, so the
/// first full copy is visible in the versions.
const INIT_VERSION: [u64; 2] = [1, 2];
const MAX_CLIENT_IN_FLIGHT: usize = 12;
/// Settle (quiesce and check) every this many steps.
const SETTLE_EVERY: usize = 500;

/// Scenario knobs (the seed chooses within them).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scenario {
    pub crashes: bool,
    pub forced: bool,
    pub stalls: bool,
    pub failovers: bool,
    /// Activate the other node right after an activation completes, before its State
    /// message arrived: the "operator runs activate on both nodes" race.
    pub racing_activation: bool,
}

impl Scenario {
    pub(crate) fn default_mix() -> Scenario {
        Scenario {
            crashes: true,
            forced: true,
            stalls: true,
            failovers: true,
            racing_activation: false,
        }
    }
}

// -------------------------------------------------------------------------------------
// Randomness.
// -------------------------------------------------------------------------------------

/// splitmix64: deterministic, tiny.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x6A09_E667_F3BC_C908)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        self.next_u64() % n
    }

    /// True with probability `per_mille` / 1000.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

// -------------------------------------------------------------------------------------
// Simulated disks.
// -------------------------------------------------------------------------------------

/// A data partition of versioned 4 KiB blocks with a volatile write cache.
#[derive(Clone, Debug)]
struct DataDisk {
    durable: Vec<u64>,
    /// Completed, not yet durable writes per block, oldest first: (completion, version).
    cache: BTreeMap<u64, Vec<(u64, u64)>>,
    completions: u64,
}

impl DataDisk {
    fn new(blocks: u64, init: u64) -> DataDisk {
        DataDisk {
            durable: vec![init; blocks as usize],
            cache: BTreeMap::new(),
            completions: 0,
        }
    }

    /// What a read returns now.
    fn view(&self, b: u64) -> u64 {
        self.cache
            .get(&b)
            .and_then(|e| e.last())
            .map_or(self.durable[b as usize], |e| e.1)
    }

    fn view_overlay(&self) -> BTreeMap<u64, u64> {
        self.cache
            .iter()
            .filter_map(|(b, e)| e.last().map(|e| (*b, e.1)))
            .collect()
    }

    fn complete_write(&mut self, first: u64, versions: &[u64], fua: bool) {
        self.completions += 1;
        let seq = self.completions;
        for (k, &v) in versions.iter().enumerate() {
            let b = first + k as u64;
            if fua {
                // Write-through: the medium holds it; older cached copies are superseded.
                self.durable[b as usize] = v;
                self.cache.remove(&b);
            } else {
                self.cache.entry(b).or_default().push((seq, v));
            }
        }
    }

    fn flush_capture(&self) -> u64 {
        self.completions
    }

    /// A flush issued at `capture` completed: what had completed then is durable.
    fn flush_complete(&mut self, capture: u64) {
        let durable = &mut self.durable;
        self.cache.retain(|b, entries| {
            if let Some(pos) = entries.iter().rposition(|(s, _)| *s <= capture) {
                durable[*b as usize] = entries[pos].1;
                entries.drain(..=pos);
            }
            !entries.is_empty()
        });
    }

    /// Blocks a power cut now would change, with the version each ends with. `policy`:
    /// 0 = every non-durable write lost, 1 = every one kept, else random per block.
    fn crash_overlay(
        &self,
        rng: &mut Rng,
        inflight: &[(u64, Vec<u64>)],
        policy: u64,
    ) -> BTreeMap<u64, u64> {
        let mut choices: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for (b, entries) in &self.cache {
            choices
                .entry(*b)
                .or_default()
                .extend(entries.iter().map(|e| e.1));
        }
        for (first, versions) in inflight {
            for (k, &v) in versions.iter().enumerate() {
                choices.entry(first + k as u64).or_default().push(v);
            }
        }
        let mut out = BTreeMap::new();
        for (b, vs) in choices {
            let pick = match policy {
                0 => None,
                1 => vs.last().copied(),
                _ => match rng.below(vs.len() as u64 + 1) {
                    0 => None,
                    k => Some(vs[k as usize - 1]),
                },
            };
            if let Some(v) = pick {
                out.insert(b, v);
            }
        }
        out
    }
}

/// Blocks where two images (durable + overlay) differ.
fn image_diff(
    a: &[u64],
    a_over: &BTreeMap<u64, u64>,
    b: &[u64],
    b_over: &BTreeMap<u64, u64>,
) -> BTreeSet<u64> {
    let mut out: BTreeSet<u64> = a
        .iter()
        .zip(b)
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(k, _)| k as u64)
        .collect();
    for &k in a_over.keys().chain(b_over.keys()) {
        let x = a_over.get(&k).copied().unwrap_or(a[k as usize]);
        let y = b_over.get(&k).copied().unwrap_or(b[k as usize]);
        if x != y {
            out.insert(k);
        } else {
            out.remove(&k);
        }
    }
    out
}

#[derive(Clone, Debug)]
struct CachedMetaWrite {
    offset: u64,
    bytes: Vec<u8>,
    completed: bool,
}

/// The CLUSTER partition: bytes with a volatile cache (as `core::meta::sim::SimDisk`).
#[derive(Clone, Debug)]
struct MetaDisk {
    durable: Vec<u8>,
    cache: BTreeMap<u64, CachedMetaWrite>,
    flushes: BTreeMap<u64, Vec<u64>>,
}

impl MetaDisk {
    fn new(durable: Vec<u8>) -> MetaDisk {
        MetaDisk {
            durable,
            cache: BTreeMap::new(),
            flushes: BTreeMap::new(),
        }
    }

    fn issue(&mut self, io: &MetaIo) {
        match &io.kind {
            MetaIoKind::Write { offset, bytes } => {
                self.cache.insert(
                    io.id.0,
                    CachedMetaWrite {
                        offset: *offset,
                        bytes: bytes.clone(),
                        completed: false,
                    },
                );
            }
            MetaIoKind::Flush => {
                let covered = self
                    .cache
                    .iter()
                    .filter(|(_, w)| w.completed)
                    .map(|(id, _)| *id)
                    .collect();
                self.flushes.insert(io.id.0, covered);
            }
        }
    }

    fn complete(&mut self, id: MetaIoId) {
        if let Some(w) = self.cache.get_mut(&id.0) {
            w.completed = true;
            return;
        }
        let covered = self.flushes.remove(&id.0).expect("known metadata I/O");
        for wid in covered {
            if let Some(w) = self.cache.remove(&wid) {
                let o = w.offset as usize;
                self.durable[o..o + w.bytes.len()].copy_from_slice(&w.bytes);
            }
        }
    }

    fn crash_image(&self, rng: &mut Rng, policy: u64) -> Vec<u8> {
        let mut image = self.durable.clone();
        let block = META_BLOCK_BYTES as usize;
        for w in self.cache.values() {
            for (k, chunk) in w.bytes.chunks(block).enumerate() {
                let o = w.offset as usize + k * block;
                let choice = match policy {
                    0 => 0,
                    1 => 1,
                    _ => rng.below(3),
                };
                match choice {
                    0 => {}
                    1 => image[o..o + block].copy_from_slice(chunk),
                    _ => {
                        let sectors = (META_BLOCK_BYTES / SECTOR_BYTES) - 1;
                        let keep = (1 + rng.below(sectors)) as usize * SECTOR_BYTES as usize;
                        image[o..o + keep].copy_from_slice(&chunk[..keep]);
                    }
                }
            }
        }
        image
    }
}

// -------------------------------------------------------------------------------------
// Nodes, link, bookkeeping.
// -------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriteKind {
    /// A client write on this node.
    Client,
    /// A replicated application write, received on connection `conn`.
    Apply(u64),
    /// Resync data received on connection `conn`.
    Resync(u64),
}

#[derive(Clone, Debug)]
enum DiskWhat {
    Write {
        first: u64,
        versions: Vec<u64>,
        fua: bool,
        kind: WriteKind,
    },
    ReadRequest(ReqId, u64, u64),
    ReadResync(ResyncBufId, u64, u64),
    Flush {
        capture: u64,
    },
}

#[derive(Clone, Debug)]
struct DiskRec {
    id: DiskOpId,
    what: DiskWhat,
}

#[derive(Clone, Debug)]
struct Req {
    op: ClientOp,
    /// The write version (modifications).
    version: u64,
    disk_issued: bool,
    /// Reads: (block, loose floor) when issued. Flushes: acked floors when issued.
    floors_at_issue: Vec<(u64, u64)>,
    read_data: Option<Vec<u64>>,
}

#[derive(Clone, Debug)]
struct PeerBuf {
    versions: Vec<u64>,
    resync: bool,
    conn: u64,
}

#[derive(Clone, Debug)]
struct ZeroApply {
    range: ByteRange,
    version: u64,
    conn: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PendingRole {
    Activate { forced: bool },
    Deactivate,
}

struct Node {
    engine: Engine,
    up: bool,
    restart_at: u64,
    data: DataDisk,
    meta: MetaDisk,
    disk_ops: Vec<DiskRec>,
    meta_ops: Vec<MetaIoId>,
    requests: BTreeMap<ReqId, Req>,
    peer_bufs: BTreeMap<PeerDataId, PeerBuf>,
    next_peer_data: u64,
    resync_bufs: BTreeMap<ResyncBufId, Option<Vec<u64>>>,
    zero_applies: Vec<ZeroApply>,
    last_client_zero: Option<(ByteRange, u64)>,
    /// Peer FLUSH sequence numbers received on the current connection, not yet acked.
    flushes_received: BTreeSet<u64>,
    /// The engine has a connection (link up given, link down not yet).
    linked: bool,
    /// Per block: (connection, version) of the last replicated application write applied.
    last_app: BTreeMap<u64, (u64, u64)>,
    role_change: Option<PendingRole>,
}

impl Node {
    fn inflight_writes(&self) -> Vec<(u64, Vec<u64>)> {
        self.disk_ops
            .iter()
            .filter_map(|d| match &d.what {
                DiskWhat::Write {
                    first, versions, ..
                } => Some((*first, versions.clone())),
                _ => None,
            })
            .collect()
    }

    fn link_state(&self) -> Option<&'static str> {
        if !self.up {
            return None;
        }
        self.engine.status().link.map(|l| l.state)
    }
}

#[derive(Clone, Debug)]
enum Payload {
    None,
    Data(Vec<u64>),
    Zero(u64),
}

#[derive(Default)]
struct Dir {
    queue: VecDeque<(PeerMsg, Payload)>,
    closing: bool,
    stalled_until: u64,
}

#[derive(Default)]
struct Link {
    /// dirs[i]: from node i to node 1 - i.
    dirs: [Dir; 2],
    conn: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Floor {
    /// Newest acknowledged version that must survive a power cut of the primary
    /// (FUA, or covered by an acknowledged FLUSH or a completed deactivation).
    strict: u64,
    /// Newest acknowledged version.
    loose: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failover {
    /// Stop client I/O on `from`, wait for its replies, then deactivate it.
    Draining {
        from: usize,
        then_activate: bool,
    },
    Deactivating {
        from: usize,
        then_activate: bool,
    },
    Activating {
        to: usize,
        since: u64,
    },
}

/// What the runs exercised.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SimStats {
    pub steps: u64,
    pub writes_acked: u64,
    pub fua_acked: u64,
    pub reads_checked: u64,
    pub flushes_acked: u64,
    pub crashes: u64,
    pub double_crashes: u64,
    pub cuts: u64,
    pub stalls: u64,
    pub timeouts: u64,
    pub redecides: u64,
    pub reconnects: u64,
    pub full_syncs: u64,
    pub resync_chunks: u64,
    pub applies: u64,
    pub activations: u64,
    pub failovers: u64,
    pub forced: u64,
    pub split_brains: u64,
    pub hypothetical_cuts: u64,
    pub settles: u64,
    pub requests_lost_to_crash: u64,
}

impl SimStats {
    fn add(&mut self, o: &SimStats) {
        self.steps += o.steps;
        self.writes_acked += o.writes_acked;
        self.fua_acked += o.fua_acked;
        self.reads_checked += o.reads_checked;
        self.flushes_acked += o.flushes_acked;
        self.crashes += o.crashes;
        self.double_crashes += o.double_crashes;
        self.cuts += o.cuts;
        self.stalls += o.stalls;
        self.timeouts += o.timeouts;
        self.redecides += o.redecides;
        self.reconnects += o.reconnects;
        self.full_syncs += o.full_syncs;
        self.resync_chunks += o.resync_chunks;
        self.applies += o.applies;
        self.activations += o.activations;
        self.failovers += o.failovers;
        self.forced += o.forced;
        self.split_brains += o.split_brains;
        self.hypothetical_cuts += o.hypothetical_cuts;
        self.settles += o.settles;
        self.requests_lost_to_crash += o.requests_lost_to_crash;
    }
}

/// Run identity and the recent-event log printed with a failure.
struct Ctx {
    seed: u64,
    step: usize,
    now: u64,
    trace: bool,
    recent: VecDeque<String>,
}

impl Ctx {
    fn log(&mut self, line: String) {
        let line = format!("[step {} t={}ms] {line}", self.step, self.now);
        if self.trace {
            println!("{line}");
        }
        if self.recent.len() == 80 {
            self.recent.pop_front();
        }
        self.recent.push_back(line);
    }

    fn fail(&self, invariant: &str, msg: String) -> ! {
        let recent: Vec<&str> = self.recent.iter().map(String::as_str).collect();
        panic!(
            "mirror simulation: seed {seed} step {step}: invariant {invariant} violated: {msg}\n\
             last events:\n  {events}\n\
             replay: REPLAY_SEED = {seed} (REPLAY_STEPS = {steps}) in core::mirror::sim::tests, \
             then cargo test --release --lib sim_replay -- --nocapture",
            seed = self.seed,
            step = self.step,
            steps = self.step + 1,
            events = recent.join("\n  "),
        )
    }
}

macro_rules! fail {
    ($sim:expr, $inv:expr, $($arg:tt)*) => {
        $sim.ctx.fail($inv, format!($($arg)*))
    };
}

fn blocks_of(range: ByteRange) -> (u64, u64) {
    assert!(
        range.is_aligned(BLOCK),
        "simulation limit: unaligned {range:?}"
    );
    (range.start() / BLOCK, range.length() / BLOCK)
}

/// What the generation rules see of a node (as `Engine::local_view`).
fn view_of(e: &Engine) -> NodeView {
    let sb = e.meta().superblock();
    NodeView {
        node_id: sb.identity.node_id,
        generations: sb.state.generations,
        flags: sb.state.flags,
        role: sb.state.role,
        dirty: !e.meta().dirty_bitmap().is_empty(),
    }
}

/// The decision both nodes reach, seen from node 1 (index 0).
fn decide_pair(a: &Engine, b: &Engine) -> Decision {
    decide(&view_of(a), &view_of(b))
}

fn side_index(side: Side) -> usize {
    match side {
        Side::Local => 0,
        Side::Peer => 1,
    }
}

// -------------------------------------------------------------------------------------
// The simulation.
// -------------------------------------------------------------------------------------

pub(crate) struct Sim {
    ctx: Ctx,
    rng: Rng,
    scenario: Scenario,
    config: EngineConfig,
    blocks: u64,
    granularity: u64,
    nodes: [Node; 2],
    link: Link,
    next_version: u64,
    floors: BTreeMap<u64, Floor>,
    forced_happened: bool,
    /// Per node: acknowledged writes (block count) made while its peer may lack them
    /// (not replicating), since both nodes were last connected and in sync. Both
    /// non-zero at a connect is a split brain the rules must report.
    apart: [u64; 2],
    first_source: usize,
    /// Why the run cannot continue (split brain reported, connection refused).
    terminal: Option<String>,
    failover: Option<Failover>,
    settling: bool,
    stats: SimStats,
}

impl Sim {
    pub(crate) fn new(seed: u64, scenario: Scenario, trace: bool) -> Sim {
        let mut rng = Rng::new(seed);
        let data_bytes = 128 * MIB;
        let granularity: u32 = [4096, 4096, 16384, 65536][rng.below(4) as usize];
        let config = EngineConfig {
            lock_alignment_bytes: BLOCK,
            sync_interval_ms: 50 + rng.below(150),
            peer_timeout_ms: 4000,
            resync_rate_bytes_per_s: if rng.chance(300) { 64 * MIB } else { 0 },
        };
        let uuid = [(seed as u8) | 1; 16];
        let make = |node_id: u32, peer: u32| {
            let mut p = CreateParams::new(uuid, "sim", node_id, peer, data_bytes);
            p.granularity_bytes = granularity;
            p.al_slot_count = 16;
            let log_offset = p.validate().expect("valid params").log.offset;
            p.cluster_bytes = Some(log_offset + 16 * META_BLOCK_BYTES);
            let (meta, image) = MetaEngine::create(&p).expect("valid params");
            let area = image.to_bytes(meta.layout().cluster_bytes);
            (meta, area)
        };
        let blocks = data_bytes / BLOCK;
        let nodes = [(1, 2), (2, 1)].map(|(id, peer)| {
            let (meta, area) = make(id, peer);
            let idx = id as usize - 1;
            Node {
                engine: Engine::new(config, meta, 0),
                up: true,
                restart_at: 0,
                data: DataDisk::new(blocks, INIT_VERSION[idx]),
                meta: MetaDisk::new(area),
                disk_ops: Vec::new(),
                meta_ops: Vec::new(),
                requests: BTreeMap::new(),
                peer_bufs: BTreeMap::new(),
                next_peer_data: 1,
                resync_bufs: BTreeMap::new(),
                zero_applies: Vec::new(),
                last_client_zero: None,
                flushes_received: BTreeSet::new(),
                linked: false,
                last_app: BTreeMap::new(),
                role_change: None,
            }
        });
        let first_source = rng.below(2) as usize;
        let mut sim = Sim {
            ctx: Ctx {
                seed,
                step: 0,
                now: 0,
                trace,
                recent: VecDeque::new(),
            },
            rng,
            scenario,
            config,
            blocks,
            granularity: u64::from(granularity),
            nodes,
            link: Link::default(),
            next_version: 3,
            floors: BTreeMap::new(),
            forced_happened: false,
            apart: [0; 2],
            first_source,
            terminal: None,
            failover: None,
            settling: false,
            stats: SimStats::default(),
        };
        sim.ctx.log(format!(
            "config: granularity {granularity}, {config:?}, first source node {}",
            first_source + 1
        ));
        for i in 0..2 {
            sim.drain_actions(i);
        }
        sim
    }

    fn region(&self, block: u64) -> u32 {
        (block * BLOCK / self.granularity) as u32
    }

    fn active_nodes(&self) -> Vec<usize> {
        (0..2)
            .filter(|&i| self.nodes[i].up && self.nodes[i].engine.is_active())
            .collect()
    }

    // ---------------------------------------------------------------------------------
    // Engine actions.
    // ---------------------------------------------------------------------------------

    fn drain_actions(&mut self, i: usize) {
        while let Some(action) = self.nodes[i].engine.poll_action() {
            self.on_action(i, action);
        }
        // A zeroes message carries no buffer, so the sim cannot see the engine drop one
        // (e.g. an apply held for the resync-target marking when the link goes): once no
        // apply is live, every recorded one is stale.
        if self.nodes[i].up && self.nodes[i].engine.applies.is_empty() {
            self.nodes[i].zero_applies.clear();
        }
    }

    fn on_action(&mut self, i: usize, action: Action) {
        match action {
            Action::Disk { id, data, op } => self.on_disk_action(i, id, data, op),
            Action::Meta(io) => {
                self.nodes[i].meta.issue(&io);
                self.nodes[i].meta_ops.push(io.id);
            }
            Action::Reply { req, result } => self.on_reply(i, req, result),
            Action::Send { msg, data } => self.on_send(i, msg, data),
            Action::DropLink { reason } => {
                self.ctx
                    .log(format!("node {} asks to drop the link: {reason}", i + 1));
                self.on_drop_link(i, &reason);
            }
            Action::Release(data) => self.on_release(i, data),
            Action::RoleChanged { result } => self.on_role_changed(i, result),
            other => fail!(
                self,
                "6",
                "node {}: unexpected action {other:?} (no verify is run)",
                i + 1
            ),
        }
    }

    fn on_disk_action(&mut self, i: usize, id: DiskOpId, data: Option<DataRef>, op: ClientOp) {
        let what = match op {
            ClientOp::Read { range } => {
                let (first, n) = blocks_of(range);
                match data {
                    Some(DataRef::Request(r)) => {
                        let Some(req) = self.nodes[i].requests.get_mut(&r) else {
                            fail!(self, "6", "node {} reads into unknown request {r:?}", i + 1);
                        };
                        if req.disk_issued
                            || !matches!(req.op, ClientOp::Read { range: q } if q == range)
                        {
                            fail!(
                                self,
                                "6",
                                "node {} disk read {op:?} does not match request {r:?} {:?}",
                                i + 1,
                                req.op
                            );
                        }
                        req.disk_issued = true;
                        DiskWhat::ReadRequest(r, first, n)
                    }
                    Some(DataRef::Resync(b)) => {
                        if self.nodes[i].resync_bufs.insert(b, None).is_some() {
                            fail!(
                                self,
                                "6",
                                "node {}: resync buffer {b:?} allocated twice",
                                i + 1
                            );
                        }
                        DiskWhat::ReadResync(b, first, n)
                    }
                    other => fail!(self, "6", "node {}: read with data {other:?}", i + 1),
                }
            }
            ClientOp::Write { range, fua } => {
                let (first, n) = blocks_of(range);
                let (versions, kind) = match data {
                    Some(DataRef::Request(r)) => {
                        let Some(req) = self.nodes[i].requests.get_mut(&r) else {
                            fail!(
                                self,
                                "6",
                                "node {} writes from unknown request {r:?}",
                                i + 1
                            );
                        };
                        if req.disk_issued
                            || !matches!(req.op, ClientOp::Write { range: q, .. } if q == range)
                        {
                            fail!(
                                self,
                                "6",
                                "node {}: disk write {op:?} does not match request {r:?} {:?} (or issued twice)",
                                i + 1,
                                req.op
                            );
                        }
                        req.disk_issued = true;
                        (vec![req.version; n as usize], WriteKind::Client)
                    }
                    Some(DataRef::Peer(p)) => {
                        let Some(buf) = self.nodes[i].peer_bufs.remove(&p) else {
                            fail!(
                                self,
                                "6",
                                "node {}: peer data {p:?} used but not held (used twice or released)",
                                i + 1
                            );
                        };
                        if buf.versions.len() as u64 != n {
                            fail!(
                                self,
                                "6",
                                "node {}: peer data {p:?} has {} blocks, written as {op:?}",
                                i + 1,
                                buf.versions.len()
                            );
                        }
                        let kind = if buf.resync {
                            WriteKind::Resync(buf.conn)
                        } else {
                            WriteKind::Apply(buf.conn)
                        };
                        (buf.versions, kind)
                    }
                    other => fail!(self, "6", "node {}: write with data {other:?}", i + 1),
                };
                DiskWhat::Write {
                    first,
                    versions,
                    fua,
                    kind,
                }
            }
            ClientOp::WriteZeroes { range, fua, .. } => {
                if data.is_some() {
                    fail!(self, "6", "node {}: zeroes with data {data:?}", i + 1);
                }
                let (first, n) = blocks_of(range);
                let node = &mut self.nodes[i];
                let client = node
                    .requests
                    .iter()
                    .find(|(_, r)| {
                        !r.disk_issued
                            && matches!(r.op, ClientOp::WriteZeroes { range: q, .. } | ClientOp::Trim { range: q, .. } if q == range)
                    })
                    .map(|(id, _)| *id);
                let (version, kind) = if let Some(r) = client {
                    let req = node.requests.get_mut(&r).expect("found");
                    req.disk_issued = true;
                    node.last_client_zero = Some((range, req.version));
                    (req.version, WriteKind::Client)
                } else if let Some(pos) = node.zero_applies.iter().position(|z| z.range == range) {
                    let z = node.zero_applies.remove(pos);
                    (z.version, WriteKind::Apply(z.conn))
                } else {
                    fail!(
                        self,
                        "6",
                        "node {}: zeroes {range:?} from no client request and no peer message",
                        i + 1
                    );
                };
                DiskWhat::Write {
                    first,
                    versions: vec![version; n as usize],
                    fua,
                    kind,
                }
            }
            ClientOp::Flush => DiskWhat::Flush {
                capture: self.nodes[i].data.flush_capture(),
            },
            other => fail!(self, "6", "node {}: unexpected disk op {other:?}", i + 1),
        };
        self.nodes[i].disk_ops.push(DiskRec { id, what });
    }

    fn on_reply(&mut self, i: usize, req: ReqId, result: Result<(), Errno>) {
        let Some(r) = self.nodes[i].requests.remove(&req) else {
            fail!(
                self,
                "6",
                "node {}: reply to unknown request {req:?} (a second reply?)",
                i + 1
            );
        };
        if let Err(errno) = result {
            fail!(
                self,
                "6",
                "node {}: request {req:?} {:?} answered {errno:?} though no error was injected",
                i + 1,
                r.op
            );
        }
        match r.op {
            ClientOp::Write { range, fua }
            | ClientOp::WriteZeroes { range, fua, .. }
            | ClientOp::Trim { range, fua } => {
                let (first, n) = blocks_of(range);
                for b in first..first + n {
                    // Inv 1: the acknowledged write is in the primary's view.
                    let view = self.nodes[i].data.view(b);
                    if view < r.version {
                        fail!(
                            self,
                            "1",
                            "node {} acknowledged write v{} ({:?}) but block {b} reads v{view}",
                            i + 1,
                            r.version,
                            r.op
                        );
                    }
                    let f = self.floors.entry(b).or_default();
                    // Inv 4: overlapping writes are acknowledged in submission order.
                    if f.loose > r.version {
                        let loose = f.loose;
                        fail!(
                            self,
                            "4",
                            "node {}: write v{} acknowledged after the newer overlapping v{loose} (block {b})",
                            i + 1,
                            r.version
                        );
                    }
                    f.loose = r.version;
                    if fua {
                        f.strict = f.strict.max(r.version);
                    }
                }
                let replicating = matches!(
                    self.nodes[i].link_state(),
                    Some("connected" | "sync-source" | "sync-target")
                );
                if !replicating {
                    self.apart[i] += n;
                }
                self.stats.writes_acked += 1;
                if fua {
                    self.stats.fua_acked += 1;
                }
                self.ctx
                    .log(format!("node {} acked v{} {:?}", i + 1, r.version, r.op));
            }
            ClientOp::Read { range } => {
                let Some(data) = r.read_data else {
                    fail!(
                        self,
                        "6",
                        "node {}: read {req:?} answered before its disk read completed",
                        i + 1
                    );
                };
                let (first, _) = blocks_of(range);
                for (b, floor) in r.floors_at_issue {
                    let got = data[(b - first) as usize];
                    if got < floor {
                        fail!(
                            self,
                            "1",
                            "node {}: read of block {b} returned v{got}, older than acknowledged v{floor}",
                            i + 1
                        );
                    }
                }
                self.stats.reads_checked += 1;
            }
            ClientOp::Flush => {
                for (b, loose) in r.floors_at_issue {
                    let f = self.floors.entry(b).or_default();
                    f.strict = f.strict.max(loose);
                }
                self.stats.flushes_acked += 1;
                self.ctx.log(format!("node {} acked FLUSH", i + 1));
            }
            ClientOp::Cache { .. } => {}
        }
    }

    fn on_send(&mut self, i: usize, msg: PeerMsg, data: Option<DataRef>) {
        let payload = match (&msg, data) {
            (PeerMsg::Write { range, .. }, Some(DataRef::Request(r))) => {
                let Some(req) = self.nodes[i].requests.get(&r) else {
                    fail!(
                        self,
                        "6",
                        "node {}: sends data of unknown request {r:?}",
                        i + 1
                    );
                };
                if !matches!(req.op, ClientOp::Write { range: q, .. } if q == *range) {
                    fail!(
                        self,
                        "6",
                        "node {}: sends {msg:?} with the buffer of {:?}",
                        i + 1,
                        req.op
                    );
                }
                Payload::Data(vec![req.version; (range.length() / BLOCK) as usize])
            }
            (PeerMsg::ResyncData { range, .. }, Some(DataRef::Resync(b))) => {
                let Some(buf) = self.nodes[i].resync_bufs.remove(&b) else {
                    fail!(
                        self,
                        "6",
                        "node {}: sends resync buffer {b:?} it does not hold",
                        i + 1
                    );
                };
                let Some(versions) = buf else {
                    fail!(
                        self,
                        "6",
                        "node {}: sends resync buffer {b:?} before its read completed",
                        i + 1
                    );
                };
                if versions.len() as u64 != range.length() / BLOCK {
                    fail!(
                        self,
                        "6",
                        "node {}: resync buffer {b:?} size does not match {msg:?}",
                        i + 1
                    );
                }
                self.stats.resync_chunks += 1;
                Payload::Data(versions)
            }
            (PeerMsg::WriteZeroes { range, .. }, None) => {
                match self.nodes[i].last_client_zero.take() {
                    Some((q, v)) if q == *range => Payload::Zero(v),
                    other => fail!(
                        self,
                        "6",
                        "node {}: sends {msg:?} not right after its local zeroes (last {other:?})",
                        i + 1
                    ),
                }
            }
            (PeerMsg::FlushAck { seq }, None) => {
                if !self.nodes[i].flushes_received.remove(seq) {
                    fail!(
                        self,
                        "6",
                        "node {}: sends FlushAck {seq} for a flush not received on this connection",
                        i + 1
                    );
                }
                Payload::None
            }
            (_, None) => Payload::None,
            (_, Some(d)) => fail!(
                self,
                "6",
                "node {}: sends {msg:?} with unexpected data {d:?}",
                i + 1
            ),
        };
        let dir = &mut self.link.dirs[i];
        if self.nodes[i].linked && !dir.closing {
            dir.queue.push_back((msg, payload));
        }
    }

    fn on_drop_link(&mut self, i: usize, reason: &str) {
        if reason.contains("split brain") {
            self.stats.split_brains += 1;
            if !self.forced_happened {
                fail!(
                    self,
                    "7",
                    "node {} reports split brain though no node was ever force-activated: {reason}",
                    i + 1
                );
            }
            self.terminal = Some(format!("split brain: {reason}"));
        } else if reason.contains("both nodes are Primary") {
            if !self.scenario.racing_activation {
                fail!(self, "7", "node {}: {reason}", i + 1);
            }
            self.terminal = Some(reason.to_string());
        } else if reason.contains("refused:") {
            // The rules refuse (source mid-resync, target Primary): an operator must act.
            if !self.forced_happened {
                fail!(
                    self,
                    "7",
                    "node {} refuses the connection though no node was ever force-activated: {reason}",
                    i + 1
                );
            }
            self.terminal = Some(reason.to_string());
        } else if reason.contains("did not answer") {
            self.stats.timeouts += 1;
        } else if reason.contains("reconnecting") {
            // The engine saw its (or the peer's) state change under the handshake and
            // reconnects to decide on fresh state: a cut like any other.
            self.stats.redecides += 1;
        } else {
            fail!(self, "7", "node {} drops the link: {reason}", i + 1);
        }
        self.cut("engine DropLink");
    }

    fn on_release(&mut self, i: usize, data: DataRef) {
        let ok = match data {
            DataRef::Peer(p) => self.nodes[i].peer_bufs.remove(&p).is_some(),
            DataRef::Resync(b) => self.nodes[i].resync_bufs.remove(&b).is_some(),
            DataRef::Request(_) => false,
        };
        if !ok {
            fail!(
                self,
                "6",
                "node {}: Release({data:?}) of a buffer it does not hold (released twice or after use)",
                i + 1
            );
        }
    }

    fn on_role_changed(&mut self, i: usize, result: Result<(), String>) {
        let Some(pending) = self.nodes[i].role_change.take() else {
            fail!(
                self,
                "7",
                "node {}: RoleChanged {result:?} without a pending role change",
                i + 1
            );
        };
        self.ctx
            .log(format!("node {}: {pending:?} -> {result:?}", i + 1));
        let Ok(()) = result else {
            return;
        };
        match pending {
            PendingRole::Activate { forced } => {
                self.stats.activations += 1;
                let actives = self.active_nodes();
                if actives.len() > 1 && !self.scenario.racing_activation {
                    fail!(
                        self,
                        "7",
                        "node {} activated while node {} is active",
                        i + 1,
                        2 - i
                    );
                }
                if !forced {
                    self.check_floors(i, false, "activation");
                }
                if self.scenario.racing_activation && self.rng.chance(300) {
                    // The operator activates the other node too, before it heard of this.
                    let j = 1 - i;
                    if self.nodes[j].up && self.nodes[j].role_change.is_none() {
                        self.try_activate(j, false);
                    }
                }
            }
            PendingRole::Deactivate => {
                // Deactivation drains and flushes (issue 4): everything acknowledged is
                // durable from now on.
                for f in self.floors.values_mut() {
                    f.strict = f.strict.max(f.loose);
                }
            }
        }
    }

    // ---------------------------------------------------------------------------------
    // Events.
    // ---------------------------------------------------------------------------------

    fn deliver(&mut self, d: usize) {
        let j = 1 - d;
        let (msg, payload) = self.link.dirs[d].queue.pop_front().expect("deliverable");
        let conn = self.link.conn;
        let data = match payload {
            Payload::Data(versions) => {
                let node = &mut self.nodes[j];
                let id = PeerDataId(node.next_peer_data);
                node.next_peer_data += 1;
                node.peer_bufs.insert(
                    id,
                    PeerBuf {
                        versions,
                        resync: matches!(msg, PeerMsg::ResyncData { .. }),
                        conn,
                    },
                );
                Some(id)
            }
            Payload::Zero(version) => {
                if let PeerMsg::WriteZeroes { range, .. } = msg
                    && self.nodes[j].link_state() != Some("disconnecting")
                {
                    self.nodes[j].zero_applies.push(ZeroApply {
                        range,
                        version,
                        conn,
                    });
                }
                None
            }
            Payload::None => None,
        };
        if self.ctx.trace {
            self.ctx
                .log(format!("deliver to node {}: {}", j + 1, short(&msg)));
        }
        if let PeerMsg::Flush { seq } = msg {
            self.nodes[j].flushes_received.insert(seq);
        }
        self.nodes[j].engine.handle_peer(msg, data);
        self.drain_actions(j);
    }

    fn deliver_link_down(&mut self, j: usize) {
        let random = self.rng.next_u64();
        self.nodes[j].linked = false;
        self.ctx.log(format!("node {}: link down", j + 1));
        self.nodes[j].engine.handle_link_down(random);
        self.drain_actions(j);
        self.maybe_reset_link();
    }

    fn maybe_reset_link(&mut self) {
        if !self.nodes[0].linked && !self.nodes[1].linked {
            self.link.dirs = Default::default();
        }
    }

    /// Cuts the connection: a random prefix of what is in flight still arrives.
    fn cut(&mut self, why: &str) {
        if !self.nodes[0].linked && !self.nodes[1].linked {
            return;
        }
        if !self.link.dirs[0].closing || !self.link.dirs[1].closing {
            self.ctx.log(format!("link cut ({why})"));
        }
        for d in 0..2 {
            let dir = &mut self.link.dirs[d];
            if !dir.closing {
                dir.closing = true;
                let keep = self.rng.below(dir.queue.len() as u64 + 1) as usize;
                dir.queue.truncate(keep);
            }
        }
    }

    fn complete_disk(&mut self, i: usize) {
        let k = self.rng.below(self.nodes[i].disk_ops.len() as u64) as usize;
        let rec = self.nodes[i].disk_ops.swap_remove(k);
        match rec.what {
            DiskWhat::Write {
                first,
                versions,
                fua,
                kind,
            } => {
                for (k, &v) in versions.iter().enumerate() {
                    let b = first + k as u64;
                    let view = self.nodes[i].data.view(b);
                    match kind {
                        WriteKind::Client | WriteKind::Apply(_) => {
                            // Inv 4: application writes land in version order on each node.
                            if v <= view && view > INIT_VERSION[1] {
                                fail!(
                                    self,
                                    "4",
                                    "node {}: {kind:?} write v{v} lands on block {b} over newer v{view}",
                                    i + 1
                                );
                            }
                            if let WriteKind::Apply(conn) = kind {
                                self.nodes[i].last_app.insert(b, (conn, v));
                            }
                        }
                        WriteKind::Resync(conn) => {
                            // Inv 3: resync never overwrites a newer application write.
                            if let Some(&(c, app)) = self.nodes[i].last_app.get(&b)
                                && c == conn
                                && app > v
                                && view == app
                            {
                                fail!(
                                    self,
                                    "3",
                                    "node {}: resync writes v{v} over newer application write v{app} on block {b}",
                                    i + 1
                                );
                            }
                        }
                    }
                }
                if matches!(kind, WriteKind::Apply(_)) {
                    self.stats.applies += 1;
                }
                self.nodes[i].data.complete_write(first, &versions, fua);
            }
            DiskWhat::ReadRequest(r, first, n) => {
                let data: Vec<u64> = (first..first + n)
                    .map(|b| self.nodes[i].data.view(b))
                    .collect();
                match self.nodes[i].requests.get_mut(&r) {
                    Some(req) => req.read_data = Some(data),
                    None => fail!(
                        self,
                        "6",
                        "node {}: read {r:?} completed after its reply",
                        i + 1
                    ),
                }
            }
            DiskWhat::ReadResync(b, first, n) => {
                let data: Vec<u64> = (first..first + n)
                    .map(|b| self.nodes[i].data.view(b))
                    .collect();
                match self.nodes[i].resync_bufs.get_mut(&b) {
                    Some(slot @ None) => *slot = Some(data),
                    other => fail!(
                        self,
                        "6",
                        "node {}: resync read into buffer {b:?} in state {other:?}",
                        i + 1
                    ),
                }
            }
            DiskWhat::Flush { capture } => self.nodes[i].data.flush_complete(capture),
        }
        self.nodes[i].engine.handle_disk_done(rec.id, Ok(()));
        self.drain_actions(i);
    }

    fn complete_meta(&mut self, i: usize) {
        let k = self.rng.below(self.nodes[i].meta_ops.len() as u64) as usize;
        let id = self.nodes[i].meta_ops.swap_remove(k);
        self.nodes[i].meta.complete(id);
        self.nodes[i].engine.handle_meta_done(id, Ok(()));
        self.drain_actions(i);
    }

    fn random_range(&mut self, max_blocks: u64) -> ByteRange {
        let len = if self.rng.chance(850) {
            1 + self.rng.below(8)
        } else {
            1 + self.rng.below(max_blocks)
        };
        let start = match self.rng.below(10) {
            0..=5 => self.rng.below(64),
            6..=7 => {
                let extent = self.rng.below(self.blocks * BLOCK / (4 * MIB));
                extent * (4 * MIB / BLOCK) + self.rng.below(32)
            }
            _ => self.rng.below(self.blocks),
        };
        let start = start.min(self.blocks - len);
        ByteRange::new(start * BLOCK, len * BLOCK).expect("non-empty")
    }

    fn client_op(&mut self, i: usize) {
        let roll = self.rng.below(100);
        let fua = self.rng.chance(200);
        let op = match roll {
            0..=49 => ClientOp::Write {
                range: self.random_range(256),
                fua,
            },
            50..=57 => ClientOp::WriteZeroes {
                range: self.random_range(256),
                fua,
                no_hole: false,
                fast_zero: false,
            },
            58..=62 => ClientOp::Trim {
                range: self.random_range(256),
                fua,
            },
            63..=72 => ClientOp::Flush,
            _ => ClientOp::Read {
                range: self.random_range(64),
            },
        };
        let version = if op.modification().is_some() {
            self.next_version += 1;
            self.next_version - 1
        } else {
            0
        };
        let floors_at_issue = match op {
            ClientOp::Read { range } => {
                let (first, n) = blocks_of(range);
                self.floors
                    .range(first..first + n)
                    .map(|(b, f)| (*b, f.loose))
                    .collect()
            }
            ClientOp::Flush => self.floors.iter().map(|(b, f)| (*b, f.loose)).collect(),
            _ => Vec::new(),
        };
        let req = self.nodes[i].engine.handle_client(op);
        self.ctx.log(format!(
            "node {}: client {req:?} {op:?}{}",
            i + 1,
            if version > 0 {
                format!(" = v{version}")
            } else {
                String::new()
            }
        ));
        let fresh = Req {
            op,
            version,
            disk_issued: false,
            floors_at_issue,
            read_data: None,
        };
        if self.nodes[i].requests.insert(req, fresh).is_some() {
            fail!(
                self,
                "6",
                "node {}: request id {req:?} reused while in flight",
                i + 1
            );
        }
        self.drain_actions(i);
    }

    fn advance_time(&mut self, ms: u64) {
        self.ctx.now += ms;
        let now = self.ctx.now;
        for i in 0..2 {
            if self.nodes[i].up {
                self.nodes[i].engine.handle_timeout(now);
                self.drain_actions(i);
            } else if now >= self.nodes[i].restart_at {
                self.restart(i);
            }
        }
    }

    /// A power cut of node `i`: volatile disk and metadata state is lost (any subset of
    /// unflushed writes survives, torn), the shell dies with its buffers and requests.
    fn crash(&mut self, i: usize) {
        if !self.nodes[i].up {
            return;
        }
        self.stats.crashes += 1;
        let policy = self.rng.below(4);
        let was_primary = self.nodes[i].engine.role() == Role::Primary;
        self.ctx.log(format!(
            "CRASH node {} (was {:?}, policy {policy})",
            i + 1,
            self.nodes[i].engine.role()
        ));
        let inflight = self.nodes[i].inflight_writes();
        let overlay = self.nodes[i]
            .data
            .crash_overlay(&mut self.rng, &inflight, policy);
        let meta_image = self.nodes[i].meta.crash_image(&mut self.rng, policy);
        let node = &mut self.nodes[i];
        for (b, v) in overlay {
            node.data.durable[b as usize] = v;
        }
        node.data.cache.clear();
        node.meta = MetaDisk::new(meta_image);
        node.disk_ops.clear();
        node.meta_ops.clear();
        self.stats.requests_lost_to_crash += node.requests.len() as u64;
        node.requests.clear();
        node.peer_bufs.clear();
        node.resync_bufs.clear();
        node.zero_applies.clear();
        node.last_client_zero = None;
        node.flushes_received.clear();
        node.last_app.clear();
        node.role_change = None;
        node.up = false;
        node.restart_at = self.ctx.now + self.rng.below(3000);
        if node.linked {
            node.linked = false;
            // What it sent may still arrive; nothing more reaches it.
            let out = &mut self.link.dirs[i];
            if !out.closing {
                out.closing = true;
                let keep = self.rng.below(out.queue.len() as u64 + 1) as usize;
                out.queue.truncate(keep);
            }
            let inbound = &mut self.link.dirs[1 - i];
            inbound.closing = true;
            inbound.queue.clear();
            self.maybe_reset_link();
        }
        if was_primary {
            // The primary's cache is gone: only FLUSHed / FUA writes must survive.
            for f in self.floors.values_mut() {
                f.loose = f.strict;
            }
        }
        if matches!(
            self.failover,
            Some(Failover::Draining { from, .. } | Failover::Deactivating { from, .. }) if from == i
        ) || matches!(self.failover, Some(Failover::Activating { to, .. }) if to == i)
        {
            self.failover = None;
        }
    }

    fn restart(&mut self, i: usize) {
        let (meta, report) = match MetaEngine::recover(&self.nodes[i].meta.durable, None) {
            Ok(r) => r,
            Err(e) => fail!(
                self,
                "2",
                "node {}: recovery after a power cut failed: {e}",
                i + 1
            ),
        };
        self.ctx.log(format!(
            "node {} restarts: {} dirty regions ({} from the journal), {} hot extents",
            i + 1,
            report.dirty_regions,
            report.journal_dirty_regions,
            report.al_hot_extents
        ));
        self.nodes[i].engine = Engine::new(self.config, meta, self.ctx.now);
        self.nodes[i].up = true;
        self.drain_actions(i);
    }

    fn can_reconnect(&self) -> bool {
        self.terminal.is_none() && self.nodes.iter().all(|n| n.up && !n.linked)
    }

    fn reconnect(&mut self) {
        self.check_pre_connect();
        self.stats.reconnects += 1;
        self.link = Link {
            dirs: Default::default(),
            conn: self.link.conn + 1,
        };
        let epoch = self.nodes[0]
            .engine
            .next_epoch_proposal()
            .max(self.nodes[1].engine.next_epoch_proposal());
        let states = [
            self.nodes[0].engine.node_state(),
            self.nodes[1].engine.node_state(),
        ];
        self.ctx.log(format!(
            "reconnect (conn {}, epoch {epoch}): node 1 {:?} {:?} {:?}, node 2 {:?} {:?} {:?}",
            self.link.conn,
            states[0].role,
            states[0].disk_state,
            states[0].generations,
            states[1].role,
            states[1].disk_state,
            states[1].generations
        ));
        for i in 0..2 {
            self.nodes[i].linked = true;
            self.nodes[i].flushes_received.clear();
        }
        for i in 0..2 {
            self.nodes[i].engine.handle_link_up(epoch, states[1 - i]);
            self.drain_actions(i);
        }
    }

    fn try_activate(&mut self, i: usize, forced: bool) {
        let node = &self.nodes[i];
        if !node.up || node.role_change.is_some() || node.engine.role() == Role::Primary {
            return;
        }
        let eligible = node.linked
            && node
                .link_state()
                .is_some_and(|s| s != "connecting" && s != "disconnecting")
            && node.engine.disk_state() == DiskState::UpToDate;
        let other_active = self.nodes[1 - i].up
            && (self.nodes[1 - i].engine.role() == Role::Primary
                || self.nodes[1 - i].role_change.is_some());
        let random = self.rng.next_u64();
        let result = self.nodes[i].engine.activate(forced, random);
        self.ctx.log(format!(
            "operator: activate node {} (forced {forced}) -> {result:?}",
            i + 1
        ));
        if result.is_err() {
            return;
        }
        if forced && !self.nodes[i].linked {
            self.stats.forced += 1;
            self.forced_happened = true;
            // Issue 5: no acknowledged write lost is waived for what the forced node
            // lacks (and for what it holds only in its volatile cache).
            let node = &self.nodes[i];
            for (b, f) in self.floors.iter_mut() {
                let view = node.data.view(*b);
                let durable = node.data.durable[*b as usize];
                f.loose = f.loose.min(view);
                f.strict = f.strict.min(view).min(durable);
            }
        } else if !eligible || other_active {
            // Inv 7: only an UpToDate, connected disk whose peer is not active.
            fail!(
                self,
                "7",
                "node {} accepted activation though eligible={eligible} (linked {}, {:?}, link {:?}) other_active={other_active}",
                i + 1,
                self.nodes[i].linked,
                self.nodes[i].engine.disk_state(),
                self.nodes[i].link_state()
            );
        }
        self.nodes[i].role_change = Some(PendingRole::Activate { forced });
        self.drain_actions(i);
    }

    // ---------------------------------------------------------------------------------
    // The operator / failover manager.
    // ---------------------------------------------------------------------------------

    fn driver(&mut self) {
        if self.terminal.is_some() {
            return;
        }
        // Both disks new: the operator picks the source (`rebuild --full --from`).
        if self.nodes.iter().all(|n| n.up && n.linked)
            && self.nodes[0].link_state() == Some("waiting-for-operator")
            && self.nodes[1].link_state() == Some("waiting-for-operator")
            && !self.link.dirs[0].closing
        {
            let s = self.first_source;
            let random = self.rng.next_u64();
            let result = self.nodes[s].engine.start_full_sync(random);
            self.ctx.log(format!(
                "operator: full sync from node {} -> {result:?}",
                s + 1
            ));
            if result.is_ok() {
                self.stats.full_syncs += 1;
            }
            self.drain_actions(s);
        }
        if self.can_reconnect() && (self.settling || self.rng.chance(50)) {
            self.reconnect();
        }
        self.drive_failover();
        let busy = self.failover.is_some()
            || self.nodes.iter().any(|n| n.role_change.is_some())
            || !self.active_nodes().is_empty();
        if !busy && (self.settling || self.rng.chance(100)) {
            // Activate an UpToDate connected node (the failover manager's choice).
            let start = self.rng.below(2) as usize;
            for k in 0..2 {
                let i = (start + k) % 2;
                if self.nodes[i].up
                    && self.nodes[i].linked
                    && self.nodes[i].engine.disk_state() == DiskState::UpToDate
                {
                    self.try_activate(i, false);
                    break;
                }
            }
        }
        if self.settling {
            return;
        }
        let busy = self.failover.is_some()
            || self.nodes.iter().any(|n| n.role_change.is_some())
            || !self.active_nodes().is_empty();
        if !busy && self.rng.chance(20) {
            // Probe: the operator asks any node; the engine must refuse unless allowed.
            let i = self.rng.below(2) as usize;
            self.try_activate(i, false);
        }
        if self.scenario.forced && !busy && self.rng.chance(3) {
            let i = self.rng.below(2) as usize;
            let other = &self.nodes[1 - i];
            let other_inactive = !other.up || other.engine.role() == Role::Secondary;
            if self.nodes[i].up && !self.nodes[i].linked && other_inactive {
                self.try_activate(i, true);
            }
        }
        if self.scenario.failovers && self.failover.is_none() {
            let actives = self.active_nodes();
            if let [a] = actives[..] {
                let b = 1 - a;
                let peer_ready = self.nodes[b].up
                    && self.nodes[b].linked
                    && self.nodes[b].engine.disk_state() == DiskState::UpToDate;
                if peer_ready && self.rng.chance(4) {
                    self.stats.failovers += 1;
                    self.ctx.log(format!(
                        "operator: failover node {} -> node {}",
                        a + 1,
                        b + 1
                    ));
                    self.failover = Some(Failover::Draining {
                        from: a,
                        then_activate: true,
                    });
                } else if self.rng.chance(1) {
                    self.ctx.log(format!("operator: deactivate node {}", a + 1));
                    self.failover = Some(Failover::Draining {
                        from: a,
                        then_activate: false,
                    });
                }
            }
        }
        if (self.nodes[0].linked || self.nodes[1].linked) && self.rng.chance(4) {
            self.stats.cuts += 1;
            self.cut("operator");
        }
        if self.scenario.stalls
            && self.nodes[0].linked
            && self.nodes[1].linked
            && self.rng.chance(1)
        {
            let d = self.rng.below(2) as usize;
            self.stats.stalls += 1;
            self.link.dirs[d].stalled_until =
                self.ctx.now + self.config.peer_timeout_ms + 500 + self.rng.below(2000);
            self.ctx
                .log(format!("link stall node {} -> node {}", d + 1, 2 - d));
        }
        if self.scenario.crashes && self.rng.chance(3) {
            if self.rng.chance(200) {
                self.stats.double_crashes += 1;
                self.crash(0);
                self.crash(1);
            } else {
                let i = self.rng.below(2) as usize;
                self.crash(i);
            }
        }
    }

    fn drive_failover(&mut self) {
        let Some(f) = self.failover else {
            return;
        };
        match f {
            Failover::Draining {
                from,
                then_activate,
            } => {
                if !self.nodes[from].up {
                    self.failover = None;
                } else if self.nodes[from].requests.is_empty() {
                    let result = self.nodes[from].engine.deactivate();
                    self.ctx.log(format!(
                        "operator: deactivate node {} -> {result:?}",
                        from + 1
                    ));
                    match result {
                        Ok(()) => {
                            self.nodes[from].role_change = Some(PendingRole::Deactivate);
                            self.failover = Some(Failover::Deactivating {
                                from,
                                then_activate,
                            });
                            self.drain_actions(from);
                        }
                        Err(_) => self.failover = None,
                    }
                }
            }
            Failover::Deactivating {
                from,
                then_activate,
            } => {
                if !self.nodes[from].up {
                    self.failover = None;
                } else if self.nodes[from].role_change.is_none() {
                    self.failover = then_activate.then_some(Failover::Activating {
                        to: 1 - from,
                        since: self.ctx.now,
                    });
                }
            }
            Failover::Activating { to, since } => {
                let done = self.nodes[to].up && self.nodes[to].engine.is_active();
                let gave_up = !self.nodes[to].up || self.ctx.now > since + 5000;
                if done || gave_up {
                    self.failover = None;
                } else if self.nodes[to].role_change.is_none() && self.rng.chance(200) {
                    self.try_activate(to, false);
                }
            }
        }
    }

    // ---------------------------------------------------------------------------------
    // Scheduling.
    // ---------------------------------------------------------------------------------

    /// Picks and runs one event; false when nothing but time can move.
    fn run_event(&mut self, allow_client: bool) -> bool {
        #[derive(Clone, Copy)]
        enum Ev {
            Deliver(usize),
            LinkDown(usize),
            Disk(usize),
            Meta(usize),
            Client(usize),
        }
        let mut events: Vec<(Ev, u64)> = Vec::new();
        for d in 0..2 {
            let j = 1 - d;
            let dir = &self.link.dirs[d];
            if !dir.queue.is_empty() && dir.stalled_until <= self.ctx.now && self.nodes[j].up {
                events.push((Ev::Deliver(d), 30));
            }
            if self.nodes[j].up
                && self.nodes[j].linked
                && self.link.dirs[d].closing
                && self.link.dirs[d].queue.is_empty()
            {
                events.push((Ev::LinkDown(j), 15));
            }
        }
        for i in 0..2 {
            if !self.nodes[i].up {
                continue;
            }
            if !self.nodes[i].disk_ops.is_empty() {
                events.push((Ev::Disk(i), 25));
            }
            if !self.nodes[i].meta_ops.is_empty() {
                events.push((Ev::Meta(i), 25));
            }
        }
        if allow_client && !self.settling {
            for i in self.active_nodes() {
                // The shell stops the export before it deactivates (issue 4 hooks).
                let draining = matches!(self.failover, Some(Failover::Draining { from, .. }) if from == i)
                    || self.nodes[i].role_change.is_some();
                if !draining && self.nodes[i].requests.len() < MAX_CLIENT_IN_FLIGHT {
                    events.push((Ev::Client(i), 20));
                }
            }
        }
        if events.is_empty() {
            return false;
        }
        let total: u64 = events.iter().map(|e| e.1).sum();
        let mut pick = self.rng.below(total);
        let ev = events
            .iter()
            .find(|(_, w)| {
                if pick < *w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .expect("weighted pick")
            .0;
        match ev {
            Ev::Deliver(d) => self.deliver(d),
            Ev::LinkDown(j) => self.deliver_link_down(j),
            Ev::Disk(i) => self.complete_disk(i),
            Ev::Meta(i) => self.complete_meta(i),
            Ev::Client(i) => self.client_op(i),
        }
        true
    }

    fn step(&mut self) {
        self.driver();
        let stalled = self
            .link
            .dirs
            .iter()
            .any(|d| d.stalled_until > self.ctx.now);
        if self.rng.chance(60) || !self.run_event(true) {
            let ms = if stalled {
                100 + self.rng.below(900)
            } else {
                1 + self.rng.below(10)
            };
            self.advance_time(ms);
        }
        self.check_step();
        if self.ctx.trace {
            for n in self.nodes.iter().filter(|n| n.up) {
                println!("    dump: {}", engine_dump(&n.engine));
            }
        }
    }

    // ---------------------------------------------------------------------------------
    // Checks.
    // ---------------------------------------------------------------------------------

    fn check_step(&mut self) {
        // Inv 7: at most one active node.
        let actives = self.active_nodes();
        if actives.len() > 1 && !self.scenario.racing_activation {
            fail!(self, "7", "both nodes are active");
        }
        if self.nodes.iter().all(|n| n.up && n.linked)
            && self
                .nodes
                .iter()
                .all(|n| n.link_state() == Some("connected"))
            && self.nodes.iter().all(|n| n.engine.role() == Role::Primary)
        {
            fail!(self, "7", "both nodes Primary on one connection");
        }
        let same_current = self.nodes[0].engine.generations().current
            == self.nodes[1].engine.generations().current;
        if same_current
            || self.nodes.iter().all(|n| n.linked)
                && self
                    .nodes
                    .iter()
                    .any(|n| n.link_state() == Some("connected"))
        {
            // Both hold every acknowledged write again: equal current generations (a
            // node makes a new one before it acknowledges anything its peer may lack; a
            // resync target takes the source's at its finish; a node that is down keeps
            // the one it had), or a side shows "connected" (replicating, no resync:
            // an in-sync connect, or a resync whose target finished).
            self.apart = [0; 2];
        }
        if self.ctx.step.is_multiple_of(16) {
            for i in actives {
                self.check_floors(i, false, "periodic");
            }
        }
        if self.rng.chance(40) {
            self.check_double_crash("hypothetical power cut of both nodes");
        }
    }

    /// Inv 1 on node `i`'s view (`strict`: only FLUSHed/FUA writes).
    fn check_floors(&self, i: usize, strict: bool, when: &str) {
        let node = &self.nodes[i];
        for (b, f) in &self.floors {
            let need = if strict { f.strict } else { f.loose };
            let view = node.data.view(*b);
            if view < need {
                fail!(
                    self,
                    "1",
                    "{when}: node {} block {b} holds v{view}, acknowledged v{need} (strict {}, loose {}) is lost",
                    i + 1,
                    f.strict,
                    f.loose
                );
            }
        }
    }

    /// Inv 2 at a real reconnect: what differs is journaled on one side or the other.
    fn check_pre_connect(&mut self) {
        let decision = decide_pair(&self.nodes[0].engine, &self.nodes[1].engine);
        // Split brain always detected: both nodes acknowledged writes the other may
        // lack since they were last in sync; any copy or "in sync" would lose one side's.
        let refused = decision.resync().is_none()
            && !matches!(
                decision.outcome,
                Outcome::InSync { .. } | Outcome::BothJustCreated
            );
        if self.apart[0] > 0 && self.apart[1] > 0 && !refused {
            fail!(
                self,
                "7",
                "split brain missed: both nodes wrote apart (node 1 {} blocks, node 2 {} blocks), yet the rules decide {decision}",
                self.apart[0],
                self.apart[1]
            );
        }
        // Never a rebuild in the wrong direction: the source holds every acknowledged
        // write (what a forced activation waived is no longer in the floors).
        if let Some(resync) = decision.resync() {
            let source = side_index(resync.from);
            let view = |b: u64| self.nodes[source].data.view(b);
            if let Some((b, f)) = self.floors.iter().find(|(b, f)| view(**b) < f.loose) {
                fail!(
                    self,
                    "1",
                    "rebuild in the wrong direction: {decision} copies from node {}, whose block {b} holds v{}, older than acknowledged v{}",
                    source + 1,
                    view(*b),
                    f.loose
                );
            }
        }
        let copies_all = decision.resync().is_some_and(|r| r.full);
        let in_sync_clean = matches!(decision.outcome, Outcome::InSync { resync_from: None });
        if copies_all || (decision.resync().is_none() && !in_sync_clean) {
            return;
        }
        let union =
            self.nodes[0].engine.meta().dirty_bitmap() | self.nodes[1].engine.meta().dirty_bitmap();
        let mut differ = image_diff(
            &self.nodes[0].data.durable,
            &self.nodes[0].data.view_overlay(),
            &self.nodes[1].data.durable,
            &self.nodes[1].data.view_overlay(),
        );
        for node in &self.nodes {
            for (first, versions) in node.inflight_writes() {
                differ.extend(first..first + versions.len() as u64);
            }
        }
        let missing: Vec<u64> = differ
            .iter()
            .copied()
            .filter(|&b| !union.contains(self.region(b)))
            .take(8)
            .collect();
        if let Some(&b) = missing.first() {
            fail!(
                self,
                "2",
                "at reconnect ({decision:?}) blocks {missing:?} differ (node 1 v{}, node 2 v{}) but neither journal marks them",
                self.nodes[0].data.view(b),
                self.nodes[1].data.view(b)
            );
        }
    }

    /// Inv 2 and 1 after a hypothetical power cut of both nodes now: recover both
    /// CLUSTER partitions, let the generation rules pick the rebuild, and check that the
    /// rebuild covers every difference and loses no durable acknowledged write.
    fn check_double_crash(&mut self, what: &str) {
        if self.terminal.is_some() {
            return;
        }
        self.stats.hypothetical_cuts += 1;
        let policy = self.rng.below(4);
        let mut overlays = Vec::new();
        let mut states = Vec::new();
        let mut views = Vec::new();
        let mut dirty = Vec::new();
        for i in 0..2 {
            let inflight = self.nodes[i].inflight_writes();
            let overlay = self.nodes[i]
                .data
                .crash_overlay(&mut self.rng, &inflight, policy);
            let image = self.nodes[i].meta.crash_image(&mut self.rng, policy);
            let meta = match MetaEngine::recover(&image, None) {
                Ok((meta, _)) => meta,
                Err(e) => fail!(self, "2", "{what}: node {} does not recover: {e}", i + 1),
            };
            let engine = Engine::new(self.config, meta, self.ctx.now);
            overlays.push(overlay);
            states.push(engine.node_state());
            views.push(view_of(&engine));
            dirty.push(engine.meta().dirty_bitmap().clone());
        }
        let decision = decide(&views[0], &views[1]);
        let union: RoaringBitmap = &dirty[0] | &dirty[1];
        let (source, full) = match (decision.resync(), decision.outcome) {
            (Some(r), _) => (side_index(r.from), r.full),
            (None, Outcome::InSync { resync_from: None }) => (0, false),
            (None, Outcome::BothJustCreated) => {
                if let Some((b, f)) = self.floors.iter().find(|(_, f)| f.strict > 0) {
                    fail!(
                        self,
                        "1",
                        "{what}: both disks would come back just created, yet block {b} has acknowledged durable v{}",
                        f.strict
                    );
                }
                return;
            }
            (None, _) => {
                if !self.forced_happened {
                    fail!(
                        self,
                        "7",
                        "{what}: the generation rules would decide \"{decision}\" without any forced activation: node 1 {:?} {:?} {:?}, node 2 {:?} {:?} {:?}",
                        views[0].generations,
                        views[0].role,
                        views[0].flags.names(),
                        views[1].generations,
                        views[1].role,
                        views[1].flags.names()
                    );
                }
                return;
            }
        };
        if !full {
            let differ = image_diff(
                &self.nodes[0].data.durable,
                &overlays[0],
                &self.nodes[1].data.durable,
                &overlays[1],
            );
            let missing: Vec<u64> = differ
                .iter()
                .copied()
                .filter(|&b| !union.contains(self.region(b)))
                .take(8)
                .collect();
            if let Some(&b) = missing.first() {
                let detail: Vec<String> = (0..2)
                    .map(|i| {
                        let n = &self.nodes[i];
                        format!(
                            "node {}: crash image v{}, durable v{}, view v{}, cached {:?}, region dirty now {}",
                            i + 1,
                            overlays[i].get(&b).copied().unwrap_or(n.data.durable[b as usize]),
                            n.data.durable[b as usize],
                            n.data.view(b),
                            n.data.cache.get(&b),
                            n.up && n.engine.meta().dirty_bitmap().contains(self.region(b)),
                        )
                    })
                    .collect();
                self.ctx
                    .log(format!("{what}: block {b}: {}", detail.join("; ")));
            }
            if !missing.is_empty() {
                fail!(
                    self,
                    "2",
                    "{what}: {decision:?}, yet blocks {missing:?} differ and neither recovered journal (nor hot extent) marks them; node 1 {:?} {:?}, node 2 {:?} {:?}",
                    states[0].generations,
                    states[0].flags.names(),
                    states[1].generations,
                    states[1].flags.names()
                );
            }
        }
        if states[source].disk_state == DiskState::Inconsistent {
            fail!(
                self,
                "1",
                "{what}: {decision:?} would copy from node {}, whose disk is Inconsistent (node 1 {:?} {:?}, node 2 {:?} {:?})",
                source + 1,
                states[0].disk_state,
                states[0].flags.names(),
                states[1].disk_state,
                states[1].flags.names()
            );
        }
        // After the rebuild the target equals the source (on the union, and outside it
        // they were equal already): every durable acknowledged write must be there.
        let node = &self.nodes[source];
        for (b, f) in &self.floors {
            let v = overlays[source]
                .get(b)
                .copied()
                .unwrap_or(node.data.durable[*b as usize]);
            if v < f.strict {
                fail!(
                    self,
                    "1",
                    "{what}: the rebuild ({decision:?}) from node {} would leave block {b} at v{v}, losing durable acknowledged v{}",
                    source + 1,
                    f.strict
                );
            }
        }
    }

    /// Quiesces: no new client I/O, cuts or crashes; everything in flight completes, the
    /// nodes reconnect and resync. Then checks invariants 1, 5 and 6.
    fn settle(&mut self) {
        if self.terminal.is_some() {
            return;
        }
        self.settling = true;
        self.ctx.log("settle".into());
        for d in 0..2 {
            self.link.dirs[d].stalled_until = 0;
        }
        let mut quiet = 0;
        let limit = 200_000;
        for round in 0.. {
            if self.terminal.is_some() {
                self.settling = false;
                return;
            }
            self.driver();
            if self.run_event(false) {
                quiet = 0;
                continue;
            }
            if self.is_settled() {
                quiet += 1;
                if quiet >= 4 {
                    break;
                }
            }
            if round > limit {
                let status: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| {
                        if n.up {
                            format!("{:?}\n{}", n.engine.status(), engine_dump(&n.engine))
                        } else {
                            "down".into()
                        }
                    })
                    .collect();
                fail!(
                    self,
                    "5",
                    "liveness: the mirror did not settle (no resync to completion / idle link): {status:#?}"
                );
            }
            self.advance_time(self.config.sync_interval_ms + 1);
        }
        self.settling = false;
        self.stats.settles += 1;
        // Inv 5: connected, idle, in sync: identical data, both UpToDate, no dirty bits.
        let differ = image_diff(
            &self.nodes[0].data.durable,
            &self.nodes[0].data.view_overlay(),
            &self.nodes[1].data.durable,
            &self.nodes[1].data.view_overlay(),
        );
        if let Some(&b) = differ.iter().next() {
            let first: Vec<u64> = differ.iter().copied().take(8).collect();
            fail!(
                self,
                "5",
                "settled and connected, yet {} blocks differ (first {first:?}: node 1 v{}, node 2 v{})",
                differ.len(),
                self.nodes[0].data.view(b),
                self.nodes[1].data.view(b)
            );
        }
        for i in 0..2 {
            let node = &self.nodes[i];
            if node.engine.disk_state() != DiskState::UpToDate {
                fail!(
                    self,
                    "5",
                    "settled, yet node {} is {:?}",
                    i + 1,
                    node.engine.disk_state()
                );
            }
            let dirty = node.engine.meta().dirty_bitmap().len();
            if dirty > 0 {
                fail!(
                    self,
                    "5",
                    "settled, yet node {} keeps {dirty} dirty regions",
                    i + 1
                );
            }
            // Inv 6: nothing held, nothing unanswered.
            if !node.requests.is_empty()
                || !node.peer_bufs.is_empty()
                || !node.resync_bufs.is_empty()
                || !node.zero_applies.is_empty()
            {
                fail!(
                    self,
                    "6",
                    "settled, yet node {} holds requests {:?}, peer buffers {:?}, resync buffers {:?}, zero applies {}",
                    i + 1,
                    node.requests.keys().collect::<Vec<_>>(),
                    node.peer_bufs.keys().collect::<Vec<_>>(),
                    node.resync_bufs.keys().collect::<Vec<_>>(),
                    node.zero_applies.len()
                );
            }
            // Inv 1: both copies hold every acknowledged write.
            self.check_floors(i, false, "settled");
        }
        self.check_double_crash("power cut of both nodes after settling");
        // Connected, idle and identical: nobody has written apart any more.
        self.apart = [0; 2];
    }

    fn is_settled(&self) -> bool {
        self.nodes.iter().all(|n| {
            n.up && n.linked
                && n.disk_ops.is_empty()
                && n.meta_ops.is_empty()
                && n.role_change.is_none()
                && n.engine.status().link.is_some_and(|l| {
                    l.state == "connected" && l.transfer_log_writes == 0 && l.awaiting_acks == 0
                })
        }) && self.link.dirs.iter().all(|d| d.queue.is_empty())
            && self.failover.is_none()
    }
}

/// Engine internals for a liveness report (read-only; the sim is inside `mirror`).
fn engine_dump(e: &Engine) -> String {
    let mut reqs: Vec<String> = e
        .requests
        .iter()
        .map(|(id, r)| {
            format!(
                "{}:{:?} locked={} local_done={} ackable={} peer_seq={:?} {:?}",
                id.0, r.phase, r.locked, r.local_done, r.ackable, r.peer_seq, r.op
            )
        })
        .collect();
    reqs.sort();
    format!(
        "requests [{}]; locks active {} waiting {}; generation_hold {:?}; sync {}; unsynced {}; flush_waiters {}; applies {}; held_applies {}; orphaned reads {:?} locks {:?}; role_change {:?}; meta waiting AL {}; meta {:?}",
        reqs.join("; "),
        e.locks.active_count(),
        e.locks.waiting_count(),
        e.generation_hold,
        e.sync.is_some(),
        e.unsynced.len(),
        e.flush_waiters.len(),
        e.applies.len(),
        e.held_applies.len(),
        e.orphaned_resync_reads,
        e.orphaned_resync_locks,
        e.role_change,
        e.meta.writes_waiting_al(),
        e.meta.stats(),
    )
}

fn short(msg: &PeerMsg) -> String {
    match msg {
        PeerMsg::BitmapChunk {
            offset,
            bytes,
            last,
        } => {
            format!(
                "BitmapChunk {{ offset: {offset}, {} bytes, last: {last} }}",
                bytes.len()
            )
        }
        PeerMsg::State(s) => format!(
            "State {{ {:?} {:?} {:?} {:?} }}",
            s.role,
            s.disk_state,
            s.generations,
            s.flags.names()
        ),
        other => format!("{other:?}"),
    }
}

/// Runs one seed; panics on the first violated invariant.
pub(crate) fn run_seed(seed: u64, steps: usize, scenario: Scenario, trace: bool) -> SimStats {
    let mut sim = Sim::new(seed, scenario, trace);
    for step in 0..steps {
        sim.ctx.step = step;
        sim.step();
        if sim.terminal.is_some() {
            break;
        }
        if step % SETTLE_EVERY == SETTLE_EVERY - 1 {
            sim.settle();
        }
    }
    sim.ctx.step = steps;
    sim.settle();
    if let Some(why) = &sim.terminal {
        sim.ctx.log(format!("run ended: {why}"));
    }
    sim.stats.steps = steps as u64;
    sim.stats
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeds run by `sim_many_seeds`: seeds `0..SEEDS`, `STEPS` steps each.
    const SEEDS: u64 = 400;
    const STEPS: usize = 1500;
    /// `sim_replay` runs this one seed (edit it to replay a failure), printing every
    /// event when `REPLAY_TRACE` is set.
    const REPLAY_SEED: u64 = 1733;
    const REPLAY_STEPS: usize = STEPS;
    const REPLAY_TRACE: bool = false;

    /// Runs one seed; a panic anywhere (an invariant, or an assertion inside the engine)
    /// is re-raised with the seed, so every failure names the seed that replays it.
    fn run_checked(seed: u64, steps: usize, trace: bool) -> SimStats {
        let run = || run_seed(seed, steps, Scenario::default_mix(), trace);
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
            Ok(stats) => stats,
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "non-string panic".into());
                panic!(
                    "mirror simulation failed for seed {seed} ({steps} steps); replay it with \
                     REPLAY_SEED = {seed} in core::mirror::sim::tests:\n{msg}"
                )
            }
        }
    }

    #[test]
    fn sim_many_seeds() {
        let mut total = SimStats::default();
        for seed in 0..SEEDS {
            total.add(&run_checked(seed, STEPS, false));
        }
        println!("mirror simulation: {SEEDS} seeds x {STEPS} steps: {total:?}");
        assert!(total.writes_acked > 0 && total.crashes > 0 && total.failovers > 0);
        assert!(total.reconnects > SEEDS && total.full_syncs >= SEEDS);
    }

    #[test]
    fn sim_replay() {
        let stats = run_checked(REPLAY_SEED, REPLAY_STEPS, REPLAY_TRACE);
        println!("seed {REPLAY_SEED}: {stats:?}");
    }

    #[test]
    fn sim_is_deterministic() {
        let a = run_seed(7, 400, Scenario::default_mix(), false);
        let b = run_seed(7, 400, Scenario::default_mix(), false);
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }
}
