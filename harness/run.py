"""One run: set up guest RAM and channels, fork source, handler and vCPU workers, supervise, report.

The orchestrator owns every resource of the run (memfd, named shared memory, sockets, children)
and releases all of them in one place, :meth:`Run.teardown`, whatever ends the run: success, a
dead child, a timeout, Ctrl-C or SIGTERM.

A lost source (killed, its link dropped, or still past --stall-timeout) is survived by postcopy
recovery: the destination pauses and says so, the orchestrator starts a new source
(:meth:`Run._start_source`) and hands the destination its channels, the destination resumes
(harness/recovery.py keeps the count).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import psutil

from harness.accounting import Accounting
from harness.config import RunConfig, parse_endpoint, typed
from harness.cpu_time import CpuWindow
from harness.inject import InjectionFailed, Injector, failure_note
from harness.netns import NetnsError, NetnsLink, sweep_stale_netns
from harness.progress import RunProgress
from harness.recovery import RecoveryLog
from harness.source_restart import SourceRestarts
from harness.stall import SourceStalled, StallWatch, effective_timeout
from harness.supervise import STARTUP_TIMEOUT, Children, ChildStderr, RunFailed, describe_status, reap_workers
from postcopy_core import kernel
from postcopy_core.auth import run_key
from postcopy_core.blocktime import TraceMeta
from postcopy_core.board import AccessBoard
from postcopy_core.channel import (
    CHANNEL_CONTROL,
    CHANNEL_STREAM,
    CHANNEL_URGENT,
    LOOPBACK,
    ControlLine,
    tcp_accept_channels,
    tcp_connect,
    tcp_listener,
    tune,
)
from postcopy_core.content import ContentSpec, image_size_check
from postcopy_core.handler import Port, destination_main, policy_from_env
from postcopy_core.handoff import Expected, HandoffError, collect_uffds, listen_fresh
from postcopy_core.link import Link
from postcopy_core.precopy import GenerationMap
from postcopy_core.probe import available_memory, free_huge_pages, limit_checks, preflight, raise_fd_limit
from postcopy_core.protocol import Geometry
from postcopy_core.ramblock import GuestRam, ReceivedMap, sweep_stale_segments
from postcopy_core.source import source_main
from postcopy_core.strategies import make_strategy
from postcopy_core.tls import client_context
from vcpu_workers import results as R
from vcpu_workers.stores import RamVerdict, StoreLedger, check_ram
from vcpu_workers.worker import WorkerPlan
from vcpu_workers.workloads import accesses_per_vcpu, write_mode
from vcpu_workers.zygote import plan_to_json

ROLE_NAMES = {"fault": "the fault handler", "source": "the source", "zygote": "the vCPU zygote"}
SHUTDOWN_TIMEOUT = 60.0



def _check_limits(cfg: RunConfig, nworkers: int) -> None:
    """The same limits `check --vcpus N` shows, the fd limit raised, and the memory the run needs."""
    for c in limit_checks(nworkers):
        if not c.ok:
            raise RunFailed(f"{nworkers} worker processes exceed the {c.name.split(' for ')[0]}: {c.detail}")
    raise_fd_limit(nworkers)  # the handler holds one uffd per worker
    check_memory(cfg)

class Run(SourceRestarts):
    """A single postcopy run; :meth:`execute` returns the raw material of the report."""

    def __init__(self, cfg: RunConfig, progress: RunProgress | None = None) -> None:
        self.cfg = cfg.validate()
        self.progress = progress  # a live line on a terminal, fed from the supervision loops
        if hasattr(progress, "attach"):
            progress.attach(self)  # the live view (run --live) reads the board, the area, the engines
        self._counted = (0, b"", 0)  # (event chunks counted, partial record, faults) for the progress line
        self.children = Children()
        self.stderr = ChildStderr()
        self.completed = False  # set once the run got its results: then the children's stderr is passed on
        self.fds: list[int] = []
        self.socks: list[socket.socket] = []
        self.ram: GuestRam | None = None
        self.received: ReceivedMap | None = None
        self.area: R.ResultsArea | None = None
        self.board: AccessBoard | None = None
        self.gens: GenerationMap | None = None  # run --precopy: each page's generation (postcopy_core/precopy.py)
        self.ledger: StoreLedger | None = None  # what the vCPUs stored (vcpu_workers/stores.py)
        self.workers_bad: set[int] = set()  # workers that read wrong content or lost a store of their own
        self.accounting: Accounting | None = None
        self._ev_thread: threading.Thread | None = None
        self.stall: StallWatch | None = None
        self.injector: Injector | None = None  # run --inject (harness/inject.py)
        self._link: list[socket.socket] = []
        self.netns: NetnsLink | None = None  # run --link-mode netns: the source's namespace (harness/netns.py)
        self.cpu: CpuWindow | None = None
        self.going = False  # the workload has started: a worker killed from now on is lost, not fatal
        # postcopy recovery (see the top): the current source's control line, which source it is
        # (0: the first), when to start the next one, the stats the services reported
        self.log = RecoveryLog()
        self.ctl_src: ControlLine | None = None
        self.ctl_dst: ControlLine | None = None
        self.src_gen = 0
        self.respawn_at: float | None = None
        self.stream_all = False  # --no-background: the source was told to stream the rest
        self.src_stats: dict | None = None
        self.dst_stats: dict | None = None
        self._source_args: dict = {}  # what _start_source needs: spec, geometry, key (TCP)
        self._replaced: set[int] = set()  # sources we killed because their destination had paused
        self._stalled: dict[int, str] = {}  # sources we killed for --stall-timeout: pid -> the stall's words
        self._stalled_gen: int | None = None  # the source generation last cut off for a stall, and why
        self._stall_words = ""
        self._tls = None  # run --source --tls-creds: the client context of every channel (postcopy_core/tls.py)

    # ------------------------------------------------------------ setup helpers

    def _pair(self) -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socks += [a, b]
        return a, b

    def _spec(self) -> ContentSpec:
        cfg = self.cfg
        if cfg.image:
            pages = image_size_check(cfg.image, cfg.page_size)
            if pages * cfg.page_size != cfg.ram:
                raise RunFailed(f"--image is {pages * cfg.page_size} bytes but --ram is {cfg.ram}")
        return ContentSpec(cfg.page_size, cfg.npages, cfg.seed, round(cfg.zero_share * 1000), cfg.image)

    def _cpus(self, which: int) -> tuple[int, ...]:
        """With --pin: CPU 0 for the handler and source, the next CPU for the workers."""
        if not self.cfg.pin:
            return ()
        cpus = sorted(os.sched_getaffinity(0))
        return (cpus[min(which, len(cpus) - 1)],)

    # ------------------------------------------------------------ the run

    def execute(self) -> dict:
        cfg = self.cfg
        t_begin = time.monotonic()
        started_at = time.time()
        sweep_stale_segments()
        sweep_stale_netns()
        preflight(cfg.backing == "hugetlb", minor=cfg.place == "continue")
        policy = policy_from_env(os.environ.get("PCH_DEST_POLICY"))  # a bad tuning is refused here, in one line
        nworkers = cfg.vcpus + cfg.non_vcpu  # vCPUs, then the non-vCPU processes (their slots follow)
        _check_limits(cfg, nworkers)
        spec = self._spec()
        geo = Geometry(cfg.page_size, cfg.ram)
        hugetlb = cfg.backing == "hugetlb"
        self._make_shared_memory(nworkers, hugetlb)

        ctl_src_parent, ctl_src_child = self._pair()
        ctl_dst_parent, ctl_dst_child = self._pair()
        ev_parent, ev_child = self._pair()
        quit_fd = kernel.eventfd(0)
        self.fds.append(quit_fd)
        handoff, handoff_addr = self._handoff_listener(nworkers)
        start_r, start_w = os.pipe()
        self.fds += [start_r, start_w]

        remote = cfg.source is not None  # run --source HOST:PORT: no source of our own
        strategy = make_strategy(cfg)  # what the source sends next (postcopy_core/strategies.py)
        ch = self._channels(spec, geo, strategy, ctl_src_child)
        self._source_args = dict(spec=spec, geo=geo, key=ch.key, host=ch.host if ch.key else None,
                                 link=ch.src_link if ch.key else cfg.link_model, strategy=strategy)
        if self.gens is not None:
            ch.src_keep.add(self.gens.fd)  # the source writes the generations; the handler keeps the mapping

        dst_keep = {self.ram.fd, quit_fd, ctl_dst_child.fileno(), ev_child.fileno(), handoff.fileno()}
        if cfg.transport == "unix":
            dst_keep |= {ch.s_dst.fileno(), ch.u_dst.fileno()}

        def dest_body() -> int:
            control = ControlLine(ctl_dst_child)
            # only children of the run's zygote may hand in a uffd; the orchestrator names it
            msg = control.recv(STARTUP_TIMEOUT)
            if not msg or msg.get("cmd") != "workers":
                raise HandoffError("the orchestrator did not say which process forks the vCPU workers")
            expect = Expected.for_run(nworkers, cfg.ram, cfg.page_size, self.ram.fd, int(msg["parent"]))
            # workers after the vCPUs are non-vCPU processes: vcpu -1, their pid left unmapped
            ports = [Port(hello.vcpu if hello.vcpu < cfg.vcpus else -1, hello.pid, kernel.Uffd.adopt(fd), hello.base)
                     for hello, fd in collect_uffds(handoff, expect, STARTUP_TIMEOUT)]
            handoff.close()
            stream, urgent = ch.dest_channels()
            ports.sort(key=lambda p: p.vcpu)
            if cfg.transport == "tcp":  # the orchestrator keeps copies of our channels (--inject link-drop)
                control.send_fds([stream.fileno(), urgent.fileno()], event="ready", vcpus=cfg.vcpus)
            else:
                control.send(event="ready", vcpus=cfg.vcpus)
            return destination_main(dict(
                geo=geo, spec=spec, memfd=self.ram.fd, hugetlb=hugetlb, received=self.received, ports=ports,
                stream=stream, urgent=urgent, quit_fd=quit_fd, control=control, events=ev_child,
                wake_policy=cfg.wake_policy, board=self.board, no_progress_s=self._stall_timeout() + 5,
                reconnect=ch.dest_reconnect, share_channels=cfg.transport == "tcp", gens=self.gens,
                place=cfg.place, plant=cfg.plant_bug, policy=policy))

        self._spawn_source_and_handler(ch, dest_body, dst_keep, handoff, remote)

        # the vCPU workers come from a lean zygote (see vcpu_workers/zygote.py)
        plan = WorkerPlan(cfg.vcpus, self.ram.fd, hugetlb, spec, cfg.workload, cfg.write_ratio,
                          handoff_addr, start_r, self.area.fd, self.area.capacity, self.board.fd, self._cpus(1),
                          cfg.non_vcpu, self.gens.fd if self.gens is not None else -1, cfg.place,
                          self.received.fd, self.ledger.fd if self.ledger is not None else -1)
        t_fork = time.monotonic()
        self._spawn_zygote(plan)
        # the parent's copies of the child ends: closed so EOFs reach the right process
        for s in (ctl_src_child, ctl_dst_child, ev_child):
            s.close()
        os.close(start_r)
        self.fds.remove(start_r)

        ctl_src = ch.remote_ctl if remote else ControlLine(ctl_src_parent)
        ctl_dst = ControlLine(ctl_dst_parent)
        self.ctl_src, self.ctl_dst = ctl_src, ctl_dst
        ctl_dst.send(cmd="workers", parent=self.zygote.pid)
        self._expect(ctl_src, "ready", "source", STARTUP_TIMEOUT)
        self._keep_link(ctl_dst, self._expect(ctl_dst, "ready", "fault handler", STARTUP_TIMEOUT))
        self._wait_workers_ready(STARTUP_TIMEOUT)
        startup_s = time.monotonic() - t_fork
        precopy = self._precopy(ctl_src, ctl_dst) if cfg.precopy else None

        # go: every worker starts at EOF of the start pipe; the source starts streaming.  The
        # engines' context starts here, like QEMU's blocktime context at postcopy start.
        t_go = time.monotonic_ns()
        tid_map = {int(pid): v for v, pid in enumerate(self.area.summary["pid"][: cfg.vcpus])}
        meta = TraceMeta(cfg.vcpus, cfg.page_size, tid_map, start_ns=t_go, source="harness",
                         extra={"workload": cfg.workload, "link": cfg.link, "backing": cfg.backing})
        self.accounting = Accounting(meta, live=cfg.live_engines)
        self._start_event_reader(ev_parent)
        self.going = True
        self.cpu = CpuWindow()  # each side's CPU over the workload (harness/cpu_time.py)
        self.cpu.start({"handler" if r == "fault" else r: p for p, r in self.children.roles.items()
                        if r in ("fault", "source")} | {"orchestrator": os.getpid()})
        os.close(start_w)
        self.fds.remove(start_w)
        self.log = RecoveryLog()
        ctl_src.send(cmd="go", background=cfg.background)
        self.stall = self._stall_watch()
        if cfg.injections:
            self.injector = Injector(cfg.injections, self._pid_of, self._link)
            self.injector.t_go = self.log.t_go
        self._supervise_workers([ctl_src, ctl_dst], t_begin + cfg.timeout)
        t_workers_done = time.monotonic_ns()
        self.cpu.stop()
        if not cfg.background:
            self.stream_all = True  # a source started from now on streams at once too
            self._send_source(cmd="stream")

        dst_stats, src_stats = self._final_stats(quit_fd)
        t_done = time.monotonic_ns()
        self._wait_exit(SHUTDOWN_TIMEOUT)
        ram_check = self._check_ram(spec)  # every process is gone: nothing can change RAM any more
        if self._ev_thread:
            self._ev_thread.join(SHUTDOWN_TIMEOUT)
        t_acc = time.thread_time()
        stalls = self.area.stalls(cfg.page_size, cfg.vcpus)
        engines = self.accounting.results(cfg.trace, stalls)
        engines_cpu_s = self.accounting.cpu_s + time.thread_time() - t_acc
        self.completed = True
        # the raw material of --report's plots and trace: kept only when asked for (no cost otherwise)
        material = self.accounting.material(stalls) if cfg.report else None
        return dict(material=material,
            summary=self.area.summary[: cfg.vcpus].copy(),
            latencies=[self.area.latencies(v).copy() for v in range(cfg.vcpus)],
            non_vcpu=self.area.summary[cfg.vcpus :].copy(),
            handler=dst_stats, source=src_stats, engines=engines, engines_live=cfg.live_engines,
            events=self.accounting.events, engines_cpu_s=engines_cpu_s,
            startup_s=startup_s, t_go=t_go, t_workers_done=t_workers_done, t_done=t_done,
            wall_s=time.monotonic() - t_begin, worker_mem=self.worker_mem, started_at=started_at,
            lost=[self._lost_entry(i) for i in sorted(self.workers_lost)], recovery=self.recovery(),
            netns=self.netns.describe() if self.netns is not None else None,
            precopy=precopy, ram_check=ram_check, workers_bad=sorted(self.workers_bad), cpu=self.cpu,
        )

    def _make_shared_memory(self, nworkers: int, hugetlb: bool) -> None:
        """Guest RAM, the received map, the results area, the access board, and (when used) the
        precopy generations and the store ledger."""
        cfg = self.cfg
        try:
            self.ram = GuestRam(cfg.ram, hugetlb=hugetlb)
        except kernel.KernelError as e:
            hint = " (reserve huge pages: echo N > /proc/sys/vm/nr_hugepages)" if hugetlb else ""
            raise RunFailed(f"cannot create guest RAM: {e}{hint}") from None
        self.received = ReceivedMap(cfg.npages)
        self.area = R.ResultsArea(nworkers, accesses_per_vcpu(cfg.workload, cfg.vcpus, cfg.npages))
        self.board = AccessBoard(cfg.vcpus)
        if cfg.precopy:
            self.gens = GenerationMap(cfg.npages)
        if write_mode(cfg.workload, cfg.write_ratio):
            self.ledger = StoreLedger(cfg.npages)

    def _channels(self, spec: ContentSpec, geo: Geometry, strategy, ctl_src_child: socket.socket) -> SimpleNamespace:
        """The page channels, TCP (loopback, a netns veth, or a remote source) or socketpairs: the
        source's body, the destination's channels and how it reconnects, what each child keeps."""
        cfg = self.cfg
        remote = cfg.source is not None  # run --source HOST:PORT: no source of our own
        ch = SimpleNamespace(host=None, src_link=None, remote_ctl=None, ls=None, s_src=None, u_src=None, s_dst=None,
                             u_dst=None)
        if cfg.transport == "tcp":
            key = run_key(cfg.auth_key_file)  # source and destination prove it to each other
            tls = self._tls = client_context(cfg.tls_creds) if cfg.tls_creds else None  # run --source only
            host = LOOPBACK
            src_link = cfg.link_model
            if remote:
                host, port = parse_endpoint(cfg.source, "--source", need_host=True)
                ch.remote_ctl = self._remote_source(host, port, key)
                src_keep = set()
            else:
                if cfg.link_mode == "netns":  # tc shapes the link, so the source models none
                    host, src_link = self._make_netns(), Link()
                    with self.netns.entered():  # the listener belongs to the source's namespace
                        ls = tcp_listener(host)
                else:
                    ls = tcp_listener()
                self.socks.append(ls)
                port = ls.getsockname()[1]
                src_keep = {ls.fileno(), ctl_src_child.fileno()}
                ch.ls = ls

            def source_body() -> int:
                if self.netns is not None:
                    self.netns.enter()  # the source process itself lives in the namespace
                stream, urgent = tcp_accept_channels(ls, key, timeout=STARTUP_TIMEOUT)
                return source_main(spec, geo, stream, urgent, src_link, ControlLine(ctl_src_child), strategy,
                                   plant=cfg.plant_bug)

            def dest_channels() -> tuple[socket.socket, socket.socket]:
                return (tcp_connect(port, CHANNEL_STREAM, key, host, tls=tls),
                        tcp_connect(port, CHANNEL_URGENT, key, host, tls=tls))

            def dest_reconnect(msg: dict, fds: list[int]) -> tuple[socket.socket, socket.socket]:
                return (tcp_connect(int(msg["port"]), CHANNEL_STREAM, key, host, tls=tls),
                        tcp_connect(int(msg["port"]), CHANNEL_URGENT, key, host, tls=tls))

            ch.host, ch.src_link = host, src_link
        else:
            key = None
            s_src, s_dst = self._pair()
            u_src, u_dst = self._pair()
            self._link = [s_dst, u_dst]  # what --inject link-drop shuts down
            src_keep = {s_src.fileno(), u_src.fileno(), ctl_src_child.fileno()}

            def source_body() -> int:
                return source_main(spec, geo, tune(s_src), tune(u_src), cfg.link_model, ControlLine(ctl_src_child),
                                   strategy, plant=cfg.plant_bug)

            def dest_channels() -> tuple[socket.socket, socket.socket]:
                return tune(s_dst), tune(u_dst)

            def dest_reconnect(msg: dict, fds: list[int]) -> tuple[socket.socket, socket.socket]:
                if len(fds) != 2:
                    raise ConnectionError(f"the resume message carried {len(fds)} fds, not 2")
                return tune(socket.socket(fileno=fds[0])), tune(socket.socket(fileno=fds[1]))

            ch.s_src, ch.u_src, ch.s_dst, ch.u_dst = s_src, u_src, s_dst, u_dst
        ch.key, ch.src_keep = key, src_keep
        ch.source_body, ch.dest_channels, ch.dest_reconnect = source_body, dest_channels, dest_reconnect
        return ch

    def _spawn_source_and_handler(self, ch: SimpleNamespace, dest_body, dst_keep: set, handoff, remote: bool) -> None:
        """Fork the source (unless it is remote) and the fault handler; close what only they hold."""
        cfg = self.cfg
        ls, s_src, u_src = ch.ls, ch.s_src, ch.u_src
        source_body, src_keep = ch.source_body, ch.src_keep
        for role, body in (("source", source_body), ("fault", dest_body)):
            if role == "source" and remote:
                continue
            w = self.stderr.pipe(role)
            self.children.spawn(role, src_keep if role == "source" else dst_keep, body, self._cpus(0), stderr=w)
            os.close(w)
            if role == "source" and cfg.transport == "tcp":  # only the source listens: once it has its
                self.socks.remove(ls)                         # channels, connects fail
                ls.close()
            elif role == "source":  # only the source holds its ends, so the destination sees EOF when it dies
                for sock in (s_src, u_src):
                    self.socks.remove(sock)
                    sock.close()
            if role == "fault":  # only the handler listens for hand-offs: once it has them all (and closed
                self.socks.remove(handoff)  # its listener), a stranger's connect is refused, never queued
                handoff.close()

    def _final_stats(self, quit_fd: int) -> tuple[dict, dict]:
        """Tell the handler to finish once every page is in; the handler's and the source's stats."""
        os.eventfd_write(quit_fd, 1)  # the handler finishes once every page is in
        self._serve_until(lambda: self.dst_stats is not None, SHUTDOWN_TIMEOUT, "the fault handler did not report "
                          f"'stats' within {SHUTDOWN_TIMEOUT:.0f} s")
        self._serve_until(lambda: self.src_stats is not None or self.ctl_src is None, SHUTDOWN_TIMEOUT,
                          f"the source did not report 'stats' within {SHUTDOWN_TIMEOUT:.0f} s")
        src_stats = self.src_stats or dict.fromkeys(("cpu_s", "bytes_sent", "requests", "requested_already_sent"), 0)
        return self.dst_stats, src_stats

    def _check_ram(self, spec: ContentSpec) -> RamVerdict:
        """The final check: all of guest RAM against the source image with every page's last store
        applied (vcpu_workers/stores.py), done here, apart from the handler under test."""
        cfg = self.cfg
        mapping = kernel.mmap_fd(self.ram.fd, cfg.ram)
        try:
            pending = [int(p) for p in self.area.summary["pending"] if p]  # stores that lost workers cut short
            return check_ram(mapping.addr, spec, write_mode(cfg.workload, cfg.write_ratio), self.ledger, self.gens,
                             pending=pending)
        finally:
            mapping.close()

    def _handoff_listener(self, nworkers: int):
        """The socket the workers hand their uffds to, and its address: a fresh, unguessable name
        (retried if taken), so no local user can hold it first."""
        try:
            handoff, addr = listen_fresh("uffd", backlog=min(nworkers, 4096))
        except HandoffError as e:
            raise RunFailed(f"the vCPU hand-off socket: {e}") from None
        self.socks.append(handoff)
        return handoff, addr

    def _make_netns(self) -> str:
        """Create this run's namespace and shaped veth pair (removed by teardown); the source's address."""
        self.netns = NetnsLink(self.cfg.link_model)  # recorded first: teardown removes what got made
        try:
            self.netns.create()
        except NetnsError as e:
            raise RunFailed(str(e)) from None
        return self.netns.source_ip

    def _remote_source(self, host: str, port: int, key: bytes, resume: bool = False) -> ControlLine:
        """run --source: open the control channel to ``source --listen`` and check what it serves
        against this run before anything starts; returns the source's control line.  ``resume``: the
        destination is postcopy-paused and this source takes over from its received map."""
        from harness.remote_source import check_hello

        where = f"{host}:{port}"
        try:
            sock = tcp_connect(port, CHANNEL_CONTROL, key, host, tls=self._tls)
        except OSError as e:  # AuthError (wrong key) is an OSError too
            cut = isinstance(e, ConnectionResetError) or "closed the connection" in str(e)
            hint = " (a source started with --tls-creds takes only TLS)" if cut and self._tls is None else ""
            raise RunFailed(f"--source {where}: {e.strerror or e}{hint}") from None
        sock.setblocking(True)
        control = ControlLine(sock)
        # while paused this runs in the supervision loop: wait no longer than the pause may last
        msg = control.recv(min(STARTUP_TIMEOUT, self._stall_timeout()) if resume else STARTUP_TIMEOUT)
        problem = "no hello from the source" if not msg or msg.get("event") != "hello" else check_hello(msg, self.cfg)
        if problem:
            sock.close()  # a paused run retries: each failed attempt gives its socket back
            raise RunFailed(f"--source {where}: {problem}")
        self.socks.append(sock)
        control.send(cmd="attach", resume=resume)
        return control

    def _precopy(self, ctl_src: ControlLine, ctl_dst: ControlLine) -> dict:
        """run --precopy: the source sends RAM while the guest dirties it, then discards and switches;
        the workers wait at the start pipe meanwhile, like vCPUs at a destination during precopy."""
        cfg = self.cfg
        t0 = time.monotonic()
        ctl_src.send(cmd="precopy", seconds=cfg.precopy, dirty_rate=cfg.dirty_rate, gens_fd=self.gens.fd,
                     skip_discards=cfg.precopy_skip_discards)
        stats = self._expect(ctl_src, "precopy-done", "source", cfg.precopy + STARTUP_TIMEOUT)["stats"]
        self._expect(ctl_dst, "postcopy", "fault handler", STARTUP_TIMEOUT)  # the discards are applied there
        return dict(stats, duration_s=time.monotonic() - t0)

    def _inject(self) -> None:
        if self.injector is not None:
            try:
                self.injector.poll()
            except InjectionFailed as e:
                raise RunFailed(str(e)) from None

    def _pid_of(self, target: str | int) -> int | None:
        """The pid of a service ("source", "fault") or of vCPU ``target`` while it runs, else None."""
        if isinstance(target, int):
            ended = target in self.workers_done or target in self.workers_lost
            return None if ended else int(self.area.summary["pid"][target])
        return next((p for p, r in self.children.roles.items() if r == target and p in self.children.alive()), None)

    def recovery(self) -> dict:
        """The report's recovery section: what --inject did, the pauses and resumes."""
        if self.injector is None:
            return {"injected": [], **self.log.summary()}
        self.injector.finish()
        return self.injector.record(self.log)

    def _stall_timeout(self) -> float:
        link = self.cfg.link_model
        page_s = (link.wire_ns(self.cfg.page_size) + link.worst_latency_ns) / 1e9
        return effective_timeout(self.cfg.stall_timeout, page_s)

    def _stall_watch(self) -> StallWatch:
        """Watch the workers, the source and the handler for --stall-timeout (harness/stall.py)."""
        cfg = self.cfg
        roles = {"source": "the source", "fault": "the fault handler"}
        services = {roles[r]: p for p, r in self.children.roles.items() if r in roles}  # the source first
        board, received = self.board, self.received
        return StallWatch(
            self._stall_timeout(), [int(p) for p in self.area.summary["pid"]],
            board=lambda: np.frombuffer(board.mapping.buffer(), np.uint64, count=cfg.vcpus),
            received=lambda: np.frombuffer(received.view, np.uint8),
            events=lambda: len(self.accounting.chunks), services=services,
            ended=lambda: self.workers_done | set(self.workers_lost), worker_name=self._who)

    def _lost_entry(self, index: int) -> dict:
        """workers.lost: which worker (vCPU index, or non-vCPU process), its pid, how it died."""
        entry = dict(self.workers_lost[index])
        if index >= self.cfg.vcpus:
            entry = dict(entry, vcpu=None, non_vcpu=index - self.cfg.vcpus)
        return entry

    def _spawn_zygote(self, plan: WorkerPlan) -> None:
        r, w = os.pipe()
        self.fds.append(r)
        os.set_blocking(r, False)
        self.worker_status = r
        self._status_buf = b""
        self._status_eof = False  # the zygote and every worker are gone: nothing more to watch for
        self.workers_done: set[int] = set()
        self.workers_lost: dict[int, dict] = {}  # index -> what the report's workers.lost says of it
        kernel.become_subreaper()  # workers orphaned by a dying zygote come to us to be reaped
        keep = (plan.memfd, plan.start_fd, plan.results_fd, plan.board_fd, w)
        keep += (plan.received_fd,) if plan.received_fd >= 0 else ()  # not with --handler: no map kept
        keep += (plan.gens_fd,) if plan.gens_fd >= 0 else ()  # run --precopy
        keep += (plan.ledger_fd,) if plan.ledger_fd >= 0 else ()  # stores
        err_w = self.stderr.pipe("zygote")  # the workers' fd 2 too: their lines start "vcpu N: "
        proc = subprocess.Popen(zygote_command(), stdin=subprocess.PIPE, stderr=err_w, pass_fds=keep,
                                close_fds=True)
        os.close(w)
        os.close(err_w)
        self.children.add(proc.pid, "zygote")
        self.zygote = proc
        proc.stdin.write(plan_to_json(plan, w).encode())
        proc.stdin.close()
        proc.returncode = 0  # we reap it ourselves (Children.reap); keep Popen from trying

    def _worker_exits(self) -> None:
        """Read the zygote's reports (``vcpu pid status``); fail the run on any bad exit."""
        try:
            data = os.read(self.worker_status, 65536)
        except BlockingIOError:
            return
        self._status_eof |= not data
        self._status_buf += data
        *lines, self._status_buf = self._status_buf.split(b"\n")
        for line in lines:
            vcpu, pid, status = (int(x) for x in line.split())
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                self.workers_done.add(vcpu)
            elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == 4:
                # it read wrong content or lost a store of its own: the run goes on to its end, so that
                # the final check of RAM classifies every wrong page; the report says failed
                self.workers_done.add(vcpu)
                self.workers_bad.add(vcpu)
            elif self.going and os.WIFSIGNALED(status):
                # killed from outside mid-run (OOM killer, kill -9, --inject worker-crash): a lost
                # vCPU, not a failed run; the handler skips its uffd once a copy or wake says ESRCH
                self.workers_lost[vcpu] = dict(vcpu=vcpu, pid=pid, how=describe_status(status).removeprefix("was "))
                if vcpu < self.cfg.vcpus:
                    self.board.slots[vcpu] = 0  # it touches nothing now: placements stop waking its uffd
                    if not self.area.summary[vcpu]["t_end"]:  # it wrote its times after its finish line
                        self.board.count_lost()
            else:
                why = self.stderr.reason("zygote", f"vcpu {vcpu}")
                raise RunFailed(f"{self._who(vcpu, 'vcpu')} (pid {pid}) {describe_status(status)}{why}")

    def _workers_ended(self) -> int:
        return len(self.workers_done) + len(self.workers_lost)

    def _who(self, index: int, vcpu_word: str = "vCPU") -> str:
        n = self.cfg.vcpus
        return f"{vcpu_word} {index}" if index < n else f"non-vCPU process {index - n}"

    # ------------------------------------------------------------ supervision

    def _check_children(self, expected_exit: set[int] = frozenset()) -> None:
        self.stderr.drain()  # a child blocked on a full stderr pipe would hang the run
        # a death by signal first: a peer's error exit at the same moment (a reset connection) is its consequence
        for pid, role, status in sorted(self.children.reap(), key=lambda c: not os.WIFSIGNALED(c[2])):
            if pid in expected_exit and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                continue
            if role == "source" and self.going:  # postcopy recovery replaces it
                self._source_lost(pid, status)
                continue
            if role == "zygote" and self.workers_done and self._workers_ended() == self.area.nvcpus:
                continue
            why = self.stderr.reason(role)
            raise RunFailed(f"{ROLE_NAMES.get(role, role)} (pid {pid}) {describe_status(status)}{why}")

    def _expect(self, ctl: ControlLine, event: str, who: str, timeout: float, watch: bool = False) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([ctl], [], [], 0.05)
            if r:
                msg = ctl.recv(1.0)
                if msg is None:
                    self._closed(who)
                if msg.get("event") == "error":
                    self._service_error(msg.get("error", f"the {who} failed"), who == "fault handler")
                if msg.get("event") == event:
                    return msg
            self._check_children(set(self.children.roles) if event == "stats" else set())
            self._tick()
            if watch and self.stall is not None:
                self.stall.check()
                self._inject()
        raise RunFailed(f"the {who} did not report {event!r} within {timeout:.0f} s")

    def _service_error(self, error: str, from_handler: bool) -> None:
        """A service reported an error; if another process of the run died meanwhile (the handler
        says "the source closed a page channel" when the source was killed), that death is the cause."""
        reporter = "fault" if from_handler else "source"
        deadline = time.monotonic() + 0.3  # a death is reaped within moments of its EOFs
        while time.monotonic() < deadline:
            self.stderr.drain()
            for pid, role, status in self.children.reap():
                if role != reporter and not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
                    why = self.stderr.reason(role)
                    raise RunFailed(f"{ROLE_NAMES.get(role, role)} (pid {pid}) {describe_status(status)}{why}")
            time.sleep(0.02)
        raise RunFailed(error)

    def _closed(self, who: str) -> None:
        """A control channel hit EOF: its process is dying; wait a moment to say how and why."""
        role = "source" if who == "source" else "fault"
        pid = next((p for p, r in self.children.roles.items() if r == role), None)
        deadline = time.monotonic() + 2.0
        while pid in self.children.alive() and time.monotonic() < deadline:
            self._check_children(set(self.children.roles))  # raises for a bad exit
            time.sleep(0.01)
        self._check_children(set(self.children.roles))
        raise RunFailed(f"the {who} closed its control channel{self.stderr.reason(role)}")

    def _wait_workers_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (self.area.summary["state"] < R.STATE_READY).any():
            self._check_children()
            self._worker_exits()
            if time.monotonic() > deadline:
                raise RunFailed(f"vCPU workers were not ready within {timeout:.0f} s")
            time.sleep(0.005)
        self.worker_mem = self._measure_workers()

    def _measure_workers(self) -> list[int]:
        """USS of each worker before the workload (what one idle vCPU process costs)."""
        return [uss_bytes(int(pid)) for pid in self.area.summary["pid"][: self.cfg.vcpus]]

    def _tick(self) -> None:
        """Feed the progress line: pages placed (received map), faults (the handler's records so far)."""
        if self.progress is None or self.accounting is None or not self.progress.due():
            return
        from harness.accounting import RECORD
        from postcopy_core.handler import EV_FAULT

        done, tail, faults = self._counted
        chunks = self.accounting.chunks[done:]  # the reader thread only appends
        data = tail + b"".join(chunks)
        whole = len(data) - len(data) % RECORD.itemsize
        faults += int(np.count_nonzero(np.frombuffer(data, RECORD, whole // RECORD.itemsize)["kind"] == EV_FAULT))
        self._counted = (done + len(chunks), data[whole:], faults)
        placed = int(np.count_nonzero(np.frombuffer(self.received.view, np.uint8)))  # a temporary view
        self.progress.tick(placed, faults)

    def _supervise_workers(self, ctls: list[ControlLine], deadline: float) -> None:
        while self._workers_ended() < self.area.nvcpus:  # every worker, vCPU or not
            self._tick()
            self._worker_exits()
            self._check_children({self.zygote.pid})
            self._serve_turn()
            if time.monotonic() > deadline:
                raise RunFailed(f"the run did not finish within --timeout {self.cfg.timeout:g} s")

    def _serve_until(self, done, timeout: float, error: str) -> None:
        """After the workload: serve the services (and any recovery) until ``done()``."""
        deadline = time.monotonic() + timeout
        while not done():
            self._check_children(set(self.children.roles))
            self._tick()
            self._serve_turn()
            if time.monotonic() > deadline:
                raise RunFailed(error)

    def _serve_turn(self) -> None:
        """One supervision turn after go: stalls, injections, recovery, the services' messages."""
        self._recovery_turn()
        if not self.log.paused:  # paused, nothing is expected to move: the pause has its own deadline
            try:
                self.stall.check()
            except SourceStalled as e:  # treated like a lost source: replaced (harness/source_restart.py)
                self._source_stalled(e)
        self._inject()
        # the handler exits once it sent its stats: its EOF after that is no news
        lines = [c for c in (self.ctl_src, self.ctl_dst if self.dst_stats is None else None) if c is not None]
        # the workers' pipe only until its EOF: a readable EOF would turn this wait into a busy loop
        # (it did, taking a CPU from the stream and the handler for the rest of the run)
        if not self._status_eof:
            self._worker_exits()
        status = [] if self._status_eof else [self.worker_status]
        r, _, _ = select.select(lines + status, [], [], 0.05)
        for ctl in r:
            if ctl is self.worker_status:
                continue
            while True:  # every message already read, not only the first
                msg = ctl.recv(1.0)
                self._on_message(ctl, msg)
                if msg is None or ctl not in (self.ctl_src, self.ctl_dst) or b"\n" not in ctl.buf:
                    break

    def _on_message(self, ctl: ControlLine, msg: dict | None) -> None:
        """A message from the handler or the current source (after go)."""
        from_handler = ctl is self.ctl_dst
        if msg is None:
            if from_handler:
                self._closed("fault handler")
            self._forget_source_line()  # the source is dying: its death is reaped, the destination pauses
            return
        event = msg.get("event")
        if event == "error":
            self._service_error(msg.get("error", "a service process failed"), from_handler)
        if from_handler:
            if event == "paused":
                self._on_paused(msg)
            elif event == "resumed":
                self._on_resumed(ctl, msg)
            elif event == "stats":
                self.dst_stats = msg["stats"]
        elif event == "ready":  # a replacement source is up: it waits for the received map, then serves
            self._send_source(cmd="go", background=self.cfg.background or self.stream_all)
        elif event == "stats":
            self.src_stats = msg["stats"]

    def _forget_source_line(self) -> None:
        """Close the control line of a source that is gone or being replaced."""
        if self.ctl_src is not None and self.ctl_src.sock in self.socks:
            self.socks.remove(self.ctl_src.sock)
            self.ctl_src.sock.close()
        self.ctl_src = None

    def _send_source(self, **msg) -> None:
        try:
            if self.ctl_src is not None:
                self.ctl_src.send(**msg)
        except OSError:
            self._forget_source_line()  # it died meanwhile: the destination pauses, a new one gets the command

    def _wait_exit(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.children.alive():
            self._check_children(set(self.children.roles))
            if time.monotonic() > deadline:
                raise RunFailed("processes of the run did not exit")
            time.sleep(0.005)

    def _start_event_reader(self, sock: socket.socket) -> None:
        def pump() -> None:
            sock.settimeout(None)
            while True:
                try:
                    chunk = sock.recv(1 << 20)
                except OSError:
                    return
                if not chunk:
                    return
                self.accounting.feed(chunk)

        self._ev_thread = threading.Thread(target=pump, name="pch-events", daemon=True)
        self._ev_thread.start()

    # ------------------------------------------------------------ teardown

    def teardown(self) -> None:
        """Kill and reap every child, close every fd, unlink the shared memory.  Idempotent."""
        self.children.kill_all()
        if self.area is not None:
            reap_workers([int(p) for p in self.area.summary["pid"] if p > 0])
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass
        self.socks.clear()
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()
        if self.netns is not None:  # after the children (the source lives in it) and the sockets
            self.netns.remove()
        if self._ev_thread:
            self._ev_thread.join(5)
        if self.received is not None:
            self.received.close()
            self.received = None
        if self.ram is not None:
            self.ram.close()
            self.ram = None
        if self.area is not None:
            self.area.close()
            self.area = None
        if self.board is not None:
            self.board.close()
            self.board = None
        if self.gens is not None:
            self.gens.close()
            self.gens = None
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
        self.stderr.close(forward=self.completed)
        if self.progress is not None:
            self.progress.close()


def uss_bytes(pid: int) -> int:
    """USS of ``pid`` (its Private_* lines of /proc/PID/smaps_rollup, as psutil sums them), 0 if gone.

    Read directly: psutil's memory_full_info also reads stat and statm, and at 4096 workers the
    extra files cost more than the measurement itself."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            return sum(int(line.split()[1]) for line in f if line.startswith(b"Private_")) * 1024
    except (OSError, ValueError, IndexError):
        try:
            return psutil.Process(pid).memory_full_info().uss
        except (psutil.Error, OSError):
            return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n < 10 << 30 else f"{n / 2**30:,.1f} GiB"


def check_memory(cfg: RunConfig) -> None:
    """Refuse, before anything starts, a --ram this host cannot hold (memory, free huge pages).

    The guest RAM (shmem, or huge pages on hugetlbfs) and the source's copy of it (anonymous
    memory) are both filled during the run; without room the kernel would kill a process midway.
    """
    if cfg.backing == "hugetlb":
        free = free_huge_pages()
        if 0 <= free < cfg.npages:
            ram = typed(cfg.ram, f"{cfg.ram >> 20}M")
            raise RunFailed(f"hugetlbfs needs {cfg.npages} free huge pages for --ram {ram}, "
                            f"{free} are free (reserve: echo N > /proc/sys/vm/nr_hugepages)")
    need = cfg.ram if cfg.backing == "hugetlb" else 2 * cfg.ram
    avail = available_memory()
    if 0 <= avail < need:
        what = "the source's copy of the guest RAM" if cfg.backing == "hugetlb" else "guest RAM and the source's copy"
        raise RunFailed(f"--ram {typed(cfg.ram, _mib(cfg.ram))} needs about {_mib(need)} of memory ({what}), "
                        f"only {_mib(avail)} is available (MemAvailable in /proc/meminfo)")


def zygote_command() -> list[str]:
    """How to start the zygote so that it runs the same code as this process, whatever the cwd.

    ``python -m`` (and ``-c``) put the current folder first on the import path: started from a
    checkout, the workers would import the checkout's files (without its built ``_uffd`` after a
    plain ``pip install .``) instead of the installed ones.  ``-P`` is Python 3.11+ only, and ``-I``
    would also drop PYTHONPATH and the user site a user install needs; so ``-c`` drops that entry ('')
    and puts first the folder our own packages were imported from (site-packages, or the checkout of an
    editable install).
    """
    import vcpu_workers

    root = os.path.dirname(os.path.dirname(os.path.abspath(vcpu_workers.__file__)))
    boot = (f"import sys; sys.path[:] = [{root!r}, *(p for p in sys.path if p)]; "
            "from vcpu_workers.zygote import main; sys.exit(main())")
    return [sys.executable, "-c", boot]


class Terminated(KeyboardInterrupt):
    """SIGTERM during a run: torn down like Ctrl-C, reported as "terminated" (exit 143)."""


def raise_terminated(signum, frame):
    """SIGTERM handler: unwind like Ctrl-C."""
    raise Terminated


def execute(cfg: RunConfig, progress: RunProgress | None = None, run: Run | None = None) -> dict:
    """Run once (``run``: a Run made already, e.g. harness/external.py's) and always tear down;
    SIGTERM is treated like Ctrl-C (as :class:`Terminated`)."""
    run = run if run is not None else Run(cfg, progress)
    in_main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, raise_terminated) if in_main else None
    try:
        return run.execute()
    except RunFailed as e:
        if run.injector is None and not run.log.pauses:
            raise
        rec = run.recovery()  # a failed run's report still says what was injected
        failed = RunFailed(f"{e}{failure_note(rec) if '--inject' not in str(e) else ''}")
        failed.recovery = rec
        raise failed from None
    finally:
        run.teardown()
        if old is not None:
            signal.signal(signal.SIGTERM, old)


RUN_ERRORS = (RunFailed, kernel.KernelError, OSError, ValueError, RuntimeError)  # what ends a run with a line


def outcome(cfg: RunConfig, progress: RunProgress | None = None,
            run: Run | None = None) -> tuple[dict | None, str | None, BaseException | None]:
    """:func:`execute`, a failure turned into (None, its one-line error, the exception): "terminated"
    for SIGTERM, "interrupted" for Ctrl-C, else the message."""
    try:
        return execute(cfg, progress, run), None, None
    except Terminated:
        return None, "terminated", None
    except KeyboardInterrupt:
        return None, "interrupted", None
    except RUN_ERRORS as e:
        return None, str(e), e
