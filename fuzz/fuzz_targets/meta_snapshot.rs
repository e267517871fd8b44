//! Fuzzes CLUSTER partition roaring snapshot decoding; the checks live in `mirrordisk::fuzzing::meta`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mirrordisk::fuzzing::meta::snapshot_decode(data));
