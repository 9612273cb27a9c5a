"""Several models from one YAML/JSON file (``python -m cnn train --config models.yaml``), and
the ``NAME:key=value,...`` option syntax of ``--optimizer`` and ``--lr-schedule``.

A config file names its models and, optionally, settings they share::

    defaults:                 # any model key; each model may override it
      dataset: mnist_embedded
      epochs: 3
      validation_split: 0.1
    models:
      cnn_sgd:
        model: mnist_small    # a preset, a .json/.yaml spec file, or an inline spec
        optimizer: {type: sgd, lr: 0.1, momentum: 0.9}
      cnn_adam:
        model: mnist_small
        optimizer: adam:lr=0.001
        lr_schedule: cosine
      mlp:
        model: {input_shape: [1, 28, 28], layers: [{type: flatten}, {type: dense, units: 10}]}
        batch_size: 64

(``models`` may also be a list of dicts with a ``name`` each.) Model keys: ``model``,
``dataset`` (a built-in name or a ``.npz`` data set file, :mod:`cnn.datafile`), ``epochs``,
``batch_size``, ``optimizer``, ``lr_schedule``, ``strategy``, ``threads``, ``backend``,
``dtype``, ``seed``, ``validation_split``, ``early_stopping`` (patience in epochs), ``limit``,
``test_limit``, ``augment`` (``cifar``, ``pad=4,flip=true`` or a mapping: :mod:`cnn.augment`),
``normalize`` (true: per-channel normalisation, :mod:`cnn.normalize`), and where each model's
results go:

- ``save``: the trained weights (for ``predict``), and
- ``plot``: the training curves (a PNG; needs matplotlib, the ``plot`` extra),

each a folder (``runs/``: ``runs/<name>.npz`` and ``runs/<name>.png``) or a path in which
``{name}`` stands for the model's name (``weights/{name}.npz``); a plain path is fine for one
model, and two models writing one file are refused. ``train --config FILE --save PATTERN
--plot PATTERN`` sets them for every model, over the file's. Every model is checked before any
trains (the targets of ``save`` and ``plot`` included); a bad key or value is refused naming
the model, the key and the value.

Each model trains on its dataset's training data less a stratified validation split (the
``val_*`` columns), and is tested once, at the end, on the test set. The comparison table
marks the best model by validation accuracy (a decision: never taken on the test set).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .checks import check_bool, check_choice, check_int, check_number
from .files import STRUCTURED_SUFFIXES, parse_inline, read_structured

RUN_KEYS = ("model", "dataset", "epochs", "batch_size", "optimizer", "lr_schedule", "strategy",
            "threads", "backend", "dtype", "seed", "validation_split", "early_stopping", "limit",
            "test_limit", "augment", "normalize", "save", "plot")
#: the file each of the output keys writes, per model, under a folder
OUTPUT_SUFFIXES = {"save": ".npz", "plot": ".png"}


# ---- NAME:key=value,... ---------------------------------------------------------------------
def parse_option_spec(text: Any, option: str) -> Any:
    """A spec from the command line: ``NAME`` or ``NAME:key=value,key=value`` (values read as
    YAML scalars: ``0.1``, ``2``, ``true``, ``epoch``), an inline JSON object, or a
    ``.json``/``.yaml`` file. Dicts and other non-strings are returned as they are."""
    if not isinstance(text, str):
        return text
    text = text.strip()
    if not text:
        raise ValueError(f"{option}: empty value")
    if text.startswith("{"):
        return parse_inline(text, option)
    if text.lower().endswith(STRUCTURED_SUFFIXES):
        return _read_file(text, option)
    name, _, rest = text.partition(":")
    spec: dict[str, Any] = {"type": name.strip()}
    if rest.strip():
        spec.update(parse_inline(rest, option, "NAME:key=value,...", whole=text))
    return spec


def _read_file(path: str | os.PathLike, option: str) -> Any:
    """The contents of a JSON/YAML file given to ``option``; errors name the option, the file
    and the line."""
    try:
        return read_structured(path, "file")
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"{option}: {err}") from None


# ---- one run ---------------------------------------------------------------------------------
@dataclass
class RunConfig:
    """One model of a config file, after defaults are applied."""

    name: str
    model: Any = None
    dataset: str = "mnist_embedded"
    epochs: int = 3
    batch_size: int | None = None
    optimizer: Any = None
    lr_schedule: Any = None
    strategy: str = "sequential"
    threads: int = 1
    backend: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    validation_split: float = 0.1
    early_stopping: int | None = None
    limit: int | None = None
    test_limit: int | None = None
    augment: Any = None
    normalize: bool = False
    save: str | None = None
    plot: str | None = None
    spec: dict = field(default_factory=dict, repr=False)

    def check(self) -> "RunConfig":
        """Validate everything that can be checked before data is read; resolves ``spec``,
        ``optimizer`` and ``batch_size``. ValueError names the model, key and value."""
        from .augment import make_augmentation
        from .data import check_dataset_name
        from .layers import layers_from_spec
        from .model import resolve_spec
        from .optim import make_optimizer
        from .parallel import make_strategy
        from .backends import backend_choices
        from .presets import default_model

        where = f"model {self.name!r}"
        check_dataset_name(self.dataset, f"{where}: dataset")
        self._check_outputs(where)
        for key in ("epochs", "threads"):
            check_int(where, key, getattr(self, key))
        for key in ("batch_size", "limit", "test_limit", "early_stopping"):
            check_int(where, key, getattr(self, key), optional=True)
        check_int(where, "seed", self.seed, low=0)
        vs = check_number(where, "validation_split", self.validation_split, low=0.0, high=1.0,
                          high_open=True)
        if self.early_stopping is not None and not vs:
            raise ValueError(f"{where}: early_stopping needs a validation_split > 0")
        check_choice(where, "dtype", self.dtype, ("float32", "float64"))
        check_bool(where, "normalize", self.normalize)
        try:
            make_augmentation(self.augment)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        check_choice(where, "backend", self.backend, backend_choices())
        model = self.model if self.model is not None else default_model(self.dataset)
        try:
            self.spec = resolve_spec(model)
            layers_from_spec(self.spec["layers"])
            opt = optimizer_spec(self.spec, self.optimizer)
            schedule = parse_option_spec(self.lr_schedule, "lr_schedule")
            make_optimizer(opt, schedule=schedule)
            self.optimizer, self.lr_schedule = opt, schedule
            if self.batch_size is None:
                self.batch_size = check_int("the spec", "batch_size",
                                            self.spec.get("batch_size", 32))
            strat = make_strategy(self.strategy, self.threads)
            strat.check_batch_size(self.batch_size)
            if (schedule is not None and "plateau" in json.dumps(schedule)) and not vs:
                raise ValueError("lr_schedule plateau needs a validation_split > 0")
        except (ValueError, TypeError, FileNotFoundError) as err:
            raise type(err)(f"{where}: {err}") from None
        return self

    def _check_outputs(self, where: str) -> None:
        """``save`` and ``plot``: each resolved to this model's file (:func:`output_path`) and
        checked writable now, before any model trains; ``plot`` needs matplotlib."""
        from .extras import require
        from .model import check_weights_path
        if self.save is not None:
            try:
                self.save = str(check_weights_path(output_path(self.save, self.name, "save")))
            except (OSError, ValueError) as err:
                raise type(err)(f"{where}: save: {err}") from None
        if self.plot is not None:
            require("plot", f"{where}: plot", ("matplotlib",))
            plot = Path(output_path(self.plot, self.name, "plot"))
            if plot.suffix.lower() != ".png" or plot.is_dir():
                raise ValueError(f"{where}: plot must be a .png path, a folder or a pattern "
                                 f"with {{name}}. Received plot={self.plot!r}")
            self.plot = str(plot)

    def describe(self) -> dict:
        d = asdict(self)
        d.pop("spec")
        if not isinstance(d["model"], (str, type(None))):
            d["model"] = "(inline spec)"
        return d


def output_path(value: str, name: str, key: str) -> str:
    """Where model ``name``'s ``key`` output (``save``: weights, ``plot``: curves) goes, from
    the config's or the command line's value: ``{name}`` in it replaced by the model's name,
    or, for a folder (an existing one, or a value ending in ``/``), ``<folder>/<name>`` with
    the output's suffix; any other value as it is."""
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ValueError(f"{key} must be a path, a folder or a pattern with {{name}}. Received "
                         f"{key}={value!r}")
    text = str(value)
    if "{name}" in text:
        return text.replace("{name}", name)
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        return str(Path(text) / f"{name}{OUTPUT_SUFFIXES[key]}")
    return text


