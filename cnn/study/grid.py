"""Grids: validation, defaults, expansion into runs, run keys, grid files.

A grid is a dict mapping axis names to a value or a list of values, or a list of such dicts
(their union; a configuration that two sub-grids both produce runs once). List-valued axes are
crossed. The axes (default in brackets):

- ``dataset`` [mnist_embedded]: mnist | cifar10 | mnist_embedded | blobs | xor.
- ``model`` [cifar_tutorial for cifar10, else mnist_small]: a preset name (cnn.presets).
- ``path`` [sequential]: a training path of the registry (:data:`cnn.paths.PATHS`).
- ``strategy`` and ``backend`` [the path's default]: only for paths that take several (the
  registry says which); a path with one strategy or backend fixes it and ignores the axis.
- ``threads`` [1]: the path's workers (the registry's ``workers``: Python threads,
  NUMBA_NUM_THREADS, TensorFlow threads, ...); forced to 1 for paths that do not scale.
- ``batch_size`` [the preset's], ``filters`` [the preset's; filters of the first conv layer;
  0 for a feed-forward preset, which has none],
  ``epochs`` [1], ``train_size`` / ``test_size`` [the whole split; the first N examples],
  ``dtype`` [float32], ``seed`` [0], ``lr`` / ``momentum`` [the preset's optimizer; with
  another optimizer type, that optimizer's default rate and no momentum].
- ``optimizer`` [the preset's]: a type of :data:`cnn.optim.OPTIMIZERS`, with options as
  ``NAME:key=value,...`` (``sgd:nesterov=true``, ``adam:beta_2=0.99``; ``lr`` and ``momentum``
  are the axes above; ``momentum`` only for the optimizers that take one); ``lr_schedule``
  [none: a constant rate]: a type of :data:`cnn.schedules.SCHEDULES` but ``plateau``, with
  options likewise (``step:step_size=1,unit=epoch``; a cosine without ``decay_steps`` anneals
  to the end of the run). Both are recorded as text, ``""`` for the preset's optimizer and for
  no schedule. Paths whose trainer runs only some optimizers say so in the registry
  (``TrainingPath.optimizers``: PyTorch trains plain SGD only).
- ``augment`` [none]: data augmentation of the training images (:mod:`cnn.augment`):
  ``cifar`` (4 pixels of zero padding, a random crop, a random horizontal flip) or
  ``pad=N,flip=true|false``, recorded as that text (``pad=4,flip=true``), ``""`` for none;
  image data sets only (not ``xor``). Every path trains on the same crops and flips.
- ``warmup_epochs`` [0]: epochs trained before the ``epochs`` measured ones (a throughput
  run's discarded warm-up: JIT, caches, thread pools, a compiled graph), recorded with
  ``warmup`` set on their rows so that the analysis keeps them out of every throughput
  figure; not with ``target`` (a time-to-accuracy clock starts at the first step).
- ``engine`` [the path's first]: how a reference framework runs the model, for paths whose
  registry entry lists ``engines`` (Keras ``graph`` | ``xla``; PyTorch ``eager`` |
  ``channels_last`` | ``compiled``); ``""`` and ignored elsewhere.
- ``link`` [``""``: every rank on this host]: for paths whose entry says ``links`` (``mpi``),
  a link profile of :mod:`cnn.cluster.links` (``1gbe``, ``10gbe``, ...): the ranks run one per
  host across an emulated cluster of ``threads`` hosts (2 to 8) that the study makes (root,
  network namespaces: a study that cannot make one refuses before its first run, naming why);
  ignored elsewhere.
- ``period`` [None: the strategy's default, once per epoch]: for strategy ``average``, the
  steps between two averages (a positive integer) or ``"epoch"``; ignored elsewhere.
- time-to-accuracy: ``target`` [None: off]: a validation accuracy in (0, 1); the run then
  holds out ``val_size`` [10% of the training split, at most 5,000] examples carved from the
  end of the training split (never the test set), evaluates on them every ``eval_every``
  [an epoch / 10] optimizer steps, and stops at the first evaluation that reaches the target
  (``epochs`` is the cap).
- settings, one value per sub-grid: ``repeats`` [1], ``timeout`` [1800 s per run],
  ``cuda_simulator`` [False: run paths that need a GPU under NUMBA_ENABLE_CUDASIM=1].

An unknown axis or an invalid value raises ``ValueError`` naming it. Defaults are resolved
when the grid expands (``filters=None`` becomes the preset's 8, a too-large ``train_size`` the
size of the split), so equal runs get equal keys however they were written.

Each configuration runs ``repeats`` times with ``seed = seed + repeat`` (so repeat r of every
path starts from the same weights and data order and paths pair up), in interleaved order:
repeat 0 of every configuration, then repeat 1, ..., so drift in the machine's speed hits all
configurations alike. The data sets themselves are always loaded with seed 0.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from .. import paths as P
from ..checks import (check_bool, check_choice, check_int, check_known, check_number,
                      check_positive)
from ..files import STRUCTURED_SUFFIXES, StructuredFileError, read_structured
from ..results import CONFIG_FIELDS
from .profiles import PROFILES
from .run import Run

DTYPES = ("float32", "float64")
#: full (train, test) sizes per data set; for the synthetic sets, the default sizes generated
DATASET_SIZES = {"mnist": (60000, 10000), "cifar10": (50000, 10000),
                 "mnist_embedded": (5120, 1000), "blobs": (2000, 500), "xor": (1000, 200)}
#: the images ``(C, H, W)`` of each data set (the synthetic ones at their default size): what
#: an ``augment`` value is checked against
DATASET_SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32), "mnist_embedded": (1, 28, 28),
                  "blobs": (1, 8, 8), "xor": (1, 1, 2)}
SYNTHETIC = ("blobs", "xor")
DEFAULT_TIMEOUT = 1800.0
#: guards against a grid that would expand into more runs than any study can run
MAX_RUNS = 100_000
MAX_THREADS = 1024

#: grid axes that take lists (crossed), in expansion order
LIST_AXES = ("dataset", "model", "path", "strategy", "backend", "threads", "batch_size", "filters",
             "epochs", "train_size", "test_size", "dtype", "seed", "lr", "momentum", "period",
             "target", "eval_every", "val_size", "optimizer", "lr_schedule", "augment",
             "warmup_epochs", "engine", "link")
#: grid settings: one value per sub-grid
SETTINGS = ("repeats", "timeout", "cuda_simulator")
GRID_DEFAULTS: dict[str, Any] = {
    "dataset": "mnist_embedded", "model": None, "path": "sequential", "strategy": None,
    "backend": None, "threads": 1, "batch_size": None, "filters": None, "epochs": 1,
    "train_size": None, "test_size": None, "dtype": "float32", "seed": 0, "lr": None,
    "momentum": None, "period": None, "target": None, "eval_every": None, "val_size": None,
    "optimizer": None, "lr_schedule": None, "augment": None, "warmup_epochs": 0,
    "engine": None, "link": None, "repeats": 1, "timeout": DEFAULT_TIMEOUT,
    "cuda_simulator": False,
}
#: configuration fields added after the first edition: left out of a run's key while they
#: hold these values, so the keys of runs that do not use them did not change
KEY_DEFAULTS = {"period": ("", "epoch"), "target": (None,), "eval_every": (0, None),
                "val_size": (0, None), "optimizer": ("",), "lr_schedule": ("",),
                "augment": ("",), "warmup_epochs": (0,), "engine": ("",), "link": ("",)}
#: evaluations per epoch for time-to-accuracy when ``eval_every`` is not given
EVALS_PER_EPOCH = 10


# ---- values ---------------------------------------------------------------------------------
def check_value(axis: str, v):
    """Validate one value of one axis; returns it normalised (ValueError naming the axis)."""
    owner = f"grid axis {axis!r}"
    if axis == "dataset":
        return check_known(owner, "data set", v, list(DATASET_SIZES))
    if axis == "model":
        if v is None:
            return None
        from ..presets import PRESETS
        return check_known(owner, "preset", v, sorted(PRESETS))
    if axis == "path":
        return check_known(owner, "path", v, P.path_names())
    if axis == "strategy":
        return None if v is None else check_known(owner, "strategy", v, P.all_strategies())
    if axis == "backend":
        return None if v is None else check_known(owner, "backend", v, P.all_backends())
    if axis == "threads":
        return check_int(owner, axis, v, high=MAX_THREADS)
    if axis == "epochs":
        return check_int(owner, axis, v, high=100_000)
    if axis == "warmup_epochs":
        return check_int(owner, axis, v, low=0, high=100)
    if axis == "engine":
        return None if v in (None, "") else check_known(owner, "engine", v, P.all_engines())
    if axis == "link":
        return _check_link(v)
    if axis in ("batch_size", "filters", "train_size", "test_size", "eval_every", "val_size"):
        return check_int(owner, axis, v, high=10**9, optional=True)
    if axis == "dtype":
        return check_choice(owner, axis, getattr(v, "__name__", None) if isinstance(v, type)
                            else v, DTYPES)
    if axis == "seed":
        return check_int(owner, axis, v, low=0, high=2**63 - 1)
    if axis == "lr":
        return check_number(owner, axis, v, low=0.0, low_open=True, optional=True)
    if axis == "momentum":
        return check_number(owner, axis, v, low=0.0, high=1.0, high_open=True, optional=True)
    if axis == "period":
        if v is None or v == "epoch":
            return v
        return str(check_int(owner, axis, v, high=10**9))
    if axis == "target":  # a validation accuracy
        return check_number(owner, axis, v, low=0.0, high=1.0, low_open=True, high_open=True,
                            optional=True)
    if axis == "optimizer":
        return _check_optimizer(v)
    if axis == "lr_schedule":
        return _check_schedule(v)
    if axis == "augment":
        return _check_augment(v)
    if axis == "repeats":
        return check_int(owner, axis, v, high=1000)
    if axis == "timeout":
        return check_positive(owner, axis, v)
    if axis == "cuda_simulator":
        return check_bool(owner, axis, v)
    raise ValueError(f"unknown grid axis {axis!r}")


def _spec_text(spec: dict) -> str:
    """``NAME`` or ``NAME:key=value,...`` (sorted keys): the canonical text of a spec."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, dict):
            return json.dumps(v, sort_keys=True)
        return str(v)
    rest = ",".join(f"{k}={value(spec[k])}" for k in sorted(spec) if k != "type")
    return spec["type"] + (f":{rest}" if rest else "")


