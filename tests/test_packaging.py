"""The package is installed, not put on the path by hand: ``pyproject.toml`` carries its
metadata, dependencies, extras and console script, ``make`` installs it in editable mode, and
nothing in the repository edits ``sys.path`` or ``PYTHONPATH`` to find it. Its wheel, installed
as a user installs it, runs every command from anywhere, or refuses at once naming the extra
it lacks."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
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


# ---- the wheel, installed as a user installs it ------------------------------------------------
#: what the fresh environment may inherit: pip's own settings (an index, a cache) and a home
KEEP_ENV = ("HOME", "LANG", "LC_ALL", "TMPDIR", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")


def _constraints(tmp: Path) -> Path:
    """requirements.txt as pip constraints (which take no extras): the fresh environment
    gets the versions the CI environment has, from pip's cache when it holds them."""
    lines = [re.sub(r"\[[^\]]*\]", "", line) for line in
             (ROOT / "requirements.txt").read_text().splitlines()]
    path = tmp / "constraints.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _build_wheel(tmp: Path) -> Path:
    """The wheel of this checkout, built from a clean copy of what the wheel is made of (a
    stale build/ folder in the checkout would otherwise end up in it)."""
    src = tmp / "src"
    shutil.copytree(ROOT / "cnn", src / "cnn", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    isolation = []
    try:
        import setuptools
        if int(setuptools.__version__.split(".")[0]) >= 69:  # pyproject's build requirement
            isolation = ["--no-build-isolation"]
    except ImportError:
        pass
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation,
                    "-w", str(tmp / "dist"), str(src)], check=True, capture_output=True,
                   timeout=600)
    wheel, = (tmp / "dist").glob("parallel_cnn-*.whl")
    return wheel


