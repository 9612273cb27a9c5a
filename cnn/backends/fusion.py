"""Fusions: runs of consecutive layers that a backend executes as one op.

A backend declares the fusions it implements in :attr:`Backend.fusions
<cnn.backends.base.Backend.fusions>`, in the order it prefers them (longer runs first). The
model's plan (:func:`cnn.plan.plan_layers`) walks the layers and, at each position, asks them
in turn whether they :meth:`~Fusion.matches` the layers that start there; the first that does
runs them as one op, and a layer no fusion takes runs alone. So a backend's optimisation
stays in the backend: the layers know nothing of it, and the model's forward and backward walk
ops without knowing which are fused.

A fusion recognises layers by their ``type`` (``"conv2d"``, ``"relu"``, ...), so the backends
never import the layer classes; it reads the configuration it needs from the layers (a conv's
``stride`` and ``pads``, a pooling's ``pool_size`` and ``stride``) and calls the backend's fused
ops with it. Like a layer, it takes each layer's own parameters (``{"w": ..., "b": ...}``) and
returns each layer's gradients keyed the same way, and it gives every backend op the workspace
scope of one layer of its run (``ctx.scope(layer.name)``).
"""
from __future__ import annotations

from typing import Any, Sequence


class Fusion:
    """A run of layers, matched by their types, that one backend op executes.

    Subclasses set :attr:`pattern` and implement :meth:`forward` and :meth:`backward`; one
    that handles only some configurations of those layers also overrides :meth:`matches`.
    """

    #: the ``type`` of each layer of the run, in order
    pattern: tuple[str, ...] = ()

    def matches(self, layers: Sequence[Any]) -> bool:
        """Whether this fusion runs ``layers`` (consecutive layers of a model, as many as the
        pattern has) as one op: their types are the pattern's."""
        return tuple(layer.type for layer in layers) == self.pattern

    def forward(self, backend, layers, params: Sequence[dict], x, ctx):
        """The run's forward on ``backend``: ``x`` (the first layer's input) -> ``(out,
        cache)``, ``out`` the last layer's output. ``params[i]`` holds the parameters and
        buffers of ``layers[i]``, as :meth:`cnn.layers.Layer.forward` takes them."""
        raise NotImplementedError

    def backward(self, backend, layers, params: Sequence[dict], dout, cache, ctx,
                 need_dx: bool):
        """``dout`` (the gradient of the last layer's output) -> ``(dx, grads)``: ``dx`` that
        of the first layer's input (None when ``need_dx`` is False and the run can skip it),
        ``grads[i]`` the gradients of ``layers[i]``'s parameters, keyed like them."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self.pattern)})"


class ConvReluMaxPool(Fusion):
    """A Conv2D, a ReLU and a MaxPool2D as one op (``conv2d_relu_maxpool2d_*`` of the
    backend), which can pool the conv output piece by piece while it is in cache instead of
    writing it whole, and read back only the pooled gradient in the backward."""

    pattern = ("conv2d", "relu", "maxpool2d")

    def matches(self, layers):
        # the fused op adds the conv's bias: a conv without one (use_bias=False) runs unfused
        return super().matches(layers) and layers[0].use_bias

    def forward(self, backend, layers, params, x, ctx):
        conv, _, pool = layers
        return backend.conv2d_relu_maxpool2d_forward(x, params[0]["w"], params[0]["b"],
                                                     conv.stride, conv.pads, pool.pool_size,
                                                     pool.stride, ws=ctx.scope(conv.name))

    def backward(self, backend, layers, params, dout, cache, ctx, need_dx):
        dx, dw, db = backend.conv2d_relu_maxpool2d_backward(dout, cache, need_dx=need_dx,
                                                            ws=ctx.scope(layers[0].name))
        return dx, [{"w": dw, "b": db}, {}, {}]


class ReluMaxPool(Fusion):
    """A ReLU and a MaxPool2D as one op (``maxpool2d_relu_*`` of the backend). Max and ReLU
    commute (``maxpool(relu(x)) == relu(maxpool(x))``, with the same gradients), so the ReLU
    acts on the pooled values, a ``pool*pool``-th of its input, and its mask rides in the
    pooling's window indices: two passes over the larger activation are saved each way."""

    pattern = ("relu", "maxpool2d")

    def forward(self, backend, layers, params, x, ctx):
        pool = layers[1]
        return backend.maxpool2d_relu_forward(x, pool.pool_size, pool.stride,
                                              ws=ctx.scope(pool.name))

    def backward(self, backend, layers, params, dout, cache, ctx, need_dx):
        return backend.maxpool2d_relu_backward(dout, cache, ws=ctx.scope(layers[1].name)), [{}, {}]


class BatchNormRelu(Fusion):
    """A BatchNorm and a ReLU as one op: the normalisation writes the ReLU's output, and the
    backward passes of batch norm apply the ReLU's mask as they read ``dout``, so the ReLU's
    own passes (reading and writing the activation each way) are saved.

    It runs the batch norm layer's own :meth:`~cnn.layers.BatchNorm.forward` and
    :meth:`~cnn.layers.BatchNorm.backward`, so the statistics, synchronised over the shards of
    a global batch, and the running updates are the layer's, written once: the layer is
    handed the backend through :class:`_ReluAfterBatchNorm`, whose batch-norm normalisations
    and backward passes are the backend's ``batchnorm_relu_*`` ops."""

    pattern = ("batchnorm", "relu")

    def forward(self, backend, layers, params, x, ctx):
        return layers[0].forward(params[0], x, _ReluAfterBatchNorm(backend), ctx)

    def backward(self, backend, layers, params, dout, cache, ctx, need_dx):
        dx, grads = layers[0].backward(params[0], dout, cache, _ReluAfterBatchNorm(backend),
                                       ctx, need_dx=need_dx)
        return dx, [grads, {}]


class _ReluAfterBatchNorm:
    """A backend whose batch-norm normalisations apply a ReLU: its ``batchnorm_train_forward``,
    ``batchnorm_infer_forward``, ``batchnorm_backward_sums`` and ``batchnorm_backward_dx`` are
    the backend's ``batchnorm_relu_*`` ops (same signatures); every other attribute is the
    backend's own."""

    def __init__(self, backend):
        self._backend = backend
        self.batchnorm_train_forward = backend.batchnorm_relu_train_forward
        self.batchnorm_infer_forward = backend.batchnorm_relu_infer_forward
        self.batchnorm_backward_sums = backend.batchnorm_relu_backward_sums
        self.batchnorm_backward_dx = backend.batchnorm_relu_backward_dx

    def __getattr__(self, name):
        return getattr(self._backend, name)


#: the fusions, one instance each (a fusion holds no state): what backends list in ``fusions``
CONV_RELU_MAXPOOL = ConvReluMaxPool()
RELU_MAXPOOL = ReluMaxPool()
BATCHNORM_RELU = BatchNormRelu()
