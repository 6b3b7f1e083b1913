/* A hostile driver: malformed registers, malformed requests, looping chains, a corrupt ring.
 * The VMM must answer with error statuses (or ignore the junk), keep serving, and never crash. */
#include "virtio.h"

static struct virtq q;
static u8 buffer[512];

static void report(const char *what, long value) {
    serial_puts(what);
    serial_puts(": ");
    serial_put_hex((u64)value);
    serial_puts("\n");
}

/* A read whose data buffer is where the guest says, however wrong. */
static u8 read_into(u64 address, u32 len, u64 sector) {
    blk_hdr.type = BLK_T_IN;
    blk_hdr.sector = sector;
    blk_status = 0xee;
    set_desc(&q, 0, &blk_hdr, sizeof blk_hdr, DESC_F_NEXT, 1);
    set_desc(&q, 1, (void *)address, len, DESC_F_WRITE | DESC_F_NEXT, 2);
    set_desc(&q, 2, (void *)&blk_status, 1, DESC_F_WRITE, 0);
    if (virtq_submit(&q, 0, 50000000UL) < 0) return 0xff;
    return blk_status;
}

void guest_main(u8 *zero_page) {
    (void)zero_page;
    unsigned long base = VIRTIO_MMIO_BASE;

    /* Register abuse before the device is set up: out-of-order status, odd widths, junk offsets. */
    mmio_write(base, R_STATUS, S_DRIVER_OK);
    *(volatile u8 *)(base + R_STATUS) = 0xff;
    *(volatile u16 *)(base + R_MAGIC) = 0x1234;
    mmio_write(base, 0x0f0, 0xdeadbeef);
    mmio_write(base, R_QUEUE_SEL, 77);
    (void)mmio_read(base, 0x0f4);
    report("status after abuse", mmio_read(base, R_STATUS));

    int err = virtio_init(&q, base, 2);
    if (err) {
        report("init failed", err);
        return;
    }
    /* A queue size that is not a power of two, after DRIVER_OK: ignored. */
    mmio_write(base, R_QUEUE_NUM, 3);

    report("data outside guest memory", read_into(0x7ff000000UL, 512, 0));
    report("data in the MMIO hole", read_into(0xc0000000UL, 512, 0));
    report("past the end of the disk", read_into((u64)buffer, 512, 0xffffffffffUL));
    report("unaligned length", read_into((u64)buffer, 100, 0));
    report("unknown request type", blk_request(&q, 0x77, 0, buffer, 512));

    /* The header in a device-writable descriptor. */
    blk_status = 0xee;
    set_desc(&q, 0, &blk_hdr, sizeof blk_hdr, DESC_F_WRITE | DESC_F_NEXT, 1);
    set_desc(&q, 1, (void *)&blk_status, 1, DESC_F_WRITE, 0);
    virtq_submit(&q, 0, 50000000UL);
    report("writable header", blk_status);

    /* A loop: 0 -> 1 -> 0, nothing device-writable, so no status can be given. */
    set_desc(&q, 0, &blk_hdr, sizeof blk_hdr, DESC_F_NEXT, 1);
    set_desc(&q, 1, buffer, 512, DESC_F_NEXT, 0);
    report("looping chain used length", virtq_submit(&q, 0, 50000000UL));

    /* A chain whose next index is past the queue. */
    set_desc(&q, 0, &blk_hdr, sizeof blk_hdr, DESC_F_NEXT, 200);
    report("next past the queue used length", virtq_submit(&q, 0, 50000000UL));

    /* After all that, an honest read still works. */
    report("honest read", read_into((u64)buffer, 512, 0));

    /* Last: a head index past the queue. The device cannot answer it; the guest gives up. */
    report("bad head index", virtq_submit(&q, 100, 300000UL));
    serial_puts("garbage done\n");
}
