"""``python -m cnn predict``: a saved model's predictions, its test accuracy, a confusion
matrix and a figure of sample predictions; with several ``--weights``, an ensemble: the mean
of the models' class probabilities, with each model's accuracy beside the ensemble's.

A weights file written by ``save_weights`` (``train --save``) carries the model's spec, so
:func:`load_model` rebuilds the architecture from the file alone, and the per-channel input
normalisation the model was trained with (``train --normalize``), which its predictions apply
to the raw images of the data set or of ``--images``. The figure goes beside the
(first) weights file unless ``--figure`` says otherwise (:func:`default_figure`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np


#: the longest model spec a weights file may carry (its JSON text, in bytes of UTF-32)
MAX_SPEC_BYTES = 16 << 20


def load_model(path, backend: str = "numpy", dtype=None):
    """The model saved in ``path`` (its spec and weights). ``dtype`` defaults to the dtype the
    weights were saved in. Errors name the file."""
    from .model import TEXT_MEMBERS, Sequential, npz_headers, read_normalization, read_weights

    path = Path(path)
    try:
        headers = npz_headers(path)  # the headers alone: nothing large is decompressed yet
    except Exception:  # noqa: BLE001 - read_weights words the problem, naming the file
        read_weights(path)
        raise
    if not set(headers) - set(TEXT_MEMBERS):
        read_weights(path)  # "holds no weight arrays"
    spec_shape, spec_dtype = headers.get("__spec__", (None, None))
    if spec_dtype is None:
        raise ValueError(f"{path}: holds no model spec (__spec__); it was not written "
                         "by save_weights / train --save")
    if spec_dtype.kind != "U" or spec_shape != () or spec_dtype.itemsize > MAX_SPEC_BYTES:
        raise ValueError(f"{path}: its model spec (__spec__) is a {spec_dtype} array of shape "
                         f"{spec_shape}, not the text save_weights writes")
    try:
        with np.load(path, allow_pickle=False) as f:
            spec = json.loads(str(f["__spec__"]))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: its model spec is not valid JSON ({err.msg})") from None
    if dtype is None:  # the dtype the weights were saved in
        dtype = next(d for k, (_, d) in headers.items() if k not in TEXT_MEMBERS)
    try:
        model = Sequential.from_spec(spec, dtype=dtype, backend=backend)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: the saved spec does not make a model: {err}") from None
    try:
        # the arrays checked against the model from their headers before any is read
        model.load_weights(path)
    except TypeError as err:
        raise ValueError(f"{path}: the saved spec and weights do not make a model: {err}") from None
    except ValueError as err:  # a normalisation of another number of channels
        if str(path) in str(err):
            raise
        raise ValueError(f"{path}: {err}") from None
    return model


def load_images(path, input_shape: Sequence[int], dtype) -> np.ndarray:
    """Images for ``--images``: a ``.npy`` (or ``.npz`` with one array) of shape ``(N, C, H,
    W)``, ``(N, H, W)`` (one channel) or one image ``(C, H, W)``/``(H, W)``; integer pixels
    (0..255) are scaled to [0, 1] as the loaders do. Errors name the file and the shapes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--images: no such file {path}")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY" and magic[:4] not in (b"PK\x03\x04", b"PK\x05\x06"):
        # np.load takes anything else for a pickle, and would say so
        raise ValueError(f"--images: {path} is not a NumPy .npy/.npz file (it starts with "
                         f"{magic!r})")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"--images: {path} is not a NumPy .npy/.npz file ({err})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            if len(loaded.files) != 1:
                raise ValueError(f"--images: {path} holds {len(loaded.files)} arrays "
                                 f"({loaded.files}); give one")
            x = loaded[loaded.files[0]]
    else:
        x = loaded
    if x.dtype.kind not in "fiu":
        raise ValueError(f"--images: {path} holds {x.dtype} values; images are numbers")
    want = tuple(input_shape)
    one_channel = len(want) == 3 and want[0] == 1
    if x.shape == want or (one_channel and x.shape == want[1:]):
        x = x.reshape((1,) + want)  # one image
    elif one_channel and x.ndim == 3 and x.shape[1:] == want[1:]:
        x = x[:, None]  # (N, H, W) -> (N, 1, H, W)
    if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != want:
        raise ValueError(f"--images: {path} has shape {x.shape}; the model takes (N, "
                         f"{', '.join(map(str, want))}) images")
    if x.dtype.kind in "iu":
        x = x.astype(np.float64) / 255.0
    return np.ascontiguousarray(x, dtype=dtype)


def confusion_matrix(y_true, y_pred, classes: int) -> np.ndarray:
    """``m[i, j]``: examples of class ``i`` predicted as ``j``."""
    m = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return m


