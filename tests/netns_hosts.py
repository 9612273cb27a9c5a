"""Two "hosts" on this machine for the multi-host MPI test: two network namespaces joined by
a veth pair, each with its own address and host name, and an ``ssh`` stand-in for MPICH's
Hydra launcher.

On a real cluster Hydra starts the remote ranks with ``ssh <host> hydra_pmi_proxy ...``; here
:data:`LAUNCHER` is given to ``mpiexec -launcher ssh -launcher-exec`` and does the same with
``ip netns exec <namespace> unshare --uts``, so rank 1 runs in the second namespace under the
host name of its own. ``mpiexec`` itself runs in the first namespace with ``-localhost`` set
to that namespace's address, so the proxies connect back over the link. The ranks' data then
travels over TCP on the veth pair: both namespaces share the kernel and ``/dev/shm``, so UCX
would otherwise (rightly, on one machine) pick shared memory; ``UCX_TLS=tcp,self`` and
``MPIR_CVAR_NOLOCAL=1`` make it use the network, as it must between two machines. The test
checks the bytes on the link.

Needs root (``CAP_NET_ADMIN`` and ``CAP_SYS_ADMIN``), ``ip`` (iproute2) and ``unshare``
(util-linux); :func:`unavailable` says what is missing.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

LAUNCHER = """#!/bin/sh
# ssh stand-in for Hydra: <this> [ssh options] <host> <command...>
while [ "${1#-}" != "$1" ]; do shift; done
host="$1"; shift
case "$host" in
%(cases)s
  *) echo "netns launcher: unknown host $host" >&2; exit 255;;
esac
exec ip netns exec "$ns" unshare --uts /bin/sh -c "hostname $name; $*"
"""


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def unavailable() -> str | None:
    """Why two namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"no {tool} command"
    probe = f"pcnn_probe_{uuid.uuid4().hex[:6]}"
    res = _run("ip", "netns", "add", probe)
    if res.returncode != 0:
        return f"`ip netns add` failed: {res.stderr.strip()}"
    _run("ip", "netns", "del", probe)
    return None


class NetnsHosts:
    """Context manager: namespaces ``pcnn<id>a/b`` with 10.213.<k>.1/.2 on a veth pair."""

    def __init__(self, workdir: Path):
        tag = uuid.uuid4().hex[:6]
        self.workdir = Path(workdir)
        self.namespaces = [f"pcnn{tag}a", f"pcnn{tag}b"]
        self.links = [f"pc{tag}a", f"pc{tag}b"]
        k = int(tag[:2], 16)
        self.addresses = [f"10.213.{k}.1", f"10.213.{k}.2"]
        self.names = [f"cnnhost{tag}a", f"cnnhost{tag}b"]
        self.hostfile = self.workdir / "hosts"
        self.launcher = self.workdir / "netns-ssh"

    def __enter__(self) -> "NetnsHosts":
        try:
            for ns in self.namespaces:
                self._ok("ip", "netns", "add", ns)
            self._ok("ip", "link", "add", self.links[0], "type", "veth", "peer", "name",
                     self.links[1])
            for ns, link, addr in zip(self.namespaces, self.links, self.addresses):
                self._ok("ip", "link", "set", link, "netns", ns)
                self._ok("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", link)
                self._ok("ip", "-n", ns, "link", "set", link, "up")
                self._ok("ip", "-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.hostfile.write_text("".join(f"{a}:1\n" for a in self.addresses))
        cases = "\n".join(f'  {a}) ns={ns}; name={name};;' for a, ns, name in
                          zip(self.addresses, self.namespaces, self.names))
        self.launcher.write_text(LAUNCHER % {"cases": cases})
        self.launcher.chmod(0o755)
        return self

    def __exit__(self, *exc) -> None:
        for ns in self.namespaces:  # deleting a namespace deletes its end of the veth pair
            _run("ip", "netns", "del", ns)

    @staticmethod
    def _ok(*cmd: str) -> None:
        res = _run(*cmd)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")

    def bytes_on_link(self) -> int:
        """Bytes received plus sent on the first host's end of the veth pair."""
        res = _run("ip", "-n", self.namespaces[0], "-s", "link", "show", self.links[0])
        lines = res.stdout.splitlines()
        rx = next(i for i, line in enumerate(lines) if "RX:" in line)
        tx = next(i for i, line in enumerate(lines) if "TX:" in line)
        return int(lines[rx + 1].split()[0]) + int(lines[tx + 1].split()[0])

    def mpiexec_command(self, command: list[str], mpiexec: str, ranks: int) -> list[str]:
        """``command`` on ``ranks`` ranks spread over the two hosts, launched from the first."""
        return ["ip", "netns", "exec", self.namespaces[0], "unshare", "--uts", "/bin/sh", "-c",
                f"hostname {self.names[0]} && exec \"$@\"", "sh",
                mpiexec, "-f", str(self.hostfile), "-launcher", "ssh", "-launcher-exec",
                str(self.launcher), "-localhost", self.addresses[0],
                "-genv", "UCX_TLS", "tcp,self", "-genv", "MPIR_CVAR_NOLOCAL", "1",
                "-n", str(ranks), *command]

    def run(self, command: list[str], mpiexec: str, ranks: int = 2, env=None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.mpiexec_command(command, mpiexec, ranks), capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=self.workdir)
