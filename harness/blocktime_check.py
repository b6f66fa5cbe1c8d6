"""Check a run's blocktime against expected values: ``assert_blocktime`` and its per-vCPU table."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence


def _engines_of(report: Mapping) -> Mapping:
    """A run report or a replay's engines dict -> the engines dict."""
    engines = report.get("engines", report)
    if not isinstance(engines, Mapping):
        raise TypeError("expected a run report (with 'engines') or a replay's engines dict")
    return engines


def _expected_of(engines: Mapping, expected: object) -> tuple[list[float], float | None, str]:
    """(per-vCPU ms, total ms or None, a label) from the forms assert_blocktime accepts."""
    if isinstance(expected, str):
        if expected not in engines:
            raise KeyError(f"no engine {expected!r} in the report (it has {', '.join(engines)})")
        res = engines[expected]
        return list(res["postcopy-vcpu-blocktime"]), res["postcopy-blocktime"], f"engine {expected}"
    if isinstance(expected, Mapping):
        return list(expected["postcopy-vcpu-blocktime"]), expected.get("postcopy-blocktime"), "expected"
    if isinstance(expected, Iterable):
        return list(expected), None, "expected"
    raise TypeError("expected: per-vCPU ms values, a dict of query-migrate fields, or an engine name")


def blocktime_table(expected: Sequence[float], got: Sequence[float], tolerance_ms: float,
                    total: tuple[float, float] | None = None) -> str:
    """The per-vCPU comparison table :func:`assert_blocktime` prints (``!`` marks a miss)."""
    rows = [("vCPU", "expected ms", "got ms", "difference", "")]
    for i, (e, g) in enumerate(zip(expected, got, strict=True)):
        rows.append((str(i), f"{e:g}", f"{g:g}", f"{g - e:+g}", "!" if abs(g - e) > tolerance_ms else ""))
    if total is not None:
        e, g = total
        rows.append(("total", f"{e:g}", f"{g:g}", f"{g - e:+g}", "!" if abs(g - e) > tolerance_ms else ""))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def assert_blocktime(report: Mapping, engine: str, expected: object, tolerance_ms: float = 1.0) -> None:
    """Assert that ``engine``'s blocktime is within ``tolerance_ms`` of ``expected``, per vCPU.

    ``report`` is a run report or a replay's engines dict.  ``expected`` is one of: a list of per-vCPU
    ms (checks ``postcopy-vcpu-blocktime``); a dict with ``postcopy-vcpu-blocktime`` and optionally
    ``postcopy-blocktime`` (e.g. QEMU's own query-migrate answer; the total is checked too); or the
    name of another engine in the same report (both fields).  On failure the AssertionError shows a
    per-vCPU table of expected, got and difference.
    """
    engines = _engines_of(report)
    if engine not in engines:
        raise AssertionError(f"no engine {engine!r} in the report (it has {', '.join(engines) or 'none'})")
    exp_per, exp_total, label = _expected_of(engines, expected)
    got = engines[engine]
    got_per = list(got["postcopy-vcpu-blocktime"])
    if len(exp_per) != len(got_per):
        raise AssertionError(f"{engine}: {len(got_per)} vCPUs in the report, {len(exp_per)} expected")
    total = None if exp_total is None else (exp_total, got["postcopy-blocktime"])
    misses = [i for i, (e, g) in enumerate(zip(exp_per, got_per, strict=True)) if abs(g - e) > tolerance_ms]
    total_miss = total is not None and abs(total[1] - total[0]) > tolerance_ms
    if misses or total_miss:
        what = f"{len(misses)} of {len(got_per)} vCPUs" + (" and the total" if total_miss else "")
        raise AssertionError(
            f"blocktime of engine {engine} vs {label}: {what} off by more than {tolerance_ms:g} ms\n"
            + blocktime_table(exp_per, got_per, tolerance_ms, total)
        )
