"""Command line: ``python -m cnn {train,bench,...} --help``."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

import numpy as np

from .backends import available_backends
from .checks import check_int, int_arg, number_arg
from .errors import DivergedError

#: exit status of ``train`` when the loss or the weights became NaN/inf
EXIT_DIVERGED = 3
#: exit status after Ctrl-C (128 + SIGINT, as a shell reports it)
EXIT_INTERRUPTED = 130


# ---- argument types: a bad number is refused by argparse, naming the option ----------------
positive_int = int_arg()
nonnegative_int = int_arg(low=0)
positive_float = number_arg(low=0.0, low_open=True)
unit_interval = number_arg(low=0.0, high=1.0, high_open=True)
open_unit_interval = number_arg(low=0.0, high=1.0, low_open=True, high_open=True)


def _add_train(sub) -> None:
    from .backends import available_backends
    from .parallel import MPI_STRATEGIES, strategy_names
    from .parallel.compression import FORMATS
    p = sub.add_parser("train", help="train a model and print per-epoch test accuracy and time",
                       epilog="exit status: 0 trained, 2 bad arguments or files (nothing "
                              "trained), 3 training diverged (NaN/inf; nothing saved), 130 "
                              "interrupted by Ctrl-C (the weights so far saved to --save)")
    p.add_argument("--dataset", default="mnist_embedded",
                   help="mnist | cifar10 | mnist_embedded | blobs | xor (default mnist_embedded)")
    p.add_argument("--model", default=None,
                   help="preset (mnist_small, cifar_tutorial) or a .json/.yaml spec; default: "
                        "mnist_small for MNIST-shaped data, cifar_tutorial for cifar10")
    p.add_argument("--data-dir", default=None, help="data root (default $CNN_DATA_DIR or the cache)")
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--batch-size", type=positive_int, default=None, help="default: the preset's")
    p.add_argument("--lr", type=positive_float, default=None, help="default: the preset's")
    p.add_argument("--momentum", type=unit_interval, default=None, help="default: the preset's")
    p.add_argument("--strategy", default="sequential",
                   help=" | ".join(strategy_names()) + " (see cnn.parallel; "
                        + " and ".join(MPI_STRATEGIES) + " run one process per MPI rank)")
    # checked (before the data is read) by the strategy, whose message names threads=
    p.add_argument("--threads", type=int, default=1,
                   help="workers (a positive integer): threads, or processes for processes")
    p.add_argument("--ranks", type=int, default=None,
                   help="with --strategy mpi/mpi_average: start this many ranks with the venv's "
                        "mpiexec (the same as `mpiexec -n N python -m cnn train ...`)")
    p.add_argument("--hostfile", default=None,
                   help="with --ranks: MPICH hostfile (host[:slots] per line) to spread the "
                        "ranks over machines (see the README)")
    p.add_argument("--overlap", action="store_true",
                   help="mpi: overlap the gradient allreduce with the backward pass")
    p.add_argument("--compression", default=None, choices=list(FORMATS),
                   help="mpi: gradients cross as 16-bit floats (half the bytes of float32; "
                        "sums rounded to 16 bits, as Horovod's Compression.fp16); default off")
    p.add_argument("--average-every", default=None,
                   help="average/mpi_average: steps between averages, or 'epoch' (default)")
    p.add_argument("--backend", default="numpy",
                   help=f"{' | '.join(available_backends())} (default numpy; naive is the "
                        f"loop-by-loop oracle the tests check the others against: slow)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--filters", type=positive_int, default=None,
                   help="filters of the first conv layer")
    p.add_argument("--limit", type=positive_int, default=None, help="first N training examples")
    p.add_argument("--test-limit", type=positive_int, default=None, help="first N test examples")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="initial weights and data order (an integer >= 0)")
    p.add_argument("--save", default=None,
                   help="write the trained weights to this .npz (checked before training)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--on-nonfinite", default="raise", choices=["raise", "continue"],
                   help="a NaN/inf training loss stops training (raise, the default: exit 3, "
                        "nothing saved) or is counted and training goes on (continue)")
    _add_optim_arguments(p)


def _add_optim_arguments(p) -> None:
    """train's optimizer, schedule, validation, callback and multi-model options."""
    from .optim import optimizer_names
    from .schedules import schedule_names
    g = p.add_argument_group("optimizer and learning rate (see cnn.optim, cnn.schedules)")
    g.add_argument("--optimizer", default=None, metavar="SPEC",
                   help=" | ".join(optimizer_names()) + ", with options as NAME:key=value,... "
                        "(adam:beta_2=0.99,epsilon=1e-8), an inline JSON object or a "
                        ".json/.yaml file; default: the model spec's. Another type than the "
                        "spec's starts from that optimizer's own defaults")
    g.add_argument("--weight-decay", type=number_arg(low=0.0),
                   default=None, help="decoupled weight decay (every optimizer; AdamW's)")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum (sgd)")
    g.add_argument("--lr-schedule", default=None, metavar="SPEC",
                   help=" | ".join(schedule_names()) + ", "
                        "with options as NAME:key=value,... (step:step_size=2,factor=0.5,"
                        "unit=epoch; cyclic:max_lr=0.5,step_size=200; plateau:patience=2), "
                        "JSON or a file; a cosine without decay_steps anneals to the end")
    g.add_argument("--warmup-steps", type=positive_int, default=None,
                   help="begin with a linear warm-up of this many steps")
    g = p.add_argument_group("validation, early stopping, checkpoints, curves")
    g.add_argument("--validation-split", type=unit_interval, default=0.1,
                   help="fraction of the training data held out (stratified) to validate on "
                        "after each epoch (default 0.1; 0: none). The test set is used once, "
                        "for the final accuracy")
    g.add_argument("--early-stopping", type=positive_int, default=None, metavar="PATIENCE",
                   help="stop after PATIENCE epochs without a lower validation loss, and keep "
                        "the best epoch's weights")
    g.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="write the best weights so far (lowest validation loss) to PATH (.npz) "
                        "after each epoch that improves it")
    g.add_argument("--plot", default=None, metavar="PNG",
                   help="draw live training curves (loss, accuracy) into this PNG each epoch")
    g = p.add_argument_group("several models from one file")
    g.add_argument("--config", default=None, metavar="FILE",
                   help="train the models of a YAML/JSON file (see cnn.configs) and print a "
                        "comparison table; the other train options do not apply")
    g.add_argument("--name", default=None, action="append",
                   help="with --config: train only this model (repeat for several)")
    g.add_argument("--parallel", type=positive_int, default=1,
                   help="with --config: models trained side by side in this many processes "
                        "(default 1: one after another)")


