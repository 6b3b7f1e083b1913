/* Drives virtio-balloon at the first virtio-mmio slot with free page reporting: reports a filled
 * block and checks it reads back as zeros, sends a report outside its memory (refused, the device
 * goes on), inflates one page and deflates it. The host checks what was printed and the metrics. */
#include "virtio.h"

#define BALLOON_DEVICE_ID 5
#define F_REPORTING (1u << 5)
#define BLOCK_LEN 65536

static struct virtq inflateq, deflateq, reportq;
static u8 block[BLOCK_LEN] __attribute__((aligned(4096)));
static u8 page[4096] __attribute__((aligned(4096)));
static u32 pfn;

/* VERSION_1 and REPORTING, then the three queues. */
static int balloon_init(unsigned long base) {
    if (mmio_read(base, R_MAGIC) != 0x74726976 || mmio_read(base, R_DEVICE_ID) != BALLOON_DEVICE_ID) return -1;
    mmio_write(base, R_STATUS, 0);
    mmio_write(base, R_STATUS, S_ACKNOWLEDGE);
    mmio_write(base, R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    mmio_write(base, R_DEVICE_FEATURES_SEL, 0);
    if (!(mmio_read(base, R_DEVICE_FEATURES) & F_REPORTING)) return -2;
    mmio_write(base, R_DRIVER_FEATURES_SEL, 1);
    mmio_write(base, R_DRIVER_FEATURES, 1);
    mmio_write(base, R_DRIVER_FEATURES_SEL, 0);
    mmio_write(base, R_DRIVER_FEATURES, F_REPORTING);
    mmio_write(base, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if (!(mmio_read(base, R_STATUS) & S_FEATURES_OK)) return -3;
    int err = virtq_setup(base, 0, &inflateq);
    if (!err) err = virtq_setup(base, 1, &deflateq);
    if (!err) err = virtq_setup(base, 2, &reportq);
    if (!err) err = virtio_driver_ok(base);
    return err;
}

static void fill(volatile u8 *p, u32 len) {
    for (u32 i = 0; i < len; i++) p[i] = 0xa5;
}

static int all_zero(volatile u8 *p, u32 len) {
    for (u32 i = 0; i < len; i++)
        if (p[i]) return 0;
    return 1;
}

static void say(const char *what, long used) {
    serial_puts(what);
    serial_puts(used < 0 ? ": no answer\n" : ": used\n");
}

void guest_main(u8 *zero_page) {
    (void)zero_page;
    int err = balloon_init(VIRTIO_MMIO_BASE);
    if (err) {
        serial_puts("virtio-balloon init failed: ");
        serial_put_hex((u64)(long)err);
        serial_puts("\n");
        return;
    }
    serial_puts("num_pages: ");
    serial_put_hex(mmio_read(VIRTIO_MMIO_BASE, R_CONFIG));
    serial_puts("\n");

    fill(block, BLOCK_LEN);
    set_desc(&reportq, 0, block, BLOCK_LEN, DESC_F_WRITE, 0);
    say("report", virtq_submit(&reportq, 0, 50000000UL));
    serial_puts(all_zero(block, BLOCK_LEN) ? "reported block: zero\n" : "reported block: kept\n");

    /* Far past the end of guest memory. */
    set_desc(&reportq, 0, (void *)0x7f000000UL, BLOCK_LEN, DESC_F_WRITE, 0);
    say("report outside memory", virtq_submit(&reportq, 0, 50000000UL));

    fill(page, sizeof page);
    pfn = (u32)((u64)page >> 12);
    set_desc(&inflateq, 0, &pfn, sizeof pfn, 0, 0);
    say("inflate", virtq_submit(&inflateq, 0, 50000000UL));
    serial_puts(all_zero(page, sizeof page) ? "inflated page: zero\n" : "inflated page: kept\n");
    mmio_write(VIRTIO_MMIO_BASE, R_CONFIG + 4, 1);
    set_desc(&deflateq, 0, &pfn, sizeof pfn, 0, 0);
    say("deflate", virtq_submit(&deflateq, 0, 50000000UL));
    mmio_write(VIRTIO_MMIO_BASE, R_CONFIG + 4, 0);
}
