"""The CUDA backend's kernels against the NumPy and naive references, under the CUDA simulator.

``NUMBA_ENABLE_CUDASIM=1`` only works if set before Numba is imported, and other test modules
import Numba into this process, so the checks (``tests/cuda_sim_checks.py``) run in
subprocesses: one per core (at most two), each taking a share of the checks, all started at
once by a module fixture. Each check is then one test here, failing with that check's message.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPT = HERE / "cuda_sim_checks.py"
TIMEOUT = 900  # seconds per worker: the simulator is slow, a hang must still end the run

_spec = importlib.util.spec_from_file_location("cuda_sim_checks", SCRIPT)
_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_checks)  # imports NumPy only, not Numba
CHECK_NAMES = list(_checks.CHECKS)


def _shares(workers: int) -> list[list[str]]:
    """Checks dealt to workers, most expensive first, each to the least loaded worker."""
    loads = [0.0] * workers
    shares: list[list[str]] = [[] for _ in range(workers)]
    for name, (_, cost) in sorted(_checks.CHECKS.items(), key=lambda kv: -kv[1][1]):
        w = loads.index(min(loads))
        shares[w].append(name)
        loads[w] += cost
    return shares


def _env(simulator: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if simulator:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    return env


@pytest.fixture(scope="module")
def sim_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("cuda_sim")
    workers = max(1, min(2, os.cpu_count() or 1))
    procs = []
    for w, share in enumerate(_shares(workers)):
        out = out_dir / f"worker{w}.json"
        proc = subprocess.Popen([sys.executable, str(SCRIPT), *share, "--json", str(out)],
                                cwd=ROOT, env=_env(simulator=True), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        procs.append((proc, out))
    results = {}
    for proc, out in procs:
        try:
            log, _ = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
        if out.exists():
            results.update(json.loads(out.read_text()))
        else:  # the worker died before writing: every check it owned fails with its log
            results["_crash"] = f"simulator worker exited with {proc.returncode}:\n{log}"
    return results


@pytest.mark.parametrize("name", CHECK_NAMES)
def test_kernel_under_simulator(sim_results, name):
    if name not in sim_results:
        pytest.fail(sim_results.get("_crash", f"check {name} did not run"))
    res = sim_results[name]
    assert res["ok"], f"{name}: {res['message']}"


def test_no_gpu_error_names_the_simulator():
    """Without a GPU and without the simulator, CudaBackend() raises a RuntimeError that says
    so and names NUMBA_ENABLE_CUDASIM=1; importing the package needs no GPU."""
    code = (
        "import sys\n"
        "import cnn, cnn.backends\n"
        "from cnn.backends import get_backend\n"
        "get_backend('numpy')\n"
        "assert 'numba.cuda' not in sys.modules, 'importing cnn imported numba.cuda'\n"
        "from numba import cuda\n"
        "if cuda.is_available():\n"
        "    print('GPU'); sys.exit(0)\n"
        "from cnn.backends.cuda.backend import CudaBackend\n"
        "try:\n"
        "    CudaBackend()\n"
        "except RuntimeError as e:\n"
        "    print('ERROR', e); sys.exit(0)\n"
        "print('NO ERROR')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(simulator=False),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if proc.stdout.startswith("GPU"):
        pytest.skip("a CUDA GPU is present")
    assert proc.stdout.startswith("ERROR"), proc.stdout
    assert "no CUDA GPU" in proc.stdout and "NUMBA_ENABLE_CUDASIM=1" in proc.stdout, proc.stdout