def _default_model(dataset: str) -> str:
    from .presets import default_model
    return default_model(dataset)


class _Interrupt:
    """Ctrl-C during a fit: the first one lets the current step finish and stops at the step
    boundary (through fit's per-step ``progress`` hook), so the weights kept are those of a
    whole step; a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self.where = (0, 0, 0)
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
        print("\ninterrupt: stopping after the current step (Ctrl-C again to stop now)",
              file=sys.stderr, flush=True)

    def progress(self, epoch: int, done: int, total: int) -> None:
        self.where = (epoch, done, total)
        if self.requested:
            raise KeyboardInterrupt


def _finite_weights(model) -> bool:
    return all(np.isfinite(v).all() for v in model.params.values())


def _strategy_options(args) -> dict:
    """The strategy options given on the command line (checked against the options the
    strategy's class takes)."""
    from .parallel import strategy_names, strategy_options
    given = {}
    if args.overlap:
        given["overlap"] = ("--overlap", True)
    if args.compression is not None:
        given["compression"] = ("--compression", args.compression)
    if args.average_every is not None:
        every = args.average_every
        given["every"] = ("--average-every", every if every == "epoch" else
                          int(every) if every.lstrip("-").isdigit() else every)
    options = {}
    for option, (flag, value) in given.items():
        if option not in strategy_options(args.strategy):
            takers = [s for s in strategy_names() if option in strategy_options(s)]
            raise ValueError(f"{flag} is an option of --strategy {' or '.join(takers)}. "
                             f"Received --strategy {args.strategy}")
        options[option] = value
    return options


def _describe_strategy(strat) -> str:
    d = strat.describe()
    if "ranks" in d:
        return f"strategy {d['strategy']} x{d['ranks']} ranks (hosts {','.join(d['hosts'])})"
    return f"strategy {d['strategy']} x{d['threads']}"


def cmd_train(args) -> int:
    from .backends import get_backend
    from .data import DATASET_NAMES, load_dataset
    from .layers import layers_from_spec
    from .model import (Sequential, check_weights_path, naming_spec_file, resolve_spec,
                        spec_file)
    from .optim import make_optimizer
    from .parallel import launch, make_strategy
    from .presets import with_filters

    if args.config is not None:
        return cmd_train_config(args)
    if args.name is not None or args.parallel != 1:
        raise ValueError("--name and --parallel go with --config")
    launch.join_mpi_job(args.strategy)  # under mpiexec: a failure on one rank ends them all
    # everything known before the data: checked first, so no error comes after work is done
    if args.dataset not in DATASET_NAMES:
        raise ValueError(f"--dataset: unknown data set {args.dataset!r}; choose one of "
                         f"{', '.join(DATASET_NAMES)}")
    dtype = np.dtype(args.dtype)
    model_name = args.model if args.model is not None else _default_model(args.dataset)
    spec = resolve_spec(model_name)
    with naming_spec_file(spec_file(model_name)):
        layers_from_spec(spec["layers"])  # the layer options, before any data is read
        if args.filters is not None:
            # layer types are case-insensitive ("Conv2D"); with_filters looks for "conv2d"
            spec = {**spec, "layers": [{**layer, "type": layer["type"].lower()}
                                       for layer in spec["layers"]]}
            if not any(layer["type"] == "conv2d" for layer in spec["layers"]):
                raise ValueError(f"--filters {args.filters}: model {model_name!r} has no conv2d "
                                 f"layer whose filters it could set")
            spec = with_filters(spec, args.filters)
    optimizer = spec.get("optimizer", {"type": "sgd", "lr": 0.01})
    if not isinstance(optimizer, dict):
        raise ValueError(f"{model_name}: the spec's optimizer must be a dict. Received {optimizer!r}")
    optimizer = dict(optimizer)
    if args.optimizer is not None:
        from .configs import optimizer_spec
        try:
            optimizer = optimizer_spec({"optimizer": optimizer}, args.optimizer)
        except (ValueError, FileNotFoundError) as err:
            raise type(err)(f"--optimizer: {err}") from None
    if args.lr is not None:
        optimizer["lr"] = args.lr
    if args.momentum is not None:
        optimizer["momentum"] = args.momentum
    if args.weight_decay is not None:
        optimizer["weight_decay"] = args.weight_decay
    if args.nesterov:
        optimizer["nesterov"] = True
    schedule = _schedule_option(args)
    make_optimizer(optimizer, schedule=schedule)
    callbacks = _train_callbacks(args, schedule)
    if args.batch_size is not None:
        batch_size = args.batch_size
    else:
        try:
            batch_size = check_int(model_name, "batch_size", spec.get("batch_size", 32))
        except ValueError as err:
            raise ValueError(f"{err} (the spec's; or pass --batch-size)") from None
    options = _strategy_options(args)
    get_backend(args.backend)
    # --ranks N: checked here, then this same command runs again under mpiexec -n N
    launched = launch.maybe_launch(args, getattr(args, "argv", sys.argv[1:]))
    if launched is not None:
        return launched
    master = launch.silence_other_ranks(args.strategy)  # MPI: rank 0 alone prints and saves
    strategy = make_strategy(args.strategy, args.threads, **options)
    strategy.check_batch_size(batch_size)
    save = None
    if args.save is not None:
        try:
            save = check_weights_path(args.save)
        except (OSError, ValueError) as err:
            raise type(err)(f"--save: {err}") from None

    # the validation split is carved here, from arrays nobody else holds, rather than by fit
    # (which copies the caller's data): the same examples, without a second training set
    data = load_dataset(args.dataset, root=args.data_dir, limit=args.limit,
                        test_limit=args.test_limit, seed=args.seed, dtype=dtype,
                        validation_split=args.validation_split)
    with naming_spec_file(spec_file(model_name)):
        model = Sequential.from_spec(spec, input_shape=data.input_shape, dtype=dtype,
                                     seed=args.seed, backend=args.backend)
    interrupt = _Interrupt()
    try:
        with interrupt:  # from here on, Ctrl-C stops at a step boundary and saves
            print(f"{data}\n{model.summary()}\noptimizer {optimizer}"
                  + (f", lr schedule {schedule}" if schedule else "")
                  + f", batch {batch_size}, {_describe_strategy(strategy)}, backend "
                  f"{args.backend}, validation split {args.validation_split}"
                  + (f"\nweights will be saved to {save}" if save else ""), flush=True)
            hist = model.fit(data.x_train, data.y_train, epochs=args.epochs,
                             batch_size=batch_size, optimizer=optimizer, strategy=strategy,
                             threads=args.threads, seed=args.seed,
                             validation_data=None if data.x_val is None
                             else (data.x_val, data.y_val), lr_schedule=schedule,
                             callbacks=callbacks,
                             verbose=0 if args.quiet else 1, on_nonfinite=args.on_nonfinite,
                             progress=interrupt.progress)
            if interrupt.requested:  # pressed during the last evaluation: the run is whole
                raise KeyboardInterrupt
    except DivergedError as err:
        message = str(err).replace("fit(on_nonfinite='continue')", "--on-nonfinite continue")
        print(f"error: {message}\nweights not saved (they are not finite)", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        epoch, done, total = interrupt.where
        where = f" in epoch {epoch} after {done} of {total} examples" if epoch else ""
        print(f"\ninterrupted{where}", file=sys.stderr)
        if not master:
            pass  # MPI: rank 0 reports and saves
        elif save is None:
            print("weights not saved (no --save given)", file=sys.stderr)
        elif not _finite_weights(model):
            print("weights not saved (they are not finite)", file=sys.stderr)
        else:
            print(f"weights of the last completed step saved to {model.save_weights(save)}",
                  file=sys.stderr)
        return EXIT_INTERRUPTED
    h = hist.history
    print("\nepoch   val_acc  train_loss  time_s  img/s")
    for i in range(hist.epochs):
        val = f"{h['val_accuracy'][i]:8.4f}" if "val_accuracy" in h else f"{'-':>8}"
        print(f"{h['epoch'][i]:>5}  {val}  {h['loss'][i]:10.4f}  "
              f"{h['time'][i]:6.2f}  {h['images_per_sec'][i]:,.0f}")
    for cb in callbacks:
        _report_callback(cb)
    test = model.evaluate(data.x_test, data.y_test)  # the test set: once, for the final number
    print(f"total training time {sum(h['time']):.1f} s (+ {hist.info['compile_time']:.1f} s JIT "
          f"compile); final test accuracy {test['accuracy']:.4f} (test loss {test['loss']:.4f})")
    if hist.info.get("nonfinite_steps"):
        first = hist.info["first_nonfinite"]
        print(f"warning: {hist.info['nonfinite_steps']} training steps had a non-finite loss "
              f"(the first at epoch {first[0]}, step {first[1]})", file=sys.stderr)
    if not _finite_weights(model):
        print("error: training diverged: the weights are not finite at the end; weights not "
              "saved", file=sys.stderr)
        return EXIT_DIVERGED
    if save is not None and master:
        print(f"weights saved to {model.save_weights(save)}")
    return 0


def _schedule_option(args):
    """The ``--lr-schedule`` spec (with ``--warmup-steps``), or None."""
    from .configs import parse_option_spec
    try:
        schedule = parse_option_spec(args.lr_schedule, "--lr-schedule")
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"--lr-schedule: {err}" if not str(err).startswith("--") else str(err)) \
            from None
    if args.warmup_steps is not None:
        if schedule is None:
            schedule = {"type": "warmup", "warmup_steps": args.warmup_steps}
        elif isinstance(schedule, dict):
            schedule = {**schedule, "warmup_steps": args.warmup_steps}
    if isinstance(schedule, dict) and str(schedule.get("type")) in ("plateau", "reduce_on_plateau") \
            and not args.validation_split:
        raise ValueError("--lr-schedule plateau reduces on the validation loss: it needs "
                         "--validation-split > 0")
    return schedule


def _train_callbacks(args, schedule) -> list:
    """EarlyStopping, ModelCheckpoint and LiveCurves from the options, checked before any
    data is read."""
    from .callbacks import EarlyStopping, LiveCurves, ModelCheckpoint
    from .model import check_weights_path
    callbacks = []
    for option, value in (("--early-stopping", args.early_stopping),
                          ("--checkpoint", args.checkpoint)):
        if value is not None and not args.validation_split:
            raise ValueError(f"{option} decides on the validation loss: it needs "
                             f"--validation-split > 0 (received --validation-split 0)")
    if args.early_stopping is not None:
        callbacks.append(EarlyStopping(patience=args.early_stopping, restore_best_weights=True))
    if args.checkpoint is not None:
        try:
            path = check_weights_path(args.checkpoint)
        except (OSError, ValueError) as err:
            raise type(err)(f"--checkpoint: {err}") from None
        callbacks.append(ModelCheckpoint(path))
    if args.plot is not None:
        plot = Path(args.plot)
        if plot.is_dir() or (plot.parent.exists() and not plot.parent.is_dir()):
            raise ValueError(f"--plot: {plot} is not a writable file path")
        if plot.suffix.lower() != ".png":
            raise ValueError(f"--plot: give a .png file. Received {args.plot!r}")
        callbacks.append(LiveCurves(png=plot, notebook=False))
    return callbacks


def _report_callback(cb) -> None:
    from .callbacks import EarlyStopping, LiveCurves, ModelCheckpoint
    if isinstance(cb, EarlyStopping):
        if cb.stopped_epoch:
            print(f"early stopping: no lower validation loss for {cb.patience} epochs; stopped "
                  f"after epoch {cb.stopped_epoch}")
        if cb.best_weights is not None:
            print(f"kept the weights of epoch {cb.best_epoch} (validation loss {cb.best:.4f})")
    elif isinstance(cb, ModelCheckpoint) and cb.saved:
        print(f"best weights (epoch {cb.best_epoch}, validation loss {cb.best:.4f}) in "
              f"{cb.saved[-1]}")
    elif isinstance(cb, LiveCurves) and cb.png is not None:
        print(f"training curves in {cb.png}")


def cmd_train_config(args) -> int:
    """``train --config FILE``: every model (or those named) trained, then compared."""
    from .configs import comparison_table, load_config, train_all
    runs = load_config(args.config)
    if args.name:
        known = [r.name for r in runs]
        missing = [n for n in args.name if n not in known]
        if missing:
            raise ValueError(f"--name: no model {missing[0]!r} in {args.config}; it has {known}")
        runs = [r for r in runs if r.name in args.name]
    how = "one after another" if args.parallel == 1 else f"{args.parallel} side by side"
    print(f"{len(runs)} model(s) from {args.config}, {how}: "
          + ", ".join(r.name for r in runs), flush=True)

    def done(row):
        what = (f"val_acc {row['val_accuracy']:.4f}, test_acc {row['test_accuracy']:.4f}, "
                f"{row['train_time']:.1f} s" if row["status"] == "ok"
                else f"{row['status']}: {row['error']}")
        print(f"  {row['name']}: {what}", flush=True)

    rows = train_all(runs, parallel=args.parallel, data_dir=args.data_dir,
                     verbose=0 if (args.quiet is True or args.parallel > 1) else 1, on_done=done)
    print("\n" + comparison_table(rows, runs))
    if args.parallel > 1:
        print("(side by side: the models shared the cores, so their times are not comparable "
              "with runs one after another)")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="a saved model's predictions, test accuracy, confusion "
                                       "matrix and a figure of sample predictions")
    from .predict import add_arguments
    add_arguments(p)


