"""Every CUDA kernel compiles to PTX for sm_75, sm_80 and sm_90, assembles with ptxas, spills
no registers and does no float64 arithmetic in its float32 version (an accidental promotion).

The analysis (``python -m cnn.bench.ptx``) runs once, in a subprocess with the CUDA
simulator off: ``compile_ptx`` needs Numba's real CUDA target, and the pytest process may have
imported Numba with ``NUMBA_ENABLE_CUDASIM=1`` set. No GPU is needed.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["sm_75", "sm_80", "sm_90"]
COLUMNS = ["kernel", "arch", "registers", "smem_bytes", "spill_stores", "spill_loads",
           "threads_per_block", "occupancy", "arithmetic_intensity"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """``(rows, csv_path)`` of one ``python -m cnn.bench.ptx --json --out ...`` run."""
    out = tmp_path_factory.mktemp("ptx") / "gpu_kernels.csv"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, "-m", "cnn.bench.ptx", "--json",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"cnn.bench.ptx failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout), out


def _kernels(rows):
    return sorted({r["kernel"] for r in rows})


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles_and_assembles(report, arch):
    rows, _ = report
    done = {r["kernel"] for r in rows if r["arch"] == arch and r["registers"] > 0}
    missing = sorted(set(_kernels(rows)) - done)
    assert not missing, f"{arch}: no ptxas result for {missing}"


@pytest.mark.parametrize("arch", ARCHS)
def test_no_register_spills(report, arch):
    rows, _ = report
    spills = [f"{r['kernel']} ({r['spill_stores']} B stored, {r['spill_loads']} B loaded)"
              for r in rows if r["arch"] == arch and (r["spill_stores"] or r["spill_loads"])]
    assert not spills, f"{arch}: register spills in {spills}"


@pytest.mark.parametrize("arch", ARCHS)
def test_float32_kernels_do_no_float64_arithmetic(report, arch):
    rows, _ = report
    bad = [f"{r['kernel']} ({r['fp64_instructions']} f64 instructions)"
           for r in rows if r["arch"] == arch and r["fp64_instructions"]]
    assert not bad, f"{arch}: float64 arithmetic in float32 kernels: {bad}"


def test_csv_table(report):
    rows, path = report
    with path.open() as fh:
        table = list(csv.DictReader(fh))
    assert table and list(table[0]) == COLUMNS
    assert len(table) == len(_kernels(rows)) * len(ARCHS)
    for r in table:
        assert 0 < float(r["occupancy"]) <= 1, r
        assert float(r["arithmetic_intensity"]) >= 0, r
