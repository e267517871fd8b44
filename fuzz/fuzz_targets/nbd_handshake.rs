//! Fuzzes the NBD handshake state machine; the checks live in `mirrordisk::fuzzing`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mirrordisk::fuzzing::nbd_handshake(data));
