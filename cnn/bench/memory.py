"""Peak resident memory of a training run (``python -m cnn bench memory``).

Runs ``python -m cnn train`` in a child process (full CIFAR-10, ``cifar_tutorial``, batch 128,
one epoch with evaluation on the test set, by default) and reads the child's peak resident set
size from ``wait4``'s resource usage: what the whole process needed, data included (the float32
training and test images alone are 737 MB), not an estimate.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time


def peak_rss(argv: list[str]) -> tuple[int, float, int]:
    """Run ``python -m cnn <argv>``; returns ``(peak RSS in bytes, seconds, exit status)``."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cnn", *argv], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024, time.perf_counter() - t, proc.returncode


def suite(quick: bool = False, backends=("numpy", "numba"), dataset: str = "cifar10",
          preset: str = "cifar_tutorial", batch_size: int = 128, epochs: int = 1,
          **_ignored) -> list[dict]:
    """One training run per backend, its peak RSS printed. ``quick``: the first 1,024
    training images only (a smoke run). The command's ``repeats``, ``presets`` and
    ``batch_sizes`` do not apply (one run of ``preset`` at ``batch_size`` per backend)."""
    limit = 1024 if quick else None
    rows = []
    print(f"peak resident memory of `python -m cnn train --dataset {dataset} --model {preset} "
          f"--batch-size {batch_size} --epochs {epochs}` (whole process, data included; "
          f"target < 1.5 GiB)")
    for be in backends:
        argv = ["train", "--dataset", dataset, "--model", preset, "--batch-size",
                str(batch_size), "--epochs", str(epochs), "--backend", be, "--quiet"]
        if limit:
            argv += ["--limit", str(limit)]
        rss, secs, rc = peak_rss(argv)
        status = "" if rc == 0 else f"  (exit status {rc})"
        print(f"  {be:<16} peak RSS {rss / 2**30:.2f} GiB ({rss / 2**20:,.0f} MiB) in "
              f"{secs:.0f} s{status}")
        rows.append({"backend": be, "peak_rss_bytes": rss, "seconds": secs, "exit": rc})
    return rows
