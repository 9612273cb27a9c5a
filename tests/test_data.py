"""Tests for cnn.data. No test touches the network: downloads go through a monkeypatched
``_fetch`` or through ``file://`` URLs. The real-data checks run when ``CNN_DATA_DIR`` points at
a folder holding the official files (CI sets it); they are skipped elsewhere."""
from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
import urllib.error
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from cnn import data
from cnn.data import (DATASET_NAMES, Dataset, data_root, load_cifar10, load_dataset, load_mnist,
                      load_mnist_embedded, make_blobs_images, make_xor, stratified_split)

MNIST_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


# ---- writers for the official formats -------------------------------------------------------
def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_file(path: Path, payload: bytes, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def make_mnist_arrays(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.uint8))


def write_mnist(root: Path, split: str = "train", n: int = 7, gz: bool = True, seed: int = 0):
    images, labels = make_mnist_arrays(n, seed)
    image_name, label_name = MNIST_NAMES[split]
    write_file(root / "mnist" / image_name, idx_bytes(images, 2051), gz)
    write_file(root / "mnist" / label_name, idx_bytes(labels, 2049), gz)
    return images, labels


def cifar_batch(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"test", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, n).tolist(), b"filenames": [b"x.png"] * n}


def write_pickle(path: Path, obj, protocol: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))  # the official files are protocol 2


