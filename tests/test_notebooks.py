"""Every notebook runs in CI: the study driver on the quick profile, the analysis on what it
produced, and the equivalence notebooks (each ends in assertions, so a failing equivalence
fails here). Outputs go to a temporary folder; the committed notebooks keep their outputs
from the full run."""
from __future__ import annotations

import os
from pathlib import Path

import papermill
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
def _mpi_missing() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError as err:
        return f"mpi4py is not installed ({err}); make venv installs it"
    from cnn.parallel.launch import find_mpiexec
    try:
        find_mpiexec()
    except FileNotFoundError as err:
        return str(err)
    return None


EQUIVALENCE = ["conv_filter_example", "test_numpy_vs_keras", "test_sequential_vs_cpu_parallel",
               "test_sequential_vs_gpu",
               pytest.param("test_sequential_vs_mpi", marks=pytest.mark.skipif(
                   _mpi_missing() is not None, reason=f"MPI unavailable: {_mpi_missing()}"))]


def _execute(name: str, out_dir: Path, **parameters) -> None:
    papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(out_dir / f"{name}.ipynb"),
                               parameters=parameters, cwd=str(NOTEBOOKS), kernel_name="python3",
                               progress_bar=False)


@pytest.mark.parametrize("name", EQUIVALENCE)
def test_equivalence_notebook(name, tmp_path):
    _execute(name, tmp_path)


def test_study_and_results_notebooks_on_the_quick_profile(tmp_path):
    results = tmp_path / "df_results.pkl"
    _execute("project", tmp_path, profile="quick", out=str(results),
             data_root=os.environ.get("CNN_DATA_DIR"))
    assert results.is_file()
    _execute("results", tmp_path, results_path=str(results), figures_dir=str(tmp_path / "figures"),
             summary_dir=str(tmp_path))
    assert any((tmp_path / "figures").glob("*.png"))
    assert (tmp_path / "summary.csv").is_file()
