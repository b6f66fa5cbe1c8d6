"""The boot-sector guest of ``postcopy-harness qemu``: build it, configure it, read what it measured.

``guest.S`` (GNU as) is the source and ``guest.bin`` the sector built from it, shipped so that a host
without binutils runs it too; ``build()`` reassembles it and a test checks that both agree.  One
binary serves every configuration: ``image()`` patches the parameter block (found by its magic) and
pads the sector to a disk image.

Guest-physical layout (all below 16 MiB, away from the BIOS's areas):

* ``SLOTS`` (0x9000): the slot counter; ``BLOCKS`` (0x9100): one 64-byte block per vCPU slot
  (APIC id, passes, log entries written, mismatching pages, last TSC, last bad page);
* ``LOG_BASE`` (1 MiB): one ``LOG_BYTES`` log per slot, ``ENTRY`` = (start tsc u64, length u64,
  guest page u32, pass u32);
* ``REGION_BASE`` (16 MiB) and up, ending ``TOP_RESERVE`` below the top of RAM: the pages the vCPUs walk.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "guest.S"
BINARY = HERE / "guest.bin"

SECTOR = 512
MAGIC = b"PCHG"
VERSION = 1
SLOTS = 0x9000
BLOCKS = 0x9100
BLOCK_BYTES = 64
BLOCK = struct.Struct("<IIII Q I")  # apic, passes, nlog, mismatches, last tsc, last bad page
ENTRY = struct.Struct("<QQII")  # start tsc, length (cycles), guest page number, pass
LOG_BASE = 1 << 20
LOG_BYTES = 1 << 20
LOG_CAP = 1 << 15  # entries per ring (768 KiB of the 1 MiB log)
REGION_BASE = 16 << 20
TOP_RESERVE = 20 << 20  # SeaBIOS keeps data up to 16 MiB below the top of RAM (found by the planted-write test)
MAX_SLOTS = (REGION_BASE - LOG_BASE) // LOG_BYTES
PAGE = 4096
DISK_BYTES = 1 << 20  # the sector padded to a small IDE disk

WORKLOADS = ("sequential", "random", "shared", "idle-ap")
# params after the magic: version, wake, base, stride, mul, add, mask, pages, thresh, logbase, logbytes, logmask
PARAMS = struct.Struct("<4s12I")
LCG = (1664525, 1013904223)  # mul = 1 (mod 4), add odd: full period modulo any power of two


class GuestError(RuntimeError):
    """The guest cannot be built or configured as asked (one line)."""


@dataclass(frozen=True)
class GuestConfig:
    """What the guest does: ``vcpus`` walking their regions in ``workload`` order; gaps longer than
    ``threshold_cycles`` TSC cycles are logged."""

    vcpus: int
    mem_bytes: int
    workload: str = "sequential"
    threshold_cycles: int = 30_000

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise GuestError(f"unknown workload {self.workload!r} (choose from {', '.join(WORKLOADS)})")
        if not 1 <= self.vcpus <= MAX_SLOTS:
            raise GuestError(f"the guest runs 1..{MAX_SLOTS} vCPUs, not {self.vcpus}")
        if not 0 < self.threshold_cycles < 1 << 32:
            raise GuestError(f"stall threshold {self.threshold_cycles} cycles is out of range")
        if self.region_pages < 16:
            raise GuestError(f"{self.mem_bytes >> 20} MiB is too little RAM for {self.vcpus} vCPUs' regions "
                             f"(the guest's regions start at {REGION_BASE >> 20} MiB)")

    @property
    def walkers(self) -> int:
        """vCPUs that walk memory (an idle-AP guest leaves the APs halted in the BIOS)."""
        return 1 if self.workload == "idle-ap" else self.vcpus

    @property
    def regions(self) -> int:
        return 1 if self.workload == "shared" else self.walkers

    @property
    def region_pages(self) -> int:
        """Pages per region: the largest power of two that fits every region below the top reserve."""
        room = (self.mem_bytes - REGION_BASE - TOP_RESERVE) // self.regions // PAGE
        return 1 << (room.bit_length() - 1) if room > 0 else 0

    @property
    def region_bytes(self) -> int:
        return self.region_pages * PAGE

    def region_of(self, slot: int) -> tuple[int, int]:
        """[first, last) guest page numbers that ``slot`` walks."""
        first = REGION_BASE // PAGE + (0 if self.workload == "shared" else slot * self.region_pages)
        return first, first + self.region_pages


def _params_offset(sector: bytes) -> int:
    at = sector.find(MAGIC)
    if at < 0 or len(sector) != SECTOR or sector[-2:] != b"\x55\xaa":
        raise GuestError("guest.bin is not the guest's boot sector (no parameter block)")
    return at


def image(cfg: GuestConfig, sector: bytes | None = None) -> bytes:
    """A raw disk image that boots the guest configured as ``cfg``."""
    sector = BINARY.read_bytes() if sector is None else sector
    at = _params_offset(sector)
    mul, add = LCG if cfg.workload == "random" else (1, 1)
    stride = 0 if cfg.workload == "shared" else cfg.region_bytes
    block = PARAMS.pack(MAGIC, VERSION, int(cfg.walkers > 1), REGION_BASE, stride, mul, add,
                        cfg.region_pages - 1, cfg.region_pages, cfg.threshold_cycles, LOG_BASE, LOG_BYTES,
                        LOG_CAP - 1)
    patched = sector[:at] + block + sector[at + len(block):]
    return patched + b"\0" * (DISK_BYTES - SECTOR)


def missing_tools() -> list[str]:
    """The binutils ``build()`` needs that this host lacks."""
    return [t for t in ("as", "ld") if shutil.which(t) is None]


def build(out: Path | None = None) -> bytes:
    """Assemble ``guest.S`` with GNU as and ld; returns the sector (and writes it to ``out``)."""
    missing = missing_tools()
    if missing:
        raise GuestError(f"cannot build the guest: {' and '.join(missing)} not found (apt-get install binutils)")
    with tempfile.TemporaryDirectory(prefix="pch-guest-") as tmp:
        obj, binary = Path(tmp) / "guest.o", Path(tmp) / "guest.bin"
        for cmd in (["as", "--32", "-o", str(obj), str(SOURCE)],
                    ["ld", "-m", "elf_i386", "-Ttext=0x7c00", "--oformat=binary", "-e", "_start",
                     "-o", str(binary), str(obj)]):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            if done.returncode:
                first = (done.stderr.strip().splitlines() or ["failed"])[-1]
                raise GuestError(f"cannot build the guest: {cmd[0]}: {first}")
        data = binary.read_bytes()
    _params_offset(data)
    if out is not None:
        Path(out).write_bytes(data)
    return data


@dataclass
class Block:
    """One vCPU slot's block, as read from guest memory."""

    slot: int
    apic: int
    passes: int
    nlog: int
    mismatches: int
    last_tsc: int
    bad_page: int


