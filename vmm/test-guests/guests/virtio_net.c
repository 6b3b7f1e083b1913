/* Drives virtio-net at the first virtio-mmio slot: sends a frame of the local experimental
 * ethertype 0x88b5 and prints the first such frame that comes back. */
#include "virtio.h"

#define ETHERTYPE_HI 0x88
#define ETHERTYPE_LO 0xb5
#define VNET_HDR 12
#define MIN_FRAME 60

struct frame {
    u8 vnet[VNET_HDR];
    u8 dst[6];
    u8 src[6];
    u8 type[2];
    u8 payload[1500];
} __attribute__((packed));

static struct virtq rxq, txq;
static struct frame rx[2];
static struct frame tx;
static u8 mac[6];

static void put_byte_hex(u8 b) {
    static const char digits[] = "0123456789abcdef";
    serial_putc(digits[b >> 4]);
    serial_putc(digits[b & 0xf]);
}

void guest_main(u8 *zero_page) {
    (void)zero_page;
    unsigned long base = VIRTIO_MMIO_BASE;
    int err = virtio_begin(base, 1);
    if (!err) err = virtq_setup(base, 0, &rxq);
    if (!err) err = virtq_setup(base, 1, &txq);
    if (!err) err = virtio_driver_ok(base);
    if (err) {
        serial_puts("virtio-net init failed\n");
        return;
    }
    u32 lo = mmio_read(base, R_CONFIG), hi = mmio_read(base, R_CONFIG + 4);
    for (int i = 0; i < 4; i++) mac[i] = (u8)(lo >> (8 * i));
    mac[4] = (u8)hi;
    mac[5] = (u8)(hi >> 8);
    serial_puts("mac: ");
    for (int i = 0; i < 6; i++) {
        put_byte_hex(mac[i]);
        if (i < 5) serial_putc(':');
    }
    serial_puts((hi >> 16) & 1 ? " link up\n" : " link down\n");

    for (u16 i = 0; i < 2; i++) {
        set_desc(&rxq, i, &rx[i], sizeof(struct frame), DESC_F_WRITE, 0);
        virtq_offer(&rxq, i);
    }

    const char *ping = "ping from the guest";
    for (int i = 0; i < 6; i++) {
        tx.dst[i] = 0xff;
        tx.src[i] = mac[i];
    }
    tx.type[0] = ETHERTYPE_HI;
    tx.type[1] = ETHERTYPE_LO;
    for (int i = 0; ping[i]; i++) tx.payload[i] = (u8)ping[i];
    set_desc(&txq, 0, &tx, VNET_HDR + MIN_FRAME, 0, 0);
    if (virtq_submit(&txq, 0, 50000000UL) < 0) {
        serial_puts("net: send not completed\n");
        return;
    }
    serial_puts("net: sent\n");

    u16 seen = 0;
    for (int frames = 0; frames < 64; frames++) {
        unsigned long spins = 300000000UL;
        while (*(volatile u16 *)&rxq.used.idx == seen) {
            if (spins-- == 0) {
                serial_puts("net: nothing received\n");
                return;
            }
        }
        barrier();
        u16 id = (u16)rxq.used.ring[seen % QSZ].id;
        seen++;
        struct frame *f = &rx[id];
        if (f->type[0] == ETHERTYPE_HI && f->type[1] == ETHERTYPE_LO) {
            serial_puts("net got: ");
            for (int i = 0; i < 64 && f->payload[i]; i++) serial_putc((char)f->payload[i]);
            serial_puts("\n");
            return;
        }
        virtq_offer(&rxq, id); /* Something else (IPv6 neighbour discovery...): reuse the buffer. */
    }
    serial_puts("net: no frame of ours\n");
}
