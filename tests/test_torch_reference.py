"""The PyTorch reference builds our network: its logits are our model's from the same weights
(float64), ``padding="same"`` included at stride 1 and 2 on odd and even inputs (our split is
TensorFlow's, the odd pixel bottom/right, which PyTorch's own ``padding="same"`` gives only at
stride 1), and the weights come back unchanged. Training is checked in
tests/test_study_measure.py (``fit_torch`` against ``fit``)."""
from __future__ import annotations

import numpy as np
import pytest

from cnn.model import Sequential

torch = pytest.importorskip("torch", reason="PyTorch is an optional extra "
                                            "(requirements-bench.txt)")

from cnn.reference.torch import build_torch_model, get_torch_weights  # noqa: E402


def _same_conv_model(size: int, kernel: int, stride: int) -> Sequential:
    spec = {"layers": [{"type": "conv2d", "filters": 3, "kernel_size": kernel, "stride": stride,
                        "padding": "same", "activation": "relu"},
                       {"type": "flatten"}, {"type": "dense", "units": 4}]}
    return Sequential.from_spec(spec, input_shape=(2, size, size), dtype=np.float64, seed=0)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("kernel", [2, 3])
def test_same_padding_gives_our_logits(stride, size, kernel):
    model = _same_conv_model(size, kernel, stride)
    conv = model.layers[0]
    assert conv.output_shape[1:] == (-(-size // stride),) * 2  # "same": ceil(H / stride)
    x = np.random.default_rng(size + kernel + stride).random((3, 2, size, size))
    with torch.no_grad():
        theirs = build_torch_model(model)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(theirs, model.predict_logits(x), rtol=1e-12, atol=1e-13)


def test_weights_come_back_unchanged():
    model = _same_conv_model(8, 3, 2)
    got = get_torch_weights(build_torch_model(model), model)
    assert got.keys() == model.params.keys()
    for k, v in model.params.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
