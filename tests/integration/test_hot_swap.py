"""Hot swap of the student: load beside, warm, flip once, retire, roll back; every worker (and a
restart) follows the choice recorded in the state directory."""

import asyncio
import itertools
import json
import shutil

import pytest

from cascade_server.bundle import Bundle
from cascade_server.gateway.app import create_app

from ..conftest import b64, png_bytes
from .conftest import AUTH, FakeTeacher, serving_in_process
from .test_batching import settings
from .test_predict import metric, metric_in


def second_version(demo, tmp_path, version="v2", shift=0.0, **manifest_changes):
    """A copy of the demo bundle as another student version (same model file), its calibration
    table's thresholds shifted by `shift` so that a target rate resolves differently."""
    path = tmp_path / f"bundle-{version}"
    shutil.copytree(demo.bundle, path)
    raw = json.loads((path / "manifest.json").read_text())
    raw["version"] = version
    for row in raw["calibration"]["table"]:
        row["threshold"] = min(1.0, row["threshold"] + shift)
    raw.update(manifest_changes)
    (path / "manifest.json").write_text(json.dumps(raw))
    return path


def test_swap_flips_the_version_and_rollback_returns(gateway, demo, tmp_path):
    v1 = Bundle.load(demo.bundle).manifest.version
    v2_path = second_version(demo, tmp_path)
    payload = {"image": b64(png_bytes(demo.images[0]))}
    with gateway() as (client, _):
        assert client.post("/predict", json=payload).json()["versions"]["student"] == v1
        r = client.put("/admin/student", json={"bundle": str(v2_path)}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert (r.json()["version"], r.json()["previous"]) == ("v2", str(demo.bundle.resolve()))
        assert client.post("/predict", json=payload).json()["versions"]["student"] == "v2"
        assert metric(client, "cascade_student_version_info", version="v2") == 1
        assert metric(client, "cascade_student_version_info", version=v1) == 0
        assert client.get("/admin/student", headers=AUTH).json()["version"] == "v2"
        r = client.post("/admin/student/rollback", headers=AUTH)
        assert r.status_code == 200 and r.json()["version"] == v1
        assert client.post("/predict", json=payload).json()["versions"]["student"] == v1
    with gateway() as (client, _):  # a restart (or another worker) serves the recorded choice
        assert client.post("/predict", json=payload).json()["versions"]["student"] == v1
        client.put("/admin/student", json={"bundle": str(v2_path)}, headers=AUTH)
    with gateway() as (client, _):
        assert client.post("/predict", json=payload).json()["versions"]["student"] == "v2"


def test_the_threshold_follows_the_new_calibration_for_a_target_rate(gateway, demo, tmp_path):
    v2_path = second_version(demo, tmp_path, shift=0.1)
    with gateway() as (client, _):
        before = client.put(
            "/admin/threshold", json={"target_delegation_rate": 0.2}, headers=AUTH
        ).json()["threshold"]
        after = client.put("/admin/student", json={"bundle": str(v2_path)}, headers=AUTH).json()
        assert after["threshold"] == pytest.approx(min(1.0, before + 0.1), abs=1e-6)
        fixed = client.put("/admin/threshold", json={"threshold": 0.3}, headers=AUTH).json()
        assert fixed["threshold"] == 0.3


def test_a_swap_under_an_online_policy_starts_the_live_window_afresh(gateway, demo, tmp_path):
    """The window's margins are the old student's: after the flip the controller forgets them
    (they would steer the new student's threshold for up to a minute)."""
    import time

    v2_path = second_version(demo, tmp_path)
    payloads = [{"image": b64(png_bytes(demo.images[i]))} for i in range(60)]

    def window(client):
        return client.get("/admin/threshold", headers=AUTH).json()["window"]["items"]

    def until(predicate, what):
        deadline = time.monotonic() + 15
        while not predicate():
            assert time.monotonic() < deadline, what
            time.sleep(0.02)

    with gateway(controller={"interval_s": 0.05}) as (client, _):
        r = client.put("/admin/threshold", json={"target_delegation_rate": 0.3}, headers=AUTH)
        assert r.status_code == 200, r.text
        for p in payloads:
            assert client.post("/predict", json=p).status_code == 200
        until(lambda: window(client) == 60, "the window holds the old student's 60 items")
        r = client.put("/admin/student", json={"bundle": str(v2_path)}, headers=AUTH)
        assert r.status_code == 200, r.text
        until(lambda: window(client) == 0, "the window starts afresh after the flip")
        for p in payloads[:10]:
            assert client.post("/predict", json=p).json()["versions"]["student"] == "v2"
        until(lambda: window(client) == 10, "the new student's items fill it")


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"classes": [str(i) for i in range(9)] + ["ten"]}, "classes differs"),
        ({"name": "other"}, "name differs"),
        ({"student_file": "missing.onnx"}, "cannot be loaded"),
    ],
)
def test_an_incompatible_bundle_is_refused_and_nothing_changes(
    gateway, demo, tmp_path, change, fragment
):
    bad = second_version(demo, tmp_path, version="bad", **change)
    with gateway() as (client, _):
        r = client.put("/admin/student", json={"bundle": str(bad)}, headers=AUTH)
        assert r.status_code == 422 and fragment in r.json()["error"]["message"], r.text
        assert client.get("/admin/student", headers=AUTH).json()["previous"] is None
        payload = {"image": b64(png_bytes(demo.images[0]))}
        assert client.post("/predict", json=payload).json()["versions"]["student"] != "bad"


