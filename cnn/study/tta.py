"""Time-to-accuracy (MLPerf Training style): evaluate every k steps on a validation split
carved from the training set, record the trace, stop at the first evaluation that reaches the
target. A :class:`cnn.train.Callback` on the fit loop's step hook."""
from __future__ import annotations

import math
import time

from ..checks import check_int
from ..train import Callback


class TimeToAccuracy(Callback):
    """Evaluate on ``(x_val, y_val)`` every ``every`` steps (and after the last step of the
    fit, by the caller); stop training when validation accuracy >= ``target`` (None: never).

    ``trace`` holds ``[step, examples, training seconds, validation accuracy]`` per
    evaluation; the training clock is the fit loop's, which leaves the evaluations out.
    ``reached`` is the first entry at or above the target (None while not reached)."""

    def __init__(self, x_val, y_val, every: int, target: float | None = None):
        check_int("TimeToAccuracy", "every", every)
        self.x_val, self.y_val, self.every, self.target = x_val, y_val, every, target
        self.trace: list[list[float]] = []
        self.reached: list[float] | None = None
        self.eval_seconds = 0.0
        self._last_step = 0

    def on_step_end(self, step: int, logs: dict) -> bool:
        if step % self.every:
            return False
        return self._evaluate(step, logs)

    def _evaluate(self, step: int, logs: dict) -> bool:
        t = time.perf_counter()
        acc = float(logs["evaluate"](self.x_val, self.y_val)["accuracy"])
        self.eval_seconds += time.perf_counter() - t
        self._last_step = step
        entry = [int(step), int(logs["examples"]), float(logs["elapsed"]), acc]
        self.trace.append(entry)
        if self.reached is None and self.target is not None and math.isfinite(acc) \
                and acc >= self.target:
            self.reached = entry
            return True
        return False

    def get_state(self) -> dict:
        return {"trace": self.trace, "reached": self.reached, "eval_seconds": self.eval_seconds,
                "last_step": self._last_step}

    def set_state(self, state: dict) -> None:
        self.trace, self.reached = [list(e) for e in state["trace"]], state["reached"]
        self.eval_seconds, self._last_step = float(state["eval_seconds"]), int(state["last_step"])

    def summary(self) -> dict:
        """``tta_status``, ``time_to_target``, ``steps_to_target``, ``examples_to_target``."""
        if self.target is None:
            return {"tta_status": ""}
        if self.reached is None:
            return {"tta_status": "not reached"}
        step, examples, seconds, _ = self.reached
        return {"tta_status": "reached", "time_to_target": seconds,
                "steps_to_target": float(step), "examples_to_target": float(examples)}
