"""Command line: ``python -m cnn {train,bench,...} --help``."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .checks import check_int, int_arg, number_arg
from .errors import DeviceUnavailableError, DivergedError, MissingExtraError

#: exit status of ``train`` when the loss or the weights became NaN/inf
EXIT_DIVERGED = 3
#: exit status after Ctrl-C (128 + SIGINT, as a shell reports it); after SIGTERM, 128 + 15
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
#: exit status of ``train`` when it trained but could not write ``--save`` (the weights went
#: to a file named on standard error instead)
EXIT_NOT_SAVED = 4
#: ``train --backend`` values that train the same spec through a framework's reference
#: (cnn.reference), with the extra each needs
REFERENCE_BACKENDS = {"keras": "keras", "torch": "torch"}


# ---- argument types: a bad number is refused by argparse, naming the option ----------------
positive_int = int_arg()
nonnegative_int = int_arg(low=0)
positive_float = number_arg(low=0.0, low_open=True)
unit_interval = number_arg(low=0.0, high=1.0, high_open=True)
open_unit_interval = number_arg(low=0.0, high=1.0, low_open=True, high_open=True)


def _add_train(sub) -> None:
    from .backends import AUTO, backend_choices
    from .parallel import mpi_strategies, strategy_names
    from .parallel.compression import FORMATS
    p = sub.add_parser("train", help="train a model and print per-epoch test accuracy and time",
                       epilog="exit status: 0 trained, 2 bad arguments or files (nothing "
                              "trained), 3 training diverged (NaN/inf; nothing saved), 4 "
                              "trained but --save could not be written (the weights went to "
                              "a file named on stderr), 130 interrupted by Ctrl-C, 143 by "
                              "SIGTERM (either: stopped after the step in progress, the "
                              "weights so far saved to --save and, with --backup-dir, a "
                              "backup to continue from)")
    p.add_argument("--dataset", default="mnist_embedded",
                   help="mnist | cifar10 | mnist_embedded | blobs | xor (default "
                        "mnist_embedded), or your own data: a .npz file with x_train, y_train "
                        "and optionally x_test, y_test (see cnn.datafile; `python -m cnn data` "
                        "writes the built-in sets in that format)")
    p.add_argument("--model", default=None,
                   help="preset (mnist_small, cifar_tutorial, cifar_resnet20, cifar_resnet56, "
                        "...) or a .json/.yaml spec; default: mnist_small for MNIST-shaped data, "
                        "cifar_tutorial for cifar10")
    p.add_argument("--data-dir", default=None, help="data root (default $CNN_DATA_DIR or the cache)")
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--batch-size", type=positive_int, default=None, help="default: the preset's")
    p.add_argument("--lr", type=positive_float, default=None, help="default: the preset's")
    p.add_argument("--momentum", type=unit_interval, default=None, help="default: the preset's")
    p.add_argument("--strategy", default="sequential",
                   help=" | ".join(strategy_names()) + " (see cnn.parallel; "
                        + " and ".join(mpi_strategies()) + " run one process per MPI rank)")
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
    p.add_argument("--backend", default=AUTO,
                   help=f"{' | '.join([*backend_choices(), *REFERENCE_BACKENDS])} (default "
                        f"auto: the fastest CPU backend installed, numba when Numba imports, "
                        f"else numpy; also for every worker process and MPI rank. naive is the "
                        f"loop-by-loop oracle the tests check the others against: slow; keras "
                        f"and torch train the same spec through the Keras or PyTorch reference, "
                        f"--threads of theirs)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--filters", type=positive_int, default=None,
                   help="filters of the first conv layer")
    p.add_argument("--limit", type=positive_int, default=None, help="first N training examples")
    p.add_argument("--test-limit", type=positive_int, default=None, help="first N test examples")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="initial weights and data order (an integer >= 0)")
    p.add_argument("--augment", nargs="?", const="cifar", default=None, metavar="SPEC",
                   help="augment the training images (cnn.augment): alone or 'cifar', 4 pixels "
                        "of zero padding, a random crop of the image's size and a random "
                        "horizontal flip; or pad=N,flip=true|false")
    p.add_argument("--normalize", action="store_true",
                   help="normalise the inputs per channel with the training set's mean and "
                        "standard deviation (kept in the saved weights: predict applies it)")
    p.add_argument("--save", default=None,
                   help="write the trained weights to this .npz (checked before training); "
                        "with --config: a folder, or a path with {name} (each model's name)")
    g = p.add_argument_group("backups: continue a run that was stopped or killed "
                             "(see docs/backups.md)")
    g.add_argument("--backup-dir", default=None, metavar="DIR",
                   help="back the run up into DIR (weights, optimizer, schedule, callbacks, "
                        "position, history; the last two kept); a run given a DIR that holds "
                        "a backup continues from it, exactly, and says so")
    g.add_argument("--backup-every", default="epoch", metavar="N{steps|epochs}",
                   help="how often: 'epoch' (default), e.g. '2epochs' or '100steps'")
    g.add_argument("--restarts", type=nonnegative_int, default=0, metavar="K",
                   help="with --ranks and --backup-dir: relaunch an MPI job that failed (a "
                        "rank or a host lost) from its last backup, up to K times, on fewer "
                        "ranks when hosts of --hostfile are gone")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--trace", default=None, metavar="JSON",
                   help="write the timeline of every step to this .json file (Chrome trace "
                        "events: open it in ui.perfetto.dev or chrome://tracing): per worker "
                        "thread, process or MPI rank, data wait, each layer op's forward and "
                        "backward, loss, reduce, update, barriers (see cnn.trace)")
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
                   default=None, help="weight decay (every optimizer): decoupled, as Keras "
                                      "and AdamW, unless the spec's optimizer says "
                                      "weight_decay_mode: coupled (the ResNet presets: an L2 "
                                      "term in the gradient, as the paper and PyTorch's SGD)")
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
                   help="draw live training curves (loss, accuracy) into this PNG each epoch "
                        "(needs matplotlib: the plot extra); with --config: a folder, or a "
                        "path with {name}")
    g = p.add_argument_group("several models from one file")
    g.add_argument("--config", default=None, metavar="FILE",
                   help="train the models of a YAML/JSON file (see cnn.configs) and print a "
                        "comparison table; of the other train options only --name, "
                        "--parallel, --save, --plot, --data-dir and --quiet apply (the rest "
                        "are refused: set them in the file)")
    g.add_argument("--name", default=None, action="append",
                   help="with --config: train only this model (repeat for several)")
    g.add_argument("--parallel", type=positive_int, default=1,
                   help="with --config: models trained side by side in this many processes "
                        "(default 1: one after another)")


def _default_model(dataset: str) -> str:
    from .presets import default_model
    return default_model(dataset)


class _Interrupt:
    """Ctrl-C (SIGINT) or SIGTERM (``timeout``, Slurm, ``docker stop``) during a fit: the
    first asks the strategy to stop after the step in progress
    (:meth:`~cnn.parallel.base.Strategy.request_stop`; every MPI rank stops after the same
    step), so the weights kept, and the backup written with ``--backup-dir``, are those of a
    whole step; another signal a moment later interrupts at once. Without a strategy (a
    reference trainer, ``--backend keras|torch``, which has no step boundary of ours) the first
    signal interrupts at once.

    Once the fit has returned (:meth:`fit_ended`: the final test evaluation, the report and
    the save) a first signal no longer stops anything: the run is whole, so it finishes and
    saves, then exits with the signal's status; another signal stops it at once (and the
    weights are still saved).

    Under ``mpiexec`` one Ctrl-C reaches a rank twice, from the terminal and forwarded by
    ``mpiexec``: a second signal within :data:`SAME_PRESS` seconds of the first is the same
    key press."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    SAME_PRESS = 1.0

    def __init__(self, strategy, master: bool = True):
        self.strategy, self.master = strategy, master
        self.signum: int | None = None
        self.where = (0, 0, 0)
        self._when = 0.0
        self._previous: dict = {}
        self._fit_ended = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        return False

    def _handler(self, signum, frame):
        now = time.monotonic()
        if self.signum is not None:
            if now - self._when < self.SAME_PRESS:
                return
            raise KeyboardInterrupt
        self.signum, self._when = signum, now
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if self._fit_ended:
            if self.master:
                print(f"\n{what}: training has ended; finishing the final evaluation and the "
                      f"save (Ctrl-C again to stop now)", file=sys.stderr, flush=True)
            return
        if self.strategy is None:  # a reference trainer (--backend keras|torch): stop now
            raise KeyboardInterrupt
        self.strategy.request_stop()
        if self.master:
            print(f"\n{what}: stopping after the current step (Ctrl-C again to stop now)",
                  file=sys.stderr, flush=True)

    def fit_ended(self) -> None:
        """The fit has returned: a first signal from here on lets the run finish."""
        self._fit_ended = True

    @property
    def exit_status(self) -> int:
        return EXIT_TERMINATED if self.signum == signal.SIGTERM else EXIT_INTERRUPTED

    def progress(self, epoch: int, done: int, total: int) -> None:
        self.where = (epoch, done, total)


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


