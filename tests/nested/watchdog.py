#!/usr/bin/env python3
"""Watches the nested tier's L1 through its QEMU monitor and stops it when it is wedged.

QEMU's TCG emulation of SVM sometimes leaves the L1 CPU halted with interrupts enabled and an
interrupt pending in its local APIC, for good (seen 2026-11-30: L1 idle in HLT, IF=1, the timer
vector in IRR, nothing delivered for minutes; a lost global interrupt flag would look so). A CPU
that works takes such an interrupt at once (when its priority is above the processor's), so
seeing that state in three polls 30 s apart means
the emulator, not a test, stopped: the watchdog writes WEDGED_FILE and quits QEMU, and run.sh
runs the suites that had not reported again, once.

usage: watchdog.py MONITOR_SOCKET WEDGED_FILE
"""
import re
import socket
import sys
import time

POLL_SECONDS = 30
POLLS_TO_DECIDE = 3
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def ask(sock, command):
    sock.sendall((command + "\n").encode())
    time.sleep(1.0)
    out = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            out += data
    except socket.timeout:
        pass
    return ANSI.sub("", out.decode(errors="replace"))


def deliverable(lapic):
    """Whether `info lapic` shows a pending vector that the processor priority lets through."""
    irr = re.search(r"IRR\s+([0-9 ]*)", lapic)
    ppr = re.search(r"PPR (0x[0-9a-f]+)", lapic)
    vectors = [int(v) for v in irr.group(1).split()] if irr else []
    return bool(vectors) and ppr is not None and max(vectors) >> 4 > int(ppr.group(1), 16) >> 4


def wedged(sock):
    registers = ask(sock, "info registers")
    halted = re.search(r"HLT=1", registers) is not None
    flags = re.search(r"RFL=([0-9a-f]+)", registers)
    interrupts_on = flags is not None and int(flags.group(1), 16) & 0x200 != 0
    return halted and interrupts_on and deliverable(ask(sock, "info lapic"))


def main():
    monitor, wedged_file = sys.argv[1], sys.argv[2]
    sock = None
    for _ in range(120):
        try:
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(monitor)
            break
        except OSError:
            sock = None
            time.sleep(1)
    if sock is None:
        return 0
    sock.settimeout(3)
    ask(sock, "info status")
    seen = 0
    while True:
        time.sleep(POLL_SECONDS)
        try:
            seen = seen + 1 if wedged(sock) else 0
        except OSError:
            return 0  # QEMU is gone
        if seen >= POLLS_TO_DECIDE:
            with open(wedged_file, "w") as f:
                f.write("L1 halted with an interrupt pending for %d s\n" % (POLL_SECONDS * seen))
            ask(sock, "quit")
            return 0


if __name__ == "__main__":
    sys.exit(main())
