//! The NBD protocol (fixed-newstyle handshake and transmission), as pure codecs.
//!
//! Follows doc/proto.md of NetworkBlockDevice/nbd. No I/O: the shell feeds bytes in and
//! writes the bytes these functions produce.

pub mod handshake;
pub mod reply;
pub mod request;
pub mod wire;
