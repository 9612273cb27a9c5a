"""Per-channel normalisation of a model's inputs: ``(x - mean_c) / std_c`` for channel ``c``,
with the mean and standard deviation of each channel over the training split (every example
and every pixel of it), computed once when a fit starts (``fit(normalize=True)``, ``train
--normalize``).

Where it lives, and why. The normalisation is a transform of the *data*, not a layer: it has
no parameter to train and no gradient, and as a layer it would cost a pass over every batch on
the critical path of every backend (with kernels of its own on each) and change the spec the
Keras and PyTorch references build. So the fit applies it where the data is prepared, in the
prefetching thread (:mod:`cnn.augment`), and the *model* keeps it (``Sequential.normalization``)
as it keeps its optimizer state: ``evaluate``, ``predict`` and ``predict_logits`` apply it to
the raw images they are given, ``save_weights`` writes it into the weights file beside the spec
(``__normalization__``) and ``load_weights``/``predict`` read it back, a fit's History records
it (``info["normalization"]``) and a backup's identity holds it. A model trained on normalised
images therefore predicts from the same raw images the user gave ``fit``, whoever calls it.
(``forward`` and ``loss_and_grads`` take the network's inputs, normalised already.)

The statistics are the population ones (``ddof=0``, numpy's default), summed in float64 over
chunks of examples (no copy of the training set), and applied in the model's dtype. A channel whose values are all
equal (standard deviation 0) is only centred: it is divided by 1.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

#: examples summed at a time when the statistics are computed (a float64 copy of this many)
CHUNK = 1024


@dataclass(frozen=True)
class Normalization:
    """The per-channel statistics, ``mean[c]`` and ``std[c]`` (Python floats), of images
    ``(N, C, H, W)``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        mean, std = tuple(self.mean), tuple(self.std)
        if not mean or len(mean) != len(std):
            raise ValueError(f"normalization: mean and std must be lists of one number per "
                             f"channel. Received mean={list(mean)!r}, std={list(std)!r}")
        for name, values in (("mean", mean), ("std", std)):
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                        or not math.isfinite(v) or (name == "std" and v <= 0):
                    expected = "positive numbers" if name == "std" else "finite numbers"
                    raise ValueError(f"normalization: {name} must be {expected}. "
                                     f"Received {name}={list(values)!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in mean))
        object.__setattr__(self, "std", tuple(float(v) for v in std))

    @classmethod
    def of(cls, x) -> "Normalization":
        """The statistics of ``x (N, C, H, W)``: per channel, the mean and the population
        standard deviation over every example and pixel (two passes in float64)."""
        x = np.asarray(x)
        if x.ndim != 4 or len(x) == 0:
            raise ValueError(f"normalization: needs images (N, C, H, W), N > 0. Received an "
                             f"array of shape {x.shape}")
        count = x.shape[0] * x.shape[2] * x.shape[3]
        total = np.zeros(x.shape[1])
        for i in range(0, len(x), CHUNK):
            total += x[i:i + CHUNK].sum(axis=(0, 2, 3), dtype=np.float64)
        mean = total / count
        squares = np.zeros(x.shape[1])
        for i in range(0, len(x), CHUNK):
            d = x[i:i + CHUNK].astype(np.float64) - mean[:, None, None]
            squares += np.einsum("nchw,nchw->c", d, d)
        std = np.sqrt(squares / count)
        return cls(tuple(mean), tuple(np.where(std > 0, std, 1.0)))

    @property
    def channels(self) -> int:
        return len(self.mean)

    def check(self, input_shape) -> None:
        """Refuse a normalisation of another number of channels than the inputs'
        ``(C, H, W)``."""
        if len(input_shape) != 3 or input_shape[0] != self.channels:
            raise ValueError(f"normalization of {self.channels} channel(s) for inputs of shape "
                             f"{tuple(input_shape)}")

    def apply(self, x, out=None) -> np.ndarray:
        """``(x - mean) / std`` per channel of ``x (N, C, H, W)``, in ``x``'s dtype, into
        ``out`` when given (which may be ``x``)."""
        shape = (-1, 1, 1)
        out = np.subtract(x, np.asarray(self.mean, x.dtype).reshape(shape), out=out)
        return np.divide(out, np.asarray(self.std, x.dtype).reshape(shape), out=out)

    def config(self) -> dict:
        """``{"mean": [...], "std": [...]}``: what History, backups and weights files hold."""
        return {"mean": list(self.mean), "std": list(self.std)}

    def to_json(self) -> str:
        return json.dumps(self.config())

    @classmethod
    def from_config(cls, config) -> "Normalization":
        if not isinstance(config, dict) or set(config) != {"mean", "std"}:
            raise ValueError(f"normalization: expected {{'mean': [...], 'std': [...]}}. "
                             f"Received {config!r}")
        mean, std = config["mean"], config["std"]
        if not isinstance(mean, (list, tuple)) or not isinstance(std, (list, tuple)):
            raise ValueError(f"normalization: mean and std must be lists of one number per "
                             f"channel. Received mean={mean!r}, std={std!r}")
        return cls(tuple(mean), tuple(std))

    def __str__(self) -> str:
        def numbers(values):
            return ", ".join(f"{v:.4f}" for v in values)
        return f"mean ({numbers(self.mean)}), std ({numbers(self.std)})"


def training_normalization(x, normalize: bool, current: Normalization | None,
                           input_shape) -> Normalization | None:
    """The normalisation a fit on ``x (N, C, H, W)`` trains with: the statistics of ``x`` when
    ``normalize``, else ``current`` (the model's, from an earlier fit or its weights file;
    None: none), checked against the inputs ``(C, H, W)``."""
    normalization = Normalization.of(x) if normalize else current
    if normalization is not None:
        normalization.check(input_shape)
    return normalization


def normalized(x, normalization: Normalization | None) -> np.ndarray:
    """``x`` normalised (a copy) when there is a ``normalization``, else ``x`` itself."""
    return x if normalization is None else normalization.apply(x)
