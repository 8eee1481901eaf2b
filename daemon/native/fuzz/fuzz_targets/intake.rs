//! Request-ring bytes written by a rogue client: record validation, then the whole intake of every accepted record (descriptor, signature, bytes and bool values).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tensord_core::fuzzing::intake(data));
