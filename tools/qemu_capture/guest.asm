; guest.asm -- tiny memory-touching boot sector for postcopy blocktime captures.
;
; Build:  nasm -f bin -DWAKE_APS=0|1 -DBASE_MB=64 -DPERCPU_MB=128 -DSTEP_PAGES=1 -DSHARED=0 \
;              -o guest.bin guest.asm
;
; Boot flow
;   * The BIOS loads this sector at 0x7C00 and jumps to it (CS:IP may be
;     0000:7C00 or 07C0:0000).  The BSP copies the sector to 0x8000, so the
;     same code is also reachable as a SIPI target (vector 0x08 -> 0800:0000).
;   * Each CPU enters flat 32-bit protected mode (no paging, interrupts off)
;     and takes an index with an atomic fetch-and-add (BSP gets 0).
;   * With WAKE_APS=1 the BSP broadcasts INIT-SIPI-SIPI through the local APIC
;     so every AP starts here too.  With WAKE_APS=0 the APs stay parked in
;     the BIOS's halt loop and never touch guest RAM.
;   * CPU i loops forever over [BASE_MB + i*PERCPU_MB, +PERCPU_MB) MiB,
;     doing a read-modify-write of one dword per 4096-byte page.  The pages
;     are visited with a stride of STEP_PAGES pages modulo the region size
;     (1 = plain sequential; a large odd step scatters the accesses).  It
;     bumps a heartbeat dword at HEARTBEAT + 4*i after every full pass.
;     A second dword at HEARTBEAT + 0x100 + 4*i records the CPU's APIC ID.
;   * With SHARED=1 every CPU loops over region 0, so vCPUs fault on the same
;     pages (several waiters per placed page).

%ifndef WAKE_APS
%define WAKE_APS 0
%endif
%ifndef BASE_MB
%define BASE_MB 64
%endif
%ifndef PERCPU_MB
%define PERCPU_MB 128               ; must be a power of two
%endif
%ifndef STEP_PAGES
%define STEP_PAGES 1                ; odd; 1 = sequential 4096-byte stride
%endif
%ifndef SHARED
%define SHARED 0                    ; 1 = every CPU loops over region 0 (shared pages)
%endif
%if (PERCPU_MB & (PERCPU_MB - 1)) || !(STEP_PAGES & 1)
%error "PERCPU_MB must be a power of two and STEP_PAGES odd"
%endif

HEARTBEAT   equ 0x9000              ; per-CPU pass counters (outside the sector)
RELOC       equ 0x8000              ; where the sector runs from; SIPI vector 0x08
SIPI_VECTOR equ RELOC >> 12
LAPIC       equ 0xFEE00000
LAPIC_ID    equ LAPIC + 0x20
LAPIC_SVR   equ LAPIC + 0xF0
LAPIC_ICRLO equ LAPIC + 0x300
; ICR: destination shorthand "all excluding self" (bits 19:18 = 11b), level assert.
ICR_INIT    equ 0x000C4500
ICR_SIPI    equ 0x000C4600 | SIPI_VECTOR

        bits 16
        org RELOC

start:
        ; Position independent until the far jumps below.
        cli
        cld
        xor ax, ax
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov bx, cs
        cmp bx, RELOC >> 4          ; APs arrive with CS = 0x0800
        je .ap
        mov sp, 0x7C00
        mov si, 0x7C00              ; relocate the sector to RELOC
        mov di, RELOC
        mov cx, 256
        rep movsw
        jmp 0:bsp_main
.ap:
        jmp 0:enter_pm

bsp_main:
        in al, 0x92                 ; fast A20 on
        or al, 2
        and al, 0xFE
        out 0x92, al
        mov dword [cpu_counter], 0

enter_pm:
        lgdt [gdt_desc]
        mov eax, cr0
        or al, 1
        mov cr0, eax
        jmp dword 0x08:pm32

        bits 32
pm32:
        mov ax, 0x10
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov fs, ax
        mov gs, ax
        mov eax, 1
        lock xadd [cpu_counter], eax    ; eax = this CPU's index
        mov edi, eax
        mov esp, edi                    ; small private stack below 0x7C00
        shl esp, 8
        neg esp
        add esp, 0x7C00
        mov ebx, [LAPIC_ID]
        shr ebx, 24
        mov [HEARTBEAT + 0x100 + edi*4], ebx
        mov dword [HEARTBEAT + edi*4], 0
        test edi, edi
        jnz touch

%if WAKE_APS
        ; BSP: software-enable the local APIC and start all other CPUs.
        mov dword [LAPIC_SVR], 0x1FF
        mov dword [LAPIC_ICRLO], ICR_INIT
        call delay
        mov dword [LAPIC_ICRLO], ICR_SIPI
        call delay
        mov dword [LAPIC_ICRLO], ICR_SIPI
%endif

touch:
        ; ebx = region start for CPU index edi; esi = byte offset in the region.
        ; Each pass visits every page once, in the order k*STEP_PAGES mod N
        ; (N = pages in the region, a power of two, STEP_PAGES odd).
%if SHARED
        mov ebx, BASE_MB << 20
%else
        imul ebx, edi, PERCPU_MB << 20
        add ebx, BASE_MB << 20
%endif
        xor ecx, ecx
        xor esi, esi
.pass:
        inc ecx
.page:
        mov eax, [ebx + esi]
        add eax, ecx
        mov [ebx + esi], eax
        add esi, STEP_PAGES * 4096
        and esi, (PERCPU_MB << 20) - 1
        jnz .page
        mov [HEARTBEAT + edi*4], ecx
        jmp .pass

%if WAKE_APS
delay:                              ; a few milliseconds of spinning
        mov ecx, 2000000
.spin:
        dec ecx
        jnz .spin
        ret
%endif

        align 4
cpu_counter:
        dd 0

        align 8
gdt:
        dq 0                        ; null
        dq 0x00CF9A000000FFFF       ; 0x08: flat 4 GiB code, 32-bit
        dq 0x00CF92000000FFFF       ; 0x10: flat 4 GiB data
gdt_end:
gdt_desc:
        dw gdt_end - gdt - 1
        dd gdt

        times 510 - ($ - $$) db 0
        dw 0xAA55
