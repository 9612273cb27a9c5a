"""An emulated cluster on one machine: 2 to 8 hosts made of network namespaces on a bridge,
each with its own address, host name and /dev/shm, every link shaped to a named profile
(``1gbe``, ``10gbe``, ``rate=2.5gbit``, ``1gbe,delay=100us``), with a hostfile and an ``ssh``
stand-in so that MPICH's ``mpiexec`` spreads ranks over the hosts as over machines.

Usage::

    python -m cnn cluster up --hosts 4 --link 1gbe      # state in /run/parallel-cnn/cluster
    /run/parallel-cnn/cluster/mpiexec -n 4 python -m cnn train --strategy mpi
    python -m cnn cluster status
    python -m cnn cluster down                          # also after a crash of `up`

    from cnn.cluster import EmulatedCluster
    with EmulatedCluster(hosts=2, link="1gbe", state_dir=tmp) as cluster:
        before = cluster.counters()
        cluster.run_mpiexec(["python", "-m", "cnn", "train", "--strategy", "mpi"], ranks=2)
        moved = cluster.counters()["node0"] - before["node0"]

Needs root (``CAP_NET_ADMIN``, ``CAP_SYS_ADMIN``), ``ip`` and ``tc`` (iproute2), ``unshare``
and ``mount`` (util-linux); :func:`unavailable` says what is missing. The package, by concern:

- :mod:`cnn.cluster.links`: link profiles (rate, delay) and the ``tc`` shaping;
- :mod:`cnn.cluster.emulated`: the hosts, the switch, the state file, up and down, counters;
- :mod:`cnn.cluster.launcher`: the ``enter``, ``ssh`` and ``mpiexec`` scripts, the hostfile;
- :mod:`cnn.cluster.delay`: the user-space delay line behind a ``delay=`` link;
- :mod:`cnn.cluster.cli`: the ``cluster`` command.
"""
from __future__ import annotations

from .emulated import (MAX_HOSTS, MIN_HOSTS, STATE_DIR, EmulatedCluster, Host, LinkCounters,
                       down, unavailable)
from .links import PROFILES, LinkProfile

__all__ = ["EmulatedCluster", "Host", "LinkCounters", "LinkProfile", "MAX_HOSTS", "MIN_HOSTS",
           "PROFILES", "STATE_DIR", "down", "unavailable"]