def format_confusion(m: np.ndarray, names: Sequence[str]) -> str:
    """The confusion matrix as text: rows true classes, columns predicted, with per-class
    recall."""
    names = [str(n)[:8] for n in names]
    width = max(6, max(len(n) for n in names) + 1, len(str(int(m.max()))) + 1)
    head = "true\\pred".ljust(10) + "".join(n.rjust(width) for n in names) + "  recall"
    rows = [head]
    for i, n in enumerate(names):
        total = m[i].sum()
        recall = f"{m[i, i] / total:.3f}" if total else "  -"
        rows.append(n.ljust(10) + "".join(str(int(v)).rjust(width) for v in m[i]) + f"  {recall}")
    return "\n".join(rows)


def sample_figure(x, y_pred, probs, names, out, y_true=None, count: int = 16, seed: int = 0):
    """A grid of up to ``count`` images with their predicted class and probability (and the
    true class, red when wrong), written to ``out`` (PNG). Returns the path."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = min(count, len(x))
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size=n, replace=False))
    cols = min(8, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 2.3 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, idx):
        img = x[i]
        if img.ndim == 3 and img.shape[0] in (1, 3):
            img = img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))
        elif img.ndim == 1:
            img = img[None, :]
        img = np.asarray(img, dtype=np.float64)
        lo, hi = img.min(), img.max()
        img = (img - lo) / (hi - lo) if hi > lo else img * 0
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
        title = f"{names[y_pred[i]]} ({probs[i, y_pred[i]]:.2f})"
        color = "black"
        if y_true is not None:
            title += f"\ntrue {names[y_true[i]]}"
            color = "black" if y_true[i] == y_pred[i] else "red"
        ax.set_title(title, fontsize=8, color=color)
    fig.suptitle("sample predictions" + (" (red: wrong)" if y_true is not None else ""),
                 fontsize=10)
    fig.tight_layout(h_pad=1.2)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def add_arguments(p) -> None:
    from .backends import available_backends
    from .checks import int_arg
    p.add_argument("--weights", required=True, action="append", metavar="NPZ",
                   help="a weights file written by train --save; repeat it for an ensemble "
                        "(the mean of the models' probabilities, each model's accuracy "
                        "printed beside the ensemble's)")
    p.add_argument("--dataset", default=None,
                   help="evaluate on this data set's test split (mnist | cifar10 | "
                        "mnist_embedded | blobs | xor, or a .npz data set file); default: "
                        "mnist_embedded unless --images is given")
    p.add_argument("--images", default=None,
                   help="predict these images instead: a .npy/.npz of shape (N, C, H, W) or "
                        "(N, H, W)")
    p.add_argument("--data-dir", default=None, help="data root (default $CNN_DATA_DIR or the cache)")
    p.add_argument("--test-limit", type=int_arg(), default=None, help="first N test examples")
    p.add_argument("--seed", type=int_arg(low=0), default=0,
                   help="synthetic data sets and the sample figure's choice of images")
    p.add_argument("--backend", default="numpy",
                   help=f"{' | '.join(available_backends())} (default numpy)")
    p.add_argument("--figure", default=None, metavar="PNG",
                   help="PNG of sample predictions (needs matplotlib: the plot extra); default: "
                        "<weights name>_predictions.png beside the (first) weights file, "
                        "skipped with a note when matplotlib is missing; 'none' for none")
    p.add_argument("--samples", type=int_arg(), default=16, help="images in the figure")
    p.add_argument("--show", type=int_arg(low=0), default=10,
                   help="predictions printed (default 10; all with --images up to this many)")


def default_figure(weights) -> Path:
    """Where ``predict`` draws its figure when ``--figure`` is not given: beside the weights
    file, named after it (``w.npz`` -> ``w_predictions.png``)."""
    weights = Path(weights)
    return weights.with_name(f"{weights.stem}_predictions.png")


def _figure_option(args) -> Path | None:
    """The figure to draw, checked before anything is loaded: an explicit ``--figure`` needs
    matplotlib (refused otherwise, naming the plot extra); the default one is skipped, with a
    note, when matplotlib is missing."""
    from .extras import missing_modules, require
    if args.figure is not None:
        if str(args.figure).lower() == "none":
            return None
        figure = Path(args.figure)
        if figure.is_dir():
            raise ValueError(f"--figure: {figure} is a folder; give a .png file path")
        require("plot", "--figure", ("matplotlib",))
        return figure
    if missing_modules("plot", ("matplotlib",)):
        from .extras import install_command
        print(f"note: no figure of sample predictions: matplotlib is not installed (the plot "
              f"extra: {install_command('plot')}); --figure none skips it without this note",
              file=sys.stderr)
        return None
    return default_figure(args.weights[0])


def load_models(paths: Sequence, backend: str = "numpy") -> list:
    """The models saved in ``paths`` (:func:`load_model`), which must take the same inputs and
    predict the same classes to be averaged; errors name the files."""
    models = [load_model(path, backend=backend) for path in paths]
    first = models[0]
    for path, model in zip(paths[1:], models[1:]):
        if (tuple(model.input_shape), model.num_classes) != (tuple(first.input_shape),
                                                           first.num_classes):
            raise ValueError(f"--weights: {path} takes {tuple(model.input_shape)} inputs and "
                             f"predicts {model.num_classes} classes, {paths[0]} "
                             f"{tuple(first.input_shape)} and {first.num_classes}: an ensemble "
                             f"averages models of one task")
    return models


def ensemble_probabilities(models: Sequence, x: np.ndarray) -> tuple[np.ndarray, list]:
    """``(mean, each)``: every model's class probabilities ``(N, classes)`` for ``x (N, C, H,
    W)`` (each in its own dtype), and their mean, the ensemble's prediction."""
    each = [np.asarray(m.predict(x.astype(m.dtype, copy=False)), dtype=np.float64)
            for m in models]
    return np.mean(each, axis=0), each


