"""harness: orchestration (spawn, supervise, tear down), config, CLI, reports."""
