//! The mirror engine: the one state machine every block request of a mirrored volume
//! passes through — overlap ordering, activity-log and journal gating, sync points,
//! and the rule for when a write may be acknowledged.
//!
//! Sans-IO like the rest of the core: the shell feeds client requests, disk and
//! metadata completions and `now`; the engine answers with actions (disk I/O,
//! metadata I/O, replies). The same engine runs `mirrordisk serve` on a device with a
//! CLUSTER partition (no peer: Connected without one, or Broken = journaling) and the
//! node agent.

pub mod engine;

pub use engine::{Action, ClientOp, DiskOp, DiskOpId, Engine, EngineConfig, EngineStats, ReqId};
