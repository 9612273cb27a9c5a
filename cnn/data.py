"""Data sets for the study: MNIST and CIFAR-10 in their official formats, a small MNIST subset
shipped inside the package, and synthetic sets for sanity runs.

Every loader returns ``(x, y)``: ``x`` images ``(N, C, H, W)`` in ``float32`` or ``float64``,
``y`` integer class indices ``(N,)`` as ``int64`` (the layout of ``cnn.backends.base``).
Real images are scaled from ``uint8`` to ``[0, 1]`` by dividing by 255; nothing else
(no mean subtraction), so every training path and the Keras reference see identical inputs.

Where the files are looked for (the *data root*): the ``root`` argument, else the environment
variable ``CNN_DATA_DIR``, else ``~/.cache/parallel-cnn/data``. Below the root the layout is
the official one::

    <root>/mnist/train-images-idx3-ubyte.gz    (the un-gzipped files are accepted too)
    <root>/mnist/train-labels-idx1-ubyte.gz
    <root>/mnist/t10k-images-idx3-ubyte.gz
    <root>/mnist/t10k-labels-idx1-ubyte.gz
    <root>/cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch, batches.meta

Missing files are downloaded from the official sources when ``download=True`` (MD5-checked,
written to a temporary file and renamed into place); files already in the root are parsed
and validated but not checksummed, since a correct copy may carry a different gzip wrapper.

Your own data: :func:`load_dataset` also takes the path of a ``.npz`` file of arrays
(``x_train``, ``y_train``, optionally ``x_test``, ``y_test``, ``classes``; the format is in
:mod:`cnn.datafile`), scaled and split like the built-in sets; :func:`write_dataset` writes any
built-in set in that format (``python -m cnn data NAME --out PATH.npz``).
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import pickle
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from .checks import check_number, is_integer
from .datafile import TEST_FRACTION, is_dataset_file, read_dataset_file, write_dataset_file

__all__ = [
    "Dataset",
    "DATASET_NAMES",
    "data_root",
    "load_dataset",
    "load_mnist",
    "load_cifar10",
    "load_mnist_embedded",
    "make_xor",
    "make_blobs_images",
    "check_dataset_name",
    "stratified_split",
    "write_dataset",
]

DATA_DIR_ENV = "CNN_DATA_DIR"
DEFAULT_DATA_DIR = Path("~/.cache/parallel-cnn/data")

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://yann.lecun.com/exdb/mnist/",
)
#: official MD5 of each ``.gz`` file as distributed by the mirrors
MNIST_MD5 = {
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_CLASSES = [str(k) for k in range(10)]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]

EMBEDDED_MNIST = Path(__file__).resolve().parent / "embedded" / "mnist_subset.npz"

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_SPLITS = ("train", "test")


# ---- argument checks ------------------------------------------------------------------------
# dtype, counts and split keep the form of message the data tests pin ("...; received limit=0",
# lowercase) rather than cnn.checks' ("... Received limit=0"); a count is an integer by
# cnn.checks.is_integer, as everywhere else
def _check_dtype(dtype) -> np.dtype:
    try:
        # np.dtype(None) is float64, but a None here is more likely a mistake than a choice
        resolved = None if dtype is None else np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.type not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64; received dtype={dtype!r}")
    return resolved


def _check_count(value, name: str, allow_none: bool = True) -> Optional[int]:
    if value is None and allow_none:
        return None
    if not is_integer(value) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}; "
                         f"received {name}={value!r}")
    return int(value)


def _check_split(split) -> str:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}; received split={split!r}")
    return split


def _to_unit_float(images: np.ndarray, dtype: np.dtype) -> np.ndarray:
    out = images.astype(dtype)  # a fresh C-contiguous copy, so the in-place divide is safe
    out /= 255
    return out


# ---- data root and downloads ----------------------------------------------------------------
def data_root(root=None) -> Path:
    """The data root: ``root`` if given, else ``$CNN_DATA_DIR`` if set, else
    ``~/.cache/parallel-cnn/data``. The folder need not exist."""
    if root is None:
        root = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(root).expanduser()


def _fetch(url: str, dest: Path) -> None:
    """Stream ``url`` into the file ``dest`` with a progress bar. Raises ``OSError`` (which
    includes ``urllib.error.URLError``) or ``http.client.HTTPException`` on failure."""
    # some mirrors refuse urllib's default agent
    request = urllib.request.Request(url, headers={"User-Agent": "parallel-cnn"})
    with urllib.request.urlopen(request, timeout=60) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=url.rsplit("/", 1)[-1]) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` with its missing parents; return those created, deepest first, so a
    failed download can remove them again (:func:`_remove_folders`)."""
    created, current = [], folder
    while not current.exists() and current != current.parent:
        created.append(current)
        current = current.parent
    folder.mkdir(parents=True, exist_ok=True)
    return created


