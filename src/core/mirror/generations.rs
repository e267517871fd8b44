//! Generation rules: at every connect, decide from both sides' generation identifiers and
//! flags whether the disks are in sync, which side is behind (differential or full copy),
//! or whether the pair must be refused (both new, split brain, unrelated); plus the
//! generation transitions a resync and a forced-permit make.
//!
//! Pure: no I/O, no clock, no randomness (fresh random values come in as arguments). The
//! rules follow DRBD's `drbd_uuid_compare()` in its fixed order, with DRBD 8.4's rule
//! numbers and DRBD 9's rule names. `docs/replication-protocol.md` ("Generation rules") is
//! the specification: it says, rule by rule, what we kept, adapted or dropped, and why.
//!
//! Architecture invariant: `decide(a, b)` mirrored equals `decide(b, a)`, so the two
//! nodes, each deciding from its own view, always agree on the direction.

use std::fmt;

use crate::core::meta::generation::{GENERATION_JUST_CREATED, GENERATION_NONE};
use crate::core::meta::{Flags, Generations, Role};
use crate::core::repl::handshake::PeerInfo;

/// The step from a bitmap generation to the sync generation a resync start derives from
/// it (DRBD's `UUID_NEW_BM_OFFSET`, 2^48). Deriving it instead of drawing it keeps the
/// relation checkable: a target that missed the start still holds the source's
/// pre-start bitmap generation B, and the source's bitmap generation is then B + this
/// step (rules 51/71). Generations are 64-bit random values, so a step of 2^48 aliases
/// another generation only by chance (2^-64 per comparison).
pub const SYNC_GENERATION_STEP: u64 = 1 << 48;

/// Remaps a value that must not be used (a reserved generation or one already in use).
/// An odd multiplier makes `x * m + 1` a bijection on u64, so the loop that applies it
/// visits fresh values and ends after a step or two; the same constant as
/// `Generations::new_current` (the 64-bit golden ratio).
const REMAP_MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;

/// Which node of the pair, from the deciding node's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Side {
    Local,
    Peer,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Local => Side::Peer,
            Side::Peer => Side::Local,
        }
    }
}

/// What one node tells the rules about itself: the local superblock state, or the
/// peer's State frame.
///
/// `flags` are the superblock flags. `Flags::CRASHED_PRIMARY` is "set while Primary,
/// cleared on clean demotion", so the rules read a node as a *crashed primary* only when
/// the flag is set and the node is Secondary now (it was Primary and did not demote
/// cleanly); a node that is Primary now carries the flag just for being Primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub node_id: u32,
    pub generations: Generations,
    pub flags: Flags,
    pub role: Role,
    /// The journal holds dirty regions (after a crash this includes the hot extents of
    /// the activity log, which recovery merged into the dirty set).
    pub dirty: bool,
}

impl NodeView {
    /// The peer as the handshake reported it.
    pub fn from_peer_info(peer: &PeerInfo) -> NodeView {
        NodeView {
            node_id: peer.node_id,
            generations: peer.generations,
            flags: peer.flags,
            role: peer.role,
            dirty: peer.dirty_bytes > 0,
        }
    }

    /// Was Primary and did not demote cleanly (DRBD's in-memory `CRASHED_PRIMARY` bit).
    pub fn crashed_primary(&self) -> bool {
        self.flags.contains(Flags::CRASHED_PRIMARY) && self.role == Role::Secondary
    }

    /// A resync into this disk is under way: its data is partial (Inconsistent).
    pub fn resyncing(&self) -> bool {
        self.flags.contains(Flags::RESYNC_IN_PROGRESS)
    }

    fn full_sync_required(&self) -> bool {
        self.flags.contains(Flags::FULL_SYNC_REQUIRED)
    }

    /// The current generation, with 0 read as "just created" as DRBD does (the
    /// superblock decoder and the handshake refuse 0, so this is belt and braces).
    fn current(&self) -> u64 {
        match self.generations.current {
            GENERATION_NONE => GENERATION_JUST_CREATED,
            current => current,
        }
    }

    fn bitmap(&self) -> u64 {
        self.generations.bitmap
    }

    fn history(&self, index: usize) -> u64 {
        self.generations.history[index]
    }
}

