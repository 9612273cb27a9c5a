"""What a result was measured on: CPU, cores, BLAS, library versions and the git commit.

Recorded with every study row and printed by every benchmark, so a figure can be traced to
the machine and code that produced it.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path

PACKAGES = ("numpy", "numba", "numba-cuda", "tensorflow", "keras", "threadpoolctl", "pandas",
            "torch", "mpi4py")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_model_number() -> str:
    """``"family 26, model 2, stepping 1"`` (what tells one CPU generation from another when
    the model name is generic, as a VM's often is), or ``"?"``."""
    info = _cpuinfo()
    parts = [f"{k} {info[k]}" for k in ("cpu family", "model", "stepping") if k in info]
    return ", ".join(p.removeprefix("cpu ") for p in parts) or "?"


def cpu_frequency() -> str:
    """The CPU's clock as the kernel reports it (``cpu MHz``; a VM's is the host's nominal
    clock, and a scaling governor moves it), and the maximum from cpufreq when exposed."""
    mhz = _cpuinfo().get("cpu MHz")
    top = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    try:
        top_mhz = int(top.read_text()) / 1000
    except (OSError, ValueError):
        top_mhz = None
    text = f"{float(mhz):.0f} MHz" if mhz else "not reported"
    return text + (f" (max {top_mhz:.0f} MHz)" if top_mhz else "")


def smt() -> str:
    """Whether the cores the OS sees are SMT siblings: ``"no (1 thread per core)"`` or
    ``"yes (2 threads per core)"``, from cpu0's thread siblings."""
    try:
        siblings = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read_text()
    except OSError:
        return "?"
    count = sum(int(b) - int(a) + 1 if "-" in part else 1
                for part in siblings.strip().split(",")
                for a, _, b in [part.partition("-")])
    return f"{'yes' if count > 1 else 'no'} ({count} thread{'s' * (count > 1)} per core)"


def virtualization() -> str:
    """``"KVM (full)"`` and the like when the machine is a virtual machine (``lscpu``'s
    hypervisor vendor, else the CPU's hypervisor flag), ``"none detected"`` otherwise."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        info = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines())}
        if info.get("Hypervisor vendor"):
            kind = info.get("Virtualization type")
            return info["Hypervisor vendor"] + (f" ({kind})" if kind else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "yes (hypervisor flag)" if "hypervisor" in _cpuinfo().get("flags", "").split() \
        else "none detected"


def mpi_library() -> str:
    """The MPI library mpi4py runs on, from the venv's ``mpichversion`` (MPICH's own
    report) without starting MPI, or ``"not installed"``."""
    tool = Path(sys.executable).parent / "mpichversion"
    try:
        out = subprocess.run([str(tool)], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return "not installed"
    for line in out.splitlines():
        if line.startswith("MPICH Version:"):
            return "MPICH " + line.split(":", 1)[1].strip()
    return "unknown"


#: what a study writes into the checkout (the executed notebooks, results, figures, the
#: report): written while it runs, so they do not make its runs' code "-dirty"
STUDY_OUTPUTS = ("results", "report")


def git_commit(root: Path | None = None) -> str:
    """The commit of the checkout at ``root`` (the package's by default), 12 hex digits, with
    ``-dirty`` when a tracked file outside :data:`STUDY_OUTPUTS` differs from it; ``unknown``
    outside git. (``make study`` writes the tracked ``results/project.ipynb`` before its
    first run: without the exclusion every run of a clean checkout would read dirty.)"""
    root = Path(__file__).resolve().parent.parent if root is None else Path(root)
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", *(f":(exclude){p}" for p in STUDY_OUTPUTS)], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def blas_kernel() -> str:
    """The BLAS library NumPy uses and the kernel it picked: ``"openblas 0.3.31 (SkylakeX)"``."""
    try:
        from threadpoolctl import threadpool_info
        import numpy  # noqa: F401  (loads numpy's BLAS so threadpoolctl can see it)
        libs = [f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture', '?')})"
                for i in threadpool_info() if i.get("user_api") == "blas"]
        return "; ".join(libs) or "unknown"
    except Exception as err:  # the probe must never break a run
        return f"unknown ({err})"


def cache_sizes() -> str:
    """``"L1d 48K, L1i 32K, L2 2048K, L3 32768K"`` from sysfs (per core for L1/L2), or ``"?"``."""
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    parts = []
    try:
        for idx in sorted(root.glob("index*")):
            level = (idx / "level").read_text().strip()
            kind = (idx / "type").read_text().strip()
            size = (idx / "size").read_text().strip()
            suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
            parts.append(f"L{level}{suffix} {size}")
    except OSError:
        return "?"
    return ", ".join(parts) or "?"


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


@lru_cache(maxsize=1)
def machine_info() -> dict[str, str | int]:
    """A flat dict: ``cpu``, ``cpu_model_number``, ``cpu_frequency``, ``cores``, ``smt``,
    ``virtualization``, ``cpu_caches``, ``blas``, ``mpi_library``, ``python``, ``platform``,
    ``git_commit``, ``<package>_version``."""
    info: dict[str, str | int] = {
        "cpu": _cpu_model(),
        "cpu_model_number": cpu_model_number(),
        "cpu_frequency": cpu_frequency(),
        "cores": os.cpu_count() or 0,
        "smt": smt(),
        "virtualization": virtualization(),
        "cpu_caches": cache_sizes(),
        "blas": blas_kernel(),
        "mpi_library": mpi_library(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
    }
    for pkg in PACKAGES:
        info[f"{pkg.replace('-', '_')}_version"] = _version(pkg)
    return info


def describe() -> str:
    i = machine_info()
    return (f"{i['cpu']}, {i['cores']} cores ({i['cpu_caches']}), BLAS {i['blas']}, "
            f"Python {i['python']}, "
            f"numpy {i['numpy_version']}, numba {i['numba_version']}, "
            f"tensorflow {i['tensorflow_version']}, commit {i['git_commit']}")
