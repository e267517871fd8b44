//! Fuzzes CLUSTER partition superblock decoding and copy picking; the checks live in `mirrordisk::fuzzing::meta`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mirrordisk::fuzzing::meta::superblock_decode(data));