def _remove_folders(created: Sequence[Path]) -> None:
    """Remove the folders :func:`_make_folder` created, if they are still empty."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            pass


def _download(urls: Sequence[str], dest: Path, md5: str) -> None:
    """Fetch ``dest`` from the first of ``urls`` that answers, check its MD5, and move it into
    place atomically, so an interrupted download never leaves a partial file under the real name.

    Raises ``ValueError`` on a checksum mismatch (after deleting the download) and ``OSError``
    listing every URL's error when none could be fetched. Folders created for ``dest`` are
    removed again when nothing was downloaded.
    """
    errors = []
    created: list[Path] = []
    done = False
    try:
        for url in urls:
            tmp = None
            try:
                created = _make_folder(dest.parent) or created
                fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.",
                                            suffix=".part")
                os.close(fd)
                tmp = Path(name)
                _fetch(url, tmp)
                actual = _md5(tmp)
                if actual != md5:
                    raise ValueError(f"checksum mismatch for {dest.name} downloaded from {url}: "
                                     f"expected MD5 {md5}, got {actual}; the download was deleted")
                os.replace(tmp, dest)
                done = True
                return
            except (OSError, http.client.HTTPException) as exc:
                errors.append(f"{url}: {exc}")
            finally:
                if tmp is not None:
                    tmp.unlink(missing_ok=True)
        raise OSError("download failed: " + "; ".join(errors))
    finally:
        if not done:
            _remove_folders(created)


def _missing_error(what: str, folder: Path, missing: Sequence[str], download: bool,
                   failures: Sequence[str], sources: Sequence[str]) -> FileNotFoundError:
    """The error for files that are missing: every one of them, where they were looked for,
    what was tried, and how to provide them (never "download=True" after a download failed)."""
    provide = (f"Provide them by setting {DATA_DIR_ENV} (or root= / --data-dir) to a folder in "
               f"the official layout (<root>/{folder.name}/...)")
    if download:
        how = "downloading them failed: " + "; ".join(failures) if failures else "not downloaded"
        hint = f"{provide}, or retry when {', '.join(sources)} can be reached."
    else:
        how = "download=False, so nothing was fetched"
        hint = f"{provide}, or call with download=True on a machine with network access."
    return FileNotFoundError(f"{what} files missing in {folder}: {', '.join(missing)} ({how}). "
                             f"{hint}")


# ---- MNIST ----------------------------------------------------------------------------------
def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Decode one MNIST IDX file (gzip or raw) to ``uint8``, validating the header against the
    payload so that a truncated or foreign file fails loudly rather than parsing as garbage."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({exc}); "
                             f"delete the file and provide it again") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: {len(data)} bytes is shorter than the {header}-byte IDX "
                         f"header; the file is truncated or not an IDX file")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: wrong IDX magic number {found} (0x{found:08x}); "
                         f"expected {magic} (0x{magic:08x})")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    if ndim == 3 and dims[1:] != (28, 28):
        raise ValueError(f"{path}: images are {dims[1]}x{dims[2]}; MNIST images are 28x28")
    if dims[0] == 0:
        raise ValueError(f"{path}: the header declares 0 examples; the file holds no data")
    payload = len(data) - header
    expected = math.prod(dims)  # Python ints: a forged header cannot overflow it
    if payload != expected:
        raise ValueError(f"{path}: header declares dims {dims}, i.e. {expected} payload bytes, "
                         f"but the file holds {payload}; it is truncated or corrupt")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _mnist_files(folder: Path, prefixes: Sequence[str], download: bool) -> list[Path]:
    """The images and labels files of every prefix (``train``, ``t10k``), in that order,
    downloading the missing ones when ``download``; the error lists every file still missing."""
    names = [f"{prefix}-{kind}" for prefix in prefixes
             for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]

    def find(name: str) -> Optional[Path]:
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                return candidate
        return None

    failures = []
    if download:
        for name in names:
            if find(name) is None:
                try:
                    _download([m + f"{name}.gz" for m in MNIST_MIRRORS],
                              folder / f"{name}.gz", MNIST_MD5[name])
                except OSError as exc:
                    failures.append(f"{name}.gz: {exc}")
    found = [find(name) for name in names]
    missing = [f"{name}.gz" for name, path in zip(names, found) if path is None]
    if missing:
        raise _missing_error("MNIST", folder, missing, download, failures, MNIST_MIRRORS)
    return found


def load_mnist(split: str = "train", root=None, limit: Optional[int] = None,
               download: bool = True, dtype=np.float32) -> Tuple[np.ndarray, np.ndarray]:
    """MNIST from the official IDX files, in the files' order.

    Returns ``x`` of shape ``(N, 1, 28, 28)`` in ``dtype``, pixel intensities scaled to
    ``[0, 1]``, and ``y`` of shape ``(N,)``, ``int64`` digits 0-9. ``N`` is 60,000 for
    ``split="train"`` and 10,000 for ``"test"``, or ``limit`` (the first ``limit`` examples).

    Raises ``FileNotFoundError`` when files are missing and cannot be downloaded,
    ``ValueError`` naming the file when one is truncated, corrupt or not MNIST.
    """
    dtype = _check_dtype(dtype)
    limit = _check_count(limit, "limit")
    prefix = "train" if _check_split(split) == "train" else "t10k"
    images_path, labels_path = _mnist_files(data_root(root) / "mnist", [prefix], download)
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC)
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                         f"{len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{labels_path}: label {labels.max()} is not a digit 0-9")
    images, labels = images[:limit], labels[:limit]
    return _to_unit_float(images[:, None], dtype), labels.astype(np.int64)


def load_mnist_embedded(split: str = "train", limit: Optional[int] = None,
                        dtype=np.float32) -> Tuple[np.ndarray, np.ndarray]:
    """The small stratified MNIST subset shipped in the package (no files, no network).

    5,120 train images (512 per digit: whole batches of 32 or 128, no remainder) drawn from the official training set and 1,000 test
    images (100 per digit) from the official test set, kept in their official relative order;
    ``scripts/make_mnist_subset.py`` cut them. Shapes and scaling as in :func:`load_mnist`.
    """
    dtype = _check_dtype(dtype)
    limit = _check_count(limit, "limit")
    split = _check_split(split)
    if not EMBEDDED_MNIST.is_file():
        raise FileNotFoundError(f"{EMBEDDED_MNIST} is missing from the package; regenerate it "
                                f"with scripts/make_mnist_subset.py")
    with np.load(EMBEDDED_MNIST) as f:
        images, labels = f[f"x_{split}"], f[f"y_{split}"]
    images, labels = images[:limit], labels[:limit]
    return _to_unit_float(images[:, None], dtype), labels.astype(np.int64)


# ---- CIFAR-10 -------------------------------------------------------------------------------
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays only: a data folder comes from the
    environment, and an unrestricted pickle could run arbitrary code."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
                # NumPy 1.x names, then NumPy 2.x names; _frombuffer appears with protocol 5
                ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.numeric", "_frombuffer"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.numeric", "_frombuffer"),
                # Python 3 writes bytes this way in protocols 0-2 (empty bytes as bytes())
                ("_codecs", "encode"), ("__builtin__", "bytes"), ("builtins", "bytes")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path):
    with open(path, "rb") as f:
        try:
            # the official files are Python 2 pickles: keys and strings come back as bytes
            return _NumpyOnlyUnpickler(f, encoding="bytes").load()
        except Exception as exc:  # noqa: BLE001 - a corrupt pickle can raise almost anything
            # (UnpicklingError, EOFError, ValueError, TypeError, MemoryError, OverflowError,
            # struct.error, RecursionError, ...): all mean the file is not a batch
            message = str(exc)
            if len(message) > 200:
                message = message[:200] + "..."
            raise ValueError(f"{path}: cannot unpickle ({type(exc).__name__}: {message}); "
                             f"the file is truncated, corrupt or not a CIFAR-10 batch") from None


def _read_cifar_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """One batch file -> ``uint8`` images ``(n, 3, 32, 32)`` and ``int64`` labels ``(n,)``."""
    batch = _unpickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        if isinstance(batch, dict):
            kind = "keys " + ", ".join(sorted(repr(k) for k in batch)[:10])
        else:
            kind = type(batch).__name__
        raise ValueError(f"{path}: expected a dict with keys b'data' and b'labels'; got {kind}")
    data, labels = batch[b"data"], batch[b"labels"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3072):
        desc = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else type(data).__name__)
        raise ValueError(f"{path}: b'data' must be a uint8 array of shape (n, 3072); got {desc}")
    if len(data) == 0:
        raise ValueError(f"{path}: b'data' holds no images")
    if isinstance(labels, np.ndarray) or (isinstance(labels, list)
                                          and all(type(v) is int for v in labels)):
        labels = np.asarray(labels)
    else:  # ragged lists, dicts, strings, floats...: never let NumPy guess what they mean
        raise ValueError(f"{path}: b'labels' must be {len(data)} integers, one per image; got "
                         f"{type(labels).__name__}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(data):
        raise ValueError(f"{path}: b'labels' must be {len(data)} integers, one per image; got "
                         f"{labels.dtype} array of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels must lie in 0..9; found {labels.min()}..{labels.max()}")
    # rows are channel-planar (1024 R, 1024 G, 1024 B), each plane row-major
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _download_cifar10(folder: Path) -> None:
    """Fetch the official archive into ``folder.parent`` and extract the missing batch files."""
    archive = folder.parent / CIFAR10_URL.rsplit("/", 1)[-1]
    _download([CIFAR10_URL], archive, CIFAR10_MD5)  # removes the folders it made if it fails
    try:
        with tempfile.TemporaryDirectory(dir=folder.parent) as tmp, tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers()
                       if m.isfile() and m.name.startswith(f"{CIFAR10_FOLDER}/")]
            tar.extractall(tmp, members=members, filter="data")
            folder.mkdir(exist_ok=True)
            for extracted in (Path(tmp) / CIFAR10_FOLDER).iterdir():
                if not (folder / extracted.name).exists():
                    os.replace(extracted, folder / extracted.name)
    except tarfile.TarError as exc:
        raise OSError(f"{archive}: cannot extract ({exc})") from None
    finally:
        archive.unlink(missing_ok=True)


def _cifar10_files(folder: Path, splits: Sequence[str], download: bool) -> list[Path]:
    """The batch files of every split, in order, downloading the archive when some are missing
    and ``download``; the error lists every file still missing."""
    names = []
    for split in splits:
        names += [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    failures = []
    if download and not all((folder / n).is_file() for n in names):
        try:
            _download_cifar10(folder)
        except OSError as exc:
            failures.append(str(exc))
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise _missing_error("CIFAR-10", folder, missing, download, failures, [CIFAR10_URL])
    return [folder / n for n in names]


def _cifar10_class_names(folder: Path) -> list[str]:
    """Class names from ``batches.meta`` when present, else the official ten."""
    path = folder / "batches.meta"
    if not path.is_file():
        return list(CIFAR10_CLASSES)
    meta = _unpickle(path)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not (isinstance(names, list) and len(names) == 10
            and all(isinstance(n, (bytes, str)) for n in names)):
        raise ValueError(f"{path}: expected a dict whose b'label_names' is a list of 10 names")
    return [n.decode() if isinstance(n, bytes) else n for n in names]


def load_cifar10(split: str = "train", root=None, limit: Optional[int] = None,
                 download: bool = True, dtype=np.float32) -> Tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from the official "python version" batch files, in the files' order
    (``data_batch_1`` to ``data_batch_5`` for train, ``test_batch`` for test).

    Returns ``x`` of shape ``(N, 3, 32, 32)`` (RGB channels) in ``dtype``, scaled to ``[0, 1]``,
    and ``y`` of shape ``(N,)``, ``int64`` class indices 0-9 (names in ``batches.meta``).
    ``N`` is 50,000 / 10,000, or ``limit``; only the batches needed for ``limit`` are read.

    Raises ``FileNotFoundError`` when files are missing and cannot be downloaded,
    ``ValueError`` naming the file when a batch is truncated or malformed.
    """
    dtype = _check_dtype(dtype)
    limit = _check_count(limit, "limit")
    split = _check_split(split)
    paths = _cifar10_files(data_root(root) / CIFAR10_FOLDER, [split], download)
    images, labels, count = [], [], 0
    for path in paths:
        batch_images, batch_labels = _read_cifar_batch(path)
        images.append(batch_images)
        labels.append(batch_labels)
        count += len(batch_labels)
        if limit is not None and count >= limit:
            break
    x = np.concatenate(images)[:limit]
    return _to_unit_float(x, dtype), np.concatenate(labels)[:limit]


