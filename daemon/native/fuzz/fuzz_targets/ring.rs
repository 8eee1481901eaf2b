//! A producer, a consumer and a client scribbling over the ring and its counters.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tensord_core::fuzzing::ring(data));
