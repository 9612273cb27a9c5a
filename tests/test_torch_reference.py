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


def test_ddp_on_two_processes_is_sequential_sgd(tmp_path):
    """``fit_torch(distributed=True)``: two gloo processes, each on its half of every batch,
    end with the weights of our sequential SGD on the whole batches (float64), so the DDP peer
    of the benchmark computes what our ``mpi`` strategy computes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from ddp_checks import BATCH, N
    from parallel_helpers import OPT, blobs, build

    here = Path(__file__).resolve().parent

    out = tmp_path / "ddp.npz"
    init = f"file://{tmp_path / 'rendezvous'}"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(here / "ddp_checks.py"), str(rank), init,
                               str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for rank in (0, 1)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    x, y = blobs(N)
    ours = build()
    ours.fit(x, y, epochs=2, batch_size=BATCH, optimizer=OPT, seed=5, verbose=0)
    with np.load(out) as f:
        for k, v in ours.get_weights().items():
            np.testing.assert_allclose(f[k], v, rtol=1e-9, atol=1e-12, err_msg=k)
