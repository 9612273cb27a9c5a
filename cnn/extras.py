"""The package's optional parts: the *extras* of ``pyproject.toml`` (``pip install
'parallel-cnn[plot,keras]'``), the modules each one brings, and the refusal a command gives,
before any work starts, when an extra it needs is missing.

``pip install parallel-cnn`` (or the wheel, or the checkout) installs what ``import cnn``,
``train``, ``predict``, ``train --config``, ``data`` and ``bench`` need: NumPy, Numba,
threadpoolctl, tqdm and PyYAML. The rest is optional (:data:`EXTRAS`); a command that needs a
missing part raises :class:`~cnn.errors.MissingExtraError` from :func:`require`, whose message
names what needed it, the missing modules, the extra and the ``pip`` command that adds it
(the CLI prints it as ``error: ...`` and exits with status 2)::

    error: --plot needs matplotlib, which is not installed: it comes with the plot extra
    (pip install '/path/to/parallel_cnn-0.2.0-py3-none-any.whl[plot]', or the packages
    alone: pip install 'matplotlib>=3.8')

The pip command names the source the package was installed from (a wheel, a folder, an
editable checkout: pip's ``direct_url.json``), since ``parallel-cnn`` is not on PyPI; the
packages alone come from the installed metadata, so the pins are stated once, in
``pyproject.toml``. PyTorch is the exception: a plain ``pip install torch`` on Linux fetches
the CUDA build (gigabytes), so the command for it names PyTorch's index of CPU wheels.
"""
from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from importlib import metadata
from urllib.parse import unquote, urlparse

from .errors import MissingExtraError

#: the distribution's name (``pip install parallel-cnn``, ``importlib.metadata``)
DISTRIBUTION = "parallel-cnn"
#: PyTorch's index of CPU-only wheels
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


@dataclass(frozen=True)
class Extra:
    """An extra of ``pyproject.toml``: the modules it makes importable (what :func:`require`
    looks for, without importing them) and what it enables (the README's table)."""

    modules: tuple[str, ...]
    enables: str


#: extra -> what it brings, in the order the README lists them
EXTRAS: dict[str, Extra] = {
    "plot": Extra(("matplotlib",), "training curves (train --plot, plot: in a --config file) "
                                   "and predict's figure of sample predictions"),
    "keras": Extra(("tensorflow",), "the Keras reference: train --backend keras, the "
                                    "equivalence checks, the study's keras path"),
    "torch": Extra(("torch",), "the PyTorch reference: train --backend torch, the study's "
                               "torch paths (the CPU wheel: see the README)"),
    "bench": Extra(("tensorflow", "torch"), "the Keras and PyTorch contenders of bench "
                                            "(skipped, saying so, without them)"),
    "mpi": Extra(("mpi4py",), "MPI ranks: --strategy mpi and mpi_average, --ranks, bench mpi "
                              "(mpi4py and MPICH's mpiexec, both from PyPI)"),
    "cuda": Extra(("numba_cuda",), "the cuda backend on an NVIDIA GPU (numba-cuda)"),
    "study": Extra(("pandas", "matplotlib", "seaborn", "typst", "papermill"),
                   "study, report (the PDF through Typst) and the notebooks"),
    "test": Extra(("pytest", "nbmake", "hypothesis"), "the test suite"),
}


def missing_modules(extra: str, modules: tuple[str, ...] | None = None) -> list[str]:
    """The modules of ``extra`` (or just ``modules`` of them) that cannot be imported here,
    found without importing anything."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; the extras are {list(EXTRAS)}")
    wanted = EXTRAS[extra].modules if modules is None else modules
    return [m for m in wanted if importlib.util.find_spec(m) is None]


def require(extra: str, what: str, modules: tuple[str, ...] | None = None) -> None:
    """Refuse ``what`` (an option or command: ``"--plot"``, ``"study"``) with
    :class:`~cnn.errors.MissingExtraError` when a module of ``extra`` (or of ``modules``, a
    subset of it) is not installed; return otherwise."""
    absent = missing_modules(extra, modules)
    if absent:
        which = "is" if len(absent) == 1 else "are"
        raise MissingExtraError(f"{what} needs {', '.join(absent)}, which {which} not "
                                f"installed: it comes with the {extra} extra "
                                f"({install_command(extra)})", extra, tuple(absent))


def install_command(extra: str) -> str:
    """The ``pip`` command that adds ``extra`` to this installation, and the one that adds only
    the packages it brings (see the module docstring)."""
    option, source = _install_source()
    requirements = _requirements(extra)
    packages = " ".join(f"'{r}'" for r in requirements) or " ".join(EXTRAS[extra].modules)
    torch = [r for r in requirements if _name(r) == "torch"]
    if not torch:
        return (f"pip install {option}'{source}[{extra}]', or the packages alone: "
                f"pip install {packages}")
    return (f"first the CPU build of PyTorch: pip install '{torch[0]}' --index-url "
            f"{TORCH_CPU_INDEX}; then pip install {option}'{source}[{extra}]', or the packages "
            f"alone: pip install {packages} --extra-index-url {TORCH_CPU_INDEX}")


def _install_source() -> tuple[str, str]:
    """How pip names this installation: ``("", "/path/to/wheel.whl")`` (or a folder),
    ``("-e ", "/path/to/checkout")`` for an editable one, ``("", "parallel-cnn")`` for one
    from an index (or none: a source tree on the path)."""
    dist = _distribution()
    try:
        record = json.loads((dist.read_text("direct_url.json") if dist else None) or "{}")
    except json.JSONDecodeError:
        record = {}
    url = urlparse(record.get("url", ""))
    if url.scheme != "file":
        return "", DISTRIBUTION
    editable = record.get("dir_info", {}).get("editable", False)
    return ("-e " if editable else ""), unquote(url.path)


def _requirements(extra: str) -> list[str]:
    """The requirements ``extra`` adds, from the installed metadata (``pyproject.toml``), with
    the extras it names of this package itself (``parallel-cnn[plot]``) resolved; empty when
    the package's metadata is not installed."""
    dist = _distribution()
    lines = (dist.requires or []) if dist else []
    found: list[str] = []
    for line in lines:
        requirement, _, marker = line.partition(";")
        if re.search(rf"""extra\s*==\s*["']{re.escape(extra)}["']""", marker):
            requirement = requirement.strip()
            if _name(requirement) == DISTRIBUTION:  # this package's own extras
                inner = re.search(r"\[(.*)\]", requirement)
                for sub in (inner.group(1).split(",") if inner else []):
                    found += [r for r in _requirements(sub.strip()) if r not in found]
            elif requirement not in found:
                found.append(requirement)
    return found


def _distribution():
    """This package's installed metadata: the one pip installed (it has a ``direct_url.json``)
    when there are several, as in a checkout that holds a ``parallel_cnn.egg-info`` of its own
    beside ``cnn/``, which would otherwise be found first from its folder; None when the
    package is not installed."""
    found = list(metadata.distributions(name=DISTRIBUTION))
    installed = [d for d in found if d.read_text("direct_url.json") is not None]
    return (installed or found or [None])[0]


def _name(requirement: str) -> str:
    """The normalised project name a requirement string starts with."""
    return re.split(r"[\[<>=!~ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


__all__ = ["EXTRAS", "Extra", "install_command", "missing_modules", "require"]
