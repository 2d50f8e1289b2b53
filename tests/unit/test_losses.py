"""Every loss pinned by a golden value on tiny fixed inputs. The expected numbers were computed
with an independent numpy implementation of the formulas in METHODS.md, not with these modules."""

import pytest
import torch

from cascade_server.train.losses import LOSSES

S2 = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
T2 = torch.tensor([[1.5, 1.0, -2.0], [-1.0, 0.0, 2.0]])
Y2 = torch.tensor([0, 2])

S = torch.tensor([[2.0, 0.5, -1.0, 0.3], [0.1, 0.2, 0.3, -0.4], [1.0, -1.0, 0.5, 0.0]])
T = torch.tensor([[1.5, 1.0, -2.0, 0.0], [-1.0, 0.0, 2.0, 0.5], [3.0, 0.1, 0.0, -1.0]])
Y = torch.tensor([0, 2, 1])


def value(name, *args, **kwargs):
    def run(student, teacher, targets, **extra):
        return float(LOSSES.get(name)(*args, **kwargs)(student, teacher, targets, **extra))

    return run


def test_registry_lists_the_valid_names_on_a_typo():
    with pytest.raises(KeyError, match="choose one of: bdistil, cd1, cd2, cd3, ce, disk, kd"):
        LOSSES.get("kdd")


def test_ce_golden():
    assert value("ce")(S2, None, Y2) == pytest.approx(0.621627, abs=1e-5)


def test_kd_golden_pure_teacher_matching():
    assert value("kd", a=0.0, b=1.0, temperature=4.0)(S2, T2, Y2) == pytest.approx(
        0.439617, abs=1e-5
    )


def test_kd_golden_with_label_term():
    assert value("kd", a=0.5, b=1.0, temperature=2.0)(S2, T2, Y2) == pytest.approx(
        0.720971, abs=1e-5
    )


def test_kd_is_zero_when_student_equals_teacher():
    assert value("kd", temperature=3.0)(T2, T2, Y2) == pytest.approx(0.0, abs=1e-7)


def test_md_golden_mixes_easy_and_hard_items():
    # teacher margins 0.21 (hard), 0.55 and 0.84 (easy) against rho_train 0.4
    md = value("md", a=0.5, b=0.5, alpha=0.6, rho_train=0.4)
    assert md(S, T, Y) == pytest.approx(1.130460, abs=1e-5)


def test_md_targets_are_distributions():
    targets = LOSSES.get("md")().targets(T, Y)
    torch.testing.assert_close(targets.sum(1), torch.ones(3))


def test_cd1_golden():
    assert value("cd1", in_domain=[0, 2], alpha=0.4)(S, T, Y) == pytest.approx(1.570281, abs=1e-5)


def test_cd2_golden():
    assert value("cd2", in_domain=[2, 0], alpha=0.4)(S, T, Y) == pytest.approx(1.087946, abs=1e-5)


def test_cd3_golden_and_shape_check():
    assert value("cd3", in_domain=[0, 2])(S[:, :3], T, Y) == pytest.approx(0.815641, abs=1e-5)
    with pytest.raises(ValueError, match="3 outputs"):
        value("cd3", in_domain=[0, 2])(S, T, Y)


def test_kdplus_golden():
    kdp = value("kdplus", w_ce=1.0, w_kd=1.0, w_mix=1.0, temperature=4.0)
    got = kdp(S, T, Y, student_mix_logits=S.flip(0), teacher_mix_logits=T.flip(0))
    assert got == pytest.approx(2.404974, abs=1e-5)


def test_disk_golden_student_and_guide_steps():
    loss = LOSSES.get("disk")(
        top_k=2, t_teacher=4.0, t_student=3.5, w_aux=0.1, w_nll=0.9, max_ce=5.0
    )
    g = torch.tensor([0.1, 0.5, 0.0])
    assert float(loss.scaffold(S, T, Y, g)) == pytest.approx(10.656928, abs=1e-4)
    assert float(loss(S, T, Y, guide=g)) == pytest.approx(10.799975, abs=1e-4)
    guide = float(loss.guide_loss(S, T, Y, g, lam=2.0, delta=0.3))
    assert guide == pytest.approx(11.564081, abs=1e-4)


def test_bdistil_golden():
    assert value("bdistil", beta=0.5)(0.5 * S, None, Y, residual=T - S) == pytest.approx(
        1.376398, abs=1e-5
    )
