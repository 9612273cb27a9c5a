"""The counter-based generator behind dropout masks (cnn/backends/rng.py): NumPy, Numba (and,
in tests/cuda_sim_checks.py, CUDA) compute the same bits as the Python-integer definition, and a
unit's mask depends only on (seed, layer, step, global example index, unit), never on how the
batch is split."""
from __future__ import annotations

import numpy as np
import pytest

from cnn.backends import get_backend, rng

# the SplitMix64 sequence of seed 0 (java.util.SplittableRandom / the reference C code):
# mix64(k * GOLDEN) for k = 1, 2, 3
SPLITMIX64_SEED0 = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_mix64_is_splitmix64():
    assert [rng.mix64(k * rng.GOLDEN) for k in (1, 2, 3)] == SPLITMIX64_SEED0


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 0.9])
def test_numpy_mask_equals_the_python_integer_definition(rate):
    key = rng.pass_key(123, "dropout", 7)
    shape = (5, 3, 2, 4)
    np.testing.assert_array_equal(rng.keep_mask(key, rate, 40, shape),
                                  rng.keep_mask_reference(key, rate, 40, shape))


@pytest.mark.parametrize("backend", ["numpy", "numba", "naive"])
def test_every_cpu_backend_drops_the_same_units(backend):
    be = get_backend(backend)
    x = np.random.default_rng(0).standard_normal((4, 2, 3, 5)) + 10  # no zero inputs
    key = rng.pass_key(5, "dropout_2", 3)
    out, _ = be.dropout_forward(x, 0.3, key, 17)
    np.testing.assert_array_equal(out != 0, rng.keep_mask_reference(key, 0.3, 17, x.shape))


def test_mask_of_an_example_does_not_depend_on_the_split():
    """Rows [a, b) of the whole batch's mask are the mask of a shard that starts at a."""
    key = rng.pass_key(1, "dropout", 0)
    whole = rng.keep_mask(key, 0.5, 0, (10, 6))
    for lo, hi in [(0, 3), (3, 7), (7, 10), (4, 5)]:
        np.testing.assert_array_equal(rng.keep_mask(key, 0.5, lo, (hi - lo, 6)), whole[lo:hi])


def test_streams_differ_by_seed_layer_and_step():
    shape = (8, 64)
    masks = {(s, name, step): rng.keep_mask(rng.pass_key(s, name, step), 0.5, 0, shape)
             for s in (0, 1) for name in ("dropout", "dropout_1") for step in (0, 1)}
    keys = list(masks)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            agree = float(np.mean(masks[a] == masks[b]))
            assert 0.4 < agree < 0.6, f"{a} and {b} agree on {agree:.2f} of the units"


def test_keep_fraction_and_independence():
    """Over 200,000 units the kept fraction is within 5 standard errors of 1 - rate, and the
    masks of neighbouring units and examples are uncorrelated."""
    rate = 0.3
    keep = rng.keep_mask(rng.pass_key(9, "dropout", 4), rate, 0, (400, 500)).astype(np.float64)
    n = keep.size
    assert abs(keep.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
    for a, b in ((keep[:, 1:], keep[:, :-1]), (keep[1:], keep[:-1])):
        corr = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        assert abs(corr) < 5 / np.sqrt(a.size)


def test_threshold_refuses_rates_outside_0_1():
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=f"rate={bad}"):
            rng.threshold(bad)


def test_layer_key_is_stable_across_processes():
    """CRC-32 of the name, not Python's salted hash(): a fixed value."""
    assert rng.layer_key(0, "dropout") == rng.layer_key(0, "dropout")
    import subprocess
    import sys
    code = "from cnn.backends import rng; print(rng.pass_key(3, 'dropout', 5))"
    out = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() for _ in range(2)}
    assert out == {str(rng.pass_key(3, "dropout", 5))}