# ---- synthetic sets -------------------------------------------------------------------------
def _balanced_labels(n: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % classes).astype(np.int64)


def make_xor(n: int = 1000, seed: int = 0, noise: float = 0.1,
             dtype=np.float32) -> Tuple[np.ndarray, np.ndarray]:
    """XOR as two-pixel images: ``x`` of shape ``(N, 1, 1, 2)``, ``y`` ``(N,)`` int64.

    Each example is a corner ``(a, b)`` of the unit square, ``a, b`` in ``{0, 1}``, plus
    Gaussian noise of standard deviation ``noise`` on each pixel; the label is ``a XOR b``.
    The four corners occur equally often (up to ``n mod 4``) in random order. Not linearly
    separable, so it needs a hidden layer: a 1x1 or 1x2 convolution, or Flatten + Dense.
    """
    n = _check_count(n, "n", allow_none=False)
    dtype = _check_dtype(dtype)
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0; received noise={noise!r}")
    rng = np.random.default_rng(seed)
    corner = _balanced_labels(n, 4, rng)
    bits = np.stack([corner >> 1, corner & 1], axis=1)
    x = bits + noise * rng.standard_normal((n, 2))
    return x.reshape(n, 1, 1, 2).astype(dtype), (bits[:, 0] ^ bits[:, 1]).astype(np.int64)


