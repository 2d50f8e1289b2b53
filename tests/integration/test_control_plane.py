"""The control plane's edges (issue 14): bad bundles are 422s, a swap records before it flips,
a repeated swap keeps the way back, a restart survives a lost bundle, and the store's I/O never
stalls predictions. Each case failed before its fix."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal

import pytest

from cascade_server.bundle import Bundle
from cascade_server.gateway.app import create_app
from cascade_server.settings import Settings

from ..conftest import b64, png_bytes
from ..redis_server import RedisServer
from .conftest import AUTH, TOKEN, FakeTeacher, serving_in_process
from .test_hot_swap import second_version


def _served(client, demo):
    r = client.post("/predict", json={"image": b64(png_bytes(demo.images[0]))})
    assert r.status_code == 200, r.text
    return r.json()["versions"]["student"]


def _bad_image_bundles(demo, tmp_path):
    """Seven ways an image bundle can be broken that the loaders (not our checks) notice."""
    onnx = (demo.bundle / "student.onnx").read_bytes()
    cases = {}

    def copy(name, **manifest):
        path = second_version(demo, tmp_path, version=name, **manifest)
        cases[name] = path
        return path

    (copy("corrupt") / "student.onnx").write_bytes(b"\x08\x07not an onnx model" * 50)
    (copy("truncated") / "student.onnx").write_bytes(onnx[: len(onnx) // 2])
    (copy("empty") / "student.onnx").write_bytes(b"")
    raw = json.loads((demo.bundle / "manifest.json").read_text())
    copy("wrong-size", preprocess={**raw["preprocess"], "height": 16, "width": 16})
    copy("wrong-output", student_output="not_an_output")
    copy("wrong-input", student_input="not_an_input")
    copy("wrong-channels", preprocess={**raw["preprocess"], "channels": 3,
                                       "mean": [0.5] * 3, "std": [0.5] * 3})  # fmt: skip
    return cases


def test_bundles_the_loaders_refuse_are_422_and_the_old_student_stays(gateway, demo, tmp_path):
    cases = _bad_image_bundles(demo, tmp_path)
    with gateway() as (client, _):
        before = _served(client, demo)
        for name, path in cases.items():
            r = client.put("/admin/student", json={"bundle": str(path)}, headers=AUTH)
            assert r.status_code == 422, (name, r.text)
            assert f"bundle {path} cannot be loaded" in r.json()["error"]["message"], name
            assert _served(client, demo) == before, name
        assert client.get("/admin/student", headers=AUTH).json()["previous"] is None


def test_a_text_bundle_with_a_broken_tokenizer_is_422(gateway, demo, text_demo, tmp_path):
    broken = tmp_path / "intents-broken"
    shutil.copytree(text_demo.bundle, broken)
    raw = json.loads((broken / "manifest.json").read_text())
    raw["version"] = "broken-tokenizer"
    (broken / "manifest.json").write_text(json.dumps(raw))
    (broken / "tokenizer.json").write_text('{"model": {"type": "WordPiece", "vocab": 5}}')
    with gateway(bundles=[demo.bundle, text_demo.bundle]) as (client, _):
        r = client.put(
            "/admin/student", json={"bundle": str(broken), "cascade": "intents"}, headers=AUTH
        )
        assert r.status_code == 422 and "cannot be loaded" in r.json()["error"]["message"], r.text
        body = client.post("/predict", json={"text": "my card was declined"}).json()
        assert body["versions"]["student"] != "broken-tokenizer"


def test_swapping_to_the_bundle_already_served_keeps_the_way_back(gateway, demo, tmp_path):
    v1 = Bundle.load(demo.bundle).manifest.version
    v2 = second_version(demo, tmp_path)
    with gateway() as (client, _):
        first = client.put("/admin/student", json={"bundle": str(v2)}, headers=AUTH).json()
        assert first["changed"] is True and first["previous"] == str(demo.bundle.resolve())
        again = client.put("/admin/student", json={"bundle": str(v2)}, headers=AUTH).json()
        assert again["changed"] is False
        assert again["previous"] == str(demo.bundle.resolve())  # not itself
        r = client.post("/admin/student/rollback", headers=AUTH)
        assert r.status_code == 200 and r.json()["version"] == v1
        assert _served(client, demo) == v1


def test_a_swap_that_cannot_be_recorded_changes_nothing(gateway, demo, tmp_path, monkeypatch):
    """The write comes before the flip: a store that refuses the write leaves this worker (and
    every other) on the old version, as the 503 says."""
    from cascade_server.gateway import stores

    v1 = Bundle.load(demo.bundle).manifest.version
    v2 = second_version(demo, tmp_path)
    with gateway() as (client, _):

        def full_disk(path, text):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(stores, "replace_atomically", full_disk)
        r = client.put("/admin/student", json={"bundle": str(v2)}, headers=AUTH)
        assert r.status_code == 503, r.text
        assert "nothing was changed" in r.json()["error"]["message"]
        assert _served(client, demo) == v1
        assert client.get("/admin/student", headers=AUTH).json()["version"] == v1


def test_concurrent_swaps_serialise_and_record_the_true_previous(demo, tmp_path):
    """Two swaps racing (two admins, or an admin and the watch loop) load one at a time: the
    rollback target recorded is the version that was really served before the last flip."""
    v2, v3 = second_version(demo, tmp_path, "v2"), second_version(demo, tmp_path, "v3")

    async def main():
        settings = Settings(bundles=[demo.bundle], state_dir=tmp_path / "state", admin_token=TOKEN)
        app = create_app(settings, teacher_factory=lambda s, b: FakeTeacher())
        async with serving_in_process(app) as client:
            answers = await asyncio.gather(
                client.put("/admin/student", json={"bundle": str(v2)}, headers=AUTH),
                client.put("/admin/student", json={"bundle": str(v3)}, headers=AUTH),
            )
            state = (await client.get("/admin/student", headers=AUTH)).json()
            return [a.json() for a in answers], state

    answers, state = asyncio.run(main())
    first, last = sorted(answers, key=lambda a: a["updated_at"])
    assert state["bundle"] == last["bundle"]
    assert state["previous"] == first["bundle"]  # not the configured bundle both started from
    assert first["previous"] == str(demo.bundle.resolve())


def test_a_restart_after_the_recorded_bundle_is_gone_serves_the_configured_one(
    gateway, demo, tmp_path
):
    v1 = Bundle.load(demo.bundle).manifest.version
    v2 = second_version(demo, tmp_path)
    with gateway() as (client, _):
        assert client.put("/admin/student", json={"bundle": str(v2)}, headers=AUTH).is_success
    shutil.rmtree(v2)
    with gateway() as (client, _):  # used to be "Application startup failed"
        assert _served(client, demo) == v1
        ready = client.get("/readyz")
        assert ready.status_code == 200
        error = ready.json()["cascades"]["digits"]["rollout_error"]
        assert "cannot be followed" in error and str(v2) in error
        assert client.get("/admin/student", headers=AUTH).json()["rollout_error"] == error


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.process and server.process.send_signal(signal.SIGCONT)
    server.kill()


def test_an_admin_call_during_a_redis_outage_never_stalls_predictions(demo, tmp_path, redis_server):
    """Redis stops answering (SIGSTOP: sockets open, nothing replies). An admin change waits
    for the store on a thread, bounded, and answers 503; predictions on the same worker are
    answered meanwhile, not after it."""
    payload = {"image": b64(png_bytes(demo.images[0]))}

    async def main():
        settings = Settings(
            bundles=[demo.bundle],
            admin_token=TOKEN,
            control_store="redis",
            redis_url=redis_server.url,
            control_timeout_s=1.0,
        )
        app = create_app(settings, teacher_factory=lambda s, b: FakeTeacher())
        async with serving_in_process(app) as client:
            redis_server.process.send_signal(signal.SIGSTOP)
            order: list[str] = []

            async def admin():
                r = await client.put("/admin/threshold", json={"threshold": 0.4}, headers=AUTH)
                order.append("admin")
                return r

            async def predictions():
                await asyncio.sleep(0.05)  # the admin call is waiting on Redis
                for _ in range(5):
                    r = await client.post("/predict", json=payload)
                    assert r.status_code == 200
                order.append("predictions")

            admin_answer, _ = await asyncio.gather(admin(), predictions())
            redis_server.process.send_signal(signal.SIGCONT)
            return admin_answer, order

    admin_answer, order = asyncio.run(main())
    assert order == ["predictions", "admin"]
    assert admin_answer.status_code == 503, admin_answer.text


def test_a_replica_started_while_redis_is_down_is_not_ready_until_it_has_read(demo, tmp_path):
    server = RedisServer(tmp_path / "late")  # not started yet

    async def main():
        settings = Settings(
            bundles=[demo.bundle], control_store="redis", redis_url=server.url,
            control_timeout_s=0.5,
        )  # fmt: skip
        app = create_app(settings, teacher_factory=lambda s, b: FakeTeacher())
        async with serving_in_process(app) as client:
            before = await client.get("/readyz")
            server.start()
            for _ in range(100):
                after = await client.get("/readyz")
                if after.status_code == 200:
                    break
                await asyncio.sleep(0.1)
            return before, after

    try:
        before, after = asyncio.run(main())
    finally:
        server.kill()
    assert before.status_code == 503
    assert before.json()["control_store"] == {"kind": "redis", "up": False, "synced": False}
    assert after.status_code == 200 and after.json()["control_store"]["synced"] is True


def test_a_redis_outage_keeps_listing_predicting_and_ready(demo, tmp_path):
    """Once synced, a replica whose Redis goes away serves the last values: `/cascades` (which
    reads the controller's and the windows' keys) answers, predictions answer, readiness holds;
    only changes are refused."""
    server = RedisServer(tmp_path / "redis").start()
    payload = {"image": b64(png_bytes(demo.images[0]))}

    async def main():
        settings = Settings(
            bundles=[demo.bundle], control_store="redis", redis_url=server.url,
            control_timeout_s=0.5, admin_token=TOKEN, controller={"interval_s": 0.05},
        )  # fmt: skip
        app = create_app(settings, teacher_factory=lambda s, b: FakeTeacher())
        async with serving_in_process(app) as client:
            r = await client.put(
                "/admin/threshold", json={"target_delegation_rate": 0.3}, headers=AUTH
            )
            assert r.status_code == 200, r.text
            for _ in range(20):
                assert (await client.post("/predict", json=payload)).status_code == 200
            server.kill()
            for _ in range(100):  # until the store is seen down
                ready = await client.get("/readyz")
                if not ready.json()["control_store"]["up"]:
                    break
                await asyncio.sleep(0.05)
            listing = await client.get("/cascades")
            predicted = await client.post("/predict", json=payload)
            ready = await client.get("/readyz")
            change = await client.put("/admin/threshold", json={"threshold": 0.5}, headers=AUTH)
            return listing, predicted, ready, change

    try:
        listing, predicted, ready, change = asyncio.run(main())
    finally:
        server.kill()
    assert listing.status_code == 200, listing.text
    assert listing.json()["cascades"][0]["policy"] == "target_delegation_rate"
    assert predicted.status_code == 200
    assert ready.status_code == 200, ready.text
    assert ready.json()["control_store"] == {"kind": "redis", "up": False, "synced": True}
    assert change.status_code == 503


def test_following_another_worker_and_an_admin_swap_never_race(demo, tmp_path):
    """The watch loop follows a version another worker recorded (v3) while an admin swaps this
    worker to v2: the two loads take turns, and what is served ends equal to what is recorded,
    with the rollback target the version really served before the last flip."""
    from cascade_server.gateway.rollout import RolloutState

    v2, v3 = second_version(demo, tmp_path, "v2"), second_version(demo, tmp_path, "v3")

    async def main():
        settings = Settings(
            bundles=[demo.bundle],
            state_dir=tmp_path / "state",
            admin_token=TOKEN,
            readiness_interval_s=60,  # the test drives the follow step itself
        )
        app = create_app(settings, teacher_factory=lambda s, b: FakeTeacher())
        async with serving_in_process(app) as client:
            cascade = app.state.gateway.cascades["digits"]
            other_worker = RolloutState(
                bundle=str(v3.resolve()), version="v3", previous=str(demo.bundle.resolve()),
                updated_at="2026-12-01T00:00:00+00:00", updated_by="another worker",
            )  # fmt: skip
            (tmp_path / "state" / "digits.student.json").write_text(other_worker.model_dump_json())
            flips: list[str] = []
            on_flip = cascade.students._on_flip
            cascade.students._on_flip = lambda: (flips.append(cascade.active.version), on_flip())
            _, swap = await asyncio.gather(
                cascade.students.follow(),
                client.put("/admin/student", json={"bundle": str(v2)}, headers=AUTH),
            )
            state = (await client.get("/admin/student", headers=AUTH)).json()
            return flips, swap, state, cascade.active.version

    flips, swap, state, served = asyncio.run(main())
    assert swap.status_code == 200, swap.text
    assert served == state["version"] == "v2"
    assert flips[-1] == "v2"
    before_last = flips[-2] if len(flips) > 1 else Bundle.load(demo.bundle).manifest.version
    assert state["previous"] == str((v3 if before_last == "v3" else demo.bundle).resolve())
