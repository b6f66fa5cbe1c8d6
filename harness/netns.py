"""``run --link-mode netns``: the source in its own network namespace, behind a veth pair shaped by tc.

The orchestrator creates, per run, a namespace ``pch-<pid>-<token>`` and a veth pair whose source
end lives in it (created there in one step, so the pair never exists half-moved), gives both ends
an address in a random /30 of 198.18.0.0/15 (RFC 2544's benchmarking range), and shapes both
directions alike with the parsed ``--link``: ``netem`` (delay, jitter, loss and rate) when the
kernel has sch_netem, else ``tbf`` for a bandwidth-only link.  The page channels are TCP between
the two ends (with the run's HMAC handshake, postcopy_core/auth.py).

:meth:`NetnsLink.remove` deletes the host end (which takes its peer with it) and the namespace;
it is idempotent and runs from ``Run.teardown`` whatever ended the run.  A run whose orchestrator
was SIGKILLed leaves them behind: :func:`sweep_stale_netns` removes those of dead pids, as
``sweep_stale_segments`` does for /dev/shm.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess

from postcopy_core import kernel
from postcopy_core.link import Link

PREFIX = "pch-"
NETNS_DIR = "/run/netns"
_NETNS_RE = re.compile(r"^pch-(\d+)-([0-9a-f]{8})$")
SUBNET = (198 << 24) | (18 << 16)  # 198.18.0.0/15: 2^15 /30 subnets
CMD_TIMEOUT = 20.0


class NetnsError(RuntimeError):
    """The namespace or its shaping cannot be set up; one line for the user."""


def _ip_text(addr: int) -> str:
    return ".".join(str((addr >> s) & 255) for s in (24, 16, 8, 0))


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=CMD_TIMEOUT)
    except FileNotFoundError:
        raise NetnsError(f"{argv[0]} not found (install iproute2: apt-get install iproute2)") from None
    except subprocess.TimeoutExpired:
        raise NetnsError(f"{' '.join(argv)} did not finish within {CMD_TIMEOUT:g} s") from None
    if check and r.returncode:
        why = " ".join((r.stderr or r.stdout).split()) or f"exit status {r.returncode}"
        raise NetnsError(f"{' '.join(argv)}: {why}")
    return r


def tools_missing() -> list[str]:
    """Which of iproute2's ``ip`` and ``tc`` are not on PATH."""
    return [t for t in ("ip", "tc") if shutil.which(t) is None]


def needs_netem(link: Link) -> bool:
    """Latency, jitter and loss need netem; bandwidth alone can go through tbf."""
    return bool(link.latency_ns or link.jitter_ns or link.loss)


def netem_args(link: Link) -> list[str]:
    """``tc qdisc ... netem`` arguments for ``link`` (one direction)."""
    args = ["netem", "limit", "100000"]  # packets; netem's default 1000 drops a fast stream's bursts
    if link.latency_ns or link.jitter_ns:
        args += ["delay", f"{link.latency_ns // 1000}us"]
        if link.jitter_ns:
            args.append(f"{link.jitter_ns // 1000}us")
    if link.loss:
        args += ["loss", "random", f"{link.loss * 100:g}%"]
    if link.bytes_per_s is not None:
        args += ["rate", f"{int(link.bytes_per_s * 8)}bit"]
    return args


def tbf_args(link: Link) -> list[str]:
    """``tc qdisc ... tbf`` arguments for a bandwidth-only ``link``: a small burst (the shaping shows
    on single pages too) and a queue of about 50 ms of traffic (at least 256 KiB)."""
    rate = link.bytes_per_s
    burst = max(16 << 10, int(rate / 1000))  # 1 ms of traffic; tbf needs at least one GSO segment's worth
    limit = max(256 << 10, int(rate * 0.05))
    return ["tbf", "rate", f"{int(rate * 8)}bit", "burst", str(burst), "limit", str(limit)]


