"""N-stage cascades from cascade-train, as users run it (subprocesses, tiny epochs): a B-DISTIL
student exported as stages (tiers) and as one graph, the accuracy-vs-cost frontier in
`evaluate`, and `compose` building a three-stage bundle from two students of one cascade."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cascade_server.bundle import Bundle

from .test_train_cli import QUICK, ROOT, train

BDISTIL = ROOT / "configs" / "digits" / "bdistil.yaml"


@pytest.fixture(scope="module")
def anytime(tmp_path_factory):
    """A B-DISTIL run exported both ways: as tiers (the default) and as one graph."""
    root = tmp_path_factory.mktemp("anytime")
    train(
        "run", BDISTIL, "--run-dir", root / "run", *QUICK,
        "--export", "--bundles", root / "tiers", "--repository", root / "repo",
    )  # fmt: skip
    train(
        "export", root / "run", "--set", "export.anytime=graph",
        "--bundles", root / "graph", "--repository", root / "repo",
    )  # fmt: skip
    return root


def sessions(bundle: Bundle) -> list:
    import onnxruntime as ort

    files = [bundle.student_path, *(bundle.tier_path(t) for t in bundle.manifest.tiers)]
    return [ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]) for f in files]


def test_tiers_chained_reproduce_the_one_graph_stages(anytime):
    from cascade_server.preprocess import normalize
    from cascade_server.train.data import DATASETS
    from cascade_server.train.stages.anytime import chain

    tiers = Bundle.load(anytime / "tiers" / "digits")
    graph = Bundle.load(anytime / "graph" / "digits")
    m = tiers.manifest
    assert [t.name for t in m.tiers] == ["member_2", "member_3"]
    assert all(t.runtime == "onnx" and t.prev_input == "prev_logits" for t in m.tiers)
    assert m.stages == () and [s.output for s in graph.manifest.stages] == [
        "stage_1",
        "stage_2",
        "stage_3",
    ]
    assert sorted(p.name for p in tiers.path.iterdir()) == [
        "manifest.json",
        "member_2.onnx",
        "member_3.onnx",
        "student.onnx",
    ]
    x = normalize(DATASETS.get("digits")().x[:64], m.preprocess)  # as the gateway does
    chained = chain(sessions(tiers), {"input": x})
    one = sessions(graph)[0].run(None, {"input": x})
    for k in range(3):
        np.testing.assert_allclose(chained[k], one[k + 1], atol=1e-4)


def test_the_tiers_thresholds_are_a_row_of_the_frontier(anytime):
    m = Bundle.load(anytime / "tiers" / "digits").manifest
    assert m.frontier is not None and m.frontier.split == "val"
    chosen = (m.default_threshold, *(t.threshold for t in m.tiers))
    row = next(r for r in m.frontier.rows if r.thresholds == chosen)
    # The config's target (delegation 0.2): the most accurate row sending at most that on.
    within = [r for r in m.frontier.rows if r.teacher_rate <= 0.2 + 1e-12]
    assert row.cascade_accuracy == max(r.cascade_accuracy for r in within)
    # The student is member 1 alone: the cheapest stage, and its calibration is at stage 0.
    assert m.calibration.threshold == m.default_threshold
    assert m.calibration.target_delegation_rate == pytest.approx(1 - row.answered[0])
    costs = [m.calibration.cost_student, *(t.cost for t in m.tiers)]
    assert all(c > 0 for c in costs) and costs[1] == pytest.approx(costs[2])  # equal members
    graph = Bundle.load(anytime / "graph" / "digits").manifest
    assert sum(costs) == pytest.approx(graph.calibration.cost_student)  # no connect: no extra
    for k, tier in enumerate(m.tiers, 1):  # of the items reaching it, the share moving on
        reaching = sum(row.answered[k:])
        expected = sum(row.answered[k + 1 :]) / reaching if reaching else 0.0
        assert tier.pass_rate == pytest.approx(expected)


def test_evaluate_writes_the_frontier_and_its_plot(anytime, tmp_path):
    train("evaluate", anytime / "run", "--out", tmp_path / "eval")
    curves = json.loads((tmp_path / "eval" / "curves.json").read_text())
    (ev,) = curves.values()
    front = ev["frontier"]
    assert front["split"] == "test" and front["stages"]["names"] == [
        "stage_1",
        "stage_2",
        "stage_3",
    ]
    for rows, stages in ((front["two_stage"]["rows"], 1), (front["stages"]["rows"], 3)):
        assert [r["cost"] for r in rows] == sorted(r["cost"] for r in rows)
        assert [r["accuracy"] for r in rows] == sorted(r["accuracy"] for r in rows)
        assert all(len(r["thresholds"]) == stages and "teacher_share" in r for r in rows)
    run_eval = json.loads((anytime / "run" / "evaluation.json").read_text())
    assert run_eval["frontier"] == front
    assert (tmp_path / "eval" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def kd_bundle(anytime):
    """A KD student distilled from the B-DISTIL run's teacher: the same cascade."""
    run = anytime / "kd"
    shutil.copytree(anytime / "run", run)
    train("distill", run, "--method", "kd")
    train("calibrate", run)  # the copied calibration was the B-DISTIL student's
    train("export", run, "--bundles", anytime / "kd-bundles", "--repository", anytime / "repo")
    return anytime / "kd-bundles" / "digits"


