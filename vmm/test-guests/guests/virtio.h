/* A minimal polled virtio-mmio (version 2) driver for one split queue, for the test guests.
 * No interrupts: the guest runs with them off and polls the used ring. */
#ifndef IRONCLAD_VIRTIO_H
#define IRONCLAD_VIRTIO_H

#include "guest.h"

#define VIRTIO_MMIO_BASE 0xd0000000UL
#define VIRTIO_MMIO_SIZE 0x1000UL

#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INTERRUPT_STATUS 0x060
#define R_INTERRUPT_ACK 0x064
#define R_STATUS 0x070
#define R_QUEUE_DESC_LOW 0x080
#define R_QUEUE_DESC_HIGH 0x084
#define R_QUEUE_DRIVER_LOW 0x090
#define R_QUEUE_DRIVER_HIGH 0x094
#define R_QUEUE_DEVICE_LOW 0x0a0
#define R_QUEUE_DEVICE_HIGH 0x0a4
#define R_CONFIG 0x100

#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2

#define QSZ 8

struct virtq_desc { u64 addr; u32 len; u16 flags; u16 next; };
struct virtq_avail { u16 flags; u16 idx; u16 ring[QSZ]; u16 used_event; };
struct virtq_used_elem { u32 id; u32 len; };
struct virtq_used { u16 flags; u16 idx; struct virtq_used_elem ring[QSZ]; u16 avail_event; };

struct virtq {
    unsigned long base;
    u32 index;
    struct virtq_desc desc[QSZ] __attribute__((aligned(16)));
    struct virtq_avail avail __attribute__((aligned(2)));
    struct virtq_used used __attribute__((aligned(4)));
    u16 next_avail;
};

#define barrier() __asm__ volatile("" ::: "memory")

static inline u32 mmio_read(unsigned long base, u32 off) { return *(volatile u32 *)(base + off); }
static inline void mmio_write(unsigned long base, u32 off, u32 v) { *(volatile u32 *)(base + off) = v; }

/* Resets the device and negotiates VERSION_1 only. Returns 0 on success. */
static int virtio_begin(unsigned long base, u32 device_id) {
    if (mmio_read(base, R_MAGIC) != 0x74726976 || mmio_read(base, R_VERSION) != 2) return -1;
    if (mmio_read(base, R_DEVICE_ID) != device_id) return -2;
    mmio_write(base, R_STATUS, 0);
    mmio_write(base, R_STATUS, S_ACKNOWLEDGE);
    mmio_write(base, R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    mmio_write(base, R_DEVICE_FEATURES_SEL, 1);
    if (!(mmio_read(base, R_DEVICE_FEATURES) & 1)) return -3;
    mmio_write(base, R_DRIVER_FEATURES_SEL, 1);
    mmio_write(base, R_DRIVER_FEATURES, 1);
    mmio_write(base, R_DRIVER_FEATURES_SEL, 0);
    mmio_write(base, R_DRIVER_FEATURES, 0);
    mmio_write(base, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if (!(mmio_read(base, R_STATUS) & S_FEATURES_OK)) return -4;
    return 0;
}

static int virtq_setup(unsigned long base, u32 index, struct virtq *q) {
    q->base = base;
    q->index = index;
    mmio_write(base, R_QUEUE_SEL, index);
    if (mmio_read(base, R_QUEUE_NUM_MAX) < QSZ) return -5;
    mmio_write(base, R_QUEUE_NUM, QSZ);
    mmio_write(base, R_QUEUE_DESC_LOW, (u32)(u64)q->desc);
    mmio_write(base, R_QUEUE_DESC_HIGH, 0);
    mmio_write(base, R_QUEUE_DRIVER_LOW, (u32)(u64)&q->avail);
    mmio_write(base, R_QUEUE_DRIVER_HIGH, 0);
    mmio_write(base, R_QUEUE_DEVICE_LOW, (u32)(u64)&q->used);
    mmio_write(base, R_QUEUE_DEVICE_HIGH, 0);
    mmio_write(base, R_QUEUE_READY, 1);
    return 0;
}

static int virtio_driver_ok(unsigned long base) {
    mmio_write(base, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    return (mmio_read(base, R_STATUS) & S_DRIVER_OK) ? 0 : -6;
}

/* A one-queue device: begin, queue 0, DRIVER_OK. */
static __attribute__((unused)) int virtio_init(struct virtq *q, unsigned long base, u32 device_id) {
    int err = virtio_begin(base, device_id);
    if (!err) err = virtq_setup(base, 0, q);
    if (!err) err = virtio_driver_ok(base);
    return err;
}

/* Makes `head` available on `q` and kicks the device, without waiting. */
static void virtq_offer(struct virtq *q, u16 head) {
    q->avail.ring[q->next_avail % QSZ] = head;
    barrier();
    q->next_avail++;
    *(volatile u16 *)&q->avail.idx = q->next_avail;
    barrier();
    mmio_write(q->base, R_QUEUE_NOTIFY, q->index);
}

/* Makes descriptor `head` available, kicks the device, and waits (at most `spins` polls) for it
 * to be used. Returns the used length, or -1 if the device never answered. */
static long virtq_submit(struct virtq *q, u16 head, unsigned long spins) {
    virtq_offer(q, head);
    while (*(volatile u16 *)&q->used.idx != q->next_avail) {
        if (spins-- == 0) return -1;
    }
    barrier();
    mmio_write(q->base, R_INTERRUPT_ACK, mmio_read(q->base, R_INTERRUPT_STATUS));
    return q->used.ring[(u16)(q->next_avail - 1) % QSZ].len;
}

static inline void set_desc(struct virtq *q, u16 i, void *addr, u32 len, u16 flags, u16 next) {
    q->desc[i].addr = (u64)addr;
    q->desc[i].len = len;
    q->desc[i].flags = flags;
    q->desc[i].next = next;
}

/* virtio-blk */
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8

struct blk_header { u32 type; u32 reserved; u64 sector; };

static __attribute__((unused)) struct blk_header blk_hdr;
static volatile __attribute__((unused)) u8 blk_status;

/* header → data (if any) → status; returns the status byte, or 0xff if there was no answer. */
static __attribute__((unused)) u8 blk_request(struct virtq *q, u32 type, u64 sector, void *data, u32 len) {
    blk_hdr.type = type;
    blk_hdr.reserved = 0;
    blk_hdr.sector = sector;
    blk_status = 0xee;
    u16 data_flags = (type == BLK_T_OUT) ? 0 : DESC_F_WRITE;
    if (len) {
        set_desc(q, 0, &blk_hdr, sizeof blk_hdr, DESC_F_NEXT, 1);
        set_desc(q, 1, data, len, data_flags | DESC_F_NEXT, 2);
        set_desc(q, 2, (void *)&blk_status, 1, DESC_F_WRITE, 0);
    } else {
        set_desc(q, 0, &blk_hdr, sizeof blk_hdr, DESC_F_NEXT, 1);
        set_desc(q, 1, (void *)&blk_status, 1, DESC_F_WRITE, 0);
    }
    if (virtq_submit(q, 0, 50000000UL) < 0) return 0xff;
    return blk_status;
}

#endif
