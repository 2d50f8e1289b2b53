"""N-stage cascades from one bundle: the demo's MLP student, its CNN teacher's graph as a tier in
the gateway ("cnn"), and the (fake) teacher last. Real ONNX Runtime sessions for both local
stages; the tier's session records what it was given."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
from fastapi.testclient import TestClient

from cascade_server.gateway import tiers as tiers_module
from cascade_server.gateway.app import create_app
from cascade_server.gateway.student import OnnxStudent
from cascade_server.policy import softmax, top2_margin
from cascade_server.settings import Settings

from ..conftest import b64, png_bytes, three_stage_bundle, tier_logits
from .conftest import AUTH, TOKEN, FakeTeacher
from .test_predict import metric

TIER_THRESHOLD = 0.99


class Recording(OnnxStudent):
    """A real tier session that keeps every batch it ran on."""

    seen: ClassVar[list[np.ndarray]] = []

    def predict(self, feeds):
        Recording.seen.append(feeds["input"].copy())
        return super().predict(feeds)


@pytest.fixture(scope="module")
def bundle(demo, tmp_path_factory):
    return three_stage_bundle(demo, tmp_path_factory.mktemp("stages"), TIER_THRESHOLD)


@pytest.fixture
def stages(bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(tiers_module, "OnnxStudent", Recording)
    Recording.seen = []
    teacher = FakeTeacher(answer=3)
    settings = Settings(
        bundles=[bundle.path],
        state_dir=tmp_path / "state",
        admin_token=TOKEN,
        overrides={"enabled": True, "allow_always": True},
    )
    app = create_app(settings, teacher_factory=lambda s, b: teacher)
    with TestClient(app, raise_server_exceptions=False) as client:
        Recording.seen = []  # the warm-up's row is not traffic
        yield client, teacher


def _inputs(demo, idx) -> dict:
    return {"inputs": [{"image": b64(png_bytes(demo.images[i]))} for i in idx]}


def _mix(bundle, demo, n: int = 20) -> list[int]:
    """Up to n images each for the student, the tier and the teacher, interleaved."""
    who, _, _ = _expected(bundle, demo, list(range(len(demo.images))))
    groups = [np.flatnonzero(who == w)[:n] for w in ("student", "cnn", "teacher")]
    assert all(len(g) >= 3 for g in groups), "the demo data needs all three stages"
    return sorted(int(i) for g in groups for i in g)


def _expected(bundle, demo, idx):
    """Who should answer each image, from the stages' own logits outside the gateway."""
    logits = tier_logits(bundle, demo.images[idx])
    student_m = top2_margin(softmax(logits["student"]))
    cnn_p = softmax(logits["cnn"])
    cnn_m = top2_margin(cnn_p)
    threshold = bundle.manifest.default_threshold
    who = np.where(
        student_m >= threshold, "student", np.where(cnn_m >= TIER_THRESHOLD, "cnn", "teacher")
    )
    return who, student_m, cnn_p


def test_each_stage_sees_only_what_was_left_unsure_before_it(stages, bundle, demo):
    client, teacher = stages
    idx = _mix(bundle, demo)
    who, student_m, cnn_p = _expected(bundle, demo, idx)
    assert {"student", "cnn", "teacher"} <= set(who), "the sample needs all three stages"
    r = client.post("/predict", json=_inputs(demo, idx))
    assert r.status_code == 200, r.text
    answers = r.json()["outputs"]
    # Answers in request order, each by the stage the margins say.
    assert [a["answered_by"] for a in answers] == who.tolist()
    # The tier ran once for this batch, on exactly the rows the student was unsure of.
    assert len(Recording.seen) == 1
    assert len(Recording.seen[0]) == int((who != "student").sum())
    # The teacher got exactly the rows the tier was unsure of.
    assert sum(teacher.calls) == int((who == "teacher").sum())
    for a, w, p, m in zip(answers, who, cnn_p, student_m, strict=True):
        assert a["margin"] == pytest.approx(m, abs=1e-5)  # the student's margin, always
        if w == "cnn":  # the tier's own probabilities
            assert a["class_id"] == int(p.argmax())
            assert a["top_k"][0]["probability"] == pytest.approx(p.max(), abs=1e-5)
            assert a["outcome"] == "confident" and not a["delegated"]
        elif w == "teacher":
            assert a["class_id"] == 3 and a["outcome"] == "delegated"
        assert "tiers" in a["timings_ms"]


