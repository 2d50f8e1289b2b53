import pytest
import torch

from cascade_server.train.losses import LOSSES

# Golden values computed independently with numpy from the formulas in METHODS.md.
STUDENT = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
TEACHER = torch.tensor([[1.5, 1.0, -2.0], [-1.0, 0.0, 2.0]])
TARGETS = torch.tensor([0, 2])


def test_registry_lists_the_valid_names_on_a_typo():
    with pytest.raises(KeyError, match="choose one of: ce, kd"):
        LOSSES.get("kdd")


def test_ce_golden():
    loss = LOSSES.get("ce")()(STUDENT, None, TARGETS)
    assert float(loss) == pytest.approx(0.621627, abs=1e-5)


def test_kd_golden_pure_teacher_matching():
    loss = LOSSES.get("kd")(a=0.0, b=1.0, temperature=4.0)(STUDENT, TEACHER, TARGETS)
    assert float(loss) == pytest.approx(0.439617, abs=1e-5)


def test_kd_golden_with_label_term():
    loss = LOSSES.get("kd")(a=0.5, b=1.0, temperature=2.0)(STUDENT, TEACHER, TARGETS)
    assert float(loss) == pytest.approx(0.720971, abs=1e-5)


def test_kd_is_zero_when_student_equals_teacher():
    loss = LOSSES.get("kd")(temperature=3.0)(TEACHER, TEACHER, TARGETS)
    assert float(loss) == pytest.approx(0.0, abs=1e-7)
