/* Raw position-independent x86-64 code, no ELF around it: write(1, MARKER) + exit_group(0).
 * objcopy -O binary keeps only .text. Built twice, with the marker of the loader
 * ("EG-PWNED blob") and of the ptrace injector ("EG-PWNED ptrace"). */
    .text
    .globl _start
_start:
    mov $1, %eax             /* write */
    mov $1, %edi
    lea marker(%rip), %rsi
    mov $(marker_end - marker), %edx
    syscall
    mov $231, %eax           /* exit_group */
    xor %edi, %edi
    syscall
    hlt
marker:
    .ascii MARKER
    .byte 10
marker_end:
