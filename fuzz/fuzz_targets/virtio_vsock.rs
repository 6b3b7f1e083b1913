#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = ironclad_vmm::fuzzing::virtio_vsock(data);
});