/// What to do at connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Outcome {
    /// Same current generation: every acknowledged write is on both sides. If
    /// `resync_from` is set, dirty regions remain on a side (hot extents after a crash, a
    /// resync left over): the union of both journals is copied from that side (DRBD 8.4
    /// leaves such bits alone and logs "No resync, but N bits in bitmap!").
    InSync { resync_from: Option<Side> },
    /// This node is behind: copy from the peer. Differential = the union of both journals.
    LocalBehind { full: bool },
    /// The peer is behind: copy to it.
    PeerBehind { full: bool },
    /// Both disks are new: a full copy, from the side the operator names
    /// (`mirrorctl rebuild --full --from`).
    BothJustCreated,
    /// Both sides wrote after parting. Nothing moves until the operator resolves it; the
    /// resolution copies everything if `resolve_full`, else the union of both journals.
    SplitBrain { resolve_full: bool },
    /// No common generation: not the same data. Refused.
    Unrelated,
    /// The rule picked `source`, but that side is mid-resync (Inconsistent): copying from
    /// it would spread partial data. Refused until an operator decides.
    SourceInconsistent { source: Side },
}

impl Outcome {
    /// The side data would be copied from, if any.
    pub fn source(&self) -> Option<Side> {
        match *self {
            Outcome::InSync { resync_from } => resync_from,
            Outcome::LocalBehind { .. } => Some(Side::Peer),
            Outcome::PeerBehind { .. } => Some(Side::Local),
            _ => None,
        }
    }

    /// The same outcome seen from the other node.
    pub fn mirrored(self) -> Outcome {
        match self {
            Outcome::InSync { resync_from } => Outcome::InSync {
                resync_from: resync_from.map(Side::other),
            },
            Outcome::LocalBehind { full } => Outcome::PeerBehind { full },
            Outcome::PeerBehind { full } => Outcome::LocalBehind { full },
            Outcome::SourceInconsistent { source } => Outcome::SourceInconsistent {
                source: source.other(),
            },
            other => other,
        }
    }
}

/// The rule that decided, in evaluation order. Numbers are DRBD 8.4's (`rule_nr`), names
/// DRBD 9's (`sync_rule_names`); "self" and "peer" name where the match was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Rule {
    /// 10: both current generations are "just created".
    JustCreatedBoth,
    /// 20: this disk is new (or replaced), the peer's is not: full copy to us.
    JustCreatedSelf,
    /// 30: the peer's disk is new (or replaced): full copy to it.
    JustCreatedPeer,
    /// 34: same current; we were the sync source and missed the resync-finished event
    /// (the peer already took our generations).
    SyncSourceMissedFinish,
    /// 35: mirror of 34: the peer was the source and missed the finish.
    SyncTargetPeerMissedFinish,
    /// 36: same current; only we have a bitmap generation (no finish pattern).
    SyncSourcePeerMissedFinish,
    /// 37: mirror of 36.
    SyncTargetMissedFinish,
    /// 40: same current, no crashed primary.
    SameCurrent,
    /// 40: same current, a side crashed while Primary: it is the source.
    CrashedPrimary,
    /// 41: same current, a side crashed while Primary, the other is Primary now: the
    /// Primary is the source.
    CrashedPrimaryPrimaryPresent,
    /// 50: our current is the peer's bitmap generation: differential copy to us.
    BitmapPeer,
    /// 51: the peer started a resync to us and we missed the start.
    SyncTargetMissedStart,
    /// 52 (ours): the peer was the sync source, missed the finish, then wrote.
    SyncTargetPeerMissedFinishThenWrote,
    /// 60: our current is in the peer's history only: full copy to us.
    HistoryPeer,
    /// 70: the peer's current is our bitmap generation: differential copy to it.
    BitmapSelf,
    /// 71: we started a resync to the peer and it missed the start.
    SyncSourceMissedStart,
    /// 72 (ours): we were the sync source, missed the finish, then wrote.
    SyncSourceMissedFinishThenWrote,
    /// 80: the peer's current is in our history only: full copy to it.
    HistorySelf,
    /// 90: same bitmap generation, different currents: both wrote since parting.
    BitmapBoth,
    /// 100: a common history generation only: both wrote since an older parting.
    HistoryBoth,
    /// No rule matched (DRBD returns -1000).
    Unrelated,
}

