"""The model: a stack of layers built from a plain spec, its parameters, and the one
forward/backward pass every training path uses. The pass walks the backend's plan of ops
(:mod:`cnn.plan`): one op per layer, or per run of layers the backend fuses.

Parameters are a flat dict ``{"<layer>.<w|b>": array}`` (same keys for gradients and optimizer
state, as in numpy-ml). Passing ``params=`` and ``backend=`` to ``forward``/``backward`` lets a
strategy run the same model on its own parameter copy (a replica, a device copy) without
touching the model's host arrays.

Buffers (non-trained state: batch norm's running statistics) are a second flat dict,
``model.buffers``, kept apart from the parameters as tinygrad and Keras keep them: the optimizer
never sees them, but they are saved and loaded with the weights (``get_weights`` returns both),
averaged by the ``average`` strategy, shown by ``summary()`` and transferred to and from Keras.
A pass reads the buffers of its context (``ctx.buffers``, default the model's own) and a
training pass leaves their new values in ``ctx.updates`` for the strategy to commit.

The loss is part of the spec (``"loss"``: see :mod:`cnn.losses`), as are per-layer weight
penalties (``kernel_regularizer``), which ``loss_and_grads`` and ``evaluate`` add to the loss as
Keras does.

A model may normalise its inputs per channel (``model.normalization``, set by
``fit(normalize=True)``; see :mod:`cnn.normalize`): ``predict``, ``predict_logits`` and
``evaluate`` apply it to the images they are given, the weights file keeps it, while
``forward`` and ``loss_and_grads`` take the network's inputs as they are.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .backends import Backend, backend_choices, get_backend
from .checks import check_int, is_integer
from .context import StepContext
from .files import atomic_write, check_writable, make_folders, read_structured
from .layers import Layer, layers_from_spec, name_layers
from .losses import Loss, get_loss
from .normalize import Normalization, normalized
from .plan import backward_ops, forward_ops, plan_layers

FLOAT_DTYPES = (np.float32, np.float64)


def _check_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.type not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64. Received dtype={dt}")
    return dt


#: values per example (C*H*W) that an input may have: 8 GiB of float32, far beyond any image
MAX_INPUT_VALUES = 2**31 - 1


def check_input_shape(input_shape) -> tuple[int, ...]:
    """``input_shape`` as a tuple of positive ints (``(C, H, W)``, or ``(D,)`` for flat
    inputs); ``ValueError``/``TypeError`` naming the value otherwise."""
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, (list, tuple)):
        raise TypeError(f"input_shape must be a list or tuple of positive integers such as "
                        f"(1, 28, 28). Received input_shape={input_shape!r}")
    bad = [s for s in input_shape if not is_integer(s) or s < 1]
    if not input_shape or bad:
        raise ValueError(f"input_shape must be a non-empty list of positive integers such as "
                         f"(1, 28, 28). Received input_shape={tuple(input_shape)!r}")
    shape = tuple(int(s) for s in input_shape)
    if math.prod(shape) > MAX_INPUT_VALUES:  # also keeps every later size within int64
        raise ValueError(f"input_shape {shape} has {math.prod(shape):,} values per example; "
                         f"at most {MAX_INPUT_VALUES:,} are supported")
    return shape


def _check_finite(x) -> None:
    """Refuse NaN or infinite inputs: one NaN pixel makes every loss NaN. ``min`` and ``max``
    propagate NaN and expose +-inf without allocating a mask as large as the data."""
    lo, hi = np.min(x), np.max(x)
    if np.isfinite(lo) and np.isfinite(hi):
        return
    flat = np.asarray(x).reshape(len(x), -1)
    bad = np.flatnonzero(~np.isfinite(flat).all(axis=1))
    raise ValueError(f"inputs hold non-finite values (NaN or inf) in {len(bad)} of {len(x)} "
                     f"examples, the first at index {bad[0]}; clean or drop them before training")


class Sequential:
    """A feed-forward stack of layers ending in logits ``(N, num_classes)``.

    Args:
        layers: the layers, in order (see :func:`cnn.layers.layers_from_spec`).
        input_shape: per-example input shape ``(C, H, W)``.
        dtype: float32 (default) or float64; parameters and activations use it.
        seed: seeds the initialisation, so equal seeds give equal initial weights.
        backend: default backend name for ``predict``/``evaluate``/``fit``; ``"auto"`` (the
            default): the fastest CPU backend installed (:func:`cnn.backends.resolve_backend`).
        loss: ``"softmax_cross_entropy"`` (default) or ``"binary_cross_entropy"`` (one logit
            per example; see :mod:`cnn.losses`).
    """

    def __init__(self, layers: list[Layer], input_shape, *, dtype=np.float32, seed: int = 0,
                 backend: str | Backend = "auto", loss: "str | Loss" = "softmax_cross_entropy"):
        self.loss = get_loss(loss)
        self.dtype = _check_dtype(dtype)
        if not isinstance(backend, Backend) and backend not in backend_choices():
            raise ValueError(f"unknown backend {backend!r}; choose one of {backend_choices()}")
        self.input_shape = check_input_shape(input_shape)
        self.layers = list(layers)
        self.seed = seed
        self.backend = backend
        name_layers(self.layers)
        shape = self.input_shape
        for layer in self.layers:
            shape = layer.build(shape)
        #: the plain layers, residual blocks' included (see :meth:`Layer.leaves`): the owners
        #: of the parameters and buffers, in order
        self.leaves = tuple(leaf for layer in self.layers for leaf in layer.leaves())
        names = [layer.name for _, layer in self.walk()]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"two layers are named {twice[0]!r}; layer names must be unique")
        if len(shape) != 1:
            raise ValueError(f"the last layer must give flat logits (N, K); it gives per-example "
                             f"shape {shape}. Add a flatten and a dense layer.")
        self.num_classes = self.loss.num_classes(shape[0])
        #: backend -> its plan of ops (see :meth:`plan`)
        self._plans: dict[Backend, tuple] = {}
        #: per plain layer (blocks' leaves included), made once (every backward reads them):
        #: its parameters' keys in the flat dicts and its weight penalties ``(key, l1, l2)``
        self._grad_keys = {layer: [f"{layer.name}.{p}" for p in layer.param_names]
                           for layer in self.leaves}
        self._penalties = {layer: [(f"{layer.name}.{p}", l1, l2)
                                   for p, l1, l2 in layer.penalties()] for layer in self.leaves}
        #: the optimizer state (slots and step count, host arrays) the last ``fit`` ended
        #: with; the next ``fit`` continues from it (see :mod:`cnn.optim`)
        self.optimizer_state = None
        #: the per-channel normalisation of the inputs (see :mod:`cnn.normalize`) that
        #: ``evaluate`` and ``predict`` apply and the weights file keeps; None: none
        self.normalization: Normalization | None = None
        rng = np.random.default_rng(seed)
        self.params: dict[str, np.ndarray] = {}
        self.buffers: dict[str, np.ndarray] = {}
        for layer in self.leaves:
            try:
                layer_params = layer.init_params(rng, self.dtype)
            except (MemoryError, ValueError, OverflowError) as err:
                # NumPy's allocation errors ("Unable to allocate 72 TiB", "array is too big",
                # "Maximum allowed dimension exceeded"), named for the layer
                raise ValueError(f"{layer.type} {layer.name!r}: cannot create its parameters "
                                 f"for its input shape {layer.input_shape} (model "
                                 f"input_shape={self.input_shape}): {err}") from None
            for pname, value in layer_params.items():
                self.params[f"{layer.name}.{pname}"] = value
            for bname, value in layer.init_buffers(self.dtype).items():
                self.buffers[f"{layer.name}.{bname}"] = value

    def __getstate__(self) -> dict:
        # the plans hold backend objects (a lock, device handles): a copy sent to another
        # process plans again there, for its own backends
        return {**self.__dict__, "_plans": {}}

    # ---- construction ----------------------------------------------------------------------
    def walk(self):
        """``(depth, layer)`` for every layer in order, the layers of residual blocks after
        their block at one depth more (0: the model's own list)."""
        def visit(layers, depth):
            for layer in layers:
                yield depth, layer
                yield from visit(layer.sublayers(), depth + 1)
        return visit(self.layers, 0)

    @classmethod
    def from_spec(cls, spec, input_shape=None, **kwargs) -> "Sequential":
        """Build from a list of layer dicts, or a dict ``{"layers": [...], "input_shape": ...}``.

        A preset name (``"mnist_small"``) or a path to a ``.json``/``.yaml`` file also works.
        """
        source = spec_file(spec)
        spec = resolve_spec(spec)
        with naming_spec_file(source):
            layers = spec["layers"]
            input_shape = input_shape if input_shape is not None else spec.get("input_shape")
            if input_shape is None:
                raise ValueError("input_shape is needed: pass it or put it in the spec")
            if "loss" in spec and "loss" not in kwargs:
                kwargs["loss"] = spec["loss"]
            return cls(layers_from_spec(layers), input_shape, **kwargs)

    def spec(self) -> dict:
        """The plain spec that rebuilds this architecture (JSON-serialisable)."""
        return {"input_shape": list(self.input_shape), "loss": self.loss.name,
                "layers": [layer.config() for layer in self.layers]}

    @property
    def num_params(self) -> int:
        return int(sum(p.size for p in self.params.values()))

    @property
    def num_buffer_values(self) -> int:
        """Values held in buffers (non-trained state)."""
        return int(sum(b.size for b in self.buffers.values()))

    # ---- validation ------------------------------------------------------------------------
    def check_inputs(self, x, y=None) -> None:
        """Raise ``TypeError``/``ValueError`` naming the problem with a batch ``x (N, C, H, W)``
        and labels ``y (N,)``."""
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"inputs must be an array of shape (N, {', '.join(map(str, self.input_shape))}). "
                            f"Received {type(x).__name__}")
        if np.dtype(x.dtype) != self.dtype:
            raise TypeError(f"inputs have dtype {x.dtype} but the model computes in {self.dtype}; "
                            f"convert with x.astype(np.{self.dtype})")
        if tuple(x.shape[1:]) != self.input_shape or len(x.shape) != len(self.input_shape) + 1:
            raise ValueError(f"inputs must have shape (N, {', '.join(map(str, self.input_shape))}). "
                             f"Received shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("empty batch: inputs have shape "
                             f"{tuple(x.shape)} (N=0)")
        _check_finite(x)
        if y is None:
            return
        y = np.asarray(y)
        if not np.issubdtype(y.dtype, np.integer):
            raise TypeError(f"labels must be integers. Received dtype {y.dtype}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},) to match the inputs. "
                             f"Received shape {y.shape}")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= self.num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"labels must be in [0, {self.num_classes}). Received label {bad}")

    # ---- the pass every path shares ---------------------------------------------------------
    def _params_backend(self, params, backend):
        return (self.params if params is None else params), get_backend(backend or self.backend)

    def forward(self, x, params=None, backend=None, ctx: StepContext | None = None,
                keep_caches: bool = True):
        """``x (N, C, H, W)`` -> ``(logits (N, K), caches)`` on ``backend``, ``caches`` one per
        op of the backend's :meth:`plan`.

        ``ctx`` (see :mod:`cnn.context`) says whether this is a training pass and which
        workspace it may reuse; the default is an inference pass that allocates per call.
        ``keep_caches=False``: no backward follows (prediction, evaluation), so each op's
        cache is dropped as the next op runs and ``caches`` is empty (see
        :func:`cnn.plan.forward_ops`)."""
        params, be = self._params_backend(params, backend)
        ctx = StepContext() if ctx is None else ctx
        ctx.updates.clear()
        ops = self.plan(be) if ctx.trace is None else ctx.trace.ops(self.plan(be))
        return forward_ops(ops, self._arrays(params, ctx), x, ctx, keep_caches)

    def plan(self, backend=None) -> tuple:
        """The ops that run the layers on ``backend`` (default the model's), in order: one per
        layer, or per run of layers the backend fuses (see :mod:`cnn.plan`). Built on the
        first call for each backend, then reused."""
        be = get_backend(backend or self.backend)
        ops = self._plans.get(be)
        if ops is None:
            ops = self._plans[be] = plan_layers(self.layers, be)
        return ops

    def _arrays(self, params: dict, ctx: StepContext) -> dict:
        """The parameters and the buffers the pass reads (the context's, default the
        model's), in one flat dict: what the plan's ops take."""
        buffers = self.buffers if ctx.buffers is None else ctx.buffers
        return {**params, **buffers} if buffers else params

    def backward(self, dlogits, caches, params=None, backend=None,
                 ctx: StepContext | None = None, on_grads=None,
                 loss_scale: float = 1.0) -> dict[str, Any]:
        """Gradients of every parameter from ``dlogits (N, K)``; keys match ``params``. ``ctx``
        must be the context of the forward that made ``caches``. ``on_grads``, if given, is
        called with each layer's gradients ``{key: grad}`` as soon as backward has computed
        them, last layer first (a strategy starts communicating them while the earlier
        layers' backward runs). The gradients of the layers' weight penalties are added to
        their parameters' gradients before that, times ``loss_scale`` (the scale of the loss
        ``dlogits`` is the gradient of, see :meth:`loss_and_grads`)."""
        params, be = self._params_backend(params, backend)
        ctx = StepContext() if ctx is None else ctx

        def penalties_and_hook(op, op_grads):
            # each layer of the op (a fused run's, a block's leaves), last first
            for layer in reversed([leaf for layer in op.layers for leaf in layer.leaves()]):
                named = {key: op_grads[key] for key in self._grad_keys[layer]}
                for key, l1, l2 in self._penalties[layer]:  # in place: the layer's own gradient
                    named[key] = op_grads[key] = be.weight_penalty_grad(
                        named[key], params[key], l1 * loss_scale, l2 * loss_scale,
                        ws=ctx.scope(layer.name))
                if on_grads is not None and named:
                    on_grads(named)

        # the first op's input is data: its gradient is never used (need_dx=False)
        ops = self.plan(be) if ctx.trace is None else ctx.trace.ops(self.plan(be))
        _, grads = backward_ops(ops, self._arrays(params, ctx), dlogits, caches, ctx,
                                need_dx=False, on_op=penalties_and_hook)
        return grads

    def loss_and_grads(self, x, y, params=None, backend=None, ctx: StepContext | None = None,
                       on_grads=None, loss_scale: float = 1.0):
        """One forward and backward pass: ``(loss, correct, grads)`` as backend arrays.

        ``loss`` is the mean over the ``N`` examples of the model's loss plus the layers' weight
        penalties, ``correct`` the number classified right.
        Training strategies pass a training ``ctx`` (``StepContext(training=True, ...)``); the
        default is an inference-mode pass (no dropout, batch norm on running statistics).
        ``on_grads``: see :meth:`backward`. ``loss_scale`` (host arrays only): the gradients
        are those of ``loss_scale`` times the mean loss. A data-parallel strategy passes a
        shard's share of its global batch, ``n_shard / n_global``, so that the shards' gradients
        simply add up, and so that every shard's backward pass carries gradients of the same
        loss (the global mean) into the cross-shard sums of synchronised layers. The penalties'
        gradients are scaled alike (each shard adds its share of them).
        A training pass leaves new buffer values (batch norm's running statistics) in
        ``ctx.updates``; it writes no buffer (the strategy commits, see :mod:`cnn.context`).
        """
        params, be = self._params_backend(params, backend)
        ctx = StepContext() if ctx is None else ctx
        logits, caches = self.forward(x, params, be, ctx)
        loss, dlogits, correct = self.loss(logits, y, be, ws=ctx.scope("__loss__"))
        if loss_scale != 1.0:  # in place: dlogits is this pass's own (workspace) buffer
            np.multiply(dlogits, loss_scale, out=dlogits)
        if ctx.trace is not None:
            ctx.trace.span("loss", cat="loss")
        grads = self.backward(dlogits, caches, params, be, ctx, on_grads, loss_scale)
        return self._penalised(loss, params, be, ctx), correct, grads

    def _penalised(self, loss, params, be, ctx: StepContext | None = None):
        """``loss`` plus every layer's weight penalty (``kernel_regularizer``)."""
        for layer, penalties in self._penalties.items():
            for key, l1, l2 in penalties:
                ws = None if ctx is None else ctx.scope(layer.name)
                loss = be.weight_penalty(params[key], l1, l2, loss, ws=ws)
        return loss

    # ---- inference -------------------------------------------------------------------------
    def predict_logits(self, x, batch_size: int = 256, params=None, backend=None,
                       buffers=None) -> np.ndarray:
        """Host logits ``(N, K)`` for ``x (N, C, H, W)``, computed in batches (an inference
        pass: no dropout, batch norm on the running statistics of ``buffers``, default the
        model's; the inputs normalised by :attr:`normalization`)."""
        batch_size = check_int("Sequential.predict", "batch_size", batch_size)
        self.check_inputs(x)
        params, be = self._params_backend(params, backend)
        ctx = StepContext(buffers=buffers)
        out = [be.to_host(self.forward(be.asarray(self._inputs(x, i, batch_size)), params, be,
                                       ctx, keep_caches=False)[0])
               for i in range(0, len(x), batch_size)]
        return np.concatenate(out)

    def _inputs(self, x, start: int, batch_size: int) -> np.ndarray:
        """The network's inputs for the images ``x[start:start + batch_size]``: normalised
        (a copy) when the model has a normalisation, else the slice itself."""
        return normalized(x[start:start + batch_size], self.normalization)

    def predict(self, x, batch_size: int = 256, **kwargs) -> np.ndarray:
        """Class probabilities ``(N, num_classes)``: the softmax of the logits, or for
        ``binary_cross_entropy`` the columns ``(1 - p, p)`` with ``p = sigmoid(logit)``, so
        that the argmax is the predicted class either way."""
        return self.loss.probabilities(self.predict_logits(x, batch_size, **kwargs))

    def evaluate(self, x, y, batch_size: int = 256, params=None, backend=None,
                 buffers=None) -> dict[str, float]:
        """Mean loss (with the weight penalties, as Keras reports it) and accuracy (fraction in
        [0, 1]) over ``x, y``, in inference mode, the images normalised by
        :attr:`normalization` (see :meth:`predict_logits`)."""
        batch_size = check_int("Sequential.evaluate", "batch_size", batch_size)
        self.check_inputs(x, y)
        params, be = self._params_backend(params, backend)
        ctx = StepContext(buffers=buffers)
        total_loss, correct = 0.0, 0
        for i in range(0, len(x), batch_size):
            xb = be.asarray(self._inputs(x, i, batch_size))
            yb = be.asarray(y[i:i + batch_size])
            logits, _ = self.forward(xb, params, be, ctx, keep_caches=False)
            loss, _, n_right = self.loss(logits, yb, be)
            total_loss += float(be.to_host(loss)) * len(yb)
            correct += int(be.to_host(n_right))
        zero = be.asarray(np.zeros(1, self.dtype)).reshape(())  # a 0-d loss on the backend
        penalty = float(be.to_host(self._penalised(zero, params, be)))
        return {"loss": total_loss / len(x) + penalty, "accuracy": correct / len(x)}

    # ---- training --------------------------------------------------------------------------
    def fit(self, x, y, **kwargs):
        """Train in place; see :func:`cnn.train.fit` for the arguments. Returns a History."""
        from .train import fit
        return fit(self, x, y, **kwargs)

    def reset_optimizer_state(self) -> None:
        """Forget the optimizer state kept from earlier fits: the next ``fit`` starts with
        zero slots (momentum, Adam's moments) at step 0 (schedules and dropout masks restart)."""
        self.optimizer_state = None

    # ---- persistence -----------------------------------------------------------------------
    def get_weights(self) -> dict[str, np.ndarray]:
        """Copies of the parameters and the buffers, in one dict (as Keras's ``get_weights``
        includes the non-trainable weights): what :meth:`set_weights` and
        :meth:`save_weights` take."""
        return {**{k: v.copy() for k, v in self.params.items()},
                **{k: v.copy() for k, v in self.buffers.items()}}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Copy ``weights`` into the parameters and buffers; keys, shapes and dtypes must
        match. The buffers may be left out (they then keep their values): a dict of
        parameters alone (``model.params`` of another model, gradients' keys) is accepted."""
        targets = {**self.params, **self.buffers}
        missing = sorted(set(self.params) - set(weights))
        extra = sorted(set(weights) - set(targets))
        if missing or extra:
            raise ValueError(f"weights do not match the model: missing {missing}, unexpected {extra}")
        weights = {k: np.asarray(v) for k, v in weights.items()}
        for k, v in weights.items():  # check all before copying any: no half-loaded model
            if v.shape != targets[k].shape:
                raise ValueError(f"weight {k!r} has shape {v.shape}; the model expects "
                                 f"{targets[k].shape}")
        for k, v in weights.items():
            targets[k][...] = v.astype(self.dtype, copy=False)

    def save_weights(self, path: str | os.PathLike) -> Path:
        """Write the parameters, the buffers and the spec (and the input normalisation, when
        the model has one: ``__normalization__``) to ``path`` atomically; returns the path
        written.

        ``.npz`` is appended when ``path`` has another suffix or none (``w`` -> ``w.npz``). An
        existing folder, a parent that is a file, or an unwritable folder raise ``OSError``
        naming the path (see :func:`check_weights_path`, which checks the same before a fit).
        """
        path = weights_path(path)
        make_folders(path.parent)
        extra = ({} if self.normalization is None else
                 {NORMALIZATION_KEY: np.array(self.normalization.to_json())})
        return atomic_write(path, lambda f: np.savez(
            f, __spec__=np.array(json.dumps(self.spec())), **extra, **self.params,
            **self.buffers))

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load parameters written by :meth:`save_weights` (checked against this model), and
        the input normalisation the file holds (none when it holds none).

        ``FileNotFoundError`` when there is no such file; ``ValueError`` naming the file when it
        is truncated, corrupt or not a weights file (nothing is loaded then).
        """
        weights = read_weights(path, self)
        normalization = read_normalization(path)
        if normalization is not None:
            normalization.check(self.input_shape)
        self.set_weights(weights)
        self.normalization = normalization

    def summary(self) -> str:
        """One row per layer: name, type, output shape, trained parameters and, when the model
        has any, buffer values (non-trained state); a residual block's row gives its layers'
        totals and is followed by its layers, indented. Then the totals and the loss."""
        with_buffers = bool(self.buffers)
        rows = [(f"{'  ' * depth}{layer.name}", layer) for depth, layer in self.walk()]
        width = max(14, max(len(name) for name, _ in rows) + 2)
        lines = [f"{'layer':<{width}}{'type':<16}{'output shape':<18}{'params':>9}"
                 + (f"{'buffers':>9}" if with_buffers else "")]
        for name, layer in rows:
            leaves = layer.leaves()
            n = sum(self.params[f"{leaf.name}.{p}"].size for leaf in leaves for p in leaf.param_names)
            line = f"{name:<{width}}{layer.type:<16}{str(layer.output_shape):<18}{n:>9,}"
            if with_buffers:
                line += f"{sum(self.buffers[f'{leaf.name}.{b}'].size for leaf in leaves for b in leaf.buffer_names):>9,}"
            lines.append(line)
        lines.append(f"total parameters: {self.num_params:,} ({self.dtype})")
        if with_buffers:
            names = list(self.buffers)
            if len(names) > 6:  # a deep network's: per kind, not one by one
                kinds = [key.rsplit(".", 1)[1] for key in names]
                names = [f"{kind} x{kinds.count(kind)}" for kind in dict.fromkeys(kinds)]
            lines.append(f"buffers (non-trained): {self.num_buffer_values:,} in "
                         f"{len(self.buffers)} arrays ({', '.join(names)})")
        lines.append(f"loss: {self.loss.name}")
        if self.normalization is not None:
            lines.append(f"inputs normalised per channel: {self.normalization}")
        return "\n".join(lines)


# ---- weights files ---------------------------------------------------------------------------
#: the member of a weights file that holds the input normalisation (JSON text), beside
#: ``__spec__``; absent when the model has none
NORMALIZATION_KEY = "__normalization__"
#: members of a weights file that are not weight arrays
TEXT_MEMBERS = ("__spec__", NORMALIZATION_KEY)


def weights_path(path: str | os.PathLike) -> Path:
    """The file :meth:`Sequential.save_weights` writes for ``path``: ``path`` itself when it
    ends in ``.npz``, else ``path`` with ``.npz`` appended. ``IsADirectoryError`` when ``path``
    names a folder (an existing one, or one written with a trailing slash)."""
    text = os.fspath(path)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    if not text.strip():
        raise ValueError(f"a weights path must not be empty. Received {text!r}")
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        raise IsADirectoryError(f"{text} is a folder; give a file name for the weights, "
                                f"such as {Path(text) / 'weights.npz'}")
    out = Path(text)
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a folder; give a file name for the weights, "
                                f"such as {out / 'weights.npz'}")
    return out


def check_weights_path(path: str | os.PathLike) -> Path:
    """Check, before any training, that :meth:`Sequential.save_weights` can write ``path``:
    returns the file it will write, or raises ``OSError`` naming the path and the reason (a
    folder given as the file, a parent that is a file, a folder that cannot be created or
    written). Leaves nothing behind (:func:`cnn.files.check_writable`)."""
    return check_writable(weights_path(path), "the weights")


def npz_headers(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{array name: (shape, dtype)}`` of an ``.npz`` file, read from the arrays' ``.npy``
    headers alone: nothing beyond the first bytes of each member is decompressed. Raises what
    ``zipfile`` and NumPy's header reader raise on a damaged file."""
    import zipfile
    fmt = np.lib.format
    out = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            try:
                with z.open(info) as f:
                    version = fmt.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = fmt.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, _, dtype = fmt.read_array_header_2_0(f)
                    else:
                        raise ValueError(f".npy format version {version}")
            except Exception as exc:  # noqa: BLE001 - zipfile, zlib, the header reader
                raise ValueError(f"array {name!r}: {type(exc).__name__}: {exc}") from None
            out[name] = (tuple(shape), np.dtype(dtype))
    return out


def read_weights(path: str | os.PathLike, model: "Sequential | None" = None
                 ) -> dict[str, np.ndarray]:
    """The parameter arrays of a file written by :meth:`Sequential.save_weights` (without
    ``__spec__``). ``FileNotFoundError`` when absent; ``ValueError`` naming the file when it is
    truncated, corrupt, pickled, or holds something else than numeric arrays.

    Every array's name, shape and dtype are checked from the file's headers before any array
    is read, and with ``model``, against its parameters and buffers (the buffers may be
    missing): a file that is not this model's is refused without decompressing it (a
    compressed ``.npz`` of a few megabytes can expand to gigabytes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" and magic != b"PK\x05\x06":  # a zip archive (an empty one)
        raise ValueError(f"{path}: not a weights file written by save_weights (an .npz, i.e. "
                         f"zip, archive); it starts with {magic!r}")
    try:
        headers = npz_headers(path)
    except Exception as exc:  # noqa: BLE001 - zipfile, zlib and the .npy reader raise many kinds
        # npz_headers words a member's problem itself, naming the array
        why = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        raise ValueError(f"{path}: not a readable weights file; it is truncated or corrupt "
                         f"({why})") from None
    for member in TEXT_MEMBERS:
        headers.pop(member, None)
    if not headers:
        raise ValueError(f"{path}: holds no weight arrays")
    for k, (_, dtype) in headers.items():
        if dtype.hasobject:
            raise ValueError(f"{path}: array {k!r} holds pickled Python objects, which are "
                             f"never loaded; not a weights file written by save_weights")
        if dtype.kind not in "fiu":
            raise ValueError(f"{path}: weight {k!r} is a {dtype} array; weights are numbers")
    if model is not None:
        expected = {k: v.shape for k, v in {**model.params, **model.buffers}.items()}
        missing = sorted(set(model.params) - set(headers))
        extra = sorted(set(headers) - set(expected))
        if missing or extra:
            raise ValueError(f"{path}: its weights do not match the model: missing {missing}, "
                             f"unexpected {extra}")
        for k, (shape, _) in headers.items():
            if shape != tuple(expected[k]):
                raise ValueError(f"{path}: weight {k!r} has shape {shape}; the model expects "
                                 f"{tuple(expected[k])}")
    member = None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {}
            for member in headers:
                arrays[member] = data[member]
    except Exception as exc:  # noqa: BLE001 - zipfile, zlib and the .npy reader raise many kinds
        raise ValueError(f"{path}: not a readable weights file (array {member!r}); it is "
                         f"truncated or corrupt ({type(exc).__name__}: {exc})") from None
    return arrays


def read_normalization(path: str | os.PathLike) -> Normalization | None:
    """The input normalisation a weights file holds (``__normalization__``, written by
    :meth:`Sequential.save_weights`), or None when it holds none. ``ValueError`` naming the
    file when the member is not the JSON text ``save_weights`` writes."""
    path = Path(path)
    try:
        headers = npz_headers(path)
    except Exception:  # noqa: BLE001 - read_weights words a damaged file, naming it
        read_weights(path)
        raise
    if NORMALIZATION_KEY not in headers:
        return None
    shape, dtype = headers[NORMALIZATION_KEY]
    if dtype.kind != "U" or shape != () or dtype.itemsize > MAX_NORMALIZATION_BYTES:
        raise ValueError(f"{path}: its input normalisation ({NORMALIZATION_KEY}) is a {dtype} "
                         f"array of shape {shape}, not the text save_weights writes")
    try:
        with np.load(path, allow_pickle=False) as f:
            return Normalization.from_config(json.loads(str(f[NORMALIZATION_KEY])))
    except (json.JSONDecodeError, ValueError) as err:
        raise ValueError(f"{path}: its input normalisation ({NORMALIZATION_KEY}) is not "
                         f"valid: {err}") from None


#: the longest input normalisation a weights file may carry (its JSON text, in bytes of
#: UTF-32): a few numbers per channel
MAX_NORMALIZATION_BYTES = 1 << 20


# ---- specs -----------------------------------------------------------------------------------
#: the keys a model spec may have (what :meth:`Sequential.from_spec`, the CLI and the study read)
SPEC_KEYS = ("layers", "input_shape", "loss", "optimizer", "batch_size")


def _check_spec(spec: dict, source: str) -> dict:
    """Structural checks of a spec dict (values of layer options are the layers' to check):
    its keys among :data:`SPEC_KEYS` (a misspelled ``los`` would otherwise be dropped and the
    default loss trained), ``layers`` a list of dicts with a ``type``."""
    unknown = [k for k in spec if k not in SPEC_KEYS]
    if unknown:
        import difflib
        close = difflib.get_close_matches(str(unknown[0]), SPEC_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{source}unknown key {unknown[0]!r} in the model spec{hint}; a spec "
                         f"has {', '.join(SPEC_KEYS)}")
    layers = spec["layers"]
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(f"{source}'layers' must be a non-empty list of layer dicts. "
                         f"Received layers={layers!r}")
    for i, entry in enumerate(layers):
        if not isinstance(entry, dict):
            raise ValueError(f"{source}layer {i} must be a dict with a 'type'. Received {entry!r}")
        odd = [k for k in entry if not isinstance(k, str)]
        if odd:
            raise ValueError(f"{source}layer {i}: option names must be strings. Received {odd[0]!r}")
        if not isinstance(entry.get("type"), str):
            raise ValueError(f"{source}layer {i} needs a 'type' naming the layer (a string). "
                             f"Received {entry!r}")
        for key in ("name", "activation"):
            if entry.get(key) is not None and not isinstance(entry[key], str):
                raise ValueError(f"{source}layer {i}: {key} must be a string. "
                                 f"Received {key}={entry[key]!r}")
    if spec.get("input_shape") is not None:
        try:
            check_input_shape(spec["input_shape"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}{exc}") from None
    for key in ("optimizer",):
        if spec.get(key) is not None and not isinstance(spec[key], dict):
            raise ValueError(f"{source}{key} must be a dict. Received {key}={spec[key]!r}")
    return spec


def spec_file(spec: Any) -> Path | None:
    """The file ``spec`` names when it is a ``.json``/``.yaml`` path (not a preset), else None."""
    from .presets import PRESETS
    if isinstance(spec, (str, os.PathLike)) and os.fspath(spec) not in PRESETS:
        path = Path(os.fspath(spec))
        if path.suffix.lower() in (".json", ".yaml", ".yml"):
            return path
    return None


@contextmanager
def naming_spec_file(source: Path | None):
    """Prefix ``ValueError``/``TypeError`` raised inside with the spec file's path (if any), so
    an error in a layer's options or the architecture names the file it came from."""
    try:
        yield
    except (ValueError, TypeError) as err:
        if source is None or str(source) in str(err):
            raise
        kind = ValueError if isinstance(err, ValueError) else TypeError
        raise kind(f"{source}: {err}") from None


def resolve_spec(spec: Any) -> dict:
    """Normalise a preset name, a ``.json``/``.yaml`` path, a list or a dict to a spec dict.

    Raises ``ValueError`` (naming the file, for a file) when the text does not parse or the
    structure is not a spec, ``FileNotFoundError`` for a missing file.
    """
    from .presets import PRESETS
    source = ""
    if isinstance(spec, (str, os.PathLike)):
        name = os.fspath(spec)
        if name in PRESETS:
            return PRESETS[name]
        path = Path(name)
        if path.suffix.lower() in (".json", ".yaml", ".yml"):
            spec = read_structured(path, "model spec file")
            source = f"{path}: "
        else:
            raise ValueError(f"unknown model {name!r}: not a preset ({sorted(PRESETS)}) "
                             "nor a .json/.yaml spec file")
    if isinstance(spec, (list, tuple)):
        return _check_spec({"layers": list(spec)}, source)
    if isinstance(spec, dict) and "layers" in spec:
        return _check_spec(spec, source)
    import reprlib
    shown = reprlib.repr(spec)  # bounded: the value may be huge (and shared, from YAML aliases)
    raise ValueError(f"{source}a model spec is a list of layer dicts or a dict with 'layers'. "
                     f"Received {shown}")


def has_batch_statistics(spec) -> bool:
    """Whether the network ``spec`` (anything :func:`resolve_spec` takes) normalises with
    batch statistics anywhere, residual blocks' layers included: then a step's update
    depends on which examples share a batch, not only on their gradients' sum."""
    def walk(layers) -> bool:
        return any(layer.get("type") == "batchnorm" or walk(layer.get("layers", ()))
                   for layer in layers if isinstance(layer, dict))
    return walk(resolve_spec(spec)["layers"])


def build_model(spec, input_shape=None, **kwargs) -> Sequential:
    """Shorthand for :meth:`Sequential.from_spec`."""
    return Sequential.from_spec(spec, input_shape, **kwargs)
