"""Synthetic postcopy runs, and QEMU-style trace logs rendered from them (tests and benchmarks).

``synthetic_run`` models vCPUs that run, fault on a page, wait for it, run again; background
placements of pages nobody waits for are mixed in, as QEMU's background stream does.
``render_qemu_log`` runs the seed engine over a stream and writes the lines QEMU 7.2 would log, with
wall-clock stamps taken a little after each accounting step (so stamp order can disagree with the
order the accounting ran, as in real logs).
"""

from __future__ import annotations

import numpy as np

from .events import KIND_FAULT, KIND_PLACED, Event, EventColumns, Fault, Placed, TraceMeta
from .seed import SeedEngine


def synthetic_run(
    vcpus: int,
    faults_per_vcpu: int,
    *,
    seed: int = 0,
    background_per_fault: float = 2.0,
    mean_wait_ns: int = 300_000,
    mean_run_ns: int = 400_000,
    page_size: int = 4096,
    start_ns: int = 1_000_000_000,
    non_vcpu_faults: int = 0,
) -> tuple[TraceMeta, EventColumns]:
    """A random but realistic stream: every vCPU alternates run / fault / wait; each fault is on its
    own page; background placements go to other pages.  Returns columns sorted by time."""
    rng = np.random.default_rng(seed)
    nf = vcpus * faults_per_vcpu
    run = rng.exponential(mean_run_ns, (vcpus, faults_per_vcpu)).astype(np.int64) + 1
    wait = rng.exponential(mean_wait_ns, (vcpus, faults_per_vcpu)).astype(np.int64) + 1
    fault_t = start_ns + np.cumsum(run + wait, axis=1) - wait
    place_t = fault_t + wait
    fv = np.repeat(np.arange(vcpus, dtype=np.int64), faults_per_vcpu)
    pages = rng.permutation(nf + int(nf * background_per_fault) + non_vcpu_faults + 1)
    fault_pages = pages[:nf]
    nb = int(nf * background_per_fault)
    bg_pages = pages[nf : nf + nb]
    t_end = int(place_t.max()) if nf else start_ns
    bg_t = rng.integers(start_ns, t_end + 1, nb)
    nv_pages = pages[nf + nb : nf + nb + non_vcpu_faults]
    nv_t = rng.integers(start_ns, t_end + 1, non_vcpu_faults)
    nv_wait = rng.exponential(mean_wait_ns, non_vcpu_faults).astype(np.int64) + 1

    kind = np.concatenate(
        [
            np.full(nf, KIND_FAULT),
            np.full(nf, KIND_PLACED),
            np.full(nb, KIND_PLACED),
            np.full(non_vcpu_faults, KIND_FAULT),
            np.full(non_vcpu_faults, KIND_PLACED),
        ]
    ).astype(np.int8)
    t = np.concatenate([fault_t.ravel(), place_t.ravel(), bg_t, nv_t, nv_t + nv_wait]).astype(np.int64)
    addr = (
        np.concatenate([fault_pages, fault_pages, bg_pages, nv_pages, nv_pages]).astype(np.int64) * page_size
    )
    vcpu = np.concatenate(
        [fv, np.zeros(nf + nb, np.int64), np.full(non_vcpu_faults, -1), np.zeros(non_vcpu_faults, np.int64)]
    ).astype(np.int32)
    order = np.lexsort((-kind, t))  # at equal times, placements first (a fault then sees it received)
    cols = EventColumns(
        kind=kind[order],
        t_ns=t[order],
        addr=addr[order],
        vcpu=vcpu[order],
        tid=np.where(vcpu[order] >= 0, 1000 + vcpu[order], 0).astype(np.int64),
        flag=np.where(kind[order] == KIND_FAULT, -1, 0).astype(np.int8),
    )
    meta = TraceMeta(vcpus=vcpus, page_size=page_size, start_ns=start_ns, source="synthetic")
    return meta, cols


