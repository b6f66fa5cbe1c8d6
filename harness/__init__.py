"""harness: orchestration (spawn, supervise, tear down), config, CLI, reports."""


def tool_version() -> str:
    """The installed distribution's version (what ``--version`` and every report say)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("postcopy-harness")
    except PackageNotFoundError:  # run from a tree that was never installed
        return "unknown"
