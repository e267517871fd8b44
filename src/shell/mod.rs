//! The I/O shell: the only code that touches sockets, io_uring, files, clocks and processes.

pub mod agent;
pub mod buffers;
pub mod demo;
pub mod disk;
pub mod metadata;
pub mod mirror_export;
pub mod mirrorctl;
pub mod nbd_server;
pub mod serve;
pub mod uring;
pub mod volume;
