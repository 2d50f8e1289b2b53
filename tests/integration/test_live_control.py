"""Holding the cascade's promise live, through the app: answers for a fixed threshold equal an
offline reference, the policy's three modes through the admin API, the controller moving an
online policy on live traffic, load-aware delegation (lowest margins first, the accuracy
floor), per-request options within their limits, shadow samples that never delay an answer,
and what the cascade saved."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cascade_server.bundle import Bundle
from cascade_server.gateway.app import create_app
from cascade_server.settings import Settings

from ..conftest import b64, easy_and_hard, png_bytes, student_margins
from .conftest import AUTH, TOKEN, FakeTeacher, serving_in_process
from .test_overload import SlowTeacher
from .test_predict import metric, metric_in


def _payload(demo, i):
    return {"image": b64(png_bytes(demo.images[i]))}


async def eventually(probe, timeout_s: float = 15.0):
    """Polls `probe` (an async callable) until it returns something truthy: what the
    controller's steps or the shadow calls do in the background, waited for without guessing
    a sleep."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        found = await probe()
        if found or asyncio.get_running_loop().time() > deadline:
            return found
        await asyncio.sleep(0.02)


def _settings(demo, tmp_path, **overrides):
    return Settings(
        bundles=[demo.bundle], state_dir=tmp_path / "state", admin_token=TOKEN, **overrides
    )


