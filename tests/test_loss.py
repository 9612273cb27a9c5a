"""Softmax cross-entropy against hand-computed values, its stability on huge logits, the count
of correct rows, and the NumPy and Numba ops against the naive loop version."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from cnn.backends import get_backend
from cnn.losses import softmax, softmax_cross_entropy

NP = get_backend("numpy")
NAIVE = get_backend("naive")
NUMBA = get_backend("numba")
BACKENDS = [pytest.param(NP, id="numpy"), pytest.param(NAIVE, id="naive"),
            pytest.param(NUMBA, id="numba")]


def strict():
    """Overflow, invalid operations (NaN) and division by zero raise. Underflow is allowed:
    exp of a very negative shifted logit is a probability that rounds to 0, which is right."""
    return np.errstate(over="raise", invalid="raise", divide="raise", under="ignore")


@pytest.mark.parametrize("be", BACKENDS)
def test_two_equal_logits_give_ln2(be):
    loss, dlogits, correct = be.softmax_cross_entropy(np.array([[0.0, 0.0]]), np.array([1]))
    assert np.shape(loss) == () and dlogits.shape == (1, 2)
    np.testing.assert_allclose(float(loss), math.log(2.0), rtol=1e-15, atol=0)
    np.testing.assert_allclose(dlogits, [[0.5, -0.5]], rtol=0, atol=1e-15)


@pytest.mark.parametrize("be", BACKENDS)
def test_three_logits_by_hand(be):
    loss, dlogits, correct = be.softmax_cross_entropy(np.array([[1.0, 2.0, 3.0]]), np.array([2]))
    assert dlogits.shape == (1, 3)
    z = math.e + math.e ** 2 + math.e ** 3
    # -log(e^3 / z) = log(1 + e^-1 + e^-2) = 0.40760596444438...
    np.testing.assert_allclose(float(loss), math.log(1 + math.exp(-1) + math.exp(-2)), rtol=1e-14)
    np.testing.assert_allclose(float(loss), 0.4076059644443803, rtol=1e-14)
    np.testing.assert_allclose(dlogits, [[math.e / z, math.e ** 2 / z, math.e ** 3 / z - 1]],
                               rtol=1e-14, atol=1e-16)
    assert int(correct) == 1


@pytest.mark.parametrize("be", BACKENDS)
def test_batch_mean_and_gradient_over_n(be):
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [2.0, -1.0, 0.5]])
    labels = np.array([0, 1, 0])
    loss, dlogits, correct = be.softmax_cross_entropy(logits, labels)
    assert dlogits.shape == (3, 3)
    # per-row losses by hand: logsumexp - logit[label]
    rows = [math.log(math.e + math.e ** 2 + math.e ** 3) - 1.0,
            math.log(3.0),
            math.log(math.exp(2.0) + math.exp(-1.0) + math.exp(0.5)) - 2.0]
    np.testing.assert_allclose(float(loss), sum(rows) / 3, rtol=1e-14)
    expected = np.empty((3, 3))
    for i, row in enumerate(logits):
        p = [math.exp(v) / sum(math.exp(u) for u in row) for v in row]
        p[labels[i]] -= 1.0
        expected[i] = np.array(p) / 3        # divided by N: the gradient of the mean
    np.testing.assert_allclose(dlogits, expected, rtol=1e-13, atol=1e-16)
    # row 0: argmax 2 != 0; row 1: all tied, argmax 0 != 1; row 2: argmax 0 == 0
    assert int(correct) == 1


@pytest.mark.parametrize("be", BACKENDS)
def test_correct_count(be):
    logits = np.array([[5.0, 1.0], [0.0, 3.0], [2.0, 1.0], [-1.0, -2.0]])
    loss, dlogits, correct = be.softmax_cross_entropy(logits, np.array([0, 1, 1, 0]))
    assert np.shape(correct) == ()
    assert np.issubdtype(np.asarray(correct).dtype, np.integer)
    assert int(correct) == 3


HUGE = [  # (dtype, logits row, label, loss by hand)
    (np.float64, [1e4, -1e4], 0, 0.0),
    (np.float64, [1e4, -1e4], 1, 2e4),
    (np.float64, [-1e4, 1e4, 0.0], 2, 1e4),
    (np.float64, [1e30, -1e30], 0, 0.0),
    (np.float64, [1e30, -1e30], 1, 2e30),
    (np.float64, [1e30, 1e30], 0, math.log(2.0)),
    (np.float64, [-1e30, -1e30, -1e30], 1, math.log(3.0)),
    (np.float32, [3e38, 3e38], 1, math.log(2.0)),
    (np.float32, [3e38, 1e38], 1, 2e38),
    (np.float32, [3e38, 1e38], 0, 0.0),
    (np.float32, [-3e38, -3e38], 0, math.log(2.0)),
    # the spread exceeds float32's range, but the loss (0) and gradient are representable
    (np.float32, [3e38, -3e38], 0, 0.0),
    (np.float32, [-3e38, 0.0, 3e38], 2, 0.0),
]


@pytest.mark.parametrize("be", [pytest.param(NP, id="numpy"), pytest.param(NUMBA, id="numba")])
@pytest.mark.parametrize("dtype, row, label, expected", HUGE)
def test_huge_logits_finite_without_overflow(be, dtype, row, label, expected):
    logits = np.array([row], dtype=dtype)
    with strict(), warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, dlogits, correct = be.softmax_cross_entropy(logits, np.array([label]))
    assert dlogits.shape == logits.shape
    assert loss.dtype == dtype and dlogits.dtype == dtype
    assert np.isfinite(loss) and np.all(np.isfinite(dlogits))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6, atol=1e-6)
    # gradient softmax - onehot, computed by hand: one-hot on the max (split on ties)
    k = len(row)
    top = [i for i, v in enumerate(row) if v == max(row)]
    probs = np.array([1.0 / len(top) if i in top else 0.0 for i in range(k)])
    probs[label] -= 1.0
    np.testing.assert_allclose(dlogits[0], probs, rtol=0, atol=1e-6)
    assert int(correct) == int(label == top[0])


@pytest.mark.parametrize("dtype, row", [(np.float64, [1e30, -1e30, 0.0]),
                                        (np.float32, [3e38, -3e38]),
                                        (np.float32, [1.0, 2.0])])
def test_softmax_for_predict_is_stable(dtype, row):
    logits = np.array([row, row[::-1]], dtype=dtype)
    with strict(), warnings.catch_warnings():
        warnings.simplefilter("error")
        p = softmax(logits)
    assert p.shape == logits.shape
    assert np.all(np.isfinite(p)) and np.all(p >= 0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    if row == [1.0, 2.0]:
        e = math.exp(1.0)
        np.testing.assert_allclose(p[0], [1 / (1 + e), e / (1 + e)], rtol=1e-6)


@pytest.mark.parametrize("be", [pytest.param(NP, id="numpy"), pytest.param(NUMBA, id="numba")])
@pytest.mark.parametrize("n, k", [(1, 2), (5, 10), (16, 3)])
@pytest.mark.parametrize("scale", [1.0, 50.0])
def test_matches_naive_random(be, n, k, scale):
    rng = np.random.default_rng(n * k)
    logits = scale * rng.standard_normal((n, k))
    labels = rng.integers(0, k, n)
    loss, dlogits, correct = be.softmax_cross_entropy(logits, labels)
    rloss, rdlogits, rcorrect = NAIVE.softmax_cross_entropy(logits, labels)
    assert dlogits.shape == rdlogits.shape == (n, k)
    np.testing.assert_allclose(float(loss), float(rloss), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dlogits, rdlogits, rtol=1e-10, atol=1e-15)
    assert int(correct) == int(rcorrect) == int(np.sum(logits.argmax(axis=1) == labels))
    # the gradient of the mean loss sums to zero over each row
    np.testing.assert_allclose(dlogits.sum(axis=1), 0.0, atol=1e-15)


@pytest.mark.parametrize("label", [3, -1])
def test_numba_rejects_a_label_outside_the_classes(label):
    """NumPy's fancy indexing would wrap -1 round to the last class; the kernel names it."""
    with pytest.raises(ValueError, match=rf"\[0, 3\)\. Received {label}"):
        NUMBA.softmax_cross_entropy(np.zeros((2, 3), np.float32), np.array([0, label]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_float32_equals_numpy_bit_for_bit(dtype):
    """The kernel does NumPy's arithmetic in float64 before the cast: float32 results agree
    bit for bit (float64 within rounding of the summation order)."""
    rng = np.random.default_rng(7)
    logits = (8 * rng.standard_normal((128, 10))).astype(dtype)
    labels = rng.integers(0, 10, 128)
    a, b = NUMBA.softmax_cross_entropy(logits, labels), NP.softmax_cross_entropy(logits, labels)
    assert int(a[2]) == int(b[2])
    if dtype == np.float32:
        assert float(a[0]) == float(b[0]) and np.array_equal(a[1], b[1])
    else:
        np.testing.assert_allclose(float(a[0]), float(b[0]), rtol=1e-14)
        np.testing.assert_allclose(a[1], b[1], rtol=1e-12, atol=1e-16)


def test_losses_module_dispatches_to_backend():
    logits = np.array([[0.0, 0.0]])
    loss, dlogits, correct = softmax_cross_entropy(logits, np.array([0]), NP)
    assert dlogits.shape == (1, 2)
    np.testing.assert_allclose(float(loss), math.log(2.0), rtol=1e-15)
