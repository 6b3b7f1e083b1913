/* Drives virtio-blk at the first virtio-mmio slot: GET_ID, read sector 0, write sector 1, flush,
 * read it back. The host checks what was printed and what landed in the image file. */
#include "virtio.h"

static struct virtq q;
static u8 sector[512];
static char id[21];

static void put_status(const char *what, u8 status) {
    serial_puts(what);
    serial_puts(status == 0 ? ": ok\n" : ": error\n");
}

void guest_main(u8 *zero_page) {
    (void)zero_page;
    int err = virtio_init(&q, VIRTIO_MMIO_BASE, 2);
    if (err) {
        serial_puts("virtio-blk init failed: ");
        serial_put_hex((u64)(long)err);
        serial_puts("\n");
        return;
    }
    u64 capacity = mmio_read(q.base, R_CONFIG) | ((u64)mmio_read(q.base, R_CONFIG + 4) << 32);
    serial_puts("capacity: ");
    serial_put_hex(capacity);
    serial_puts("\n");

    put_status("get_id", blk_request(&q, BLK_T_GET_ID, 0, id, 20));
    id[20] = 0;
    serial_puts("id: ");
    serial_puts(id);
    serial_puts("\n");

    put_status("read sector 0", blk_request(&q, BLK_T_IN, 0, sector, 512));
    sector[40] = 0;
    serial_puts("sector 0 says: ");
    serial_puts((const char *)sector);
    serial_puts("\n");

    const char *message = "written by the ironclad test guest";
    for (int i = 0; i < 512; i++) sector[i] = 0;
    for (int i = 0; message[i]; i++) sector[i] = (u8)message[i];
    put_status("write sector 1", blk_request(&q, BLK_T_OUT, 1, sector, 512));
    put_status("flush", blk_request(&q, BLK_T_FLUSH, 0, 0, 0));

    for (int i = 0; i < 512; i++) sector[i] = 0;
    put_status("read sector 1", blk_request(&q, BLK_T_IN, 1, sector, 512));
    int same = 1;
    for (int i = 0; message[i]; i++) same &= sector[i] == (u8)message[i];
    serial_puts(same ? "read back: same\n" : "read back: different\n");
}
