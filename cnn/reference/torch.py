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
not. (PyTorch's ``padding="same"`` splits alike at stride 1 but refuses a stride > 1.) Residual
blocks, global average pooling and batch norm are built as ``akamaster/pytorch_resnet_cifar10``
writes them (see :func:`build_torch_model`).

:func:`fit_torch` uses the same epoch orders (``numpy.random.default_rng(seed)``), SGD with the
same momentum (PyTorch's ``v = m v + g; w -= lr v`` is ours, ``v' = m v' - lr g; w += v'``,
with ``v' = -lr v`` for a constant learning rate; a coupled weight decay is PyTorch's
``weight_decay``) and the same History columns, and copies the
trained weights back. On the CPU it runs ``threads`` intra-op threads (one inter-op thread);
with ``device="cuda"`` the parameters stay on the GPU and only batches go in.
"""
from __future__ import annotations

import time

import numpy as np


#: how :func:`fit_torch` runs the model on the CPU (the study's ``engine`` of its ``torch``
#: path): ``eager`` channels-first tensors; ``channels_last`` the parameters and batches in
#: ``torch.channels_last`` (NHWC, the layout oneDNN's convolutions prefer); ``compiled`` that
#: and the training module through ``torch.compile`` (inductor, C++ kernels built locally)
ENGINES = {"eager": {"channels_last": False, "compile": False},
           "channels_last": {"channels_last": True, "compile": False},
           "compiled": {"channels_last": True, "compile": True}}


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
    """``torch.nn.Sequential`` equal to ``model`` (same architecture and weights).

    Residual blocks are modules of their own (main branch, shortcut, the sum and its ReLU),
    option A's shortcut ``F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, before, after))`` as
    ``akamaster/pytorch_resnet_cifar10`` writes it, global average pooling
    ``AdaptiveAvgPool2d(1)`` and a flatten, batch norm ``BatchNorm2d``/``BatchNorm1d`` with
    PyTorch's ``momentum = 1 - ours`` (PyTorch weighs the batch, we the running value) and
    our epsilon. PyTorch's running variance takes the unbiased batch variance (``L / (L -
    1)`` times ours, ``L`` the values per channel); everything else is the same arithmetic.
    Dropout and weight penalties are not mirrored (``NotImplementedError``).

    The returned module's ``layer_modules`` maps the name of each of our layers with
    parameters to its ``Conv2d``, ``Linear`` or batch norm module (for
    :func:`set_torch_weights`, :func:`get_torch_weights` and :func:`torch_grads`)."""
    import torch
    from torch import nn

    dtype = {np.dtype("float32"): torch.float32, np.dtype("float64"): torch.float64}[
        np.dtype(model.dtype)]
    modules: dict = {}
    tmodel = nn.Sequential(*[_torch_module(layer, modules) for layer in model.layers])
    tmodel = tmodel.to(device=device, dtype=dtype)
    tmodel.layer_modules = modules
    set_torch_weights(tmodel, model)
    return tmodel


def _torch_module(layer, modules: dict):
    """The ``torch.nn`` module computing our ``layer``; records the modules holding its
    parameters in ``modules`` (by our layer name)."""
    from torch import nn

    kind = layer.type
    if getattr(layer, "penalties", None) and list(layer.penalties()):
        raise NotImplementedError(f"the PyTorch reference has no weight penalties "
                                  f"(layer {layer.name!r})")
    if kind == "conv2d":
        (top, bottom), (left, right) = layer.pads
        symmetric = (top, left) == (bottom, right)
        conv = modules[layer.name] = nn.Conv2d(layer.input_shape[0], layer.filters,
                                               layer.kernel_size, stride=layer.stride,
                                               padding=(top, left) if symmetric else 0,
                                               bias=layer.use_bias)
        if not symmetric:  # the odd pixel bottom/right: pad explicitly
            return nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)), conv)
        return conv
    if kind == "dense":
        lin = modules[layer.name] = nn.Linear(layer.input_shape[0], layer.units,
                                              bias=layer.use_bias)
        return lin
    if kind == "batchnorm":
        cls = nn.BatchNorm2d if len(layer.input_shape) == 3 else nn.BatchNorm1d
        bn = modules[layer.name] = cls(layer.input_shape[0], eps=layer.epsilon,
                                       momentum=1.0 - layer.momentum)
        return bn
    simple = {"maxpool2d": lambda: nn.MaxPool2d(layer.pool_size, stride=layer.stride),
              "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "flatten": nn.Flatten,
              "globalavgpool2d": lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())}
    if kind in simple:
        return simple[kind]()
    if kind == "residual":
        residual, _ = _torch_blocks()
        return residual(nn.Sequential(*[_torch_module(sub, modules) for sub in layer.main]),
                        nn.Sequential(*[_torch_module(sub, modules)
                                        for sub in layer.shortcut_layers]),
                        layer.activation == "relu")
    if kind == "shortcut_pad":
        _, pad = _torch_blocks()
        return pad(layer.stride, layer.channels_before, layer.channels_after)
    raise NotImplementedError(f"the PyTorch reference has no {kind!r} layer "
                              f"(layer {layer.name!r})")


_BLOCKS: list = []


def _torch_blocks():
    """The ``torch.nn`` modules of a residual block and of option A's shortcut (defined on
    first use: importing this module needs no PyTorch)."""
    if _BLOCKS:
        return _BLOCKS
    import torch.nn.functional as F
    from torch import nn

    class Residual(nn.Module):
        """``relu(main(x) + shortcut(x))`` (an empty shortcut is the identity)."""

        def __init__(self, main, shortcut, relu: bool):
            super().__init__()
            self.main, self.shortcut, self.relu = main, shortcut, relu

        def forward(self, x):
            out = self.main(x) + self.shortcut(x)
            return F.relu(out) if self.relu else out

    class ShortcutPad(nn.Module):
        """Option A: ``F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, before, after))``."""

        def __init__(self, stride: int, before: int, after: int):
            super().__init__()
            self.stride, self.before, self.after = stride, before, after

        def forward(self, x):
            s = self.stride
            return F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, self.before, self.after))

    _BLOCKS.extend([Residual, ShortcutPad])
    return _BLOCKS


def _weighted(tmodel, model):
    """``(layer, module)`` for each of our layers with parameters and its torch module."""
    for layer in model.leaves:
        if layer.param_names:
            yield layer, tmodel.layer_modules[layer.name]


def set_torch_weights(tmodel, model, params=None, buffers=None) -> None:
    """Our weights (default the model's parameters and buffers) into the torch model: conv
    weights as they are, a dense layer's ``w (D, units)`` as ``Linear.weight.T``, batch norm's
    ``gamma``, ``beta`` and running statistics as ``weight``, ``bias``, ``running_mean``,
    ``running_var``."""
    import torch
    params = model.params if params is None else params
    buffers = model.buffers if buffers is None else buffers
    with torch.no_grad():
        for layer, mod in _weighted(tmodel, model):
            tensors = _torch_tensors(mod)
            for name in layer.param_names + layer.buffer_names:
                value = (params if name in layer.param_names else buffers)[f"{layer.name}.{name}"]
                tensors[name].copy_(torch.from_numpy(_swap_layout(layer, name, value)))


def _torch_tensors(mod) -> dict:
    """Our array names -> the tensors of a ``Conv2d``, ``Linear`` or batch norm module."""
    return {"w": mod.weight, "b": mod.bias, "gamma": mod.weight, "beta": mod.bias,
            "running_mean": getattr(mod, "running_mean", None),
            "running_var": getattr(mod, "running_var", None)}


def _swap_layout(layer, name: str, value: np.ndarray) -> np.ndarray:
    """An array of ``layer`` in the other framework's layout (a dense ``w`` is transposed,
    the rest is shared), contiguous; its own inverse."""
    return np.ascontiguousarray(value.T if layer.type == "dense" and name == "w" else value)


def get_torch_weights(tmodel, model) -> dict:
    """The torch model's weights in our layout and keys, parameters and buffers (load with
    ``model.set_weights``)."""
    return _from_torch(tmodel, model, lambda t: t, buffers=True)


def torch_grads(tmodel, model) -> dict:
    """The gradients (``.grad``) of the torch model's parameters in our layout and keys."""
    return _from_torch(tmodel, model, lambda t: t.grad, buffers=False)


