"""Property-based tests of the model spec parser (issue 13): random and mutated spec values
(lists, dicts), random and mutated JSON and YAML text, and random ``input_shape`` values give
either a ``ValueError``/``TypeError`` raised by the package itself (an explicit ``raise`` in
``cnn/``, naming the file for a file), or a model whose layers are exactly the ones the spec
asks for; never a traceback from deeper code (NumPy, the YAML parser, Python's own ``TypeError``
on a bad comparison) and never a silently different model.

Derandomised and small (seconds); ``CNN_HYPOTHESIS_EXPLORE=1`` draws fresh examples and
``CNN_HYPOTHESIS_EXAMPLES=N`` more of them.
"""
from __future__ import annotations

import copy
import json
import linecache
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cnn
from cnn.layers import LAYER_TYPES
from cnn.model import Sequential, resolve_spec
from cnn.presets import PRESETS

PACKAGE = Path(cnn.__file__).resolve().parent
EXAMPLES = int(os.environ.get("CNN_HYPOTHESIS_EXAMPLES", "100"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    derandomize=not os.environ.get("CNN_HYPOTHESIS_EXPLORE"),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
INPUT = (1, 8, 8)


def assert_clean_error(err: BaseException, name: str | None = None) -> None:
    assert isinstance(err, (ValueError, TypeError)), f"{type(err).__name__}: {err}"
    tb = err.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = Path(tb.tb_frame.f_code.co_filename).resolve()
    line = linecache.getline(str(filename), tb.tb_lineno)
    assert PACKAGE in filename.parents and "raise" in line, (
        f"{type(err).__name__} from {filename}:{tb.tb_lineno}: {err}")
    if name is not None:
        assert name in str(err), str(err)


def expected_layers(spec) -> list[tuple[str, dict]]:
    """The (type, options) of the layers a valid spec asks for, with activations expanded (a
    residual block keeps its own, which follows its sum inside the block)."""
    layers = spec["layers"] if isinstance(spec, dict) else spec
    out = []
    for entry in layers:
        kind = LAYER_TYPES[entry["type"].lower()].type
        block = kind == "residual"
        options = {k: v for k, v in entry.items() if k not in ("type", "activation")}
        if block and entry.get("activation") not in (None, "linear"):
            options["activation"] = entry["activation"]
        out.append((kind, options))
        if not block and entry.get("activation") not in (None, "linear"):
            out.append((entry["activation"], {}))
    return out


def check_model(model: Sequential, spec) -> None:
    """Every layer is the one the spec entry asks for, with the options it gives."""
    check_layers(model.layers, spec)
    assert model.num_classes == model.layers[-1].output_shape[0]


def check_layers(layers, spec) -> None:
    """``layers`` are those ``spec`` (a list of entries) asks for, a residual block's branches
    checked likewise against its entry's lists."""
    want = expected_layers(spec)
    assert [layer.type for layer in layers] == [kind for kind, _ in want]
    for layer, (_, options) in zip(layers, want):
        config = layer.config()
        for key, value in options.items():
            if layer.type == "residual" and key == "layers":
                check_layers(layer.main, value)
                continue
            if layer.type == "residual" and key == "shortcut" and isinstance(value, list):
                check_layers(layer.shortcut_layers, value)
                continue
            if key == "name":  # a block's layers are named "<block>/<name>"
                assert layer.name.rsplit("/", 1)[-1] == value, (layer.name, value)
                continue
            if key == "kernel_size" and not isinstance(value, list):
                value = [value, value]
            if key == "kernel_size":
                value = list(value)
            if key == "stride" and value is None and layer.type == "maxpool2d":
                value = config["pool_size"]
            assert config[key] == value, (key, config[key], value)


def build(spec, input_shape=INPUT, name=None):
    try:
        model = Sequential.from_spec(spec, input_shape=input_shape)
    except Exception as err:  # noqa: BLE001 - the property is about which exception
        assert_clean_error(err, name)
        return None
    check_model(model, resolve_spec(spec))
    return model


# ---- values ------------------------------------------------------------------------------------
# integers either small or far too large to allocate (never sizes that allocate gigabytes)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 12),
                    st.sampled_from([2**40, 2**62, 2**63, 2**64, 10**30, -2**63]),
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["valid", "same", "full", "relu", "linear", "tanh", "conv2d",
                                     "dense", "flatten", "maxpool2d", "MaxPooling2D", "he_normal",
                                     "glorot_uniform", "", "x"]),
                    st.text(max_size=4))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)
small = st.integers(1, 6)
layer_entries = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["conv2d", "Conv2D"]), "filters": small},
                          optional={"kernel_size": st.one_of(small, st.lists(small, min_size=2,
                                                                             max_size=2)),
                                    "stride": small, "padding": st.sampled_from(["valid", "same"]),
                                    "activation": st.sampled_from(["relu", "linear", None]),
                                    "kernel_initializer": st.sampled_from(["he_normal",
                                                                           "glorot_uniform"])}),
    st.fixed_dictionaries({"type": st.sampled_from(["maxpool2d", "MaxPooling2D"])},
                          optional={"pool_size": st.integers(1, 3), "stride": st.integers(1, 3)}),
    st.fixed_dictionaries({"type": st.just("relu")}),
    st.fixed_dictionaries({"type": st.just("flatten")}),
    st.fixed_dictionaries({"type": st.just("dense"), "units": small},
                          optional={"activation": st.sampled_from(["relu", None])}))
