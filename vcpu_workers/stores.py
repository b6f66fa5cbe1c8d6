"""The guest's stores and the checks that every one of them survived (csrc/verify.h says how).

A store that writes what the page already holds proves nothing, so each store here carries
information: on pages with one writer (the ``sequential``, ``random`` and ``stride`` workloads) a
value that only that store could have written, on pages several vCPUs write (``hotset``,
``shared``) an atomic increment of the page's counter.  The **ledger**, one uint64 per page in a
memfd shared by the workers and the orchestrator, records the last value stored or the increments
made.  Three checks use it:

- each vCPU, live: every later read of a page it stored to sees its own latest store
  (read-your-writes), and a counter it incremented never reads below its own increments;
- each worker after the timed loop: every page it touched, whole;
- the orchestrator at the end (:func:`check_ram`): all of guest RAM equals the source image with
  every page's last store applied, and each counter equals the increments made (the kernel's
  ``uffd-stress`` bounce check).

A wrong page is classified (:data:`KINDS`): ``reverted`` (the source's bytes are back where a store
was), ``zeroed``, ``stale`` (an older write: an earlier store, fewer increments, an older precopy
generation), ``torn`` (part right, part not) or ``foreign`` (bytes nobody wrote there).  Non-vCPU
processes (``run --non-vcpu``) only read, as a device model's DMA reading guest memory would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from postcopy_core import kernel
from postcopy_core._uffd import ffi, lib
from postcopy_core.content import ContentSpec, Image
from vcpu_workers.workloads import COUNTER_WORKLOADS, write_mode  # noqa: F401  (re-exported)

KINDS = ("reverted", "zeroed", "stale", "torn", "foreign")  # index = PCH_BAD_*
class StoreLedger:
    """One uint64 per page in a memfd (no name anywhere): the orchestrator creates it, the workers map it."""

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.fd = kernel.memfd_create("pch-store-ledger")
        os.ftruncate(self.fd, max(4096, -(-npages * 8 // 4096) * 4096))
        self.mapping = kernel.mmap_fd(self.fd, max(4096, -(-npages * 8 // 4096) * 4096))
        self.pointer = ffi.cast("uint64_t *", self.mapping.addr)

    def close(self) -> None:
        self.mapping.close()
        os.close(self.fd)


@dataclass
class Finding:
    """The first wrong page or word a check found: what the error line names."""

    page: int
    kind: str
    vcpu: int | None  # the vCPU whose store was expected there; None: the source's content was
    seq: int  # that store's number (one-writer pages), or the increments expected (counter pages)
    word: int
    expected: int
    found: int

    @classmethod
    def from_c(cls, f) -> Finding | None:
        """From a ``struct pch_finding`` (cffi) or a numpy record of one; None when it found nothing."""
        get = (lambda k: int(f[k])) if isinstance(f, np.void) else (lambda k: int(getattr(f, k)))
        if get("page") < 0:
            return None
        vcpu = get("vcpu")
        return cls(get("page"), KINDS[get("kind")], vcpu if vcpu >= 0 else None, get("seq"), get("word"),
                   get("expected"), get("found"))

    def words(self) -> str:
        """One line, e.g. "page 17 word 3: expected vCPU 2's store 41 (0x...), found 0x... (reverted)"."""
        if self.vcpu is not None:
            what = f"vCPU {self.vcpu}'s store {self.seq}"
        elif self.word == lib.PCH_COUNTER_WORD and self.seq:
            what = f"a count of {self.seq} increments"
        else:
            what = "the source's content"
        return (f"page {self.page} word {self.word}: expected {what} ({self.expected:#018x}), "
                f"found {self.found:#018x} ({self.kind})")

    def as_dict(self) -> dict:
        return {"page": self.page, "kind": self.kind, "vcpu": self.vcpu, "seq": self.seq, "word": self.word,
                "expected": f"{self.expected:#018x}", "found": f"{self.found:#018x}"}


@dataclass
class RamVerdict:
    """What :func:`check_ram` found."""

    pages_checked: int
    bad_pages: int
    writes_checked: int
    lost_writes: int
    by_kind: dict[str, int]
    first: Finding | None


def content_struct(spec: ContentSpec, ref: Image | None, gens) -> tuple:
    """A ``struct pch_content *`` for ``spec`` (and what it points to: keep the tuple alive)."""
    c = ffi.new("struct pch_content *")
    c.seed, c.page_size, c.zero_permille = spec.seed & (2**64 - 1), spec.page_size, spec.zero_permille
    c.ref = ref.pointer() if ref is not None else ffi.NULL
    c.gens = gens.pointer if gens is not None else ffi.NULL
    return c, ref, gens


def check_ram(addr: int, spec: ContentSpec, mode: int, ledger: StoreLedger | None, gens=None,
              received: memoryview | None = None, pending: list[int] = ()) -> RamVerdict:
    """Check guest RAM mapped at ``addr`` against the source image with every page's last store applied.

    ``gens``: run --precopy's generation map; ``received``: check only the pages placed (a run cut
    short); ``pending``: pages + 1 of stores that lost workers left under way (allowed either way)."""
    ref = Image(spec) if spec.image else None
    try:
        c, *_ = content_struct(spec, ref, gens)
        r = ffi.new("struct pch_ram_check *")
        r.ram = ffi.cast("uint8_t *", addr)
        r.npages, r.mode = spec.npages, mode
        r.ledger = ledger.pointer if ledger is not None and mode != lib.PCH_WRITES_NONE else ffi.NULL
        if r.ledger == ffi.NULL:
            r.mode = mode = lib.PCH_WRITES_NONE
        keep = ffi.from_buffer("uint8_t[]", received) if received is not None else ffi.NULL
        r.received = keep
        cut = ffi.new("uint64_t[]", sorted(pending) or [0])
        r.pending, r.npending = cut, len(pending)
        lib.pch_check_ram(c, r)
        return RamVerdict(int(r.pages_checked), int(r.bad_pages), int(r.writes_checked), int(r.lost_writes),
                          {k: int(r.by_kind[i]) for i, k in enumerate(KINDS)}, Finding.from_c(r.first))
    finally:
        if ref is not None:
            ref.close()
