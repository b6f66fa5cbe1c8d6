/* guest.S -- the boot-sector guest of `postcopy-harness qemu` (GNU as, AT&T syntax).
 *
 * Build (what postcopy_core.guest.build does):
 *   as --32 -o guest.o guest.S
 *   ld -m elf_i386 -Ttext=0x7c00 --oformat=binary -e _start -o guest.bin guest.o
 *
 * What it does
 *   The BIOS loads this sector at 0x7c00.  Each CPU enters flat 32-bit protected mode (no paging,
 *   interrupts off: no async page faults, so a missing page stalls the vCPU thread itself) and takes
 *   a slot with an atomic fetch-and-add (the BSP gets 0).  If WAKE is set the BSP starts the APs
 *   with INIT-SIPI-SIPI; their SIPI vector 0x08 lands on a far jump the BSP writes at 0x8000.
 *
 *   Every CPU then walks its region of guest RAM forever, one dword per 4 KiB page: the dword at
 *   page + 4*slot is this CPU's counter for that page.  Before bumping it, the CPU checks that it
 *   equals the number of passes done, so a write lost by the migration is counted in MISMATCH.
 *   After each access it reads the TSC; a gap since the previous read above THRESH cycles is a
 *   stall, logged as (start tsc, length, guest-physical page, pass) in the CPU's log, a ring
 *   whose write count NLOG never wraps (the host reads it before and after the migration).
 *
 * Parameters live in the block at `params` (found by its magic "PCHG"); the host patches them into
 * the image, so one binary serves every configuration.  The layout is postcopy_core/guest/layout.py.
 */
        .set SLOTS,      0x9000          /* u32: next free slot (lock xadd) */
        .set BLOCKS,     0x9100          /* per-slot 64-byte blocks */
        .set STUB,       0x8000          /* SIPI vector 0x08 -> 0800:0000 */
        .set LAPIC,      0xfee00080
        .set LAPIC_ID,   0xfee00020
        .set LAPIC_SVR,  0xfee000f0
        .set LAPIC_ICR,  0xfee00300
        .set ICR_INIT,   0x000c4500      /* all excluding self, INIT, assert */
        .set ICR_SIPI,   0x000c4608      /* all excluding self, start-up, vector 0x08 */
        /* per-slot block fields */
        .set B_APIC, 0
        .set B_PASS, 4
        .set B_NLOG, 8
        .set B_BAD, 12
        .set B_LAST, 16                  /* u64 tsc of the last access */
        .set B_BADPAGE, 24               /* index of the last mismatching page (valid if B_BAD) */
        .set B_LEFT, 32                  /* steps left in this pass */
        .set B_LOGPTR, 36

        .code16
        .text
        .globl _start
_start:
        cli
        cld
        xorw %ax, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movw $0x7000, %sp
        ljmp $0, $bsp16                  /* some BIOSes enter at 07c0:0000 */
bsp16:
        inb $0x92, %al                   /* fast A20 gate */
        orb $2, %al
        andb $0xfe, %al
        outb %al, $0x92
        xorl %eax, %eax
        movl %eax, SLOTS
        movb $0xea, STUB                 /* the APs' entry: ljmp $0, $ap16 */
        movw $ap16, STUB + 1
        movw $0, STUB + 3
ap16:
        cli
        xorw %ax, %ax
        movw %ax, %ds
        lgdtl gdt_desc
        movl %cr0, %eax
        orb $1, %al
        movl %eax, %cr0
        ljmpl $0x08, $pm32

        .code32
pm32:
        movw $0x10, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movw %ax, %fs
        movw %ax, %gs
        movl $1, %eax
        lock xaddl %eax, SLOTS
        movl %eax, %edi                  /* edi = slot */
        movl %edi, %esp                  /* a 256-byte stack per slot below 0x7000 */
        shll $8, %esp
        negl %esp
        addl $0x7000, %esp
        movl %edi, %ebp                  /* ebp = this slot's block */
        shll $6, %ebp
        addl $BLOCKS, %ebp
        movl $LAPIC, %edx                /* short displacements from here */
        movl LAPIC_ID-LAPIC(%edx), %eax
        shrl $24, %eax
        movl %eax, B_APIC(%ebp)
        testl %edi, %edi
        jnz work
        cmpl $0, p_wake
        je work
        movl $0x1ff, LAPIC_SVR-LAPIC(%edx)   /* software-enable the local APIC */
        movl $ICR_INIT, LAPIC_ICR-LAPIC(%edx)
        call delay
        movl $ICR_SIPI, LAPIC_ICR-LAPIC(%edx)
        call delay
        movl $ICR_SIPI, LAPIC_ICR-LAPIC(%edx)