class NetnsLink:
    """One run's namespace and veth pair; create with :meth:`create`, remove with :meth:`remove`."""

    def __init__(self, link: Link, pid: int | None = None, token: str | None = None) -> None:
        self.link = link
        self.token = token or secrets.token_hex(4)
        self.name = f"{PREFIX}{pid or os.getpid()}-{self.token}"
        self.host_dev, self.source_dev = f"pch{self.token}h", f"pch{self.token}s"  # <= 15 characters
        self.host_ip = self.source_ip = ""
        self.created = False
        self.qdisc = ""  # what shapes the link: "netem", "tbf" or "" (unshaped)

    def create(self, netem: bool | None = None) -> NetnsLink:
        """Make the namespace and the shaped veth pair (``remove`` undoes whatever got done)."""
        missing = tools_missing()
        if missing:
            raise NetnsError(f"--link-mode netns needs iproute2's {' and '.join(missing)} "
                             "(apt-get install iproute2)")
        if os.geteuid() != 0:
            raise NetnsError(f"--link-mode netns needs root (network namespaces and tc; euid {os.geteuid()})")
        self.created = True  # from here on teardown has something to remove
        _run("ip", "netns", "add", self.name)
        ns = ("ip", "-n", self.name)
        _run(*ns, "link", "set", "lo", "up")
        _run("ip", "link", "add", self.host_dev, "type", "veth", "peer", "name", self.source_dev,
             "netns", self.name)
        base = self._free_subnet()
        self.host_ip, self.source_ip = _ip_text(base + 1), _ip_text(base + 2)
        _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_dev)
        _run(*ns, "addr", "add", f"{self.source_ip}/30", "dev", self.source_dev)
        _run("ip", "link", "set", self.host_dev, "up")
        _run(*ns, "link", "set", self.source_dev, "up")
        self._shape()
        return self

    def _free_subnet(self) -> int:
        """A random /30 of 198.18.0.0/15 that no address on this host is in already."""
        used = _run("ip", "-o", "-4", "addr", "show").stdout
        taken = {m for m in re.findall(r"inet (\d+\.\d+\.\d+\.\d+)", used)}
        for _ in range(64):
            base = SUBNET + 4 * secrets.randbelow(1 << 15)
            if not {_ip_text(base + i) for i in range(4)} & taken:
                return base
        raise NetnsError("no free /30 in 198.18.0.0/15 for the veth pair")

    def _shape(self) -> None:
        link = self.link
        if link.unlimited:
            return
        if needs_netem(link):
            args, self.qdisc = netem_args(link), "netem"
        else:
            args, self.qdisc = tbf_args(link), "tbf"
        for prefix, dev in ((("tc",), self.host_dev), (("tc", "-n", self.name), self.source_dev)):
            try:
                _run(*prefix, "qdisc", "add", "dev", dev, "root", *args)
            except NetnsError as e:
                if "unknown" in str(e).lower() and self.qdisc == "netem":
                    raise NetnsError("--link-mode netns: this kernel has no sch_netem (CONFIG_NET_SCH_NETEM), "
                                     "which the --link latency, jitter and loss need; a bandwidth-only --link "
                                     "(tbf) works, or use --link-mode model") from None
                raise

    def describe(self) -> dict:
        """The report's ``netns`` section: names, addresses and the tc qdisc on each end."""
        return {"name": self.name, "veth": [self.host_dev, self.source_dev],
                "addresses": [self.host_ip, self.source_ip], "qdisc": self.qdisc or "none",
                "tc": netem_args(self.link) if self.qdisc == "netem" else tbf_args(self.link) if self.qdisc else []}

    @contextlib.contextmanager
    def entered(self):
        """The calling thread inside the namespace for the ``with`` block (sockets made there stay there)."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.enter()
            try:
                yield self
            finally:
                kernel.setns_net(home)
        finally:
            os.close(home)

    def enter(self) -> None:
        """Move the calling thread (the source, after fork) into the namespace for good."""
        fd = os.open(f"{NETNS_DIR}/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            kernel.setns_net(fd)
        finally:
            os.close(fd)

    def remove(self) -> None:
        """Delete the veth pair and the namespace, whatever exists of them.  Idempotent, never raises."""
        if not self.created:
            return
        remove_netns(self.name, self.host_dev)
        self.created = False


def remove_netns(name: str, host_dev: str | None = None) -> None:
    """Delete ``host_dev`` (its peer goes with it, at once) and the namespace ``name``; quietly."""
    with contextlib.suppress(NetnsError):
        if host_dev and os.path.exists(f"/sys/class/net/{host_dev}"):
            _run("ip", "link", "del", host_dev, check=False)
        if os.path.exists(f"{NETNS_DIR}/{name}"):
            _run("ip", "netns", "del", name, check=False)


def sweep_stale_netns() -> list[str]:
    """Remove the namespaces (and veth pairs) of runs whose orchestrator is gone; returns their names."""
    swept = []
    try:
        names = os.listdir(NETNS_DIR)
    except OSError:
        return swept
    if tools_missing():
        return swept
    for name in names:
        m = _NETNS_RE.match(name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            remove_netns(name, f"pch{m.group(2)}h")
            swept.append(name)
    return swept


def probe_support() -> dict:
    """What ``--link-mode netns`` can do on this host, tried for real in a throwaway namespace:
    ``{"tools": bool, "netns": bool, "tbf": bool, "netem": bool, "detail": {...}}``."""
    out = {"tools": False, "netns": False, "tbf": False, "netem": False, "detail": {}}
    missing = tools_missing()
    if missing:
        out["detail"]["tools"] = f"missing {' and '.join(missing)} (apt-get install iproute2)"
        return out
    out["tools"] = True
    out["detail"]["tools"] = f"{shutil.which('ip')}, {shutil.which('tc')}"
    probe = NetnsLink(Link(), token=secrets.token_hex(4))
    try:
        probe.create()
        out["netns"] = True
        out["detail"]["netns"] = "namespace + veth pair created and removed"
        for kind, args in (("tbf", tbf_args(Link(bytes_per_s=1e6))), ("netem", netem_args(Link(latency_ns=10**6)))):
            r = _run("tc", "-n", probe.name, "qdisc", "add", "dev", probe.source_dev, "root", *args, check=False)
            out[kind] = r.returncode == 0
            out["detail"][kind] = "works" if out[kind] else " ".join((r.stderr or "failed").split())
            _run("tc", "-n", probe.name, "qdisc", "del", "dev", probe.source_dev, "root", check=False)
    except NetnsError as e:
        out["detail"]["netns"] = str(e)
    finally:
        probe.remove()
    return out


def netns_checks(required: bool = False) -> list:
    """``check``'s rows for ``--link-mode netns`` (required ones with ``check --netns``); netem stays
    optional: without it a bandwidth-only --link still works (tbf)."""
    from postcopy_core.probe import Check

    if os.geteuid() != 0:
        why = f"needs root (euid {os.geteuid()})"
        return [Check("netns: namespace + veth (--link-mode netns)", False, why, required)]
    got = probe_support()
    d = got["detail"]
    rows = [Check("netns: iproute2 (ip, tc)", got["tools"], d.get("tools", ""), required)]
    if not got["tools"]:
        return rows
    rows.append(Check("netns: namespace + veth (--link-mode netns)", got["netns"], d.get("netns", ""), required))
    if got["netns"]:
        rows.append(Check("netns: tc tbf (bandwidth)", got["tbf"], d.get("tbf", ""), required))
        hint = "" if got["netem"] else " (CONFIG_NET_SCH_NETEM: --link latency, jitter, loss need it)"
        rows.append(Check("netns: tc netem (latency, jitter, loss)", got["netem"], d.get("netem", "") + hint, False))
    return rows