def command(args) -> int:
    from .backends import get_backend
    from .data import check_dataset_name, load_dataset

    if args.dataset is not None:
        check_dataset_name(args.dataset)
    get_backend(args.backend)
    figure = _figure_option(args)
    models = load_models(args.weights, backend=args.backend)
    model = models[0]
    if len(models) == 1:
        print(f"model from {args.weights[0]}\n{model.summary()}")
    else:
        print(f"ensemble of {len(models)} models (the mean of their probabilities):\n"
              + "\n".join(f"  {path}: {m.num_params:,} parameters ({m.dtype})"
                          for path, m in zip(args.weights, models)))
    if args.images is not None:
        x = load_images(args.images, model.input_shape, model.dtype)
        names = [str(k) for k in range(model.num_classes)]
        if args.dataset is not None:
            names = _class_names(args, model) or names
        probs, _ = ensemble_probabilities(models, x)
        pred = probs.argmax(axis=1)
        print(f"\n{len(x)} images from {args.images}")
        for i in range(min(len(x), max(args.show, 1))):
            print(f"  image {i}: {names[pred[i]]}  (p={probs[i, pred[i]]:.3f})")
        if len(x) > max(args.show, 1):
            counts = np.bincount(pred, minlength=model.num_classes)
            print("  ... predicted class counts: "
                  + ", ".join(f"{names[k]}: {c}" for k, c in enumerate(counts) if c))
        if figure is not None:
            print(f"figure of sample predictions: {sample_figure(x, pred, probs, names, figure, count=args.samples, seed=args.seed)}")
        return 0
    dataset = args.dataset or "mnist_embedded"
    data = load_dataset(dataset, root=args.data_dir, test_limit=args.test_limit,
                        seed=args.seed, dtype=model.dtype)
    if tuple(data.input_shape) != tuple(model.input_shape):
        raise ValueError(f"--dataset {dataset}: its images are {data.input_shape}; the model in "
                         f"{args.weights[0]} takes {tuple(model.input_shape)}")
    if data.num_classes != model.num_classes:
        raise ValueError(f"--dataset {dataset}: {data.num_classes} classes; the model in "
                         f"{args.weights[0]} predicts {model.num_classes}")
    x, y = data.x_test, data.y_test
    probs, each = ensemble_probabilities(models, x)
    pred = probs.argmax(axis=1)
    names = list(data.classes)
    acc = float((pred == y).mean())
    print(f"\n{dataset} test set: {len(y)} images" + "".join(f"\n  {n}" for n in data.notes))
    for i in range(min(len(y), args.show)):
        ok = "" if pred[i] == y[i] else "  (wrong)"
        print(f"  image {i}: predicted {names[pred[i]]} (p={probs[i, pred[i]]:.3f}), "
              f"true {names[y[i]]}{ok}")
    print(f"\nconfusion matrix (rows: true class, columns: predicted)\n"
          f"{format_confusion(confusion_matrix(y, pred, model.num_classes), names)}")
    if len(models) == 1:
        loss = model.evaluate(x, y)["loss"]
        print(f"\ntest loss {loss:.4f}; test accuracy {acc:.4f} ({int((pred == y).sum())} of "
              f"{len(y)})")
    else:
        print("\neach model alone:")
        for path, m, p in zip(args.weights, models, each):
            hits = int((p.argmax(axis=1) == y).sum())
            print(f"  {path}: test loss {m.evaluate(x.astype(m.dtype, copy=False), y)['loss']:.4f}; "
                  f"test accuracy {hits / len(y):.4f} ({hits} of {len(y)})")
        nll = float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-300, None))))
        print(f"ensemble of {len(models)}: log loss of the mean probabilities {nll:.4f}; test "
              f"accuracy {acc:.4f} ({int((pred == y).sum())} of {len(y)})")
    if figure is not None:
        print(f"figure of sample predictions: "
              f"{sample_figure(x, pred, probs, names, figure, y_true=y, count=args.samples, seed=args.seed)}")
    return 0


def _class_names(args, model):
    from .data import load_dataset
    try:
        data = load_dataset(args.dataset, root=args.data_dir, limit=4, test_limit=4,
                            seed=args.seed, dtype=model.dtype)
    except Exception:  # noqa: BLE001 - names are a nicety
        return None
    return list(data.classes) if data.num_classes == model.num_classes else None
