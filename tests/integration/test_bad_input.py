"""Every bad input gets a 4xx with a message that says what is wrong; nothing is half-applied."""

import io

import pytest
from PIL import Image

from ..conftest import b64, png_bytes
from .test_predict import metric

BIG = io.BytesIO()
Image.new("L", (300, 300)).save(BIG, "PNG")


def err(r, status: int, fragment: str) -> None:
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert fragment in message, message


@pytest.mark.parametrize(
    ("kwargs", "status", "fragment"),
    [
        (
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            "not valid JSON",
        ),
        ({"content": b"", "headers": {"content-type": "application/json"}}, 400, "body is empty"),
        ({"json": [1, 2]}, 422, "must be a JSON object"),
        ({"json": {}}, 422, "exactly one of `image`"),
        ({"json": {"imag": "abc"}}, 422, "imag: Extra inputs are not permitted"),
        ({"json": {"image": 5}}, 422, "image: Input should be a valid string"),
        ({"json": {"image": "%%%not base64%%%"}}, 422, "image is not valid base64"),
        ({"json": {"image": b64(b"plain text, not pixels")}}, 422, "not a supported image"),
        ({"json": {"image": ""}}, 422, "image is empty"),
        ({"json": {"image": b64(BIG.getvalue())}}, 413, "300x300 = 90000 pixels"),
        ({"json": {"inputs": []}}, 422, "inputs is empty"),
        ({"json": {"inputs": [{"image": "x"}] * 9}}, 413, "batch of 9 inputs; the limit is 8"),
        ({"json": {"inputs": [{"text": "hello"}]}}, 422, "no cascade serves text input"),
        (
            {"json": {"inputs": [{"text": "a", "image": "b"}]}},
            422,
            "exactly one of `image` and `text`",
        ),
        ({"json": {"inputs": [{"text": "a"}, {"image": "b"}]}}, 422, "mixes images and texts"),
        ({"json": {"text": "hi", "cascade": "digits"}}, 422, "takes image, not text"),
        ({"json": {"image": "x", "inputs": [{"image": "x"}]}}, 422, "exactly one of"),
        ({"json": {"image": "x", "top_k": 0}}, 422, "top_k"),
        (
            {"json": {"image": b64(BIG.getvalue()), "cascade": "nope"}},
            404,
            "no cascade 'nope'; serving: digits",
        ),
        (
            {"content": b"<a/>", "headers": {"content-type": "application/xml"}},
            415,
            "application/xml",
        ),
        ({"files": {"other": ("a.png", b"x", "image/png")}}, 422, "no `file` field"),
        (
            {"content": b"--xx\r\nbroken", "headers": {"content-type": "multipart/form-data"}},
            400,
            "multipart",
        ),
    ],
)
def test_bad_input(gateway, kwargs, status, fragment):
    with gateway(max_batch=8, max_image_pixels=50_000) as (client, _):
        err(client.post("/predict", **kwargs), status, fragment)
        assert metric(client, "cascade_requests_total", status="rejected") >= 1


def test_query_top_k_must_be_an_integer(gateway, demo):
    with gateway() as (client, _):
        err(
            client.post(
                "/predict?top_k=many",
                content=png_bytes(demo.images[0]),
                headers={"content-type": "image/png"},
            ),
            422,
            "top_k must be an integer",
        )


def test_body_over_the_byte_limit_is_413_declared_or_streamed(gateway):
    with gateway(max_body_bytes=1000) as (client, _):
        err(client.post("/predict", json={"image": "A" * 2000}), 413, "limit of 1000 bytes")

        def chunks():  # no content-length: the limit is enforced while streaming
            for _ in range(10):
                yield b"A" * 500

        err(
            client.post("/predict", content=chunks(), headers={"content-type": "image/png"}),
            413,
            "limit of 1000 bytes",
        )


def test_a_bad_item_rejects_the_whole_batch_before_any_model_runs(gateway, demo):
    good = b64(png_bytes(demo.images[0]))
    with gateway() as (client, teacher):
        r = client.post("/predict", json={"inputs": [{"image": good}, {"image": b64(b"junk")}]})
        err(r, 422, "inputs[1]")
        assert metric(client, "cascade_items_total", outcome="confident") == 0
        assert metric(client, "cascade_student_margin_count") == 0
        assert teacher.calls == []


def test_a_worker_survives_a_stream_of_garbage(gateway, demo):
    with gateway() as (client, _):
        for blob in (b"\x00" * 100, b"\x89PNG\r\n\x1a\n" + b"\xff" * 50, b"GIF89a" + b"\x00" * 20):
            assert client.post("/predict", json={"image": b64(blob)}).status_code == 422
        assert client.post("/predict", json={"image": b64(png_bytes(demo.images[0]))}).is_success
