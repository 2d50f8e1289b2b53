"""B-DISTIL as stages: member 1 the student's graph, each later member a tier graph adding its
logits to the previous stage's; chained with ONNX Runtime they are the ensemble's stages, for
images and texts, with and without `connect`."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cascade_server.train.methods import build_ensemble
from cascade_server.train.stages.anytime import chain, member_costs, tier_name, write_members

CASES = {
    "image": ("mlp", (1, 8, 8), {"hidden": [6]}),
    "text": ("bag", (50, 12), {"dim": 4}),
}


def inputs(modality: str) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    rng = np.random.default_rng(0)
    if modality == "image":
        x = rng.normal(size=(7, 1, 8, 8)).astype(np.float32)
        return {"input": x}, torch.from_numpy(x)
    ids = rng.integers(1, 50, (7, 12))
    ids[:, 8:] = 0  # padding
    return {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)}, torch.from_numpy(ids)


@pytest.mark.parametrize("connect", [False, True])
@pytest.mark.parametrize("modality", ["image", "text"])
def test_the_chained_tiers_are_the_ensembles_stages(modality, connect, tmp_path):
    import onnxruntime as ort

    arch, in_shape, kwargs = CASES[modality]
    torch.manual_seed(0)
    ensemble = build_ensemble(arch, in_shape, 5, kwargs, 3, connect).eval()
    ensemble.etas.copy_(torch.tensor([0.7, 1.3, 0.4]))
    prep = SimpleNamespace(in_shape=in_shape, modality=modality)
    write_members(ensemble, prep, tmp_path, "student.onnx")
    files = ["student.onnx", *(f"{tier_name(k)}.onnx" for k in (1, 2))]
    sessions = [
        ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]) for f in files
    ]
    assert [i.name for i in sessions[1].get_inputs()][-1] == "prev_logits"
    feeds, x = inputs(modality)
    with torch.no_grad():
        expected = [s.numpy() for s in ensemble.stages(x)]
    for got, want in zip(chain(sessions, feeds), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_a_connected_member_costs_the_features_it_recomputes():
    arch, in_shape, kwargs = CASES["image"]
    prep = SimpleNamespace(in_shape=in_shape, modality="image")
    plain = member_costs(build_ensemble(arch, in_shape, 5, kwargs, 3, False), prep, 1000)
    connected = member_costs(build_ensemble(arch, in_shape, 5, kwargs, 3, True), prep, 1000)
    assert plain == pytest.approx([0.414] * 3)  # 64*6 + 6*5 MACs per member
    # Member 1 reads no one; later ones recompute member k-1's body (64*6) and read 12 features.
    assert connected == pytest.approx([0.414, 0.414 + 0.384 + 0.030, 0.414 + 0.384 + 0.030])
    assert member_costs(build_ensemble(arch, in_shape, 5, kwargs, 2, False), prep, None) == [0, 0]
