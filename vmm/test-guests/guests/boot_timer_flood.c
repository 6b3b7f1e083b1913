/* Writes the boot-timer signal to port 0x3f0 over and over, then executes an SSE instruction: where
 * KVM emulates guest kernel code the vCPU fails (the VMM's last words go to a stderr nobody may be
 * reading any more); with hardware virtualization it is a triple fault, i.e. a reset. */
#include "guest.h"

#define BOOT_TIMER_PORT 0x3f0
#define BOOT_TIMER_MAGIC 123

void guest_main(u8 *zero_page) {
    (void)zero_page;
    for (int i = 0; i < 300; i++) outb(BOOT_TIMER_PORT, BOOT_TIMER_MAGIC);
    serial_puts("boot timer flooded\n");
    __asm__ volatile("xorps %%xmm0, %%xmm0" ::: "memory");
    serial_puts("after sse\n");
}
