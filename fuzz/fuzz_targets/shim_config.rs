#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ironclad_shim::fuzzing::config(data));
