"""Run configuration: one dataclass, built from CLI flags, validated with one-line errors."""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import asdict, dataclass, field

from postcopy_core.auth import AuthError, key_from_file
from postcopy_core.content import image_size_check
from postcopy_core.handler import PLACE_COPY, PLACE_MODES, WAKE_POLICIES, WAKE_WAITERS
from postcopy_core.link import Link, parse_link
from postcopy_core.strategies import DEFAULT_PREPAGE_WINDOW, DEFAULT_STRATEGY, STRATEGIES, read_working_set
from vcpu_workers.workloads import WORKLOADS

MAX_VCPUS = 4096  # run and check accept the same range
_SIZE = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


LINK_MODES = ("model", "netns")


def parse_endpoint(text: str, flag: str, need_host: bool = False) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or (unless ``need_host``) ``:PORT`` / ``PORT`` (loopback; port 0 = any)
    -> (host, port)."""
    from postcopy_core.channel import LOOPBACK

    m = re.fullmatch(r"(?:\[([0-9a-fA-F:.]+)\]|([^:\[\]]*)):(\d+)|(\d+)", (text or "").strip())
    if not m:
        raise ValueError(f"{flag} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:7000")
    host = m.group(1) or m.group(2) or ""
    port = int(m.group(3) or m.group(4))
    if not (0 < port if need_host else 0 <= port) or port > 65535:
        raise ValueError(f"{flag} {text!r}: port must be {1 if need_host else 0}..65535")
    if not host:
        if need_host:
            raise ValueError(f"{flag} {text!r}: give the source's host, e.g. 127.0.0.1:{port}")
        host = LOOPBACK
    return host, port


class ConfigError(ValueError):
    """Bad configuration; the CLI prints the message and exits 2."""


class Size(int):
    """A byte count that remembers how it was typed (``100T``), so a message about it can echo the
    input (:func:`typed`); everything else (arithmetic, str, CSV, JSON) sees the plain number."""

    text: str

    def __new__(cls, value: int, text: str) -> Size:
        obj = super().__new__(cls, value)
        obj.text = text
        return obj

    def __reduce__(self) -> tuple:  # copy/deepcopy/pickle keep the text
        return (Size, (int(self), self.text))


def typed(n: int, otherwise: str | None = None) -> str:
    """A size as the user typed it (``100T``); for one given as a number, ``otherwise`` (or the number)."""
    if isinstance(n, Size):
        return n.text
    return str(n) if otherwise is None else otherwise


def size_arg(text: str) -> int:
    """:func:`parse_size` as an argparse ``type``: a bad size is an ArgumentTypeError, whose own
    message argparse prints (one line, see harness/cliparser.py)."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_size(text: str | int) -> int:
    """``256M``, ``1G``, ``4096``, ``512KiB`` -> bytes (a :class:`Size`, printed as typed)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise ConfigError(f"bad size {text!r}: use a number with an optional K/M/G/T suffix, e.g. 256M")
    return Size(int(m.group(1)) * _SIZE[m.group(2)], text.strip())


def image_bytes(path: str) -> int:
    """Size of the raw RAM image ``path`` (what ``--ram`` is when only ``--image`` is given)."""
    from postcopy_core.kernel import PAGE_SIZE

    try:
        return image_size_check(path, PAGE_SIZE) * PAGE_SIZE
    except ValueError as e:
        raise ConfigError(str(e)) from None


@dataclass
class RunConfig:
    """What one run does.  Defaults are the no-argument run: a few vCPUs, a few hundred MiB, random."""

    vcpus: int = 4
    non_vcpu: int = 0  # faulting processes that are not vCPUs (a device model's DMA into guest RAM)
    ram: int = 256 << 20
    backing: str = "shmem"
    workload: str = "random"
    link: str = "unlimited"
    seed: int = 1
    zero_share: float = 0.1
    image: str | None = None
    transport: str = "unix"
    auth_key_file: str | None = None  # TCP: the page channels' key from this file (default: a fresh one)
    tls_creds: str | None = None  # run --source: TLS with the x509 files in this folder (postcopy_core/tls.py)
    link_mode: str = "model"  # model: the source's in-process link model; netns: a namespace + veth shaped by tc
    source: str | None = None  # HOST:PORT of a `postcopy-harness source --listen` to migrate from (no fork)
    write_ratio: float = 0.3  # a guest stores too: every store is checked (vcpu_workers/stores.py)
    wake_policy: str = WAKE_WAITERS
    place: str = PLACE_COPY  # how pages go in: UFFDIO_COPY, or the page cache + UFFDIO_CONTINUE
    pin: bool = False  # as bench/uffd_ref.c -A: handler and source on CPU 0, vCPU workers on CPU 1
    live_engines: bool = False  # feed the engines while the run goes on (costs CPU the run shares)
    background: bool = True  # False: only requested pages move until the workload ends (pure demand paging)
    strategy: str | None = None  # the source policy (postcopy_core/strategies.py); None: preempt, or demand
    prepage_window: int = DEFAULT_PREPAGE_WINDOW  # --strategy prepage: neighbours pushed on each side of a fault
    working_set: str | None = None  # --strategy prefetch: a trace (run --trace) whose faulted pages go first
    timeout: float = 600.0
    precopy: float = 0.0  # seconds of precopy before postcopy (0: none); postcopy_core/precopy.py
    dirty_rate: float = 0.0  # pages per second the guest rewrites during precopy
    # tests only (no flag, not in the report's config): discard ranges the source "forgets", which
    # verification must catch
    precopy_skip_discards: int = field(default=0, repr=False)
    inject: list[str] = field(default_factory=list)  # run --inject KIND@SECONDS[:HOLD][,vcpu=N] (harness/inject.py)
    plant_bug: str | None = None  # run --plant-bug KIND: misbehave on purpose (postcopy_core/plant.py)
    # seconds, or "off"; a vCPU, the source or the handler that does not move this long fails the run
    stall_timeout: float | str = 30.0
    json: str | None = None
    trace: str | None = None
    report: str | None = None  # a folder for report.json, summary.txt, plots and trace.json (harness/report_dir.py)
    link_model: Link = field(default_factory=Link, repr=False)
    injections: list = field(default_factory=list, repr=False)  # --inject, parsed
    working_set_pages: object = field(default=None, repr=False)  # --working-set, read (numpy array of pages)

    def validate(self) -> RunConfig:
        """Check every field (in this order: the first problem is the one said) and fill the parsed
        forms; returns self, or raises ConfigError with one line."""
        self._validate_choices()
        self._validate_channels()
        self._validate_policy()
        self._validate_injections_and_watch()
        self._validate_size()
        self._validate_strategy()
        self._validate_precopy()
        self._validate_plant()
        if self.image is not None:
            size = image_bytes(self.image)
            if size != self.ram:
                raise ConfigError(f"--image {self.image!r} is {size} bytes but --ram is {self.ram} "
                                  "(leave --ram out to take the image's size)")
        self._validate_outputs()
        return self

    def _validate_choices(self) -> None:
        """The counts and the named choices: vCPUs, backing, workload, transport, link mode."""
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise ConfigError(f"--vcpus {self.vcpus}: must be 1..{MAX_VCPUS}")
        if not 0 <= self.non_vcpu <= 4096:
            raise ConfigError(f"--non-vcpu {self.non_vcpu}: must be 0..4096")
        if self.backing not in ("shmem", "hugetlb"):
            raise ConfigError(f"--backing {self.backing!r}: choose shmem or hugetlb")
        if self.workload not in WORKLOADS:
            raise ConfigError(f"--workload {self.workload!r}: choose from {', '.join(WORKLOADS)}")
        if self.transport not in ("unix", "tcp"):
            raise ConfigError(f"--transport {self.transport!r}: choose unix or tcp")
        if self.link_mode not in LINK_MODES:
            raise ConfigError(f"--link-mode {self.link_mode!r}: choose {' or '.join(LINK_MODES)}")
        if self.link_mode == "netns" or self.source is not None:
            self.transport = "tcp"  # both imply TCP page channels (with the HMAC handshake)

    def _validate_channels(self) -> None:
        """--source, --tls-creds, --auth-key-file: the page channels between processes or machines."""
        if self.source is not None:
            self._validate_remote_source()
        if self.tls_creds is not None:
            if self.source is None:
                raise ConfigError("--tls-creds is for --source HOST:PORT (the channels between two machines)")
            from postcopy_core.tls import TlsError, client_context

            try:
                client_context(self.tls_creds)
            except TlsError as e:
                raise ConfigError(str(e)) from None
        if self.auth_key_file is not None:
            if self.transport != "tcp":
                raise ConfigError("--auth-key-file needs --transport tcp")
            try:
                key_from_file(self.auth_key_file)
            except AuthError as e:
                raise ConfigError(str(e)) from None

    def _validate_policy(self) -> None:
        """Wake policy, placement, the content and store shares, the timeout."""
        if self.wake_policy not in WAKE_POLICIES:
            raise ConfigError(f"--wake-policy {self.wake_policy!r}: choose from {', '.join(WAKE_POLICIES)}")
        if self.place not in PLACE_MODES:
            raise ConfigError(f"--place {self.place!r}: choose from {', '.join(PLACE_MODES)}")
        if self.place != PLACE_COPY and self.precopy:
            raise ConfigError(f"--place {self.place} and --precopy: discarded pages would fault as missing, which "
                              "that placement does not serve; use --place copy")
        if not 0 <= self.zero_share <= 1:
            raise ConfigError(f"--zero-share {self.zero_share}: must be between 0 and 1")
        if not 0 <= self.write_ratio <= 1:
            raise ConfigError(f"--write-ratio {self.write_ratio}: must be between 0 and 1")
        if not self.timeout > 0:  # also rejects nan, which would disable the timeout
            raise ConfigError("--timeout must be positive")

    def _validate_injections_and_watch(self) -> None:
        """--inject, --stall-timeout, --seed and --link, parsed."""
        from harness.inject import parse_injection

        self.inject = list(self.inject or [])
        try:
            self.injections = [parse_injection(text, self.vcpus) for text in self.inject]
        except ValueError as e:
            raise ConfigError(str(e)) from None
        st = self.stall_timeout
        if st != "off" and (isinstance(st, bool) or not isinstance(st, int | float) or not math.isfinite(st)
                            or not st > 0):  # inf would turn the watchdog off unsaid: that is "off"
            raise ConfigError(f"--stall-timeout {st}: give a finite number of seconds > 0, or off")
        if self.seed < 0 or self.seed >= 1 << 63:
            raise ConfigError(f"--seed {self.seed}: must be 0 .. 2^63-1")
        try:
            self.link_model = parse_link(self.link)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _validate_size(self) -> None:
        """--ram against the page size, the vCPUs and the 2^32-page limit."""
        if self.ram <= 0 or self.ram % self.page_size:
            raise ConfigError(f"--ram {typed(self.ram)}: must be a positive multiple of the page size {self.page_size}")
        if self.npages < self.vcpus and self.workload in ("sequential", "random", "stride"):
            raise ConfigError(f"--ram gives {self.npages} pages, fewer than --vcpus {self.vcpus}")
        if self.npages >= 1 << 32:
            raise ConfigError(f"--ram {typed(self.ram)}: more than 2^32 pages")

    def _validate_plant(self) -> None:
        """--plant-bug: a known kind, in a run where it can act (else it would prove nothing)."""
        from postcopy_core.plant import PLANTED_BUGS

        if self.plant_bug is None:
            return
        if self.plant_bug not in PLANTED_BUGS:
            raise ConfigError(f"--plant-bug {self.plant_bug!r}: choose from {', '.join(PLANTED_BUGS)}")
        recovers = any(t.strip().startswith(("source-crash", "link-drop")) for t in self.inject)
        can = {"revert-after-write": self.write_ratio > 0,
               "stale-generation": self.precopy > 0 and self.dirty_rate > 0,
               "resend-overwrite": recovers and self.write_ratio > 0}.get(self.plant_bug, True)
        if self.source is not None:
            raise ConfigError("--plant-bug: not with --source (the source is not a process of this run)")
        if not can:
            raise ConfigError(f"--plant-bug {self.plant_bug} needs {PLANTED_BUGS[self.plant_bug].needs}: "
                              "without it the bug cannot act")

    def _validate_outputs(self) -> None:
        """--json, --trace, --report: refused now if they cannot be written, not after the run
        (the API too: ``run(json="/sys/x.json")`` raises before anything starts)."""
        from harness.report_dir import report_dir_problem
        from postcopy_core.outfile import output_problem

        for flag, path, check in (("--json", self.json, output_problem), ("--trace", self.trace, output_problem),
                                  ("--report", self.report, report_dir_problem)):
            problem = check(path)
            if problem:
                raise ConfigError(f"{flag} {path}: {problem}")

    def _validate_remote_source(self) -> None:
        """run --source HOST:PORT: a key file is needed, and nothing that acts on a forked source."""
        try:
            parse_endpoint(self.source, "--source", need_host=True)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.auth_key_file is None:
            raise ConfigError("--source needs --auth-key-file FILE (the key the source was started with)")
        if self.link_mode != "model":
            raise ConfigError("--source and --link-mode netns exclude each other (the netns is for a forked source)")
        if parse_link(self.link) != Link():
            raise ConfigError("--source: the link model runs in the source; give --link to "
                              "`postcopy-harness source`, or shape the real network")
        local = [t for t in self.inject or [] if t.strip().startswith(("source-", "recovery-"))]
        if local:
            raise ConfigError(f"--inject {local[0]}: not with --source (the source is not a process of this run)")

    def _validate_strategy(self) -> None:
        """--strategy and its options; --no-background is --strategy demand."""
        if self.strategy is None:
            self.strategy = "demand" if not self.background else DEFAULT_STRATEGY
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy {self.strategy!r}: choose from {', '.join(STRATEGIES)}")
        if not self.background and self.strategy != "demand":
            raise ConfigError(f"--no-background is --strategy demand; it cannot go with --strategy {self.strategy}")
        self.background = STRATEGIES[self.strategy].background
        if not 1 <= self.prepage_window <= 4096:
            raise ConfigError(f"--prepage-window {self.prepage_window}: must be 1..4096")
        if self.strategy == "prefetch":
            if self.working_set is None:
                raise ConfigError("--strategy prefetch needs --working-set FILE (a trace from an earlier run --trace)")
            try:
                self.working_set_pages = read_working_set(self.working_set, self.page_size, self.npages)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        elif self.working_set is not None:
            raise ConfigError(f"--working-set is for --strategy prefetch, not {self.strategy}")

    def _validate_precopy(self) -> None:
        if not 0 <= self.precopy <= 3600:  # also rejects nan
            raise ConfigError(f"--precopy {self.precopy:g}: must be 0..3600 seconds")
        if not 0 <= self.dirty_rate < float("inf"):
            raise ConfigError(f"--dirty-rate {self.dirty_rate:g}: must be a number of pages per second >= 0")
        if self.dirty_rate and not self.precopy:
            raise ConfigError("--dirty-rate needs --precopy SECONDS (the guest dirties RAM during precopy)")
        if self.dirty_rate and self.image is not None:
            raise ConfigError("--dirty-rate with --image: rewritten pages need generated content (leave out --image)")
        if self.precopy_skip_discards < 0:
            raise ConfigError("precopy_skip_discards must be >= 0")

    @property
    def page_size(self) -> int:
        from postcopy_core.kernel import HUGE_PAGE_SIZE, PAGE_SIZE

        return HUGE_PAGE_SIZE if self.backing == "hugetlb" else PAGE_SIZE

    @property
    def npages(self) -> int:
        return self.ram // self.page_size

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("link_model")
        d.pop("injections")
        d.pop("working_set_pages")
        d.pop("precopy_skip_discards")
        return d
