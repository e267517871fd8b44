//! Fuzzes replication frame decoding and verification; the checks live in
//! `mirrordisk::fuzzing::repl`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mirrordisk::fuzzing::repl::repl_frame(data));
