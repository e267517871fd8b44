//! The NBD protocol (fixed-newstyle handshake and transmission), as pure codecs.
//!
//! Follows doc/proto.md of NetworkBlockDevice/nbd. No I/O: the shell feeds bytes in and
//! writes the bytes these functions produce. What we implement of the protocol, the
//! errno table and what closes a connection are described in docs/nbd.md.
//!
//! - `wire`: magic numbers, flags, codes, `Errno`, a bounds-checked reader.
//! - `handshake`: the handshake state machine (`Handshake`).
//! - `request`: request header codec and the one validator (`validate`).
//! - `reply`: reply encoders.
//! - `client`: the client side (greeting, NBD_OPT_GO, simple replies) for small clients.

pub mod client;
pub mod handshake;
pub mod reply;
pub mod request;
pub mod wire;
