"""Import one migration of a QEMU 10.1+ destination trace log (``log`` backend).

QEMU 10.1 replaced the 2018 blocktime events.  The lines it writes, after an optional
``TID@SEC.USEC:`` stamp (``-msg timestamp=on``), with the format strings of ``migration/trace-events``:

* ``postcopy_blocktime_tid_cpu_map cpu: %d, tid: %u`` -- one per vCPU when the context is created,
  so they give the vCPU count (smp_cpus) and the thread map;
* ``postcopy_blocktime_begin addr: 0x%x, time: %u, cpu: %d, exist: %d`` -- a fault recorded (only
  faults on pages not yet received are), ``time`` in ns of QEMU's realtime clock, ``cpu`` -1 for a
  non-vCPU thread, ``exist`` 1 when other faults on that address were already pending;
* ``postcopy_blocktime_end_one cpu: %d, left_faults: %u`` -- one per pending fault a placement
  resolves, newest first, with that vCPU's faults still pending after it (0 for a non-vCPU);
* ``postcopy_blocktime_end addr: 0x%x, time: %u, affected_cpus: %d, affected_non_cpus: %d`` --
  after its ``end_one`` lines; only for addresses that had pending faults.

All of it is written under QEMU's page-request mutex, so the file order is the accounting order and
the times are exact: no reconstruction is needed.  Each line is checked against the modern engine's
state as it replays (``exist``, every ``end_one``, both counts of every ``end``); disagreements are
counted in ``meta.extra["qemu"]["mismatched_ends"]``.
"""

from __future__ import annotations

import re

from .events import BlocktimeError, Event, Fault, Placed, TraceMeta
from .modern import ModernEngine
from .qemu_logfile import check_vcpus

_STAMP = re.compile(r"(?:\d{1,10}@\d{1,12}\.\d{1,9}:)?(\w+)(?: (.*))?")
_MAP = re.compile(r"cpu: (-?\d{1,10}), tid: (\d{1,10})\s*")
_BEGIN = re.compile(r"addr: 0x([0-9a-fA-F]{1,16}), time: (\d{1,20}), cpu: (-?\d{1,10}), exist: (\d{1,10})\s*")
_END_ONE = re.compile(r"cpu: (-?\d{1,10}), left_faults: (\d{1,3})\s*")
_END = re.compile(
    r"addr: 0x([0-9a-fA-F]{1,16}), time: (\d{1,20}), affected_cpus: (\d{1,10}), "
    r"affected_non_cpus: (\d{1,10})\s*"
)
_ZERO = re.compile(r"host=(0x[0-9a-fA-F]{1,16}|\(nil\))\s*")
_EVENTS = ("postcopy_blocktime_begin", "postcopy_blocktime_end", "postcopy_blocktime_tid_cpu_map")
I64 = 2**63 - 1


def is_qemu101(lines: list[tuple[int, str]]) -> bool:
    """Whether a migration's lines are QEMU 10.1+ events."""
    return any(e in line for _, line in lines for e in _EVENTS) and not any(
        "mark_postcopy_blocktime_" in line for _, line in lines
    )


def _fields(path: str, n: int, event: str, pattern: re.Pattern, args: str, want: str) -> re.Match:
    m = pattern.fullmatch(args)
    if m is None:
        raise BlocktimeError(f"{path}: line {n}: malformed {event} (expected '{want}'): {args[:80]!r}")
    return m


def _parse(path: str, lines: list[tuple[int, str]]) -> tuple[dict[int, int], list[tuple]]:
    """The tid map and the blocktime records in file order."""
    tid_map: dict[int, int] = {}
    records: list[tuple] = []
    last_zero: int | None = None
    for n, line in lines:
        m = _STAMP.match(line)
        if m is None:
            continue
        event, args = m.group(1), m.group(2) or ""
        if event == "postcopy_blocktime_tid_cpu_map":
            a = _fields(path, n, event, _MAP, args, "cpu: N, tid: N")
            cpu = int(a.group(1))
            check_vcpus(path, "vCPU index", cpu, n)
            tid_map[int(a.group(2))] = cpu
        elif event == "postcopy_blocktime_begin":
            a = _fields(path, n, event, _BEGIN, args, "addr: 0x.., time: N, cpu: N, exist: N")
            cpu = int(a.group(3))
            if cpu != -1:
                check_vcpus(path, "vCPU index", cpu, n)
            records.append(("B", n, int(a.group(1), 16), int(a.group(2)), cpu, a.group(4) != "0"))
        elif event == "postcopy_blocktime_end_one":
            a = _fields(path, n, event, _END_ONE, args, "cpu: N, left_faults: N")
            records.append(("O", n, int(a.group(1)), int(a.group(2))))
        elif event == "postcopy_blocktime_end":
            a = _fields(path, n, event, _END, args, "addr: 0x.., time: N, affected_cpus: N, affected_non_cpus: N")
            addr = int(a.group(1), 16)
            records.append(("E", n, addr, int(a.group(2)), int(a.group(3)), int(a.group(4)), last_zero == addr))
            last_zero = None
        elif event == "postcopy_place_page_zero":
            a = _fields(path, n, event, _ZERO, args, "host=0x..")
            last_zero = 0 if a.group(1) == "(nil)" else int(a.group(1), 16)
        for r in records[-1:]:
            if r[0] in "BE" and (r[2] > I64 or r[3] > I64):
                raise BlocktimeError(f"{path}: line {n}: address or time does not fit in 63 bits")
    return tid_map, records