def write_cifar(root: Path, n: int = 3, meta: bool = True, protocol: int = 2):
    """Five train batches of ``n`` and a test batch of ``n + 1``; returns the dicts."""
    folder = root / "cifar-10-batches-py"
    batches = {f"data_batch_{i}": cifar_batch(n, i) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(n + 1, 99)
    for name, batch in batches.items():
        write_pickle(folder / name, batch, protocol)
    if meta:
        names = [f"c{k}".encode() for k in range(10)]
        write_pickle(folder / "batches.meta", {b"label_names": names,
                                               b"num_cases_per_batch": n, b"num_vis": 3072})
    return batches


def planar_to_image(rows: np.ndarray) -> np.ndarray:
    """Independent decoding of the CIFAR row layout, pixel by pixel index arithmetic."""
    n = len(rows)
    out = np.empty((n, 3, 32, 32), np.uint8)
    for c in range(3):
        for r in range(32):
            out[:, c, r, :] = rows[:, c * 1024 + r * 32: c * 1024 + r * 32 + 32]
    return out


# ---- MNIST ----------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_returns_exact_scaled_pixels(tmp_path, gz, dtype, split):
    images, labels = write_mnist(tmp_path, split, gz=gz)
    x, y = load_mnist(split, root=tmp_path, download=False, dtype=dtype)
    assert x.shape == (7, 1, 28, 28) and x.dtype == dtype and x.flags.c_contiguous
    assert y.shape == (7,) and y.dtype == np.int64
    np.testing.assert_array_equal(x[:, 0], images.astype(dtype) / 255)
    np.testing.assert_array_equal(y, labels)
    assert x.min() >= 0 and x.max() <= 1


def test_mnist_root_from_environment(tmp_path, monkeypatch):
    images, _ = write_mnist(tmp_path)
    monkeypatch.setenv("CNN_DATA_DIR", str(tmp_path))
    assert data_root() == tmp_path
    x, _ = load_mnist(download=False)
    np.testing.assert_array_equal(x[:, 0], images / np.float32(255))
    # an explicit root wins over the environment
    with pytest.raises(FileNotFoundError, match="other"):
        load_mnist(root=tmp_path / "other", download=False)


def test_data_root_default(monkeypatch):
    monkeypatch.delenv("CNN_DATA_DIR", raising=False)
    assert data_root() == Path.home() / ".cache" / "parallel-cnn" / "data"


def test_mnist_limit_takes_the_first_examples(tmp_path):
    images, labels = write_mnist(tmp_path)
    x, y = load_mnist(root=tmp_path, limit=3, download=False)
    np.testing.assert_array_equal(x[:, 0], images[:3] / np.float32(255))
    np.testing.assert_array_equal(y, labels[:3])
    assert len(load_mnist(root=tmp_path, limit=100, download=False)[0]) == 7


@pytest.mark.parametrize("limit", [0, -1, 2.5, "3", True])
def test_limit_is_validated(tmp_path, limit):
    write_mnist(tmp_path)
    with pytest.raises(ValueError, match=f"received limit={limit!r}"):
        load_mnist(root=tmp_path, limit=limit, download=False)


def test_mnist_truncated_payload(tmp_path):
    images, labels = write_mnist(tmp_path)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    write_file(path, idx_bytes(images, 2051)[:-100], gz=True)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*truncated"):
        load_mnist(root=tmp_path, download=False)


def test_mnist_truncated_header(tmp_path):
    write_mnist(tmp_path, gz=False)
    (tmp_path / "mnist" / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08")
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.*header"):
        load_mnist(root=tmp_path, download=False)


def test_mnist_wrong_magic(tmp_path):
    images, labels = write_mnist(tmp_path)
    # a labels header on the images file
    write_file(tmp_path / "mnist" / "train-images-idx3-ubyte", idx_bytes(images, 2049), gz=True)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*magic number 2049"):
        load_mnist(root=tmp_path, download=False)


def test_mnist_wrong_image_size(tmp_path):
    write_mnist(tmp_path)
    write_file(tmp_path / "mnist" / "train-images-idx3-ubyte",
               idx_bytes(np.zeros((7, 32, 32), np.uint8), 2051), gz=True)
    with pytest.raises(ValueError, match="28x28"):
        load_mnist(root=tmp_path, download=False)


def test_mnist_count_mismatch(tmp_path):
    write_mnist(tmp_path)
    write_file(tmp_path / "mnist" / "train-labels-idx1-ubyte",
               idx_bytes(np.zeros(6, np.uint8), 2049), gz=True)
    with pytest.raises(ValueError, match="7 images but .* 6 labels"):
        load_mnist(root=tmp_path, download=False)


def test_mnist_label_out_of_range(tmp_path):
    write_mnist(tmp_path)
    write_file(tmp_path / "mnist" / "train-labels-idx1-ubyte",
               idx_bytes(np.full(7, 10, np.uint8), 2049), gz=True)
    with pytest.raises(ValueError, match="label 10"):
        load_mnist(root=tmp_path, download=False)


@pytest.mark.parametrize("corrupt", ["truncated", "garbage", "crc"])
def test_mnist_bad_gzip(tmp_path, corrupt):
    write_mnist(tmp_path)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    raw = path.read_bytes()
    if corrupt == "truncated":
        raw = raw[: len(raw) // 2]
    elif corrupt == "garbage":
        raw = b"this is not gzip at all"
    else:
        raw = raw[:-8] + bytes(b ^ 0xFF for b in raw[-8:-4]) + raw[-4:]
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*gzip"):
        load_mnist(root=tmp_path, download=False)


def test_mnist_missing_files_listed(tmp_path):
    write_mnist(tmp_path, "test")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_mnist("test", root=tmp_path, download=False)
    message = str(info.value)
    assert "t10k-labels-idx1-ubyte.gz" in message and "t10k-images" not in message
    assert str(tmp_path / "mnist") in message and "CNN_DATA_DIR" in message
    assert "download=False" in message


# ---- downloads ------------------------------------------------------------------------------
def md5s(files: dict) -> dict:
    return {name.removesuffix(".gz"): hashlib.md5(payload).hexdigest()
            for name, payload in files.items()}


def fake_mnist_server(monkeypatch, files: dict, calls: list):
    """Serve ``files`` (name -> bytes) through ``_fetch`` and pin their MD5s."""
    def fetch(url, dest):
        calls.append(url)
        Path(dest).write_bytes(files[url.rsplit("/", 1)[-1]])

    monkeypatch.setattr(data, "_fetch", fetch)
    monkeypatch.setattr(data, "MNIST_MD5", md5s(files))


def gz_mnist_files(n: int = 5):
    files = {}
    for split, seed in (("train", 1), ("test", 2)):
        images, labels = make_mnist_arrays(n, seed)
        image_name, label_name = MNIST_NAMES[split]
        files[image_name + ".gz"] = gzip.compress(idx_bytes(images, 2051))
        files[label_name + ".gz"] = gzip.compress(idx_bytes(labels, 2049))
    return files


def test_download_fetches_missing_files_and_caches_them(tmp_path, monkeypatch):
    calls = []
    files = gz_mnist_files()
    fake_mnist_server(monkeypatch, files, calls)
    root = tmp_path / "new" / "root"
    x, y = load_mnist("test", root=root)
    images, labels = make_mnist_arrays(5, 2)
    np.testing.assert_array_equal(x[:, 0], images / np.float32(255))
    np.testing.assert_array_equal(y, labels)
    assert len(calls) == 2 and calls[0].startswith(data.MNIST_MIRRORS[0])
    assert sorted(p.name for p in (root / "mnist").iterdir()) == [
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    load_mnist("test", root=root)
    assert len(calls) == 2  # served from the cache


def test_download_only_missing_file(tmp_path, monkeypatch):
    calls = []
    files = gz_mnist_files()
    fake_mnist_server(monkeypatch, files, calls)
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(
        files["train-images-idx3-ubyte.gz"])
    load_mnist("train", root=tmp_path)
    assert [c.rsplit("/", 1)[-1] for c in calls] == ["train-labels-idx1-ubyte.gz"]


def test_download_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    files = gz_mnist_files()
    fake_mnist_server(monkeypatch, files, calls)
    expected = data.MNIST_MD5["t10k-images-idx3-ubyte"]
    files["t10k-images-idx3-ubyte.gz"] = b"tampered"
    with pytest.raises(ValueError) as info:
        load_mnist("test", root=tmp_path)
    message = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in message and expected in message
    assert hashlib.md5(b"tampered").hexdigest() in message
    assert not (tmp_path / "mnist").exists()   # the folder made for the download is gone too


def test_download_failure_gives_file_not_found(tmp_path, monkeypatch):
    def fetch(url, dest):
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(data, "_fetch", fetch)
    with pytest.raises(FileNotFoundError) as info:
        load_mnist("test", root=tmp_path)
    message = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message
    assert "no network here" in message and str(tmp_path / "mnist") in message
    assert "download=True" not in message and "retry when" in message
    assert not (tmp_path / "mnist").exists()   # no folder tree left as a side effect


def test_real_fetch_with_mirror_fallback(tmp_path, monkeypatch):
    """The real ``_fetch`` (urllib + progress bar) over file:// URLs: the first mirror does
    not exist, the second does."""
    files = gz_mnist_files()
    served = tmp_path / "served"
    served.mkdir()
    for name, payload in files.items():
        (served / name).write_bytes(payload)
    monkeypatch.setattr(data, "MNIST_MIRRORS", ((tmp_path / "absent").as_uri() + "/",
                                               served.as_uri() + "/"))
    monkeypatch.setattr(data, "MNIST_MD5", md5s(files))
    x, _ = load_mnist("train", root=tmp_path / "root")
    assert x.shape == (5, 1, 28, 28)
    assert (tmp_path / "root" / "mnist" / "train-images-idx3-ubyte.gz").read_bytes() == \
        files["train-images-idx3-ubyte.gz"]


def cifar_archive(tmp_path: Path) -> bytes:
    staging = tmp_path / "staging"
    batches = write_cifar(staging)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return buffer.getvalue(), batches


def test_cifar_download_extracts_and_caches(tmp_path, monkeypatch):
    archive, batches = cifar_archive(tmp_path)
    calls = []

    def fetch(url, dest):
        calls.append(url)
        Path(dest).write_bytes(archive)

    monkeypatch.setattr(data, "_fetch", fetch)
    monkeypatch.setattr(data, "CIFAR10_MD5", hashlib.md5(archive).hexdigest())
    root = tmp_path / "root"
    x, y = load_cifar10("test", root=root)
    np.testing.assert_array_equal(y, batches["test_batch"][b"labels"])
    assert calls == [data.CIFAR10_URL]
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # archive removed
    assert len(list((root / "cifar-10-batches-py").iterdir())) == 7
    load_cifar10("train", root=root)
    assert len(calls) == 1


def test_cifar_download_checksum_mismatch(tmp_path, monkeypatch):
    archive, _ = cifar_archive(tmp_path)
    monkeypatch.setattr(data, "_fetch", lambda url, dest: Path(dest).write_bytes(archive))
    root = tmp_path / "root"
    with pytest.raises(ValueError, match=f"cifar-10-python.tar.gz.*{data.CIFAR10_MD5}"):
        load_cifar10("test", root=root)
    assert not root.exists()


# ---- CIFAR-10 -------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cifar_returns_exact_scaled_pixels(tmp_path, dtype, protocol):
    batches = write_cifar(tmp_path, protocol=protocol)
    x, y = load_cifar10("train", root=tmp_path, download=False, dtype=dtype)
    rows = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    assert x.shape == (15, 3, 32, 32) and x.dtype == dtype and y.dtype == np.int64
    np.testing.assert_array_equal(x, planar_to_image(rows).astype(dtype) / 255)
    np.testing.assert_array_equal(y, sum((batches[f"data_batch_{i}"][b"labels"]
                                          for i in range(1, 6)), []))
    x, y = load_cifar10("test", root=tmp_path, download=False, dtype=dtype)
    assert x.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(x, planar_to_image(batches["test_batch"][b"data"]) / dtype(255))


def test_cifar_limit_reads_only_needed_batches(tmp_path):
    batches = write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"broken")
    x, y = load_cifar10(root=tmp_path, limit=5, download=False)
    assert x.shape == (5, 3, 32, 32)
    np.testing.assert_array_equal(y, (batches["data_batch_1"][b"labels"]
                                      + batches["data_batch_2"][b"labels"])[:5])
    with pytest.raises(ValueError, match="data_batch_3"):
        load_cifar10(root=tmp_path, limit=7, download=False)


def bad_batches():
    good = cifar_batch(4, 0)
    return {
        "not a dict": [good[b"data"], good[b"labels"]],
        "no labels": {b"data": good[b"data"]},
        "str keys": {"data": good[b"data"], "labels": good[b"labels"]},
        "float data": {**good, b"data": good[b"data"].astype(np.float32)},
        "wrong width": {**good, b"data": good[b"data"][:, :3000]},
        "label count": {**good, b"labels": good[b"labels"][:3]},
        "label range": {**good, b"labels": [0, 1, 2, 10]},
        "label type": {**good, b"labels": ["a", "b", "c", "d"]},
        "foreign class": {**good, b"labels": OrderedDict()},
    }


@pytest.mark.parametrize("case", list(bad_batches()))
def test_cifar_malformed_batch(tmp_path, case):
    write_cifar(tmp_path)
    write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", bad_batches()[case])
    with pytest.raises(ValueError, match="test_batch"):
        load_cifar10("test", root=tmp_path, download=False)


class CallsPrint:
    def __reduce__(self):
        return print, ("unpickling ran code",)


def test_cifar_pickle_may_not_run_code(tmp_path, capsys):
    write_cifar(tmp_path)
    write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", {b"data": CallsPrint()})
    with pytest.raises(ValueError, match="test_batch.*refusing to load global .*print"):
        load_cifar10("test", root=tmp_path, download=False)
    assert "ran code" not in capsys.readouterr().out


def test_cifar_truncated_pickle(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="test_batch.*unpickle"):
        load_cifar10("test", root=tmp_path, download=False)


def test_cifar_missing_files_listed(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").unlink()
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_cifar10(root=tmp_path, download=False)
    message = str(info.value)
    assert "data_batch_2, data_batch_4" in message and "data_batch_1" not in message
    assert str(tmp_path / "cifar-10-batches-py") in message and "CNN_DATA_DIR" in message


def test_cifar_class_names(tmp_path):
    write_cifar(tmp_path / "with", meta=True)
    write_cifar(tmp_path / "without", meta=False)
    assert load_dataset("cifar10", root=tmp_path / "with", download=False).classes == [
        f"c{k}" for k in range(10)]
    assert load_dataset("cifar10", root=tmp_path / "without", download=False).classes[:2] == [
        "airplane", "automobile"]
    write_pickle(tmp_path / "with" / "cifar-10-batches-py" / "batches.meta", {b"label_names": 3})
    with pytest.raises(ValueError, match="batches.meta"):
        load_dataset("cifar10", root=tmp_path / "with", download=False)


# ---- argument checks ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float16, np.int32, "uint8", "nonsense", None])
def test_dtype_must_be_float32_or_64(tmp_path, dtype):
    write_mnist(tmp_path)
    with pytest.raises(TypeError, match=f"received dtype={dtype!r}"):
        load_mnist(root=tmp_path, download=False, dtype=dtype)
    with pytest.raises(TypeError, match="dtype"):
        load_dataset("xor", dtype=dtype)


def test_float64_and_string_dtypes_accepted():
    assert load_mnist_embedded(limit=2, dtype="float64")[0].dtype == np.float64
    assert make_xor(4, dtype=np.float64)[0].dtype == np.float64


def test_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="received split='validation'"):
        load_mnist("validation", root=tmp_path, download=False)


def test_unknown_dataset_name():
    with pytest.raises(ValueError) as info:
        load_dataset("fashion_mnist")
    assert "'fashion_mnist'" in str(info.value)
    assert all(name in str(info.value) for name in DATASET_NAMES)


# ---- stratified split -----------------------------------------------------------------------
def test_stratified_split_proportions():
    y = np.repeat([0, 1, 2], [700, 200, 100])
    x = np.arange(1000)[:, None, None, None].astype(np.float32)
    x_a, y_a, x_b, y_b = stratified_split(x, y, 0.2, seed=3)
    assert np.bincount(y_b).tolist() == [140, 40, 20]
    assert np.bincount(y_a).tolist() == [560, 160, 80]
    ids_a, ids_b = x_a.ravel().astype(int), x_b.ravel().astype(int)
    assert np.all(np.diff(ids_a) > 0) and np.all(np.diff(ids_b) > 0)  # order kept
    assert sorted(np.concatenate([ids_a, ids_b]).tolist()) == list(range(1000))
    np.testing.assert_array_equal(y[ids_b], y_b)
    again = stratified_split(x, y, 0.2, seed=3)
    np.testing.assert_array_equal(again[2], x_b)
    assert not np.array_equal(stratified_split(x, y, 0.2, seed=4)[2], x_b)


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_stratified_split_in_place_gives_the_same_parts_without_copying_part_a(monkeypatch,
                                                                              chunk):
    """``in_place=True`` (load_dataset's split of arrays it owns) returns the same four parts
    as the copying split, part a as views of the front of the input (rows moved in chunks,
    boundaries crossed with small chunks)."""
    import cnn.data as D
    monkeypatch.setattr(D, "_SPLIT_CHUNK", chunk)
    y = np.random.default_rng(1).integers(0, 4, 300)
    x = np.arange(300 * 2, dtype=np.float32).reshape(300, 1, 1, 2)
    expected = stratified_split(x.copy(), y.copy(), 0.3, seed=5)
    x_own, y_own = x.copy(), y.copy()
    got = stratified_split(x_own, y_own, 0.3, seed=5, in_place=True)
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(g, e)
    assert np.shares_memory(got[0], x_own) and np.shares_memory(got[1], y_own)
    with pytest.raises(ValueError, match="writeable NumPy arrays"):
        x_ro = x.copy()
        x_ro.flags.writeable = False
        stratified_split(x_ro, y.copy(), 0.3, in_place=True)


def test_load_dataset_split_is_fits_split():
    """``train`` carves its validation split in ``load_dataset`` (in place) and passes it to
    ``fit`` as validation data: the same examples as ``fit(validation_split=...)`` takes from
    the whole training set with the same seed."""
    from cnn.train import _carve_validation
    whole = load_dataset("blobs", limit=300, test_limit=10, seed=4)
    x_t, y_t, (x_v, y_v) = _carve_validation(whole.x_train, whole.y_train, 0.25, None, 4)
    split = load_dataset("blobs", limit=300, test_limit=10, seed=4, validation_split=0.25)
    for got, want in ((split.x_train, x_t), (split.y_train, y_t), (split.x_val, x_v),
                      (split.y_val, y_v)):
        np.testing.assert_array_equal(got, want)


def test_stratified_split_total_is_exact_with_uneven_classes():
    y = np.repeat([0, 1, 2], [5, 5, 5])
    _, _, _, y_b = stratified_split(np.zeros((15, 1, 1, 1)), y, 0.5, seed=0)
    assert len(y_b) == 8 and sorted(np.bincount(y_b).tolist()) == [2, 3, 3]


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, "0.2", 0.0001])
def test_stratified_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        stratified_split(np.zeros((100, 1, 1, 1)), np.zeros(100, int), fraction)


def test_stratified_split_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same number"):
        stratified_split(np.zeros((10, 1, 1, 1)), np.zeros(9, int), 0.5)


# ---- embedded subset ------------------------------------------------------------------------
def test_embedded_subset():
    x, y = load_mnist_embedded("train")
    assert x.shape == (5120, 1, 28, 28) and x.dtype == np.float32 and y.dtype == np.int64
    assert x.min() == 0 and x.max() == 1
    assert np.bincount(y).tolist() == [512] * 10
    x, y = load_mnist_embedded("test")
    assert x.shape == (1000, 1, 28, 28) and np.bincount(y).tolist() == [100] * 10
    x, y = load_mnist_embedded("test", limit=100)
    assert len(x) == 100 and len(np.unique(y)) == 10  # the order is mixed, not sorted by class
    assert data.EMBEDDED_MNIST.stat().st_size < 2 * 1024 * 1024


# ---- real data (CI sets CNN_DATA_DIR to the shared data folder) ------------------------------
REAL_MNIST = data_root() / "mnist"
has_real_mnist = all((REAL_MNIST / f"{name}.gz").is_file() or (REAL_MNIST / name).is_file()
                     for names in MNIST_NAMES.values() for name in names)
REAL_CIFAR = data_root() / "cifar-10-batches-py"


@pytest.mark.skipif(not has_real_mnist, reason=f"no MNIST files in {REAL_MNIST} (set CNN_DATA_DIR)")
def test_real_mnist_counts_and_embedded_provenance():
    x, y = load_mnist("train", download=False)
    assert x.shape == (60000, 1, 28, 28) and np.bincount(y).tolist()[:2] == [5923, 6742]
    x_test, y_test = load_mnist("test", download=False)
    assert x_test.shape == (10000, 1, 28, 28)
    with np.load(data.EMBEDDED_MNIST) as f:
        np.testing.assert_array_equal(f["x_train"] / np.float32(255), x[f["train_index"], 0])
        np.testing.assert_array_equal(f["y_test"], y_test[f["test_index"]])


@pytest.mark.skipif(not (REAL_CIFAR / "test_batch").is_file(),
                    reason=f"no CIFAR-10 files in {REAL_CIFAR} (set CNN_DATA_DIR)")
def test_real_cifar10_counts():
    x, y = load_cifar10("train", download=False)
    assert x.shape == (50000, 3, 32, 32) and np.bincount(y).tolist() == [5000] * 10
    assert load_cifar10("test", download=False)[0].shape == (10000, 3, 32, 32)


# ---- synthetic sets -------------------------------------------------------------------------
def test_xor():
    x, y = make_xor(1001, seed=1, noise=0.05)
    assert x.shape == (1001, 1, 1, 2) and x.dtype == np.float32 and y.dtype == np.int64
    bits = np.rint(x.reshape(-1, 2)).astype(int)
    np.testing.assert_array_equal(y, bits[:, 0] ^ bits[:, 1])
    assert abs(int(y.sum()) - 500) <= 1
    clean, _ = make_xor(8, noise=0.0)
    assert set(clean.ravel().tolist()) == {0.0, 1.0}
    np.testing.assert_array_equal(make_xor(10, seed=5)[0], make_xor(10, seed=5)[0])
    with pytest.raises(ValueError, match="noise"):
        make_xor(10, noise=-1)


def test_blobs_are_separable_by_nearest_centroid():
    x, y = make_blobs_images(3000, classes=5, size=6, channels=2, seed=7)
    assert x.shape == (3000, 2, 6, 6) and y.dtype == np.int64
    assert np.bincount(y).tolist() == [600] * 5
    flat = x.reshape(len(x), -1)
    train, test = slice(0, 2000), slice(2000, None)
    centroids = np.stack([flat[train][y[train] == k].mean(0) for k in range(5)])
    distances = ((flat[test, None, :] - centroids[None]) ** 2).sum(-1)
    assert np.mean(distances.argmin(1) == y[test]) > 0.99
    with pytest.raises(ValueError, match="classes"):
        make_blobs_images(10, classes=5, size=1)


# ---- load_dataset ---------------------------------------------------------------------------
def test_load_dataset_mnist_from_files(tmp_path):
    write_mnist(tmp_path, "train", n=20)
    write_mnist(tmp_path, "test", n=6, seed=1)
    ds = load_dataset("mnist", root=tmp_path, test_limit=4, download=False)
    assert isinstance(ds, Dataset) and ds.x_val is None
    assert (len(ds.x_train), len(ds.x_test)) == (20, 4)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10 and ds.classes[3] == "3"


def test_load_dataset_validation_split():
    ds = load_dataset("mnist_embedded", limit=1000, validation_split=0.1, seed=1)
    assert (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == (900, 100, 1000)
    assert ds.y_val.dtype == np.int64 and ds.x_val.shape[1:] == (1, 28, 28)
    assert "val=100" in repr(ds)
    with pytest.raises(ValueError, match="validation_split=1"):
        load_dataset("mnist_embedded", validation_split=1)


@pytest.mark.parametrize("name, shape, classes", [("xor", (1, 1, 2), 2), ("blobs", (1, 8, 8), 10)])
def test_load_dataset_synthetic(name, shape, classes):
    ds = load_dataset(name, limit=300, test_limit=50, seed=2, dtype=np.float64)
    assert (len(ds.x_train), len(ds.x_test)) == (300, 50)
    assert ds.input_shape == shape and ds.num_classes == classes
    assert ds.x_train.dtype == np.float64
    default = load_dataset(name)
    assert len(default.x_train) > 300


def test_dataset_validates_shapes():
    x = np.zeros((4, 1, 2, 2), np.float32)
    y = np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="test"):
        Dataset(x, y, np.zeros((4, 1, 3, 3), np.float32), y, name="bad", classes=["0"])
    with pytest.raises(ValueError, match="together"):
        Dataset(x, y, x, y, name="bad", classes=["0"], x_val=x)


# ---- missing data: every file listed, no misleading advice, no side effects (issue 13) -----------
def no_network(monkeypatch):
    calls = []

    def fetch(url, dest):
        calls.append(url)
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(data, "_fetch", fetch)
    return calls


@pytest.mark.parametrize("download", [True, False])
def test_load_dataset_mnist_lists_train_and_test_files(tmp_path, monkeypatch, download):
    calls = no_network(monkeypatch)
    root = tmp_path / "deep" / "root"
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist", root=root, download=download)
    message = str(info.value)
    for split in ("train", "test"):
        for name in MNIST_NAMES[split]:
            assert f"{name}.gz" in message
    assert not (tmp_path / "deep").exists()
    if download:
        assert len(calls) == 4 * len(data.MNIST_MIRRORS) and "no network here" in message
        assert "download=True" not in message
        assert all(m in message for m in data.MNIST_MIRRORS)
    else:
        assert calls == [] and "download=False" in message and "download=True" in message


def test_load_dataset_mnist_lists_only_the_missing_test_files(tmp_path):
    write_mnist(tmp_path, "train")
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist", root=tmp_path, download=False)
    message = str(info.value)
    assert "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz" in message
    assert "train-" not in message


@pytest.mark.parametrize("download", [True, False])
def test_load_dataset_cifar_lists_train_and_test_files(tmp_path, monkeypatch, download):
    calls = no_network(monkeypatch)
    root = tmp_path / "root"
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10", root=root, download=download)
    message = str(info.value)
    assert ", ".join([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]) in message
    assert not root.exists()
    if download:
        assert calls == [data.CIFAR10_URL]      # one archive, one try
        assert "download=True" not in message and data.CIFAR10_URL in message
    else:
        assert calls == []


def test_load_dataset_cifar_missing_test_batch_only(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10", root=tmp_path, download=False)
    message = str(info.value)
    assert "missing in" in message and ": test_batch (" in message


def test_existing_root_is_kept_when_a_download_fails(tmp_path, monkeypatch):
    no_network(monkeypatch)
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "keep.txt").write_text("mine")
    with pytest.raises(FileNotFoundError):
        load_mnist("test", root=tmp_path)
    assert [p.name for p in (tmp_path / "mnist").iterdir()] == ["keep.txt"]


def test_cli_missing_data_lists_all_files_and_exits_2(tmp_path, monkeypatch, capsys):
    from cnn.cli import main
    no_network(monkeypatch)
    rc = main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "nowhere"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: MNIST files missing")
    assert "train-images-idx3-ubyte.gz" in err and "t10k-labels-idx1-ubyte.gz" in err
    assert not (tmp_path / "nowhere").exists()


# ---- header and pickle edge cases --------------------------------------------------------------
def test_mnist_zero_examples_refused(tmp_path):
    write_file(tmp_path / "mnist" / "t10k-images-idx3-ubyte",
               idx_bytes(np.zeros((0, 28, 28), np.uint8), 2051), True)
    write_file(tmp_path / "mnist" / "t10k-labels-idx1-ubyte",
               idx_bytes(np.zeros((0,), np.uint8), 2049), True)
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: the header declares 0"):
        load_mnist("test", root=tmp_path, download=False)


def test_mnist_forged_dims_that_overflow_int64(tmp_path):
    """dims whose product wraps around in int64 arithmetic must not pass the size check."""
    header = struct.pack(">I", 2049) + struct.pack(">I", 2**32 - 1)
    write_mnist(tmp_path, "test")
    write_file(tmp_path / "mnist" / "t10k-labels-idx1-ubyte", header + b"\x01" * 3, True)
    with pytest.raises(ValueError, match="t10k-labels"):
        load_mnist("test", root=tmp_path, download=False)


@pytest.mark.parametrize("case, match", [
    ("mixed keys", "expected a dict with keys"),
    ("ragged labels", "b'labels' must be"),
    ("float labels", "b'labels' must be"),
    ("bool labels", "b'labels' must be"),
    ("huge labels", "b'labels' must be"),
    ("no images", "holds no images"),
])
def test_cifar_odd_batches(tmp_path, case, match):
    batch = cifar_batch(3, 0)
    if case == "mixed keys":
        batch = {1: 2, b"x": 3, "y": 4}
    elif case == "ragged labels":
        batch[b"labels"] = [1, [2, 3], 4]
    elif case == "float labels":
        batch[b"labels"] = [1.0, 2.0, 3.0]
    elif case == "bool labels":
        batch[b"labels"] = [True, False, True]
    elif case == "huge labels":
        batch[b"labels"] = [2**70, 1, 2]
    elif case == "no images":
        batch[b"data"] = np.zeros((0, 3072), np.uint8)
        batch[b"labels"] = []
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    write_pickle(path, batch)
    with pytest.raises(ValueError, match=match) as info:
        load_cifar10("test", root=tmp_path, download=False)
    assert "test_batch" in str(info.value)