def _from_torch(tmodel, model, read, buffers: bool) -> dict:
    out = {}
    for layer, mod in _weighted(tmodel, model):
        tensors = _torch_tensors(mod)
        for name in layer.param_names + (layer.buffer_names if buffers else ()):
            value = read(tensors[name]).detach().cpu().numpy()
            out[f"{layer.name}.{name}"] = _swap_layout(layer, name, value).copy()
    return out


#: the layer types :func:`build_torch_model` mirrors
MIRRORED = ("conv2d", "dense", "batchnorm", "maxpool2d", "relu", "sigmoid", "tanh", "flatten",
            "globalavgpool2d", "residual", "shortcut_pad")


def check_torch_trainable(model, optimizer=None) -> None:
    """Raise ``NotImplementedError`` naming what :func:`fit_torch` cannot train as ours does:
    a layer or weight penalty :func:`build_torch_model` has no counterpart for (residual blocks
    included, all the way down), a loss other than softmax cross-entropy
    (``CrossEntropyLoss``), an optimizer other than SGD (momentum, Nesterov, a coupled weight
    decay: PyTorch's ``SGD(weight_decay=...)``) or a learning-rate schedule. Imports no
    PyTorch."""
    from ..optim import make_optimizer
    for _, layer in model.walk():
        if layer.type not in MIRRORED:
            raise NotImplementedError(f"the PyTorch reference has no {layer.type!r} layer "
                                      f"(layer {layer.name!r})")
        if getattr(layer, "penalties", None) and list(layer.penalties()):
            raise NotImplementedError(f"the PyTorch reference has no weight penalties "
                                      f"(layer {layer.name!r})")
    if model.loss.name != "softmax_cross_entropy":
        raise NotImplementedError(f"the PyTorch reference trains with softmax cross-entropy "
                                  f"only; the model's loss is {model.loss.name!r}")
    opt = make_optimizer(optimizer)
    config = opt.config()
    decoupled = config.get("weight_decay") and config.get("weight_decay_mode") != "coupled"
    if config.get("type", "sgd") != "sgd" or decoupled or opt.schedule is not None:
        raise NotImplementedError(f"the PyTorch reference trains with SGD (lr, momentum, "
                                  f"Nesterov, a coupled weight decay) at a constant learning "
                                  f"rate only; received optimizer={config}")


