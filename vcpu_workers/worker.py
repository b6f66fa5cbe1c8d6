"""One vCPU worker process: map guest RAM, register a uffd, hand it over, run the workload.

What a worker does, step by step (the code is C, csrc/worker.c, forked by the zygote,
vcpu_workers/zygote.py, and never returning to Python):
  1. die with the zygote (PR_SET_PDEATHSIG), ignore Ctrl-C, take the name ``pch-vcpu-N``, keep only
     its fds (guest RAM, start pipe, results area, access board; with --precopy the generation map),
     run on its CPUs;
  2. map guest RAM and *then* create and register its uffd: a uffd belongs to the address space
     that created it, and the handler's ioctls through it must act on this process's mapping;
  3. hand the uffd to the handler with a hello (postcopy_core/handoff.py) and close its own copy;
  4. build its access order (csrc/workloads.c), report ready in the results area, wait for EOF on
     the start pipe, run the timed touch loop (pch_touch_run): every read checked, every store one
     that only it could have made (vcpu_workers/stores.py), write its results, exit 0 (4 = wrong
     content read or a store of its own lost, 5 = a step failed, after one line ``vcpu N: ...``).
Why C: a Python child dirties ~1.4 MiB of the zygote's pages (reference counts, allocator pools)
and at 4096 workers that copying was most of the start-up; a C child touches only its own stack
and buffers.

The same body serves the non-vCPU processes of ``run --non-vcpu N`` (slots after the vCPUs): they
fault and hand over their uffd like a vCPU, but the handler does not map their pid to a vCPU, so
their faults are non-vCPU faults; each walks one vCPU's slice in its own random order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from postcopy_core import handoff, kernel
from postcopy_core._uffd import ffi, lib
from postcopy_core.board import board_size
from postcopy_core.content import ContentSpec
from vcpu_workers import results as R
from vcpu_workers.workloads import WORKLOADS, write_mode


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
    gens_fd: int = -1  # run --precopy: each page's final generation (postcopy_core/precopy.py), else -1
    place: str = "copy"  # run --place: "continue" registers MINOR too (the handler writes the page cache)
    received_fd: int = -1  # the received map (postcopy_core/ramblock.py), read-only here; -1: mincore
    ledger_fd: int = -1  # the store ledger (vcpu_workers/stores.py), or -1: no stores
    remove_rate: float = 0.0  # run --remove-rate: share of accesses after which the vCPU gives its page back
    fork_events: bool = False  # run --fork-events: each vCPU forks a reader mid-run (UFFD_EVENT_FORK)
    fork_timeout_s: float = 30.0  # how long that reader may wait for its pages
    unmap_events: bool = False  # run --unmap-events: each vCPU unmaps/maps back, moves pieces mid-run


# A non-vCPU process walks one vCPU's slice in a random order of its own (its seed: the run's seed
# ^ (DEVICE_SEED + its index)), so it meets that vCPU on some pages and is first on others.
DEVICE_SEED = 0xD3A


def c_plan(plan: WorkerPlan):
    """The plan as csrc/worker.c reads it: a ``struct pch_worker_plan *`` and the buffers it points
    to (keep the returned tuple alive while workers are forked)."""
    spec = plan.spec
    c = ffi.new("struct pch_worker_plan *")
    keep = [c]
    c.nvcpus, c.ndevices = plan.nvcpus, plan.ndevices
    c.memfd, c.start_fd, c.results_fd, c.board_fd = plan.memfd, plan.start_fd, plan.results_fd, plan.board_fd
    c.page_size, c.npages, c.seed = spec.page_size, spec.npages, spec.seed & (2**64 - 1)
    c.zero_permille = spec.zero_permille
    if spec.image:
        keep.append(ffi.new("char[]", os.fsencode(spec.image)))
        c.image = keep[-1]
    c.kind, c.device_kind, c.device_seed = WORKLOADS.index(plan.workload), WORKLOADS.index("random"), DEVICE_SEED
    c.write_ratio = plan.write_ratio
    c.write_mode = write_mode(plan.workload, plan.write_ratio) if plan.ledger_fd >= 0 else lib.PCH_WRITES_NONE
    c.ledger_fd = plan.ledger_fd
    c.features = kernel.FEATURE_THREAD_ID | (
        kernel.FEATURE_MISSING_HUGETLBFS if plan.hugetlb else kernel.FEATURE_MISSING_SHMEM)
    if plan.remove_rate > 0:  # MADV_REMOVE by a vCPU: UFFD_EVENT_REMOVE to the handler (the gens map says which)
        c.features |= kernel.FEATURE_EVENT_REMOVE
    c.remove_rate = plan.remove_rate
    if plan.fork_events:  # the child's mapping stays registered, under a uffd of its own for the handler
        c.features |= kernel.FEATURE_EVENT_FORK
    c.fork_events, c.fork_timeout_ms = int(plan.fork_events), int(plan.fork_timeout_s * 1000)
    if plan.unmap_events:  # munmap/mremap of guest RAM: UFFD_EVENT_UNMAP, UFFD_EVENT_REMAP to the handler
        c.features |= kernel.FEATURE_EVENT_UNMAP | kernel.FEATURE_EVENT_REMAP
    c.unmap_events = int(plan.unmap_events)
    minor = plan.place == "continue"
    c.register_mode, c.need_ioctls = kernel.REGISTER_MISSING, kernel.IOCTL_COPY
    need = b"UFFDIO_COPY"
    if minor:  # a page in the page cache but not mapped here traps too: it may be half written
        c.features |= kernel.FEATURE_MINOR_HUGETLBFS if plan.hugetlb else kernel.FEATURE_MINOR_SHMEM
        c.register_mode |= kernel.REGISTER_MINOR
        c.need_ioctls, need = kernel.IOCTL_CONTINUE, b"UFFDIO_CONTINUE"
    keep.append(ffi.new("char[]", need))
    c.need_what = keep[-1]
    # Registered MISSING only, an access faults when its page is not in the page cache yet: the
    # worker reads the received map (placed means in the page cache) rather than asking mincore, a
    # syscall per access (on shmem, 8 vCPUs: 10.3 -> 8.3 µs of vCPU CPU per fault, +12 % faults/s,
    # bench/compare_ref.py's CPU table), and on hugetlbfs mincore sees only this process's page
    # tables (a page another process mapped looks absent).
    c.received_fd = plan.received_fd if not minor else -1
    c.first_touch = int(minor)  # every first touch traps: that is the faulting test (see pch.h)
    address = plan.handoff_address.encode()
    keep.append(ffi.new("char[]", address))
    c.handoff, c.handoff_len = keep[-1], len(address)
    c.handoff_version, c.handoff_magic, c.handoff_ack = handoff.VERSION, handoff.MAGIC, handoff.ACK
    c.handoff_timeout_ms = int(handoff.SEND_TIMEOUT * 1000)
    nworkers = plan.nvcpus + plan.ndevices
    c.capacity = plan.capacity
    c.lat_off, c.pages_off, c.starts_off, c.area_size = R.layout(nworkers, plan.capacity)
    c.board_size = board_size(plan.nvcpus)
    c.gens_fd = plan.gens_fd  # run --precopy: the final generations, or -1
    if len(plan.cpus) > lib.PCH_WORKER_MAX_CPUS:
        raise ValueError(f"at most {lib.PCH_WORKER_MAX_CPUS} CPUs for the workers")
    c.ncpus = len(plan.cpus)
    for i, cpu in enumerate(plan.cpus):
        c.cpus[i] = cpu
    return c, keep
