//! mirrordisk: a userspace synchronous mirror disk served over NBD.
//!
//! `core` holds the deterministic, sans-IO state machines; `shell` is the only code
//! that touches sockets, io_uring, files, clocks and processes. See ARCHITECTURE.md.

pub mod config;
pub mod constants;
pub mod core;
pub mod fuzzing;
pub mod shell;
