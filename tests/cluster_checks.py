"""Run on the hosts of an emulated cluster by tests/test_cluster.py (never collected by pytest
itself); each mode prints one JSON line (``recv`` and ``echo`` print ``ready`` first, once
they listen).

``python tests/cluster_checks.py recv ADDRESS PORT NBYTES``: receive NBYTES over TCP; prints
``{"bytes", "seconds"}``, timed from the first byte received to the last.
``python tests/cluster_checks.py send ADDRESS PORT NBYTES``: send NBYTES to a ``recv``.
``python tests/cluster_checks.py echo ADDRESS PORT``: send back every byte received.
``python tests/cluster_checks.py ping ADDRESS PORT COUNT``: COUNT one-byte round trips to an
``echo``; prints ``{"rtt": [seconds, ...]}``.
``python tests/cluster_checks.py allreduce N OUT`` (under ``mpiexec``): every rank ``r``
contributes ``(r + 1) * arange(N)`` (float64) to an in-place ``Allreduce``; rank 0 saves the
result to ``OUT`` (``.npy``) and prints ``{"hosts": [host name of each rank]}``.
"""
from __future__ import annotations

import json
import socket
import sys
import time

CHUNK = 1 << 20


def _listen(address: str, port: int) -> socket.socket:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, port))
    server.listen(1)
    print("ready", flush=True)
    conn, _ = server.accept()
    server.close()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _connect(address: str, port: int) -> socket.socket:
    conn = socket.create_connection((address, port), timeout=30)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def recv(address: str, port: str, nbytes: str) -> dict:
    conn, total, got, first = _listen(address, int(port)), int(nbytes), 0, None
    buf = bytearray(CHUNK)
    while got < total:
        n = conn.recv_into(buf)
        if not n:
            break
        if first is None:
            first = time.perf_counter()
        got += n
    seconds = time.perf_counter() - first
    conn.sendall(b"k")  # the sender ends once all is in
    return {"bytes": got, "seconds": seconds}


def send(address: str, port: str, nbytes: str) -> dict:
    conn, left = _connect(address, int(port)), int(nbytes)
    data = bytes(CHUNK)
    while left > 0:
        conn.sendall(data[:min(left, CHUNK)])
        left -= min(left, CHUNK)
    conn.recv(1)
    return {"sent": int(nbytes)}


def echo(address: str, port: str) -> dict:
    conn, count = _listen(address, int(port)), 0
    while True:
        data = conn.recv(64)
        if not data:
            return {"echoed": count}
        conn.sendall(data)
        count += len(data)


def ping(address: str, port: str, count: str) -> dict:
    conn, rtt = _connect(address, int(port)), []
    for _ in range(int(count)):
        t = time.perf_counter()
        conn.sendall(b"x")
        conn.recv(1)
        rtt.append(time.perf_counter() - t)
    return {"rtt": rtt}


def allreduce(n: str, out: str) -> dict | None:
    import numpy as np
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    data = (comm.Get_rank() + 1) * np.arange(int(n), dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, data)
    hosts = comm.gather(socket.gethostname())
    if comm.Get_rank() == 0:
        np.save(out, data)
        return {"hosts": hosts}
    return None


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    result = {"recv": recv, "send": send, "echo": echo, "ping": ping,
              "allreduce": allreduce}[mode](*args)
    if result is not None:
        print(json.dumps(result), flush=True)
