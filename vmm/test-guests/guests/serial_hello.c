/* Prints over the serial port, reads the command line the VMM placed, and resets. */
#include "guest.h"

/* boot_params.hdr.cmd_line_ptr is at offset 0x228 of the zero page. */
#define ZERO_PAGE_CMD_LINE_PTR 0x228

void guest_main(u8 *zero_page) {
    serial_puts("ironclad test guest: hello\n");
    u32 cmdline_ptr = *(volatile u32 *)(zero_page + ZERO_PAGE_CMD_LINE_PTR);
    serial_puts("cmdline: ");
    serial_puts((const char *)(u64)cmdline_ptr);
    serial_puts("\n");
}