def cmd_predict(args) -> int:
    from .predict import command
    return command(args)


def _add_bench(sub) -> None:
    from .bench import SUITES
    p = sub.add_parser("bench", help="throughput benchmarks with side-by-side ratios")
    p.add_argument("suite", nargs="?", default="compare",
                   help=", ".join(f"{name} ({s.measures})" for name, s in SUITES.items()))
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed repeats per contender (default 5; ops: 15)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (a smoke run)")
    p.add_argument("--presets", nargs="*", default=None)
    p.add_argument("--batch-sizes", nargs="*", type=positive_int, default=None)
    p.add_argument("--json", default=None, metavar="PATH",
                   help="compare and mpi suites: also write every figure to PATH (mpi: the "
                        "fitted alpha and beta the study's scaling model reads from "
                        "results/mpi_allreduce.json)")
    p.add_argument("--dtype", default=None, choices=["float32", "float64"],
                   help="ops suite: the ops' dtype (default float32)")
    p.add_argument("--cpu-time", action="store_true",
                   help="ops suite: time the calling thread's CPU time (a busy machine disturbs "
                        "it less)")
    p.add_argument("--cluster", default=None, metavar="PROFILE[,PROFILE...]",
                   help="mpi, ddp and compression suites: run across the hosts of an emulated "
                        "cluster (root), one per link profile (1gbe, 10gbe, 25gbe, unshaped, "
                        "rate=...)")
    p.add_argument("--ranks", type=_rank_counts, default=None, metavar="N[,N...]",
                   help="mpi suite: MPI ranks (default 2; with --cluster 2,4,8)")
    p.add_argument("--variants", nargs="*", default=None,
                   help="mpi suite: training variants, e.g. blocking overlap "
                        "overlap,bucket=262144 overlap,progress=layers compression=fp16")


