"""One vCPU worker process: map guest RAM, register a uffd, hand it over, run the workload.

Runs in a child forked by the orchestrator.  The uffd is created *after* fork, in the worker:
a uffd belongs to the address space that created it, and the handler's ioctls through it must
act on this process's mapping.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import numpy as np

from postcopy_core import kernel
from postcopy_core._uffd import ffi, lib
from postcopy_core.content import ContentSpec, Image
from postcopy_core.handoff import WorkerHello, send_uffd
from vcpu_workers import results as R
from vcpu_workers.workloads import make_order, make_writes

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


def worker_main(vcpu: int, plan: WorkerPlan, area: R.ResultsArea, t_forked: int) -> int:
    """Body of worker ``vcpu``; returns the exit code."""
    rec = area.summary[vcpu]
    rec["vcpu"], rec["pid"], rec["t_forked"] = vcpu, os.getpid(), t_forked
    spec = plan.spec
    ram = kernel.mmap_fd(plan.memfd, spec.size)
    os.close(plan.memfd)
    features = kernel.FEATURE_THREAD_ID | (
        kernel.FEATURE_MISSING_HUGETLBFS if plan.hugetlb else kernel.FEATURE_MISSING_SHMEM
    )
    uffd = kernel.Uffd.open(features)
    ioctls = uffd.register(ram.addr, spec.size)
    if not ioctls & kernel.IOCTL_COPY:
        raise kernel.KernelError("UFFDIO_REGISTER", 95, "the range does not support UFFDIO_COPY")
    send_uffd(plan.handoff_address, WorkerHello(vcpu, os.getpid(), ram.addr, spec.size), uffd.fd)
    uffd.close()  # the handler now holds the only reference

    order = make_order(plan.workload, vcpu, plan.nvcpus, spec.npages, spec.seed)
    writes = make_writes(len(order), plan.write_ratio, vcpu, spec.seed)
    ref = Image(spec) if spec.image else None
    verified = np.zeros(spec.npages, dtype=np.uint8)
    rec["accesses"] = len(order)
    rec["t_ready"] = kernel.now_ns()
    rec["state"] = R.STATE_READY

    while os.read(plan.start_fd, 1):  # wait for EOF: every worker starts at once
        pass
    t = ffi.new("struct pch_touch *")
    t.base, t.page_size, t.npages = ram.addr, spec.page_size, spec.npages
    t.order, t.count = ffi.from_buffer("uint32_t[]", order), len(order)
    t.is_write = ffi.from_buffer("uint8_t[]", writes) if writes is not None else ffi.NULL
    t.seed, t.zero_permille = spec.seed, spec.zero_permille
    t.ref = ref.pointer() if ref is not None else ffi.NULL
    t.verified = ffi.from_buffer("uint8_t[]", verified)
    t.min_fault_ns = HUGETLB_MIN_FAULT_NS if plan.hugetlb else 0
    t.lat_ns = ffi.from_buffer("uint32_t[]", area.lat_ns[vcpu])
    t.lat_page = ffi.from_buffer("uint32_t[]", area.lat_page[vcpu])
    rc = lib.pch_touch_run(t)
    if rc < 0:
        raise kernel.KernelError("touch loop", -rc)
    for name in ("stall_ns", "max_ns", "all_ns", "pages_checked", "words_checked", "mismatches",
                 "first_bad_page", "t_start", "t_end"):
        rec[name] = getattr(t, name)
    rec["faulting"] = t.n_faulting
    rec["state"] = R.STATE_DONE if t.mismatches == 0 else R.STATE_FAILED
    return 0 if t.mismatches == 0 else 4


def run_in_child(vcpu: int, plan: WorkerPlan, area: R.ResultsArea) -> None:
    """Called right after fork: set up process hygiene, run, and _exit (never return)."""
    t_forked = kernel.now_ns()
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the orchestrator's to handle
        kernel.die_with_parent()
        kernel.set_process_name(f"pch-vcpu-{vcpu}")
        code = worker_main(vcpu, plan, area, t_forked)
    except BaseException as e:  # report in one line; the orchestrator fails the run
        try:
            os.write(2, f"vcpu {vcpu}: {type(e).__name__}: {e}\n".encode())
        finally:
            code = 5
    finally:
        os._exit(code)
