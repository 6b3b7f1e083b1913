/* Finds the MP floating pointer where Linux looks for it and counts the CPUs the table announces. */
#include "guest.h"

void guest_main(u8 *zero_page) {
    (void)zero_page;
    u8 *floating = (u8 *)0x9fc00;
    if (floating[0] != '_' || floating[1] != 'M' || floating[2] != 'P' || floating[3] != '_') {
        serial_puts("no MP table\n");
        return;
    }
    u8 *table = (u8 *)(u64)(*(u32 *)(floating + 4));
    u8 sum = 0;
    u16 length = *(u16 *)(table + 4);
    for (u16 i = 0; i < length; i++) sum += table[i];
    u16 count = *(u16 *)(table + 34);
    u8 *entry = table + 44;
    int cpus = 0, boot = -1;
    for (u16 i = 0; i < count; i++) {
        if (entry[0] == 0) {
            if (entry[3] & 2) boot = entry[1];
            cpus++;
            entry += 20;
        } else {
            entry += 8;
        }
    }
    serial_puts("mp table checksum: ");
    serial_puts(sum == 0 ? "ok\n" : "bad\n");
    serial_puts("cpus: ");
    serial_put_hex((u64)cpus);
    serial_puts("\nboot cpu: ");
    serial_put_hex((u64)boot);
    serial_puts("\n");
}
