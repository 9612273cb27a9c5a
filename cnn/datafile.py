"""Your own data set in a file of arrays: the format ``--dataset PATH.npz`` reads and
``python -m cnn data NAME --out PATH.npz`` writes.

The format: one NumPy ``.npz`` file (``np.savez`` or ``np.savez_compressed``) holding

==============  ===========================================================================
``x_train``     the training images: ``(N, C, H, W)`` (channels-first, this package's
                layout), ``(N, H, W, C)`` (channels-last), ``(N, H, W)`` (one channel) or
                ``(N, D)`` (feature vectors, read as ``(N, 1, 1, D)`` images). ``uint8``
                pixels are scaled to ``[0, 1]`` by dividing by 255, as the MNIST and CIFAR-10
                loaders do; floating-point values are used as they are.
``y_train``     ``(N,)`` integer class indices ``0 .. K-1``.
``x_test``,     optional, together: the test set, in the same form. Without them a stratified
``y_test``      :data:`TEST_FRACTION` of the training examples (drawn with the seed) is held
                out as the test set, and the loader says so.
``classes``     optional: ``(K,)`` class names (strings or numbers); else ``K`` is the largest
                label plus one and the names are ``"0" .. "K-1"``.
``layout``      optional: ``"channels_first"`` or ``"channels_last"``, for 4-D images whose
                layout the shape does not tell (see :func:`image_layout`).
==============  ===========================================================================

Which of ``(N, C, H, W)`` and ``(N, H, W, C)`` a 4-D array is, is read from its shape: the
channel axis is the one of axes 1 and 3 that is smaller and at most 4 (1 for grey, 3 for RGB,
4 for RGBA); when both are equal or neither is at most 4 the array is taken as channels-first,
and the loader says it assumed so (``layout`` settles it). Every read is checked as the
built-in loaders check theirs, and an error names the file and the array: a missing or
unknown array, a pickled (object) array, no examples, images and labels of different counts,
labels that are not integers in ``0 .. K-1``, test images of another shape than the training
images, NaN or infinite values, integer pixels other than ``uint8``.

Reading (:func:`read_dataset_file`) returns the arrays channels-first in their stored dtype
(:func:`cnn.data.load_dataset` scales and converts them, and applies ``limit``, the
validation split and the held-out test set); writing (:func:`write_dataset_file`) is atomic.
"""
from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .files import atomic_write

#: the arrays a data set file may hold
REQUIRED = ("x_train", "y_train")
OPTIONAL = ("x_test", "y_test", "classes", "layout")
LAYOUTS = ("channels_first", "channels_last")
#: the share of the training examples held out as the test set when a file has none
TEST_FRACTION = 0.2
#: the file suffix ``--dataset`` recognises as a data set file
SUFFIX = ".npz"


def is_dataset_file(name) -> bool:
    """Whether a ``--dataset`` value names a data set file (ends in ``.npz``) rather than a
    built-in data set."""
    return str(name).lower().endswith(SUFFIX)


@dataclass
class DatasetFile:
    """The arrays of a data set file, checked: images ``(N, C, H, W)`` in their stored dtype
    (``uint8`` or floating point), labels ``(N,)`` ``int64``; ``x_test``/``y_test`` None when
    the file has no test set; ``notes`` say how the file was read (the layout detected)."""

    path: Path
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: Optional[np.ndarray]
    y_test: Optional[np.ndarray]
    classes: list[str]
    notes: list[str] = field(default_factory=list)


def image_layout(shape: tuple[int, ...], given: str | None = None) -> tuple[str, bool]:
    """``(layout, assumed)`` of an array of images of ``shape``: ``"channels_first"``,
    ``"channels_last"``, ``"one_channel"`` (3-D) or ``"features"`` (2-D); ``assumed`` is True
    when a 4-D shape did not tell and channels-first was taken. ``given`` (the file's
    ``layout``) decides for 4-D arrays."""
    if len(shape) == 2:
        return "features", False
    if len(shape) == 3:
        return "one_channel", False
    if given is not None:
        return given, False
    first, last = shape[1], shape[3]
    if first != last and min(first, last) <= 4:
        return ("channels_first" if first < last else "channels_last"), False
    return "channels_first", True


