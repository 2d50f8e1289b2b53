import numpy as np
import pytest
from pydantic import ValidationError

from cascade_server.bundle import Bundle, ImagePreprocess, Manifest, TeacherRef
from cascade_server.train.stages import calibrate_logits as calibrate


def make_calibration(seed=0, target=0.2):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(500, 5)) * 3
    labels = rng.integers(0, 5, 500)
    teacher = np.eye(5)[labels] * 10  # a perfect teacher
    return calibrate(student, teacher, labels, target_delegation_rate=target, cost_student=0.1)


def make_manifest(**overrides):
    cal = make_calibration()
    fields = dict(
        name="toy",
        version="1",
        modality="image",
        classes=("a", "b", "c", "d", "e"),
        preprocess=ImagePreprocess(height=8, width=8, channels=1, mean=(0.5,), std=(0.5,)),
        default_threshold=cal.threshold,
        calibration=cal,
        teacher=TeacherRef(model_name="t"),
    )
    return Manifest(**{**fields, **overrides})


def test_threshold_for_rate_and_back():
    cal = make_calibration()
    for rate in (0.1, 0.2, 0.5, 0.8):
        assert cal.rate_for_threshold(cal.threshold_for_rate(rate)) == pytest.approx(rate, abs=0.01)
    assert cal.threshold_for_rate(0.0) == 0.0
    assert cal.threshold_for_rate(1.0) == 1.0
    with pytest.raises(ValueError):
        cal.threshold_for_rate(1.5)


def test_manifest_roundtrip(tmp_path):
    manifest = make_manifest()
    bundle = Bundle(tmp_path, manifest)
    bundle.save()
    (tmp_path / "student.onnx").write_bytes(b"x")
    assert Bundle.load(tmp_path).manifest == manifest


def test_a_two_stage_manifest_is_written_without_the_n_stage_fields(tmp_path):
    """So a gateway from before N-stage cascades (a rollback) still loads the bundle."""
    import json

    from cascade_server.bundle import TierRef

    Bundle(tmp_path, make_manifest()).save()
    (tmp_path / "student.onnx").write_bytes(b"x")
    written = json.loads((tmp_path / "manifest.json").read_text())
    assert "tiers" not in written and "frontier" not in written
    tier = TierRef(name="mid", file="mid.onnx", threshold=0.5, cost=0.2)
    Bundle(tmp_path, make_manifest(tiers=(tier,))).save()
    assert json.loads((tmp_path / "manifest.json").read_text())["tiers"][0]["name"] == "mid"


def test_missing_student_file_is_reported(tmp_path):
    Bundle(tmp_path, make_manifest()).save()
    with pytest.raises(FileNotFoundError, match=r"student\.onnx"):
        Bundle.load(tmp_path)


@pytest.mark.parametrize(
    "bad",
    [
        {"classes": ("only",)},
        {"name": "Bad Name"},
        {"default_threshold": 1.5},
        {"preprocess": {"height": 8, "width": 8, "channels": 3, "mean": [0.5], "std": [0.5]}},
    ],
)
def test_manifest_rejects_nonsense(bad):
    with pytest.raises(ValidationError):
        make_manifest(**bad)


def test_a_two_stage_frontier_carries_the_teachers_agreement_from_the_table():
    """The calibration table counts the student's disagreements with the teacher on what it
    keeps; the frontier row says the share of all items answered as the teacher answers them.
    A table from before those counts gives rows without it (the controller does not hold a
    target accuracy on them)."""
    cal = make_calibration()
    rows = cal.frontier().rows
    by_threshold = {r.threshold: r for r in cal.table}
    for row in rows:
        source = by_threshold[row.thresholds[0]]
        assert source.accepted_disagreements is not None
        assert row.teacher_agreement == pytest.approx(1 - source.accepted_disagreements / cal.n)
    assert rows[-1].teacher_agreement == pytest.approx(1.0)  # everything to the teacher
    assert rows[0].teacher_agreement < rows[-1].teacher_agreement
    old = cal.model_copy(
        update={
            "table": tuple(r.model_copy(update={"accepted_disagreements": None}) for r in cal.table)
        }
    )
    assert all(r.teacher_agreement is None for r in old.frontier().rows)
