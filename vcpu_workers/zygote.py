"""The zygote: a lean process that forks every vCPU worker.

The orchestrator has numpy, rich and psutil loaded; forking a thousand copies of it is slow and
each copy soon owns megabytes of copied pages.  So the orchestrator execs this module in a fresh
interpreter with only what a worker needs, and the zygote forks the workers from that small heap,
in C (csrc/worker.c): a child never runs Python, so it copies almost none of the zygote's pages.
It then reaps them and reports each exit on a pipe, one line per worker: ``vcpu pid wait-status``.
Workers die with the zygote, the zygote with the orchestrator (PR_SET_PDEATHSIG), and Ctrl-C is
left to the orchestrator.

Started by harness/run.py (``zygote_command``: :func:`main` run by the installed code, whatever the
current folder) with the plan as JSON on stdin.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from postcopy_core import kernel
from postcopy_core._uffd import ffi, lib
from postcopy_core.content import ContentSpec
from vcpu_workers.worker import WorkerPlan, c_plan


def plan_to_json(plan: WorkerPlan, report_fd: int) -> str:
    d = dict(plan.__dict__, spec=plan.spec.__dict__, report_fd=report_fd)
    return json.dumps(d)


def _plan_from_json(text: str) -> tuple[WorkerPlan, int]:
    d = json.loads(text)
    report_fd = d.pop("report_fd")
    d["spec"] = ContentSpec(**d["spec"])
    d["cpus"] = tuple(d["cpus"])
    return WorkerPlan(**d), report_fd


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    kernel.die_with_parent()
    kernel.set_process_name("pch-zygote")
    plan, report_fd = _plan_from_json(sys.stdin.read())
    nworkers = plan.nvcpus + plan.ndevices  # vCPUs, then the non-vCPU processes
    c, _keep = c_plan(plan)
    out, err = ffi.new("int32_t[]", max(nworkers, 1)), ffi.new("int *")
    forked = lib.pch_spawn_workers(c, 0, nworkers, out, err)  # the children run C only (csrc/worker.c)
    pids = {int(out[i]): i for i in range(forked)}
    if forked < nworkers:  # the forked ones die with us (PDEATHSIG)
        os.write(2, f"pch-zygote: fork of worker {forked} of {nworkers} failed: {os.strerror(err[0])}\n".encode())
        return 1
    os.close(plan.start_fd)  # only workers hold the read end now: EOF reaches them alone
    while pids:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        vcpu = pids.pop(pid, None)
        if vcpu is not None:
            os.write(report_fd, f"{vcpu} {pid} {status}\n".encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
