"""Property-based tests of the grid parser (hypothesis): any value, any structure, any bytes in a
grid file give a clean ValueError/TypeError naming what is wrong, or a correct expansion; never
a traceback from deeper code. Correctness is checked against an independent count of the
configurations a valid grid describes."""
from __future__ import annotations

import itertools
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnn import paths as P
from cnn.study.grid import LIST_AXES, SETTINGS, expand_grid, read_grid

SETTINGS_FAST = settings(max_examples=150, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow,
                                                HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["mnist", "blobs", "sequential", "threads", "sync", "numba",
                                     "float32", "float64", "mnist_small", "keras", "cuda"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=5),
                                                                       inner, max_size=2)),
                      max_leaves=6)
axis_names = st.one_of(st.sampled_from(LIST_AXES + SETTINGS), st.text(max_size=8),
                       st.integers(), st.none())


@SETTINGS_FAST
@given(st.one_of(values, st.dictionaries(axis_names, values, max_size=5),
                 st.lists(st.dictionaries(axis_names, values, max_size=4), max_size=3)))
def test_any_grid_is_expanded_or_refused_cleanly(grid):
    try:
        runs = expand_grid(grid, gpu=False)
    except ValueError as err:  # the parser's own message, not a TypeError from deeper code
        assert str(err)
        return
    for r in runs:
        assert r["path"] in P.PATHS and r["threads"] >= 1 and r["repeat"] >= 0


# valid values per axis (the independent model below knows how each path fixes its axes)
VALID = {
    "dataset": st.sampled_from(["blobs", "xor", "mnist_embedded"]),
    "path": st.sampled_from(["sequential", "threads", "numba", "numba_parallel", "keras"]),
    "strategy": st.sampled_from(["sync", "average", "hogwild"]),
    "threads": st.integers(1, 4),
    "batch_size": st.integers(1, 64),
    "epochs": st.integers(1, 3),
    "seed": st.integers(0, 5),
    "lr": st.floats(1e-4, 1.0),
}


@st.composite
def valid_grids(draw):
    grid = {}
    for axis, strat in VALID.items():
        if draw(st.booleans()):
            vs = draw(st.lists(strat, min_size=1, max_size=3))
            grid[axis] = vs if len(vs) > 1 or draw(st.booleans()) else vs[0]
    grid["repeats"] = draw(st.integers(1, 3))
    return grid


def _expected_configs(grid: dict) -> set:
    """The distinct configurations, computed independently of the parser: each path keeps the
    strategy and thread axes only if it takes several strategies / scales (the registry's
    published facts), and duplicates collapse."""
    def vals(axis, default):
        v = grid.get(axis, default)
        return list(dict.fromkeys(v if isinstance(v, list) else [v]))
    out = set()
    for combo in itertools.product(vals("dataset", "mnist_embedded"), vals("path", "sequential"),
                                   vals("strategy", None), vals("threads", 1),
                                   vals("batch_size", None), vals("epochs", 1),
                                   vals("seed", 0), vals("lr", None)):
        ds, path, strategy, threads, batch, epochs, seed, lr = combo
        strategy = strategy if path == "threads" else None
        threads = threads if path in ("threads", "numba_parallel", "keras") else 1
        out.add((ds, path, strategy, threads, batch, epochs, seed, lr))
    return out


@SETTINGS_FAST
@given(valid_grids())
def test_valid_grids_expand_to_every_configuration_once(grid):
    runs = expand_grid(grid, gpu=False)
    assert len(runs) == len(_expected_configs(grid)) * grid["repeats"]
    keys = [r["run_key"] for r in runs]
    assert len(set(keys)) == len(keys)
    base_seeds = grid.get("seed", 0)
    base_seeds = set(base_seeds if isinstance(base_seeds, list) else [base_seeds])
    for r in runs:
        assert r["seed"] - r["repeat"] in base_seeds
        assert (r["strategy"] in P.get_path(r["path"]).strategies
                and r["backend"] in P.get_path(r["path"]).backends)
    # repeats interleaved: every repeat-0 run comes before any repeat-1 run
    reps = [r["repeat"] for r in runs]
    assert reps == sorted(reps)


@SETTINGS_FAST
@given(st.sampled_from(LIST_AXES), values)
def test_a_bad_value_names_its_axis(axis, value):
    try:
        expand_grid({"dataset": "blobs", axis: value}, gpu=False)
    except ValueError as err:
        # the message names the axis (or the unknown axis / structure problem)
        assert axis in str(err) or "grid" in str(err)


@SETTINGS_FAST
@given(st.binary(max_size=200), st.sampled_from([".json", ".yaml", ".yml"]))
def test_any_bytes_in_a_grid_file_give_a_clean_error_naming_it(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("g") / f"grid{suffix}"
    path.write_bytes(data)
    try:
        read_grid(path)
    except ValueError as err:
        assert str(path) in str(err)


@SETTINGS_FAST
@given(st.data())
def test_mutated_grid_files_give_a_clean_error_or_a_valid_grid(tmp_path_factory, data):
    text = json.dumps({"dataset": "blobs", "path": ["sequential", "threads"], "threads": [1, 2],
                       "batch_size": 16, "repeats": 2})
    pos = data.draw(st.integers(0, len(text) - 1))
    ch = data.draw(st.characters(codec="utf-8"))
    mutated = text[:pos] + ch + text[pos + 1:]
    path = tmp_path_factory.mktemp("g") / "grid.json"
    path.write_text(mutated, encoding="utf-8")
    try:
        grid = read_grid(path)
    except ValueError as err:
        assert str(path) in str(err)
        return
    assert expand_grid(grid, gpu=False)


def test_huge_grids_and_values_are_refused_early():
    with pytest.raises(ValueError, match="more than"):
        expand_grid({"dataset": "blobs", "seed": list(range(1000)), "batch_size":
                     list(range(1, 200)), "repeats": 5}, gpu=False)
    with pytest.raises(ValueError, match="lr"):
        expand_grid({"lr": 10**400})
    with pytest.raises(ValueError, match="timeout"):
        expand_grid({"timeout": math.inf})
    with pytest.raises(ValueError, match="threads"):
        expand_grid({"path": "threads", "threads": 10**6})