def _require_extras(args) -> None:
    """The optional parts ``train``'s options need (cnn.extras), refused before any work."""
    from .extras import require
    from .parallel import mpi_strategies
    if args.plot is not None:
        require("plot", "--plot", ("matplotlib",))
    if args.backend in REFERENCE_BACKENDS:
        require(REFERENCE_BACKENDS[args.backend], f"--backend {args.backend}")
    if args.strategy in mpi_strategies():
        require("mpi", f"--strategy {args.strategy}", ("mpi4py",))


def _check_reference_options(args) -> None:
    """``--backend keras|torch``: the options the reference trainers do not take, refused
    before the data is read. They train sequentially, on ``--threads`` of the framework's own,
    without our callbacks."""
    check_int(f"--backend {args.backend}", "threads", args.threads)
    refused = [("--strategy " + args.strategy, args.strategy != "sequential"),
               ("--early-stopping", args.early_stopping is not None),
               ("--checkpoint", args.checkpoint is not None),
               ("--plot", args.plot is not None),
               ("--backup-dir", args.backup_dir is not None),
               ("--trace", args.trace is not None)]
    if args.backend == "torch":  # fit_torch: SGD with momentum at a constant learning rate
        refused += [("--lr-schedule", args.lr_schedule is not None),
                    ("--warmup-steps", args.warmup_steps is not None)]
    for option, given in refused:
        if given:
            raise ValueError(f"{option}: not with --backend {args.backend}, whose reference "
                             f"trainer (cnn.reference) trains one process on --threads of its "
                             f"own, without callbacks" + (" or learning-rate schedules"
                                                          if args.backend == "torch" else ""))


