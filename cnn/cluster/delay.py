"""The delay line: links that hold every frame for a fixed time, for a cluster whose link
profile has a ``delay=`` (:mod:`cnn.cluster.links`).

This kernel cannot delay packets itself (no ``netem``; no ``fq`` or ``etf`` to honour a
departure time set by a BPF program), so each such link is a pair of TAP devices, one the
host's ``eth0``, the other a port of the switch's bridge, and one process per cluster copies
every frame from one device of a pair to the other ``delay`` seconds after it read it. The
devices offload segmentation (``IFF_VNET_HDR``), so a TCP stream crosses in frames of up to
64 KiB, a few thousand per second at 1 Gbit/s, which one Python loop keeps up with. A frame's
virtio header is the same on both devices and is copied with it.

Run as ``python -m cnn.cluster.delay --delay SECONDS NAME_A NAME_B [NAME_A NAME_B ...]`` in
the switch's namespace (the cluster's ``up`` does that): it makes the devices, prints
``ready`` and serves until it is killed (the cluster's ``down``); the devices vanish with it.
Only the standard library: the process stays small.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import fcntl
import os
import select
import struct
import sys
import time

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
#: <linux/prctl.h>: the timer slack lets the kernel wake a sleeper up to 50 us late by default
PR_SET_TIMERSLACK = 29
#: the largest frame a device with segmentation offload hands over, with its virtio header
MAX_FRAME = 65536 + 256


def open_tap(name: str) -> int:
    """A new TAP device ``name`` in this process's network namespace, with segmentation
    offload; its non-blocking file descriptor (the device lives as long as it is open)."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(),
                                               IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    except OSError:
        os.close(fd)
        raise
    os.set_blocking(fd, False)
    return fd


def serve(pairs: list[tuple[int, int]], delay: float) -> None:
    """Copy every frame read from one descriptor of a pair to the other, ``delay`` seconds
    after it was read, in the order read; forever. A frame the kernel refuses (a full queue)
    is dropped, as a wire drops it."""
    peer = {}
    for a, b in pairs:
        peer[a], peer[b] = b, a
    # one delay for every frame: the frames fall due in the order they arrive, so one queue
    queue: collections.deque = collections.deque()
    fds = list(peer)
    while True:
        # select, not poll: its timeout has microseconds, poll's whole milliseconds
        timeout = max(queue[0][0] - time.monotonic(), 0.0) if queue else None
        ready, _, _ = select.select(fds, [], [], timeout)
        for fd in ready:
            while True:
                try:
                    frame = os.read(fd, MAX_FRAME)
                except BlockingIOError:
                    break
                queue.append((time.monotonic() + delay, peer[fd], frame))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, out, frame = queue.popleft()
            try:
                os.write(out, frame)
            except OSError:
                pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnn.cluster.delay", description=__doc__)
    parser.add_argument("--delay", type=float, required=True,
                        help="seconds each frame is held (each way)")
    parser.add_argument("names", nargs="+", help="TAP devices to make, in pairs")
    args = parser.parse_args(argv)
    if len(args.names) % 2 or not 0 <= args.delay <= 1:
        parser.error(f"needs device names in pairs and a delay in [0, 1] s. Received "
                     f"{len(args.names)} names and delay={args.delay}")
    fds = [open_tap(name) for name in args.names]
    try:  # wake on time to the microsecond, not up to 50 us late
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1000, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    print("ready", flush=True)
    # nobody reads on after "ready": later output would block or kill this process
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    serve(list(zip(fds[::2], fds[1::2])), args.delay)
    return 0


if __name__ == "__main__":
    sys.exit(main())
