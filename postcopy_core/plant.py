"""Bugs planted on purpose (``run --plant-bug KIND``): a checker is trusted only with what it caught.

Each kind makes the destination (csrc/dest.c, ``PCH_PLANT_*``) or the source misbehave the way real
postcopy code has, and names the class the checks must report it as (vcpu_workers/stores.py, the
stall watch for a lost wake).  Off by default; also a teaching tool: run one and read the report.
"""

from __future__ import annotations

from dataclasses import dataclass

from postcopy_core._uffd import lib


@dataclass(frozen=True)
class PlantedBug:
    """One kind: where it lives, what it does, what the run must call it, when it can act."""

    code: int  # PCH_PLANT_*
    where: str
    does: str
    caught_as: str  # verification.by-kind class, or "hung" (the stall watch names the vCPU)
    needs: str = ""  # what a run must have for the bug to act at all ("" = any run with faults)


PLANTED_BUGS = {
    "revert-after-write": PlantedBug(lib.PCH_PLANT_REVERT, "destination",
                                     "puts a faulted page's source bytes back after a vCPU wrote to it", "reverted",
                                     "stores (--write-ratio above 0)"),
    "zero-page": PlantedBug(lib.PCH_PLANT_ZERO, "destination",
                            "places zeros for one in four non-zero pages that a vCPU waits for", "zeroed"),
    "wrong-page": PlantedBug(lib.PCH_PLANT_WRONG, "destination",
                             "also places one in four waited-for pages at another offset (page ^ 2)", "foreign"),
    "stale-generation": PlantedBug(lib.PCH_PLANT_STALE, "destination",
                                   "gives a page dropped by a precopy DISCARD its old generation when it is placed",
                                   "stale", "--precopy with --dirty-rate (pages discarded)"),
    "lost-wake": PlantedBug(lib.PCH_PLANT_LOST_WAKE, "destination",
                            "places the first waited-for page and never wakes its waiter", "hung"),
    "resend-overwrite": PlantedBug(lib.PCH_PLANT_RESEND, "source and destination",
                                   "after a recovery the new source ignores the received map and sends every page "
                                   "again, and the destination writes them over what it had", "reverted",
                                   "a recovery (--inject source-crash or link-drop) and stores"),
}


def plant_code(kind: str | None) -> int:
    """PCH_PLANT_* of a kind (None: no bug, PCH_PLANT_NONE)."""
    return PLANTED_BUGS[kind].code if kind else lib.PCH_PLANT_NONE
