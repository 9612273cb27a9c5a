"""cnn.files: structured files read with errors that name the file and the place, written
atomically (the old file or the new one, never half, no temporary left behind)."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import yaml

from cnn.files import StructuredFileError, atomic_write, read_structured
from limits import run_python


@pytest.mark.parametrize("name, text, kind, line, column", [
    ("a.json", '{"x": 1,\n "y": }', "JSON", 2, 7),
    ("a.yaml", "x: [1, 2\ny: 3\n", "YAML", 2, 2),
    ("a.yml", "x: {{{", "YAML", 1, 7),
])
def test_a_malformed_file_names_its_kind_and_place(tmp_path, name, text, kind, line, column):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(StructuredFileError) as info:
        read_structured(path)
    err = info.value
    assert (err.path, err.kind, err.line, err.column) == (path, kind, line, column)
    assert err.where == f" at line {line}, column {column}"
    assert str(err) == f"{path}: not valid {kind}: {err.problem}{err.where}"
    # the parser's own finding, in the message and as the problem
    if kind == "JSON":
        with pytest.raises(json.JSONDecodeError) as raw:
            json.loads(text)
        assert err.problem == raw.value.msg
    else:
        with pytest.raises(yaml.YAMLError) as raw:
            yaml.safe_load(text)
        assert err.problem == raw.value.problem


def test_bytes_that_are_not_text_and_a_folder(tmp_path):
    path = tmp_path / "b.json"
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(StructuredFileError, match=r"b\.json: not a text file \(not UTF-8: .* "
                                                  r"at byte 0\)") as info:
        read_structured(path)
    assert info.value.kind is None and info.value.where == ""
    (tmp_path / "d.yaml").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no grid file at .*d\.yaml \(it is a folder\)"):
        read_structured(tmp_path / "d.yaml", "grid file")


def test_the_error_survives_rewording_and_pickling(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("[1,")
    with pytest.raises(StructuredFileError) as info:
        read_structured(path)
    err = info.value
    wrapped = type(err)(f"--config: {err}")  # what callers do to name their option
    assert str(wrapped) == f"--config: {err}" and isinstance(wrapped, ValueError)
    assert str(pickle.loads(pickle.dumps(err))) == str(err)


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    atomic_write(path, "old")
    assert atomic_write(path, lambda f: f.write(b"new")) == path
    assert path.read_text() == "new"

    def fail(f):  # the writer dies half way
        f.write(b"half")
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError):
        atomic_write(path, fail)
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["out.json"]
    with pytest.raises(OSError, match=r"cannot write .*missing.*out\.json"):
        atomic_write(tmp_path / "missing" / "out.json", b"x")


# ---- audit findings (a reliability pass on fa4b133) ----------------------------------------------
BOMB = "".join(f"{c}: &{c} [" + ",".join([f"*{chr(ord(c) - 1)}" if i else "x"] * 10) + "]\n"
               for i, c in enumerate("abcdefghi"))  # 9 levels of 10 aliases: 10**9 values


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    """Audit finding 6: a 400-byte spec of nested aliases exhausted memory (12 GB and growing)
    when its error message printed the expanded value. Run with 1 GiB of address space
    beyond what the interpreter has: an expansion fails the test."""
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 400
    res = run_python(f"from cnn.model import resolve_spec\ntry:\n    resolve_spec({str(path)!r})"
                     f"\nexcept ValueError as err:\n    print(err)\n", 1 << 30)
    assert "expands through its aliases to more than 1,000,000 values" in res.stdout, \
        res.stdout + res.stderr[-2000:]
    assert str(path) in res.stdout


def test_a_recursive_yaml_document_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("a: &a [1, *a]\n")
    with pytest.raises(StructuredFileError, match="refers to itself"):
        read_structured(path)


@pytest.mark.parametrize("name, text, key, line", [
    ("models.yaml", "models:\n  small: {model: mnist_small}\n  small: {model: mnist_mlp}\n",
     "small", 3),
    ("spec.json", '{"layers": [], "loss": "a", "loss": "b"}', "loss", None),
])
def test_a_key_given_twice_is_refused(tmp_path, name, text, key, line):
    """Audit finding 8: duplicate model names in a --config mapping collapsed to one model
    (the parsers keep the last value silently)."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(StructuredFileError, match=f"duplicate key '{key}'") as info:
        read_structured(path)
    assert info.value.line == line


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {lr: 0.1, momentum: 0.9}\nrun: {<<: *b, lr: 0.2}\n")
    assert read_structured(path)["run"] == {"lr": 0.2, "momentum": 0.9}


def test_a_symlinked_target_is_written_through(tmp_path):
    """Audit finding 10: a symlinked results file was replaced by a regular file, so two
    studies (one through the link, one through the target) wrote two files."""
    real = tmp_path / "real" / "results.pkl"
    real.parent.mkdir()
    real.write_text("old")
    link = tmp_path / "link.pkl"
    link.symlink_to(real)
    assert atomic_write(link, "new") == link
    assert link.is_symlink() and real.read_text() == "new"
    assert sorted(p.name for p in real.parent.iterdir()) == ["results.pkl"]


def test_temporaries_of_a_killed_writer_are_removed(tmp_path):
    """Audit finding 11: kill -9 during a save left .w.npz.<pid>.<hex>.tmp behind for good.
    The next write of the same target removes those of dead processes, not a live writer's."""
    target = tmp_path / "w.npz"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".w.npz.{dead}.0123abcd.tmp"
    live = tmp_path / f".w.npz.{os.getppid()}.0123abcd.tmp"
    other = tmp_path / f".other.npz.{dead}.0123abcd.tmp"
    for p in (stale, live, other):
        p.write_bytes(b"half")
    atomic_write(target, b"whole")
    assert target.read_bytes() == b"whole"
    assert not stale.exists() and live.exists() and other.exists()