def test_swap_and_rollback_need_the_token_and_a_previous_version(gateway, demo, tmp_path):
    with gateway() as (client, _):
        assert client.put("/admin/student", json={"bundle": "/x"}).status_code == 401
        r = client.post("/admin/student/rollback", headers=AUTH)
        assert r.status_code == 422 and "no previous" in r.json()["error"]["message"]
        for bad in (str(tmp_path / "nope"), "\x00bad", "/dev/null"):
            r = client.put("/admin/student", json={"bundle": bad}, headers=AUTH)
            assert r.status_code == 422 and "cannot be loaded" in r.json()["error"]["message"]


def test_swap_under_load_drops_nothing_and_flips_once(demo, tmp_path):
    """Requests keep flowing (several clients) while the version flips: every one is answered,
    and each client sees the old version, then the new one, never back."""
    v2_path = second_version(demo, tmp_path)
    payloads = [{"image": b64(png_bytes(demo.images[i]))} for i in range(40)]

    async def main():
        app = create_app(settings(demo, tmp_path), teacher_factory=lambda s, b: FakeTeacher())
        async with serving_in_process(app) as client:
            seen: list[list[str]] = [[] for _ in range(4)]
            statuses: list[int] = []
            swapped = asyncio.Event()

            async def clientloop(k):
                # Until 5 answers after the swap returned (however long the load takes), and
                # at least the 40 payloads; bounded in case the swap never lands.
                after = 0
                for i in range(2000):
                    r = await client.post("/predict", json=payloads[i % len(payloads)])
                    statuses.append(r.status_code)
                    seen[k].append(r.json()["versions"]["student"])
                    after += swapped.is_set()
                    if after >= 5 and i >= len(payloads):
                        return

            async def swap():
                await asyncio.sleep(0.05)
                r = await client.put("/admin/student", json={"bundle": str(v2_path)}, headers=AUTH)
                assert r.status_code == 200, r.text
                swapped.set()

            await asyncio.gather(*(clientloop(k) for k in range(4)), swap())
            return seen, statuses, (await client.get("/metrics")).text

    seen, statuses, text = asyncio.run(main())
    assert statuses == [200] * len(statuses) and len(statuses) >= 160
    for versions in seen:
        flips = sum(a != b for a, b in itertools.pairwise(versions))
        assert flips <= 1 and versions[-1] == "v2", versions
    assert metric_in(text, "cascade_requests_total", status="failed") == 0
