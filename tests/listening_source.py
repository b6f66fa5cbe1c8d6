"""A ``postcopy-harness source --listen 127.0.0.1:0`` process for the tests that migrate from it
(test_remote_source.py, test_tls.py): started, its address read from its first line, stopped."""

from __future__ import annotations

import re
import subprocess
import sys

CLI = [sys.executable, "-m", "harness.cli"]


class ListeningSource:
    """``source --listen 127.0.0.1:0 --auth-key-file KEY ARGS...``; ``where`` is the port it got,
    ``listening`` the line that said so."""

    def __init__(self, key: str, *args: str) -> None:
        self.p = subprocess.Popen([*CLI, "source", "--listen", "127.0.0.1:0", "--auth-key-file", key, *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.p.stderr.readline()
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert m, line + self.p.stderr.read()
        self.listening = line
        self.where = f"127.0.0.1:{m.group(1)}"

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        """Its exit status and the rest of its stderr, once it ends by itself (killed after ``timeout``)."""
        try:
            _, err = self.p.communicate(timeout=timeout)
        finally:
            self.stop()
        return self.p.returncode, err

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.communicate()