BLOCKS_DUMP = (SLOTS, BLOCKS - SLOTS + MAX_SLOTS * BLOCK_BYTES)  # (address, length) to read out


def parse_blocks(dump: bytes, vcpus: int) -> tuple[int, list[Block]]:
    """(slots taken, the first ``vcpus`` blocks) from a dump of ``BLOCKS_DUMP``."""
    started = struct.unpack_from("<I", dump, 0)[0]
    out = []
    for s in range(vcpus):
        at = BLOCKS - SLOTS + s * BLOCK_BYTES
        apic, passes, nlog, bad, last, badpage = BLOCK.unpack_from(dump, at)
        out.append(Block(s, apic, passes, nlog, bad, last, badpage))
    return started, out


def parse_log(dump: bytes, first: int, end: int) -> list[tuple[int, int, int, int]]:
    """Entries ``first``..``end`` (write counts; start tsc, cycles, guest page, pass) of one slot's ring
    dump; raises if the ring has overwritten some of them."""
    if end - first > LOG_CAP:
        raise GuestError(f"the guest logged {end - first} stalls, more than its ring holds ({LOG_CAP}): "
                         "raise --stall-threshold")
    return [ENTRY.unpack_from(dump, (i % LOG_CAP) * ENTRY.size) for i in range(first, end)]