def fit_torch(model, x, y, *, epochs: int = 1, batch_size: int = 32, optimizer=None,
              seed: int = 0, validation_data: tuple | None = None, threads: int = 1,
              device: str = "cpu", verbose: int = 0, callbacks=(), distributed: bool = False,
              bucket_cap_mb: float = 25.0, augment=None, normalize: bool = False,
              engine: str = "eager"):
    """Train the PyTorch copy of ``model``; same arguments and History columns as
    :func:`cnn.train.fit` (``compile_time`` 0: nothing is compiled; ``comm_time`` absent: one
    worker; ``info["wall_time"]`` the seconds of the call from PyTorch's import on), and the same step hook
    (``Callback.on_step_end``; its ``params`` are the torch tensors). The trained weights are
    copied back into ``model`` (also when training is interrupted). What it cannot train as
    ours does is refused first (:func:`check_torch_trainable`). With ``augment`` and
    ``normalize`` each batch comes from our input pipeline (:class:`cnn.augment.InputPipeline`:
    the same crops and flips of the same examples as :func:`cnn.train.fit`), and the model
    keeps the normalisation (the validation data is normalised alike).

    ``distributed``: one process of a data-parallel job, PyTorch's
    ``DistributedDataParallel`` over the default process group (the caller's
    ``torch.distributed.init_process_group``; gloo on the CPU) with ``bucket_cap_mb``: every
    process draws the same order from ``seed`` and takes its shard of each global batch of
    ``batch_size`` (contiguous, sizes differing by at most one: our ``mpi`` strategy's split,
    as ``DistributedSampler`` does); DDP averages the shards' gradients while backward runs,
    which is the gradient of the global mean loss where the shards are equal. ``time`` and
    ``images_per_sec`` count the global batches; ``loss`` and ``accuracy`` this process's
    shards.

    ``engine``: a key of :data:`ENGINES`, recorded in ``info["engine"]``. With ``compiled``,
    ``torch.compile`` builds its kernels before the first epoch, on a forward and backward
    pass of a batch of each size the epochs will see (the buffers restored and the gradients
    zeroed after it: no step is taken), timed as ``compile_time``; evaluation runs the
    uncompiled module (its own graph would be compiled anew)."""
    import torch

    from ..augment import InputPipeline, checked_augmentation
    from ..callbacks import Callback
    from ..checks import check_choice, check_int
    from ..normalize import normalized, training_normalization
    from ..optim import make_optimizer
    from ..parallel.sync import shard_bounds, worker_rows
    from ..train import History

    started = time.perf_counter()
    epochs = check_int(None, "epochs", epochs)
    batch_size = check_int(None, "batch_size", batch_size)
    options = ENGINES[check_choice(None, "engine", engine, tuple(ENGINES))]
    model.check_inputs(x, y)
    if validation_data is not None:
        model.check_inputs(*validation_data)
    augmentation = checked_augmentation(augment, model.input_shape)
    check_torch_trainable(model, optimizer)
    model.normalization = training_normalization(x, normalize, model.normalization,
                                                 model.input_shape)
    pipeline = InputPipeline(augmentation, model.normalization, seed)
    if validation_data is not None:
        validation_data = (normalized(validation_data[0], model.normalization),
                           validation_data[1])
    opt_cfg = make_optimizer(optimizer).config()
    if device == "cpu":
        configure_threads(threads)
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    tmodel = build_torch_model(model, device=dev)
    layout = torch.channels_last if options["channels_last"] else torch.contiguous_format
    if options["channels_last"]:
        tmodel = tmodel.to(memory_format=layout)
    net, rank, workers = tmodel, 0, 1
    if distributed:
        import torch.distributed as dist
        rank, workers = dist.get_rank(), dist.get_world_size()
        net = torch.nn.parallel.DistributedDataParallel(tmodel, bucket_cap_mb=bucket_cap_mb)
    if options["compile"]:
        net = torch.compile(net)
    opt = torch.optim.SGD(tmodel.parameters(), lr=opt_cfg["lr"],
                          momentum=opt_cfg.get("momentum", 0.0),
                          nesterov=opt_cfg.get("nesterov", False),
                          weight_decay=opt_cfg.get("weight_decay", 0.0))
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(seed)
    n = len(x)
    history = History(info={"backend": f"torch-{dev.type}", "strategy": "torch",
                            "threads": threads, "batch_size": batch_size, "epochs": epochs,
                            "seed": seed, "optimizer": opt_cfg, "train_examples": n,
                            "dtype": str(model.dtype), "compile_time": 0.0, "engine": engine,
                            "augment": None if augmentation is None else augmentation.config(),
                            "normalization": (None if model.normalization is None
                                              else model.normalization.config()),
                            "torch_version": torch.__version__})
    yt = np.asarray(y, dtype=np.int64)
    # the batch buffer, refilled each step: the step before has read it back (loss.item())
    batch = np.empty((min(batch_size, n), *x.shape[1:]), x.dtype)
    hooks = [cb for cb in callbacks if type(cb).on_step_end is not Callback.on_step_end]

    def evaluate(xv, yv):
        loss, acc = _evaluate(tmodel, xv, yv, dev, loss_fn)
        return {"loss": loss, "accuracy": acc}

    def as_input(xb):
        xb_t = torch.from_numpy(xb).to(dev)
        return xb_t.contiguous(memory_format=layout) if xb_t.dim() == 4 else xb_t

    if options["compile"]:
        history.info["compile_time"] = _compile_warm_up(
            net, tmodel, loss_fn, as_input(pipeline.gather(x, np.arange(len(batch)), 1, batch)),
            torch.from_numpy(yt[:len(batch)]).to(dev), _step_sizes(n, batch_size, workers))
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
                xb, yb = pipeline.gather(x, idx, epoch, batch[:len(idx)]), yt[idx]
                t2 = time.perf_counter()
                xb_t = as_input(xb)
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
    history.info["wall_time"] = time.perf_counter() - started
    return history


