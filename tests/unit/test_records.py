"""The run directory's typed records: what the stages write is what they read back."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from cascade_server.policy import decide
from cascade_server.train.records import (
    OutputPolicy,
    Record,
    RunDir,
    StudentMeta,
    StudentSummary,
    TeacherSummary,
)


def test_record_sections_are_typed_and_merged_stage_by_stage(tmp_path):
    run = RunDir(tmp_path / "run")
    run.update_record(name="x", seed=1)
    run.update_record(
        teacher=TeacherSummary(
            arch="cnn", source="trained", seconds=1.0, macs=1000,
            train_accuracy=0.9, val_accuracy=0.8, test_accuracy=0.85,
        )
    )  # fmt: skip
    run.update_record(
        student=StudentSummary(arch="mlp", method="kd", seconds=0.5, macs=10, loss_history=[1.0])
    )
    on_disk = json.loads((run / RunDir.RECORD).read_text())
    assert on_disk["name"] == "x" and on_disk["teacher"]["test_accuracy"] == 0.85
    assert run.record().cost_ratio() == pytest.approx(0.01)
    with pytest.raises(ValidationError):
        run.update_record(teacher={"arch": "cnn"})  # missing fields are refused, not written
    assert Record.model_validate(on_disk) == run.record()


def test_student_meta_gives_the_gateways_output_policy(tmp_path):
    meta = StudentMeta(
        arch="mlp", method="cd3", output_classes=[0, 2, -1], abstain_output=2,
        in_domain_classes=[0, 2],
    )  # fmt: skip
    run = RunDir(tmp_path)
    run.write_student_meta(meta)
    assert run.student_meta() == meta
    policy = meta.policy(num_classes=4)
    assert policy.output_classes == (0, 2, -1) and policy.abstain_output == 2
    np.testing.assert_array_equal(policy.in_domain_outputs, [True, True, False])
    logits = np.array([[5.0, 0.0, 0.0], [0.0, 1.0, 5.0]])
    # The abstain output delegates, as the gateway decides.
    d = policy.decide(logits, 0.0)
    expected = decide(logits, 0.0, abstain_output=2, in_domain_outputs=policy.in_domain_outputs)
    np.testing.assert_array_equal(d.delegate, expected.delegate)
    assert list(d.delegate) == [False, True]
    # Answers are classes, and the abstain output never wins.
    assert list(policy.predictions(logits, 4)) == [0, 2]


def test_a_plain_classifier_policy():
    assert OutputPolicy().decide(np.array([[2.0, 1.0]]), 0.99).delegate.tolist() == [True]