def import_qemu101_piece(path: str, lines: list[tuple[int, str]], vcpus: int | None) -> tuple[TraceMeta, list[Event]]:
    """One QEMU 10.1+ migration's lines -> (metadata, events), every line checked on the way."""
    tid_map, records = _parse(path, lines)
    begins = [r for r in records if r[0] == "B"]
    if not begins:
        raise BlocktimeError(f"{path}: no postcopy_blocktime_begin lines in this migration")
    seen = max([c for c in tid_map.values()] + [r[4] for r in begins])
    if vcpus is None and seen < 0:
        raise BlocktimeError(f"{path}: no vCPU in this migration (no tid_cpu_map line, no vCPU fault)")
    n = vcpus if vcpus is not None else seen + 1
    if n <= seen:
        raise BlocktimeError(f"{path}: vCPU {seen} appears but --vcpus is {n}")
    addr_or = 0
    for r in records:
        if r[0] == "E":
            addr_or |= r[2]
    low = addr_or & -addr_or if addr_or else 4096
    meta = TraceMeta(
        vcpus=n, page_size=max(4096, min(low, 1 << 30)), tid_map=dict(tid_map), start_ns=0, source="qemu-log"
    )
    check = ModernEngine(meta)
    events: list[Event] = []
    mismatches: list[int] = []
    ones: list[tuple[int, int]] = []  # end_one lines since the last end
    ends = 0
    backwards: list[int] = []  # lines whose time: is before the previous blocktime line's (a damaged log)
    orphans: list[int] = []  # ends that affected vCPUs or others on an address with no begin pending
    last_t = None
    for r in records:
        kind, line = r[0], r[1]
        if kind in "BE":
            if last_t is not None and r[3] < last_t:
                backwards.append(line)
            last_t = r[3] if last_t is None else max(last_t, r[3])
        if kind == "B":
            _, _, addr, t, cpu, exist = r
            if exist != (addr in check.pending):
                mismatches.append(line)
            ev: Event = Fault(t, addr, cpu, 0, False)
            check.fault(ev)
        elif kind == "O":
            ones.append((r[2], r[3]))
            continue
        else:
            _, _, addr, t, affected, affected_non, zero = r
            ends += 1
            if (affected or affected_non) and addr not in check.pending:
                orphans.append(line)
            if _expected_end(check, addr) != (affected, affected_non, ones):
                mismatches.append(line)
            ones = []
            ev = Placed(t, addr, zero)
            check.placed(ev)
        events.append(ev)
    meta.extra = {
        "qemu": {
            "version": "10.1+",
            "begin_lines": len(begins),
            "end_lines": ends,
            "non_vcpu_faults": sum(1 for r in begins if r[4] < 0),
            "verified_ends": ends - len(mismatches),
            "mismatched_ends": len(mismatches),
            "first_mismatch_lines": mismatches[:10],
            "vcpus_inferred": vcpus is None and not tid_map,
            "tid_map_lines": len(tid_map),
            "backwards_times": len(backwards),
            "first_backwards_lines": backwards[:10],
            "ends_without_begin": len(orphans),
            "first_ends_without_begin": orphans[:10],
        }
    }
    return meta, events


def _expected_end(eng: ModernEngine, addr: int) -> tuple[int, int, list[tuple[int, int]]]:
    """What QEMU 10.1 logs for a placement at ``addr`` given the engine's state before it:
    affected vCPUs, affected non-vCPU faults, and (cpu, left_faults) per entry, newest first."""
    current: dict[int, int] = {}
    affected = non = 0
    ones = []
    for cpu, _t in reversed(eng.pending.get(addr, [])):
        if cpu < 0:
            non += 1
            ones.append((-1, 0))
            continue
        left = current.get(cpu, eng.vcpu_current[cpu]) - 1
        current[cpu] = left
        affected += left == 0
        ones.append((cpu, left))
    return affected, non, ones
