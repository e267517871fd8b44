//! The sans-IO core: deterministic state machines and codecs with no I/O.
//!
//! Architecture invariant: nothing under `core` touches a file descriptor, a clock,
//! randomness, threads or async. Inputs are bytes, completions and `now`; outputs are
//! values the shell acts on. `tests/tidy.rs` enforces the import rules.

pub mod meta;
pub mod mirror;
pub mod nbd;
pub mod overlap;
pub mod repl;