plausible_specs = st.lists(layer_entries, min_size=1, max_size=5).map(
    lambda layers: layers + [{"type": "flatten"}, {"type": "dense", "units": 3}])


@SETTINGS
@given(spec=plausible_specs)
def test_plausible_specs_build_or_are_refused_cleanly(spec):
    build(spec)


@SETTINGS
@given(spec=values)
def test_random_values_as_spec(spec):
    build(spec)


@SETTINGS
@given(layers=st.lists(st.one_of(values, st.dictionaries(
    st.sampled_from(["type", "filters", "kernel_size", "stride", "padding", "units", "pool_size",
                     "activation", "name", "kernel_initializer", "bogus"]), values, max_size=4)),
    max_size=4), input_shape=st.one_of(st.none(), values))
def test_random_layer_dicts(layers, input_shape):
    build({"layers": layers, "input_shape": input_shape}, input_shape=None)


def paths(obj, prefix=()):
    """Every (path, value) in a nested list/dict."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, prefix + (i,))


@st.composite
def mutated_presets(draw):
    spec = copy.deepcopy(PRESETS[draw(st.sampled_from(sorted(PRESETS)))])
    spec["input_shape"] = list(INPUT) if spec["input_shape"][0] == 1 else [3, 12, 12]
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from([p for p, _ in paths(spec)]))
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if not where:
            spec = draw(values)
            break
        parent = spec
        for key in where[:-1]:
            parent = parent[key]
        key = where[-1]
        if action == "replace":
            parent[key] = draw(values)
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["filters", "units", "stride", "name", "type", "extra"]))] = draw(values)
        else:
            parent.insert(key, draw(values))
    return spec


@SETTINGS
@given(spec=mutated_presets())
def test_mutated_presets(spec):
    build(spec, input_shape=None)


@SETTINGS
@given(shape=st.one_of(values, st.lists(st.integers(-3, 10), max_size=4),
                       st.tuples(st.integers(-2, 3), st.integers(-2, 12), st.integers(-2, 12))))
def test_random_input_shapes(shape):
    model = build([{"type": "flatten"}, {"type": "dense", "units": 2}], input_shape=shape)
    if model is not None:
        assert model.input_shape == tuple(shape)


# ---- text files --------------------------------------------------------------------------------
def build_file(text: str, suffix: str):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"spec{suffix}"
        path.write_text(text, encoding="utf-8")
        try:
            model = Sequential.from_spec(str(path), input_shape=INPUT)
        except Exception as err:  # noqa: BLE001
            assert_clean_error(err)
            # an error about the file names the file
            assert str(path) in str(err), str(err)
            return None
        check_model(model, resolve_spec(str(path)))
        return model


VALID_JSON = json.dumps({"layers": [{"type": "conv2d", "filters": 2, "kernel_size": 3,
                                     "activation": "relu"},
                                    {"type": "maxpool2d", "pool_size": 2},
                                    {"type": "flatten"}, {"type": "dense", "units": 3}]})
VALID_YAML = ("input_shape: [1, 8, 8]\nlayers:\n"
              "  - {type: conv2d, filters: 2, kernel_size: 3, activation: relu}\n"
              "  - type: maxpool2d\n    pool_size: 2\n"
              "  - type: flatten\n  - {type: dense, units: 3}\n")
char_edits = st.lists(st.tuples(st.sampled_from(["delete", "insert", "replace"]),
                                st.integers(0, 10**6),
                                st.sampled_from(list("{}[]:,- \n\t\"'&*!#|>%@`0123456789abcxyz"))),
                      min_size=1, max_size=4)


def edit(text: str, edits) -> str:
    chars = list(text)
    for kind, pos, ch in edits:
        i = pos % (len(chars) + 1)
        if kind == "insert":
            chars.insert(i, ch)
        elif chars:
            i %= len(chars)
            if kind == "delete":
                del chars[i]
            else:
                chars[i] = ch
    return "".join(chars)


@SETTINGS
@given(text=st.text(max_size=80), suffix=st.sampled_from([".json", ".yaml", ".yml"]))
def test_random_text_files(text, suffix):
    build_file(text, suffix)


@SETTINGS
@given(edits=char_edits)
def test_mutated_json_text(edits):
    build_file(edit(VALID_JSON, edits), ".json")


@SETTINGS
@given(edits=char_edits)
def test_mutated_yaml_text(edits):
    build_file(edit(VALID_YAML, edits), ".yaml")


@SETTINGS
@given(spec=values)
def test_random_values_as_yaml_and_json(spec):
    build_file(yaml.safe_dump(spec), ".yaml")
    build_file(json.dumps(spec), ".json")


@pytest.mark.parametrize("text, suffix", [(VALID_JSON, ".json"), (VALID_YAML, ".yaml")])
def test_the_unmutated_files_build(text, suffix):
    """The oracle's starting points are valid specs."""
    model = build_file(text, suffix)
    assert model is not None and [l.type for l in model.layers] == [
        "conv2d", "relu", "maxpool2d", "flatten", "dense"]
