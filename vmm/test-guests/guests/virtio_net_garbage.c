/* A hostile virtio-net driver: register abuse, malformed tx chains, frames asking for offloads that
 * were never negotiated, rx buffers the device cannot fill. The VMM must drop the junk, count it,
 * keep serving and never crash; an honest frame still goes out and one still comes in. */
#include "virtio.h"

#define VNET_HDR 12
#define MIN_FRAME 60
#define ETHERTYPE_HI 0x88
#define ETHERTYPE_LO 0xb5
#define HDR_F_NEEDS_CSUM 1
#define GSO_TCPV4 1

struct frame {
    u8 vnet[VNET_HDR];
    u8 dst[6];
    u8 src[6];
    u8 type[2];
    u8 payload[1500];
} __attribute__((packed));

static struct virtq rxq, txq;
static struct frame tx, rx_good;
static u8 rx_readonly[sizeof(struct frame)];

static void report(const char *what, long value) {
    serial_puts(what);
    serial_puts(": ");
    serial_put_hex((u64)value);
    serial_puts("\n");
}

static void fill_frame(const char *text) {
    for (int i = 0; i < VNET_HDR; i++) tx.vnet[i] = 0;
    for (int i = 0; i < 6; i++) {
        tx.dst[i] = 0xff;
        tx.src[i] = i == 5 ? 1 : (i == 0 ? 2 : 0);
    }
    tx.type[0] = ETHERTYPE_HI;
    tx.type[1] = ETHERTYPE_LO;
    int i = 0;
    for (; text[i]; i++) tx.payload[i] = (u8)text[i];
    for (; i < 64; i++) tx.payload[i] = 0;
}

static long send(u32 len, u16 flags) {
    set_desc(&txq, 0, &tx, len, flags, 0);
    return virtq_submit(&txq, 0, 50000000UL);
}

void guest_main(u8 *zero_page) {
    (void)zero_page;
    unsigned long base = VIRTIO_MMIO_BASE;

    /* Register abuse before the device is set up. */
    mmio_write(base, R_STATUS, S_DRIVER_OK);
    *(volatile u16 *)(base + R_CONFIG) = 0x1234;
    mmio_write(base, R_QUEUE_SEL, 99);
    mmio_write(base, R_QUEUE_READY, 1);
    report("status after abuse", mmio_read(base, R_STATUS));

    int err = virtio_begin(base, 1);
    if (!err) err = virtq_setup(base, 0, &rxq);
    if (!err) err = virtq_setup(base, 1, &txq);
    if (!err) err = virtio_driver_ok(base);
    if (err) {
        report("init failed", err);
        return;
    }

    fill_frame("junk");
    report("writable tx descriptor", send(VNET_HDR + MIN_FRAME, DESC_F_WRITE));
    report("shorter than its header", send(4, 0));
    tx.vnet[0] = HDR_F_NEEDS_CSUM;
    tx.vnet[6] = 14;
    tx.vnet[8] = 16;
    report("checksum offload", send(VNET_HDR + MIN_FRAME, 0));
    fill_frame("junk");
    tx.vnet[1] = GSO_TCPV4;
    tx.vnet[4] = 0xa8; /* gso_size 1448 */
    tx.vnet[5] = 0x05;
    report("segmentation offload", send(VNET_HDR + MIN_FRAME, 0));
    fill_frame("junk");
    set_desc(&txq, 0, (void *)0x7ff000000UL, VNET_HDR + MIN_FRAME, 0, 0);
    report("frame outside guest memory", virtq_submit(&txq, 0, 50000000UL));
    /* 72 bytes, then 64 KiB of guest memory: more than any frame. */
    set_desc(&txq, 0, &tx, VNET_HDR + MIN_FRAME, DESC_F_NEXT, 1);
    set_desc(&txq, 1, (void *)0x200000UL, 0x10000, 0, 0);
    report("longer than any frame", virtq_submit(&txq, 0, 50000000UL));

    fill_frame("honest frame from the guest");
    report("honest frame", send(VNET_HDR + MIN_FRAME, 0));

    /* rx: a buffer the device may not write, one outside guest memory, then a good one. */
    set_desc(&rxq, 0, rx_readonly, sizeof rx_readonly, 0, 0);
    virtq_offer(&rxq, 0);
    set_desc(&rxq, 1, (void *)0x7ff000000UL, sizeof(struct frame), DESC_F_WRITE, 0);
    virtq_offer(&rxq, 1);
    set_desc(&rxq, 2, &rx_good, sizeof rx_good, DESC_F_WRITE, 0);
    virtq_offer(&rxq, 2);
    serial_puts("rx offered\n");

    u16 seen = 0;
    for (int frames = 0; frames < 256; frames++) {
        unsigned long spins = 300000000UL;
        while (*(volatile u16 *)&rxq.used.idx == seen) {
            if (spins-- == 0) {
                serial_puts("net: nothing received\n");
                return;
            }
        }
        barrier();
        struct virtq_used_elem used = rxq.used.ring[seen % QSZ];
        seen++;
        if (used.id != 2) {
            serial_puts("unusable rx buffer returned, length ");
            serial_put_hex(used.len);
            serial_puts("\n");
            continue;
        }
        if (rx_good.type[0] == ETHERTYPE_HI && rx_good.type[1] == ETHERTYPE_LO) {
            serial_puts("net got: ");
            for (int i = 0; i < 64 && rx_good.payload[i]; i++) serial_putc((char)rx_good.payload[i]);
            serial_puts("\n");
            return;
        }
        virtq_offer(&rxq, 2);
    }
    serial_puts("net: no frame of ours\n");
}
