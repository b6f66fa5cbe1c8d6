"""Reading a trace or a log, plain or gzip, within fixed bounds.

Every reader of user-supplied event files (``replay``, ``--working-set``, the Python API, the pytest
plugin, both QEMU importers) reads through :func:`bounded_lines`, so no file can make it allocate or
spin without bound: a line is at most ``max_line`` bytes (read with a size limit, never whole), a file
at most ``MAX_LINES`` lines (blank lines count) and ``MAX_BYTES`` bytes once decompressed, and gzip
data may not expand more than ``MAX_RATIO`` times (real QEMU logs and harness traces compress
10-16x; a bomb of newlines or of one repeated byte about 1000x), checked from the first MiB on, so a
bomb is refused after a few MiB of output.  Each refusal is one ``BlocktimeError`` line naming the
file, the line and the limit.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from collections.abc import Callable, Iterator
from typing import IO

from .events import BlocktimeError

MAX_LINES = 1 << 27  # 134 M lines: far above a real run's trace (4 lines per fault) yet a bound
MAX_BYTES = 16 << 30  # decompressed bytes
MAX_RATIO = 100  # decompressed / compressed bytes; real logs and traces: 10-16
RATIO_FROM = 1 << 20  # judge the ratio only after this much output (tiny files compress oddly)
MAX_RECORDS = 1 << 24  # events (or kept log lines) one file may hold: bounds the memory of a replay
_CHECK_EVERY = 1 << 20  # bytes of output between ratio checks
CHUNK = 1 << 18  # bytes read, split and decoded at a time
NL = b"\n"


def open_maybe_gzip(path: str) -> tuple[IO[bytes], IO[bytes] | None]:
    """(stream to read, the compressed file under it or None when plain); one-line error."""
    try:
        raw = open(path, "rb")  # noqa: SIM115 - returned, closed by the caller
    except OSError as exc:
        raise BlocktimeError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        if raw.peek(2)[:2] != b"\x1f\x8b":
            return raw, None
    except OSError as exc:
        raw.close()
        raise BlocktimeError(f"{path}: cannot read: {exc.strerror}") from None
    # a buffered reader over the gzip stream: readline(limit) stays in C
    return io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"), buffer_size=1 << 18), raw


def bounded_lines(
    path: str | os.PathLike,
    max_line: int,
    skip_blank: bool = True,
    keep: Callable[[str], bool] | None = None,
) -> Iterator[tuple[int, str]]:
    """(line number, text without the newline) of a plain or gzip file, within the module's bounds.

    ``skip_blank``: blank lines are counted but not yielded.  ``keep``: a test on the text; lines it
    rejects are still checked (length, UTF-8) and counted, not yielded.  Raises BlocktimeError.
    Read in chunks of ``CHUNK`` bytes, split and decoded a chunk at a time (C speed), so no line is
    ever read whole: a partial line longer than ``max_line`` is refused as it grows.
    """
    path = os.fspath(path)
    stream, compressed = open_maybe_gzip(path)
    n = 0  # lines yielded or skipped so far
    out_bytes = 0
    next_check = RATIO_FROM
    rest = b""  # the unfinished last line of the chunks so far
    try:
        with stream, (compressed or stream):  # GzipFile(fileobj=) leaves the file open: close it too
            while True:
                chunk = stream.read(CHUNK)
                out_bytes += len(chunk)
                if out_bytes >= next_check:
                    next_check = out_bytes + _CHECK_EVERY
                    _check_volume(path, n + 1, out_bytes, compressed)
                if chunk:
                    cut = chunk.rfind(b"\n")
                    if cut < 0:
                        rest += chunk
                        if len(rest) > max_line + 1:
                            raise BlocktimeError(f"{path}: line {n + 1}: longer than {max_line:,} bytes")
                        continue
                    block, rest = rest + chunk[:cut], chunk[cut + 1:]
                elif rest:
                    block, rest = rest, b""
                else:
                    return
                for line in _decode_lines(path, n, block):
                    n += 1
                    line = _bounded_line(path, n, line, max_line)
                    if skip_blank and (not line or line.isspace()):
                        continue
                    if keep is None or keep(line):
                        yield n, line
                if len(rest) > max_line + 1:
                    raise BlocktimeError(f"{path}: line {n + 1}: longer than {max_line:,} bytes")
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise BlocktimeError(f"{path}: line {n + 1}: gzip data truncated or corrupt ({exc})") from None
    except OSError as exc:
        raise BlocktimeError(f"{path}: line {n + 1}: read error: {exc}") from None


def _decode_lines(path: str, n: int, block: bytes) -> list[str]:
    """The lines of a block of whole lines (``n`` lines came before it), decoded; bad UTF-8 and too
    many lines in all are refused."""
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = n + 1 + block.count(NL, 0, exc.start)
        raise BlocktimeError(f"{path}: line {bad}: not text (bad UTF-8)") from None
    lines = text.split("\n")
    if n + len(lines) > MAX_LINES:
        raise BlocktimeError(f"{path}: more than {MAX_LINES:,} lines: refused (a trace or log "
                             "this long is not one the engines can replay in memory)")
    return lines


def _bounded_line(path: str, n: int, line: str, max_line: int) -> str:
    """Line ``n`` without a trailing CR, refused when longer than ``max_line`` bytes."""
    if line[-1:] == "\r":
        line = line[:-1]
    if len(line) > max_line // 4 and len(line.encode()) > max_line:  # chars <= bytes
        raise BlocktimeError(f"{path}: line {n}: longer than {max_line:,} bytes")
    return line


def _check_volume(path: str, n: int, out_bytes: int, compressed: IO[bytes] | None) -> None:
    if out_bytes > MAX_BYTES:
        raise BlocktimeError(f"{path}: line {n}: more than {MAX_BYTES >> 30} GiB of text: refused")
    if compressed is None:
        return
    read = max(compressed.tell(), 1)
    if out_bytes > MAX_RATIO * read:
        raise BlocktimeError(
            f"{path}: line {n}: gzip data expands more than {MAX_RATIO}x ({out_bytes >> 20} MiB from "
            f"{read:,} bytes): refused as a decompression bomb (gunzip it first if it is genuine)"
        )


def read_json_file(path: str, what: str, max_bytes: int = 16 << 20) -> object:
    """A small JSON file (a query-migrate answer, a capture's metadata) read within ``max_bytes``;
    anything else is one BlocktimeError line naming the file and ``what`` it should have been."""
    import json

    try:
        with open(path, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as exc:
        raise BlocktimeError(f"{path}: cannot read {what}: {exc.strerror}") from None
    if len(raw) > max_bytes:
        raise BlocktimeError(f"{path}: larger than {max_bytes >> 20} MiB: not {what}")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BlocktimeError(f"{path}: not {what} (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise BlocktimeError(f"{path}: not {what}: {exc}") from None
    except (ValueError, RecursionError):  # a number of thousands of digits, deep nesting
        raise BlocktimeError(f"{path}: not {what} (unusable JSON: nested too deep or a number too long)") from None


def too_many_records(path: str, n: int, limit: int = MAX_RECORDS) -> BlocktimeError:
    """The error for a file holding more than ``limit`` events or kept lines."""
    return BlocktimeError(f"{path}: line {n}: more than {limit:,} records: refused (split the trace)")