def _check_reference_model(backend: str, model, optimizer, schedule, threads: int,
                           steps_per_epoch: int, epochs: int) -> None:
    """What the reference cannot build or train (a layer, an optimizer or schedule without a
    counterpart), refused naming ``--backend`` before training starts. The schedule's horizons
    in epochs or left to the end are resolved first, as the reference's fit resolves them."""
    from .optim import make_optimizer
    opt = make_optimizer(optimizer, schedule=schedule)
    if opt.schedule is not None:
        opt = opt.with_schedule(opt.schedule.resolve(steps_per_epoch,
                                                     epochs * steps_per_epoch))
    try:
        if backend == "keras":
            from .reference.keras import (check_keras_compatible, configure_threads,
                                          keras_optimizer, split_coupled_decay)
            check_keras_compatible(model)
            configure_threads(threads)  # TensorFlow takes its threads before anything else
            keras_optimizer(split_coupled_decay(opt)[0])  # coupled decay: on the model
        else:
            from .reference.torch import check_torch_trainable
            check_torch_trainable(model, opt)
    except NotImplementedError as err:
        raise ValueError(f"--backend {backend}: {err}") from None


def _fit_reference(args, model, data, optimizer, schedule, batch_size, augmentation):
    """Train ``model`` through the Keras or PyTorch reference (its weights are the starting
    point and receive the result), with fit's arguments and per-epoch output."""
    from .optim import make_optimizer
    validation = None if data.x_val is None else (data.x_val, data.y_val)
    kwargs = dict(epochs=args.epochs, batch_size=batch_size,
                  optimizer=make_optimizer(optimizer, schedule=schedule), seed=args.seed,
                  validation_data=validation, threads=args.threads,
                  verbose=0 if args.quiet else 1, augment=augmentation,
                  normalize=args.normalize)
    if args.backend == "keras":
        from .reference.keras import fit_keras
        return fit_keras(model, data.x_train, data.y_train, **kwargs)
    from .reference.torch import fit_torch
    return fit_torch(model, data.x_train, data.y_train, **kwargs)