def render_qemu_log(
    meta: TraceMeta,
    events: list[Event],
    *,
    seed: int = 0,
    wall_offset_ns: int = 1_795_000_000_123_456_789,
    mean_stamp_delay_ns: int = 3_000,
    late_stamp_prob: float = 0.01,
    fault_tid: int = 500,
    place_tid: int = 501,
) -> tuple[list[str], dict]:
    """QEMU 7.2 log lines for ``events`` as the 2018 accounting would have written them.

    Each step is stamped ``t + wall_offset + delay`` (exponential delay, sometimes 300 us late);
    each thread's lines stay in order and the file interleaves them by stamp.  Returns the lines and
    the seed engine's result (what QEMU's query-migrate would say).
    """
    rng = np.random.default_rng(seed)
    eng = SeedEngine(meta)
    dd = "0x55aa00001000"
    lines: list[tuple[int, int, str]] = []  # (stamp, tiebreak, text)
    last = {fault_tid: 0, place_tid: 0}
    seq = 0
    pid_of = {v: 7000 + v for v in range(meta.vcpus)}

    def stamp(tid: int, t: int) -> int:
        delay = int(rng.exponential(mean_stamp_delay_ns))
        if rng.random() < late_stamp_prob:
            delay += 300_000
        w = max(t + wall_offset_ns + delay, last[tid])  # one thread's stamps never go back
        last[tid] = w
        return w

    def emit(tid: int, w: int, text: str) -> None:
        nonlocal seq
        us = w // 1000
        lines.append((w, seq, f"{tid}@{us // 1_000_000}.{us % 1_000_000:06d}:{text}"))
        seq += 1

    for ev in events:
        if isinstance(ev, Fault):
            if ev.vcpu < 0:
                w = stamp(fault_tid, ev.t_ns)
                emit(
                    fault_tid,
                    w,
                    f"postcopy_ram_fault_thread_request Request for HVA={ev.addr:#x} rb=pc.ram "
                    f"offset={ev.addr:#x} pid=99",
                )
                emit(fault_tid, w, "get_mem_fault_cpu_index cpu: -1, pid: 99")
                continue
            eng.fault(ev)
            w = stamp(fault_tid, ev.t_ns)
            pid = pid_of[ev.vcpu]
            emit(
                fault_tid,
                w,
                f"postcopy_ram_fault_thread_request Request for HVA={ev.addr:#x} rb=pc.ram "
                f"offset={ev.addr:#x} pid={pid}",
            )
            emit(fault_tid, w, f"get_mem_fault_cpu_index cpu: {ev.vcpu}, pid: {pid}")
            ar = eng.fault_time[ev.vcpu] == 0 and eng.vcpu_addr[ev.vcpu] is None
            emit(
                fault_tid,
                w,
                f"mark_postcopy_blocktime_begin addr: {ev.addr:#x}, dd: {dd}, "
                f"time: {eng.fault_time[ev.vcpu]}, cpu: {ev.vcpu}, already_received: {int(ar)}",
            )
        else:
            w = stamp(place_tid, ev.t_ns)
            if ev.zero:
                emit(place_tid, w, f"postcopy_place_page_zero host={ev.addr:#x}")
            affected = eng.placed(ev)
            emit(
                place_tid,
                w,
                f"mark_postcopy_blocktime_end addr: {ev.addr:#x}, dd: {dd}, time: {eng.total}, "
                f"affected_cpu: {affected}",
            )
            if not ev.zero:
                emit(place_tid, w, f"postcopy_place_page host={ev.addr:#x}")
    w = max(last.values()) + 1000
    emit(place_tid, w, f"postcopy_ram_incoming_cleanup_blocktime total blocktime {eng.total}")
    lines.sort(key=lambda x: (x[0], x[1]))
    return [text for _, _, text in lines], eng.result()


def events_from_columns(cols: EventColumns) -> list[Event]:
    """Shorthand used by tests and the benchmark."""
    return cols.to_events()


__all__ = ["synthetic_run", "render_qemu_log", "events_from_columns", "Fault", "Placed"]