def test_an_item_the_student_is_sure_of_never_runs_the_tier(stages, bundle, demo):
    client, teacher = stages
    who, _, _ = _expected(bundle, demo, list(range(200)))
    easy = [i for i, w in enumerate(who) if w == "student"][:5]
    r = client.post("/predict", json=_inputs(demo, easy))
    assert r.status_code == 200
    assert {a["answered_by"] for a in r.json()["outputs"]} == {"student"}
    assert Recording.seen == [] and teacher.calls == []


def test_busy_or_failing_teacher_leaves_the_tiers_answer(stages, bundle, demo):
    client, teacher = stages
    idx = _mix(bundle, demo)
    who, _, cnn_p = _expected(bundle, demo, idx)
    hard = [i for i, w in zip(idx, who, strict=True) if w == "teacher"][:3]
    teacher.fail = "unavailable"
    r = client.post("/predict", json=_inputs(demo, hard))
    assert r.status_code == 200
    for a, i in zip(r.json()["outputs"], hard, strict=True):
        assert a["answered_by"] == "cnn" and a["degraded"]
        assert a["outcome"] == "teacher_failed"
        assert a["class_id"] == int(cnn_p[idx.index(i)].argmax())


def test_request_options_bypass_the_tiers(stages, bundle, demo):
    client, _ = stages
    who, _, _ = _expected(bundle, demo, list(range(200)))
    unsure = [i for i, w in enumerate(who) if w != "student"][:2]
    never = client.post("/predict", json={**_inputs(demo, unsure), "delegate": "never"})
    assert {a["answered_by"] for a in never.json()["outputs"]} == {"student"}
    always = client.post("/predict", json={**_inputs(demo, unsure), "delegate": "always"})
    assert {a["answered_by"] for a in always.json()["outputs"]} == {"teacher"}
    assert Recording.seen == []


def test_metrics_name_the_stage_that_answered(stages, bundle, demo):
    client, _ = stages
    idx = _mix(bundle, demo)
    who, _, _ = _expected(bundle, demo, idx)
    client.post("/predict", json=_inputs(demo, idx))
    for stage in ("student", "cnn", "teacher"):
        got = metric(client, "cascade_stage_items_total", cascade="digits", stage=stage)
        assert got == int((who == stage).sum()), stage
    assert metric(client, "cascade_stage_seconds_count", cascade="digits", stage="cnn") == 1
    assert metric(client, "cascade_batch_size_sum", cascade="digits", model="cnn") == int(
        (who != "student").sum()
    )
    assert metric(client, "cascade_compute_units_total", cascade="digits", tier="cnn") == (
        pytest.approx(0.5 * int((who != "student").sum()))
    )


def test_open_inference_outputs_name_the_stage(stages, bundle, demo):
    client, _ = stages
    idx = _mix(bundle, demo, 10)
    who, _, _ = _expected(bundle, demo, idx)
    body = {
        "inputs": [
            {
                "name": "input",
                "datatype": "BYTES",
                "shape": [len(idx)],
                "data": [b64(png_bytes(demo.images[i])) for i in idx],
                "parameters": {"content_type": "base64"},
            }
        ],
        "outputs": [{"name": "answered_by"}],
    }
    r = client.post("/v2/models/digits/infer", json=body)
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    assert out["data"] == who.tolist()


def test_two_stage_bundles_answer_as_before(gateway, demo):
    """The demo bundle (no tiers): who answers and the fields are what they always were."""
    with gateway() as (client, teacher):
        r = client.post("/predict", json=_inputs(demo, range(60)))
        text = client.get("/metrics").text
    answers = r.json()["outputs"]
    assert {a["answered_by"] for a in answers} <= {"student", "teacher"}
    assert all("tiers" not in a["timings_ms"] for a in answers)
    by_teacher = sum(a["answered_by"] == "teacher" for a in answers)
    assert sum(teacher.calls) == by_teacher
    line = f'cascade_stage_items_total{{cascade="digits",stage="teacher"}} {by_teacher:.1f}'
    assert line in text


