"""Property-based tests of the data loaders (issue 13): random and mutated bytes of MNIST IDX
files (raw and gzip) and of CIFAR-10 batch pickles, and random batch contents, give either a
``ValueError`` that names the file, raised by the loader itself, or exactly the array an
independent decoder written here reads from the same bytes; never a traceback from deeper code
and never a silently wrong array.

The examples are derandomised (the same every run, so CI is reproducible) and few enough to run
in seconds; ``CNN_HYPOTHESIS_EXPLORE=1`` draws fresh random ones and ``CNN_HYPOTHESIS_EXAMPLES=N``
draws more.
"""
from __future__ import annotations

import gzip
import linecache
import os
import pickle
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import cnn
from cnn.data import load_cifar10, load_mnist

PACKAGE = Path(cnn.__file__).resolve().parent
EXAMPLES = int(os.environ.get("CNN_HYPOTHESIS_EXAMPLES", "60"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    derandomize=not os.environ.get("CNN_HYPOTHESIS_EXPLORE"),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

IMAGES, LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"


def assert_clean_error(err: BaseException, *names: str) -> None:
    """``err`` is a ValueError raised by an explicit ``raise`` in the package, naming a file."""
    assert isinstance(err, ValueError), f"{type(err).__name__}: {err}"
    tb = err.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = Path(tb.tb_frame.f_code.co_filename).resolve()
    line = linecache.getline(str(filename), tb.tb_lineno)
    assert PACKAGE in filename.parents and "raise" in line, (
        f"{type(err).__name__} from {filename}:{tb.tb_lineno}: {err}")
    assert any(name in str(err) for name in names), str(err)


# ---- an independent IDX decoder ----------------------------------------------------------------
def ref_idx(payload: bytes, magic: int, shape_tail: tuple):
    """The uint8 array an IDX file holds, or None when it is not a valid one (struct only)."""
    ndim = magic & 0xFF
    if len(payload) < 4 + 4 * ndim or struct.unpack(">I", payload[:4])[0] != magic:
        return None
    dims = struct.unpack(f">{ndim}I", payload[4:4 + 4 * ndim])
    if tuple(dims[1:]) != shape_tail or dims[0] == 0:
        return None
    body = payload[4 + 4 * ndim:]
    size = 1
    for d in dims:
        size *= d
    if len(body) != size:
        return None
    return np.array(list(body), dtype=np.uint8).reshape(dims)


def ref_gunzip(data: bytes):
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error):
        return None


def idx_file(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def valid_pair(n=3, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    return idx_file(images, 2051), idx_file(labels, 2049)


mutation = st.tuples(st.sampled_from(["flip", "set", "delete", "insert", "truncate", "append"]),
                     st.integers(0, 2**20), st.integers(0, 255))


def mutate(data: bytes, mutations) -> bytes:
    buf = bytearray(data)
    for kind, pos, value in mutations:
        i = pos % (len(buf) + 1)
        if kind == "flip" and buf:
            buf[i % len(buf)] ^= 1 << (value % 8)
        elif kind == "set" and buf:
            buf[i % len(buf)] = value
        elif kind == "delete" and buf:
            del buf[i % len(buf)]
        elif kind == "insert":
            buf.insert(i, value)
        elif kind == "truncate":
            del buf[i:]
        elif kind == "append":
            buf += bytes([value]) * (1 + pos % 7)
    return bytes(buf)


def check_mnist(images_bytes: bytes, labels_bytes: bytes, gz: bool) -> None:
    """Write the two files, load them, and compare with the independent decoding."""
    suffix = ".gz" if gz else ""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "mnist").mkdir()
        (root / "mnist" / (IMAGES + suffix)).write_bytes(images_bytes)
        (root / "mnist" / (LABELS + suffix)).write_bytes(labels_bytes)
        raw = [ref_gunzip(b) if gz else b for b in (images_bytes, labels_bytes)]
        images = None if raw[0] is None else ref_idx(raw[0], 2051, (28, 28))
        labels = None if raw[1] is None else ref_idx(raw[1], 2049, ())
        valid = (images is not None and labels is not None and len(images) == len(labels)
                 and int(labels.max()) <= 9)
        try:
            x, y = load_mnist("test", root=root, download=False, dtype=np.float64)
        except Exception as err:  # noqa: BLE001 - the property is about which exception
            assert not valid, f"a valid file pair was refused: {err}"
            assert_clean_error(err, IMAGES, LABELS)
            return
        assert valid, "an invalid file pair was accepted"
        assert x.shape == (len(images), 1, 28, 28) and x.dtype == np.float64
        np.testing.assert_array_equal(x[:, 0] * 255, images.astype(np.float64))
        np.testing.assert_array_equal(y, labels.astype(np.int64))


@SETTINGS
@given(images=st.binary(max_size=3000), gz=st.booleans(), wrap=st.booleans())
def test_random_bytes_as_mnist_images(images, gz, wrap):
    """Random bytes as the file, or (``wrap``) as the content of a valid gzip stream."""
    labels = valid_pair()[1]
    check_mnist(gzip.compress(images) if gz and wrap else images,
                gzip.compress(labels) if gz else labels, gz)


@SETTINGS
@given(labels=st.binary(max_size=64), gz=st.booleans())
def test_random_bytes_as_mnist_labels(labels, gz):
    images = valid_pair()[0]
    check_mnist(gzip.compress(images) if gz else images, labels, gz)


@SETTINGS
@given(n=st.integers(1, 3), which=st.sampled_from(["images", "labels", "both"]),
       mutations=st.lists(mutation, min_size=1, max_size=4), gz=st.booleans(),
       after_gzip=st.booleans())
def test_mutated_mnist_files(n, which, mutations, gz, after_gzip):
    """Mutate the IDX bytes (then gzip them), or the gzip stream itself."""
    files = list(valid_pair(n))
    targets = [0, 1] if which == "both" else [0 if which == "images" else 1]
    for i in range(2):
        data = files[i]
        if gz and not after_gzip:
            data = gzip.compress(mutate(data, mutations) if i in targets else data)
        elif gz:
            data = gzip.compress(data)
            data = mutate(data, mutations) if i in targets else data
        elif i in targets:
            data = mutate(data, mutations)
        files[i] = data
    check_mnist(files[0], files[1], gz)


@SETTINGS
@given(count=st.integers(0, 2**32 - 1), rows=st.integers(0, 2**32 - 1),
       cols=st.integers(0, 2**32 - 1), body=st.integers(0, 3 * 784))
def test_forged_mnist_headers(count, rows, cols, body):
    """Headers whose dimensions disagree with the payload (including products that overflow
    64-bit integers) are refused; only an exact match is read."""
    header = struct.pack(">4I", 2051, count, rows, cols)
    labels = idx_file(np.zeros(count if count <= 3 else 3, np.uint8), 2049)
    check_mnist(header + bytes(body), labels, gz=False)


# ---- CIFAR-10 ----------------------------------------------------------------------------------
class RefUnpickler(pickle.Unpickler):
    """The test's own restricted unpickler (NumPy arrays and plain containers only)."""

    OK = {"ndarray", "dtype", "_reconstruct", "_frombuffer", "encode", "bytes"}

    def find_class(self, module, name):
        if name not in self.OK or module.split(".")[0] not in ("numpy", "_codecs", "__builtin__",
                                                               "builtins"):
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def ref_cifar(obj):
    """The (images, labels) a batch object holds, or None when it is not a valid batch."""
    if not isinstance(obj, dict) or b"data" not in obj or b"labels" not in obj:
        return None
    data, labels = obj[b"data"], obj[b"labels"]
    if not (type(data) is np.ndarray and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3072 and data.shape[0] > 0):
        return None
    if isinstance(labels, list):
        if not all(type(v) is int for v in labels):
            return None
        values = labels
    elif type(labels) is np.ndarray and labels.ndim == 1 and labels.dtype.kind in "iu":
        values = [int(v) for v in labels]
    else:
        return None
    if len(values) != len(data) or any(v < 0 or v > 9 for v in values):
        return None
    images = np.empty((len(data), 3, 32, 32), np.uint8)   # channel planes, rows of 32
    for i, row in enumerate(data):
        for c in range(3):
            for r in range(32):
                images[i, c, r] = row[c * 1024 + r * 32: c * 1024 + r * 32 + 32]
    return images, np.array(values, dtype=np.int64)


def check_cifar(payload: bytes, expected) -> None:
    """Write ``payload`` as the test batch and load it; ``expected`` is the reference result
    (None: it must be refused)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cifar-10-batches-py"
        folder.mkdir()
        (folder / "test_batch").write_bytes(payload)
        try:
            x, y = load_cifar10("test", root=tmp, download=False, dtype=np.float32)
        except Exception as err:  # noqa: BLE001
            assert expected is None, f"a valid batch was refused: {err}"
            assert_clean_error(err, "test_batch")
            return
        assert expected is not None, "an invalid batch was accepted"
        images, labels = expected
        assert x.shape == images.shape and x.dtype == np.float32
        np.testing.assert_array_equal(x, images.astype(np.float32) / np.float32(255))
        np.testing.assert_array_equal(y, labels)


def ref_from_bytes(payload: bytes):
    import io
    try:
        obj = RefUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except Exception:  # noqa: BLE001 - the reference only needs to know it failed
        return None
    return ref_cifar(obj)


def valid_batch(n=2, seed=0, protocol=2, labels_as_array=False):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    batch = {b"batch_label": b"testing batch 1 of 1",
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"labels": labels if labels_as_array else labels.tolist(),
             b"filenames": [b"f.png"] * n}
    return pickle.dumps(batch, protocol=protocol)


@SETTINGS
@given(payload=st.binary(max_size=400))
def test_random_bytes_as_cifar_batch(payload):
    check_cifar(payload, ref_from_bytes(payload))


@SETTINGS
@given(n=st.integers(1, 2), protocol=st.sampled_from([2, 4, 5]), as_array=st.booleans(),
       mutations=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_cifar_batch(n, protocol, as_array, mutations):
    payload = mutate(valid_batch(n, protocol=protocol, labels_as_array=as_array), mutations)
    check_cifar(payload, ref_from_bytes(payload))


label_values = st.one_of(st.integers(-3, 12), st.integers(-2**70, 2**70), st.floats(0, 9),
                         st.booleans(), st.none(), st.binary(max_size=2))
data_arrays = st.one_of(
    st.integers(0, 2).flatmap(lambda n: hnp.arrays(np.uint8, (n, 3072))),
    hnp.arrays(st.sampled_from([np.uint8, np.int8, np.int64, np.float32, np.bool_]),
               hnp.array_shapes(min_dims=0, max_dims=3, max_side=4)))
labels_values = st.one_of(
    st.lists(st.integers(0, 9), max_size=3),
    st.lists(label_values, max_size=3),
    hnp.arrays(st.sampled_from([np.int64, np.uint8, np.int32, np.float64, np.bool_]),
               hnp.array_shapes(min_dims=0, max_dims=2, max_side=3)),
    st.integers(0, 9), st.none(), st.text(max_size=3), st.lists(st.lists(st.integers(0, 9),
                                                                         max_size=2), max_size=2),
    st.dictionaries(st.binary(max_size=1), st.integers(0, 9), max_size=2))


@SETTINGS
@given(data=data_arrays, labels=labels_values, extra=st.dictionaries(
    st.one_of(st.binary(max_size=3), st.text(max_size=3), st.integers()), st.integers(), max_size=2),
    drop=st.sampled_from([None, b"data", b"labels"]), protocol=st.sampled_from([2, 5]))
def test_random_batch_contents(data, labels, extra, drop, protocol):
    batch = {**extra, b"data": data, b"labels": labels}
    if drop is not None:
        del batch[drop]
    check_cifar(pickle.dumps(batch, protocol=protocol), ref_cifar(batch))


@SETTINGS
@given(obj=st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                                  st.text(max_size=4), st.binary(max_size=4)),
                        lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                st.dictionaries(st.binary(max_size=2), inner,
                                                                max_size=3)),
                        max_leaves=8))
def test_random_objects_as_cifar_batch(obj):
    check_cifar(pickle.dumps(obj, protocol=2), ref_cifar(obj))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_reference_accepts_the_valid_batches(protocol):
    """The oracle itself: a valid batch is valid for it and for the loader."""
    payload = valid_batch(2, protocol=protocol)
    expected = ref_from_bytes(payload)
    assert expected is not None
    check_cifar(payload, expected)
    check_mnist(*valid_pair(), gz=False)
