"""What a result was measured on: CPU, cores, BLAS, library versions and the git commit.

Recorded with every study row and printed by every benchmark, so a figure can be traced to
the machine and code that produced it.
"""
from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

PACKAGES = ("numpy", "numba", "numba-cuda", "tensorflow", "keras", "threadpoolctl", "pandas")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
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
    """A flat dict: ``cpu``, ``cores``, ``cpu_caches``, ``blas``, ``python``, ``platform``,
    ``git_commit``, ``<package>_version``."""
    info: dict[str, str | int] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 0,
        "cpu_caches": cache_sizes(),
        "blas": blas_kernel(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
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