def _parse_spec(axis: str, v) -> dict:
    from ..configs import parse_option_spec
    if not isinstance(v, (str, dict)):
        raise ValueError(f"grid axis {axis!r}: must be a name, NAME:key=value,... or a dict, or "
                         f"None; received {axis}={v!r}")
    try:
        spec = parse_option_spec(v, f"grid axis {axis!r}")
    except (ValueError, OSError) as err:
        raise ValueError(f"grid axis {axis!r}: {err}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise ValueError(f"grid axis {axis!r}: a spec names its type; received {axis}={v!r}")
    return {**spec, "type": spec["type"].lower()}


def _check_augment(v) -> str:
    """``""`` (none), or the canonical text of a valid augmentation (``pad=4,flip=true``)."""
    from ..augment import make_augmentation
    try:
        augmentation = make_augmentation(v)
    except ValueError as err:
        raise ValueError(f"grid axis 'augment': {err}") from None
    return "" if augmentation is None else augmentation.text()


def _check_link(v) -> str:
    """``""`` (one host), or the text of a valid link profile (``1gbe``, ``10gbe,delay=100us``)."""
    if v in (None, ""):
        return ""
    from ..cluster.links import LinkProfile
    if not isinstance(v, str):
        raise ValueError(f"grid axis 'link': a link profile's text (1gbe, 10gbe, ...) or ''; "
                         f"received link={v!r}")
    try:
        LinkProfile.parse(v)
    except ValueError as err:
        raise ValueError(f"grid axis 'link': {err}") from None
    return v


def _check_optimizer(v) -> str | None:
    """None (the preset's), or the canonical ``NAME[:key=value,...]`` of a valid optimizer."""
    if v is None:
        return None
    from ..optim import OPTIMIZERS, make_optimizer
    spec = _parse_spec("optimizer", v)
    inside = sorted({"lr", "momentum", "schedule"} & set(spec))
    if inside:
        raise ValueError(f"grid axis 'optimizer': give {inside[0]!r} as its own axis "
                         f"({'lr_schedule' if inside[0] == 'schedule' else inside[0]}), not "
                         f"inside the optimizer; received optimizer={v!r}")
    try:  # with momentum when it takes one, so that nesterov=true checks out
        probe = {**spec, "lr": 0.01}
        cls = OPTIMIZERS.get(spec["type"])
        if cls is not None and cls.takes_momentum() and spec.get("nesterov"):
            probe["momentum"] = 0.9
        make_optimizer(probe)
    except (ValueError, TypeError) as err:
        raise ValueError(f"grid axis 'optimizer': {err}") from None
    return _spec_text(spec)


def _check_schedule(v) -> str:
    """The canonical ``NAME[:key=value,...]`` of a valid schedule, ``""`` for none."""
    if v is None or (isinstance(v, str) and v.lower() in ("", "none", "constant")):
        return ""
    from ..schedules import ALIASES, make_schedule
    spec = _parse_spec("lr_schedule", v)
    spec["type"] = ALIASES.get(spec["type"], spec["type"])
    if spec["type"] == "plateau":
        raise ValueError("grid axis 'lr_schedule': 'plateau' reduces on a validation metric, "
                         "which study runs do not compute; use a step schedule")
    try:
        make_schedule(spec, 0.1)
    except (ValueError, TypeError) as err:
        raise ValueError(f"grid axis 'lr_schedule': {err}") from None
    return "" if spec == {"type": "constant"} else _spec_text(spec)


def run_optimizer(cfg: dict, spec: dict) -> dict:
    """The optimizer spec (for :func:`cnn.optim.make_optimizer`) of a run: the preset's, or
    the ``optimizer`` axis's type and options, with the run's ``lr``, its ``momentum`` (for the
    optimizers that take one) and its ``lr_schedule``."""
    from ..configs import parse_option_spec
    from ..optim import DEFAULT_OPTIMIZER, optimizer_class
    base = dict(spec.get("optimizer", {"type": DEFAULT_OPTIMIZER}))
    kind = str(base.get("type", DEFAULT_OPTIMIZER)).lower()
    if cfg.get("optimizer"):
        given = parse_option_spec(cfg["optimizer"], "optimizer")
        if given["type"] != kind:
            base, kind = {"type": given["type"]}, given["type"]
        base.update(given)
    base.pop("momentum", None)
    out = {**base, "lr": cfg["lr"]}
    if optimizer_class(kind).takes_momentum():
        out["momentum"] = cfg["momentum"]
    if cfg.get("lr_schedule"):
        out["schedule"] = parse_option_spec(cfg["lr_schedule"], "lr_schedule")
    return out


def check_timeout(timeout) -> float | None:
    """``--timeout`` / ``run_study(timeout=...)``: None, or a positive finite number of
    seconds (0, negative, NaN and inf are refused: they would fill the file with failures)."""
    return check_number(None, "timeout", timeout, low=0.0, low_open=True, optional=True)


# ---- sub-grids --------------------------------------------------------------------------------
def as_subgrids(grid) -> list[dict]:
    if isinstance(grid, str):
        if grid not in PROFILES:
            raise ValueError(f"unknown profile {grid!r}; choose one of {sorted(PROFILES)}")
        grid = PROFILES[grid]
    if isinstance(grid, dict):
        grid = [grid]
    if (not isinstance(grid, (list, tuple)) or not grid
            or not all(isinstance(g, dict) for g in grid)):
        raise ValueError("a grid is a profile name, a dict of axis -> value(s), or a non-empty "
                         f"list of such dicts; received {_short(grid)}")
    for g in grid:
        bad = [k for k in g if not isinstance(k, str)]
        if bad:
            raise ValueError(f"grid axis names must be strings; received {bad[0]!r}")
        unknown = [k for k in g if k not in LIST_AXES and k not in SETTINGS]
        if unknown:
            raise ValueError(f"unknown grid axis {unknown[0]!r}; valid axes are "
                             f"{list(LIST_AXES) + list(SETTINGS)}")
    return list(grid)


def _short(x, n: int = 120) -> str:
    text = repr(x)
    return text if len(text) <= n else text[:n] + "..."


def _preset_defaults(model: str) -> dict:
    from ..optim import DEFAULT_OPTIMIZER, default_optimizer_spec, optimizer_class
    from ..presets import get_preset
    spec = get_preset(model)
    conv = next((layer for layer in spec["layers"] if layer["type"] == "conv2d"), None)
    opt = spec.get("optimizer", default_optimizer_spec())
    kind = str(opt.get("type", DEFAULT_OPTIMIZER)).lower()
    # 0: a feed-forward preset (xor_mlp, mnist_mlp) has no conv layer whose filters to set
    return {"filters": conv["filters"] if conv else 0, "batch_size": spec.get("batch_size", 32),
            "lr": float(opt.get("lr", optimizer_class(kind).default_lr())),
            "momentum": float(opt.get("momentum", 0.0)), "optimizer": kind}


def _resolve_optimizer(c: dict, defaults: dict) -> None:
    """The ``optimizer`` axis in canonical form (``""`` when it is the preset's) and the
    ``lr``/``momentum`` defaults that go with it."""
    from ..optim import optimizer_class
    given = c["optimizer"] or ""
    kind = given.split(":", 1)[0] if given else defaults["optimizer"]
    cls = optimizer_class(kind)
    same = kind == defaults["optimizer"]
    if same and ":" not in given:
        c["optimizer"] = ""  # the preset's, however it was written
    if c["lr"] is None:
        c["lr"] = defaults["lr"] if same else float(cls.default_lr())
    if cls.takes_momentum():
        if c["momentum"] is None:
            c["momentum"] = defaults["momentum"] if same else 0.0
    else:
        if c["momentum"] not in (None, 0.0):
            raise ValueError(f"grid axes 'momentum' and 'optimizer': {kind} takes no momentum; "
                             f"received momentum={c['momentum']!r} with optimizer={kind!r}")
        c["momentum"] = 0.0


def canonical(raw: dict) -> dict:
    """Resolve defaults and fix the axes a path does not use (the registry says which)."""
    c = dict(raw)
    c["model"] = c["model"] or ("cifar_tutorial" if c["dataset"] == "cifar10" else "mnist_small")
    defaults = _preset_defaults(c["model"])
    if defaults["filters"] == 0 and c["filters"] is not None:
        raise ValueError(f"grid axis 'filters': model {c['model']!r} has no conv2d layer whose "
                         f"filters it could set; received filters={c['filters']!r}")
    for k in ("filters", "batch_size"):
        if c[k] is None:
            c[k] = defaults[k]
    _resolve_optimizer(c, defaults)
    full_train, full_test = DATASET_SIZES[c["dataset"]]
    if c["target"] is None:
        c["eval_every"] = c["val_size"] = 0
    else:  # a validation split carved from the training split
        c["val_size"] = c["val_size"] or min(5000, full_train // 10)
        if c["dataset"] not in SYNTHETIC and c["val_size"] >= full_train:
            raise ValueError(f"grid axis 'val_size': {c['val_size']} leaves no training "
                             f"examples of {c['dataset']}'s {full_train}")
        if c["dataset"] not in SYNTHETIC:
            full_train -= c["val_size"]
    if c["dataset"] in SYNTHETIC:  # generated: any size is available
        c["train_size"] = c["train_size"] or full_train
        c["test_size"] = c["test_size"] or full_test
    else:
        c["train_size"] = min(c["train_size"] or full_train, full_train)
        c["test_size"] = min(c["test_size"] or full_test, full_test)
    entry = P.get_path(c["path"])
    c["strategy"], c["backend"], c["threads"] = entry.resolve(c["strategy"], c["backend"],
                                                              c["threads"])
    c["engine"] = entry.resolve_engine(c["engine"])
    c["link"] = c["link"] if entry.links else ""
    if c["link"]:
        from ..cluster import MAX_HOSTS, MIN_HOSTS
        if not MIN_HOSTS <= c["threads"] <= MAX_HOSTS:
            raise ValueError(f"grid axes 'link' and 'threads': path {c['path']!r} across an "
                             f"emulated cluster runs one rank per host, {MIN_HOSTS} to "
                             f"{MAX_HOSTS}; received threads={c['threads']} with "
                             f"link={c['link']!r}")
    if c["target"] is not None and c["warmup_epochs"]:
        raise ValueError(f"grid axes 'warmup_epochs' and 'target': a time-to-accuracy run's "
                         f"clock starts at its first step, so it takes no warm-up epoch; "
                         f"received warmup_epochs={c['warmup_epochs']} with target="
                         f"{c['target']}")
    if c["target"] is not None and not c["eval_every"]:
        workers = c["threads"] if P.ALGORITHMS[c["strategy"]].batch_per_worker else 1
        per_step = c["batch_size"] * workers
        steps = -(-c["train_size"] // per_step)
        c["eval_every"] = max(1, steps // EVALS_PER_EPOCH)
    if c["augment"]:
        from ..augment import make_augmentation
        try:
            make_augmentation(c["augment"]).check(DATASET_SHAPES[c["dataset"]])
        except ValueError as err:
            raise ValueError(f"grid axis 'augment' on data set {c['dataset']!r}: {err}") from None
    c["period"] = (str(c["period"] or "epoch") if entry.takes_option(c["strategy"], "period")
                   else "")
    kind = (c["optimizer"] or defaults["optimizer"]).split(":", 1)[0]
    if c["optimizer"] or c["lr_schedule"]:  # the combination, with this lr and momentum
        from ..optim import make_optimizer
        from ..presets import get_preset
        try:
            make_optimizer(run_optimizer(c, get_preset(c["model"])))
        except (ValueError, TypeError) as err:
            raise ValueError(f"grid axes 'optimizer'/'lr_schedule'/'lr'/'momentum': {err} "
                             f"(optimizer={c['optimizer'] or kind!r}, lr={c['lr']}, momentum="
                             f"{c['momentum']}, lr_schedule={c['lr_schedule']!r})") from None
    if entry.optimizers and (kind not in entry.optimizers or ":" in c["optimizer"]
                             or c["lr_schedule"]):
        from ..optim import OPTIMIZERS
        plain = " or ".join(OPTIMIZERS[k].__name__ for k in entry.optimizers)
        raise ValueError(f"grid axes 'optimizer'/'lr_schedule': path {c['path']!r} "
                         f"trains plain {plain} with a constant rate; received optimizer="
                         f"{c['optimizer'] or kind!r}, lr_schedule={c['lr_schedule']!r}")

    if not entry.needs_gpu:
        c["cuda_simulator"] = False
    return c


def run_key(cfg: dict) -> str:
    """A stable key: a readable prefix (the path, with strategy and backend for paths that take
    several) and a hash of the whole configuration, repeat included."""
    entry = P.get_path(cfg["path"])
    # a path's default engine is what its runs ran before the axis existed: left out too
    defaults = {**KEY_DEFAULTS, "engine": ("", entry.resolve_engine(None))}
    ident = {k: cfg[k] for k in CONFIG_FIELDS
             if not (k in defaults and cfg[k] in defaults[k])}
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
    v = cfg["path"]
    if len(entry.strategies) > 1 or len(entry.backends) > 1:
        v = ".".join((cfg["path"], cfg["strategy"], cfg["backend"]))
    v += entry.variant(None, None, cfg["engine"], cfg["link"])[len(entry.name):]
    return (f"{cfg['dataset']}.{cfg['model']}.{v}.t{cfg['threads']}.b{cfg['batch_size']}"
            f".f{cfg['filters']}.e{cfg['epochs']}.n{cfg['train_size']}.r{cfg['repeat']}-{digest}")


@lru_cache(maxsize=1)
def gpu_available() -> bool:
    """True when a CUDA GPU is usable (checked in a child process, so the caller's process never
    creates a CUDA context); False at once on machines without the NVIDIA driver."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False  # the simulator is not a GPU
    if not (Path("/proc/driver/nvidia").exists() or shutil.which("nvidia-smi")):
        return False
    try:
        out = subprocess.run([sys.executable, "-c",
                              "from numba import cuda; print(cuda.is_available())"],
                             capture_output=True, text=True, timeout=120)
        return out.stdout.strip().endswith("True")
    except (OSError, subprocess.SubprocessError):
        return False


def unavailable(entry: P.TrainingPath, gpu: bool | None = None,
                cuda_simulator: bool = False) -> str:
    """Why a run of path ``entry`` cannot run on this machine ("" when it can): a path that
    needs a GPU where there is none (``gpu``; None detects it) and the run does not ask for the
    simulator, or a missing module."""
    ok, why = entry.available()
    if not ok:
        return why
    if entry.needs_gpu and not cuda_simulator:
        if not (gpu_available() if gpu is None else gpu):
            return "no GPU on this machine"
    return ""


def expand_grid(grid="quick", *, gpu: bool | None = None,
                include_unavailable: bool = False) -> list[Run]:
    """The runs of ``grid`` (a profile name, a dict or a list of dicts; see the module doc).

    Returns one :class:`~cnn.study.run.Run` per run, in execution order (all configurations'
    repeat 0, then repeat 1, ...), with the resolved configuration (``CONFIG_FIELDS``),
    ``run_key``, ``timeout`` and its path's registry entry.
    Runs that cannot run here are dropped (:func:`unavailable`: paths that need a GPU unless
    one is present, ``gpu``, None detects it, or their grid sets ``cuda_simulator=True``;
    paths whose modules are not installed); ``include_unavailable=True`` keeps them.
    """
    configs: dict[str, dict] = {}
    for sub in as_subgrids(grid):
        values = {}
        for axis in LIST_AXES:
            v = sub.get(axis, GRID_DEFAULTS[axis])
            vs = list(v) if isinstance(v, (list, tuple)) else [v]
            if not vs:
                raise ValueError(f"grid axis {axis!r}: empty list of values")
            values[axis] = [check_value(axis, x) for x in vs]
        settings = {}
        for axis in SETTINGS:
            v = sub.get(axis, GRID_DEFAULTS[axis])
            if isinstance(v, (list, tuple)):
                raise ValueError(f"grid axis {axis!r} is a setting: give one value per "
                                 f"sub-grid, not a list; received {_short(v)}")
            settings[axis] = check_value(axis, v)
        n = math.prod(len(vs) for vs in values.values()) * settings["repeats"]
        if n + sum(c["repeats"] for c in configs.values()) > MAX_RUNS:
            raise ValueError(f"the grid expands to more than {MAX_RUNS:,} runs; split it")
        for combo in itertools.product(*(values[a] for a in LIST_AXES)):
            raw = dict(zip(LIST_AXES, combo), cuda_simulator=settings["cuda_simulator"])
            c = canonical(raw)
            ident = json.dumps({k: c[k] for k in CONFIG_FIELDS if k != "repeat"}, sort_keys=True)
            if ident in configs:  # the same configuration from another sub-grid or a fixed axis
                prev = configs[ident]
                prev["repeats"] = max(prev["repeats"], settings["repeats"])
                prev["timeout"] = max(prev["timeout"], settings["timeout"])
            else:
                configs[ident] = {**c, "repeats": settings["repeats"],
                                  "timeout": settings["timeout"]}
    base = list(configs.values())
    if not include_unavailable:
        base = [c for c in base
                if not unavailable(P.get_path(c["path"]), gpu, c["cuda_simulator"])]
    runs = []
    max_repeats = max((c["repeats"] for c in base), default=0)
    for r in range(max_repeats):
        for c in base:
            if r < c["repeats"]:
                row = {k: c[k] for k in CONFIG_FIELDS if k != "repeat"}
                row.update(repeat=r, seed=c["seed"] + r)
                runs.append(Run(**row, run_key=run_key(row), timeout=c["timeout"]))
    return runs


def plan_order(runs: list[Run], seed: int | None = 0) -> list[Run]:
    """The study's run order: repeat blocks in turn (every configuration's repeat 0, then
    repeat 1, ...: drift hits all configurations alike), the order inside each block shuffled
    with ``seed`` (None keeps the declared order), so no path always runs first or right
    after a heavy one. Each run gets ``order_index`` (its place) and ``order_seed``."""
    import random
    blocks: dict[int, list[Run]] = {}
    for r in runs:
        blocks.setdefault(r.repeat, []).append(r)
    out = []
    rng = random.Random(seed)
    for rep in sorted(blocks):
        block = list(blocks[rep])
        if seed is not None:
            rng.shuffle(block)
        out.extend(block)
    return [replace(r, order_index=i, order_seed=seed) for i, r in enumerate(out)]


# ---- grid files -------------------------------------------------------------------------------
def read_grid(path) -> Any:
    """The grid in a ``.json`` or ``.yaml``/``.yml`` file, validated: a file that is missing,
    unreadable, malformed or holds an invalid grid raises an error naming the file."""
    p = Path(path)
    if p.suffix.lower() not in STRUCTURED_SUFFIXES:
        raise ValueError(f"grid file {p}: expected a .json, .yaml or .yml file")
    try:
        grid = read_structured(p, "grid file")
    except StructuredFileError as err:
        raise ValueError(f"grid file {p}: malformed {err.kind}{err.where}: {err.problem}"
                         if err.kind else f"grid file {p}: {err.problem}") from None
    if isinstance(grid, str):
        raise ValueError(f"grid file {p}: holds the string {_short(grid)}, not a grid (a dict "
                         f"of axis -> value(s) or a list of such dicts); use --profile for a "
                         f"named grid")
    try:
        expand_grid(grid, gpu=True)
    except (ValueError, TypeError) as err:
        raise ValueError(f"grid file {p}: {err}") from None
    return grid