def _rank_counts(text: str) -> list[int]:
    """``--ranks 2,4,8``: positive integers, comma-separated."""
    try:
        counts = [int(t) for t in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"rank counts are positive integers separated by "
                                          f"commas (2,4,8). Received {text!r}")
    return counts


def cmd_bench(args) -> int:
    from .bench import main
    main(args.suite, repeats=args.repeats, quick=args.quick, presets=args.presets,
         batch_sizes=args.batch_sizes, json_path=args.json, dtype=args.dtype,
         cpu_time=args.cpu_time, cluster=args.cluster, ranks=args.ranks,
         variants=args.variants)
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
    p.add_argument("--n-boot", type=positive_int, default=2000,
                   help="ignored: intervals are order statistics now (kept for old scripts)")
    p.add_argument("--level", type=open_unit_interval, default=0.95,
                   help="coverage the median intervals aim at (default 0.95; with few "
                        "repeats the range is used and its coverage stated)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="ignored (kept for old scripts)")
    p.add_argument("--dpi", type=positive_int, default=150, help="figure resolution")
    p.add_argument("--no-pdf", action="store_true", help="everything but the Typst compile")
    p.add_argument("--merge", action="append", default=[], metavar="RESULTS",
                   help="another results pickle to analyse beside --results (e.g. another "
                        "machine's, results/device/df_results.pkl); repeatable")


def cmd_report(args) -> int:
    from .analysis import build_report
    build_report(args.results, args.out, figures_dir=args.figures_dir,
                 summary_dir=args.summary_dir, generated_dir=args.generated_dir,
                 gpu_kernels=args.gpu_kernels, n_boot=args.n_boot, level=args.level,
                 seed=args.seed, dpi=args.dpi, pdf=not args.no_pdf, merge=args.merge)
    return 0


def _add_cluster(sub) -> None:
    p = sub.add_parser("cluster", help="an emulated cluster: hosts in network namespaces on "
                                       "shaped links (up, down, status)")
    from .cluster.cli import add_arguments
    add_arguments(p)


def cmd_cluster(args) -> int:
    from .cluster.cli import command
    return command(args)


COMMANDS = {"train": (_add_train, cmd_train), "predict": (_add_predict, cmd_predict),
            "bench": (_add_bench, cmd_bench),
            "study": (_add_study, cmd_study), "report": (_add_report, cmd_report),
            "cluster": (_add_cluster, cmd_cluster)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to re-run it under mpiexec
    try:
        return COMMANDS[args.command][1](args)
    except (ValueError, TypeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