def make_blobs_images(n: int = 1000, classes: int = 10, size: int = 8, channels: int = 1,
                      seed: int = 0, separation: float = 8.0,
                      dtype=np.float32) -> Tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs rendered as images: ``x`` ``(N, channels, size, size)``, ``y`` ``(N,)``.

    Each class ``k`` has a mean image ``mu_k``; an example is ``mu_k`` plus independent
    standard-normal noise on every pixel. The means are mutually orthogonal with
    ``||mu_i - mu_j|| = separation`` for all ``i != j``, so separation is the distance between
    class means in units of the noise standard deviation, and the nearest-mean rule errs on a
    given pair with probability ``Phi(-separation / 2)`` (3e-5 at the default 8). Pixel values
    are not confined to ``[0, 1]``. Classes are balanced (up to ``n mod classes``); the means
    depend on ``seed`` only, so draw train and test from one call and split it.
    """
    n = _check_count(n, "n", allow_none=False)
    classes = _check_count(classes, "classes", allow_none=False)
    size = _check_count(size, "size", allow_none=False)
    channels = _check_count(channels, "channels", allow_none=False)
    dtype = _check_dtype(dtype)
    dim = channels * size * size
    if classes < 2 or classes > dim:
        raise ValueError(f"classes must be in [2, channels*size*size={dim}] so the class means "
                         f"can be orthogonal; received classes={classes}")
    if not separation > 0:
        raise ValueError(f"separation must be > 0; received separation={separation!r}")
    rng = np.random.default_rng(seed)
    directions, _ = np.linalg.qr(rng.standard_normal((dim, classes)))  # orthonormal columns
    means = separation / np.sqrt(2) * directions.T
    y = _balanced_labels(n, classes, rng)
    x = means[y] + rng.standard_normal((n, dim))
    return x.reshape(n, channels, size, size).astype(dtype), y


# ---- splits and the Dataset bundle ----------------------------------------------------------
def stratified_split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int = 0,
                     in_place: bool = False):
    """Split ``(x, y)`` into ``(x_a, y_a, x_b, y_b)`` with part ``b`` holding ``fraction`` of
    the examples of every class (e.g. a validation set).

    Part ``b`` has ``round(fraction * N)`` examples, shared among classes in proportion to
    their counts (largest remainders get the leftover units); which examples go where is
    random with ``seed``. Both parts keep the input order.

    ``in_place``: for a caller that owns ``x`` and ``y`` (NumPy arrays) and drops them: part
    ``a``'s rows move to their front and are returned as views, so only part ``b`` is copied
    (full CIFAR-10 in float32 is 614 MB; a copy of part ``a`` would add 553 MB at the peak).
    """
    if in_place and not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)
                         and x.flags.writeable and y.flags.writeable):
        raise ValueError("stratified_split(in_place=True) needs writeable NumPy arrays x and y")
    y = np.asarray(y)
    if y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"x and y must hold the same number of examples with y 1-D; received "
                         f"x of shape {np.shape(x)} and y of shape {y.shape}")
    fraction = check_number(None, "fraction", fraction, low=0.0, high=1.0, low_open=True,
                            high_open=True)
    n_b = round(fraction * len(y))
    if not 0 < n_b < len(y):
        raise ValueError(f"fraction={fraction} of {len(y)} examples leaves one part empty")
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    quota = fraction * counts
    take = np.floor(quota).astype(int)
    leftover = n_b - take.sum()
    take[np.argsort(-(quota - take), kind="stable")[:leftover]] += 1
    rng = np.random.default_rng(seed)
    in_b = np.zeros(len(y), dtype=bool)
    for k in range(len(classes)):
        members = np.flatnonzero(inverse == k)
        in_b[rng.choice(members, size=take[k], replace=False)] = True
    if not in_place:
        return x[~in_b], y[~in_b], x[in_b], y[in_b]
    x_b, y_b = x[in_b], y[in_b]
    keep = np.flatnonzero(~in_b)
    # the i-th kept row comes from row keep[i] >= i, so moving them front to back in order
    # never overwrites a row before it is read; chunks bound the temporary of x[rows]
    for start in range(0, len(keep), _SPLIT_CHUNK):
        rows = keep[start:start + _SPLIT_CHUNK]
        x[start:start + len(rows)] = x[rows]
        y[start:start + len(rows)] = y[rows]
    return x[:len(keep)], y[:len(keep)], x_b, y_b


#: rows moved at a time by ``stratified_split(in_place=True)``
_SPLIT_CHUNK = 1024


@dataclass
class Dataset:
    """A train/test (and optional validation) bundle. Images ``(N, C, H, W)`` float,
    labels ``(N,)`` int64 indices into ``classes``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str
    classes: list[str]
    x_val: Optional[np.ndarray] = None
    y_val: Optional[np.ndarray] = None
    #: how the data was read, for the user (a data set file's layout, a held-out test set)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        parts = [("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)]
        if (self.x_val is None) != (self.y_val is None):
            raise ValueError("x_val and y_val must be given together")
        if self.x_val is not None:
            parts.append(("val", self.x_val, self.y_val))
        for part, x, y in parts:
            if x.ndim != 4 or x.shape[1:] != self.x_train.shape[1:] or y.shape != (len(x),):
                raise ValueError(f"{part}: x must be (N, {', '.join(map(str, self.input_shape))}) "
                                 f"and y (N,); received x {x.shape}, y {y.shape}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        """``(C, H, W)`` of one example."""
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        val = "" if self.x_val is None else f", val={len(self.x_val)}"
        return (f"Dataset(name={self.name!r}, train={len(self.x_train)}, test={len(self.x_test)}"
                f"{val}, input_shape={self.input_shape}, num_classes={self.num_classes}, "
                f"dtype={self.x_train.dtype})")


DATASET_NAMES = ("mnist", "cifar10", "mnist_embedded", "xor", "blobs")
#: the built-in sets made of 8-bit pixels (written as ``uint8`` by :func:`write_dataset`)
PIXEL_DATASETS = ("mnist", "cifar10", "mnist_embedded")
_SYNTHETIC_SIZES = {"xor": (1000, 200), "blobs": (2000, 500)}  # default (train, test) sizes


def check_dataset_name(name, option: str = "--dataset") -> None:
    """Refuse, naming ``option``, a data set that is neither a built-in name nor a data set
    file (``.npz``); whether the file exists and holds a data set is :func:`load_dataset`'s."""
    if name not in DATASET_NAMES and not is_dataset_file(name):
        raise ValueError(f"{option}: unknown data set {name!r}; choose one of "
                         f"{', '.join(DATASET_NAMES)}, or give a .npz file of your own "
                         f"(x_train, y_train and optionally x_test, y_test: see cnn.datafile)")


def load_dataset(name: str, root=None, limit: Optional[int] = None,
                 test_limit: Optional[int] = None, validation_split: float = 0.0,
                 seed: int = 0, dtype=np.float32, download: bool = True) -> Dataset:
    """Load a data set by name into a :class:`Dataset`.

    ``name``: ``"mnist"``, ``"cifar10"``, ``"mnist_embedded"`` (the shipped subset), ``"xor"``
    or ``"blobs"`` (:func:`make_xor` with noise 0.1 / :func:`make_blobs_images`, 10 classes of
    8x8 single-channel images, generated from ``seed``), or the path of a data set file
    (``.npz``, :mod:`cnn.datafile`: ``uint8`` pixels scaled by 1/255, channels-last images
    turned channels-first, and without a test set a stratified ``TEST_FRACTION`` of the
    training examples held out; ``Dataset.notes`` say what was done). ``limit`` and
    ``test_limit`` keep the first examples of each split; for synthetic sets they are the
    sizes to generate (default 1000/200 for xor, 2000/500 for blobs). ``validation_split`` in
    ``[0, 1)`` moves that fraction of the (limited) training set, stratified by class, into
    ``x_val``/``y_val``.
    """
    if name not in DATASET_NAMES and not is_dataset_file(name):
        raise ValueError(f"unknown data set; valid names are {', '.join(DATASET_NAMES)} or a "
                         f"data set file (.npz); received name={name!r}")
    dtype = _check_dtype(dtype)
    limit = _check_count(limit, "limit")
    test_limit = _check_count(test_limit, "test_limit")
    check_number(None, "validation_split", validation_split, low=0.0, high=1.0, high_open=True)
    notes = []
    if is_dataset_file(name):
        x_train, y_train, x_test, y_test, classes, notes = _from_file(name, limit, test_limit,
                                                                      seed, dtype)
    elif name in ("mnist", "cifar10"):
        # find (or fetch) the files of both splits first, so a missing-data error lists them all
        if name == "mnist":
            _mnist_files(data_root(root) / "mnist", ["train", "t10k"], download)
        else:
            _cifar10_files(data_root(root) / CIFAR10_FOLDER, ["train", "test"], download)
        loader = load_mnist if name == "mnist" else load_cifar10
        x_train, y_train = loader("train", root, limit, download, dtype)
        x_test, y_test = loader("test", root, test_limit, download, dtype)
        classes = (MNIST_CLASSES if name == "mnist"
                   else _cifar10_class_names(data_root(root) / CIFAR10_FOLDER))
    elif name == "mnist_embedded":
        x_train, y_train = load_mnist_embedded("train", limit, dtype)
        x_test, y_test = load_mnist_embedded("test", test_limit, dtype)
        classes = MNIST_CLASSES
    else:
        n_train = _SYNTHETIC_SIZES[name][0] if limit is None else limit
        n_test = _SYNTHETIC_SIZES[name][1] if test_limit is None else test_limit
        if name == "xor":
            x, y = make_xor(n_train + n_test, seed=seed, noise=0.1, dtype=dtype)
            classes = ["0", "1"]
        else:
            x, y = make_blobs_images(n_train + n_test, classes=10, seed=seed, dtype=dtype)
            classes = [str(k) for k in range(10)]
        x_train, y_train, x_test, y_test = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    x_val = y_val = None
    if validation_split > 0:  # the arrays are this function's own: split without a copy
        x_train, y_train, x_val, y_val = stratified_split(x_train, y_train, validation_split,
                                                          seed, in_place=True)
    return Dataset(x_train, y_train, x_test, y_test, name=str(name), classes=list(classes),
                   x_val=x_val, y_val=y_val, notes=notes)


def _from_file(path, limit, test_limit, seed, dtype):
    """The splits of a data set file (:mod:`cnn.datafile`), limited and scaled as the built-in
    loaders do, with the notes of how it was read."""
    found = read_dataset_file(path)
    x_train, y_train, x_test, y_test = found.x_train, found.y_train, found.x_test, found.y_test
    if x_test is None:
        try:
            x_train, y_train, x_test, y_test = stratified_split(x_train, y_train, TEST_FRACTION,
                                                                seed)
        except ValueError as err:
            raise ValueError(f"{path}: has no x_test/y_test and {err}") from None

    def scale(x):  # pixels as the built-in loaders scale theirs; other values as they are
        return _to_unit_float(x, dtype) if x.dtype == np.uint8 else x.astype(dtype)

    return (scale(x_train[:limit]), y_train[:limit], scale(x_test[:test_limit]),
            y_test[:test_limit], found.classes, found.notes)


def write_dataset(name: str, path, root=None, limit: Optional[int] = None,
                  test_limit: Optional[int] = None, seed: int = 0) -> Path:
    """Write the built-in data set ``name`` (as :func:`load_dataset` gives it, with the same
    ``limit``, ``test_limit`` and ``seed``) to the data set file ``path`` (:mod:`cnn.datafile`):
    the pixel sets as ``uint8`` and the synthetic ones as ``float64``, so that
    ``load_dataset(path)`` gives the same arrays as ``load_dataset(name)`` in either dtype."""
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown data set; valid names are {', '.join(DATASET_NAMES)}; "
                         f"received name={name!r}")
    data = load_dataset(name, root=root, limit=limit, test_limit=test_limit, seed=seed,
                        dtype=np.float64)
    if name in PIXEL_DATASETS:  # k / 255 in float64 comes back to k exactly
        pixels = [np.rint(x * 255).astype(np.uint8) for x in (data.x_train, data.x_test)]
    else:
        pixels = [data.x_train, data.x_test]
    return write_dataset_file(path, pixels[0], data.y_train, pixels[1], data.y_test,
                              data.classes)
