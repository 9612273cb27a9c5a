"""The ``numba`` backend's conv algorithms side by side: each op of a training step that runs a
conv (fused with its ReLU and pooling where the backend fuses them) and the whole step
(forward, loss and backward), on the same data, under each algorithm.

    python -m cnn.bench.conv_algorithms [--presets cifar_tutorial] [--batch-sizes 32 128]
        [--algorithms direct auto] [--rounds 40] [--dtype float32] [--cpu-time]

One process, one backend instance per algorithm (``NumbaBackend(conv_algorithm=...)``), each
with its own workspace, BLAS pinned to one thread (threadpoolctl), as in a training step after
the first. Every round calls the op once under each algorithm, in turn, the order reversed
from one round to the next, so that a shared machine's drift hits all of them alike.

Printed: the algorithm every conv layer runs (``direct`` or Winograd's ``F(m x m, 3 x 3)``);
in float32, at the first batch size, each conv layer's error under each algorithm, forward,
``dx`` and ``dw``, against the float64 conv and against the first algorithm
(:func:`layer_errors`); then per op the median milliseconds of each algorithm and the median
over the rounds of each algorithm's time over the first one's (< 1: faster than the first),
with the largest difference of its outputs from the first algorithm's, relative to the
largest value (behind a fused pooling it includes the windows where rounding picked another
maximum).
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import numpy as np
from threadpoolctl import threadpool_limits

from ..backends.numba.backend import CONV_ALGORITHMS, NumbaBackend
from ..context import StepContext, Workspace
from ..machine import describe
from ..model import build_model

def conv_layers(model, backend, named: bool = True) -> list[str]:
    """``name: algorithm`` of every conv layer of ``model`` on ``backend``, those of residual
    blocks included (``model.leaves``), from each layer's input and output shapes; without
    ``named``, each distinct ``C->F HoxWo: algorithm`` once, with its count when > 1."""
    out = []
    for layer in model.leaves:
        if layer.type == "conv2d":
            c, (f, ho, wo) = layer.input_shape[0], layer.output_shape
            kh, kw = layer.kernel_size
            m = backend.winograd_tile(c, f, kh, kw, layer.stride, ho, wo)
            out.append((layer.name, f"{c}->{f} {ho}x{wo}: "
                        + (f"winograd F({m}x{m}, 3x3)" if m else "direct")))
    if named:
        return [f"{name} {what}" for name, what in out]
    counts = Counter(what for _, what in out)
    return [what + (f" x{counts[what]}" if counts[what] > 1 else "") for what in counts]


def algorithm_summary(model) -> str:
    """The conv algorithm a default ``numba`` backend runs on the conv layers of ``model``
    (what ``get_backend("numba")`` makes of ``$CNN_NUMBA_CONV_ALGORITHM`` in this process),
    per distinct layer shape."""
    be = NumbaBackend()
    return f"{be.conv_algorithm} ({'; '.join(conv_layers(model, be, named=False))})"


class _Step:
    """One algorithm's training step on one batch, op by op, with the inputs and output
    gradients each op sees in a real step (in its backend's layout)."""

    def __init__(self, model, backend, x, y):
        self.model, self.backend, self.x, self.y = model, backend, x, y
        self.ctx = StepContext(training=True, workspace=Workspace(backend))
        self.params = {**model.params, **model.buffers}
        self.ops = model.plan(backend)
        self.inputs, self.douts = [], [None] * len(self.ops)
        h = x
        caches = []
        for op in self.ops:
            self.inputs.append(h)
            h, cache = op.forward(self.params, h, self.ctx)
            caches.append(cache)
        _, d, _ = model.loss(h, y, backend, ws=self.ctx.scope("__loss__"))
        for i in range(len(self.ops) - 1, -1, -1):
            # a copy in d's own layout (channels-last views stay so): the next op's
            # backward may overwrite d
            self.douts[i] = np.array(d, copy=True, order="K")
            d, _ = self.ops[i].backward(self.params, d, caches[i], self.ctx, i > 0)

    def forward(self, i):
        return lambda: self.ops[i].forward(self.params, self.inputs[i], self.ctx)

    def backward(self, i):
        """The op's backward, after its own forward (the cache it reads)."""
        op = self.ops[i]
        cache = op.forward(self.params, self.inputs[i], self.ctx)[1]
        return lambda: op.backward(self.params, self.douts[i], cache, self.ctx, i > 0)

    def step(self):
        return lambda: self.model.loss_and_grads(self.x, self.y, backend=self.backend,
                                                 ctx=self.ctx)


def _arrays(result):
    """The arrays of an op's result: a forward's output, a backward's ``dx`` and gradients,
    a step's loss and gradients."""
    first, second = result[0], result[1]
    if isinstance(second, dict):  # a backward: (dx, grads)
        return ([] if first is None else [first]) + [second[k] for k in sorted(second)]
    if len(result) == 3:  # a step: (loss, correct, grads)
        return [np.asarray(first)] + [result[2][k] for k in sorted(result[2])]
    return [first]


def _relative_errors(ref, got) -> str:
    errs = [float(np.abs(np.asarray(g, np.float64) - r).max() / max(np.abs(r).max(), 1e-30))
            for r, g in zip(ref, got)]
    return "max " + f"{max(errs):.1e}"


def layer_errors(model, backends: dict, reference: str = "direct") -> None:
    """Print, for every conv layer of ``model`` (float32) on its input in a forward pass of
    random images, the error of each algorithm's forward, ``dx`` and ``dw`` against the float64
    direct conv (max abs, and relative to the largest value), and between the algorithms (the
    others against ``reference``). Plain convs with a random output gradient: behind a fused
    pooling, an algorithm's rounding may pick another maximum in a near-tie, which is no
    error of the conv."""
    exact = NumbaBackend(conv_algorithm="direct")
    rng = np.random.default_rng(1)
    h = rng.standard_normal((8, *model.input_shape)).astype(model.dtype)
    params = {**model.params, **model.buffers}
    print(f"float32 error per conv layer (8 images): max |error| (relative to the largest "
          f"value) against float64, and against {reference} in float32")
    for op in model.plan(exact):
        layer = op.layers[0]
        if layer.type == "conv2d":
            w, b = params[f"{layer.name}.w"], params[f"{layer.name}.b"]
            x = np.ascontiguousarray(h)
            out64, cache = exact.conv2d_forward(x.astype(np.float64), w.astype(np.float64),
                                                b.astype(np.float64), layer.stride, layer.pads)
            dout = rng.standard_normal(out64.shape)
            truth = (out64, *exact.conv2d_backward(dout, cache)[:2])
            got = {}
            for name, be in backends.items():
                out, c = be.conv2d_forward(x, w, b, layer.stride, layer.pads)
                got[name] = [np.array(a, np.float64)
                             for a in (out, *be.conv2d_backward(dout.astype(w.dtype), c)[:2])]
            for name, arrays in got.items():
                cells = []
                for what, a, t, r in zip(("out", "dx", "dw"), arrays, truth, got[reference]):
                    err, diff = np.abs(a - t).max(), np.abs(a - r).max()
                    cells.append(f"{what} {err:.1e} ({err / np.abs(t).max():.1e})"
                                 + ("" if name == reference else
                                    f" / {diff:.1e} ({diff / np.abs(r).max():.1e})"))
                print(f"  {layer.name:<10}{name:<10}" + ";  ".join(cells))
        h, _ = op.forward(params, h, StepContext(training=True))


def compare(label: str, calls: dict, rounds: int, clock) -> dict:
    """Time ``calls`` (algorithm -> zero-argument call) with ``clock``, interleaved; print and
    return the median milliseconds and median ratios to the first algorithm."""
    names = list(calls)
    ref = None
    errors = []
    for name in names:
        calls[name]()  # warm-up
        arrays = [np.array(a, dtype=np.float64) for a in _arrays(calls[name]())]
        if ref is None:
            ref = arrays
        else:
            errors.append(_relative_errors(ref, arrays))
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = clock()
            calls[name]()
            times[name].append(clock() - t0)
    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    ratios = {name: statistics.median(t / t0 for t, t0 in zip(times[name], times[names[0]]))
              for name in names[1:]}
    print(f"{label:<28}" + "".join(f"{med[n]:10.3f}" for n in names)
          + "".join(f"{ratios[n]:10.3f}" for n in names[1:])
          + ("   rel. diff " + ", ".join(errors) if errors else ""))
    return {"ms": med, "ratio": ratios}


def bench(preset: str, batch: int, algorithms, rounds: int, dtype, clock,
          errors: bool) -> None:
    """The tables of ``preset`` at ``batch`` (see the module doc); ``errors``: with the
    per-layer errors."""
    model = build_model(preset, seed=0, dtype=dtype)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *model.input_shape)).astype(dtype)
    y = rng.integers(0, model.num_classes, batch)
    backends = {a: NumbaBackend(conv_algorithm=a) for a in algorithms}
    steps = {a: _Step(model, be, x, y) for a, be in backends.items()}
    first = steps[algorithms[0]]
    print(f"\n{preset}, batch {batch}, {np.dtype(dtype).name}: median ms of {rounds} "
          f"interleaved rounds; ratio = median over rounds of time / {algorithms[0]}'s")
    for a, be in backends.items():
        print(f"  {a}: " + "; ".join(conv_layers(model, be)))
    if errors:
        layer_errors(model, backends, algorithms[0])
    head = f"{'op':<28}" + "".join(f"{a:>10}" for a in algorithms) \
        + "".join(f"{'/' + algorithms[0][:8]:>10}" for _ in algorithms[1:])
    print(head)
    print("-" * len(head))
    for i, op in enumerate(first.ops):
        if op.layers[0].type != "conv2d":
            continue
        name = "+".join(layer.name for layer in op.layers)
        compare(f"{name} fwd", {a: s.forward(i) for a, s in steps.items()}, rounds, clock)
        compare(f"{name} bwd", {a: s.backward(i) for a, s in steps.items()}, rounds, clock)
    compare("training step (fwd+bwd)", {a: s.step() for a, s in steps.items()}, rounds, clock)


