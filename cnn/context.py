"""What one forward/backward pass needs besides the weights: the :class:`StepContext`.

Every layer's ``forward``/``backward`` and :meth:`cnn.model.Sequential.loss_and_grads` take one.
It says

- whether the pass is **training** (dropout draws masks, batch norm normalises with the
  statistics of the batch and updates its running ones) or inference;
- which **workspace** holds this worker's reusable buffers (im2col columns, activations,
  gradients), so that a training step allocates nothing once the first step has run;
- where the pass sits in training, for randomness that must not depend on who computes it:
  ``seed``, the global optimizer ``step`` and the index ``offset`` of this shard's first example
  within the global batch. A dropout mask is a function of ``(seed, step, offset + i)`` for
  example ``i`` of the shard, so ``sync`` over any number of workers or ranks draws exactly the
  masks the sequential path draws;
- how to **reduce** across the shards of one global batch (``reduce``), for layers whose
  training forward needs statistics of the whole batch (synchronised batch norm): the strategy
  supplies a collective that sums small arrays over all shards (threads: barriers and shared
  slots; processes: shared memory; MPI: ``Allreduce``); on one worker it is the identity.

- which **buffers** (non-trained state: batch norm's running mean and variance) the pass
  reads (``buffers``; ``None``: the model's own), and where a training pass leaves the new
  values it computed for them (``updates``). A pass never writes a buffer: the strategy
  *commits* ``updates`` after the step (:meth:`StepContext.commit`), once per copy of the
  buffers (``sync``: one worker, since all shards compute the same global statistics; each
  replica of ``average``; each MPI rank). A pass nobody commits, such as the JIT warm-up of
  :func:`cnn.train.fit`, changes nothing.

- where the pass records its timeline (``trace``: a :class:`cnn.trace.Lane` of the worker
  when the fit is traced, else None): the model then records each op's forward and backward
  and the loss as spans on it.

Contexts are cheap: a strategy keeps one per worker for the whole fit and updates ``step``,
``offset`` and ``global_batch`` in place before each pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

#: ``reduce(arrays) -> arrays``: the element-wise sums of ``arrays`` over every shard of the
#: global batch, one result per input, same shapes; every shard must call it the same number
#: of times with the same shapes (it is a collective)
Reduce = Callable[[Sequence[Any]], list]


class Workspace:
    """Reusable buffers of one worker, one per ``(name, shape, dtype)``.

    ``buffer`` returns the same array every time it is asked for the same name, shape and
    dtype, allocating it (uninitialised) on the backend the first time. A shape with fewer rows
    than a buffer of the same name, dtype and trailing dimensions already holds (the last,
    smaller batch of an epoch, a smaller shard) gets the first rows of that buffer, a view: a
    step uses one batch shape throughout, so the two never hold live contents at once, and a
    smaller batch costs no memory; alternating shapes never reallocate. :meth:`scope` gives a
    layer its own namespace. Contents survive until the same buffer is requested again by the
    same worker, i.e. a forward's cache stays valid through its backward; never share a
    workspace between threads.
    """

    def __init__(self, backend, prefix: str = "", _store: dict | None = None,
                 _lookup: dict | None = None):
        self.backend = backend
        self.prefix = prefix
        self._store: dict = {} if _store is None else _store
        # the same buffers under the caller's own (prefix, name, shape, dtype): the hot path
        # finds a buffer with one dict lookup, without normalising the shape and dtype
        self._lookup: dict = {} if _lookup is None else _lookup
        self._scopes: dict[str, Workspace] = {}  # name -> its scope, made once

    def buffer(self, name: str, shape: tuple[int, ...], dtype) -> Any:
        """The persistent buffer ``name`` of ``shape`` and ``dtype`` (contents undefined)."""
        raw = (self.prefix, name, shape, dtype)
        try:
            return self._lookup[raw]
        except (KeyError, TypeError):  # TypeError: an unhashable shape, e.g. a list
            pass
        key = (self.prefix + name, tuple(int(s) for s in shape), np.dtype(dtype).str)
        buf = self._store.get(key)
        if buf is None:
            buf = self._rows_of_larger(key)
        if buf is None:
            buf = self._store[key] = self.backend.empty(key[1], np.dtype(dtype))
        try:
            self._lookup[raw] = buf
        except TypeError:
            pass
        return buf

    def _rows_of_larger(self, key) -> Any:
        """The first rows of a stored buffer of the same name, dtype and trailing dimensions
        that has at least ``key``'s rows (a view), or None."""
        name, shape, dtype = key
        if not shape:
            return None
        for (other, held, held_dtype), buf in self._store.items():
            if (other == name and held_dtype == dtype and len(held) == len(shape)
                    and held[1:] == shape[1:] and held[0] >= shape[0]):
                return buf[:shape[0]]
        return None

    def zeros(self, name: str, shape: tuple[int, ...], dtype) -> Any:
        """:meth:`buffer`, filled with zeros."""
        buf = self.buffer(name, shape, dtype)
        self.backend.fill_zero(buf)
        return buf

    def scope(self, name: str) -> "Workspace":
        """A view of this workspace whose buffer names are prefixed by ``name`` (per layer);
        the same view every time (a layer asks for its scope at every pass)."""
        scoped = self._scopes.get(name)
        if scoped is None:
            scoped = self._scopes[name] = Workspace(self.backend, f"{self.prefix}{name}/",
                                                    self._store, self._lookup)
        return scoped

    @property
    def nbytes(self) -> int:
        """Bytes held by all buffers of this worker (all scopes)."""
        return int(sum(b.nbytes for b in self._store.values()))

    def __len__(self) -> int:
        return len(self._store)


