"""Cross-request micro-batching through the app: concurrent requests share one student call and
one teacher call, answers stay per request and in order, and equal the unbatched answers."""

import asyncio

import numpy as np
import pytest

from cascade_server.bundle import Bundle
from cascade_server.gateway.app import create_app
from cascade_server.settings import Settings

from ..conftest import b64, easy_and_hard, png_bytes
from .conftest import TOKEN, FakeTeacher, serving_in_process
from .test_predict import metric_in


def settings(demo, tmp_path, **batching):
    return Settings(
        bundles=[demo.bundle],
        state_dir=tmp_path / "state",
        admin_token=TOKEN,
        batching=batching,
    )


async def _fire(demo, tmp_path, payloads, teacher=None, **batching):
    teacher = teacher or FakeTeacher()
    app = create_app(settings(demo, tmp_path, **batching), teacher_factory=lambda s, b: teacher)
    async with serving_in_process(app) as client:
        responses = await asyncio.gather(*(client.post("/predict", json=p) for p in payloads))
        metrics = (await client.get("/metrics")).text
    return responses, teacher, metrics


def test_n_concurrent_requests_form_one_student_batch_of_n(demo, tmp_path):
    idx = list(range(12))
    payloads = [{"image": b64(png_bytes(demo.images[i]))} for i in idx]
    responses, _, text = asyncio.run(_fire(demo, tmp_path, payloads, max_items=12, max_wait_s=0.1))
    assert all(r.status_code == 200 for r in responses)
    assert metric_in(text, "cascade_batch_size_count", model="student") == 1
    assert metric_in(text, "cascade_batch_size_sum", model="student") == 12
    # each request got its own answer: the label of its own image
    labels = [r.json()["label"] for r in responses]
    single = [int(x) for x in labels]
    assert np.mean(np.array(single) == demo.labels[idx]) > 0.8


def test_delegated_items_of_concurrent_requests_go_to_the_teacher_in_one_call(demo, tmp_path):
    threshold = Bundle.load(demo.bundle).manifest.default_threshold
    easy, hard = easy_and_hard(demo, threshold, n=4)
    order = [easy[0], hard[0], easy[1], hard[1], hard[2], easy[2], hard[3], easy[3]]
    payloads = [{"image": b64(png_bytes(demo.images[i]))} for i in order]
    teacher = FakeTeacher(answer=4)
    responses, teacher, _ = asyncio.run(
        _fire(demo, tmp_path, payloads, teacher, max_items=8, max_wait_s=0.1)
    )
    assert teacher.calls == [4]
    by = [r.json()["answered_by"] for r in responses]
    assert by == ["teacher" if i in hard else "student" for i in order]
    pairs = list(zip(responses, order, strict=True))
    assert all(r.json()["label"] == "4" for r, i in pairs if i in hard)
    # requests with nothing delegated do not wait for the teacher
    assert all(r.json()["timings_ms"]["teacher"] == 0 for r, i in pairs if i in easy)


def test_batched_and_unbatched_answers_are_the_same(demo, tmp_path):
    idx = list(range(0, 400, 7))
    payloads = [{"image": b64(png_bytes(demo.images[i]))} for i in idx]
    payloads.append({"inputs": payloads[0:3] + payloads[10:12]})  # a batch request among them
    batched, _, text = asyncio.run(_fire(demo, tmp_path / "a", payloads, max_items=256))
    single, _, _ = asyncio.run(_fire(demo, tmp_path / "b", payloads, max_items=1))
    assert metric_in(text, "cascade_batch_size_count", model="student") < len(payloads)

    def answers(responses):
        out = []
        for r in responses:
            body = r.json()
            out += body["outputs"] if "outputs" in body else [body]
        return out

    a, b = answers(batched), answers(single)
    assert len(a) == len(b) == len(idx) + 5
    assert [x["label"] for x in a] == [x["label"] for x in b]
    assert [x["answered_by"] for x in a] == [x["answered_by"] for x in b]
    assert [x["delegated"] for x in a] == [x["delegated"] for x in b]
    assert [x["margin"] for x in a] == pytest.approx([x["margin"] for x in b], abs=1e-6)


def test_one_bad_request_is_refused_alone_when_requests_are_batched(demo, tmp_path):
    good = {"image": b64(png_bytes(demo.images[0]))}
    bad = {"image": b64(b"definitely not a png")}
    batch_with_bad = {"inputs": [good, bad]}
    responses, _, text = asyncio.run(
        _fire(demo, tmp_path, [good, bad, good, batch_with_bad, good], max_items=8, max_wait_s=0.05)
    )
    assert [r.status_code for r in responses] == [200, 422, 200, 422, 200]
    assert "inputs[1]" in responses[3].json()["error"]["message"]
    assert (
        metric_in(text, "cascade_items_total", outcome="confident")
        + metric_in(text, "cascade_items_total", outcome="delegated")
        == 3
    )
    assert metric_in(text, "cascade_requests_total", status="rejected") == 2
