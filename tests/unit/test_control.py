import asyncio
import json

import pytest

from cascade_server.gateway.control import ThresholdStore
from cascade_server.gateway.stores import ControlStore, FileBackend

from .test_bundle import make_calibration


class Sync:
    """The store's async admin calls, run to completion (one event loop per call)."""

    def __init__(self, thresholds: ThresholdStore) -> None:
        self.thresholds = thresholds
        self.calibration = thresholds.calibration

    def current(self):
        return self.thresholds.current()

    def set(self, **kwargs):
        return asyncio.run(self.thresholds.set(**kwargs))

    def reset(self, **kwargs):
        return asyncio.run(self.thresholds.reset(**kwargs))


def store(tmp_path, version="v1"):
    cal = make_calibration()
    return Sync(
        ThresholdStore(
            ControlStore(FileBackend(tmp_path), timeout_s=2.0),
            "toy",
            default_threshold=cal.threshold,
            calibration=cal,
            student_version=version,
        )
    )


def test_default_comes_from_the_bundle(tmp_path):
    s = store(tmp_path)
    state = s.current()
    assert state.source == "bundle"
    assert state.threshold == s.calibration.threshold


def test_a_change_in_one_process_is_seen_by_another_at_once(tmp_path):
    worker_a, worker_b = store(tmp_path), store(tmp_path)
    assert worker_b.current().threshold != 0.42
    old, new = worker_a.set(threshold=0.42, actor="alice")
    assert old.source == "bundle" and new.threshold == 0.42
    seen = worker_b.current()
    assert (seen.threshold, seen.source, seen.updated_by) == (0.42, "admin", "alice")
    for value in (0.1, 0.2, 0.3):  # quick successive writes of the same size
        worker_a.set(threshold=value, actor="alice")
        assert worker_b.current().threshold == value


def test_state_survives_a_restart_and_reset_restores_the_default(tmp_path):
    store(tmp_path).set(threshold=0.9, actor="a")
    restarted = store(tmp_path)
    assert restarted.current().threshold == 0.9
    restarted.reset(actor="b")
    assert store(tmp_path).current().source == "bundle"


def test_target_rate_is_resolved_through_the_calibration(tmp_path):
    s = store(tmp_path)
    _, new = s.set(target_delegation_rate=0.5, actor="a")
    assert new.threshold == pytest.approx(s.calibration.threshold_for_rate(0.5))
    assert new.target_delegation_rate == 0.5


def test_exactly_one_of_threshold_and_rate(tmp_path):
    with pytest.raises(ValueError):
        store(tmp_path).set(threshold=0.1, target_delegation_rate=0.1, actor="a")
    with pytest.raises(ValueError):
        store(tmp_path).set(actor="a")


def test_every_change_is_audited(tmp_path):
    s = store(tmp_path)
    s.set(threshold=0.3, actor="alice")
    s.set(threshold=0.4, actor="bob")
    lines = [
        json.loads(x) for x in (tmp_path / "toy.threshold.audit.jsonl").read_text().splitlines()
    ]
    assert [(x["by"], x["old"], x["new"]) for x in lines][1:] == [("bob", 0.3, 0.4)]
    assert lines[0]["by"] == "alice" and lines[0]["new"] == 0.3


def test_an_unreadable_state_file_falls_back_to_the_default(tmp_path):
    s = store(tmp_path)
    (tmp_path / "toy.threshold.json").write_text("{not json")
    assert s.current().source == "bundle"
