"""A monitored metric: the value of the epoch logs (``val_loss``, ``val_accuracy``, ...) that
early stopping, checkpoints and the plateau schedule watch, whether it should go down or up,
and Keras's rule for when it improved. Shared by :mod:`cnn.callbacks` and
:mod:`cnn.schedules`, so the two decide alike.
"""
from __future__ import annotations

from typing import Any

from .checks import check_choice

MODES = ("auto", "min", "max")


def check_monitor(owner: str, monitor: Any) -> str:
    """``monitor`` when it is a non-empty metric name, else a ``ValueError`` naming it."""
    if not isinstance(monitor, str) or not monitor:
        raise ValueError(f"{owner}: monitor must be the name of a logged metric (val_loss, "
                         f"val_accuracy, loss, accuracy). Received monitor={monitor!r}")
    return monitor


def resolve_mode(owner: str, mode: Any, monitor: str) -> str:
    """``"min"`` or ``"max"``: ``mode`` itself, or for ``"auto"`` ``max`` for an accuracy and
    ``min`` for a loss (a ``ValueError`` when the name says neither)."""
    check_choice(owner, "mode", mode, MODES)
    if mode != "auto":
        return mode
    name = monitor.removeprefix("val_")
    if "loss" in name:
        return "min"
    if "acc" in name:
        return "max"
    raise ValueError(f"{owner}: cannot tell whether monitor={monitor!r} should go up or down; "
                     "pass mode='min' or mode='max'")


def has_improved(mode: str, current: float, best: float | None, min_delta: float) -> bool:
    """Keras's rule: the first value improves; then ``current < best - min_delta`` (min) or
    ``current > best + min_delta`` (max)."""
    if best is None:
        return True
    if mode == "min":
        return current + min_delta < best
    return current - min_delta > best