class _User:
    """Commands run as a user would: the console script of the venv ``venv``, from the
    folder ``home`` outside the checkout, with no PYTHONPATH and only the venv (and ``path``)
    on PATH."""

    def __init__(self, venv: Path, home: Path):
        self.venv, self.home, self.path = venv, home, [str(venv / "bin"), "/usr/bin", "/bin"]
        self.env = {k: v for k, v in os.environ.items()
                    if k in KEEP_ENV or k.startswith("PIP_")}
        self.env.update(TF_CPP_MIN_LOG_LEVEL="2", MPLBACKEND="Agg")

    def run(self, *argv, expect: int = 0, timeout: float = 600):
        env = {**self.env, "PATH": os.pathsep.join(self.path)}
        proc = subprocess.run([str(self.venv / "bin" / argv[0]), *argv[1:]], cwd=self.home,
                              env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == expect, (f"{' '.join(argv)} exited {proc.returncode}, not "
                                           f"{expect}:\n{proc.stdout[-3000:]}\n"
                                           f"{proc.stderr[-3000:]}")
        return proc

    def cnn(self, *argv, expect: int = 0, timeout: float = 600):
        return self.run("parallel-cnn", *argv, expect=expect, timeout=timeout)

    def refused(self, *argv, extra: str):
        """The command refuses at once, before any work, naming the extra and the pip command
        that adds it."""
        proc = self.cnn(*argv, expect=2, timeout=300)
        assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
        assert f"the {extra} extra" in proc.stderr and "pip install" in proc.stderr, proc.stderr
        assert f"[{extra}]'" in proc.stderr, proc.stderr  # ...'/path/to/the.whl[extra]'
        assert "epoch" not in proc.stdout, proc.stdout
        return proc


def test_the_wheel_installed_with_each_set_of_extras_runs_every_command(tmp_path):
    """The wheel, installed (not editable) into a fresh venv, runs every command from a
    folder outside the checkout, or refuses at once naming the missing extra.

    Three stages of one venv, so that the test costs minutes, not the hour that installing
    TensorFlow, PyTorch and Jupyter afresh would take:

    1. base: a truly fresh venv, the wheel installed with its dependencies resolved by pip
       (versions pinned to requirements.txt as constraints, so pip's cache serves them where
       it holds them; otherwise PyPI). It has no matplotlib, TensorFlow, PyTorch, mpi4py,
       pandas or Typst, so every refusal of a missing extra is checked here, for real: --plot,
       predict's figure, --backend keras and torch, --strategy mpi, study, report, bench keras
       and bench mpi; and train (a file of your own, the embedded MNIST), train --config with
       save:, data and predict work.
    2. plot: pip adds the wheel's [plot] extra for real (matplotlib): --plot and predict's
       figure (beside the weights) work, study is still refused.
    3. everything else: the venv sees the test environment's packages (TensorFlow, PyTorch,
       mpi4py with MPICH, pandas, seaborn, Typst) through a .pth file, as if pip had installed
       the keras, torch, mpi and study extras (installing them afresh would download
       gigabytes), and MPICH's mpiexec and library through PATH and LD_LIBRARY_PATH; the
       wheel's own package still comes first. train --backend keras and torch, MPI ranks, study --profile smoke, report (the
       PDF: report.typ is package data) and bench --quick run.
    """
    tmp = tmp_path
    wheel = _build_wheel(tmp)
    constraints = _constraints(tmp)
    venv = tmp / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True, timeout=300)
    home = tmp / "home"
    home.mkdir()
    user = _User(venv, home)
    user.run("python", "-m", "pip", "install", "-q", "-c", str(constraints), str(wheel))

    # 1. base: the package itself, from the venv
    where = user.run("python", "-c", "import cnn; print(cnn.__file__)").stdout.strip()
    assert Path(where).is_relative_to(venv), where
    for module in ("matplotlib", "tensorflow", "torch", "mpi4py", "pandas", "typst"):
        user.run("python", "-c", f"import {module}", expect=1)  # really missing
    assert "train" in user.cnn("--help").stdout
    user.cnn("data", "xor", "--out", "xor.npz")
    out = user.cnn("train", "--dataset", "xor.npz", "--epochs", "2", "--quiet", "--save",
                   "models/xor.npz").stdout
    assert "time per phase" in out and "weights saved to models/xor.npz" in out
    user.cnn("train", "--epochs", "1", "--limit", "256", "--test-limit", "64", "--quiet",
             "--save", "models/mnist.npz")  # the MNIST subset inside the package
    proc = user.cnn("predict", "--weights", "models/mnist.npz", "--test-limit", "64")
    assert "test accuracy" in proc.stdout and "the plot extra" in proc.stderr
    (home / "models.yaml").write_text("defaults: {dataset: xor.npz, epochs: 1, save: runs/}\n"
                                      "models: {a: xor_mlp, b: {model: xor_mlp, seed: 1}}\n")
    user.cnn("train", "--config", "models.yaml", "--quiet")
    assert sorted(p.name for p in (home / "runs").iterdir()) == ["a.npz", "b.npz"]
    user.refused("train", "--dataset", "xor.npz", "--plot", "c.png", extra="plot")
    user.refused("predict", "--weights", "models/xor.npz", "--figure", "p.png", extra="plot")
    user.refused("train", "--backend", "keras", extra="keras")
    torch = user.refused("train", "--backend", "torch", extra="torch")
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch.stderr
    user.refused("train", "--strategy", "mpi", "--ranks", "2", extra="mpi")
    user.refused("study", "--profile", "smoke", "--out", "s.pkl", extra="study")
    user.refused("report", "--results", "s.pkl", extra="study")
    user.refused("bench", "keras", "--quick", extra="keras")
    user.refused("bench", "mpi", "--quick", extra="mpi")
    cuda = user.cnn("train", "--backend", "cuda", expect=2)  # no GPU here
    assert cuda.stderr.startswith("error: CudaBackend: no CUDA GPU is usable here")
    assert not (home / "c.png").exists() and not (home / "predictions.png").exists()

    # 2. the plot extra, installed by pip
    user.run("python", "-m", "pip", "install", "-q", "-c", str(constraints), f"{wheel}[plot]")
    user.cnn("train", "--dataset", "xor.npz", "--epochs", "2", "--quiet", "--plot", "c.png")
    assert (home / "c.png").stat().st_size > 1000
    user.cnn("predict", "--weights", "models/xor.npz", "--dataset", "xor.npz")
    assert (home / "models" / "xor_predictions.png").stat().st_size > 1000
    user.refused("study", "--profile", "smoke", "--out", "s.pkl", extra="study")

    # 3. the other extras: the test environment's packages behind the venv's own
    site = Path(sysconfig.get_paths()["purelib"])
    ours = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / \
        "site-packages"
    hooks = [line for pth in sorted(site.glob("*.pth")) if not pth.name.startswith("__editable__")
             for line in pth.read_text().splitlines() if line.startswith("import ")]
    (ours / "zz_test_environment.pth").write_text("\n".join([str(site), *hooks]) + "\n")
    # MPICH's mpiexec and library, which the mpich wheel puts into the venv's bin/ and lib/
    user.path.append(str(Path(sys.executable).parent))
    user.env["LD_LIBRARY_PATH"] = str(Path(sys.prefix) / "lib")
    where = user.run("python", "-c", "import cnn; print(cnn.__file__)").stdout.strip()
    assert Path(where).is_relative_to(venv), where
    small = ["--epochs", "1", "--limit", "256", "--test-limit", "64", "--quiet"]
    assert "the keras reference" in user.cnn("train", "--backend", "keras", *small).stdout
    if importlib.util.find_spec("torch") is not None:
        assert "the torch reference" in user.cnn("train", "--backend", "torch", *small).stdout
    else:
        user.refused("train", "--backend", "torch", extra="torch")
    mpi = user.cnn("train", "--dataset", "xor.npz", "--strategy", "mpi", "--ranks", "2",
                   "--epochs", "1", "--quiet")
    assert "x2 ranks" in mpi.stdout, mpi.stdout
    user.cnn("study", "--profile", "smoke", "--out", "study/smoke.pkl")
    user.cnn("report", "--results", "study/smoke.pkl", "--out", "study/report.pdf")
    assert (home / "study" / "report.pdf").read_bytes()[:5] == b"%PDF-"
    bench = user.cnn("bench", "--quick", "--presets", "mnist_small", "--batch-sizes", "32")
    assert "ratio ours/keras" in bench.stdout
