"""Postcopy recovery, the orchestrator's part: when the destination pauses, a new source.

A mixin of :class:`harness.run.Run` (it uses the run's children, sockets, control lines and
recovery log): the destination says ``paused`` when a page channel ended before every page was in,
this part kills what is left of the old source, starts a replacement on new channels of the run's
transport (or, for ``run --source``, reattaches to the remote address) and hands the destination
its ends in a ``resume`` message; ``resumed`` closes the pause.  RecoveryLog (harness/recovery.py)
counts it all for the report and says when to give up.

A source that makes no progress for ``--stall-timeout`` (stopped, or hung with its sockets open:
harness/stall.py) is treated the same way, beyond what QEMU does: killed (or, a remote one, cut off
by shutting down the page channels), so the destination pauses and a new source resumes it.
"""

from __future__ import annotations

import os
import signal
import socket
import time

from harness.config import parse_endpoint
from harness.recovery import RESTART_LIMIT
from harness.stall import SourceStalled, process_state
from harness.supervise import STARTUP_TIMEOUT, RunFailed, describe_status
from postcopy_core.channel import ControlLine, tcp_accept_channels, tcp_listener, tune
from postcopy_core.source import source_main

REMOTE_RETRY_S = 0.25  # run --source: how often a paused run tries the remote source again


