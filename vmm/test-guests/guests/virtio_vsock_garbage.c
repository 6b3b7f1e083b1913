/* A hostile virtio-vsock driver: chains that are not packets, packets for nobody sent by the
 * thousand without rx buffers to take the answers, a flood of credit requests on a connection.
 * The VMM must count the junk, keep what it owes the guest bounded, and keep serving: an honest
 * packet still reaches the host afterwards. */
#include "virtio.h"

#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define HOST_CID 2
#define HOST_PORT 5000
#define GUEST_PORT 1234
#define FLOOD 2000
#define RX_BUFFERS 4

struct vsock_hdr {
    u64 src_cid;
    u64 dst_cid;
    u32 src_port;
    u32 dst_port;
    u32 len;
    u16 type;
    u16 op;
    u32 flags;
    u32 buf_alloc;
    u32 fwd_cnt;
} __attribute__((packed));

struct packet {
    struct vsock_hdr h;
    u8 data[64];
} __attribute__((packed));

static struct virtq rxq, txq, evq;
static struct packet rx[RX_BUFFERS];
static struct packet tx;
static u64 guest_cid;

static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static void report(const char *what, u64 value) {
    serial_puts(what);
    serial_puts(": ");
    serial_put_hex(value);
    serial_puts("\n");
}

static void header(u64 src_cid, u16 type, u16 op, u32 src_port, u32 dst_port, u32 len) {
    tx.h.src_cid = src_cid;
    tx.h.dst_cid = HOST_CID;
    tx.h.src_port = src_port;
    tx.h.dst_port = dst_port;
    tx.h.len = len;
    tx.h.type = type;
    tx.h.op = op;
    tx.h.flags = 0;
    tx.h.buf_alloc = 4096;
    tx.h.fwd_cnt = 0;
}

/* One packet on the tx queue, in one descriptor of `len` bytes with `flags`. */
static void send_raw(void *addr, u32 len, u16 flags) {
    set_desc(&txq, 0, addr, len, flags, 0);
    virtq_submit(&txq, 0, 50000000UL);
}

static void send(u16 op, u32 src_port, u32 dst_port, const char *data) {
    u32 len = 0;
    while (data && data[len]) {
        tx.data[len] = (u8)data[len];
        len++;
    }
    header(guest_cid, 1, op, src_port, dst_port, len);
    send_raw(&tx, sizeof(struct vsock_hdr) + len, 0);
}

void guest_main(u8 *zero_page) {
    (void)zero_page;
    unsigned long base = VIRTIO_MMIO_BASE;

    mmio_write(base, R_STATUS, S_DRIVER_OK);
    mmio_write(base, R_QUEUE_SEL, 3);
    mmio_write(base, R_QUEUE_NUM, 5);
    *(volatile u8 *)(base + R_CONFIG + 3) = 0xff;
    report("status after abuse", mmio_read(base, R_STATUS));

    int err = virtio_begin(base, 19);
    if (!err) err = virtq_setup(base, 0, &rxq);
    if (!err) err = virtq_setup(base, 1, &txq);
    if (!err) err = virtq_setup(base, 2, &evq);
    if (!err) err = virtio_driver_ok(base);
    if (err) {
        report("init failed", (u64)err);
        return;
    }
    guest_cid = mmio_read(base, R_CONFIG) | ((u64)mmio_read(base, R_CONFIG + 4) << 32);

    /* Chains that are not packets. */
    header(guest_cid, 1, OP_RW, GUEST_PORT, HOST_PORT, 0);
    send_raw(&tx, 10, 0);                                   /* shorter than a header */
    header(guest_cid, 1, OP_RW, GUEST_PORT, HOST_PORT, 5000);
    send_raw(&tx, sizeof(struct vsock_hdr), 0);             /* data promised, none there */
    header(guest_cid, 1, OP_RW, GUEST_PORT, HOST_PORT, 0);
    send_raw(&tx, sizeof(struct vsock_hdr), DESC_F_WRITE);  /* device-writable */
    send_raw((void *)0x7ff000000UL, sizeof(struct vsock_hdr), 0); /* outside guest memory */
    serial_puts("not packets: sent\n");

    /* Packets for nobody, with no rx buffer posted to take the resets. */
    header(99, 1, OP_RW, GUEST_PORT, HOST_PORT, 0);
    send_raw(&tx, sizeof(struct vsock_hdr), 0);             /* somebody else's CID */
    header(guest_cid, 3, OP_RW, GUEST_PORT, HOST_PORT, 0);
    send_raw(&tx, sizeof(struct vsock_hdr), 0);             /* not a stream */
    for (u32 i = 0; i < FLOOD; i++) send(OP_RW, 40000 + i, 7, "x");
    serial_puts("packets for nobody: sent\n");

    /* A real connection, then a flood of credit requests on it. */
    send(OP_REQUEST, GUEST_PORT, HOST_PORT, 0);
    for (u32 i = 0; i < FLOOD; i++) send(OP_CREDIT_REQUEST, GUEST_PORT, HOST_PORT, 0);
    serial_puts("credit requests: sent\n");

    /* Now take what the device owes: count it by kind until nothing more comes. */
    u64 resets = 0, responses = 0, credit_updates = 0, other = 0;
    u16 seen = 0;
    for (u16 i = 0; i < RX_BUFFERS; i++) {
        set_desc(&rxq, i, &rx[i], sizeof(struct packet), DESC_F_WRITE, 0);
        virtq_offer(&rxq, i);
    }
    for (;;) {
        /* Quiet for about a second (a few billion TSC ticks) means the device owes nothing more. */
        u64 start = rdtsc();
        int quiet = 0;
        while (*(volatile u16 *)&rxq.used.idx == seen) {
            if (rdtsc() - start > 3000000000UL) {
                quiet = 1;
                break;
            }
        }
        if (quiet) break;
        barrier();
        u16 id = (u16)rxq.used.ring[seen % QSZ].id;
        seen++;
        switch (rx[id].h.op) {
        case OP_RST: resets++; break;
        case OP_RESPONSE: responses++; break;
        case OP_CREDIT_UPDATE: credit_updates++; break;
        default: other++; break;
        }
        virtq_offer(&rxq, id);
    }
    report("resets received", resets);
    report("responses received", responses);
    report("credit updates received", credit_updates);
    report("other packets received", other);

    send(OP_RW, GUEST_PORT, HOST_PORT, "still serving\n");
    serial_puts("garbage done\n");
}
