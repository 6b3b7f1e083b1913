/* Entered in 64-bit mode by the VMM's Linux boot path: paging on, RSP set, RSI = zero page. */
    .section .text.entry
    .code64
    .globl _start
_start:
    cli
    mov %rsi, %rdi
    call guest_main
    .globl guest_reset
guest_reset:
    /* i8042 "pulse reset line": the VMM ends with ExitReason::Reset. */
    mov $0xfe, %al
    out %al, $0x64
1:  hlt
    jmp 1b
