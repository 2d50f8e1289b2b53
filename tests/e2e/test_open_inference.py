"""The cascade as an Open Inference Protocol model, called by Triton's own HTTP client over real
sockets (uvicorn, 2 workers, real Triton teacher): JSON and binary tensors, in and out."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from ..conftest import easy_and_hard, png_bytes
from .conftest import AUTH

pytestmark = pytest.mark.e2e
OUTPUTS = ("label", "class_id", "probability", "margin", "answered_by", "delegated", "degraded")


@pytest.fixture
def client(gateway):
    import tritonclient.http as httpclient

    c = httpclient.InferenceServerClient(gateway.url.removeprefix("http://"))
    yield c
    c.close()


def _infer(client, cascade, name, elements, binary):
    import tritonclient.http as httpclient

    inp = httpclient.InferInput(name, [len(elements)], "BYTES")
    inp.set_data_from_numpy(np.array(elements, dtype=object), binary_data=binary)
    outs = [httpclient.InferRequestedOutput(o, binary_data=binary) for o in OUTPUTS]
    outs.append(httpclient.InferRequestedOutput("probabilities", binary_data=binary))
    return client.infer(cascade, [inp], outputs=outs)


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_gets_the_same_answers_as_predict(gateway, client, demo, binary):
    from cascade_server.bundle import Bundle

    threshold = Bundle.load(demo.bundle).manifest.default_threshold
    with gateway.client() as c:
        c.delete("/admin/threshold?cascade=digits", headers=AUTH)
    easy, hard = easy_and_hard(demo, threshold, n=3)
    idx = easy + hard
    pngs = [png_bytes(demo.images[i]) for i in idx]
    elements = pngs if binary else [base64.b64encode(p) for p in pngs]
    result = _infer(client, "digits", "image", elements, binary)
    with gateway.client() as c:
        expected = c.post(
            "/predict", json={"inputs": [{"image": base64.b64encode(p).decode()} for p in pngs]}
        ).json()["outputs"]
    labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")]
    assert labels == [e["label"] for e in expected]
    assert result.as_numpy("class_id").tolist() == [e["class_id"] for e in expected]
    by = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("answered_by")]
    assert by == ["student"] * 3 + ["teacher"] * 3
    assert result.as_numpy("delegated").tolist() == [False] * 3 + [True] * 3
    np.testing.assert_allclose(
        result.as_numpy("margin"), [e["margin"] for e in expected], atol=1e-5
    )
    probs = result.as_numpy("probabilities")
    assert probs.shape == (6, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_text_cascade_over_binary_tensors(client, text_demo):
    texts = list(text_demo.texts[:4])
    result = _infer(client, "intents", "text", [t.encode() for t in texts], True)
    labels = [x.decode() for x in result.as_numpy("label")]
    assert len(labels) == 4
    assert all(label in set(_classes(text_demo)) for label in labels)


def _classes(text_demo):
    from cascade_server.bundle import Bundle

    return Bundle.load(text_demo.bundle).manifest.classes


def test_metadata_health_and_errors_in_the_protocols_shape(client):
    from tritonclient.utils import InferenceServerException

    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits")
    meta = client.get_model_metadata("digits")
    assert meta["inputs"][0]["datatype"] == "BYTES"
    assert {o["name"] for o in meta["outputs"]} >= set(OUTPUTS)
    with pytest.raises(InferenceServerException, match="no cascade 'nope'"):
        _infer(client, "nope", "image", [b"x"], True)
    with pytest.raises(InferenceServerException, match="not valid base64"):
        _infer(client, "digits", "image", ["%%%"], False)
    with pytest.raises(InferenceServerException, match="not a supported image"):
        _infer(client, "digits", "image", [b"not an image"], True)