def _describe_backend(name: str) -> str:
    from .backends import AUTO, resolve_backend
    return f"{resolve_backend(name)} (auto)" if name == AUTO else name


def cmd_train(args) -> int:
    from .augment import make_augmentation
    from .backends import get_backend
    from .data import check_dataset_name, load_dataset
    from .layers import layers_from_spec
    from .model import (Sequential, check_weights_path, naming_spec_file, resolve_spec,
                        spec_file)
    from .optim import default_optimizer_spec, make_optimizer
    from .parallel import launch, make_strategy
    from .presets import for_data, with_filters

    if args.config is not None:
        return cmd_train_config(args)
    if args.name is not None or args.parallel != 1:
        raise ValueError("--name and --parallel go with --config")
    _require_extras(args)  # a missing optional part is named before anything else
    launch.join_mpi_job(args.strategy)  # under mpiexec: a failure on one rank ends them all
    # everything known before the data: checked first, so no error comes after work is done
    check_dataset_name(args.dataset)
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
    optimizer = spec.get("optimizer", default_optimizer_spec())
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
    try:  # its values, before the data is read; its fit to the images once they are known
        augmentation = make_augmentation(args.augment)
    except ValueError as err:
        raise ValueError(f"--{err}") from None
    reference = args.backend in REFERENCE_BACKENDS
    if reference:
        _check_reference_options(args)
    else:
        get_backend(args.backend)
    _check_backup_options(args)
    # --ranks N: checked here, then this same command runs again under mpiexec -n N
    launched = launch.maybe_launch(args, getattr(args, "argv", sys.argv[1:]))
    if launched is not None:
        return launched
    master = launch.silence_other_ranks(args.strategy)  # MPI: rank 0 alone prints and saves
    strategy = make_strategy(args.strategy, 1 if reference else args.threads, **options)
    strategy.check_batch_size(batch_size)
    save = None
    if args.save is not None:
        try:
            save = check_weights_path(args.save)
        except (OSError, ValueError) as err:
            raise type(err)(f"--save: {err}") from None
        if args.checkpoint is not None and check_weights_path(args.checkpoint) == save:
            print(f"warning: --save and --checkpoint both name {save}: the best epoch's "
                  f"weights written there are replaced by the final ones at the end; give "
                  f"--checkpoint another file to keep both", file=sys.stderr)
    if args.trace is not None:
        _check_trace_path(args.trace)

    # the validation split is carved here, from arrays nobody else holds, rather than by fit
    # (which copies the caller's data): the same examples, without a second training set
    data = load_dataset(args.dataset, root=args.data_dir, limit=args.limit,
                        test_limit=args.test_limit, seed=args.seed, dtype=dtype,
                        validation_split=args.validation_split)
    if args.batch_size is not None and strategy.examples_per_step(batch_size) > len(data.y_train):
        per_step = strategy.examples_per_step(batch_size)
        raise ValueError(f"--batch-size {batch_size} is larger than the data: a step takes "
                         f"{per_step} examples"
                         + (f" ({batch_size} per worker)" if per_step != batch_size else "")
                         + f" and there are {len(data.y_train)} training examples"
                         + (" after the validation split" if data.x_val is not None else ""))
    spec = for_data(spec, model_name, args.dataset, data.num_classes)  # a preset on your data
    with naming_spec_file(spec_file(model_name)):
        model = Sequential.from_spec(spec, input_shape=data.input_shape, dtype=dtype,
                                     seed=args.seed, backend="numpy" if reference else args.backend)
    if reference:
        _check_reference_model(args.backend, model, optimizer, schedule, args.threads,
                               -(-len(data.y_train) // batch_size), args.epochs)
    if augmentation is not None:
        try:
            augmentation.check(model.input_shape)
        except ValueError as err:
            raise ValueError(f"--{err} (data set {args.dataset})") from None
    interrupt = _Interrupt(None if reference else strategy, master)
    try:
        with interrupt:  # from here on, Ctrl-C or SIGTERM stops at a step boundary and saves
            print(f"{data}" + "".join(f"\n  {note}" for note in data.notes)
                  + f"\n{model.summary()}\noptimizer {optimizer}"
                  + (f", lr schedule {schedule}" if schedule else "")
                  + f", batch {batch_size}, "
                  + (f"the {args.backend} reference with {args.threads} thread(s)" if reference
                     else f"{_describe_strategy(strategy)}, backend "
                          f"{_describe_backend(args.backend)}")
                  + f", validation split {args.validation_split}"
                  + (f", augment {augmentation.text()}" if augmentation else "")
                  + (", inputs normalised per channel" if args.normalize else "")
                  + (f"\nweights will be saved to {save}" if save else ""), flush=True)
            validation = None if data.x_val is None else (data.x_val, data.y_val)
            if reference:
                hist = _fit_reference(args, model, data, optimizer, schedule, batch_size,
                                      augmentation)
            else:
                hist = model.fit(data.x_train, data.y_train, epochs=args.epochs,
                                 batch_size=batch_size, optimizer=optimizer, strategy=strategy,
                                 threads=args.threads, seed=args.seed,
                                 validation_data=validation, lr_schedule=schedule,
                                 callbacks=callbacks,
                                 verbose=0 if args.quiet else 1, on_nonfinite=args.on_nonfinite,
                                 progress=interrupt.progress, backup_dir=args.backup_dir,
                                 backup_every=args.backup_every, trace=args.trace,
                                 augment=augmentation, normalize=args.normalize)
            if interrupt.signum is not None and launch.mpi_job_size() == 1:
                raise KeyboardInterrupt  # asked for during the last evaluation: the run is whole
            interrupt.fit_ended()
            status = _finish_training(hist, model, data, callbacks, save, master)
        if interrupt.signum is not None:  # came after the fit: the run finished and was saved
            return launch.AgreedStatus(status or interrupt.exit_status)
        return status
    except DivergedError as err:
        message = str(err).replace("fit(on_nonfinite='continue')", "--on-nonfinite continue")
        print(f"error: {message}\nweights not saved (they are not finite)", file=sys.stderr)
        return launch.AgreedStatus(EXIT_DIVERGED)  # every rank diverges at the same step
    except KeyboardInterrupt as err:
        return _interrupted(err, interrupt, model, save, master)


def _finish_training(hist, model, data, callbacks, save, master) -> int:
    """After the fit: the per-epoch table, the callbacks' reports, the test set's accuracy
    (evaluated once, here) and the save (the master). Returns the exit status."""
    h = hist.history
    print("\nepoch   val_acc  train_loss  time_s  img/s")
    for i in range(hist.epochs):
        val = f"{h['val_accuracy'][i]:8.4f}" if "val_accuracy" in h else f"{'-':>8}"
        print(f"{h['epoch'][i]:>5}  {val}  {h['loss'][i]:10.4f}  "
              f"{h['time'][i]:6.2f}  {h['images_per_sec'][i]:,.0f}")
    for cb in callbacks:
        _report_callback(cb)
    test = model.evaluate(data.x_test, data.y_test)  # the test set: once, for the final number
    print(f"\n{hist.timing_table()}")
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
        written = _save(model, save, "--save")
        if written != save:
            return EXIT_NOT_SAVED
        print(f"weights saved to {written}")
    if "trace" in hist.info:
        print(f"timeline written to {hist.info['trace']} (open it in ui.perfetto.dev)")
    return 0


def _check_trace_path(path: str) -> None:
    """``--trace``: a .json file in an existing folder (refused before any data is read)."""
    target = Path(path)
    if target.suffix.lower() != ".json":
        raise ValueError(f"--trace: give a .json file. Received {path!r}")
    if target.is_dir() or not target.parent.is_dir():
        raise ValueError(f"--trace: {path} is not a file in an existing folder")


def _check_backup_options(args) -> None:
    """``--backup-dir``, ``--backup-every`` and ``--restarts``, checked before any data is
    read (the folder created and probed)."""
    from .backup import check_backup_dir, parse_every
    try:
        parse_every(args.backup_every)
    except ValueError as err:
        raise ValueError(str(err).replace("backup_every=", "")
                         .replace("backup_every", "--backup-every", 1)) from None
    if args.backup_dir is not None:
        try:
            check_backup_dir(args.backup_dir)
        except OSError as err:
            raise type(err)(f"--backup-dir: {err}") from None
    if args.restarts:
        if args.ranks is None:
            raise ValueError(f"--restarts {args.restarts} relaunches an MPI job that this "
                             f"command starts: give --ranks N (and --strategy mpi)")
        if args.backup_dir is None:
            raise ValueError(f"--restarts {args.restarts} continues a failed job from its last "
                             f"backup: give --backup-dir DIR")


def _interrupted(err: KeyboardInterrupt, interrupt: _Interrupt, model, save, master) -> int:
    """Ctrl-C or SIGTERM ended the fit: say where, save the weights (the master), and return
    the exit status (one every MPI rank agreed on when the fit stopped them together)."""
    from .errors import Interrupted
    from .parallel import launch
    status = interrupt.exit_status
    if isinstance(err, Interrupted):
        where = f" in epoch {err.epoch} after {err.examples} of {err.total} examples"
    else:
        epoch, done, total = interrupt.where
        where = f" in epoch {epoch} after {done} of {total} examples" if epoch else ""
    if master:
        print(f"\ninterrupted{where}", file=sys.stderr)
        if getattr(err, "backup", None) is not None:
            print(f"backup of that point in {err.backup}: run the same command again to "
                  f"continue from it", file=sys.stderr)
        if save is None:
            print("weights not saved (no --save given)", file=sys.stderr)
        elif not _finite_weights(model):
            print("weights not saved (they are not finite)", file=sys.stderr)
        else:
            written = _save(model, save, "--save")
            if written == save:
                print(f"weights of the last completed step saved to {written}", file=sys.stderr)
    # every rank stopped after the same step: the job ends normally (no MPI_Abort, which
    # could cut rank 0's saving short)
    return launch.AgreedStatus(status) if isinstance(err, Interrupted) else status


def _save(model, path: Path, option: str) -> Path | None:
    """``model.save_weights(path)``; when that fails (a full disk, a folder gone), the error
    naming ``option`` and the path, and the weights written to a file in the temporary folder
    instead, so that a finished training is never lost. Returns the path written, or None."""
    import tempfile
    try:
        return model.save_weights(path)
    except OSError as err:
        print(f"error: {option}: {err}", file=sys.stderr)
    fd, rescue = tempfile.mkstemp(prefix=f"parallel-cnn-{Path(path).stem}-", suffix=".npz")
    os.close(fd)
    try:
        written = model.save_weights(rescue)
    except OSError as err:
        Path(rescue).unlink(missing_ok=True)
        print(f"error: the weights could not be written anywhere: {err}", file=sys.stderr)
        return None
    print(f"the trained weights were written to {written} instead", file=sys.stderr)
    return written


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
    from .files import check_writable
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
        try:  # now, not after the first epoch
            check_writable(plot, "the training curves")
        except OSError as err:
            raise type(err)(f"--plot: {err}") from None
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
    elif isinstance(cb, LiveCurves) and cb.png is not None and not cb.failed:
        print(f"training curves in {cb.png}")
    for option, kind in (("--checkpoint", ModelCheckpoint), ("--plot", LiveCurves)):
        if isinstance(cb, kind) and cb.failed:
            print(f"warning: {option}: {len(cb.failed)} write(s) failed, the last: "
                  f"{cb.failed[-1]}", file=sys.stderr)


#: the train options that apply to ``--config`` (the rest are each model's keys in the file)
CONFIG_OPTIONS = ("config", "name", "parallel", "save", "plot", "data_dir", "quiet")


def _refuse_options_beside_config(args) -> None:
    """``train --config``: an option given that the config's models take from the file instead
    is refused, naming it, rather than silently ignored."""
    commands = argparse.ArgumentParser().add_subparsers()
    _add_train(commands)
    defaults = vars(commands.choices["train"].parse_args([]))
    argv = getattr(args, "argv", sys.argv[1:])
    for key, value in vars(args).items():
        if key not in defaults or key in CONFIG_OPTIONS:
            continue
        option = "--" + key.replace("_", "-")  # each train option's dest is its long name's
        # given: a value other than the default, or the option on the line with the default
        if value != defaults[key] or any(a == option or a.startswith(option + "=")
                                         for a in argv):
            raise ValueError(f"{option} does not apply to --config, whose models take their "
                             f"settings from {args.config}: set it there (a model's key, or "
                             f"under defaults:); with --config only "
                             f"{', '.join('--' + k.replace('_', '-') for k in CONFIG_OPTIONS[1:])}"
                             f" apply")


def cmd_train_config(args) -> int:
    """``train --config FILE``: every model (or those named) trained, then compared."""
    from .configs import comparison_table, load_config, train_all
    _refuse_options_beside_config(args)
    runs = load_config(args.config, outputs={"save": args.save, "plot": args.plot})
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
        wrote = "".join(f"; {label} in {row[key]}" for key, label in
                        (("saved", "weights"), ("plot", "curves")) if key in row)
        print(f"  {row['name']}: {what}{wrote}", flush=True)

    rows = train_all(runs, parallel=args.parallel, data_dir=args.data_dir,
                     verbose=0 if (args.quiet is True or args.parallel > 1) else 1, on_done=done)
    print("\n" + comparison_table(rows, runs))
    if args.parallel > 1:
        print("(side by side: the models shared the cores, so their times are not comparable "
              "with runs one after another)")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _add_data(sub) -> None:
    from .data import DATASET_NAMES
    p = sub.add_parser("data", help="write a built-in data set to a .npz file in the format "
                                    "of --dataset PATH.npz (see cnn.datafile)",
                       epilog="the file holds x_train, y_train, x_test, y_test (images "
                              "channels-first: uint8 pixels for the image sets, float64 for the "
                              "synthetic ones) and classes; `train --dataset FILE` reads back "
                              "the arrays `train --dataset NAME` trains on")
    p.add_argument("name", choices=DATASET_NAMES, help="the data set")
    p.add_argument("--out", required=True, metavar="PATH.npz", help="the file to write")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="first N training examples (synthetic sets: how many to draw)")
    p.add_argument("--test-limit", type=positive_int, default=None,
                   help="first N test examples (synthetic sets: how many to draw)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="synthetic sets: the draw")
    p.add_argument("--data-dir", default=None, help="data root (default $CNN_DATA_DIR or the cache)")


def cmd_data(args) -> int:
    from .data import write_dataset
    from .datafile import SUFFIX, read_dataset_file
    out = Path(args.out)
    if out.suffix.lower() != SUFFIX:
        raise ValueError(f"--out: a data set file ends in {SUFFIX}. Received {args.out!r}")
    if out.is_dir():
        raise ValueError(f"--out: {out} is a folder; give a {SUFFIX} file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_dataset(args.name, out, root=args.data_dir, limit=args.limit,
                  test_limit=args.test_limit, seed=args.seed)
    written = read_dataset_file(out)
    print(f"{args.name} written to {out}: {len(written.y_train)} training and "
          f"{len(written.y_test)} test examples of shape {written.x_train.shape[1:]} "
          f"({written.x_train.dtype}), {len(written.classes)} classes")
    return 0


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
                   # argparse formats help with %: the suites' texts say "98%"
                   help=", ".join(f"{name} ({s.measures})" for name, s in SUITES.items())
                   .replace("%", "%%"))
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed repeats per contender (default 5; ops: 15)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (a smoke run)")
    p.add_argument("--presets", nargs="*", default=None)
    p.add_argument("--batch-sizes", nargs="*", type=positive_int, default=None)
    p.add_argument("--json", default=None, metavar="PATH",
                   help="compare, mpi, tta and roofline suites: also write every figure to PATH (mpi: the "
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
    from .extras import require
    require("study", "study", ("pandas",))  # the results table
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
    from .extras import require
    require("study", "report", ("pandas", "matplotlib", "seaborn")
            + (() if args.no_pdf else ("typst",)))
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
            "data": (_add_data, cmd_data),
            "bench": (_add_bench, cmd_bench),
            "study": (_add_study, cmd_study), "report": (_add_report, cmd_report),
            "cluster": (_add_cluster, cmd_cluster)}


def main(argv=None) -> int:
    """The command line: ``python -m cnn ...`` and the ``parallel-cnn`` console script both
    come here, so they fail, exit and clean up alike; in particular, in an MPI job a failure
    on one rank ends every rank (:func:`cnn.parallel.launch.run_main`) instead of leaving the
    others waiting in a collective."""
    from .parallel.launch import run_main
    return run_main(lambda: _command(argv))


def _command(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to re-run it under mpiexec
    try:
        return COMMANDS[args.command][1](args)
    except (ValueError, TypeError, OSError, MissingExtraError, DeviceUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except MemoryError as err:
        detail = f" ({err})" if str(err) else ""
        print(f"error: out of memory{detail}; use a smaller --batch-size, --limit or model",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
