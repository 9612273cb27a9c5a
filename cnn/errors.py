"""The errors a user of the package may catch, in one module every layer can import.

:class:`DivergedError` is raised by the fit loop and by the strategies (an MPI rank that finds
a non-finite loss), caught by the CLI (exit status 3) and by the study (a diverged run is a
result, not a failure), so it lives below all of them. :class:`MissingExtraError` is raised
wherever an optional dependency is first needed (:func:`cnn.extras.require`) and caught by the
CLI (exit status 2), as is :class:`DeviceUnavailableError` (``--backend cuda`` without a GPU).
"""
from __future__ import annotations

from typing import Any


class DivergedError(FloatingPointError):
    """Training produced a non-finite loss (or non-finite weights): the run diverged.

    Raised by :func:`fit` (with ``on_nonfinite="raise"``, the default) at the first step whose
    loss is NaN or infinite, naming the epoch and the step, so that callers (the CLI, the
    study) can tell a diverged run from a failed one and record it as such.

    Attributes:
        epoch: the 1-based epoch in which it happened.
        step: the 1-based step within that epoch (for ``phase="validation"``/``"weights"``, the
            last step of the epoch, after whose update the problem was found).
        loss: the non-finite value (a float; for ``phase="weights"``, NaN).
        phase: ``"train"`` (a training step's loss), ``"validation"`` (the end-of-epoch
            validation loss) or ``"weights"`` (the parameters after the last update).
        history: the :class:`History` of the epochs completed before it (set by :func:`fit`).

    The model then holds the parameters of the step that diverged (non-finite), so that they
    can be inspected; nothing is saved.
    """

    def __init__(self, epoch: int, step: int, loss: float, phase: str = "train",
                 detail: str = ""):
        self.epoch, self.step, self.loss, self.phase = int(epoch), int(step), float(loss), phase
        self.history: Any = None
        what = {"train": f"the training loss is {loss}",
                "validation": f"the validation loss is {loss}",
                "weights": "the weights are no longer finite"}.get(phase, f"{phase} is {loss}")
        where = (f"at epoch {epoch}, step {step}" if phase == "train"
                 else f"after epoch {epoch} (step {step})")
        super().__init__(f"training diverged: {what} {where}{detail}; lower the learning rate "
                         f"or check the inputs (fit(on_nonfinite='continue') keeps going)")

    def __reduce__(self):  # picklable across processes, with its attributes
        return (type(self), (self.epoch, self.step, self.loss, self.phase))


class MissingExtraError(ImportError):
    """A command or function needs an optional part of the package (an *extra* of
    ``pyproject.toml``: ``plot``, ``keras``, ``torch``, ``mpi``, ``study``, ...) that is not
    installed. Raised by :func:`cnn.extras.require` before any work starts; the message names
    what needed it, the missing modules, the extra and the ``pip`` command that adds it. The
    CLI reports it as an ``error:`` line with exit status 2.

    Attributes:
        extra: the extra's name.
        missing: the modules that could not be found.
    """

    def __init__(self, message: str, extra: str = "", missing: tuple[str, ...] = ()):
        super().__init__(message)
        self.extra, self.missing = extra, tuple(missing)

    def __reduce__(self):
        return (type(self), (str(self), self.extra, self.missing))


class DeviceUnavailableError(RuntimeError):
    """A backend's device cannot be used here: the ``cuda`` backend on a machine without an
    NVIDIA GPU or without its driver. Raised when the backend is first asked for (before any
    work); the message says which of the two and how to run without one (Numba's CUDA
    simulator). The CLI reports it as an ``error:`` line with exit status 2."""


class Interrupted(KeyboardInterrupt):
    """A stop asked for during :func:`cnn.train.fit` (Ctrl-C or SIGTERM in the command line,
    :meth:`cnn.parallel.base.Strategy.request_stop` in code), honoured at a step boundary: the
    model holds the weights of a whole step, and every process of an MPI job stops after the
    same step.

    Attributes:
        epoch: the 1-based epoch it stopped in.
        batches, examples: batches and examples of that epoch done (``examples == total``
            when it stopped at the end of the epoch).
        total: the examples of an epoch.
        backup: the backup written at that point (:mod:`cnn.backup`), or None.
    """

    def __init__(self, epoch: int, batches: int, examples: int, total: int,
                 backup: Any = None):
        self.epoch, self.batches, self.examples, self.total = epoch, batches, examples, total
        self.backup = backup
        super().__init__(f"stopped in epoch {epoch} after {examples} of {total} examples")

    def __reduce__(self):
        return (type(self), (self.epoch, self.batches, self.examples, self.total, self.backup))
