#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ironclad_agent::fuzzing::oci_spec(data));
