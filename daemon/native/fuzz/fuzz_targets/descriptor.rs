//! A request descriptor alone: decode and every SPEC §7 check.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tensord_core::fuzzing::descriptor(data));
