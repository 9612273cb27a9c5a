"""Command line: ``python -m cnn {train,bench,...} --help``."""
from __future__ import annotations

import argparse
import sys

import numpy as np

from .train import DivergedError

#: exit status of ``train`` when the loss or the weights became NaN/inf
EXIT_DIVERGED = 3


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
    p.add_argument("--on-nonfinite", default="raise", choices=["raise", "continue"],
                   help="a NaN/inf training loss stops training (raise, the default: exit 3, "
                        "nothing saved) or is counted and training goes on (continue)")


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
    try:
        hist = model.fit(data.x_train, data.y_train, epochs=args.epochs, batch_size=batch_size,
                         optimizer=optimizer, strategy=args.strategy, threads=args.threads,
                         seed=args.seed, validation_data=(data.x_test, data.y_test),
                         verbose=0 if args.quiet else 1, on_nonfinite=args.on_nonfinite)
    except DivergedError as err:
        print(f"error: {err}\nweights not saved (they are not finite)", file=sys.stderr)
        return EXIT_DIVERGED
    h = hist.history
    if hist.info.get("nonfinite_steps"):
        print(f"warning: {hist.info['nonfinite_steps']} training steps had a non-finite loss "
              f"(the first at epoch {hist.info['first_nonfinite'][0]}, step "
              f"{hist.info['first_nonfinite'][1]})", file=sys.stderr)
    if not all(np.isfinite(v).all() for v in model.params.values()):
        print("error: training diverged: the weights are not finite at the end; weights not "
              "saved", file=sys.stderr)
        return EXIT_DIVERGED
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
    p.add_argument("suite", nargs="?", default="keras",
                   help="keras (default: ours vs Keras), threads (speed-up), gpu (CUDA path)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (a smoke run)")
    p.add_argument("--presets", nargs="*", default=None)
    p.add_argument("--batch-sizes", nargs="*", type=int, default=None)


def cmd_bench(args) -> int:
    from .bench import main
    main(args.suite, repeats=args.repeats, quick=args.quick, presets=args.presets,
         batch_sizes=args.batch_sizes)
    return 0


def _add_study(sub) -> None:
    p = sub.add_parser("study", help="run the study grid into a results DataFrame (resumable)")
    from .study import add_arguments
    add_arguments(p)


def cmd_study(args) -> int:
    from .study import command
    return command(args)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="results -> summary (CSV, JSON), figures and the PDF report")
    p.add_argument("--results", default="results/df_results.pkl",
                   help="the study's results pickle (default results/df_results.pkl)")
    p.add_argument("--out", default="report/report.pdf", help="the PDF to write")
    p.add_argument("--figures-dir", default=None, help="default: <results dir>/figures")
    p.add_argument("--summary-dir", default=None,
                   help="where summary.csv/json go (default: the results dir)")
    p.add_argument("--generated-dir", default=None,
                   help="where numbers.json goes (default: <out dir>/generated)")
    p.add_argument("--gpu-kernels", default=None,
                   help="per-kernel GPU table (default: <results dir>/gpu_kernels.csv, "
                        "else results/gpu_kernels.csv, if present)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--level", type=float, default=0.95, help="confidence level (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--dpi", type=int, default=150, help="figure resolution")
    p.add_argument("--no-pdf", action="store_true", help="everything but the Typst compile")


def cmd_report(args) -> int:
    from .report import build_report
    build_report(args.results, args.out, figures_dir=args.figures_dir,
                 summary_dir=args.summary_dir, generated_dir=args.generated_dir,
                 gpu_kernels=args.gpu_kernels, n_boot=args.n_boot, level=args.level,
                 seed=args.seed, dpi=args.dpi, pdf=not args.no_pdf)
    return 0


COMMANDS = {"train": (_add_train, cmd_train), "bench": (_add_bench, cmd_bench),
            "study": (_add_study, cmd_study), "report": (_add_report, cmd_report)}


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
