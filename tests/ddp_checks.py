"""Run by tests/test_torch_reference.py as two processes (never collected by pytest itself):
``python tests/ddp_checks.py RANK INIT_METHOD OUT``: one process of a 2-process
``DistributedDataParallel`` job (gloo) training the PyTorch copy of the blobs network
(float64) with :func:`cnn.reference.torch.fit_torch` (``distributed=True``); rank 0 saves the
trained weights, in our layout, to ``OUT`` (``.npz``)."""
from __future__ import annotations

import os
import sys

import numpy as np
import torch.distributed as dist

# run as a script, so this folder is sys.path[0] and the shared helpers import directly
from parallel_helpers import OPT, blobs, build

from cnn.reference.torch import fit_torch

#: 48 examples in batches of 8: every batch splits 4/4, so DDP's average of the two shards'
#: mean gradients is the gradient of the global mean
N, BATCH = 48, 8


def main(rank: str, init_method: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init_method, rank=int(rank), world_size=2)
    x, y = blobs(N)
    model = build()
    fit_torch(model, x, y, epochs=2, batch_size=BATCH, optimizer=OPT, seed=5, distributed=True)
    # both ranks done before either tears gloo down: a rank that destroys the group while the
    # other still talks to it aborts ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()
    if int(rank) == 0:
        np.savez(out, **model.get_weights())


if __name__ == "__main__":
    main(*sys.argv[1:])
    # leave without the interpreter's finalization: gloo's worker threads can still be
    # destroyed there, unjoined, and abort the process after all its work is done (CI, once in
    # many runs: "terminate called without an active exception"; pytorch/pytorch#179291)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
