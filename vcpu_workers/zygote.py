"""The zygote: a lean process that forks every vCPU worker.

The orchestrator has numpy, rich and psutil loaded; forking a thousand copies of it is slow and
each copy soon owns megabytes of copied pages.  So the orchestrator execs this module in a fresh
interpreter with only what a worker needs, and the zygote forks the workers from that small,
frozen heap.  It then reaps them and reports each exit on a pipe, one line per worker:
``vcpu pid wait-status``.  Workers die with the zygote, the zygote with the orchestrator
(PR_SET_PDEATHSIG), and Ctrl-C is left to the orchestrator.

Started by harness/run.py (``zygote_command``: :func:`main` run by the installed code, whatever the
current folder) with the plan as JSON on stdin.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
from functools import partial

from postcopy_core import kernel
from postcopy_core.child import run_child
from postcopy_core.content import ContentSpec
from vcpu_workers.worker import WorkerPlan, worker_main


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
    gc.freeze()  # the GC would otherwise touch (and so copy) every object page in every worker
    pids: dict[int, int] = {}
    for vcpu in range(plan.nvcpus + plan.ndevices):  # vCPUs, then the non-vCPU processes
        pid = os.fork()
        if pid == 0:
            t_forked = kernel.now_ns()
            name = f"pch-vcpu-{vcpu}" if vcpu < plan.nvcpus else f"pch-dev-{vcpu - plan.nvcpus}"
            label = f"vcpu {vcpu}" if vcpu < plan.nvcpus else f"non-vCPU process {vcpu - plan.nvcpus}"
            keep = {plan.memfd, plan.start_fd, plan.results_fd, plan.board_fd} | ({plan.gens_fd} - {-1})
            run_child(name, label, keep, partial(worker_main, vcpu, plan, t_forked), plan.cpus)
        pids[pid] = vcpu
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