impl Rule {
    /// DRBD 8.4's rule number (1000 for "unrelated", DRBD's -1000 result).
    pub fn number(self) -> u32 {
        match self {
            Rule::JustCreatedBoth => 10,
            Rule::JustCreatedSelf => 20,
            Rule::JustCreatedPeer => 30,
            Rule::SyncSourceMissedFinish => 34,
            Rule::SyncTargetPeerMissedFinish => 35,
            Rule::SyncSourcePeerMissedFinish => 36,
            Rule::SyncTargetMissedFinish => 37,
            Rule::SameCurrent | Rule::CrashedPrimary => 40,
            Rule::CrashedPrimaryPrimaryPresent => 41,
            Rule::BitmapPeer => 50,
            Rule::SyncTargetMissedStart => 51,
            Rule::SyncTargetPeerMissedFinishThenWrote => 52,
            Rule::HistoryPeer => 60,
            Rule::BitmapSelf => 70,
            Rule::SyncSourceMissedStart => 71,
            Rule::SyncSourceMissedFinishThenWrote => 72,
            Rule::HistorySelf => 80,
            Rule::BitmapBoth => 90,
            Rule::HistoryBoth => 100,
            Rule::Unrelated => 1000,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Rule::JustCreatedBoth => "just-created-both",
            Rule::JustCreatedSelf => "just-created-self",
            Rule::JustCreatedPeer => "just-created-peer",
            Rule::SyncSourceMissedFinish => "sync-source-missed-finish",
            Rule::SyncTargetPeerMissedFinish => "sync-target-peer-missed-finish",
            Rule::SyncSourcePeerMissedFinish => "sync-source-peer-missed-finish",
            Rule::SyncTargetMissedFinish => "sync-target-missed-finish",
            Rule::SameCurrent => "same-current",
            Rule::CrashedPrimary => "crashed-primary",
            Rule::CrashedPrimaryPrimaryPresent => "crashed-primary-primary-present",
            Rule::BitmapPeer => "bitmap-peer",
            Rule::SyncTargetMissedStart => "sync-target-missed-start",
            Rule::SyncTargetPeerMissedFinishThenWrote => {
                "sync-target-peer-missed-finish-then-wrote"
            }
            Rule::HistoryPeer => "history-peer",
            Rule::BitmapSelf => "bitmap-self",
            Rule::SyncSourceMissedStart => "sync-source-missed-start",
            Rule::SyncSourceMissedFinishThenWrote => "sync-source-missed-finish-then-wrote",
            Rule::HistorySelf => "history-self",
            Rule::BitmapBoth => "bitmap-both",
            Rule::HistoryBoth => "history-both",
            Rule::Unrelated => "unrelated",
        }
    }

    /// The same rule seen from the other node (DRBD's pairs 20/30, 34/35, 36/37, 50/70,
    /// 51/71, 60/80 and our 52/72).
    pub fn mirrored(self) -> Rule {
        match self {
            Rule::JustCreatedSelf => Rule::JustCreatedPeer,
            Rule::JustCreatedPeer => Rule::JustCreatedSelf,
            Rule::SyncSourceMissedFinish => Rule::SyncTargetPeerMissedFinish,
            Rule::SyncTargetPeerMissedFinish => Rule::SyncSourceMissedFinish,
            Rule::SyncSourcePeerMissedFinish => Rule::SyncTargetMissedFinish,
            Rule::SyncTargetMissedFinish => Rule::SyncSourcePeerMissedFinish,
            Rule::BitmapPeer => Rule::BitmapSelf,
            Rule::BitmapSelf => Rule::BitmapPeer,
            Rule::SyncTargetMissedStart => Rule::SyncSourceMissedStart,
            Rule::SyncSourceMissedStart => Rule::SyncTargetMissedStart,
            Rule::SyncTargetPeerMissedFinishThenWrote => Rule::SyncSourceMissedFinishThenWrote,
            Rule::SyncSourceMissedFinishThenWrote => Rule::SyncTargetPeerMissedFinishThenWrote,
            Rule::HistoryPeer => Rule::HistorySelf,
            Rule::HistorySelf => Rule::HistoryPeer,
            other => other,
        }
    }
}

