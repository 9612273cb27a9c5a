"""The PyTorch reference: our spec built in ``torch.nn`` with our weights
(:func:`build_torch_model`), the trained weights back in our layout
(:func:`get_torch_weights`), and :func:`fit_torch`, which trains the PyTorch copy the way
:func:`cnn.train.fit` trains ours. PyTorch is optional (``requirements-bench.txt``): the study's
``torch`` paths and the benchmarks' PyTorch contenders use this module where it is installed,
and it imports PyTorch on first use.

Layouts: images and conv kernels ``(F, C, KH, KW)`` are channels-first in both, so a flatten
keeps its order; a dense layer's ``w (D, units)`` is ``Linear.weight.T``. ``padding="same"`` is
our layer's own split (TensorFlow's: the odd pixel bottom/right, at any stride): the
convolution's own padding where the split is symmetric, a ``ZeroPad2d`` before it where it is
not. (PyTorch's ``padding="same"`` splits alike at stride 1 but refuses a stride > 1.)

:func:`fit_torch` uses the same epoch orders (``numpy.random.default_rng(seed)``), SGD with the
same momentum (PyTorch's ``v = m v + g; w -= lr v`` is ours, ``v' = m v' - lr g; w += v'``,
with ``v' = -lr v`` for a constant learning rate) and the same History columns, and copies the
trained weights back. On the CPU it runs ``threads`` intra-op threads (one inter-op thread);
with ``device="cuda"`` the parameters stay on the GPU and only batches go in.
"""
from __future__ import annotations

import time

import numpy as np


def configure_threads(threads: int, interop_threads: int = 1) -> None:
    """PyTorch's CPU thread pools: ``threads`` intra-op threads, and ``interop_threads``
    inter-op threads unless this process has fixed them already (PyTorch takes that setting
    once, before its first inter-op work; a later call leaves it as it is)."""
    import torch
    torch.set_num_threads(int(threads))
    try:
        torch.set_num_interop_threads(int(interop_threads))
    except RuntimeError:  # already fixed in this process
        pass


def build_torch_model(model, device: str = "cpu"):
    """``torch.nn.Sequential`` equal to ``model``: the same architecture and current weights,
    in the model's dtype, on ``device``. Raises ``NotImplementedError`` naming a layer (or a
    weight penalty) it has no counterpart for."""
    import torch
    from torch import nn

    dtype = {np.dtype("float32"): torch.float32, np.dtype("float64"): torch.float64}[
        np.dtype(model.dtype)]
    mods = []
    for layer in model.layers:
        kind = layer.type
        p = {n: model.params[f"{layer.name}.{n}"] for n in layer.param_names}
        if kind == "conv2d":
            (top, bottom), (left, right) = layer.pads
            padding = (top, left)
            if (top, left) != (bottom, right):  # the odd pixel bottom/right: pad explicitly
                mods.append(nn.ZeroPad2d((left, right, top, bottom)))
                padding = 0
            conv = nn.Conv2d(layer.input_shape[0], layer.filters, layer.kernel_size,
                             stride=layer.stride, padding=padding).to(dtype=dtype)
            with torch.no_grad():
                conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(p["w"])))
                conv.bias.copy_(torch.from_numpy(p["b"]))
            mods.append(conv)
        elif kind == "maxpool2d":
            mods.append(nn.MaxPool2d(layer.pool_size, stride=layer.stride))
        elif kind == "relu":
            mods.append(nn.ReLU())
        elif kind == "sigmoid":
            mods.append(nn.Sigmoid())
        elif kind == "tanh":
            mods.append(nn.Tanh())
        elif kind == "flatten":
            mods.append(nn.Flatten())
        elif kind == "dense":
            lin = nn.Linear(layer.input_shape[0], layer.units).to(dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(p["w"].T)))
                lin.bias.copy_(torch.from_numpy(p["b"]))
            mods.append(lin)
        else:  # dropout, batch norm: not mirrored (the presets have none)
            raise NotImplementedError(f"the PyTorch reference has no {kind!r} layer "
                                      f"(layer {layer.name!r})")
        if getattr(layer, "penalties", None) and list(layer.penalties()):
            raise NotImplementedError(f"the PyTorch reference has no weight penalties "
                                      f"(layer {layer.name!r})")
    return nn.Sequential(*mods).to(device=device, dtype=dtype)