@dataclass
class StepContext:
    """The pass's mode, workspace, position in training and cross-shard reduction.

    Attributes:
        training: True in a training step; False for evaluation and prediction.
        workspace: this worker's :class:`Workspace`, or None to allocate per call (tests,
            evaluation).
        seed: the fit's seed (with ``step`` and the example index it keys dropout masks).
        step: the global optimizer step, 0-based, counted across epochs and ``fit`` calls.
        offset: index of this shard's first example within the global batch.
        global_batch: examples in the global batch over all shards (None: this shard is the
            whole batch).
        reduce: sums arrays over all shards of the global batch (see the module docstring);
            None means one shard, i.e. the identity.
        buffers: ``{"<layer>.<buffer>": array}`` the pass reads (backend arrays); None: the
            model's own host buffers.
        updates: filled by a training pass: ``{"<layer>.<buffer>": new array}``, the values
            the buffers should take after this step (see :meth:`commit`). Cleared by the
            model at the start of every forward.
        trace: the worker's :class:`cnn.trace.Lane` when the fit records a timeline, else
            None (the passes then test this one attribute and record nothing).
    """

    training: bool = False
    workspace: Workspace | None = None
    seed: int = 0
    step: int = 0
    offset: int = 0
    global_batch: int | None = None
    reduce: Reduce | None = field(default=None, repr=False)
    buffers: dict | None = field(default=None, repr=False)
    updates: dict = field(default_factory=dict, repr=False)
    trace: Any = field(default=None, repr=False)

    def scope(self, name: str) -> Workspace | None:
        """The workspace of the layer called ``name`` (None when this pass has none)."""
        return None if self.workspace is None else self.workspace.scope(name)

    def sum_over_shards(self, arrays: Sequence[Any]) -> list:
        """``arrays`` summed over every shard of the global batch (themselves on one shard)."""
        return list(arrays) if self.reduce is None else self.reduce(arrays)

    def commit(self, buffers: dict | None = None, copy: bool = False) -> None:
        """Make this pass's buffer ``updates`` the current values of ``buffers`` (default
        ``self.buffers``), then forget the updates.

        By default each key is *rebound* to its new array, never written into, so a pass still
        reading the old values (a racing ``hogwild`` worker) reads a consistent old array.
        ``copy=True`` writes the new values into the existing (host) arrays instead, for
        buffers that others reach through views: shared memory between processes, or flat
        views that a strategy averages."""
        target = self.buffers if buffers is None else buffers
        if self.updates and target is None:
            raise ValueError("StepContext.commit: no buffers to commit the updates to")
        for key, value in self.updates.items():
            if key not in target:
                raise KeyError(f"StepContext.commit: {key!r} is not a buffer of this model")
            if copy:
                target[key][...] = value
            else:
                target[key] = value
        self.updates.clear()