work:
        movl %edi, %eax                  /* ebx = region start: base + slot * stride */
        imull p_stride, %eax             /* (stride 0: every slot walks region 0, shared pages) */
        addl p_base, %eax
        movl %eax, %ebx
        movl %edi, %eax
        imull p_logbytes, %eax
        addl p_logbase, %eax
        movl %eax, B_LOGPTR(%ebp)
        xorl %esi, %esi                  /* esi = page index in the region (or LCG state) */
        rdtsc
        movl %eax, B_LAST(%ebp)
        movl %edx, B_LAST+4(%ebp)
pass:
        movl p_pages, %eax
        movl %eax, B_LEFT(%ebp)
page:
        movl %esi, %eax                  /* eax = &counter: region + 4096*index + 4*slot */
        shll $12, %eax
        addl %ebx, %eax
        leal (%eax,%edi,4), %eax
        movl (%eax), %edx
        cmpl B_PASS(%ebp), %edx
        je 2f
        incl B_BAD(%ebp)                 /* lost or foreign write: count it once, then resync */
        movl %esi, B_BADPAGE(%ebp)
2:      movl B_PASS(%ebp), %edx
        incl %edx
        movl %edx, (%eax)
        rdtsc
        pushl %edx                       /* now (hi, lo) */
        pushl %eax
        subl B_LAST(%ebp), %eax
        sbbl B_LAST+4(%ebp), %edx
        jnz 3f
        cmpl p_thresh, %eax
        jbe 4f
3:      movl B_NLOG(%ebp), %ecx          /* a stall: log (start, length, page, pass) */
        incl B_NLOG(%ebp)
        andl p_logmask, %ecx             /* a ring: the host reads where NLOG stood and stands */
        imull $24, %ecx
        addl B_LOGPTR(%ebp), %ecx
        movl %eax, 8(%ecx)
        movl %edx, 12(%ecx)
        movl B_LAST(%ebp), %eax
        movl %eax, 0(%ecx)
        movl B_LAST+4(%ebp), %eax
        movl %eax, 4(%ecx)
        movl %ebx, %eax
        shrl $12, %eax
        addl %esi, %eax
        movl %eax, 16(%ecx)
        movl B_PASS(%ebp), %eax
        movl %eax, 20(%ecx)
4:      popl %eax
        popl %edx
        movl %eax, B_LAST(%ebp)
        movl %edx, B_LAST+4(%ebp)
        imull p_mul, %esi                /* next = (mul * index + add) mod pages: 1, 1 walks in order; */
        addl p_add, %esi                 /* mul = 1 mod 4 with add odd visits every page once a pass */
        andl p_mask, %esi
        decl B_LEFT(%ebp)
        jnz page
        incl B_PASS(%ebp)
        jmp pass

delay:                                   /* some milliseconds of spinning */
        movl $100000, %ecx
7:      decl %ecx
        jnz 7b
        ret

        .balign 8
gdt:
        .quad 0
        .quad 0x00cf9a000000ffff         /* 0x08: flat 4 GiB code, 32-bit */
        .quad 0x00cf92000000ffff         /* 0x10: flat 4 GiB data */
gdt_desc:
        .word gdt_desc - gdt - 1
        .long gdt

        .balign 4
params:                                  /* patched by the host; defaults: 1 CPU, 16..32 MiB */
        .ascii "PCHG"
        .long 1                          /* version */
p_wake:     .long 0                      /* 1: start the APs */
p_base:     .long 0x01000000             /* first region, bytes */
p_stride:   .long 0x01000000             /* bytes between slots' regions (0: all share region 0) */
p_mul:      .long 1                      /* page-order LCG multiplier */
p_add:      .long 1                      /* page-order LCG increment */
p_mask:     .long 0x00000fff             /* pages per region - 1 (a power of two) */
p_pages:    .long 0x00001000             /* pages per region */
p_thresh:   .long 50000                  /* stall threshold, TSC cycles */
p_logbase:  .long 0x00100000             /* slot 0's log */
p_logbytes: .long 0x00100000             /* bytes per slot's log */
p_logmask:  .long 32767                  /* entries per log - 1 (a power of two) */

        .org 510
        .word 0xaa55
