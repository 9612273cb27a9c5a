"""The package is installed, not put on the path by hand: ``pyproject.toml`` carries its
metadata, dependencies and console script, ``make`` installs it in editable mode, and nothing in
the repository edits ``sys.path`` or ``PYTHONPATH`` to find it."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: what hand-made import paths look like in code (this file names them only inside strings)
PATH_HACK = re.compile(r"sys\.path\.(insert|append)|\[\s*[\"']PYTHONPATH[\"']\s*\]")


def _sources():
    for folder in ("cnn", "scripts", "tests", "notebooks"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix == ".py" and path.name != Path(__file__).name:
                yield path, path.read_text()
            elif path.suffix == ".ipynb" and ".ipynb_checkpoints" not in path.parts:
                cells = json.loads(path.read_text())["cells"]
                yield path, "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def test_pyproject_declares_the_package():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["name"] == "parallel-cnn"
    assert meta["scripts"]["parallel-cnn"] == "cnn.cli:main"
    deps = " ".join(meta["dependencies"])
    for needed in ("numpy", "numba", "threadpoolctl"):
        assert needed in deps
    assert {"keras", "study", "test", "bench", "mpi"} <= set(meta["optional-dependencies"])


def test_no_hand_made_import_paths():
    offenders = [str(p.relative_to(ROOT)) for p, text in _sources() if PATH_HACK.search(text)]
    assert offenders == [], f"sys.path / PYTHONPATH edited in: {offenders}"


def test_installed_package_imports_from_anywhere(tmp_path):
    """From a folder outside the checkout, with no PYTHONPATH, ``import cnn`` finds this
    checkout's package (the editable install), and the console script runs."""
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", "import cnn; print(cnn.__file__)"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).resolve() == (ROOT / "cnn" / "__init__.py").resolve()
    script = Path(sys.executable).parent / "parallel-cnn"
    proc = subprocess.run([str(script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "train" in proc.stdout, proc.stderr


def test_import_cnn_needs_no_numba():
    """``import cnn`` and a NumPy training step import neither Numba nor ``numba.cuda``: the
    backends' registry imports a backend's folder only when that backend is first asked for,
    so the package works where Numba (or a GPU) is missing."""
    code = ("import sys\n"
            "import numpy as np\n"
            "import cnn\n"
            "model = cnn.build_model('mnist_small')\n"
            "x = np.zeros((2, 1, 28, 28), np.float32)\n"
            "model.loss_and_grads(x, np.array([0, 1]), backend='numpy')\n"
            "print(sorted(m for m in sys.modules if m == 'numba' or m.startswith('numba.')))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"importing cnn imported {proc.stdout.strip()}"
