"""Cut the small MNIST subset shipped in the package (``cnn/embedded/mnist_subset.npz``).

The subset lets the quick profile and the tests run offline anywhere. It is stratified: a fixed
number of images per digit, drawn at random with a fixed seed from the official training and
test sets, then put back in their official relative order. The file holds

    x_train (5120, 28, 28) uint8, y_train (5120,) uint8, train_index (5120,) uint16
    x_test  (1000, 28, 28) uint8, y_test  (1000,) uint8, test_index  (1000,) uint16

(512 training images per digit, so the training set divides into whole batches of 32, 64, 128
and 256: a tiny remainder batch at the end of each epoch would take a full-size, very noisy
step right before the test evaluation) where ``*_index`` are the positions in the official files, so the subset can be checked
against them. Pixels are the raw official values (0-255); ``cnn.data.load_mnist_embedded``
scales them like ``load_mnist``.

To regenerate it (the same seed and sizes give the same arrays; only the zip timestamps
differ), from the repository root, with the official MNIST files in ``<root>/mnist/``:

    CNN_DATA_DIR=/path/to/data .venv/bin/python scripts/make_mnist_subset.py

or pass the root explicitly with ``--root /path/to/data``. On the project machine the root is
``/work/shared/data``. The script prints the size of the file and fails if it is not under
2 MB.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from cnn.data import EMBEDDED_MNIST, load_mnist

MAX_BYTES = 2 * 1024 * 1024


def stratified_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` random positions of every class, sorted into file order."""
    picks = [rng.choice(np.flatnonzero(labels == k), size=per_class, replace=False)
             for k in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=None,
                        help="data root holding mnist/ (default: $CNN_DATA_DIR, then the cache)")
    parser.add_argument("--train-per-class", type=int, default=512)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=EMBEDDED_MNIST)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    arrays = {}
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        # float64 holds k/255 exactly enough that rounding back recovers every byte
        x, y = load_mnist(split, root=args.root, download=False, dtype=np.float64)
        index = stratified_indices(y, per_class, rng)
        arrays[f"x_{split}"] = np.rint(x[index, 0] * 255).astype(np.uint8)
        arrays[f"y_{split}"] = y[index].astype(np.uint8)
        arrays[f"{split}_index"] = index.astype(np.uint16)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    size = args.out.stat().st_size
    counts = {s: np.bincount(arrays[f"y_{s}"], minlength=10).tolist() for s in ("train", "test")}
    print(f"wrote {args.out}: {size:,} bytes ({size / 2**20:.2f} MiB); per-class counts {counts}")
    if size >= MAX_BYTES:
        sys.exit(f"{args.out} is {size:,} bytes, over the {MAX_BYTES:,}-byte budget")


if __name__ == "__main__":
    main()