/// A copy the caller must run: from `from`, either every region (`full`) or the union of
/// both sides' journals (which after a crash include the crashed side's hot extents).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Resync {
    pub from: Side,
    pub full: bool,
}

/// The decision at connect, explaining itself: the outcome, the rule that matched, and
/// whether `FULL_SYNC_REQUIRED` turned what the rule allowed as differential into full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Decision {
    pub outcome: Outcome,
    pub rule: Rule,
    pub full_sync_flag: bool,
}

impl Decision {
    /// The copy to run, if any. `None` for in-sync-and-clean and for every refusal.
    pub fn resync(&self) -> Option<Resync> {
        match self.outcome {
            Outcome::InSync {
                resync_from: Some(from),
            } => Some(Resync {
                from,
                full: self.full_sync_flag,
            }),
            Outcome::LocalBehind { full } => Some(Resync {
                from: Side::Peer,
                full,
            }),
            Outcome::PeerBehind { full } => Some(Resync {
                from: Side::Local,
                full,
            }),
            _ => None,
        }
    }

    /// The same decision seen from the other node.
    pub fn mirrored(&self) -> Decision {
        Decision {
            outcome: self.outcome.mirrored(),
            rule: self.rule.mirrored(),
            full_sync_flag: self.full_sync_flag,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let copy = |full: bool| if full { "full" } else { "differential" };
        write!(f, "rule {} ({}): ", self.rule.number(), self.rule.name())?;
        match self.outcome {
            Outcome::InSync { resync_from: None } => write!(f, "in sync, nothing to copy")?,
            Outcome::InSync {
                resync_from: Some(side),
            } => write!(
                f,
                "in sync, dirty regions remain: {} copy from {}",
                copy(self.full_sync_flag),
                side_name(side)
            )?,
            Outcome::LocalBehind { full } => {
                write!(f, "this node is behind: {} copy from the peer", copy(full))?
            }
            Outcome::PeerBehind { full } => {
                write!(f, "the peer is behind: {} copy from this node", copy(full))?
            }
            Outcome::BothJustCreated => write!(
                f,
                "both disks are new: name the source with `mirrorctl rebuild --full --from`"
            )?,
            Outcome::SplitBrain { resolve_full } => write!(
                f,
                "split brain, both sides wrote after parting: nothing is copied until the \
                 operator resolves it (then a {} copy)",
                copy(resolve_full)
            )?,
            Outcome::Unrelated => write!(f, "unrelated data, no common generation: refused")?,
            Outcome::SourceInconsistent { source } => write!(
                f,
                "refused: the source would be {}, which is mid-resync (inconsistent)",
                side_name(source)
            )?,
        }
        if self.full_sync_flag {
            write!(f, " (full because full-sync-required is set)")?;
        }
        Ok(())
    }
}

fn side_name(side: Side) -> &'static str {
    match side {
        Side::Local => "this node",
        Side::Peer => "the peer",
    }
}

/// Decides at connect, from this node's view. Both nodes call it with their own view and
/// reach mirrored answers.
///
/// Precondition: the node ids differ (the handshake refuses a peer with our id).
pub fn decide(local: &NodeView, peer: &NodeView) -> Decision {
    assert_ne!(
        local.node_id, peer.node_id,
        "generation rules called with one node id on both sides; the handshake refuses that"
    );
    let (rule, outcome) = RULE_ORDER
        .iter()
        .find_map(|step| step(local, peer))
        .unwrap_or((Rule::Unrelated, Outcome::Unrelated));
    settle(local, peer, rule, outcome)
}

/// One rule (or a mirrored pair of rules): `Some` when it decides.
type Step = fn(&NodeView, &NodeView) -> Option<(Rule, Outcome)>;

/// DRBD's order. The same-current block (34 to 41) always decides when the currents are
/// equal. Directional rules are evaluated as mirrored pairs so that both nodes agree; see
/// `directional`.
const RULE_ORDER: [Step; 11] = [
    rule_just_created_both,        // 10
    rule_just_created,             // 20 / 30
    rule_missed_finish,            // 34 / 35
    rule_bitmap_only,              // 36 / 37
    rule_same_current,             // 40 / 41
    rule_bitmap,                   // 50 / 70
    rule_missed_start,             // 51 / 71
    rule_missed_finish_then_wrote, // 52 / 72
    rule_history,                  // 60 / 80
    rule_bitmap_both,              // 90
    rule_history_both,             // 100
];

