"""The argument parser every ``postcopy-harness`` command uses: usage errors in one line.

argparse's own ``error`` prints the whole usage block (15 lines for ``run``) before the message;
here the message comes alone, on one line, with the command and a pointer to ``--help``.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line: ``PROG: MESSAGE (see PROG --help)``.

    Subcommand parsers made by ``add_subparsers`` are of the same class (argparse's default)."""

    def error(self, message: str) -> NoReturn:
        one = " ".join(message.split())  # never wrapped, whatever argparse put in it
        self.exit(2, f"{self.prog}: {one} (see '{self.prog} --help')\n")


def add_version_everywhere(parser: argparse.ArgumentParser, version: str) -> None:
    """``--version`` on ``parser`` and on every subcommand under it (``run --version`` works too)."""
    parser.add_argument("--version", action="version", version=version)
    for action in parser._actions:  # argparse keeps its subcommands here, no public accessor
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                add_version_everywhere(sub, version)
