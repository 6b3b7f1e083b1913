#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ironclad_agent::fuzzing::copy_file_path(data));
