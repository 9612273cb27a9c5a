"""The machine record: the git commit a run names, "-dirty" only for changed code."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from cnn.machine import STUDY_OUTPUTS, git_commit

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(root, *args):
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path):
    """A repository with a source file and one tracked file under each study output folder."""
    _git(tmp_path, "init", "-q")
    (tmp_path / "cnn").mkdir()
    (tmp_path / "cnn" / "layers.py").write_text("x = 1\n")
    for folder in STUDY_OUTPUTS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "project.ipynb").write_text("{}\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    return tmp_path


def test_a_clean_checkout_names_its_commit(checkout):
    assert git_commit(checkout) == _git(checkout, "rev-parse", "--short=12", "HEAD")


def test_the_study_writing_its_outputs_does_not_make_the_code_dirty(checkout):
    for folder in STUDY_OUTPUTS:  # papermill writes the tracked output notebook at once
        (checkout / folder / "project.ipynb").write_text('{"cells": []}\n')
    (checkout / "results" / "new.png").write_bytes(b"png")  # untracked: never counted
    assert not git_commit(checkout).endswith("-dirty")


@pytest.mark.parametrize("change", ["edit", "delete"])
def test_changed_code_is_dirty(checkout, change):
    source = checkout / "cnn" / "layers.py"
    source.write_text("x = 2\n") if change == "edit" else source.unlink()
    assert git_commit(checkout) == _git(checkout, "rev-parse", "--short=12", "HEAD") + "-dirty"


def test_outside_git_the_commit_is_unknown(tmp_path):
    assert git_commit(tmp_path) == "unknown"