def _to_channels_first(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "features":
        return x.reshape(len(x), 1, 1, x.shape[1])
    if layout == "one_channel":
        return x[:, None]
    if layout == "channels_last":
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x


_SHAPES = {"channels_first": "(N, C, H, W)", "channels_last": "(N, H, W, C)",
           "one_channel": "(N, H, W), one channel", "features": "(N, D), feature vectors"}


def read_dataset_file(path: str | os.PathLike) -> DatasetFile:
    """The checked arrays of the data set file ``path`` (see the module docstring). Raises
    ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file and the array
    for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--dataset: no such file {path}" if not path.is_dir()
                                else f"--dataset: {path} is a folder; give a {SUFFIX} file")
    arrays = _load(path)
    unknown = sorted(set(arrays) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ValueError(f"{path}: unknown array {unknown[0]!r}; a data set file holds "
                         f"{', '.join(REQUIRED)} and optionally {', '.join(OPTIONAL)}")
    missing = [name for name in REQUIRED if name not in arrays]
    if missing:
        raise ValueError(f"{path}: no array {missing[0]!r} (it holds {sorted(arrays)}); a data "
                         f"set file holds {', '.join(REQUIRED)} and optionally "
                         f"{', '.join(OPTIONAL)}")
    if ("x_test" in arrays) != ("y_test" in arrays):
        have, lack = ("x_test", "y_test") if "x_test" in arrays else ("y_test", "x_test")
        raise ValueError(f"{path}: holds {have!r} but no {lack!r}; give both or neither")
    layout = _layout_value(arrays.get("layout"), _where(path, "layout"))
    notes = []
    parts = [("train", "x_train", "y_train")]
    if "x_test" in arrays:
        parts.append(("test", "x_test", "y_test"))
    images, labels = {}, {}
    for part, xname, yname in parts:
        x, y = arrays[xname], arrays[yname]
        _check_images(x, _where(path, xname))
        found, assumed = image_layout(x.shape, layout)
        note = (f"{xname} {tuple(x.shape)} read as {_SHAPES[found]}"
                + (f" (assumed: its shape does not tell; store layout='channels_last' if it "
                   f"is)" if assumed else "")
                + (f" -> {tuple(_to_channels_first(x[:1], found).shape[1:])} per example"
                   if found != "channels_first" else ""))
        notes.append(note)
        images[part] = _to_channels_first(x, found)
        labels[part] = _check_labels(y, len(x), _where(path, yname), xname)
    if "test" in images and images["test"].shape[1:] != images["train"].shape[1:]:
        raise ValueError(f"{path}: the test images are {images['test'].shape[1:]} and the "
                         f"training images {images['train'].shape[1:]} (channels-first); they "
                         f"must have one shape")
    top = max(int(v.max()) for v in labels.values())
    classes = _class_names(arrays.get("classes"), top, _where(path, "classes"))
    if "test" not in images:
        notes.append(f"no x_test/y_test: a stratified {TEST_FRACTION:.0%} of the training "
                     f"examples is held out as the test set")
    return DatasetFile(path, images["train"], labels["train"], images.get("test"),
                       labels.get("test"), classes, notes)


def stored_input_shape(path: str | os.PathLike) -> tuple[int, int, int]:
    """The shape ``(C, H, W)`` of one training example of the data set file ``path``, read
    from the array's header alone (nothing is loaded), so that a default model can be picked
    before the data is read; the checks are :func:`read_dataset_file`'s."""
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        loaded = None
    if not isinstance(loaded, np.lib.npyio.NpzFile) or "x_train" not in loaded.files:
        return read_dataset_file(path).x_train.shape[1:]  # its error names the problem
    try:
        with loaded, loaded.zip.open("x_train.npy") as member:
            version = np.lib.format.read_magic(member)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape = read_header(member)[0]
            given = (_layout_value(loaded["layout"], _where(path, "layout"))
                     if "layout" in loaded.files else None)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError):
        shape = ()
    if len(shape) not in (2, 3, 4) or 0 in shape:
        return read_dataset_file(path).x_train.shape[1:]  # its error names the problem
    return tuple(int(v) for v in _to_channels_first(np.empty((1, *shape[1:]), np.uint8),
                                                     image_layout(shape, given)[0]).shape[1:])


def _where(path: Path, name: str) -> str:
    """How an error names an array: the file, then the array."""
    return f"{path}: array {name!r}"


