"""What TLS costs a migration between two machines: plain TCP against ``--tls-creds``, same run.

Makes a throw-away CA and certificates (the ``openssl`` command), starts ``postcopy-harness source
--listen 127.0.0.1:0`` and migrates from it with ``run --source``, once without TLS and once with,
alternating which goes first, ``--repeat`` times; prints the medians of the migration's wall time
(go to the last page placed, the report's postcopy duration) and of the throughput, and the ratio
TLS / plain.  Both runs verify every page of RAM.

On loopback the link costs nothing, so what shows is TLS's own price: the encryption and the
relay between the TLS socket and the C lanes (postcopy_core/tls.py); across a real link slower
than that, the difference shrinks.

Reproduce:  python bench/tls_cost.py --ram 256M --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

try:  # the installed package (plain or editable), not this checkout's files by path
    import harness.cli  # noqa: F401
except ImportError as e:
    sys.exit(f"bench/tls_cost.py needs postcopy-harness installed (pip install . or pip install -e .): {e}")

PROG = "tls_cost"
# the installed CLI, whatever the current folder: without the folder on sys.path, a checkout's
# harness/ (whose _uffd a plain install did not build there) is never imported instead
CLI = [sys.executable, "-c", "import sys; del sys.path[0]; from harness.cli import main; sys.exit(main())"]
DAYS = "2"  # the throw-away certificates expire soon after the run


class BenchError(RuntimeError):
    """Bad input or a failed run: one line, exit code 2."""


def _openssl(*args: str, cwd: str) -> None:
    p = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if p.returncode:
        raise BenchError(f"openssl {args[0]}: {(p.stderr.strip().splitlines() or ['failed'])[-1]}")


def make_creds(directory: str | os.PathLike, host: str = "127.0.0.1", ca_name: str = "pch-throwaway-ca") -> Path:
    """A throw-away CA and its server and client certificates in QEMU's tls-creds-x509 layout
    (``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``, ``client-cert.pem``, ``client-key.pem``),
    every file mode 600; the server certificate names ``host``.  Needs the ``openssl`` command."""
    if shutil.which("openssl") is None:
        raise BenchError("making throw-away certificates needs the openssl command")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cwd = str(d)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", DAYS,
             "-subj", f"/CN={ca_name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=cwd)
    san = f"IP:{host}" if re.fullmatch(r"[\d.]+|[0-9a-fA-F:]+", host) else f"DNS:{host}"
    for role, usage, subject_alt in (("server", "serverAuth", f"subjectAltName={san}\n"), ("client", "clientAuth", "")):
        (d / f"{role}.ext").write_text(f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                                       f"extendedKeyUsage={usage}\n{subject_alt}")
        _openssl("req", *ec, "-keyout", f"{role}-key.pem", "-out", f"{role}.csr", "-subj", f"/CN=pch-{role}",
                 cwd=cwd)
        _openssl("x509", "-req", "-in", f"{role}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
                 "-CAcreateserial", "-out", f"{role}-cert.pem", "-days", DAYS, "-extfile", f"{role}.ext", cwd=cwd)
    for junk in ("ca-key.pem", "ca-cert.srl", "server.csr", "client.csr", "server.ext", "client.ext"):
        (d / junk).unlink(missing_ok=True)  # the CA's key goes: nothing more is ever signed with it
    for f in d.iterdir():
        f.chmod(0o600)
    return d


class ListeningSource:
    """A ``postcopy-harness source --listen 127.0.0.1:0`` process and its address."""

    def __init__(self, key: str, *args: str) -> None:
        self.p = subprocess.Popen([*CLI, "source", "--listen", "127.0.0.1:0", "--auth-key-file", key, *args],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line = self.p.stderr.readline()
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if not m:
            self.stop()
            raise BenchError(f"source: {line.strip() or 'exited'}")
        self.where = f"127.0.0.1:{m.group(1)}"

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        if self.p.stderr:
            self.p.stderr.close()


def migrate(args: argparse.Namespace, key: str, creds: str | None, out: Path) -> dict:
    """One migration from a fresh listening source; the run's report figures."""
    tls = ["--tls-creds", creds] if creds else []
    common = ["--ram", args.ram, "--seed", str(args.seed)]
    src = ListeningSource(key, *common, *tls)
    try:
        p = subprocess.run([*CLI, "run", "--source", src.where, "--auth-key-file", key, *tls, *common,
                            "--vcpus", str(args.vcpus), "--workload", "sequential", "--json", str(out)],
                           capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"run --source {'with' if creds else 'without'} TLS: no result within "
                         f"{args.timeout:g} s") from None
    finally:
        src.stop()
    if p.returncode:
        raise BenchError(f"run --source {'with' if creds else 'without'} TLS: "
                         f"{(p.stderr.strip().splitlines() or ['failed'])[-1]}")
    rep = json.loads(out.read_text())
    v = rep["verification"]
    if rep["status"] != "completed" or v["ram-bad-pages"] or v["mismatches"] or v["ram-pages-verified"] == 0:
        raise BenchError(f"the {'TLS' if creds else 'plain'} migration did not complete with good pages")
    seconds = rep["duration-s"]["postcopy"]
    return {"postcopy-s": seconds, "mib-per-s": rep["ram-bytes"] / seconds / 2**20,
            "wall-s": rep["duration-s"]["total"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="tls_cost.py", description=__doc__.split("\n\n")[0],
                                 epilog="Needs the openssl command and userfaultfd (root or "
                                        "vm.unprivileged_userfaultfd=1).")
    ap.add_argument("--ram", default="256M", help="RAM to migrate (default 256M)")
    ap.add_argument("--vcpus", type=int, default=2, help="vCPU workers of the destination (default 2)")
    ap.add_argument("--repeat", type=int, default=3, metavar="N", help="runs of each side; medians (default 3)")
    ap.add_argument("--seed", type=int, default=1, help="RAM content seed (default 1)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per run (default 300)")
    ap.add_argument("--json", metavar="FILE", help="write every run and the medians here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.repeat < 1:
        print(f"{PROG}: --repeat {args.repeat}: at least 1", file=sys.stderr)
        return 2
    runs: dict[str, list[dict]] = {"plain": [], "tls": []}
    try:
        with tempfile.TemporaryDirectory(prefix="pch-tls-") as tmp:
            creds = str(make_creds(Path(tmp) / "creds"))
            key = Path(tmp) / "key"
            key.write_bytes(os.urandom(32).hex().encode())
            key.chmod(0o600)
            for i in range(args.repeat):
                order = ("plain", "tls") if i % 2 == 0 else ("tls", "plain")  # neither always goes first
                for side in order:
                    runs[side].append(migrate(args, str(key), creds if side == "tls" else None,
                                              Path(tmp) / f"{side}-{i}.json"))
                print(f"run {i + 1}/{args.repeat} done", file=sys.stderr)
    except BenchError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    med = {side: {k: statistics.median(r[k] for r in rs) for k in ("postcopy-s", "mib-per-s", "wall-s")}
           for side, rs in runs.items()}
    print(f"migration of {args.ram} from `source --listen` on loopback, {args.vcpus} vCPUs, median of {args.repeat}")
    print(f"{'':8} {'postcopy s':>11} {'MiB/s':>9} {'run wall s':>11}")
    for side in ("plain", "tls"):
        m = med[side]
        print(f"{side:8} {m['postcopy-s']:>11.3f} {m['mib-per-s']:>9.0f} {m['wall-s']:>11.2f}")
    ratio = med["tls"]["postcopy-s"] / med["plain"]["postcopy-s"]
    print(f"TLS / plain postcopy time: {ratio:.2f}x")
    cmd = "python bench/tls_cost.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"reproduce: {cmd}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"runs": runs, "median": med, "ratio": ratio, "reproduce": cmd}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