def suite(repeats: int = 40, quick: bool = False, presets=None, batch_sizes=None,
          dtype: str = "float32", cpu_time: bool = False,
          algorithms=("direct", "auto")) -> None:
    """The tables for every preset and batch size (defaults: ``cifar_tutorial``, 32 and 128),
    ``repeats`` interleaved rounds each. ``cpu_time``: time the calling thread's CPU time
    (every op runs on it, BLAS at one thread), which a busy shared machine disturbs less than
    the wall clock. ``quick`` needs nothing beyond the one repeat it is given."""
    clock = time.thread_time if cpu_time else time.perf_counter
    if cpu_time:
        print("timing: CPU time of the calling thread")
    real = np.dtype(dtype).type
    print(describe())
    NumbaBackend().warmup(real)
    batch_sizes = batch_sizes or (32, 128)
    with threadpool_limits(limits=1, user_api="blas"):
        for preset in presets or ("cifar_tutorial",):
            for batch in batch_sizes:
                bench(preset, batch, list(algorithms), repeats, real, clock,
                      errors=batch == batch_sizes[0] and real == np.float32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["cifar_tutorial"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 128])
    p.add_argument("--algorithms", nargs="+", default=["direct", "auto"],
                   choices=list(CONV_ALGORITHMS))
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--cpu-time", action="store_true",
                   help="time the calling thread's CPU time (a busy machine disturbs it less)")
    a = p.parse_args(argv)
    suite(a.rounds, presets=a.presets, batch_sizes=a.batch_sizes, dtype=a.dtype,
          cpu_time=a.cpu_time, algorithms=a.algorithms)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
