"""``postcopy-harness source --listen HOST:PORT``: a source on its own, for ``run --source HOST:PORT``.

The same Source (postcopy_core/source.py) as a forked run's, with its control line carried over the
network: the remote orchestrator connects a third channel (``C``) with the same HMAC handshake as
the page channels (postcopy_core/auth.py), so without the key nobody steers the source or gets a
page.  Per destination:

    destination's orchestrator -> control channel C (authenticated)
    source -> C: {"event": "hello", geometry and content}   the run checks it before starting anything
    destination's handler -> stream S and urgent U channels (authenticated)
    then the forked run's control protocol on C: ready, go, stream, stats

A destination that hangs up before its page channels connect leaves the source waiting for the
next one.  One that is lost mid-migration (a dropped link) is waited for, like QEMU's source in
postcopy-paused: it comes back with ``attach`` + ``resume`` and its received map, and this source
(a fresh Source for it) sends only what is missing.  The first migration that completes (or
Ctrl-C) ends the command.  While a migration runs, every other connection is refused at once (none
waits in the listen queue); refusals are counted into one line (postcopy_core/refusals.py).

With ``--tls-creds DIR`` every channel runs over TLS (postcopy_core/tls.py): a connection that does
not complete the handshake with a client certificate from the CA is refused like a wrong key.
"""

from __future__ import annotations

import os
import ssl
import sys

from harness.config import RunConfig, parse_endpoint
from postcopy_core import kernel
from postcopy_core.auth import key_from_file, warn
from postcopy_core.channel import CHANNEL_CONTROL, ControlLine, tcp_accept_channels, tcp_listener
from postcopy_core.content import ContentSpec
from postcopy_core.protocol import Geometry, ProtocolError
from postcopy_core.refusals import Refusals, TurnAway
from postcopy_core.source import Source

WAIT_FOREVER = 7 * 86400.0  # "no timeout": a week (epoll takes at most ~24 days)
PAGE_CHANNELS_TIMEOUT = 300.0  # a destination starts its vCPU workers before it connects the page channels


def hello(cfg: RunConfig) -> dict:
    """What the source tells a destination before any page: geometry and how the content is made."""
    return {"event": "hello", "page-size": cfg.page_size, "ram-bytes": cfg.ram, "seed": cfg.seed,
            "zero-share": cfg.zero_share, "image": os.path.basename(cfg.image) if cfg.image else None}


def check_hello(msg: dict, cfg: RunConfig) -> str | None:
    """Why a run with ``cfg`` cannot migrate from the source that said ``msg`` (None if it can)."""
    mine = hello(cfg)
    if (msg.get("page-size"), msg.get("ram-bytes")) != (mine["page-size"], mine["ram-bytes"]):
        return (f"the source serves {_size(msg.get('ram-bytes'))} in {msg.get('page-size')}-byte pages, this run "
                f"has {_size(cfg.ram)} in {cfg.page_size}-byte pages (--ram and --backing must match)")
    if bool(msg.get("image")) != bool(cfg.image):
        theirs = f"the image {msg['image']}" if msg.get("image") else "generated content"
        return f"the source serves {theirs}, this run expects {'an --image' if cfg.image else 'generated content'}"
    if not cfg.image and (msg.get("seed"), msg.get("zero-share")) != (cfg.seed, cfg.zero_share):
        return (f"the source's content is --seed {msg.get('seed')} --zero-share {msg.get('zero-share')}, this run "
                f"verifies against --seed {cfg.seed} --zero-share {cfg.zero_share}")
    return None


def _size(n) -> str:
    return f"{n / 2**20:g} MiB" if isinstance(n, int) else repr(n)


def serve(cfg: RunConfig, listen: str, quiet: bool = False, timeout: float | None = None,
          tls: ssl.SSLContext | None = None) -> int:
    """Listen on ``listen`` and serve one migration; 0 when a destination got every page.  ``tls``:
    the server context of ``--tls-creds`` (postcopy_core.tls.server_context)."""
    host, port = parse_endpoint(listen, "--listen")
    key = key_from_file(cfg.auth_key_file)
    spec = ContentSpec(cfg.page_size, cfg.npages, cfg.seed, round(cfg.zero_share * 1000), cfg.image)
    geo = Geometry(cfg.page_size, cfg.ram)
    kernel.set_process_name("pch-source")
    try:
        ls = tcp_listener(host, port)
    except OSError as e:
        raise OSError(e.errno, f"--listen {listen}: {os.strerror(e.errno) if e.errno else e}") from None
    bound = ls.getsockname()
    if not quiet:  # the port is what a test (or a person) needs when asking for port 0
        over = " (TLS)" if tls is not None else ""
        print(f"postcopy-harness source: listening on {bound[0]}:{bound[1]}{over}", file=sys.stderr, flush=True)
    refusals = Refusals("page-channel connection")  # one count for the whole command
    try:
        resumes = 0
        while True:
            control, stream, urgent, resume = _next_destination(ls, key, hello(cfg), timeout, refusals, tls)
            try:
                with TurnAway(ls, refusals, "a migration is in progress"):
                    stats = Source(spec, geo, stream, urgent, cfg.link_model, control, resume=resume).run()
            except ProtocolError as e:
                raise OSError(0, f"bad message from the destination: {e}") from None
            try:
                control.send(event="stats", stats=stats)
            except OSError:
                pass
            if stats["all_sent"]:
                break
            # the destination is postcopy-paused (a dropped link, a killed run is the same to us):
            # like QEMU's source, wait for it to come back and resume from its received map
            resumes += 1
            warn("the destination left before it had every page; waiting for it to resume")
            for sock in (stream, urgent, control.sock):
                sock.close()
    finally:
        ls.close()
        refusals.flush()
    if not quiet:
        again = f", {resumes} resume(s)" if resumes else ""
        print(f"postcopy-harness source: migrated {cfg.npages} pages ({stats['requests']} requests{again})",
              file=sys.stderr, flush=True)
    return 0


def _next_destination(ls, key: bytes, greeting: dict, timeout: float | None, refusals: Refusals,
                      tls: ssl.SSLContext | None = None):
    """Wait for a destination: its control channel, our hello, its ``attach`` (fresh or resume), then
    its page channels.  One that hangs up midway leaves us waiting for the next."""
    while True:
        (ctl,) = tcp_accept_channels(ls, key, timeout or WAIT_FOREVER, wanted=(CHANNEL_CONTROL,), close=False,
                                     refusals=refusals, tls=tls)
        ctl.setblocking(True)
        control = ControlLine(ctl)
        try:
            control.send(**greeting)
            msg = control.recv(PAGE_CHANNELS_TIMEOUT)
            if not msg or msg.get("cmd") != "attach":
                raise ConnectionError("the destination hung up before it attached")
            stream, urgent = tcp_accept_channels(ls, key, PAGE_CHANNELS_TIMEOUT, close=False, watch=ctl,
                                                 refusals=refusals, tls=tls)
        except (ConnectionError, OSError) as e:
            warn(f"{e}; waiting for the next one")
            ctl.close()
            continue
        return control, stream, urgent, bool(msg.get("resume"))