def optimizer_spec(spec: Mapping, given: Any) -> dict:
    """The run's optimizer: the model spec's, updated with ``given`` (a spec, or the
    ``NAME:key=value`` text); a ``given`` of another type replaces it entirely."""
    from .optim import DEFAULT_OPTIMIZER, default_optimizer_spec
    base = dict(spec.get("optimizer", default_optimizer_spec()))
    given = parse_option_spec(given, "optimizer")
    if given is None:
        return base
    if not isinstance(given, Mapping):
        raise ValueError(f"optimizer must be a name, NAME:key=value,... or a dict. "
                         f"Received optimizer={given!r}")
    given = dict(given)
    kind = str(given.get("type", base.get("type", DEFAULT_OPTIMIZER))).lower()
    if kind != str(base.get("type", DEFAULT_OPTIMIZER)).lower():
        return {**given, "type": kind}
    return {**base, **given, "type": kind}


def load_config(path: str | os.PathLike, outputs: Mapping[str, str | None] | None = None
                ) -> list[RunConfig]:
    """The models of a config file, defaults applied, each checked (see the module docstring).
    ``outputs``: ``save`` and ``plot`` from the command line, set for every model over the
    file's (a ``None`` value leaves the file's)."""
    path = Path(path)
    doc = _read_file(path, "--config")
    if not isinstance(doc, Mapping) or "models" not in doc:
        raise ValueError(f"--config: {path} must hold a mapping with 'models' (and optionally "
                         f"'defaults'). Received {type(doc).__name__}")
    unknown = sorted(set(doc) - {"models", "defaults"})
    if unknown:
        raise ValueError(f"--config: {path}: unknown top-level key {unknown[0]!r} (expected "
                         "'models' and 'defaults')")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        raise ValueError(f"--config: {path}: 'defaults' must be a mapping")
    models = doc["models"]
    if isinstance(models, Mapping):
        entries = [(str(k), v) for k, v in models.items()]
    elif isinstance(models, list):
        entries = []
        for i, m in enumerate(models):
            if not isinstance(m, Mapping) or "name" not in m:
                raise ValueError(f"--config: {path}: models[{i}] must be a mapping with a 'name'")
            entries.append((str(m["name"]), {k: v for k, v in m.items() if k != "name"}))
    else:
        raise ValueError(f"--config: {path}: 'models' must be a mapping or a list")
    if not entries:
        raise ValueError(f"--config: {path}: no models")
    names = [n for n, _ in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--config: {path}: model name {dup[0]!r} appears twice")
    runs = []
    for name, entry in entries:
        if entry is None:
            entry = {}
        if isinstance(entry, str):  # "name: preset"
            entry = {"model": entry}
        if not isinstance(entry, Mapping):
            raise ValueError(f"--config: {path}: model {name!r} must be a mapping")
        merged = {**defaults, **entry,
                  **{k: v for k, v in (outputs or {}).items() if v is not None}}
        bad = sorted(set(merged) - set(RUN_KEYS))
        if bad:
            raise ValueError(f"--config: {path}: model {name!r}: unknown key {bad[0]!r}; "
                             f"the keys are {list(RUN_KEYS)}")
        try:
            runs.append(RunConfig(name=name, **merged).check())
        except (ValueError, TypeError, FileNotFoundError) as err:
            raise type(err)(f"--config: {path}: {err}") from None
    for key in OUTPUT_SUFFIXES:  # one file per model
        targets: dict[str, str] = {}
        for run in runs:
            target = getattr(run, key)
            if target is not None and target in targets:
                raise ValueError(f"--config: {path}: models {targets[target]!r} and {run.name!r} "
                                 f"would both write {key} to {target}; put {{name}} in the path "
                                 f"or give a folder")
            if target is not None:
                targets[target] = run.name
    return runs


def train_one(run: RunConfig, data_dir=None, verbose: int = 0) -> dict:
    """Train one configured model; returns its row of the comparison table (and its history).
    A run that diverges or fails gives a row with ``status`` saying so."""
    from .callbacks import EarlyStopping, LiveCurves
    from .data import load_dataset
    from .model import Sequential
    from .errors import DivergedError
    from .presets import default_model, for_data

    t0 = time.perf_counter()
    row: dict[str, Any] = {"name": run.name, "status": "ok", "error": ""}
    try:
        dtype = np.dtype(run.dtype)
        data = load_dataset(run.dataset, root=data_dir, limit=run.limit,
                            test_limit=run.test_limit, seed=run.seed, dtype=dtype)
        spec = for_data(run.spec, run.model if run.model is not None
                        else default_model(run.dataset), run.dataset, data.num_classes)
        model = Sequential.from_spec(spec, input_shape=data.input_shape, dtype=dtype,
                                     seed=run.seed, backend=run.backend)
        callbacks = []
        if run.early_stopping:
            callbacks.append(EarlyStopping(patience=run.early_stopping, restore_best_weights=True))
        if run.plot is not None:
            callbacks.append(LiveCurves(png=run.plot, notebook=False, title=run.name))
        hist = model.fit(data.x_train, data.y_train, epochs=run.epochs,
                         batch_size=run.batch_size, optimizer=run.optimizer,
                         lr_schedule=run.lr_schedule, strategy=run.strategy,
                         threads=run.threads, backend=run.backend, seed=run.seed,
                         validation_split=run.validation_split or 0.0, callbacks=callbacks,
                         verbose=verbose, augment=run.augment, normalize=run.normalize)
        test = model.evaluate(data.x_test, data.y_test)
        h = hist.history
        row.update({"epochs": hist.epochs, "train_loss": h["loss"][-1],
                    "val_loss": h.get("val_loss", [math.nan])[-1],
                    "val_accuracy": h.get("val_accuracy", [math.nan])[-1],
                    "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                    "train_time": float(sum(h["time"])), "params": model.num_params,
                    "history": {k: list(v) for k, v in h.items()}})
        if run.plot is not None:
            row["plot"] = run.plot
        if run.save is not None:
            row["saved"] = str(model.save_weights(run.save))
    except DivergedError as err:
        row.update({"status": "diverged", "error": str(err)})
    except Exception as err:  # noqa: BLE001 - one failing model must not lose the others
        row.update({"status": "failed", "error": f"{type(err).__name__}: {err}"})
    row["wall_time"] = time.perf_counter() - t0
    return row


def _worker(args):
    run, data_dir = args
    return train_one(run, data_dir)


def train_all(runs: list[RunConfig], parallel: int = 1, data_dir=None, verbose: int = 0,
              on_done=None) -> list[dict]:
    """Train ``runs`` one after another (``parallel=1``) or up to ``parallel`` side by side,
    each in a process of its own (BLAS pinned to one thread in each); rows in ``runs``' order.
    ``on_done(row)`` is called as each finishes."""
    if parallel <= 1 or len(runs) == 1:
        rows = []
        for run in runs:
            rows.append(train_one(run, data_dir, verbose))
            if on_done:
                on_done(rows[-1])
        return rows
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    ctx = mp.get_context("spawn")
    rows: dict[str, dict] = {}
    with ProcessPoolExecutor(max_workers=min(parallel, len(runs)), mp_context=ctx) as pool:
        futures = {pool.submit(_worker, (run, data_dir)): run.name for run in runs}
        for fut in as_completed(futures):
            try:
                row = fut.result()
            except Exception as err:  # noqa: BLE001 - a worker process died
                row = {"name": futures[fut], "status": "failed",
                       "error": f"{type(err).__name__}: {err}", "wall_time": math.nan}
            rows[row["name"]] = row
            if on_done:
                on_done(row)
    return [rows[r.name] for r in runs]


def best_row(rows: list[dict]) -> int | None:
    """Index of the best finished model: highest validation accuracy, then lowest validation
    loss (the test set decides nothing). None when none finished with validation numbers."""
    ok = [(i, r) for i, r in enumerate(rows) if r["status"] == "ok"
          and not math.isnan(r.get("val_accuracy", math.nan))]
    if not ok:
        return None
    return min(ok, key=lambda ir: (-ir[1]["val_accuracy"], ir[1]["val_loss"]))[0]


def comparison_table(rows: list[dict], runs: list[RunConfig] | None = None) -> str:
    """The comparison table: one line per model, the best marked with ``*``."""
    best = best_row(rows)
    opts = {r.name: r for r in (runs or [])}
    head = (f"  {'model':<16}{'optimizer':<12}{'schedule':<10}{'epochs':>6}{'train_loss':>11}"
            f"{'val_loss':>10}{'val_acc':>9}{'test_acc':>10}{'time_s':>9}  status")
    lines = [head, "  " + "-" * (len(head) - 2)]
    for i, r in enumerate(rows):
        run = opts.get(r["name"])
        opt = (run.optimizer or {}).get("type", "") if run else ""
        sched = run.lr_schedule if run else None
        sched = (sched.get("type", "") if isinstance(sched, Mapping) else (sched or "-"))
        mark = "*" if i == best else " "
        if r["status"] == "ok":
            lines.append(f"{mark} {r['name']:<16}{opt:<12}{sched:<10}{r['epochs']:>6}"
                         f"{r['train_loss']:>11.4f}{r['val_loss']:>10.4f}"
                         f"{r['val_accuracy']:>9.4f}{r['test_accuracy']:>10.4f}"
                         f"{r['train_time']:>9.2f}  ok")
        else:
            lines.append(f"{mark} {r['name']:<16}{opt:<12}{sched:<10}{'':>6}{'':>11}{'':>10}"
                         f"{'':>9}{'':>10}{'':>9}  {r['status']}: {r['error'][:80]}")
    if best is not None:
        lines.append(f"* best: {rows[best]['name']} (highest validation accuracy; test accuracy "
                     "is the final number, not a selection criterion)")
    else:
        lines.append("no model finished with validation numbers: none marked")
    return "\n".join(lines)


__all__ = ["RunConfig", "best_row", "comparison_table", "load_config", "parse_option_spec",
           "train_all", "train_one"]
