//! Fuzzes CLUSTER partition activity-log record decoding; the checks live in `mirrordisk::fuzzing::meta`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mirrordisk::fuzzing::meta::activity_log_decode(data));
