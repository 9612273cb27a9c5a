"""Command line: ``python -m cnn {train,bench,...} --help``."""
from __future__ import annotations

import argparse
import sys

import numpy as np


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model and print per-epoch test accuracy and time")
    p.add_argument("--dataset", default="mnist_embedded",
                   help="mnist | cifar10 | mnist_embedded | blobs | xor (default mnist_embedded)")
    p.add_argument("--model", default=None,
                   help="preset (mnist_small, cifar_tutorial) or a .json/.yaml spec; default: "
                        "mnist_small for MNIST-shaped data, cifar_tutorial for cifar10")
    p.add_argument("--data-dir", default=None, help="data root (default $CNN_DATA_DIR or the cache)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--lr", type=float, default=None, help="default: the preset's")
    p.add_argument("--momentum", type=float, default=None, help="default: the preset's")
    p.add_argument("--strategy", default="sequential", help="sequential | sync | average | hogwild")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="numpy", help="numpy | numba | numba_parallel | cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--filters", type=int, default=None, help="filters of the first conv layer")
    p.add_argument("--limit", type=int, default=None, help="first N training examples")
    p.add_argument("--test-limit", type=int, default=None, help="first N test examples")
    p.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    p.add_argument("--save", default=None, help="write the trained weights to this .npz")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _default_model(dataset: str) -> str:
    return "cifar_tutorial" if dataset == "cifar10" else "mnist_small"


def cmd_train(args) -> int:
    from .data import load_dataset
    from .model import Sequential, resolve_spec
    from .presets import with_filters

    dtype = np.dtype(args.dtype)
    data = load_dataset(args.dataset, root=args.data_dir, limit=args.limit,
                        test_limit=args.test_limit, seed=args.seed, dtype=dtype)
    spec = with_filters(resolve_spec(args.model or _default_model(args.dataset)), args.filters)
    model = Sequential.from_spec(spec, input_shape=data.input_shape, dtype=dtype, seed=args.seed,
                                 backend=args.backend)
    optimizer = dict(spec.get("optimizer", {"type": "sgd", "lr": 0.01}))
    if args.lr is not None:
        optimizer["lr"] = args.lr
    if args.momentum is not None:
        optimizer["momentum"] = args.momentum
    batch_size = args.batch_size or spec.get("batch_size", 32)
    print(f"{data}\n{model.summary()}\noptimizer {optimizer}, batch {batch_size}, "
          f"strategy {args.strategy} x{args.threads}, backend {args.backend}", flush=True)
    hist = model.fit(data.x_train, data.y_train, epochs=args.epochs, batch_size=batch_size,
                     optimizer=optimizer, strategy=args.strategy, threads=args.threads,
                     seed=args.seed, validation_data=(data.x_test, data.y_test),
                     verbose=0 if args.quiet else 1)
    h = hist.history
    print("\nepoch  test_acc  train_loss  time_s  img/s")
    for i in range(hist.epochs):
        print(f"{h['epoch'][i]:>5}  {h['val_accuracy'][i]:8.4f}  {h['loss'][i]:10.4f}  "
              f"{h['time'][i]:6.2f}  {h['images_per_sec'][i]:,.0f}")
    print(f"total training time {sum(h['time']):.1f} s (+ {hist.info['compile_time']:.1f} s JIT "
          f"compile); final test accuracy {h['val_accuracy'][-1]:.4f}")
    if args.save:
        print(f"weights saved to {model.save_weights(args.save)}")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="throughput benchmarks with side-by-side ratios")
    p.add_argument("suite", nargs="?", default="keras", help="keras (default)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (a smoke run)")
    p.add_argument("--presets", nargs="*", default=None)
    p.add_argument("--batch-sizes", nargs="*", type=int, default=None)


def cmd_bench(args) -> int:
    from .bench import main
    main(args.suite, repeats=args.repeats, quick=args.quick, presets=args.presets,
         batch_sizes=args.batch_sizes)
    return 0


COMMANDS = {"train": (_add_train, cmd_train), "bench": (_add_bench, cmd_bench)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
