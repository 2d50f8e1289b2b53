"""The device helper's contract, and the places that used to put CPU batches into a model on
another device, checked on PyTorch's `meta` device (shapes only, no data: no GPU needed)."""

import numpy as np
import torch

from cascade_server.train.device import chunked, device_of, to_device
from cascade_server.train.models import build, count_macs


def test_to_device_moves_numpy_and_tensors_and_device_of_follows_the_model():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert to_device(x, "cpu").device.type == "cpu"
    assert to_device(x, torch.device("meta")).device.type == "meta"
    assert to_device(torch.ones(2), "meta").device.type == "meta"
    model = build("mlp", (1, 8, 8), 10, hidden=(4,))
    assert device_of(model).type == "cpu"
    assert device_of(model.to("meta")).type == "meta"
    assert device_of(torch.nn.ReLU()).type == "cpu"


def test_chunked_equals_one_pass_and_returns_numpy():
    model = build("mlp", (1, 8, 8), 10, hidden=(4,)).eval()
    x = np.random.default_rng(0).normal(size=(1100, 1, 8, 8)).astype(np.float32)
    out = chunked(model, x, "cpu", batch_size=512)
    with torch.no_grad():
        whole = model(torch.from_numpy(x)).numpy()
    assert isinstance(out, np.ndarray) and out.shape == (1100, 10)
    np.testing.assert_allclose(out, whole, atol=1e-5)


def test_count_macs_runs_where_the_model_is():
    """Used to build its example input on the CPU whatever the model's device (the CUDA crash)."""
    model = build("cnn", (1, 8, 8), 10, width=8)
    on_cpu = count_macs(model, (1, 8, 8))
    assert count_macs(model.to("meta"), (1, 8, 8)) == on_cpu > 0
