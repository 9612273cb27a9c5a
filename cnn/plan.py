"""The plan: how one backend runs a list of layers, as a list of ops.

:func:`plan_layers` walks the layers once and, at each position, asks the backend's fusions
(:attr:`cnn.backends.base.Backend.fusions`, see :mod:`cnn.backends.fusion`) whether one of them
runs the layers that start there as one op (:class:`FusedOp`); a layer no fusion takes becomes
an op of its own (:meth:`cnn.layers.Layer.plan_op`, by default a :class:`LayerOp`). The model
builds the plan once per backend and its forward and backward walk the ops, all of one shape:

- ``op.layers``: the layers the op runs, in order;
- ``op.forward(params, x, ctx) -> (out, cache)``;
- ``op.backward(params, dout, cache, ctx, need_dx) -> (dx, grads)``, ``grads`` keyed like the
  model's parameters (``"<layer>.<param>"``), one entry per parameter of ``op.layers``.

``params`` is the model's flat dict of parameters and buffers (``{"conv2d.w": array,
"batchnorm.running_mean": array, ...}``); each op takes its layers' own from it. Weight
penalties and gradient callbacks stay the model's business, per layer of each op.

A layer that holds layers of its own (a residual block: a main branch and a shortcut) plugs in
through :meth:`~cnn.layers.Layer.plan_op`: it returns an op whose forward and backward walk
``plan_layers(branch, backend)`` for each branch (:func:`forward_ops`, :func:`backward_ops`, as
the model walks its own), so the backend's fusions apply inside the branches as they do in the
model's own list (:class:`cnn.layers.ResidualOp`).
"""
from __future__ import annotations

from typing import Any, Sequence


def layer_params(layer, params: dict, buffers: dict | None = None) -> dict:
    """The arrays of ``layer`` as its forward and backward take them, keyed by their own names
    (``{"w": ..., "b": ...}``): its parameters from the model's flat ``params``
    (``"<layer>.<param>"``) and its buffers from ``buffers`` (default ``params``, when that
    holds the buffers too)."""
    out = {p: params[f"{layer.name}.{p}"] for p in layer.param_names}
    source = params if buffers is None else buffers
    for b in layer.buffer_names:
        out[b] = source[f"{layer.name}.{b}"]
    return out


class _Keys:
    """A layer's keys in the model's flat dicts, made once per plan (the passes look its
    arrays up and name its gradients every step): ``arrays``, ``(own name, model key)`` of
    each parameter and buffer; ``grads``, own name -> model key of each parameter."""

    __slots__ = ("arrays", "grads")

    def __init__(self, layer):
        self.grads = {p: f"{layer.name}.{p}" for p in layer.param_names}
        self.arrays = tuple((p, f"{layer.name}.{p}")
                            for p in (*layer.param_names, *layer.buffer_names))

    def own(self, params: dict) -> dict:
        """The layer's arrays from the flat ``params`` (which holds the buffers too)."""
        return {p: params[key] for p, key in self.arrays}

    def named(self, grads: dict, out: dict) -> dict:
        """The layer's ``grads`` added to ``out`` under the model's keys."""
        for p, g in grads.items():
            out[self.grads[p]] = g
        return out


class LayerOp:
    """One layer run alone: its own :meth:`~cnn.layers.Layer.forward` and
    :meth:`~cnn.layers.Layer.backward` on the plan's backend."""

    def __init__(self, layer, backend):
        self.layers = (layer,)
        self.backend = backend
        self._keys = _Keys(layer)

    def forward(self, params, x, ctx):
        return self.layers[0].forward(self._keys.own(params), x, self.backend, ctx)

    def backward(self, params, dout, cache, ctx, need_dx):
        dx, grads = self.layers[0].backward(self._keys.own(params), dout, cache, self.backend,
                                            ctx, need_dx=need_dx)
        return dx, self._keys.named(grads, {})

    def __repr__(self) -> str:
        return f"LayerOp({self.layers[0].name})"


class FusedOp:
    """A run of layers that one of the backend's fusions executes as one op."""

    def __init__(self, fusion, layers: Sequence[Any], backend):
        self.fusion = fusion
        self.layers = tuple(layers)
        self.backend = backend
        self._keys = tuple(_Keys(layer) for layer in self.layers)

    def forward(self, params, x, ctx):
        own = [keys.own(params) for keys in self._keys]
        return self.fusion.forward(self.backend, self.layers, own, x, ctx)

    def backward(self, params, dout, cache, ctx, need_dx):
        own = [keys.own(params) for keys in self._keys]
        dx, grads = self.fusion.backward(self.backend, self.layers, own, dout, cache, ctx,
                                         need_dx)
        named: dict = {}
        for keys, layer_grads in zip(self._keys, grads):
            keys.named(layer_grads, named)
        return dx, named

    def __repr__(self) -> str:
        return f"FusedOp({type(self.fusion).__name__}: {', '.join(l.name for l in self.layers)})"


def plan_layers(layers: Sequence[Any], backend) -> tuple:
    """The ops that run ``layers`` on ``backend``, in order: at each layer, the first of the
    backend's fusions that matches the layers starting there takes them as one op; a layer
    none takes is an op of its own."""
    ops: list = []
    i = 0
    while i < len(layers):
        for fusion in backend.fusions:
            run = layers[i:i + len(fusion.pattern)]
            if len(run) == len(fusion.pattern) and fusion.matches(run):
                ops.append(FusedOp(fusion, run, backend))
                break
        else:
            ops.append(layers[i].plan_op(backend))
        i += len(ops[-1].layers)
    return tuple(ops)


def forward_ops(ops: Sequence[Any], params: dict, x, ctx,
                keep_caches: bool = True) -> tuple[Any, list]:
    """``ops``' forwards in order from ``x``: ``(out, caches)``, one cache per op (``(x, [])``
    for no ops). ``keep_caches=False`` (a pass no backward follows) drops each op's cache as
    soon as the next op has run, so a pass holds the activations of one op at a time, not of
    the whole network (``caches`` is then empty)."""
    caches = []
    for op in ops:
        x, cache = op.forward(params, x, ctx)
        if keep_caches:
            caches.append(cache)
    return x, caches


def backward_ops(ops: Sequence[Any], params: dict, dout, caches: Sequence[Any], ctx,
                 need_dx: bool, on_op=None) -> tuple[Any, dict]:
    """``ops``' backwards, last first, from ``dout``: ``(dx, grads)``, ``dx`` the gradient of
    the first op's input (None when ``need_dx`` is False and the first op can skip it; ``dout``
    itself for no ops) and ``grads`` every op's, keyed like the model's parameters.
    ``on_op(op, op_grads)``, if given, is called after each op's backward."""
    grads: dict = {}
    for i in reversed(range(len(ops))):
        dout, op_grads = ops[i].backward(params, dout, caches[i], ctx, need_dx=need_dx or i > 0)
        if on_op is not None:
            on_op(ops[i], op_grads)
        grads.update(op_grads)
    return dout, grads
