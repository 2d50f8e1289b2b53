import pytest
import torch

from cascade_server.train.models import ARCHITECTURES, build, count_macs, count_parameters

TEXT = {"bag", "textcnn", "transformer"}


@pytest.mark.parametrize("name", sorted(set(ARCHITECTURES.names()) - TEXT))
def test_every_image_architecture_classifies_and_exposes_features(name):
    model = build(name, (1, 16, 16), 7)
    x = torch.zeros(3, 1, 16, 16)
    assert model(x).shape == (3, 7)
    assert model.features(x).shape == (3, model.feature_dim)
    assert count_parameters(model) > 0 and count_macs(model, (1, 16, 16)) > 0


def test_macs_of_an_mlp_are_its_weight_count():
    model = build("mlp", (1, 8, 8), 10, hidden=[32])
    assert count_macs(model, (1, 8, 8)) == 64 * 32 + 32 * 10


def test_resnet10_family_grows_s_m_l_about_4x_each():
    macs = {s: count_macs(build(f"resnet10_{s}", (3, 32, 32), 100), (3, 32, 32)) for s in "sml"}
    assert 3 < macs["m"] / macs["s"] < 5 and 3 < macs["l"] / macs["m"] < 5
    # The paper's sizes: about 4M, 16M, 64M MACs on 32x32 inputs.
    assert 2e6 < macs["s"] < 8e6 and 40e6 < macs["l"] < 100e6


def test_cifar_resnets_deepen():
    params = [count_parameters(build(f"resnet{d}", (3, 32, 32), 10)) for d in (8, 20, 32, 56)]
    assert params == sorted(params)


@pytest.mark.parametrize("name", sorted(TEXT))
def test_every_text_architecture_classifies_token_ids(name):
    model = build(name, (100, 12), 7)
    ids = torch.randint(1, 100, (3, 12))
    ids[:, 8:] = 0
    assert model(ids).shape == (3, 7)
    assert model.features(ids).shape == (3, model.feature_dim)
    # Padding is ignored: the same tokens with more padding give the same logits.
    longer = torch.zeros(3, 12, dtype=torch.long)
    longer[:, :8] = ids[:, :8]
    torch.testing.assert_close(model.eval()(ids), model(longer))
    assert count_macs(model, (100, 12), "text") > 0