/// A pair of mirrored rules. `behind(x, y)` says "x is behind y" by this rule. If it holds
/// in one direction only, that decides; if in both (contradictory ancestry, impossible
/// with fresh random generations: corrupt or forged metadata), the pair does not decide
/// and later rules (split brain, unrelated) do, so the two nodes never disagree.
fn directional(
    local: &NodeView,
    peer: &NodeView,
    behind: fn(&NodeView, &NodeView) -> bool,
    rules: (Rule, Rule),
    full: bool,
) -> Option<(Rule, Outcome)> {
    match (behind(local, peer), behind(peer, local)) {
        (true, false) => Some((rules.0, Outcome::LocalBehind { full })),
        (false, true) => Some((rules.1, Outcome::PeerBehind { full })),
        _ => None,
    }
}

fn rule_just_created_both(local: &NodeView, peer: &NodeView) -> Option<(Rule, Outcome)> {
    let both =
        local.current() == GENERATION_JUST_CREATED && peer.current() == GENERATION_JUST_CREATED;
    both.then_some((Rule::JustCreatedBoth, Outcome::BothJustCreated))
}

fn rule_just_created(local: &NodeView, peer: &NodeView) -> Option<(Rule, Outcome)> {
    fn behind(x: &NodeView, y: &NodeView) -> bool {
        x.current() == GENERATION_JUST_CREATED && y.current() != GENERATION_JUST_CREATED
    }
    directional(
        local,
        peer,
        behind,
        (Rule::JustCreatedSelf, Rule::JustCreatedPeer),
        true,
    )
}

fn same_current(x: &NodeView, y: &NodeView) -> bool {
    x.current() == y.current()
}

/// x has no bitmap generation, y has one: y was the sync source (or wrote) since.
fn only_y_has_bitmap(x: &NodeView, y: &NodeView) -> bool {
    x.bitmap() == GENERATION_NONE && y.bitmap() != GENERATION_NONE
}

/// x took y's generations at the end of a resync from y, which y did not record: x's
/// newest history is y's sync generation, and x's next is y's newest history.
fn took_unfinished_resync(x: &NodeView, y: &NodeView) -> bool {
    only_y_has_bitmap(x, y) && x.history(0) == y.bitmap() && x.history(1) == y.history(0)
}

fn rule_missed_finish(local: &NodeView, peer: &NodeView) -> Option<(Rule, Outcome)> {
    fn behind(x: &NodeView, y: &NodeView) -> bool {
        same_current(x, y) && took_unfinished_resync(x, y)
    }
    let rules = (
        Rule::SyncTargetPeerMissedFinish,
        Rule::SyncSourceMissedFinish,
    );
    directional(local, peer, behind, rules, false)
}

fn rule_bitmap_only(local: &NodeView, peer: &NodeView) -> Option<(Rule, Outcome)> {
    fn behind(x: &NodeView, y: &NodeView) -> bool {
        same_current(x, y) && only_y_has_bitmap(x, y)
    }
    let rules = (
        Rule::SyncTargetMissedFinish,
        Rule::SyncSourcePeerMissedFinish,
    );
    directional(local, peer, behind, rules, false)
}

