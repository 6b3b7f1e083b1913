/* Announces itself, then spins: the VMM must stop it on SIGTERM. */
#include "guest.h"

void guest_main(u8 *zero_page) {
    (void)zero_page;
    serial_puts("spinning\n");
    for (;;) {
        __asm__ volatile("" ::: "memory");
    }
}
