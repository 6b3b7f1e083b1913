/* Drives virtio-fs at the first virtio-mmio slot, whose backend is a real virtiofsd: reads the tag,
 * then on the request queue FUSE_INIT, FUSE_LOOKUP of "hello.txt" in the shared directory, OPEN,
 * READ (printed), and FUSE_MKDIR of "made-by-guest" (the host checks it is there). */
#include "virtio.h"

#define FUSE_LOOKUP 1
#define FUSE_MKDIR 9
#define FUSE_OPEN 14
#define FUSE_READ 15
#define FUSE_INIT 26
#define FUSE_ROOT_ID 1

struct fuse_in_header {
    u32 len;
    u32 opcode;
    u64 unique;
    u64 nodeid;
    u32 uid;
    u32 gid;
    u32 pid;
    u32 padding;
} __attribute__((packed));

struct fuse_out_header {
    u32 len;
    int error;
    u64 unique;
} __attribute__((packed));

struct fuse_entry_out {
    u64 nodeid;
    u64 generation;
    u64 entry_valid;
    u64 attr_valid;
    u32 entry_valid_nsec;
    u32 attr_valid_nsec;
    u8 attr[88];
} __attribute__((packed));

struct fuse_open_out {
    u64 fh;
    u32 open_flags;
    u32 padding;
} __attribute__((packed));

static struct virtq hiprio, requests;
static struct {
    struct fuse_in_header h;
    u8 body[128];
} in;
static struct {
    struct fuse_out_header h;
    u8 body[256];
} out;
static u64 unique;

/* Sends the request in `in` (its body `body_len` bytes) and waits for the answer in `out`.
 * Returns the FUSE error (0 on success), or 1 if the device never answered. */
static int fuse_call(u32 opcode, u64 nodeid, u32 body_len) {
    in.h.len = sizeof(in.h) + body_len;
    in.h.opcode = opcode;
    in.h.unique = ++unique;
    in.h.nodeid = nodeid;
    in.h.uid = 0;
    in.h.gid = 0;
    in.h.pid = 1;
    in.h.padding = 0;
    for (unsigned i = 0; i < sizeof(out); i++) ((u8 *)&out)[i] = 0;
    set_desc(&requests, 0, &in, in.h.len, DESC_F_NEXT, 1);
    set_desc(&requests, 1, &out, sizeof(out), DESC_F_WRITE, 0);
    if (virtq_submit(&requests, 0, 2000000000UL) < 0) return 1;
    if (out.h.unique != in.h.unique) return 2;
    return out.h.error;
}

static void say(const char *what, int err) {
    serial_puts(what);
    if (err == 0) {
        serial_puts(": ok\n");
    } else {
        serial_puts(": error ");
        serial_put_hex((u64)(long)err);
        serial_puts("\n");
    }
}

static u32 put_name(u32 at, const char *name) {
    u32 i = 0;
    for (; name[i]; i++) in.body[at + i] = (u8)name[i];
    in.body[at + i] = 0;
    return at + i + 1;
}

void guest_main(u8 *zero_page) {
    (void)zero_page;
    int err = virtio_begin(VIRTIO_MMIO_BASE, 26);
    if (!err) err = virtq_setup(VIRTIO_MMIO_BASE, 0, &hiprio);
    if (!err) err = virtq_setup(VIRTIO_MMIO_BASE, 1, &requests);
    if (!err) err = virtio_driver_ok(VIRTIO_MMIO_BASE);
    if (err) {
        say("virtio-fs init", err);
        return;
    }
    char tag[37];
    for (int i = 0; i < 36; i += 4) {
        u32 word = mmio_read(VIRTIO_MMIO_BASE, R_CONFIG + i);
        for (int b = 0; b < 4; b++) tag[i + b] = (char)(word >> (8 * b));
    }
    tag[36] = 0;
    serial_puts("tag: ");
    serial_puts(tag);
    serial_puts("\n");
    serial_puts("request queues: ");
    serial_put_hex(mmio_read(VIRTIO_MMIO_BASE, R_CONFIG + 36));
    serial_puts("\n");

    u32 *init_in = (u32 *)in.body;
    init_in[0] = 7;     /* major */
    init_in[1] = 31;    /* minor */
    init_in[2] = 0;     /* max_readahead */
    init_in[3] = 0;     /* flags */
    err = fuse_call(FUSE_INIT, 0, 16);
    say("init", err);
    if (err) return;
    serial_puts("fuse major: ");
    serial_put_hex(*(u32 *)out.body);
    serial_puts("\n");

    err = fuse_call(FUSE_LOOKUP, FUSE_ROOT_ID, put_name(0, "hello.txt"));
    say("lookup", err);
    if (err) return;
    u64 node = ((struct fuse_entry_out *)out.body)->nodeid;

    u32 *open_in = (u32 *)in.body;
    open_in[0] = 0; /* O_RDONLY */
    open_in[1] = 0;
    err = fuse_call(FUSE_OPEN, node, 8);
    say("open", err);
    if (err) return;
    u64 fh = ((struct fuse_open_out *)out.body)->fh;

    u64 *read_in = (u64 *)in.body;
    read_in[0] = fh;
    read_in[1] = 0;            /* offset */
    read_in[2] = 64;           /* size (u32), read_flags (u32) */
    read_in[3] = 0;            /* lock_owner */
    read_in[4] = 0;            /* flags, padding */
    err = fuse_call(FUSE_READ, node, 40);
    say("read", err);
    if (err) return;
    u32 got = out.h.len - sizeof(out.h);
    if (got > 64) got = 64;
    out.body[got] = 0;
    serial_puts("file says: ");
    serial_puts((const char *)out.body);
    serial_puts("\n");

    u32 *mkdir_in = (u32 *)in.body;
    mkdir_in[0] = 0755;
    mkdir_in[1] = 0;
    say("mkdir", fuse_call(FUSE_MKDIR, FUSE_ROOT_ID, put_name(8, "made-by-guest")));
}
