#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ironclad_vmm::fuzzing::hybrid_vsock_connect(data));
