"""cnn.files: structured files read with errors that name the file and the place, written
atomically (the old file or the new one, never half, no temporary left behind)."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import yaml

from cnn.files import StructuredFileError, atomic_write, read_structured


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
