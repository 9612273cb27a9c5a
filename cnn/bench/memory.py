"""Peak resident memory of a training run (``python -m cnn bench memory``).

Runs ``python -m cnn train`` in a child process (full CIFAR-10, ``cifar_tutorial``, batch 128,
one epoch with evaluation on the test set, by default; ``--presets cifar_resnet20`` and
``--batch-sizes`` choose others) and reads the child's peak resident set
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


def suite(quick: bool = False, presets=None, batch_sizes=None, backends=("numpy", "numba"),
          dataset: str = "cifar10", epochs: int = 1, **_ignored) -> list[dict]:
    """Peak RSS of ``python -m cnn train`` for each preset (``--presets``, default
    ``cifar_tutorial``; e.g. ``cifar_resnet20``), batch size (``--batch-sizes``, default 128)
    and backend; one row each. ``quick``: the first 1,024 training images only (a smoke run).
    The command's ``repeats`` does not apply (one run per row)."""
    limit = 1024 if quick else None
    presets = presets or ("cifar_tutorial",)
    batch_sizes = batch_sizes or (128,)
    rows = []
    for preset in presets:
        for batch_size in batch_sizes:
            print(f"peak resident memory of `python -m cnn train --dataset {dataset} --model "
                  f"{preset} --batch-size {batch_size} --epochs {epochs}` (whole process, data "
                  f"included)")
            for be in backends:
                argv = ["train", "--dataset", dataset, "--model", preset, "--batch-size",
                        str(batch_size), "--epochs", str(epochs), "--backend", be, "--quiet"]
                if limit:
                    argv += ["--limit", str(limit)]
                rss, secs, rc = peak_rss(argv)
                status = "" if rc == 0 else f"  (exit status {rc})"
                print(f"  {be:<16} peak RSS {rss / 2**30:.2f} GiB ({rss / 2**20:,.0f} MiB) in "
                      f"{secs:.0f} s{status}")
                rows.append({"preset": preset, "batch_size": batch_size, "backend": be,
                             "peak_rss_bytes": rss, "seconds": secs, "exit": rc})
    return rows