def get_torch_weights(tmodel, model) -> dict[str, np.ndarray]:
    """The weights of ``tmodel`` (built by :func:`build_torch_model` from ``model``) in our
    layout and keys, on the host (load them with ``model.set_weights``)."""
    import torch
    mods = [m for m in tmodel if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    layers = [layer for layer in model.layers if layer.type in ("conv2d", "dense")]
    weights = {}
    for m, layer in zip(mods, layers):
        w = m.weight.detach().cpu().numpy()
        weights[f"{layer.name}.w"] = w.T.copy() if layer.type == "dense" else w.copy()
        weights[f"{layer.name}.b"] = m.bias.detach().cpu().numpy().copy()
    return weights


def fit_torch(model, x, y, *, epochs: int = 1, batch_size: int = 32, optimizer=None,
              seed: int = 0, validation_data: tuple | None = None, threads: int = 1,
              device: str = "cpu", verbose: int = 0, callbacks=(), distributed: bool = False,
              bucket_cap_mb: float = 25.0):
    """Train the PyTorch copy of ``model``; same arguments and History columns as
    :func:`cnn.train.fit` (``compile_time`` 0: nothing is compiled), and the same step hook
    (``Callback.on_step_end``; its ``params`` are the torch tensors). The trained weights are
    copied back into ``model`` (also when training is interrupted).

    ``distributed``: one process of a data-parallel job, PyTorch's
    ``DistributedDataParallel`` over the default process group (the caller's
    ``torch.distributed.init_process_group``; gloo on the CPU) with ``bucket_cap_mb``: every
    process draws the same order from ``seed`` and takes its shard of each global batch of
    ``batch_size`` (contiguous, sizes differing by at most one: our ``mpi`` strategy's split,
    as ``DistributedSampler`` does); DDP averages the shards' gradients while backward runs,
    which is the gradient of the global mean loss where the shards are equal. ``time`` and
    ``images_per_sec`` count the global batches; ``loss`` and ``accuracy`` this process's
    shards."""
    import torch

    from ..callbacks import Callback
    from ..checks import check_int
    from ..optim import make_optimizer
    from ..parallel.sync import shard_bounds, worker_rows
    from ..train import History

    epochs = check_int(None, "epochs", epochs)
    batch_size = check_int(None, "batch_size", batch_size)
    model.check_inputs(x, y)
    opt_cfg = make_optimizer(optimizer).config()
    if opt_cfg.get("type", "sgd") != "sgd":
        raise NotImplementedError(f"the PyTorch reference trains with SGD only; received "
                                  f"optimizer={opt_cfg}")
    if device == "cpu":
        configure_threads(threads)
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    tmodel = build_torch_model(model, device=dev)
    net, rank, workers = tmodel, 0, 1
    if distributed:
        import torch.distributed as dist
        rank, workers = dist.get_rank(), dist.get_world_size()
        net = torch.nn.parallel.DistributedDataParallel(tmodel, bucket_cap_mb=bucket_cap_mb)
    opt = torch.optim.SGD(tmodel.parameters(), lr=opt_cfg["lr"],
                          momentum=opt_cfg.get("momentum", 0.0))
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(seed)
    n = len(x)
    history = History(info={"backend": f"torch-{dev.type}", "strategy": "torch",
                            "threads": threads, "batch_size": batch_size, "epochs": epochs,
                            "seed": seed, "optimizer": opt_cfg, "train_examples": n,
                            "dtype": str(model.dtype), "compile_time": 0.0,
                            "torch_version": torch.__version__})
    yt = np.asarray(y, dtype=np.int64)
    hooks = [cb for cb in callbacks if type(cb).on_step_end is not Callback.on_step_end]

    def evaluate(xv, yv):
        loss, acc = _evaluate(tmodel, xv, yv, dev, loss_fn)
        return {"loss": loss, "accuracy": acc}

    step = examples = 0
    elapsed, stop = 0.0, False
    try:
        for epoch in range(1, epochs + 1):
            data_t = transfer_t = compute_t = callback_t = 0.0
            loss_sum, correct, done, own = 0.0, 0, 0, 0
            start = time.perf_counter()
            order = rng.permutation(n)
            data_t += time.perf_counter() - start
            tmodel.train()
            for i in range(0, n, batch_size):
                t = time.perf_counter()
                idx = order[i:i + batch_size]
                size, weight = len(idx), 1.0
                if distributed:  # this process's shard alone; an empty one: a pass on one
                    # example with no weight, so that this process still joins the allreduce
                    first, end = shard_bounds(size, workers)[rank]
                    weight = 1.0 if end > first else 0.0
                    lo, hi = worker_rows(size, workers, rank)
                    idx = idx[lo:hi]
                xb, yb = np.ascontiguousarray(x[idx]), yt[idx]
                t2 = time.perf_counter()
                xb_t = torch.from_numpy(xb).to(dev)
                yb_t = torch.from_numpy(yb).to(dev)
                sync()
                t3 = time.perf_counter()
                opt.zero_grad(set_to_none=False)
                logits = net(xb_t)
                loss = loss_fn(logits, yb_t)
                (loss * weight if weight != 1.0 else loss).backward()
                opt.step()
                loss_v = float(loss.item())  # reads back: the step is complete
                correct += int((logits.argmax(1) == yb_t).sum().item()) if weight else 0
                t4 = time.perf_counter()
                data_t += t2 - t
                transfer_t += t3 - t2
                compute_t += t4 - t3
                loss_sum += loss_v * len(idx) * weight
                own += len(idx) if weight else 0
                done += size
                if hooks:
                    step += 1
                    examples += size
                    t5 = time.perf_counter()
                    slog = {"epoch": epoch, "step": step, "examples": examples,
                            "elapsed": elapsed + t5 - start - callback_t, "loss": loss_v,
                            "params": lambda: dict(tmodel.named_parameters()),
                            "evaluate": evaluate}
                    stop = any([cb.on_step_end(step, slog) for cb in hooks])
                    callback_t += time.perf_counter() - t5
                    if stop:
                        break
            wall = time.perf_counter() - start - callback_t
            elapsed += wall
            own = max(own, 1)  # a process that had no shard at all
            logs = {"epoch": epoch, "loss": loss_sum / own, "accuracy": correct / own,
                    "time": wall, "compute_time": compute_t, "data_time": data_t,
                    "transfer_time": transfer_t, "images_per_sec": done / wall}
            if hooks:
                logs["callback_time"], logs["examples"] = callback_t, done
            if validation_data is not None:
                t = time.perf_counter()
                logs["val_loss"], logs["val_accuracy"] = _evaluate(tmodel, *validation_data,
                                                                   dev, loss_fn)
                logs["eval_time"] = time.perf_counter() - t
            history.append(logs)
            if verbose:
                print(history.epoch_line(epochs), flush=True)
            if stop:
                break
    finally:
        model.set_weights(get_torch_weights(tmodel, model))
    return history


def _evaluate(tmodel, xv, yv, dev, loss_fn, batch_size: int = 256):
    import torch
    tmodel.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(xv), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(xv[i:i + batch_size])).to(dev)
            yb = torch.from_numpy(np.asarray(yv[i:i + batch_size], dtype=np.int64)).to(dev)
            logits = tmodel(xb)
            loss_sum += float(loss_fn(logits, yb).item()) * len(yb)
            correct += int((logits.argmax(1) == yb).sum().item())
    tmodel.train()
    return loss_sum / len(xv), correct / len(xv)
