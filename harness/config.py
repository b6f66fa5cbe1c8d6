"""Run configuration: one dataclass, built from CLI flags, validated with one-line errors."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from postcopy_core.auth import AuthError, key_from_file
from postcopy_core.content import image_size_check
from postcopy_core.handler import PLACE_COPY, PLACE_MODES, WAKE_POLICIES, WAKE_WAITERS
from postcopy_core.link import Link, parse_link
from vcpu_workers.workloads import WORKLOADS

MAX_VCPUS = 4096  # run and check accept the same range
_SIZE = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class ConfigError(ValueError):
    """Bad configuration; the CLI prints the message and exits 2."""


def parse_size(text: str | int) -> int:
    """``256M``, ``1G``, ``4096``, ``512KiB`` -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise ConfigError(f"bad size {text!r}: use a number with an optional K/M/G/T suffix, e.g. 256M")
    return int(m.group(1)) * _SIZE[m.group(2)]


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
    write_ratio: float = 0.0
    wake_policy: str = WAKE_WAITERS
    place: str = PLACE_COPY  # how pages go in: UFFDIO_COPY, or the page cache + UFFDIO_CONTINUE
    pin: bool = False  # like ../shared/bench -A: handler and source on CPU 0, vCPU workers on CPU 1
    live_engines: bool = False  # feed the engines while the run goes on (costs CPU the run shares)
    background: bool = True  # False: only requested pages move until the workload ends (pure demand paging)
    timeout: float = 600.0
    inject: list[str] = field(default_factory=list)  # run --inject KIND@SECONDS[:HOLD][,vcpu=N] (harness/inject.py)
    stall_timeout: float = 30.0  # a vCPU, the source or the handler that does not move this long fails the run
    json: str | None = None
    trace: str | None = None
    report: str | None = None  # a folder for report.json, summary.txt, plots and trace.json (harness/report_dir.py)
    link_model: Link = field(default_factory=Link, repr=False)
    injections: list = field(default_factory=list, repr=False)  # --inject, parsed

    def validate(self) -> RunConfig:
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
        if self.auth_key_file is not None:
            if self.transport != "tcp":
                raise ConfigError("--auth-key-file needs --transport tcp")
            try:
                key_from_file(self.auth_key_file)
            except AuthError as e:
                raise ConfigError(str(e)) from None
        if self.wake_policy not in WAKE_POLICIES:
            raise ConfigError(f"--wake-policy {self.wake_policy!r}: choose from {', '.join(WAKE_POLICIES)}")
        if self.place not in PLACE_MODES:
            raise ConfigError(f"--place {self.place!r}: choose from {', '.join(PLACE_MODES)}")
        if not 0 <= self.zero_share <= 1:
            raise ConfigError(f"--zero-share {self.zero_share}: must be between 0 and 1")
        if not 0 <= self.write_ratio <= 1:
            raise ConfigError(f"--write-ratio {self.write_ratio}: must be between 0 and 1")
        if not self.timeout > 0:  # also rejects nan, which would disable the timeout
            raise ConfigError("--timeout must be positive")
        from harness.inject import parse_injection

        self.inject = list(self.inject or [])
        try:
            self.injections = [parse_injection(text, self.vcpus) for text in self.inject]
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not self.stall_timeout > 0:
            raise ConfigError("--stall-timeout must be positive")
        if self.seed < 0 or self.seed >= 1 << 63:
            raise ConfigError(f"--seed {self.seed}: must be 0 .. 2^63-1")
        try:
            self.link_model = parse_link(self.link)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.ram <= 0 or self.ram % self.page_size:
            raise ConfigError(f"--ram {self.ram}: must be a positive multiple of the page size {self.page_size}")
        if self.npages < self.vcpus and self.workload in ("sequential", "random", "stride"):
            raise ConfigError(f"--ram gives {self.npages} pages, fewer than --vcpus {self.vcpus}")
        if self.npages >= 1 << 32:
            raise ConfigError(f"--ram {self.ram}: more than 2^32 pages")
        if self.image is not None:
            size = image_bytes(self.image)
            if size != self.ram:
                raise ConfigError(f"--image {self.image!r} is {size} bytes but --ram is {self.ram} "
                                  "(leave --ram out to take the image's size)")
        return self

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
        return d
