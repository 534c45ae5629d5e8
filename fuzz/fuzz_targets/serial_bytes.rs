#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgespool::fuzzing::serial_bytes(data));