def _step_sizes(n: int, batch_size: int, workers: int) -> list[int]:
    """The batch sizes one process's steps see in an epoch of ``n`` examples: the full
    batch's shard and the last, smaller batch's (the first process's shards are the
    largest)."""
    from ..parallel.sync import worker_rows
    sizes = {min(batch_size, n)} | ({n % batch_size} if n % batch_size else set())
    out = set()
    for size in sizes:
        lo, hi = worker_rows(size, workers, 0)
        out.add(max(hi - lo, 1))
    return sorted(out, reverse=True)


def _compile_warm_up(net, tmodel, loss_fn, xb, yb, sizes: list[int]) -> float:
    """Seconds ``torch.compile`` takes to build ``net``'s forward and backward for each batch
    size in ``sizes`` (rows of ``xb``, ``yb``): passes that take no step (the buffers, batch
    norm's running statistics, are restored and the gradients zeroed after them)."""
    import torch
    saved = {k: v.detach().clone() for k, v in tmodel.named_buffers()}
    t = time.perf_counter()
    for size in sizes:
        loss_fn(net(xb[:size]), yb[:size]).backward()
    seconds = time.perf_counter() - t
    with torch.no_grad():
        for k, v in tmodel.named_buffers():
            v.copy_(saved[k])
    for p in tmodel.parameters():
        p.grad = None
    return seconds


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