/// Rules 40 and 41: the currents are equal, so every acknowledged write is on both sides
/// (protocol C, and a new current precedes any write the peer may lack). The disks can
/// differ only in regions some journal holds (hot extents of a crash, leftovers of a
/// resync), and only by writes nobody acknowledged: either side's version is correct; the
/// rule only has to make both nodes pick the same source.
fn rule_same_current(local: &NodeView, peer: &NodeView) -> Option<(Rule, Outcome)> {
    if !same_current(local, peer) {
        return None;
    }
    let behind_from = |source: Side| match source {
        Side::Local => Outcome::PeerBehind { full: false },
        Side::Peer => Outcome::LocalBehind { full: false },
    };
    match (local.crashed_primary(), peer.crashed_primary()) {
        (false, false) => {
            let needs_copy = [local, peer]
                .iter()
                .any(|v| v.dirty || v.resyncing() || v.full_sync_required());
            let resync_from = needs_copy.then(|| union_source(local, peer));
            Some((Rule::SameCurrent, Outcome::InSync { resync_from }))
        }
        crashed => {
            // A crashed side is Secondary now; if the other is Primary, its data is live
            // under an application: never copy into it (DRBD rule 41).
            if let Some(primary) = primary_side(local, peer) {
                return Some((Rule::CrashedPrimaryPrimaryPresent, behind_from(primary)));
            }
            let source = match crashed {
                (true, false) => Side::Local,
                (false, true) => Side::Peer,
                _ => lower_node_id(local, peer),
            };
            Some((Rule::CrashedPrimary, behind_from(source)))
        }
    }
}

/// The side that is Primary now, if exactly one is.
fn primary_side(local: &NodeView, peer: &NodeView) -> Option<Side> {
    match (local.role, peer.role) {
        (Role::Primary, Role::Secondary) => Some(Side::Local),
        (Role::Secondary, Role::Primary) => Some(Side::Peer),
        _ => None,
    }
}

/// Deterministic tie-break both nodes compute alike: the lower node id is the source.
/// DRBD uses the connection's RESOLVE_CONFLICTS bit; the ids say the same thing here and
/// are already agreed by the handshake.
fn lower_node_id(local: &NodeView, peer: &NodeView) -> Side {
    if local.node_id < peer.node_id {
        Side::Local
    } else {
        Side::Peer
    }
}

/// Source of the union copy when the currents are equal: a consistent side over one
/// mid-resync, then the Primary (never rewrite data under a live application), then the
/// lower node id.
fn union_source(local: &NodeView, peer: &NodeView) -> Side {
    match (local.resyncing(), peer.resyncing()) {
        (false, true) => Side::Local,
        (true, false) => Side::Peer,
        _ => primary_side(local, peer).unwrap_or_else(|| lower_node_id(local, peer)),
    }
}

fn rule_bitmap(local: &NodeView, peer: &NodeView) -> Option<(Rule, Outcome)> {
    fn behind(x: &NodeView, y: &NodeView) -> bool {
        x.current() == y.bitmap()
    }
    directional(
        local,
        peer,
        behind,
        (Rule::BitmapPeer, Rule::BitmapSelf),
        false,
    )
}

/// y started a resync as source (its bitmap went from B to B + step, B into history) but
/// x never received the sync generation and still holds B. y's journal still covers
/// everything since B: differential.
fn rule_missed_start(local: &NodeView, peer: &NodeView) -> Option<(Rule, Outcome)> {
    fn behind(x: &NodeView, y: &NodeView) -> bool {
        x.current() == y.history(0) && y.history(0).wrapping_add(SYNC_GENERATION_STEP) == y.bitmap()
    }
    let rules = (Rule::SyncTargetMissedStart, Rule::SyncSourceMissedStart);
    directional(local, peer, behind, rules, false)
}

/// As 34/35, but y has made a new current since (it wrote while apart). x has no bitmap
/// generation, so x wrote nothing since taking y's generations; y's journal covers
/// everything since its bitmap generation, which is older than what x holds.
fn rule_missed_finish_then_wrote(local: &NodeView, peer: &NodeView) -> Option<(Rule, Outcome)> {
    let rules = (
        Rule::SyncTargetPeerMissedFinishThenWrote,
        Rule::SyncSourceMissedFinishThenWrote,
    );
    directional(local, peer, took_unfinished_resync, rules, false)
}

fn rule_history(local: &NodeView, peer: &NodeView) -> Option<(Rule, Outcome)> {
    fn behind(x: &NodeView, y: &NodeView) -> bool {
        y.generations.history.contains(&x.current())
    }
    directional(
        local,
        peer,
        behind,
        (Rule::HistoryPeer, Rule::HistorySelf),
        true,
    )
}

