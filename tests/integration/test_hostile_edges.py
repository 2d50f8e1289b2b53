"""The hostile catalogue, second part: the edges a review and 314 hostile requests found
(issue 14): stalled multipart uploads, the Open Inference Protocol's parameter types, compressed
bodies, strict types, decode budgets, misleading messages. Each case failed before its fix."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import struct
import threading
import zlib

import pytest
from PIL import Image

from cascade_server.gateway.app import create_app
from cascade_server.settings import Settings

from ..conftest import b64, huge_png_header, png_bytes
from .conftest import FakeTeacher, serving_in_process

INFER = "/v2/models/digits/infer"


def _png(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size).save(buf, "PNG")
    return buf.getvalue()


def _err(r, status: int, fragment: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    message = body["error"]["message"] if isinstance(body["error"], dict) else body["error"]
    assert fragment in message, message


# 1. Stalled uploads hold no slot forever.
@pytest.mark.parametrize("stall", ["short_content_length", "no_last_chunk"])
def test_a_stalled_multipart_upload_is_cut_off_with_408(demo, tmp_path, stall):
    boundary = "xyz"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()

    async def stalled():
        yield head + _png()[:20]
        await asyncio.sleep(30)  # the rest never comes
        yield b""

    async def main():
        settings = Settings(bundles=[demo.bundle], state_dir=tmp_path, body_timeout_s=0.3)
        app = create_app(settings, teacher_factory=lambda s, b: FakeTeacher())
        headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
        if stall == "short_content_length":
            headers["content-length"] = "100000"
        async with serving_in_process(app) as client:
            loop = asyncio.get_running_loop()
            started = loop.time()
            r = await client.post("/predict", content=stalled(), headers=headers)
            took = loop.time() - started
            ok = await client.post("/predict", json={"image": b64(_png())})
            return r, took, ok, app.in_flight

    r, took, ok, in_flight = asyncio.run(main())
    assert r.status_code == 408, r.text
    assert "did not arrive within 0.3s" in r.json()["error"]["message"]
    assert took < 5  # cut off at the body timeout, not held
    assert ok.status_code == 200 and in_flight == 0  # the slot came back


# 3. The OIP route's parameters: every JSON type a client can send, none a 500.
_TENSOR = {"name": "image", "datatype": "BYTES", "shape": [1]}


def _infer(**changes):
    body = {"inputs": [{**_TENSOR, "data": [b64(_png())]}]}
    for path, value in changes.items():
        if path == "input_parameters":
            body["inputs"][0]["parameters"] = value
        elif path == "output":
            body["outputs"] = [value]
        else:
            body[path] = value
    return body


def test_oip_parameters_that_are_not_objects_are_422(gateway):
    with gateway() as (client, _):
        for bad in ([1], "x", 3, True):
            for body in (
                _infer(parameters=bad),
                _infer(input_parameters=bad),
                _infer(output={"name": "label", "parameters": bad}),
            ):
                _err(client.post(INFER, json=body), 422, "must be a JSON object")


def test_oip_request_options_of_the_wrong_type_are_422(gateway):
    """The OIP request's `parameters` carry the per-request options: a list, object or number
    where a string is expected used to escape as a TypeError (500)."""
    with gateway(overrides={"enabled": True, "allow_always": True}) as (client, _):
        for bad in (["always"], {"mode": "always"}, 1, True):
            r = client.post(INFER, json=_infer(parameters={"delegate": bad}))
            _err(r, 422, "delegate must be one of")
        for bad in ([0.5], {"t": 0.5}, True):
            r = client.post(INFER, json=_infer(parameters={"threshold": bad}))
            _err(r, 422, "threshold must be a number")
        ok = client.post(INFER, json=_infer(parameters={"delegate": "always"}))
        assert ok.status_code == 200, ok.text
        outputs = {o["name"]: o["data"] for o in ok.json()["outputs"]}
        assert outputs["delegated"] == [True] and outputs["answered_by"] == ["teacher"]


def test_oip_an_output_name_that_is_not_a_string_is_422(gateway):
    with gateway() as (client, _):
        for name in (["label"], {"label": 1}, None, 5):
            _err(client.post(INFER, json=_infer(output={"name": name})), 422, "unknown output")


def test_oip_binary_flags_are_booleans_only(gateway):
    """`"false"` used to count as true (a non-empty string)."""
    with gateway() as (client, _):
        for value in ("false", "true", 0, 1, None):
            r = client.post(INFER, json=_infer(parameters={"binary_data_output": value}))
            _err(r, 422, "binary_data_output must be true or false")
            body = _infer(output={"name": "label", "parameters": {"binary_data": value}})
            _err(client.post(INFER, json=body), 422, "binary_data must be true or false")
        ok = client.post(INFER, json=_infer(parameters={"binary_data_output": False}))
        assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"


def test_oip_nested_data_must_match_the_shape(gateway):
    image = b64(_png())
    with gateway() as (client, _):
        wrong = {"inputs": [{**_TENSOR, "shape": [2, 1], "data": [[image, image]]}]}
        _err(client.post(INFER, json=wrong), 422, "nested as 1 rows")
        right = {"inputs": [{**_TENSOR, "shape": [2, 1], "data": [[image], [image]]}]}
        r = client.post(INFER, json=right)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["shape"] == [2]


def _binary_body(header: dict, binary: bytes) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + binary, {
        "inference-header-content-length": str(len(head)),
        "content-type": "application/octet-stream",
    }


def test_oip_a_binary_section_nobody_declared_is_refused(gateway):
    raw = _png()
    tensor = struct.pack("<I", len(raw)) + raw
    body, headers = _binary_body({"inputs": [{**_TENSOR, "data": [b64(raw)]}]}, tensor)
    with gateway() as (client, _):
        _err(client.post(INFER, content=body, headers=headers), 422, "declares no binary_data_size")


def test_oip_extra_bytes_after_a_binary_tensor_are_named_as_such(gateway):
    raw = _png()
    tensor = struct.pack("<I", len(raw)) + raw + b"trailing"
    header = {"inputs": [{**_TENSOR, "parameters": {"binary_data_size": len(tensor)}}]}
    body, headers = _binary_body(header, tensor)
    with gateway() as (client, _):
        r = client.post(INFER, content=body, headers=headers)
        _err(r, 422, "has 8 bytes after the 1 elements its shape says")
        assert "truncated" not in r.text


def test_oip_get_on_infer_is_405(gateway):
    with gateway() as (client, _):
        r = client.get(INFER)
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert client.get("/v2/models/digits").status_code == 200  # metadata is still GET


# 7. Compressed bodies.
def test_a_compressed_body_is_refused_by_name(gateway):
    raw = json.dumps({"image": b64(_png())}).encode()
    with gateway() as (client, _):
        for encoding in ("gzip", "br", "deflate"):
            body = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
            headers = {"content-type": "application/json", "content-encoding": encoding}
            _err(client.post("/predict", content=body, headers=headers), 415, "Content-Encoding")
            _err(client.post(INFER, content=body, headers=headers), 415, "Content-Encoding")
            r = client.put("/admin/threshold", content=body, headers=headers)
            _err(r, 415, f"Content-Encoding {encoding!r}")
        identity = {"content-type": "application/json", "content-encoding": "identity"}
        assert client.post("/predict", content=raw, headers=identity).status_code == 200


# 8. Strict types, and no silent winner between body and query.
def test_json_top_k_must_be_a_positive_integer(gateway):
    with gateway() as (client, _):
        for top_k in (True, "2", 2.0, 0, -1):
            r = client.post("/predict", json={"image": b64(_png()), "top_k": top_k})
            _err(r, 422, "top_k")


def test_cascade_and_top_k_in_body_and_query_must_agree(gateway):
    payload = {"image": b64(_png()), "cascade": "digits", "top_k": 2}
    with gateway() as (client, _):
        assert client.post("/predict?cascade=digits&top_k=2", json=payload).status_code == 200
        _err(client.post("/predict?cascade=other", json=payload), 422, "differ")
        _err(client.post("/predict?top_k=3", json=payload), 422, "differ")
        files = {"file": ("a.png", _png(), "image/png")}
        r = client.post("/predict?cascade=other", files=files, data={"cascade": "digits"})
        _err(r, 422, "differ")


# 9. Messages that say what is wrong.
def test_a_multipart_file_part_without_a_filename_says_so(gateway):
    with gateway() as (client, _):
        r = client.post("/predict", files={"file": (None, _png())})
        _err(r, 422, "must be a file upload (a part with a filename)")


def test_a_top_k_sent_as_a_file_is_named_not_dumped(gateway):
    files = {"file": ("a.png", _png(), "image/png"), "top_k": ("k.txt", b"2", "text/plain")}
    with gateway() as (client, _):
        r = client.post("/predict", files=files)
        _err(r, 422, "top_k must be a plain form field")
        assert "UploadFile" not in r.text


def test_a_huge_image_header_quotes_the_gateways_limit(gateway):
    png = huge_png_header()
    with gateway() as (client, _):
        r = client.post("/predict", json={"image": b64(png)})
        _err(r, 413, "the limit (CASCADE_MAX_IMAGE_PIXELS) is 16777216")


# 5. Decode budgets.
def _progressive_bomb(scans: int) -> bytes:
    import numpy as np

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    last, end = data.rindex(b"\xff\xda"), data.rindex(b"\xff\xd9")
    return data[:end] + data[last:end] * scans + data[end:]


def test_a_progressive_jpeg_scan_bomb_is_413_and_named(gateway):
    with gateway() as (client, teacher):
        r = client.post("/predict", json={"image": b64(_progressive_bomb(500))})
        _err(r, 413, "scans; the limit (CASCADE_MAX_JPEG_SCANS) is 64")
        assert teacher.calls == []
        assert client.post("/predict", json={"image": b64(_progressive_bomb(2))}).status_code == 200


def test_few_bytes_of_many_pixels_are_decoded_off_the_event_loop(gateway, monkeypatch):
    """A 600x600 PNG is a few hundred bytes (under the inline byte limit) but 360,000 pixels:
    the pixel count, read from the header, sends it to a decode thread."""
    from cascade_server.preprocess import ImagePreprocessor

    threads: list[str] = []
    load = ImagePreprocessor.load

    def spy(self, img):
        threads.append(threading.current_thread().name)
        return load(self, img)

    monkeypatch.setattr(ImagePreprocessor, "load", spy)
    wide = _png((600, 600))
    assert len(wide) < 64 * 1024
    with gateway() as (client, _):
        assert client.post("/predict", json={"image": b64(_png())}).status_code == 200
        assert client.post("/predict", json={"image": b64(wide)}).status_code == 200
    assert not threads[-2].startswith("digits-decode")  # small: inline
    assert threads[-1].startswith("digits-decode")  # many pixels: on a decode thread


def test_a_batch_of_real_digits_answers_the_same_inline_and_threaded(gateway, demo):
    payload = {"inputs": [{"image": b64(png_bytes(demo.images[i]))} for i in range(4)]}
    with gateway() as (client, _):
        inline = client.post("/predict", json=payload).json()["outputs"]
    with gateway(decode_inline_pixels=0) as (client, _):
        threaded = client.post("/predict", json=payload).json()["outputs"]
    assert [o["margin"] for o in inline] == [o["margin"] for o in threaded]