def test_a_target_accuracy_sets_every_stages_threshold(demo, tmp_path):
    from cascade_server.bundle import Frontier, FrontierRow

    rows = (
        FrontierRow(
            thresholds=(0.2, 0.5),
            answered=(0.8, 0.15, 0.05),
            cascade_accuracy=0.9,
            expected_cost=0.2,
        ),
        FrontierRow(
            thresholds=(0.6, 0.9),
            answered=(0.6, 0.25, 0.15),
            cascade_accuracy=0.95,
            expected_cost=0.4,
        ),
    )
    bundle = three_stage_bundle(demo, tmp_path, frontier=Frontier(split="val", n=100, rows=rows))
    settings = Settings(bundles=[bundle.path], state_dir=tmp_path / "state", admin_token=TOKEN)
    app = create_app(settings, teacher_factory=lambda s, b: FakeTeacher())
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.put("/admin/threshold", json={"target_accuracy": 0.93}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["mode"] == "target_accuracy"
        assert r.json()["threshold"] == 0.6 and r.json()["tier_thresholds"] == [0.9]
        r = client.put("/admin/threshold", json={"cost_budget": 0.3}, headers=AUTH)
        assert r.json()["threshold"] == 0.2 and r.json()["tier_thresholds"] == [0.5]
        r = client.put("/admin/threshold", json={"target_accuracy": 0.99}, headers=AUTH)
        assert r.status_code == 422 and "best 0.9500" in r.json()["error"]["message"]
        r = client.put("/admin/threshold", json={"cost_budget": 0.1}, headers=AUTH)
        assert r.status_code == 422 and "cheapest" in r.json()["error"]["message"]


def test_an_n_stage_bundle_without_a_frontier_refuses_frontier_targets(demo, tmp_path):
    bundle = three_stage_bundle(demo, tmp_path)  # tiers, no frontier
    settings = Settings(bundles=[bundle.path], state_dir=tmp_path / "state", admin_token=TOKEN)
    app = create_app(settings, teacher_factory=lambda s, b: FakeTeacher())
    with TestClient(app, raise_server_exceptions=False) as client:
        for body in ({"target_accuracy": 0.9}, {"cost_budget": 0.3}):
            r = client.put("/admin/threshold", json=body, headers=AUTH)
            assert r.status_code == 422, r.text
            assert "no frontier" in r.json()["error"]["message"]
        r = client.put("/admin/threshold", json={"threshold": 0.5}, headers=AUTH)
        assert r.status_code == 200, r.text


def test_the_controller_holds_a_cost_budget_along_the_frontier(demo, tmp_path):
    """A frontier whose dear row claims a cost live traffic does not have (every item through
    the tier and to the teacher, calibrated at 0.3): under a budget of 0.5 the live cost is
    ~1.5, and the controller moves every stage's threshold to the cheaper row at once."""

    from cascade_server.bundle import Frontier, FrontierRow

    cheap = FrontierRow(
        thresholds=(0.0, 0.0), answered=(1.0, 0.0, 0.0), cascade_accuracy=0.9, expected_cost=0.05
    )
    dear = FrontierRow(
        thresholds=(1.0, 1.0), answered=(0.0, 0.0, 1.0), cascade_accuracy=0.99, expected_cost=0.3
    )
    frontier = Frontier(split="val", n=100, rows=(cheap, dear))
    bundle = three_stage_bundle(demo, tmp_path, frontier=frontier)
    start, before, state, after, text = _hold_on_frontier(
        demo, bundle, tmp_path, FakeTeacher(), {"cost_budget": 0.5}, moved_to=[0.0]
    )
    assert start["threshold"] == 1.0 and start["tier_thresholds"] == [1.0]  # the dear row
    assert set(before) == {"teacher"}
    assert state is not None, "the controller did not move to the cheaper row"
    assert state["threshold_in_force"] == 0.0
    assert state["controller"]["reason"].startswith("live cost")
    assert state["controller"]["live_cost"] > 0.5  # measured over the budget
    assert set(after) == {"student"}
    from .test_predict import metric_in

    assert metric_in(text, "cascade_live_expected_cost") > 0
    assert metric_in(text, "cascade_controller_moves_total") >= 1


def test_the_controller_holds_a_target_accuracy_on_the_tiers_live_agreement(demo, tmp_path):
    """A target accuracy resolves to the row where the tier answers everything, calibrated to
    agree with the teacher on 99% of items. Live, the teacher (a fake answering 3 to all) agrees
    with the tier's answers about one time in ten: the tier's shadow samples say so, and the
    controller moves every stage's threshold to the dearer row (the teacher answers) at once.
    The student answers nothing on that row: the evidence is the tier's samples alone."""

    from cascade_server.bundle import Frontier, FrontierRow

    from .test_predict import metric_in

    by_tier = FrontierRow(
        thresholds=(1.0, 0.0),
        answered=(0.0, 1.0, 0.0),
        cascade_accuracy=0.95,
        expected_cost=0.5,
        teacher_agreement=0.99,
    )
    dear = FrontierRow(
        thresholds=(1.0, 1.0),
        answered=(0.0, 0.0, 1.0),
        cascade_accuracy=0.99,
        expected_cost=1.5,
        teacher_agreement=1.0,
    )
    frontier = Frontier(split="val", n=100, rows=(by_tier, dear))
    bundle = three_stage_bundle(demo, tmp_path, frontier=frontier)
    start, before, state, after, text = _hold_on_frontier(
        demo,
        bundle,
        tmp_path,
        FakeTeacher(answer=3),
        {"target_accuracy": 0.9},
        moved_to=[1.0],
        shadow={"fraction": 1.0},
        chunk=30,  # a few batches, so shadows have room
    )
    assert start["tier_thresholds"] == [0.0]  # the tier's row
    assert set(before) == {"cnn"}
    assert state is not None, "the controller did not move to the dearer row"
    controller = state["controller"]
    assert controller["reason"].startswith("live agreement")
    assert controller["target_agreement"] == 0.99
    assert controller["live_agreement"] < 0.5  # the fake teacher agrees with ~1 in 10
    assert set(after) == {"teacher"}
    assert metric_in(text, "cascade_controller_moves_total") >= 1
    # The tier's answers were what was shadowed (the student answered none).
    assert metric_in(text, "cascade_shadow_items_total", result="disagree") > 0


def test_frontier_targets_refuse_threshold_bounds(demo, tmp_path):
    """min/max_threshold bound the student's threshold alone: with a target on the frontier
    they would be ignored, so they are refused (422) rather than silently dropped."""
    from cascade_server.bundle import Frontier, FrontierRow

    row = FrontierRow(
        thresholds=(0.2, 0.5), answered=(0.8, 0.15, 0.05), cascade_accuracy=0.9, expected_cost=0.2
    )
    bundle = three_stage_bundle(demo, tmp_path, frontier=Frontier(split="val", n=100, rows=(row,)))
    settings = Settings(bundles=[bundle.path], state_dir=tmp_path / "state", admin_token=TOKEN)
    app = create_app(settings, teacher_factory=lambda s, b: FakeTeacher())
    with TestClient(app, raise_server_exceptions=False) as client:
        for body in (
            {"target_accuracy": 0.8, "min_threshold": 0.1},
            {"cost_budget": 0.3, "max_threshold": 0.9},
        ):
            r = client.put("/admin/threshold", json=body, headers=AUTH)
            assert r.status_code == 422, r.text
            assert "take neither" in r.json()["error"]["message"]
        r = client.put("/admin/threshold", json={"target_accuracy": 0.8}, headers=AUTH)
        assert r.status_code == 200, r.text


def _hold_on_frontier(demo, bundle, tmp_path, teacher, policy, moved_to, shadow=None, chunk=300):
    """A real app (controller every 50 ms) holding `policy` on 300 demo images sent `chunk` at
    a time: (the admin's answer to the policy, who answered 5 images before, the admin state
    once the tiers' thresholds in force are `moved_to` or None, who answered them after, the
    metrics scraped)."""
    import asyncio

    from .conftest import serving_in_process
    from .test_live_control import eventually

    payloads = [{"image": b64(png_bytes(demo.images[i]))} for i in range(300)]
    extra = {} if shadow is None else {"shadow": shadow}

    async def main():
        settings = Settings(
            bundles=[bundle.path],
            state_dir=tmp_path / "state",
            admin_token=TOKEN,
            controller={"interval_s": 0.05, "min_items": 100},
            **extra,
        )
        app = create_app(settings, teacher_factory=lambda s, b: teacher)
        async with serving_in_process(app) as client:

            async def answered_by():
                return [
                    (await client.post("/predict", json=p)).json()["answered_by"]
                    for p in payloads[:5]
                ]

            r = await client.put("/admin/threshold", json=policy, headers=AUTH)
            assert r.status_code == 200, r.text
            before = await answered_by()
            for i in range(0, len(payloads), chunk):
                await asyncio.gather(
                    *(client.post("/predict", json=p) for p in payloads[i : i + chunk])
                )

            async def moved():
                state = (await client.get("/admin/threshold", headers=AUTH)).json()
                return state if state["tier_thresholds_in_force"] == moved_to else None

            state = await eventually(moved)
            after = await answered_by()
            return r.json(), before, state, after, (await client.get("/metrics")).text

    return asyncio.run(main())