class SourceRestarts:
    """The recovery methods of :class:`harness.run.Run`."""

    def _keep_link(self, ctl: ControlLine, msg: dict) -> None:
        """TCP: the destination's copies of its page channels (``nfds``), for --inject link-drop."""
        fds = ctl.take_fds(int(msg.get("nfds", 0)))
        if fds:
            self._drop_link_copies()
            socks = [socket.socket(fileno=fd) for fd in fds]
            self.socks += socks
            self._link[:] = socks

    def _drop_link_copies(self) -> None:
        for sock in self._link:
            if sock in self.socks:
                self.socks.remove(sock)
            sock.close()
        self._link.clear()

    def _on_paused(self, msg: dict) -> None:
        """The destination is postcopy-paused: replace the source (at once, or after an outage's HOLD)."""
        if int(msg.get("gen", 0)) < self.src_gen:
            return  # about a source already replaced
        self.log.pause(str(msg.get("why", "")), msg.get("placed"))
        pid = self._pid_of("source")
        if pid is not None:
            done = self._workers_ended() >= self.area.nvcpus  # as the caller's loop would (see _serve_until)
            self._check_children(set(self.children.roles) if done else {self.zygote.pid})  # logs a dead source
        if pid is not None and pid in self.children.alive():
            # cut off from its destination (a dropped link), or dying already: it cannot serve any more
            os.kill(pid, signal.SIGKILL)
            self._replaced.add(pid)
        self._forget_source_line()
        down_until = self.injector.down_until if self.injector is not None else 0.0
        self.respawn_at = max(time.monotonic(), down_until)

    def _on_resumed(self, ctl: ControlLine, msg: dict) -> None:
        if int(msg.get("gen", -1)) != self.src_gen:
            return
        self.log.resume()
        self._keep_link(ctl, msg)
        self.stall.reset()

    def _source_stalled(self, stall: SourceStalled) -> None:
        """The source made no progress for the stall timeout: cut it off like a lost one, so the
        destination pauses and :meth:`_on_paused` starts a new one.  A second stall of the same
        source (the destination never paused: the stall was not the source's doing) fails the run."""
        if self._stalled_gen == self.src_gen:  # cut off, yet the destination never paused
            handler = self._pid_of("fault")
            raise RunFailed(f"the fault handler (pid {handler}) did not pause when its source was cut off "
                            f"(state: {process_state(handler) if handler else 'gone'}); before: {self._stall_words}")
        self._stalled_gen, self._stall_words = self.src_gen, str(stall)
        self.log.source_stalled(str(stall))
        pid = stall.pid if stall.pid is not None else self._pid_of("source")
        if pid is not None and self.cfg.source is None and pid in self.children.alive():
            self._stalled[pid] = str(stall)
            os.kill(pid, signal.SIGKILL)  # a stopped process dies of SIGKILL too: its sockets close, EOF
            if self.injector is not None:
                self.injector.replaced(pid)
        # and the destination's ends shut down: a source hung in the kernel (uninterruptible, frozen)
        # dies only later, and a remote one (run --source) is not ours to kill; either way the
        # destination sees its channels end, pauses, and a new source takes over
        for sock in self._link:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.stall.reset()  # the pause follows within moments; until then this is no new stall

    def _source_lost(self, pid: int, status: int) -> None:
        """A source process ended mid-run: not fatal, the destination pauses and a new one starts."""
        if pid in self._stalled:
            self.log.source_lost(f"the source (pid {pid}) {describe_status(status)} (replaced: "
                                 f"{self._stalled.pop(pid)})")
        elif pid in self._replaced:
            self.log.source_lost(f"the source (pid {pid}) {describe_status(status)} (replaced: its destination "
                                 "had paused)")
        else:
            self.log.source_lost(f"the source (pid {pid}) {describe_status(status)}{self.stderr.reason('source')}")
        self.stderr.forget("source")  # its last words are in the log: not a warning after the run

    def _recovery_turn(self) -> None:
        """Start the next source when due; give up on a pause no source ended within the stall timeout."""
        if self.respawn_at is not None and time.monotonic() >= self.respawn_at:
            self.respawn_at = None
            self._replace_source()
        limit = self._stall_timeout()
        if self.log.paused and self.log.paused_for() > limit:
            cause = f" (last: {self.log.last_cause})" if self.log.last_cause else ""
            raise RunFailed(f"the destination stayed postcopy-paused for {limit:g} s: no new source resumed "
                            f"it{cause}")

    def _reattach_remote(self) -> None:
        """run --source: a lost remote source is not ours to restart; wait for ``source --listen`` to
        take connections again at the same address (retried until the pause outlasts --stall-timeout)."""
        host, port = parse_endpoint(self.cfg.source, "--source", need_host=True)
        try:
            ctl = self._remote_source(host, port, self._source_args["key"], resume=True)
        except RunFailed as e:
            self.log.last_cause = str(e)
            self.respawn_at = time.monotonic() + REMOTE_RETRY_S
            return
        self.src_gen += 1
        self.log.restart(None)  # not a process of ours
        self.ctl_src, self.src_stats = ctl, None
        self.ctl_dst.send(cmd="resume", gen=self.src_gen, nfds=0, port=port)

    def _replace_source(self) -> None:
        if self.cfg.source is not None:
            self._reattach_remote()
            return
        if self.log.restarts_in_a_row >= RESTART_LIMIT:
            raise RunFailed(f"the source could not be restarted: {RESTART_LIMIT} new sources in a row were lost "
                            f"before the destination resumed (last: {self.log.last_cause})")
        self.src_gen += 1
        try:
            pid, ctl, resume, socks = self._start_source(self.src_gen)
        except OSError as e:
            raise RunFailed(f"the source could not be restarted: {e}") from None
        self.log.restart(pid)
        self.ctl_src, self.src_stats = ctl, None  # stats an old source sent on its way out do not count
        if self.stall is not None:
            self.stall.services["the source"] = pid
        if self.injector is not None:
            self.injector.source_started(pid)  # --inject recovery-crash kills it right here
        fds = [s.fileno() for s in socks]
        if fds:
            self.ctl_dst.send_fds(fds, cmd="resume", gen=self.src_gen, **resume)
        else:
            self.ctl_dst.send(cmd="resume", gen=self.src_gen, nfds=0, **resume)
        if socks:  # Unix: our copies of the destination's ends are what link-drop shuts down
            self._drop_link_copies()
            self._link[:] = socks

    def _start_source(self, gen: int) -> tuple[int, ControlLine, dict, list[socket.socket]]:
        """Start a replacement source for the paused destination, on new channels of the run's
        transport (Unix socketpairs, or a new TCP listener with the same key).  Returns its pid, its
        control line, what the destination's ``resume`` message needs (the TCP port) and the sockets
        whose fds go with that message (the destination's Unix ends).  The one place a later source
        is made: swap it to wait for an external source instead."""
        cfg, a = self.cfg, self._source_args
        ctl_parent, ctl_child = self._pair()
        gens_fd = self.gens.fd if self.gens is not None else None  # after a precopy: its final content
        if cfg.transport == "tcp":
            if self.netns is not None:  # the replacement lives in the same shaped namespace
                with self.netns.entered():
                    ls = tcp_listener(a["host"])
            else:
                ls = tcp_listener()
            self.socks.append(ls)
            keep, resume, give = {ls.fileno(), ctl_child.fileno()}, {"port": ls.getsockname()[1]}, []

            def body() -> int:
                if self.netns is not None:
                    self.netns.enter()
                stream, urgent = tcp_accept_channels(ls, a["key"], timeout=STARTUP_TIMEOUT)
                return source_main(a["spec"], a["geo"], stream, urgent, a["link"], ControlLine(ctl_child),
                                   a["strategy"], resume=True, gens_fd=gens_fd, plant=cfg.plant_bug)
            mine = [ls]
        else:
            s_src, s_dst = self._pair()
            u_src, u_dst = self._pair()
            keep, resume, give = {s_src.fileno(), u_src.fileno(), ctl_child.fileno()}, {}, [s_dst, u_dst]

            def body() -> int:
                return source_main(a["spec"], a["geo"], tune(s_src), tune(u_src), a["link"],
                                   ControlLine(ctl_child), a["strategy"], resume=True, gens_fd=gens_fd,
                                   plant=cfg.plant_bug)
            mine = [s_src, u_src]
        if gens_fd is not None:
            keep.add(gens_fd)
        w = self.stderr.pipe("source")
        try:
            pid = self.children.spawn("source", keep, body, self._cpus(0), stderr=w)
        finally:
            os.close(w)
        for sock in [*mine, ctl_child]:  # the child's now: EOFs reach the right process
            self.socks.remove(sock)
            sock.close()
        return pid, ControlLine(ctl_parent), resume, give
