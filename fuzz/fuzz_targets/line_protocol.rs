#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgespool::fuzzing::line_protocol(data));
