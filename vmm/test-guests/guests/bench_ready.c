/* The benchmark guest, as in the platform's reference measurement: signal the boot timer first
 * thing, print FCREADY, reset. */
#include "guest.h"

void guest_main(u8 *zero_page) {
    (void)zero_page;
    outb(0x3f0, 123);
    serial_puts("FCREADY\n");
}
