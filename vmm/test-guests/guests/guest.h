/* Shared by the freestanding test guests: port I/O, the serial console, the reset line.
 * Built with -mgeneral-regs-only: this KVM's instruction emulator stops at any SSE instruction. */
#ifndef IRONCLAD_GUEST_H
#define IRONCLAD_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define SERIAL_PORT 0x3f8
#define SERIAL_LSR (SERIAL_PORT + 5)
#define SERIAL_LSR_THR_EMPTY 0x20

static inline void outb(u16 port, u8 value) { __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline void serial_putc(char c) {
    while (!(inb(SERIAL_LSR) & SERIAL_LSR_THR_EMPTY)) {
    }
    outb(SERIAL_PORT, (u8)c);
}

static inline void serial_puts(const char *s) {
    while (*s) serial_putc(*s++);
}

static inline void serial_put_hex(u64 value) {
    static const char digits[] = "0123456789abcdef";
    serial_puts("0x");
    for (int shift = 60; shift >= 0; shift -= 4) serial_putc(digits[(value >> shift) & 0xf]);
}

void guest_reset(void) __attribute__((noreturn));

#endif
