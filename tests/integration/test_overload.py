"""Faults and overload through the app: the circuit breaker, the bound on teacher calls in
flight, and load shedding with 503 + Retry-After."""

import asyncio

import numpy as np

from cascade_server.bundle import Bundle
from cascade_server.errors import TeacherUnavailable
from cascade_server.gateway.app import create_app
from cascade_server.settings import Settings

from ..conftest import b64, easy_and_hard, png_bytes
from .conftest import TOKEN, FakeTeacher, serving_in_process
from .test_predict import metric, metric_in


class SlowTeacher(FakeTeacher):
    """Answers after `delay_s` (or times out, as a hung Triton does, when `hang`)."""

    def __init__(self, delay_s: float = 0.2, hang: bool = False) -> None:
        super().__init__()
        self.delay_s, self.hang = delay_s, hang

    async def infer(self, feeds, headers=None, priority=None):
        self.calls.append(len(next(iter(feeds.values()))))
        await asyncio.sleep(self.delay_s)
        if self.hang:
            raise TeacherUnavailable("timeout", "no answer within the deadline")
        logits = np.zeros((self.calls[-1], self.n_classes), np.float32)
        logits[:, self.answer] = 8.0
        return logits


def _hard(demo, n):
    threshold = Bundle.load(demo.bundle).manifest.default_threshold
    _, hard = easy_and_hard(demo, threshold, n=n)
    return [{"image": b64(png_bytes(demo.images[i]))} for i in hard]


def test_circuit_opens_after_failures_then_answers_degraded_without_calling(gateway, demo):
    hard = _hard(demo, 1)[0]
    breaker = {"failures": 3, "open_s": 60}
    with gateway(teacher_breaker=breaker) as (client, teacher):
        teacher.fail = "unavailable"
        for _ in range(3):
            assert client.post("/predict", json=hard).json()["degraded"] is True
        assert len(teacher.calls) == 3
        teacher.fail = None  # healthy again, but the circuit is open for 60 s
        for _ in range(5):
            body = client.post("/predict", json=hard).json()
            assert (body["answered_by"], body["degraded"]) == ("student", True)
            assert body["outcome"] == "circuit_open"
        assert len(teacher.calls) == 3
        assert metric(client, "cascade_items_total", outcome="circuit_open") == 5
        assert metric(client, "cascade_items_total", outcome="teacher_failed") == 3
        assert metric(client, "cascade_teacher_errors_total", kind="unavailable") == 3
        assert metric(client, "cascade_teacher_circuit_state", cascade="digits") == 2
        assert metric(client, "cascade_teacher_circuit_transitions_total", to="open") == 1


def test_half_open_probe_closes_the_circuit(gateway, demo):
    hard = _hard(demo, 1)[0]
    with gateway(teacher_breaker={"failures": 1, "open_s": 0.05}) as (client, teacher):
        teacher.fail = "timeout"
        client.post("/predict", json=hard)
        teacher.fail = None
        asyncio.run(asyncio.sleep(0.1))
        body = client.post("/predict", json=hard).json()
        assert body["answered_by"] == "teacher"
        assert metric(client, "cascade_teacher_circuit_state", cascade="digits") == 0
        assert metric(client, "cascade_teacher_circuit_transitions_total", to="closed") == 1


def _settings(demo, tmp_path, **overrides):
    return Settings(
        bundles=[demo.bundle], state_dir=tmp_path / "state", admin_token=TOKEN, **overrides
    )


def test_teacher_calls_in_flight_are_bounded(demo, tmp_path):
    """With one call allowed in flight, a second batch's delegated items do not queue behind
    a slow teacher: the student answers them at once, as `teacher_busy` (not degraded: the
    teacher did not fail, the gateway's own bound chose)."""
    hard = _hard(demo, 2)
    teacher = SlowTeacher(delay_s=0.3)

    async def main():
        app = create_app(
            _settings(demo, tmp_path, teacher_max_in_flight=1), teacher_factory=lambda s, b: teacher
        )
        async with serving_in_process(app) as client:
            first = asyncio.create_task(client.post("/predict", json=hard[0]))
            await asyncio.sleep(0.05)  # the first call is in flight
            started = asyncio.get_running_loop().time()
            second = await client.post("/predict", json=hard[1])
            waited = asyncio.get_running_loop().time() - started
            return (await first).json(), second.json(), waited, (await client.get("/metrics")).text

    first, second, waited, text = asyncio.run(main())
    assert first["answered_by"] == "teacher"
    assert (second["answered_by"], second["degraded"]) == ("student", False)
    assert (second["outcome"], second["delegated"]) == ("teacher_busy", True)
    assert waited < 0.25  # not behind the 0.3 s call
    assert metric_in(text, "cascade_items_total", outcome="teacher_busy") == 1
    assert metric_in(text, "cascade_teacher_errors_total") == 0


def test_overload_is_refused_with_503_and_retry_after(demo, tmp_path):
    hard = _hard(demo, 1)[0]
    teacher = SlowTeacher(delay_s=0.3)

    async def main():
        app = create_app(
            _settings(demo, tmp_path, max_in_flight=4), teacher_factory=lambda s, b: teacher
        )
        async with serving_in_process(app) as client:
            responses = await asyncio.gather(
                *(client.post("/predict", json=hard) for _ in range(10))
            )
            after = await client.post("/predict", json=hard)
            return responses, after, (await client.get("/metrics")).text

    responses, after, text = asyncio.run(main())
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 4 + [503] * 6
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "overloaded"
    assert after.status_code == 200  # capacity is back once the burst is answered
    assert metric_in(text, "cascade_requests_total", status="shed") == 6


def test_a_teacher_answering_the_wrong_shape_degrades_not_500(gateway, demo):
    hard = _hard(demo, 1)[0]
    with gateway() as (client, teacher):
        teacher.n_classes = 7  # a teacher for another label set
        r = client.post("/predict", json=hard)
        assert r.status_code == 200
        assert (r.json()["answered_by"], r.json()["degraded"]) == ("student", True)
        assert metric(client, "cascade_teacher_errors_total", kind="error") == 1
