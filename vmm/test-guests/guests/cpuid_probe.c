/* Prints what CPUID leaf 1 tells the guest: ECX carries the hypervisor bit and, where KVM backs
 * it, the APIC timer's TSC-deadline mode, which spares Linux its PIT-based timer calibration. */
#include "guest.h"

void guest_main(u8 *zero_page) {
    (void)zero_page;
    u32 eax = 1, ebx, ecx = 0, edx;
    __asm__ volatile("cpuid" : "+a"(eax), "=b"(ebx), "+c"(ecx), "=d"(edx));
    serial_puts("cpuid 1 ecx: ");
    serial_put_hex(ecx);
    serial_puts("\n");
}