def test_compose_a_three_stage_cascade_from_two_students(anytime, kd_bundle):
    out = anytime / "composed"
    done = train(
        "compose", kd_bundle, "--tier", anytime / "graph" / "digits", "--tier-name", "bdistil",
        "--data", anytime / "kd", "--repository", anytime / "repo", "--out", out,
    )  # fmt: skip
    assert "thresholds: student" in done.stdout
    bundle = Bundle.load(out)
    m = bundle.manifest
    assert bundle.stage_names == ("student", "bdistil", "teacher")
    assert sorted(p.name for p in out.iterdir()) == [
        "bdistil.onnx",
        "manifest.json",
        "student.onnx",
    ]
    graph = Bundle.load(anytime / "graph" / "digits").manifest
    (tier,) = m.tiers
    assert tier.cost == pytest.approx(graph.calibration.cost_student)  # from its MACs
    copied = (anytime / "graph" / "digits" / "student.onnx").read_bytes()
    assert (out / "bdistil.onnx").read_bytes() == copied
    assert m.frontier is not None and len(m.frontier.rows[0].thresholds) == 2
    chosen = (m.default_threshold, tier.threshold)
    row = next(r for r in m.frontier.rows if r.thresholds == chosen)
    target = m.training["composed"]["val_teacher_accuracy"] - 0.005
    reaching = [r for r in m.frontier.rows if r.cascade_accuracy >= target]
    assert row == (reaching[0] if reaching else m.frontier.rows[-1])
    assert m.version.endswith("-bdistil") and m.name == "digits"

    # An explicit target, the data given as the experiment's YAML.
    train(
        "compose", kd_bundle, "--tier", anytime / "graph" / "digits", "--tier-name", "bdistil",
        "--data", BDISTIL, "--repository", anytime / "repo", "--out", out, "--force",
        "--target-accuracy", "0",
    )  # fmt: skip
    m = Bundle.load(out).manifest
    cheapest = m.frontier.rows[0]
    assert (m.default_threshold, m.tiers[0].threshold) == cheapest.thresholds


def test_compose_refuses_what_is_not_one_cascade(anytime, kd_bundle):
    done = train(
        "compose", kd_bundle, "--tier", anytime / "tiers" / "digits", "--data", anytime / "kd",
        "--repository", anytime / "repo", "--out", anytime / "nope",
        check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "is an N-stage bundle already" in done.stderr
    done = train(
        "compose", kd_bundle, "--tier", anytime / "graph" / "digits", "--data", anytime / "kd",
        "--repository", anytime / "repo", "--out", anytime / "composed",
        check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "exists and is not empty" in done.stderr