/// Both bitmap generations name the same parting point and the currents differ: both
/// wrote since. Both journals cover everything since that point, so a resolution can be
/// differential, unless the parting point is "just created" (the disks were never
/// synced: their contents need not match anywhere).
fn rule_bitmap_both(local: &NodeView, peer: &NodeView) -> Option<(Rule, Outcome)> {
    let bitmap = local.bitmap();
    (bitmap != GENERATION_NONE && bitmap == peer.bitmap()).then_some((
        Rule::BitmapBoth,
        Outcome::SplitBrain {
            resolve_full: bitmap == GENERATION_JUST_CREATED,
        },
    ))
}

/// A common ancestor only in history: both diverged, and at least one journal no longer
/// reaches back to it, so a resolution must copy everything. Empty slots and "just
/// created" are not ancestors (DRBD 9 skips empty slots; two mirrors initialised apart
/// both have "just created" in their history).
fn rule_history_both(local: &NodeView, peer: &NodeView) -> Option<(Rule, Outcome)> {
    let names_data = |g: &u64| *g != GENERATION_NONE && *g != GENERATION_JUST_CREATED;
    let common = local
        .generations
        .history
        .iter()
        .filter(|g| names_data(g))
        .any(|g| peer.generations.history.contains(g));
    common.then_some((
        Rule::HistoryBoth,
        Outcome::SplitBrain { resolve_full: true },
    ))
}

/// After the rule: refuse a copy from a side that is mid-resync (DRBD's sync handshake
/// refuses "SyncSource, but I am inconsistent"), then let `FULL_SYNC_REQUIRED` on either
/// side (its journal cannot list its differences) turn any copy full.
fn settle(local: &NodeView, peer: &NodeView, rule: Rule, outcome: Outcome) -> Decision {
    if let Some(source) = outcome.source() {
        let view = match source {
            Side::Local => local,
            Side::Peer => peer,
        };
        if view.resyncing() {
            return Decision {
                outcome: Outcome::SourceInconsistent { source },
                rule,
                full_sync_flag: false,
            };
        }
    }
    let flagged = local.full_sync_required() || peer.full_sync_required();
    let (outcome, full_sync_flag) = match outcome {
        Outcome::LocalBehind { full } => (
            Outcome::LocalBehind {
                full: full || flagged,
            },
            flagged && !full,
        ),
        Outcome::PeerBehind { full } => (
            Outcome::PeerBehind {
                full: full || flagged,
            },
            flagged && !full,
        ),
        Outcome::SplitBrain { resolve_full } => (
            Outcome::SplitBrain {
                resolve_full: resolve_full || flagged,
            },
            flagged && !resolve_full,
        ),
        Outcome::InSync {
            resync_from: Some(side),
        } => (
            Outcome::InSync {
                resync_from: Some(side),
            },
            flagged,
        ),
        other => (other, false),
    };
    Decision {
        outcome,
        rule,
        full_sync_flag,
    }
}

// ---------------------------------------------------------------------------------------
// Transitions. Each result must be durable (one superblock write) before what it covers:
// a new current before the first write it covers; the source's rotation before the sync
// generation is sent; the target's adoption before the first resync write is applied; the
// target's finish before it acknowledges the finish; the source finishes on that ack.
// ---------------------------------------------------------------------------------------

/// A generation handed over by the peer that a transition cannot accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransitionError {
    /// A sync generation must name data: neither 0 nor "just created".
    BadSyncGeneration(u64),
    /// The source's bitmap generation is not the sync generation this target took: the
    /// finish belongs to another resync.
    NotThisResync { current: u64, source_bitmap: u64 },
}

impl fmt::Display for TransitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransitionError::BadSyncGeneration(g) => {
                write!(f, "sync generation {g:#x} is reserved")
            }
            TransitionError::NotThisResync {
                current,
                source_bitmap,
            } => write!(
                f,
                "resync finish for sync generation {source_bitmap:#x}, but this disk holds {current:#x}"
            ),
        }
    }
}

fn remap(mut value: u64, taken: &[u64]) -> u64 {
    while value == GENERATION_NONE || value == GENERATION_JUST_CREATED || taken.contains(&value) {
        value = value.wrapping_mul(REMAP_MULTIPLIER).wrapping_add(1);
    }
    value
}

