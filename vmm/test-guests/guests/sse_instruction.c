/* Executes one SSE instruction. Where KVM emulates guest kernel code (no vmx/svm), the emulator
 * cannot, and the vCPU fails; with hardware virtualization and CR4.OSFXSR clear it raises #UD,
 * which with no IDT becomes a triple fault, i.e. a reset. Either way "after sse" never prints. */
#include "guest.h"

void guest_main(u8 *zero_page) {
    (void)zero_page;
    serial_puts("before sse\n");
    __asm__ volatile("xorps %%xmm0, %%xmm0" ::: "memory");
    serial_puts("after sse\n");
}
