"""Data augmentation of training images, and the input pipeline a training batch goes through.

The standard augmentation of CIFAR-10 (He et al., CVPR 2016, section 4.2, after Lee et al.
2015): each training image is padded with 4 pixels of zeros on each side, a random crop of the
image's size (32 x 32) is taken from the padded image, and it is flipped horizontally with
probability 1/2. ``fit(augment="cifar")``, ``train --augment``, or a dict of the options:

- ``pad`` [0]: zero pixels added on each side, at most half the image's smaller side (so every
  crop holds at least half of the image in each direction);
- ``crop`` [the image's size]: the crop's size, an int or ``[height, width]``; it must be the
  image's size, since the network takes the test images as they are (the option is there to
  say so explicitly, as the paper's "32 x 32 crop" does);
- ``flip`` [false]: a horizontal flip of the crop with probability 1/2.

Augmentation applies to images: inputs ``(C, H, W)`` with ``H`` and ``W`` at least 2 (feature
vectors ``(1, 1, D)`` are refused). Evaluation and prediction never augment.

The draws. Every example's crop and flip are *computed* from the counter-based generator of
:mod:`cnn.backends.rng`, not drawn from a stateful one: for the example of index ``i`` in the
training set, in epoch ``e`` of a fit with seed ``s``,

    key   = pass_key(s, "__augment__", e)              once per epoch
    row   = mix64(key + (i + 1) * GOLDEN)              once per example      (index_keys)
    top   = uniform_below(row, 0, 2 pad + 1)           the crop's first row in the padded image
    left  = uniform_below(row, 1, 2 pad + 1)           its first column
    flip  = uniform_below(row, 2, 2) == 1              only with flip

(``uniform_below(row, j, n) = ((mix64(row + (j + 1) GOLDEN) >> 32) n) >> 32``, each value within
``2**-32`` of ``1/n``). The augmented example is a function of ``(seed, epoch, i)`` alone: the
same whichever batch it falls in, whichever worker, process or rank gathers it, and after a
resume from a backup; so ``sync`` with augmentation still equals the sequential path, and a
resumed fit the uninterrupted one, bit for bit. The Keras and PyTorch references train on the
arrays this module makes (:func:`epoch_batches`), so they see the same augmented batches.

The pipeline (:class:`InputPipeline`, in the fit's prefetching thread, off the critical path):
gather the batch's examples, apply the model's normalisation (:mod:`cnn.normalize`), then pad
with zeros, crop and flip. Padding after the normalisation pads with the channel's mean pixel,
as the paper's reference code (facebook/fb.resnet.torch: ``ColorNormalize``, then
``RandomCrop(32, 4)`` with zero padding) does. All of it is vectorised over the batch: the
crop and flip are one ``np.take`` of precomputed source indices from a zero-bordered buffer,
into the prefetcher's reused batch buffer; no buffer is allocated per batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backends.rng import index_keys, pass_key, uniform_below
from .checks import check_bool, check_int, check_pair
from .files import parse_inline

#: the name hashed into the augmentation's key (a layer's name keys its dropout masks; no
#: layer is named so)
STREAM = "__augment__"
#: augmentations known by name
NAMED = {"cifar": {"pad": 4, "flip": True}}
#: the options of an augmentation spec
OPTIONS = ("pad", "crop", "flip")
#: spec values that mean no augmentation
NONE = (None, "none", "")


@dataclass(frozen=True)
class Augmentation:
    """Zero padding of ``pad`` pixels, a random crop of ``crop`` = ``(height, width)`` (None:
    the image's size), and, with ``flip``, a random horizontal flip of the crop."""

    pad: int = 0
    flip: bool = False
    crop: tuple[int, int] | None = None

    def config(self) -> dict:
        """The spec, ``{"pad": 4, "flip": True}`` (``crop`` only when given): what History
        records and backups compare."""
        out: dict = {"pad": self.pad, "flip": self.flip}
        if self.crop is not None:
            out["crop"] = list(self.crop)
        return out

    def text(self) -> str:
        """The canonical text, ``pad=4,flip=true`` (and ``crop=HxW`` when given): the study's
        ``augment`` column, which :func:`make_augmentation` reads back."""
        text = f"pad={self.pad},flip={'true' if self.flip else 'false'}"
        if self.crop is not None:
            text += f",crop={self.crop[0]}x{self.crop[1]}"
        return text

    def check(self, input_shape) -> None:
        """Refuse inputs ``(C, H, W)`` this augmentation cannot apply to, naming the value."""
        shape = tuple(input_shape)
        if len(shape) != 3 or min(shape[1:]) < 2:
            raise ValueError(f"augment: needs images (C, H, W) of at least 2 x 2 pixels; the "
                             f"inputs are {shape}")
        h, w = shape[1:]
        most = min(h, w) // 2
        if self.pad > most:
            raise ValueError(f"augment: pad must be at most half the image's smaller side "
                             f"({most} for {h} x {w} images), so that every crop holds at "
                             f"least half of the image. Received pad={self.pad}")
        if self.crop is not None and tuple(self.crop) != (h, w):
            raise ValueError(f"augment: crop must be the image's size {h} x {w} (the network "
                             f"takes the test images as they are). Received crop="
                             f"{list(self.crop)}")

    def draws(self, seed: int, epoch: int, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(top, left, flipped)`` of the examples ``indices`` (their indices in the
        training set) in ``epoch``: the crop's first row and column in the padded image, in
        ``[0, 2 pad]``, and whether it is flipped (see the module docstring)."""
        rows = index_keys(pass_key(seed, STREAM, epoch), indices)
        offsets = 2 * self.pad + 1
        top = uniform_below(rows, 0, offsets)
        left = uniform_below(rows, 1, offsets)
        flipped = (uniform_below(rows, 2, 2) == 1) if self.flip else np.zeros(len(rows), bool)
        return top, left, flipped


def _parse_text(text: str) -> dict:
    """``pad=4,flip=true,crop=32x32`` (or a name, or JSON) -> the spec dict."""
    text = text.strip()
    if text.lower() in NAMED:
        return dict(NAMED[text.lower()])
    names = f"a name ({', '.join(NAMED)}, none) or key=value,... ({', '.join(OPTIONS)})"
    spec = parse_inline(text, "augment", names)
    crop = spec.get("crop")
    if isinstance(crop, str) and "x" in crop.lower():  # HxW
        spec["crop"] = [int(v) if v.strip().isdigit() else v for v in crop.lower().split("x")]
    return spec


def make_augmentation(spec) -> Augmentation | None:
    """The augmentation of ``spec``: None or ``"none"`` (none), a name (``"cifar"``: pad 4,
    flip), a dict of :data:`OPTIONS`, or their text (``"pad=4,flip=true"``, a JSON object).
    An augmentation that changes nothing (``pad=0``, no flip) is None. Every bad value is
    refused naming it (``augment: pad must be a non-negative integer. Received pad=-1``)."""
    if isinstance(spec, Augmentation):
        return spec if spec.pad or spec.flip else None
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in NONE):
        return None
    if isinstance(spec, str):
        spec = _parse_text(spec)
    if not isinstance(spec, dict):
        raise ValueError(f"augment must be None, a name ({', '.join(NAMED)}), a dict of "
                         f"{', '.join(OPTIONS)} or its text (pad=4,flip=true). Received "
                         f"augment={spec!r}")
    unknown = [k for k in spec if k not in OPTIONS]
    if unknown:
        raise ValueError(f"augment: unknown option {unknown[0]!r}; the options are "
                         f"{', '.join(OPTIONS)}")
    pad = check_int("augment", "pad", spec.get("pad", 0), low=0)
    flip = check_bool("augment", "flip", spec.get("flip", False))
    crop = spec.get("crop")
    crop = None if crop is None else check_pair("augment", "crop", crop)
    return Augmentation(pad, flip, crop) if pad or flip else None


def checked_augmentation(spec, input_shape) -> Augmentation | None:
    """:func:`make_augmentation` of ``spec``, refused (naming the value) unless it applies to
    inputs of shape ``input_shape`` ``(C, H, W)``: what ``fit`` and the reference trainers
    check before any work."""
    augmentation = make_augmentation(spec)
    if augmentation is not None:
        augmentation.check(input_shape)
    return augmentation


class InputPipeline:
    """What a training batch goes through before its step: the examples ``indices`` of the
    training set gathered, the model's ``normalization`` applied (if any), then the epoch's
    ``augmentation`` (if any), keyed by ``seed``. One pipeline per fit, used by one thread at
    a time (the prefetching thread); its work buffers are made for the first (largest) batch
    and reused."""

    def __init__(self, augmentation: Augmentation | None = None, normalization=None,
                 seed: int = 0):
        self.augmentation, self.normalization, self.seed = augmentation, normalization, seed
        self._work: dict[str, np.ndarray] = {}

    def _buffer(self, name: str, shape: tuple, dtype, zeros: bool = False) -> np.ndarray:
        """Work buffer ``name`` with at least ``shape[0]`` rows (the first ``shape[0]``)."""
        buf = self._work.get(name)
        if buf is None or len(buf) < shape[0] or buf.shape[1:] != shape[1:] or buf.dtype != dtype:
            buf = (np.zeros if zeros else np.empty)(shape, dtype)
            self._work[name] = buf
        return buf[:shape[0]]

    def gather(self, x, indices, epoch: int, out: np.ndarray) -> np.ndarray:
        """The batch of examples ``indices`` of ``x (N, C, H, W)`` in ``epoch``, written into
        ``out (len(indices), C, H, W)`` and returned."""
        if not out.flags.c_contiguous:  # np.take writes into a flat view of it
            raise ValueError("InputPipeline.gather: out must be C-contiguous")
        aug = self.augmentation
        if aug is None:
            # mode="clip": no bounds-check buffering (the indices are a permutation's)
            xb = np.take(x, indices, axis=0, out=out, mode="clip")
            return xb if self.normalization is None else self.normalization.apply(xb, out=xb)
        n, (c, h, w), p = len(indices), x.shape[1:], aug.pad
        raw = np.take(x, indices, axis=0, out=self._buffer("raw", out.shape, x.dtype),
                      mode="clip")
        hp, wp = h + 2 * p, w + 2 * p
        padded = self._buffer("padded", (n, c, hp, wp), x.dtype, zeros=True)  # zero border
        inside = padded[:, :, p:p + h, p:p + w]
        if self.normalization is None:
            inside[...] = raw
        else:
            self.normalization.apply(raw, out=inside)
        top, left, flipped = aug.draws(self.seed, epoch, indices)
        # the flat index in ``padded`` of every output pixel (b, c, i, j): row top_b + i, column
        # left_b + j (W - 1 - j when flipped), in image b's channel c
        cols = np.where(flipped[:, None], np.arange(w - 1, -1, -1), np.arange(w)) + left[:, None]
        plane = self._buffer("plane", (n, h, w), np.intp)
        np.add(((top[:, None] + np.arange(h)) * wp)[:, :, None], cols[:, None, :], out=plane)
        base = (np.arange(n)[:, None] * c + np.arange(c)) * (hp * wp)
        source = self._buffer("source", out.shape, np.intp)
        np.add(base[:, :, None, None], plane[:, None], out=source)
        np.take(padded.reshape(-1), source.reshape(-1), out=out.reshape(-1), mode="clip")
        return out


def epoch_batches(pipeline: InputPipeline, x, order: np.ndarray, epoch: int, batch_size: int,
                  out: np.ndarray | None = None) -> np.ndarray:
    """The epoch's training examples ``x[order]`` as the pipeline makes them (normalised and
    augmented), in order, gathered ``batch_size`` at a time into ``out (len(order), C, H, W)``
    (allocated when None): what a reference trainer that takes the epoch's arrays (Keras)
    trains on."""
    out = np.empty((len(order), *x.shape[1:]), x.dtype) if out is None else out
    for i in range(0, len(order), batch_size):
        pipeline.gather(x, order[i:i + batch_size], epoch, out[i:i + batch_size])
    return out