@pytest.mark.parametrize("batched", [False, True])
def test_a_fixed_threshold_answers_as_the_offline_rule_says(gateway, demo, batched):
    """The re-cut path changes no answer: labels, margins, who answered, for 120 digits, one
    by one and in batches of 8, equal the rule applied outside the gateway."""
    import onnxruntime as ort

    from cascade_server.policy import softmax
    from cascade_server.preprocess import normalize

    bundle = Bundle.load(demo.bundle)
    threshold = bundle.manifest.default_threshold
    margins = student_margins(demo)[:120]
    session = ort.InferenceSession(str(bundle.student_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(
        None, {"input": normalize(demo.images[:120], bundle.manifest.preprocess)}
    )
    student_labels = softmax(logits).argmax(1)
    teacher_label = 3  # the FakeTeacher's answer
    expected_by = np.where(margins < threshold, "teacher", "student")
    expected_label = np.where(margins < threshold, teacher_label, student_labels)
    with gateway() as (client, _):
        outs = []
        if batched:
            for start in range(0, 120, 8):
                body = {"inputs": [_payload(demo, i) for i in range(start, start + 8)]}
                outs += client.post("/predict", json=body).json()["outputs"]
        else:
            outs = [client.post("/predict", json=_payload(demo, i)).json() for i in range(120)]
    assert [o["answered_by"] for o in outs] == expected_by.tolist()
    assert [o["class_id"] for o in outs] == expected_label.tolist()
    assert [o["margin"] for o in outs] == pytest.approx(margins.tolist(), abs=1e-6)
    assert {o["outcome"] for o in outs} == {"confident", "delegated"}


def test_the_three_modes_through_the_admin_api(gateway, demo):
    calibration = Bundle.load(demo.bundle).manifest.calibration
    with gateway() as (client, _):
        r = client.put("/admin/threshold", json={"max_student_error": 0.2}, headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["mode"] == "max_student_error"
        assert body["threshold"] == pytest.approx(calibration.threshold_for_student_error(0.2))
        r = client.put("/admin/threshold", json={"max_student_error": 0.0001}, headers=AUTH)
        assert r.status_code == 422 and "the best it can do is" in r.json()["error"]["message"]
        assert client.get("/admin/threshold", headers=AUTH).json()["mode"] == "max_student_error"
        bounds = {"target_delegation_rate": 0.3, "min_threshold": 0.1, "max_threshold": 0.9}
        body = client.put("/admin/threshold", json=bounds, headers=AUTH).json()
        assert (body["mode"], body["min_threshold"], body["max_threshold"]) == (
            "target_delegation_rate",
            0.1,
            0.9,
        )
        assert body["threshold"] == pytest.approx(
            min(max(calibration.threshold_for_rate(0.3), 0.1), 0.9)
        )
        assert "window" in body and "threshold_in_force" in body
        bad = {"threshold": 0.5, "max_student_error": 0.1}
        assert client.put("/admin/threshold", json=bad, headers=AUTH).status_code == 422
        upside_down = {"target_delegation_rate": 0.3, "min_threshold": 0.8, "max_threshold": 0.2}
        assert client.put("/admin/threshold", json=upside_down, headers=AUTH).status_code == 422


def test_the_controller_holds_a_target_rate_on_live_traffic(demo, tmp_path):
    """Target 50% on the digits (calibrated for 20%): live traffic moves the threshold in force
    to the traffic's own median margin, and the window's delegation comes to the target."""
    margins = student_margins(demo)
    payloads = [_payload(demo, i) for i in range(400)]
    median = float(np.quantile(margins[:400], 0.5))

    async def main():
        settings = _settings(
            demo, tmp_path, controller={"interval_s": 0.05, "min_items": 50, "max_step": 0.5}
        )
        app = create_app(settings, teacher_factory=lambda s, b: FakeTeacher())
        async with serving_in_process(app) as client:
            r = await client.put(
                "/admin/threshold", json={"target_delegation_rate": 0.5}, headers=AUTH
            )
            start = r.json()["threshold"]
            for _ in range(3):
                await asyncio.gather(*(client.post("/predict", json=p) for p in payloads))

            async def settled():
                state = (await client.get("/admin/threshold", headers=AUTH)).json()
                moved = abs(state["threshold_in_force"] - median) < 0.03
                return state if moved and state["controller"] else None

            state = (
                await eventually(settled)
                or (await client.get("/admin/threshold", headers=AUTH)).json()
            )
            text = (await client.get("/metrics")).text
            return start, state, text

    start, state, text = asyncio.run(main())
    assert state["threshold"] == start  # the policy's own start is unchanged ...
    assert state["threshold_in_force"] == pytest.approx(median, abs=0.03)  # ... it was moved
    assert state["controller"]["reason"].startswith(("margin quantile", "delegation within"))
    assert metric_in(text, "cascade_controller_moves_total") >= 1
    assert metric_in(text, "cascade_threshold_changes_total") == 1  # moves are not audited
    assert metric_in(text, "cascade_threshold") == pytest.approx(median, abs=0.03)


def test_load_aware_delegation_sends_the_lowest_margins_first(demo, tmp_path):
    threshold = Bundle.load(demo.bundle).manifest.default_threshold
    margins = student_margins(demo)
    _, hard = easy_and_hard(demo, threshold, n=6)
    teacher = SlowTeacher(delay_s=0.05)

    async def main():
        settings = _settings(demo, tmp_path, load={"max_items_in_flight": 2})
        app = create_app(settings, teacher_factory=lambda s, b: teacher)
        async with serving_in_process(app) as client:
            r = await client.post("/predict", json={"inputs": [_payload(demo, i) for i in hard]})
            return r.json()["outputs"]

    outs = asyncio.run(main())
    sent = [i for i, o in zip(hard, outs, strict=True) if o["answered_by"] == "teacher"]
    kept = [i for i, o in zip(hard, outs, strict=True) if o["outcome"] == "teacher_busy"]
    assert len(sent) == 2 and len(kept) == 4 and teacher.calls == [2]
    assert max(margins[sent]) <= min(margins[kept])  # the two least sure went
    assert not any(o["degraded"] for o in outs)


def test_below_the_accuracy_floor_a_saturated_teacher_means_503(demo, tmp_path):
    threshold = Bundle.load(demo.bundle).manifest.default_threshold
    _, hard = easy_and_hard(demo, threshold, n=3)
    teacher = SlowTeacher(delay_s=0.3)

    async def main():
        settings = _settings(
            demo, tmp_path, load={"max_items_in_flight": 1, "accuracy_floor": 0.99}
        )
        app = create_app(settings, teacher_factory=lambda s, b: teacher)
        async with serving_in_process(app) as client:
            first = asyncio.create_task(client.post("/predict", json=_payload(demo, hard[0])))

            async def taken():  # the teacher's one item of room
                return teacher.calls

            await eventually(taken)
            second = await client.post("/predict", json=_payload(demo, hard[1]))
            return (await first), second, (await client.get("/metrics")).text

    first, second, text = asyncio.run(main())
    assert first.status_code == 200 and first.json()["answered_by"] == "teacher"
    assert second.status_code == 503 and second.headers["retry-after"] == "1"
    assert "accuracy floor" in second.json()["error"]["message"]
    assert metric_in(text, "cascade_requests_total", status="shed") == 1


def test_request_options_are_off_unless_enabled_and_kept_within_limits(gateway, demo):
    threshold = Bundle.load(demo.bundle).manifest.default_threshold
    easy, hard = easy_and_hard(demo, threshold, n=1)
    with gateway() as (client, _):
        r = client.post("/predict", json={**_payload(demo, hard[0]), "delegate": "never"})
        assert r.status_code == 422 and "not enabled" in r.json()["error"]["message"]
    overrides = {"enabled": True, "min_threshold": 0.1, "max_threshold": 0.9}
    with gateway(overrides=overrides) as (client, teacher):
        r = client.post("/predict", json={**_payload(demo, hard[0]), "delegate": "never"})
        body = r.json()
        assert (body["outcome"], body["answered_by"], body["delegated"]) == (
            "forced_student",
            "student",
            False,
        )
        assert teacher.calls == []
        r = client.post("/predict?delegate=always", json=_payload(demo, easy[0]))
        assert r.status_code == 422 and "not allowed" in r.json()["error"]["message"]
        r = client.post("/predict", json={**_payload(demo, easy[0]), "threshold": 0.95})
        assert r.status_code == 422 and "outside the allowed" in r.json()["error"]["message"]
        r = client.post("/predict", json={**_payload(demo, hard[0]), "threshold": 0.1})
        body = r.json()  # its own threshold: below its margin, so the student answers
        assert body["threshold"] == 0.1
        assert body["answered_by"] == ("student" if body["margin"] >= 0.1 else "teacher")
        r = client.post("/predict", json={**_payload(demo, easy[0]), "delegate": "sometimes"})
        assert r.status_code == 422
        assert metric(client, "cascade_overrides_total", kind="delegate_never") == 1
        assert metric(client, "cascade_overrides_total", kind="threshold") == 1


def test_a_deadline_shorter_than_the_teachers_p95_skips_it(demo, tmp_path):
    threshold = Bundle.load(demo.bundle).manifest.default_threshold
    _, hard = easy_and_hard(demo, threshold, n=1)
    teacher = SlowTeacher(delay_s=0.05)

    async def main():
        settings = _settings(demo, tmp_path, overrides={"enabled": True})
        app = create_app(settings, teacher_factory=lambda s, b: teacher)
        async with serving_in_process(app) as client:
            for _ in range(6):  # the teacher's latency becomes known: about 50 ms
                await client.post("/predict", json=_payload(demo, hard[0]))
            calls = len(teacher.calls)
            late = await client.post(
                "/predict", json=_payload(demo, hard[0]), headers={"x-request-timeout-ms": "10"}
            )
            fits = await client.post(
                "/predict", json={**_payload(demo, hard[0]), "deadline_ms": 5000}
            )
            return late.json(), fits.json(), calls, len(teacher.calls)

    late, fits, before, after = asyncio.run(main())
    assert (late["outcome"], late["answered_by"], late["degraded"]) == (
        "deadline",
        "student",
        False,
    )
    assert fits["answered_by"] == "teacher"
    assert after == before + 1  # only the request whose deadline fitted reached the teacher


class ShadowHangs(FakeTeacher):
    """Real calls answer at once; shadow calls (sent with a priority) never come back."""

    def __init__(self) -> None:
        super().__init__()
        self.shadow_calls = 0

    async def infer(self, feeds, headers=None, priority=None):
        if priority:
            self.shadow_calls += 1
            await asyncio.Event().wait()
        return await super().infer(feeds, headers, priority)


def test_shadow_samples_never_delay_an_answer_and_are_not_delegation(demo, tmp_path):
    threshold = Bundle.load(demo.bundle).manifest.default_threshold
    easy, _ = easy_and_hard(demo, threshold, n=5)
    teacher = ShadowHangs()

    async def main():
        settings = _settings(
            demo, tmp_path, shadow={"fraction": 1.0, "priority": 1, "max_in_flight": 1}
        )
        app = create_app(settings, teacher_factory=lambda s, b: teacher)
        async with serving_in_process(app) as client:
            answers = [await client.post("/predict", json=_payload(demo, i)) for i in easy]

            async def shadowed():
                return teacher.shadow_calls

            await eventually(shadowed)
            return answers, (await client.get("/metrics")).text

    answers, text = asyncio.run(
        asyncio.wait_for(main(), timeout=30)  # a shadow that blocked answers would hang here
    )
    assert all(r.status_code == 200 and r.json()["answered_by"] == "student" for r in answers)
    assert teacher.shadow_calls >= 1 and teacher.calls == []  # only shadows reached it
    assert metric_in(text, "cascade_items_total", outcome="delegated") == 0
    assert metric_in(text, "cascade_teacher_circuit_transitions_total") == 0


def test_shadow_agreement_is_estimated_and_exported(demo, tmp_path):
    payloads = [_payload(demo, i) for i in range(300)]

    async def main():
        settings = _settings(
            demo,
            tmp_path,
            shadow={"fraction": 0.5, "max_in_flight": 4},
            controller={"interval_s": 0.05},
        )
        app = create_app(settings, teacher_factory=lambda s, b: FakeTeacher(answer=3))
        async with serving_in_process(app) as client:
            await asyncio.gather(*(client.post("/predict", json=p) for p in payloads))

            async def estimated():  # every shadow answered and merged by a controller step
                listing = (await client.get("/cascades")).json()
                live = listing["cascades"][0]["live_student_agreement"]
                text = (await client.get("/metrics")).text
                done = metric_in(text, "cascade_shadow_items_total", result="agree")
                done += metric_in(text, "cascade_shadow_items_total", result="disagree")
                return (text, listing) if live and live["samples"] == done else None

            return await eventually(estimated) or (
                (await client.get("/metrics")).text,
                (await client.get("/cascades")).json(),
            )

    text, listing = asyncio.run(main())
    shadowed = metric_in(text, "cascade_shadow_items_total", result="agree") + metric_in(
        text, "cascade_shadow_items_total", result="disagree"
    )
    assert shadowed > 50
    # The fake teacher always says "3": agreement is the share of student answers that are 3.
    value = metric_in(text, "cascade_live_student_agreement", bound="estimate")
    lower = metric_in(text, "cascade_live_student_agreement", bound="lower")
    upper = metric_in(text, "cascade_live_student_agreement", bound="upper")
    assert 0 <= lower <= value <= upper <= 1
    live = listing["cascades"][0]["live_student_agreement"]
    assert live["samples"] == pytest.approx(shadowed, abs=5)
    assert metric_in(text, "cascade_calibrated_student_agreement", bound="estimate") > 0.5


def test_what_the_cascade_saved_is_counted(gateway, demo):
    import time

    with gateway(controller={"interval_s": 0.05}) as (client, teacher):
        for i in range(50):
            client.post("/predict", json=_payload(demo, i))
        sent = sum(teacher.calls)
        deadline = time.monotonic() + 15
        while True:  # until a controller step has merged the window of all 50
            listing = client.get("/cascades").json()["cascades"][0]
            if listing.get("savings") and listing["window"]["items"] == 50:
                break
            assert time.monotonic() < deadline, listing
            time.sleep(0.02)
        text = client.get("/metrics").text
    assert 0 < sent < 50
    assert metric_in(text, "cascade_teacher_items_avoided_total") == 50 - sent
    assert metric_in(text, "cascade_compute_units_total", tier="teacher_only") == pytest.approx(50)
    assert metric_in(text, "cascade_compute_units_total", tier="teacher") == pytest.approx(sent)
    assert listing["savings"]["teacher_calls_avoided"] == pytest.approx(1 - sent / 50)
    calibration = Bundle.load(demo.bundle).manifest.calibration
    cost = calibration.cost_student + sent / 50 * calibration.cost_teacher
    assert listing["savings"]["compute_saved"] == pytest.approx(1 - cost / calibration.cost_teacher)
