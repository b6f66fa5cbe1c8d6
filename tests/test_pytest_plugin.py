"""The pytest plugin as a user meets it: a test file in a fresh directory, run by pytest itself
(pytester), with the plugin found through its ``pytest11`` entry point (not imported by hand)."""

from __future__ import annotations

import pytest

import postcopy_harness as ph
from postcopy_core.blocktime.synth import synthetic_run
from tests.conftest import requires_uffd

pytest_plugins = ["pytester"]


@pytest.fixture
def trace_file(tmp_path):
    meta, cols = synthetic_run(4, 25, seed=3)
    path = tmp_path / "synthetic.trace.gz"
    ph.write_trace(path, meta, cols)
    return path, ph.replay_events(meta, cols)


def test_plugin_is_registered_by_its_entry_point(pytester):
    result = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["plugins: *postcopy-harness*", "*fixtures defined from harness.pytest_plugin*",
                                 "postcopy_replay -- *", "postcopy_run -- *"])
    disabled = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider", "-p", "no:postcopy_harness")
    assert "postcopy_run" not in disabled.stdout.str()  # registered under the name the issue gives


def test_replay_fixture_and_assert_blocktime(pytester, trace_file):
    path, engines = trace_file
    exact = engines["exact"]["postcopy-vcpu-blocktime"]
    wrong = [x + 5 for x in exact]
    pytester.makepyfile(f"""
        from postcopy_harness import assert_blocktime

        def test_exact_matches(postcopy_replay):
            engines = postcopy_replay({str(path)!r}, format="native", engines=["exact", "seed"])
            assert list(engines) == ["exact", "seed"]
            assert_blocktime(engines, "exact", {exact!r}, tolerance_ms=0)

        def test_all_engines_by_default(postcopy_replay):
            assert set(postcopy_replay({str(path)!r})) == {set(engines)!r}

        def test_wrong_expectation_fails(postcopy_replay):
            engines = postcopy_replay({str(path)!r}, vcpus=4)
            assert_blocktime(engines, "exact", {wrong!r}, tolerance_ms=1)

        def test_bad_file_fails_in_one_line(postcopy_replay):
            postcopy_replay("/nonexistent.trace")
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=2)
    out = result.stdout.str()
    result.stdout.fnmatch_lines([
        "*blocktime of engine exact vs expected: 4 of 4 vCPUs off by more than 1 ms",
        "*vCPU  expected ms  got ms  difference",
    ])
    for v, (e, g) in enumerate(zip(wrong, exact, strict=True)):
        result.stdout.fnmatch_lines([f"*{v}  *{e}  *{g}  *-5  !"])
    # the API's exception, uncaught: pytest shows its one line
    assert "BlocktimeError: /nonexistent.trace: cannot open: No such file or directory" in out
    assert "During handling" not in out


def test_run_fixture_rejects_bad_options(pytester):
    pytester.makepyfile("""
        def test_bad(postcopy_run):
            postcopy_run(vcpus=2, ram="8M", wrokload="shared")
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["E *harness.config.ConfigError: unknown run option 'wrokload' (choose from vcpus, *"])
    assert "During handling" not in result.stdout.str()  # one line, no exception chain


def test_run_fixture_raises_the_api_s_config_error(pytester):
    """``postcopy_run(vcpus=0)`` raises the ConfigError ``postcopy_harness.run(vcpus=0)`` raises."""
    with pytest.raises(ph.ConfigError) as api:
        ph.run(vcpus=0)
    pytester.makepyfile(f"""
        import pytest
        import postcopy_harness as ph

        def test_vcpus_0(postcopy_run):
            with pytest.raises(ph.ConfigError) as info:
                postcopy_run(vcpus=0)
            assert str(info.value) == {str(api.value)!r}
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


@pytest.mark.kernel
@requires_uffd
def test_run_fixture_end_to_end(pytester, clean_machine):
    """The README's example test, run as a user would: a live run, its trace replayed, blocktime
    compared between engines; in a subprocess, so the leftover check sees only that session."""
    example = pytester.path / "test_example.py"
    example.write_text(readme_example())
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", str(example), timeout=300)
    result.assert_outcomes(passed=1)


def readme_example() -> str:
    """The complete example test from the README's pytest plugin section."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = text.index("```python\n# test_blocktime_regression.py")
    return text[start + len("```python\n"):text.index("```", start + 10)]


@pytest.mark.kernel
@requires_uffd
def test_run_fixture_failed_run_fails_the_test_in_one_line(pytester, clean_machine):
    pytester.makepyfile("""
        def test_too_short(postcopy_run):
            postcopy_run(vcpus=2, ram="64M", workload="sequential", link="10mbit", background=False, timeout=0.5)

        def test_too_short_raises(postcopy_run):
            import pytest, postcopy_harness as ph
            with pytest.raises(ph.RunError, match="did not finish within --timeout 0.5 s"):
                postcopy_run(vcpus=2, ram="64M", workload="sequential", link="10mbit", background=False, timeout=0.5)
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["E *postcopy_harness.RunError: the run did not finish within --timeout 0.5 s"])
    assert "Traceback" not in result.stdout.str() and "During handling" not in result.stdout.str()


def test_leftover_check_sees_this_process_s_pch_children():
    import os
    import signal
    import time

    from harness.pytest_plugin import leftovers_of_this_process
    from postcopy_core import kernel

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a stand-in for a run's child that was not torn down
        kernel.set_process_name("pch-leftover")
        os.close(r)
        os.write(w, b"x")
        time.sleep(60)
        os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"x"
        assert f"process pch-leftover pid {pid}" in leftovers_of_this_process()
    finally:
        os.close(r)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while f"process pch-leftover pid {pid}" in leftovers_of_this_process() and time.monotonic() < deadline:
            time.sleep(0.01)  # the check itself reaps the zombie
    assert not any(f"pid {pid}" in x for x in leftovers_of_this_process())
