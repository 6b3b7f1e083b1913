#!/usr/bin/env python3
"""Writes fuzz/seeds/<target>/: hand-made inputs that reach each target's real work (a block read
served, a vsock connection requested, the MMIO bring-up of a device), in the layouts that
vmm/src/fuzzing.rs documents. The fuzzer starts from them; the crates' tests replay them and check
that the device ones are served. Run again after a layout change."""
import json
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")
NEXT, WRITE = 1, 2
QUEUE_STRIDE, AVAIL, USED = 0x400, 0x100, 0x200


def put(target, name, data):
    directory = os.path.join(ROOT, target)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


def desc(addr, length, flags, nxt):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def queue(image, index, descriptors, heads):
    base = index * QUEUE_STRIDE
    for i, d in enumerate(descriptors):
        image[base + 16 * i:base + 16 * (i + 1)] = d
    avail = base + AVAIL
    image[avail:avail + 4] = struct.pack("<HH", 0, len(heads))
    for i, head in enumerate(heads):
        image[avail + 4 + 2 * i:avail + 6 + 2 * i] = struct.pack("<H", head)


def block_seeds():
    # (type, sector, data flags or None, data length); header at 0x300, status byte at 0x310.
    requests = {"read": (0, 1, WRITE, 512), "write": (1, 2, 0, 512), "flush": (4, 0, None, 0),
                "get_id": (8, 0, WRITE, 20), "unsupported": (99, 0, None, 0)}
    for name, (kind, sector, flags, length) in requests.items():
        image = bytearray(0x400)
        if flags is None:
            chain = [desc(0x300, 16, NEXT, 1), desc(0x310, 1, WRITE, 0)]
        else:
            chain = [desc(0x300, 16, NEXT, 1), desc(0x1000, length, NEXT | flags, 2), desc(0x310, 1, WRITE, 0)]
        queue(image, 0, chain, [0])
        image[0x300:0x310] = struct.pack("<IIQ", kind, 0, sector)
        for event_idx in (0, 1):
            put("virtio_block", f"{name}-{event_idx}", bytes([event_idx]) + bytes(image))
    return image


def vsock_header(op, src_port, dst_port, length, dst_cid=2):
    return struct.pack("<QQIIIHHIII", 3, dst_cid, src_port, dst_port, length, 1, op, 0, 65536, 0)


def vsock_seeds():
    # op: 1 REQUEST, 3 RST, 4 SHUTDOWN, 5 RW, 6 CREDIT_UPDATE.
    packets = {"request": [(1, 1024, 1024, b"")],
               "request_rw_rst": [(1, 1025, 1024, b""), (5, 1025, 1024, b"hello"), (3, 1025, 1024, b"")],
               "credit_shutdown": [(6, 1026, 1024, b""), (4, 1026, 1024, b"")],
               "wrong_cid": [(1, 1027, 1024, b"")]}
    for name, sent in packets.items():
        image = bytearray(0x1000)
        queue(image, 0, [desc(0x2000 + 0x400 * i, 0x400, WRITE, 0) for i in range(4)], [0, 1, 2, 3])
        chain, offset = [], 0xC00
        for op, src, dst, data in sent:
            packet = vsock_header(op, src, dst, len(data), dst_cid=7 if name == "wrong_cid" else 2) + data
            image[offset:offset + len(packet)] = packet
            chain.append(desc(offset, len(packet), 0, 0))
            offset += 0x60
        queue(image, 1, chain, list(range(len(chain))))
        for event_idx in (0, 1):
            put("virtio_vsock", f"{name}-{event_idx}", bytes([event_idx]) + bytes(image))


def net_seeds():
    image = bytearray(0x800)
    frame = bytes(12) + bytes.fromhex("ffffffffffff020000000001" + "0806") + bytes(28)
    image[0x300:0x300 + len(frame)] = frame
    image[0x380:0x380 + len(frame)] = bytes([1, 0]) + frame[2:]  # asks for a checksum offload
    tx = [desc(0x300, len(frame), 0, 0), desc(0x300, 12, NEXT, 2), desc(0x30C, len(frame) - 12, 0, 0),
          desc(0x380, len(frame), 0, 0)]
    queue(image, 0, tx, [0, 1, 3])
    queue(image, 1, [desc(0x1000, 2048, WRITE, 0), desc(0x1800, 16, WRITE | NEXT, 2),
                     desc(0x1900, 2048, WRITE, 0)], [0, 1])
    for event_idx in (0, 1):
        put("virtio_net", f"tx_rx-{event_idx}", bytes([event_idx]) + bytes(image))


