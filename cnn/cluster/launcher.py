"""How commands reach the emulated hosts: three small shell scripts written into the cluster's
state folder, and the ``mpiexec`` options that spread ranks over the hosts.

- ``enter HOST COMMAND [ARG...]`` runs COMMAND on HOST (a host name or address): in the
  host's network namespace (``ip netns exec``), under its own host name (``unshare --uts``),
  with the host's own ``/dev/shm``: the folder ``/dev/shm/pcnn-<id>-h<i>`` bound over it in
  the command's private mount namespace, so that the hosts share no memory segments, as
  machines do not, and ``down`` finds every segment a job left behind. The machine's
  ``/dev/shm`` is bound at ``<folder>/shm-root`` first, where a command on a host (``mpiexec``
  starting ranks on the others) still finds the other hosts' folders.
- ``ssh [OPTIONS] HOST COMMAND...``: the stand-in for ``ssh`` that MPICH's Hydra launcher calls
  (``mpiexec -launcher ssh -launcher-exec <folder>/ssh``): like ssh, it runs the words of
  COMMAND as one shell command line on HOST.
- ``mpiexec [OPTIONS] COMMAND...``: the venv's ``mpiexec`` started on the first host with the
  cluster's hostfile, the ``ssh`` stand-in, the first host's address for the proxies to call
  back, and the data between ranks over TCP on the links (:func:`mpiexec_options`).
"""
from __future__ import annotations

import shlex
from pathlib import Path

ENTER = """#!/bin/sh
# enter HOST COMMAND [ARG...]: run COMMAND on HOST of emulated cluster %(id)s
# (written by `python -m cnn cluster up`; removed by `python -m cnn cluster down`)
if [ $# -lt 2 ]; then echo "usage: $0 HOST COMMAND [ARG...]" >&2; exit 255; fi
host="$1"; shift
case "$host" in
%(cases)s
  *) echo "cluster %(id)s: no host $host (hosts: %(names)s)" >&2; exit 255;;
esac
# the machine's /dev/shm stays reachable at $root from inside a host (where mpiexec calls ssh)
exec ip netns exec "$ns" unshare --uts /bin/sh -c '
  hostname "$1" && { mountpoint -q "$2" || mount --bind /dev/shm "$2"; } &&
  mount --bind "$2/$3" /dev/shm && shift 3 && exec "$@"' enter "$name" %(root)s "$shm" "$@"
"""

SSH = """#!/bin/sh
# ssh stand-in for MPICH's Hydra on emulated cluster %(id)s: ssh [OPTIONS] HOST COMMAND...
while [ "${1#-}" != "$1" ]; do shift; done
host="$1"; shift
exec %(enter)s "$host" /bin/sh -c "$*"
"""

MPIEXEC = """#!/bin/sh
# mpiexec across emulated cluster %(id)s: mpiexec [OPTIONS] COMMAND... (-n N: N ranks)
exec %(command)s "$@"
"""


def enter_script(cluster_id: str, hosts, shm_root: Path) -> str:
    """The ``enter`` script's text for ``hosts`` (:class:`cnn.cluster.emulated.Host`), with
    ``shm_root`` an empty folder to bind the machine's ``/dev/shm`` at."""
    cases = "\n".join(f"  {shlex.quote(h.name)}|{h.address}) ns={shlex.quote(h.namespace)}; "
                      f"name={shlex.quote(h.name)}; shm={shlex.quote(h.shm.name)};;"
                      for h in hosts)
    return ENTER % {"id": cluster_id, "cases": cases, "root": shlex.quote(str(shm_root)),
                    "names": " ".join(h.name for h in hosts)}


def ssh_script(cluster_id: str, enter: Path) -> str:
    return SSH % {"id": cluster_id, "enter": shlex.quote(str(enter))}


def mpiexec_script(cluster_id: str, command: list[str]) -> str:
    """The ``mpiexec`` script's text: ``command`` (:func:`mpiexec_options` on the first host)
    with the script's own arguments after it."""
    return MPIEXEC % {"id": cluster_id, "command": shlex.join(command)}


def hostfile_text(hosts) -> str:
    """MPICH's hostfile: one ``address:1`` per host, so Hydra puts rank ``r`` on host
    ``r % len(hosts)``. Addresses, not names: nothing resolves the hosts' names."""
    return "".join(f"{h.address}:1\n" for h in hosts)


def hydra_environment(ssh: Path, interface: str) -> dict[str, str]:
    """:func:`mpiexec_options` as environment variables, for an ``mpiexec`` that another
    program starts on a host (``train --ranks N --hostfile H``, whose launcher relaunches a
    failed job): Hydra's launcher and its ``ssh`` stand-in, the host's ``interface`` for the
    proxies to call back (instead of ``-localhost``), TCP between every two ranks."""
    return {"HYDRA_LAUNCHER": "ssh", "HYDRA_LAUNCHER_EXEC": str(ssh),
            "HYDRA_IFACE": interface, "UCX_TLS": "tcp,self", "MPIR_CVAR_NOLOCAL": "1"}


def mpiexec_options(hostfile: Path, ssh: Path, first_address: str) -> list[str]:
    """The ``mpiexec`` options for a job across the hosts.

    ``-launcher ssh -launcher-exec <ssh>``: Hydra starts its proxy on each host with the
    stand-in; ``-localhost``: the address they call back (``mpiexec`` runs on the first host).
    The hosts share the kernel, so UCX would rightly pick shared memory between them;
    ``UCX_TLS=tcp,self`` and ``MPIR_CVAR_NOLOCAL=1`` make every rank talk TCP over the links,
    as it must between two machines."""
    return ["-f", str(hostfile), "-launcher", "ssh", "-launcher-exec", str(ssh),
            "-localhost", first_address, "-genv", "UCX_TLS", "tcp,self",
            "-genv", "MPIR_CVAR_NOLOCAL", "1"]
