/* Drives virtio-vsock at the first virtio-mmio slot, both ways through the hybrid socket (data the
 * guest sends goes in a chain of small descriptors after the header's, as Linux sends large
 * payloads in page fragments):
 *   guest -> host port 5000: REQUEST, RESPONSE, RW "ping", RW "pong" back, SHUTDOWN, RST;
 *   host -> guest port 1024: REQUEST, RESPONSE, RW "hello guest", RW "hello host", SHUTDOWN, RST. */
#include "virtio.h"

#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define HOST_CID 2
#define GUEST_PORT_OUT 1234
#define HOST_PORT 5000
#define GUEST_PORT_LISTEN 1024
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
    u8 data[256];
} __attribute__((packed));

static struct virtq rxq, txq, evq;
static struct packet rx[RX_BUFFERS];
static struct packet tx;
static u16 rx_seen;
static u64 guest_cid;
static u32 received;

static void rx_post(u16 i) {
    set_desc(&rxq, i, &rx[i], sizeof(struct packet), DESC_F_WRITE, 0);
    virtq_offer(&rxq, i);
}

/* The next packet the host sent with operation `op`, skipping credit updates; the buffer it was in
 * is handed back to the device. Returns 0 if nothing came. */
static struct packet *rx_wait(u16 op, struct packet *copy) {
    for (;;) {
        unsigned long spins = 200000000UL;
        while (*(volatile u16 *)&rxq.used.idx == rx_seen) {
            if (spins-- == 0) return 0;
        }
        barrier();
        u16 id = (u16)rxq.used.ring[rx_seen % QSZ].id;
        rx_seen++;
        *copy = rx[id];
        rx_post(id);
        if (copy->h.op == op) return copy;
        if (copy->h.op != OP_CREDIT_UPDATE) {
            serial_puts("unexpected op ");
            serial_put_hex(copy->h.op);
            serial_puts("\n");
        }
    }
}

static void tx_send(u16 op, u32 src_port, u32 dst_port, u32 flags, const char *data) {
    u32 len = 0;
    while (data && data[len]) {
        tx.data[len] = (u8)data[len];
        len++;
    }
    tx.h.src_cid = guest_cid;
    tx.h.dst_cid = HOST_CID;
    tx.h.src_port = src_port;
    tx.h.dst_port = dst_port;
    tx.h.len = len;
    tx.h.type = 1;
    tx.h.op = op;
    tx.h.flags = flags;
    tx.h.buf_alloc = 4096;
    tx.h.fwd_cnt = received;
    /* Header alone, then the data in pieces of at most 8 bytes, one descriptor each. */
    u16 last = 0;
    set_desc(&txq, 0, &tx.h, sizeof(struct vsock_hdr), 0, 0);
    for (u32 off = 0; off < len && last < QSZ - 1; off += 8) {
        u32 piece = len - off < 8 ? len - off : 8;
        txq.desc[last].flags |= DESC_F_NEXT;
        txq.desc[last].next = last + 1;
        last++;
        set_desc(&txq, last, &tx.data[off], piece, 0, 0);
    }
    virtq_submit(&txq, 0, 50000000UL);
}

static void print_data(const char *what, struct packet *p) {
    serial_puts(what);
    for (u32 i = 0; i < p->h.len && i < sizeof p->data; i++) serial_putc((char)p->data[i]);
    received += p->h.len;
}

void guest_main(u8 *zero_page) {
    (void)zero_page;
    unsigned long base = VIRTIO_MMIO_BASE;
    static struct packet p;
    int err = virtio_begin(base, 19);
    if (!err) err = virtq_setup(base, 0, &rxq);
    if (!err) err = virtq_setup(base, 1, &txq);
    if (!err) err = virtq_setup(base, 2, &evq);
    if (!err) err = virtio_driver_ok(base);
    if (err) {
        serial_puts("virtio-vsock init failed\n");
        return;
    }
    guest_cid = mmio_read(base, R_CONFIG) | ((u64)mmio_read(base, R_CONFIG + 4) << 32);
    serial_puts("guest cid: ");
    serial_put_hex(guest_cid);
    serial_puts("\n");
    for (u16 i = 0; i < RX_BUFFERS; i++) rx_post(i);

    /* Guest -> host. */
    tx_send(OP_REQUEST, GUEST_PORT_OUT, HOST_PORT, 0, 0);
    if (!rx_wait(OP_RESPONSE, &p)) { serial_puts("no response from the host\n"); return; }
    serial_puts("guest->host: connected\n");
    tx_send(OP_RW, GUEST_PORT_OUT, HOST_PORT, 0, "ping from the guest\n");
    if (!rx_wait(OP_RW, &p)) { serial_puts("no data from the host\n"); return; }
    print_data("guest got: ", &p);
    tx_send(OP_SHUTDOWN, GUEST_PORT_OUT, HOST_PORT, 3, 0);
    if (!rx_wait(OP_RST, &p)) { serial_puts("no reset after shutdown\n"); return; }
    serial_puts("guest->host: closed\n");

    /* Host -> guest. */
    received = 0;
    if (!rx_wait(OP_REQUEST, &p) || p.h.dst_port != GUEST_PORT_LISTEN) {
        serial_puts("no connection request for port 1024\n");
        return;
    }
    u32 host_port = p.h.src_port;
    tx_send(OP_RESPONSE, GUEST_PORT_LISTEN, host_port, 0, 0);
    serial_puts("host->guest: accepted from port ");
    serial_put_hex(host_port);
    serial_puts("\n");
    if (!rx_wait(OP_RW, &p)) { serial_puts("no data from the host\n"); return; }
    print_data("guest got: ", &p);
    tx_send(OP_RW, GUEST_PORT_LISTEN, host_port, 0, "hello host\n");
    if (!rx_wait(OP_SHUTDOWN, &p)) { serial_puts("no shutdown from the host\n"); return; }
    tx_send(OP_RST, GUEST_PORT_LISTEN, host_port, 0, 0);
    serial_puts("host->guest: closed\n");
}