/// Resync start on the source (DRBD `drbd_gen_and_send_sync_uuid`): the bitmap
/// generation B becomes the sync generation S = B + step (a fresh value from `random` if
/// B is absent or "just created"), and B moves into history. Returns S, to send to the
/// target. The journal is untouched: it still lists everything since B.
///
/// Keeps: current unchanged; bitmap names data and differs from current; old B in
/// history[0].
pub fn start_resync_as_source(g: &mut Generations, random: u64) -> u64 {
    let old = g.bitmap;
    let derived = old != GENERATION_NONE && old != GENERATION_JUST_CREATED;
    let wanted = if derived {
        old.wrapping_add(SYNC_GENERATION_STEP)
    } else {
        random
    };
    let sync = remap(wanted, &[g.current, old]);
    if old != GENERATION_NONE {
        g.history = [old, g.history[0]];
    }
    g.bitmap = sync;
    assert!(g.is_valid() && g.bitmap != g.current && g.bitmap != GENERATION_JUST_CREATED);
    sync
}

/// Resync start on the target (DRBD `receive_sync_uuid`): the current generation becomes
/// the sync generation, the bitmap generation is dropped (its own changes will be
/// overwritten; its journal bits stay, they are part of the set being copied), history
/// unchanged, and the disk is marked mid-resync. Afterwards the target's current equals
/// the source's bitmap generation, so any interruption reconnects by rule 50 and resumes.
pub fn start_resync_as_target(
    g: &mut Generations,
    flags: &mut Flags,
    sync: u64,
) -> Result<(), TransitionError> {
    if sync == GENERATION_NONE || sync == GENERATION_JUST_CREATED {
        return Err(TransitionError::BadSyncGeneration(sync));
    }
    g.current = sync;
    g.bitmap = GENERATION_NONE;
    flags.insert(Flags::RESYNC_IN_PROGRESS);
    Ok(())
}

/// Resync finished on the target: it takes the source's generations as they will be after
/// the source's own finish (the source's current; bitmap cleared; the sync generation and
/// the source's newest history as history), so both sides end equal. `source` is the
/// source's generations during the resync.
pub fn finish_resync_as_target(
    g: &mut Generations,
    flags: &mut Flags,
    role: Role,
    source: &Generations,
) -> Result<(), TransitionError> {
    if source.bitmap != g.current {
        return Err(TransitionError::NotThisResync {
            current: g.current,
            source_bitmap: source.bitmap,
        });
    }
    let mut finished = *source;
    finished.resync_finished();
    *g = finished;
    settle_flags(flags, role);
    assert!(g.bitmap == GENERATION_NONE && !flags.contains(Flags::RESYNC_IN_PROGRESS));
    Ok(())
}

/// Resync finished on the source, on the target's acknowledgement of its finish: the
/// bitmap generation (the sync generation) moves into history (`resync_finished`).
pub fn finish_resync_as_source(g: &mut Generations, flags: &mut Flags, role: Role) {
    g.resync_finished();
    settle_flags(flags, role);
}

/// Flags once both sides hold the same data (a resync finished, or the rules said in
/// sync with nothing to copy): the full-sync demand, the forced mark, a resync mark and a
/// peer-outdated mark no longer hold; was-primary and crashed-primary remain only while
/// Primary (they are "set while Primary").
pub fn settle_flags(flags: &mut Flags, role: Role) {
    for done in [
        Flags::FULL_SYNC_REQUIRED,
        Flags::FORCED,
        Flags::RESYNC_IN_PROGRESS,
        Flags::PEER_OUTDATED,
    ] {
        flags.remove(done);
    }
    if role == Role::Secondary {
        flags.remove(Flags::WAS_PRIMARY);
        flags.remove(Flags::CRASHED_PRIMARY);
    }
}

/// `mirrorctl forced-permit`: a new current generation now, whether or not a write
/// follows (so the returning peer sees itself behind, or split brain if it wrote too),
/// marked forced. The operator has declared this disk's data the truth, so a resync mark
/// is cleared: it may be a sync source again.
pub fn forced_permit(g: &mut Generations, flags: &mut Flags, random: u64) {
    g.new_current(random);
    flags.insert(Flags::FORCED);
    flags.remove(Flags::RESYNC_IN_PROGRESS);
}
