"""What guest RAM should hold: deterministic per-page content from a seed, or a raw image file.

The source fills its copy of RAM from a :class:`ContentSpec`; every vCPU worker checks every page it
reads against the same spec, so a lost, torn or misplaced page is always caught.  The generator
runs in C (csrc/pch.c) so that checking costs far less than faulting.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from postcopy_core import kernel
from postcopy_core._uffd import ffi, lib


@dataclass(frozen=True)
class ContentSpec:
    """How to compute (or where to find) the expected content of every page."""

    page_size: int
    npages: int
    seed: int = 1
    zero_permille: int = 100  # share of all-zero pages, in 1/1000
    image: str | None = None  # raw image file; when set, seed/zero_permille are unused

    @property
    def size(self) -> int:
        return self.page_size * self.npages

    def is_zero(self, page: int) -> bool:
        """Whether ``page`` is all zeros in the generated content (image files: unknown, False)."""
        return self.image is None and bool(lib.pch_page_is_zero(self.seed, page, self.zero_permille))


class Image:
    """The full expected RAM content in this process's memory (the source's copy, or a reference).

    Generated images are built in anonymous memory; image files are mapped read-only.
    """

    def __init__(self, spec: ContentSpec) -> None:
        self.spec = spec
        if spec.image:
            fd = os.open(spec.image, os.O_RDONLY | os.O_CLOEXEC)
            try:
                self.mapping = kernel.mmap_fd(fd, spec.size, writable=False, private=True)
            finally:
                os.close(fd)
        else:
            self.mapping = kernel.mmap_anon(spec.size)
            # for a huge-page guest, transparent huge pages behind the image where THP allows (QEMU
            # madvises guest RAM so): the source splices a 2 MiB page as one page, not 512 to pin
            # (+10 % faults/s at 8 vCPUs); with 4 KiB guest pages it cost 10 % and added 50 ms stalls
            if spec.page_size > kernel.PAGE_SIZE:
                kernel.prefer_huge_pages(self.mapping)
            lib.pch_fill_pages(self.mapping.pointer(), spec.seed, 0, spec.npages, spec.page_size, spec.zero_permille)

    def pointer(self, page: int = 0):
        return self.mapping.pointer(page * self.spec.page_size)

    def page(self, page: int) -> memoryview:
        ps = self.spec.page_size
        return memoryview(self.mapping.buffer(page * ps, ps))

    def close(self) -> None:
        self.mapping.close()


def check_page(addr: int, spec: ContentSpec, page: int, ref: Image | None = None, gen: int = 0) -> int:
    """Number of 64-bit words of the page at ``addr`` that differ from the expected content (that of
    generation ``gen``: the page rewritten that many times during precopy, see postcopy_core/precopy.py)."""
    ref_ptr = ref.pointer() if ref is not None else ffi.NULL
    if gen:
        return lib.pch_check_page_gen(ffi.cast("uint8_t *", addr), spec.seed, page, gen, spec.page_size,
                                      spec.zero_permille, ref_ptr)
    return lib.pch_check_page(ffi.cast("uint8_t *", addr), spec.seed, page, spec.page_size,
                              spec.zero_permille, ref_ptr)


def image_size_check(path: str, page_size: int) -> int:
    """Size of a raw image file in pages; raise ValueError with one clear line when unusable."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError(f"cannot read image {path!r}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):  # a folder's size is that of its directory entries, not an image
        what = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ValueError(f"image {path!r} is {what}: give a raw RAM image file")
    size = st.st_size
    if size == 0 or size % page_size:
        raise ValueError(f"image {path!r} is {size} bytes, not a non-zero multiple of the page size {page_size}")
    return size // page_size
