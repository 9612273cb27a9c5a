"""One benchmark contender in a process of its own: ``python -m cnn.bench.worker '<json>'``.

The parent (:mod:`cnn.bench.peers`) starts one worker per contender, so that every contender
gets a fresh process with its own environment (the ``MALLOC_*`` check), its own thread pools
(TensorFlow fixes them once per process) and no other framework loaded beside it. A worker
builds the preset's model from seed 0 on the shared synthetic images, trains one warm-up epoch,
then waits for the parent's ``go`` (a line on stdin) before each timed epoch, so that the
parent interleaves the contenders' epochs while every other worker sits idle. It reports one
JSON line per epoch on its protocol stream (the original stdout; anything a library prints goes
to stderr): ``{"event": "epoch", "time": s, "data_time": s, ...}``, or ``{"event": "error"}``.

A contender of several MPI ranks (``"ranks"`` in its job) is started under ``mpiexec``: every
rank runs this worker and trains its shard, rank 0 alone speaks on the protocol stream and
reads the parent's ``go`` (the launcher gives stdin to rank 0 only), and broadcasts it to the
other ranks before each timed epoch.

Every contender trains the same way: the same images and labels, SGD with the preset's learning
rate and momentum, softmax cross-entropy from logits, a shuffled order each epoch, the batch
gathered inside the timed epoch, and the loss and number of correct predictions read back
every step.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

from ..model import build_model
from ..presets import get_preset
from .harness import synthetic_batch

_PROTO = None


def _say(event: dict) -> None:
    _PROTO.write(json.dumps(event) + "\n")
    _PROTO.flush()


#: seconds between two tests of rank 0's ``go`` by the other ranks of an MPI contender
IDLE_POLL = 0.5e-3


def _wait_for_go() -> bool:
    """Block until the parent says ``go`` (True) or ``stop``/closes stdin (False)."""
    line = sys.stdin.readline()
    return line.strip() == "go"


# ---- ours --------------------------------------------------------------------------------------
def _agreed(go: bool) -> bool:
    """Rank 0's ``go`` on every rank of an MPI contender (one ``Bcast``); ``go`` elsewhere."""
    from ..parallel.launch import mpi_job_size
    if mpi_job_size() == 1:
        return go
    import numpy as np
    from mpi4py import MPI
    flag = np.array([go], np.int8)
    # the ranks wait here while the other contenders are timed: a blocking Bcast polls
    # MPICH's progress engine and would take a core from the contender being timed
    request = MPI.COMM_WORLD.Ibcast(flag, root=0)
    while not request.Test():
        time.sleep(IDLE_POLL)
    return bool(flag[0])


def run_ours(job: dict, x, y) -> None:
    from ..parallel.launch import launcher_rank
    from ..train import Callback

    c = job["contender"]
    model = build_model(job["preset"], seed=0)
    opt = get_preset(job["preset"])["optimizer"]
    master = launcher_rank() == 0

    class Gate(Callback):
        def on_epoch_end(self, epoch, logs):
            if master:
                _say({"event": "epoch", "time": logs["time"], "data_time": logs["data_time"],
                      "compute_time": logs["compute_time"],
                      "transfer_time": logs["transfer_time"]})
            if epoch < job["epochs"] and not _agreed(not master or _wait_for_go()):
                return True  # the parent stopped early: end the fit
            return None

    strategy = c.get("strategy", "sequential")
    model.fit(x, y, epochs=job["epochs"], batch_size=job["batch_size"], optimizer=opt,
              backend=c["backend"], strategy=strategy,
              threads=c.get("threads", 1) if strategy not in ("sequential", "mpi") else 1,
              verbose=0, callbacks=[Gate()], seed=1, prefetch=c.get("prefetch", "auto"))


# ---- Keras -------------------------------------------------------------------------------------
def run_keras(job: dict, x, y) -> None:
    from ..reference.keras import compiled_keras_model, epoch_timer, to_keras_images

    model = build_model(job["preset"], seed=0)
    kmodel = compiled_keras_model(model, get_preset(job["preset"])["optimizer"],
                                  job["contender"]["threads"])
    xk = to_keras_images(x)
    # One fit call per epoch, waiting for the parent's go between calls rather than inside a
    # callback: a Keras fit blocked in a callback keeps its tf.data threads live, and they
    # take the cores from the contender being timed. The timer inside fit keeps fit's
    # per-call set-up out of the epoch time.
    timer = epoch_timer()
    for epoch in range(job["epochs"]):
        if epoch and not _wait_for_go():
            return
        kmodel.fit(xk, y, batch_size=job["batch_size"], epochs=1, shuffle=True, verbose=0,
                   callbacks=[timer])
        _say({"event": "epoch", "time": timer.elapsed})


# ---- PyTorch -----------------------------------------------------------------------------------
def run_torch(job: dict, x, y) -> None:
    import torch
    import torch.nn.functional as F

    from ..optim import make_optimizer
    from ..reference.torch import build_torch_model, check_torch_trainable, configure_threads

    threads = job["contender"]["threads"]
    configure_threads(threads, interop_threads=threads)
    torch.manual_seed(1)
    model = build_model(job["preset"], seed=0)
    check_torch_trainable(model, get_preset(job["preset"])["optimizer"])
    net = build_torch_model(model)
    opt = make_optimizer(get_preset(job["preset"])["optimizer"]).config()
    # PyTorch's momentum (v = m v + g; w -= lr v) is ours and Keras's (v = m v - lr g;
    # w += v) for a constant learning rate; its weight decay is the coupled one (a ResNet's)
    sgd = torch.optim.SGD(net.parameters(), lr=opt["lr"], momentum=opt.get("momentum", 0.0),
                          nesterov=opt.get("nesterov", False),
                          weight_decay=opt.get("weight_decay", 0.0))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    n, bs = len(x), job["batch_size"]
    gen = torch.Generator().manual_seed(1)
    for epoch in range(job["epochs"]):
        t = time.perf_counter()
        order = torch.randperm(n, generator=gen)
        loss_sum, correct = 0.0, 0
        for i in range(0, n, bs):
            idx = order[i:i + bs]
            xb, yb = xt[idx], yt[idx]
            sgd.zero_grad(set_to_none=True)
            out = net(xb)
            loss = F.cross_entropy(out, yb)
            loss.backward()
            sgd.step()
            loss_sum += loss.item() * len(idx)
            correct += int((out.argmax(1) == yb).sum())
        _say({"event": "epoch", "time": time.perf_counter() - t})
        if epoch + 1 < job["epochs"] and not _wait_for_go():
            return


RUNNERS = {"ours": run_ours, "keras": run_keras, "torch": run_torch}


def main(argv=None) -> int:
    global _PROTO
    argv = sys.argv[1:] if argv is None else argv
    # the protocol keeps the real stdout (rank 0's, for a contender of several MPI ranks);
    # whatever libraries print goes to stderr
    from ..parallel.launch import launcher_rank
    _PROTO = os.fdopen(os.dup(1), "w") if launcher_rank() == 0 else open(os.devnull, "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        job = json.loads(argv[0])
        x, y = synthetic_batch(job["preset"], job["images"])
        RUNNERS[job["contender"]["kind"]](job, x, y)
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which skips the row
        traceback.print_exc()
        _say({"event": "error", "message": f"{type(err).__name__}: {err}"})
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