def _load(path: Path) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path`` (no pickles), errors naming the file."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a NumPy {SUFFIX} file ({err})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds one array (a .npy); a data set file is an {SUFFIX} of "
                         f"named arrays: {', '.join(REQUIRED)} and optionally "
                         f"{', '.join(OPTIONAL)}")
    arrays = {}
    with loaded:
        for name in loaded.files:
            try:
                arrays[name] = loaded[name]
            except ValueError as err:  # an object array: np.load refuses to unpickle it
                raise ValueError(f"{path}: array {name!r} holds Python objects (pickled data: "
                                 f"{err}); store numbers (and class names as strings)") from None
            except (OSError, EOFError, zipfile.BadZipFile) as err:
                raise ValueError(f"{path}: array {name!r} cannot be read ({err}); the file is "
                                 f"truncated or corrupt") from None
    return arrays


def _layout_value(value, where: str) -> str | None:
    if value is None:
        return None
    text = str(value[()]) if value.ndim == 0 else None
    if text not in LAYOUTS:
        raise ValueError(f"{where} must be one of {LAYOUTS}. Received {value!r}")
    return text


def _check_images(x: np.ndarray, where: str) -> None:
    if x.dtype != np.uint8 and x.dtype.kind != "f":
        hint = (" (integer pixels: store them as uint8, 0..255, or scale them to floats)"
                if x.dtype.kind in "iub" else "")
        raise ValueError(f"{where} has dtype {x.dtype}; images are uint8 pixels (scaled to "
                         f"[0, 1] by dividing by 255) or floating-point values{hint}")
    if x.ndim not in (2, 3, 4):
        raise ValueError(f"{where} has shape {x.shape}; images are (N, C, H, W), (N, H, W, C), "
                         f"(N, H, W) or feature vectors (N, D)")
    if len(x) == 0 or x[0].size == 0:
        raise ValueError(f"{where} holds no examples (shape {x.shape})")
    if x.dtype.kind == "f":
        lo, hi = np.min(x), np.max(x)  # propagate NaN and show inf without a full-size mask
        if not (np.isfinite(lo) and np.isfinite(hi)):
            bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
            raise ValueError(f"{where} holds NaN or infinite values in {len(bad)} of {len(x)} "
                             f"examples, the first at index {bad[0]}")


def _check_labels(y: np.ndarray, count: int, where: str, images: str) -> np.ndarray:
    if y.dtype.kind not in "iu":
        raise ValueError(f"{where} has dtype {y.dtype}; labels are integer class indices "
                         f"0 .. K-1")
    if y.shape != (count,):
        raise ValueError(f"{where} has shape {y.shape}; it must be ({count},), one label per "
                         f"image of {images!r}")
    if y.min() < 0:
        raise ValueError(f"{where}: label {int(y.min())} is negative; labels are class indices "
                         f"0 .. K-1")
    return y.astype(np.int64)


def _class_names(value, top: int, where: str) -> list[str]:
    if value is None:
        return [str(k) for k in range(top + 1)]
    if value.ndim != 1 or value.dtype.kind not in "USiuf":
        raise ValueError(f"{where} must be a 1-D array of class names (strings or numbers). "
                         f"Received {value.dtype} of shape {value.shape}")
    if top >= len(value):
        raise ValueError(f"{where} names {len(value)} classes, but a label is {top}; labels "
                         f"must lie in 0 .. {len(value) - 1}")
    return [str(v) for v in value.tolist()]


def write_dataset_file(path: str | os.PathLike, x_train: np.ndarray, y_train: np.ndarray,
                       x_test: np.ndarray | None = None, y_test: np.ndarray | None = None,
                       classes=None) -> Path:
    """Write a data set file (compressed, atomically) in the format above, images as given
    (channels-first); returns the path. The file is read back by :func:`read_dataset_file`
    into the same arrays."""
    arrays = {"x_train": x_train, "y_train": y_train}
    if x_test is not None:
        arrays.update(x_test=x_test, y_test=y_test)
    if classes is not None:
        arrays["classes"] = np.asarray([str(c) for c in classes])
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return atomic_write(path, buffer.getvalue())


__all__ = ["DatasetFile", "LAYOUTS", "TEST_FRACTION", "image_layout", "is_dataset_file",
           "read_dataset_file", "stored_input_shape", "write_dataset_file"]
