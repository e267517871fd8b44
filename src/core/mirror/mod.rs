//! The mirror engine: the one state machine every block request of a mirrored volume
//! passes through — overlap ordering, activity-log and journal gating, sync points,
//! replication to the peer, applying the peer's writes, resync — and the rule for when
//! a write may be acknowledged.
//!
//! Sans-IO like the rest of the core: the shell feeds client requests, peer messages,
//! link events, disk and metadata completions and `now`; the engine answers with
//! actions (disk I/O, metadata I/O, messages to send, replies). The same engine runs
//! `mirrordisk serve` on a device with a CLUSTER partition (no peer) and the node agent.

pub mod engine;
pub mod generations;
pub mod peer;
pub mod types;
pub mod verify;

pub use engine::{Engine, EngineConfig, EngineStats, EngineStatus, PeerStatus};
pub use generations::{Decision, decide};
pub use peer::{LinkStatus, RESYNC_IN_FLIGHT_IDLE, ResyncStatus};
pub use types::{
    Action, ClientOp, DataRef, DiskOp, DiskOpId, PeerDataId, PeerMsg, ReqId, ResyncBufId,
};

#[cfg(test)]
mod link_tests;
#[cfg(test)]
mod local_tests;
#[cfg(test)]
mod sim;