def mmio_seeds():
    def write(offset, value):
        return bytes([1 | (2 << 1)]) + struct.pack("<HQ", offset, value)

    def read(offset):
        return bytes([2 << 1]) + struct.pack("<HQ", offset, 0)

    # The Linux driver's order: identify, ACKNOWLEDGE, DRIVER, features (VERSION_1), FEATURES_OK,
    # queue 0 (size, rings), ready, DRIVER_OK, then an interrupt ack and a config read.
    ops = [read(0), read(4), read(8), write(0x70, 1), write(0x70, 3), write(0x24, 0), write(0x20, 0),
           write(0x24, 1), write(0x20, 1), write(0x70, 11), write(0x30, 0), read(0x34), write(0x38, 16),
           write(0x80, 0), write(0x84, 0), write(0x90, AVAIL), write(0x94, 0), write(0xA0, USED),
           write(0xA4, 0), write(0x44, 1), write(0x70, 15), read(0x60), write(0x64, 1), read(0x100)]
    image = bytearray(0x400)
    queue(image, 0, [desc(0x300, 16, NEXT, 1), desc(0x1000, 512, NEXT | WRITE, 2), desc(0x310, 1, WRITE, 0)], [0])
    image[0x300:0x310] = struct.pack("<IIQ", 0, 0, 1)
    put("virtio_mmio", "bring_up_and_read", bytes([len(ops)]) + b"".join(ops) + bytes(image))
    reset = ops + [write(0x70, 0)]
    put("virtio_mmio", "reset_while_active", bytes([len(reset)]) + b"".join(reset) + bytes(image))


def line_seeds():
    for i, line in enumerate([b"CONNECT 1024\n", b"CONNECT 1024", b"CONNECT  7 \n", b"connect 1\n",
                              b"CONNECT 4294967296\n"]):
        put("hybrid_vsock_connect", f"line-{i}", line)
    for i, line in enumerate([b"OK 1073741824\n", b"OK 1024", b"OK x\n", b"ERR\n"]):
        put("hybrid_vsock_answer", f"answer-{i}", line)


def agent_seeds():
    for i, path in enumerate(["c1/etc/resolv.conf", "../escape", "link/file", "dest", "a//b", "a/./b",
                              "link", "x/y/z/w", "/etc/passwd"]):
        put("copy_file_path", f"path-{i}", path.encode())
    spec = {"ociVersion": "1.0.2",
            "process": {"args": ["sh", "-c", "echo hi"], "cwd": "/", "env": ["PATH=/bin"], "terminal": False,
                        "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs", "readonly": True}, "hostname": "c1",
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "network", "path": "/proc/1/ns/net"}],
                      "resources": {"memory": {"limit": 67108864}, "pids": {"limit": 10}},
                      "maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"],
                      "seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64"],
                                  "syscalls": [{"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"}]}}}
    put("oci_spec", "full", json.dumps(spec).encode())
    put("oci_spec", "no_args", json.dumps({"ociVersion": "1.0.2", "process": {"args": [], "cwd": "/"}}).encode())
    put("oci_spec", "minimal", json.dumps({"ociVersion": "1.0.2", "process": {"args": ["true"], "cwd": "/"}}).encode())


def shim_seeds():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "shim", "config.toml"), "rb") as f:
        put("shim_config", "installed", f.read())
    allowed = b'vcpus = 2\nmemory_mib = 512\nallowed_annotations = ["io.ironclad.vcpus", ' \
              b'"io.ironclad.memory_mib", "io.ironclad.agent_log"]\n'
    annotations = b"io.ironclad.vcpus=2\nio.ironclad.memory_mib=99999\nio.ironclad.agent_log=debug\nio.ironclad.other=1\n"
    put("shim_config", "annotations", allowed + b"\0" + annotations)
    put("shim_config", "broken", b'vcpus = "x"\n[[[')


if __name__ == "__main__":
    block_seeds()
    vsock_seeds()
    net_seeds()
    mmio_seeds()
    line_seeds()
    agent_seeds()
    shim_seeds()
