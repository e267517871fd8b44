//! Fuzzes CLUSTER partition bitmap-journal log replay; the checks live in `mirrordisk::fuzzing::meta`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mirrordisk::fuzzing::meta::journal_replay(data));
