"""One training run of tests/test_backup.py, in a process of its own so that the test can kill
it with SIGKILL (never collected by pytest itself; under ``mpiexec`` for the MPI strategies).

``python tests/resume_checks.py OUT BACKUP_DIR STRATEGY THREADS DTYPE [--die-in-write K]``
trains :data:`RUN` (batch norm, dropout, penalties, Adam on a warm-up and cosine schedule,
early stopping and reduce-on-plateau-free validation: everything a resume must restore) with
backups every :data:`EVERY` into ``BACKUP_DIR``, continuing from the newest backup there if any,
and writes ``OUT.npz`` (the final weights) and ``OUT.json`` (history and info) from the master.
While it trains, each step and each epoch is appended to ``OUT.steps`` with the process id,
then the run pauses :data:`PAUSE` seconds, so that the test can kill it where it chooses.
``--die-in-write K``: the process kills itself (SIGKILL) in the middle of writing its K-th
backup, half of the file written.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np

# run as a script, so this folder is sys.path[0] and the shared helpers import directly
from parallel_helpers import blobs, build

from cnn import backup as backup_module
from cnn.callbacks import Callback, EarlyStopping
from cnn.parallel.launch import launcher_rank

#: what fit is given (the test trains the uninterrupted reference with the same)
RUN = {"epochs": 3, "batch_size": 7, "seed": 5, "validation_split": 0.2,
       "optimizer": {"type": "adam", "lr": 0.01,
                     "schedule": {"type": "cosine", "warmup_steps": 4}}}
EVERY = "4steps"
PAUSE = 0.05
N = 50


def data(dtype):
    return blobs(N, np.dtype(dtype))


def callbacks() -> list:
    return [EarlyStopping(patience=5, restore_best_weights=True)]


class Steps(Callback):
    """The master appends ``step <global step> <pid>`` after each step and ``epoch <epoch>
    <pid>`` after each epoch to a file, then pauses: the test's clock for its kill."""

    def __init__(self, path):
        self.path = path

    def _say(self, what: str, number: int) -> None:
        if self.run.is_master:
            with open(self.path, "a") as f:
                f.write(f"{what} {number} {os.getpid()}\n")
            time.sleep(PAUSE)

    def on_step_end(self, step, logs):
        self._say("step", logs["global_step"])

    def on_epoch_end(self, epoch, logs):
        self._say("epoch", epoch)


def die_in_write(k: int) -> None:
    """Kill this process in the middle of its ``k``-th backup write."""
    original = backup_module.atomic_write
    count = [0]

    def atomic_write(path, content):
        count[0] += 1
        if count[0] != k:
            return original(path, content)

        class Dying:
            def __init__(self, f):
                self.f, self.written = f, 0

            def write(self, data):
                self.f.write(data)
                self.written += len(data)
                if self.written > 2000:
                    self.f.flush()
                    os.fsync(self.f.fileno())
                    os.kill(os.getpid(), signal.SIGKILL)
                return len(data)

            def __getattr__(self, name):
                return getattr(self.f, name)
        return original(path, lambda f: content(Dying(f)))
    backup_module.atomic_write = atomic_write


def main(out: str, backup_dir: str, strategy: str, threads: str, dtype: str, *rest) -> int:
    if rest[:1] == ("--die-in-write",):
        die_in_write(int(rest[1]))
    x, y = data(dtype)
    model = build("layers", np.dtype(dtype))
    hist = model.fit(x, y, strategy=strategy, threads=int(threads), verbose=0,
                     callbacks=callbacks() + [Steps(out + ".steps")], backup_dir=backup_dir,
                     backup_every=EVERY, **RUN)
    if launcher_rank() == 0:
        np.savez(out + ".npz", **model.get_weights())
        with open(out + ".json", "w") as f:
            json.dump({"history": hist.history, "info": hist.info}, f, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
