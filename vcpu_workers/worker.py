"""One vCPU worker process: map guest RAM, register a uffd, hand it over, run the workload.

Runs in a child forked by the zygote (vcpu_workers/zygote.py).  The uffd is created *after* fork,
in the worker: a uffd belongs to the address space that created it, and the handler's ioctls
through it must act on this process's mapping.  Imports stay lean (no numpy): a thousand of these
must start in seconds and each should cost little memory.

The same body serves the non-vCPU processes of ``run --non-vcpu N`` (slots after the vCPUs): they
fault and hand over their uffd like a vCPU, but the handler does not map their pid to a vCPU, so
their faults are non-vCPU faults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from postcopy_core import kernel
from postcopy_core._uffd import ffi, lib
from postcopy_core.board import worker_slot
from postcopy_core.content import ContentSpec, Image
from postcopy_core.handoff import WorkerHello, send_uffd
from vcpu_workers import results as R
from vcpu_workers.workloads import order_buffer, writes_buffer

# On hugetlbfs an unmapped page may already be in the page cache (a minor fault, a few µs);
# a userfault round trip through the handler takes tens of µs.  See pch.c, resident().
HUGETLB_MIN_FAULT_NS = 10_000


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker needs, fixed before the fork."""

    nvcpus: int
    memfd: int
    hugetlb: bool
    spec: ContentSpec
    workload: str
    write_ratio: float
    handoff_address: str
    start_fd: int  # EOF on this pipe = go
    results_fd: int
    capacity: int  # room for faulting accesses per vCPU in the results area
    board_fd: int  # the access board (postcopy_core/board.py)
    cpus: tuple[int, ...] = ()  # CPUs the worker may run on (empty: any)
    ndevices: int = 0  # non-vCPU faulting processes, in the slots after the vCPUs
    place: str = "copy"  # run --place: "continue" registers MINOR too (the handler writes the page cache)


# A non-vCPU process walks one vCPU's slice in its own random order (a seed of its own), so it
# meets that vCPU on some pages (both wait for one page) and is first on others.
DEVICE_SEED = 0xD3A


def device_order(device: int, plan: WorkerPlan):
    """Access order of non-vCPU process ``device``: a random walk over a vCPU's slice of RAM."""
    spec = plan.spec
    owner = device * plan.nvcpus // max(plan.ndevices, 1)
    return order_buffer("random", owner, plan.nvcpus, spec.npages, spec.seed ^ (DEVICE_SEED + device))


def worker_main(vcpu: int, plan: WorkerPlan, t_forked: int) -> int:
    """Body of worker ``vcpu`` (``>= plan.nvcpus``: a non-vCPU process); returns the exit code."""
    slot = R.WorkerSlot(plan.results_fd, plan.nvcpus + plan.ndevices, plan.capacity, vcpu)
    rec = slot.result
    rec.vcpu, rec.pid, rec.t_forked = vcpu, os.getpid(), t_forked
    spec = plan.spec
    ram = kernel.mmap_fd(plan.memfd, spec.size)
    features = kernel.FEATURE_THREAD_ID | (
        kernel.FEATURE_MISSING_HUGETLBFS if plan.hugetlb else kernel.FEATURE_MISSING_SHMEM
    )
    minor = plan.place == "continue"
    mode = kernel.REGISTER_MISSING
    if minor:  # a page in the page cache but not mapped here traps too: it may be half written
        features |= kernel.FEATURE_MINOR_HUGETLBFS if plan.hugetlb else kernel.FEATURE_MINOR_SHMEM
        mode |= kernel.REGISTER_MINOR
    uffd = kernel.Uffd.open(features)
    ioctls = uffd.register(ram.addr, spec.size, mode)
    need, name = (kernel.IOCTL_CONTINUE, "UFFDIO_CONTINUE") if minor else (kernel.IOCTL_COPY, "UFFDIO_COPY")
    if not ioctls & need:
        raise kernel.KernelError("UFFDIO_REGISTER", 95, f"the range does not support {name}")
    send_uffd(plan.handoff_address, WorkerHello(vcpu, os.getpid(), ram.addr, spec.size), uffd.fd)
    uffd.close()  # the handler now holds the only reference

    if vcpu < plan.nvcpus:
        order, count = order_buffer(plan.workload, vcpu, plan.nvcpus, spec.npages, spec.seed)
    else:
        order, count = device_order(vcpu - plan.nvcpus, plan)
    writes = writes_buffer(count, plan.write_ratio, vcpu, spec.seed)
    ref = Image(spec) if spec.image else None
    verified = ffi.new("uint8_t[]", spec.npages)
    # only vCPUs publish what they touch: a device's faults are woken when the handler reads them
    board, _board_map = worker_slot(plan.board_fd, plan.nvcpus, vcpu) if vcpu < plan.nvcpus else (ffi.NULL, None)
    rec.accesses = count
    rec.t_ready = kernel.now_ns()
    rec.state = R.STATE_READY

    while os.read(plan.start_fd, 1):  # wait for EOF: every worker starts at once
        pass
    t = ffi.new("struct pch_touch *")
    t.base, t.page_size, t.npages = ram.addr, spec.page_size, spec.npages
    t.order, t.count = order, count
    t.is_write = writes if writes is not None else ffi.NULL
    t.seed, t.zero_permille = spec.seed, spec.zero_permille
    t.ref = ref.pointer() if ref is not None else ffi.NULL
    t.verified = verified
    t.min_fault_ns = HUGETLB_MIN_FAULT_NS if plan.hugetlb and not minor else 0
    t.first_touch = int(minor)
    t.yield_check = 1  # this process: nice 19 for the after-loop check (see pch.h)
    t.lat_ns, t.lat_page, t.lat_start = slot.lat_ns, slot.lat_page, slot.lat_start
    t.board = board
    rc = lib.pch_touch_run(t)
    if rc < 0:
        raise kernel.KernelError("touch loop", -rc)
    for name in ("stall_ns", "max_ns", "all_ns", "pages_checked", "words_checked", "mismatches",
                 "first_bad_page", "t_start", "t_end"):
        setattr(rec, name, getattr(t, name))
    rec.faulting = t.n_faulting
    rec.state = R.STATE_DONE if t.mismatches == 0 else R.STATE_FAILED
    return 0 if t.mismatches == 0 else 4
