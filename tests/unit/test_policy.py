import numpy as np
import pytest

from cascade_server.policy import NonFiniteLogits, decide, softmax, top2_margin


def test_softmax_rows_sum_to_one_and_are_shift_invariant():
    logits = np.array([[1.0, 2.0, 3.0], [1001.0, 1002.0, 1003.0]])
    p = softmax(logits)
    np.testing.assert_allclose(p.sum(1), 1.0)
    np.testing.assert_allclose(p[0], p[1])
    np.testing.assert_allclose(p[0], np.exp([1, 2, 3]) / np.exp([1, 2, 3]).sum())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_softmax_rejects_non_finite(bad):
    with pytest.raises(NonFiniteLogits):
        softmax(np.array([[0.0, bad, 1.0]]))


def test_softmax_rejects_fewer_than_two_classes():
    with pytest.raises(ValueError, match="classes>=2"):
        softmax(np.array([[1.0]]))


def test_margin_is_top1_minus_top2():
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.5, 0.0], [0.2, 0.2, 0.6]])
    np.testing.assert_allclose(top2_margin(probs), [0.3, 0.0, 0.4])


def test_two_classes_margin_is_the_difference():
    p = softmax(np.array([[0.0, np.log(3.0)]]))  # probabilities 0.25 and 0.75
    np.testing.assert_allclose(top2_margin(p), [0.5])


def test_tie_has_zero_margin_and_is_delegated_for_any_positive_threshold():
    d = decide(np.array([[2.0, 2.0, -1.0]]), threshold=1e-9)
    assert d.margins[0] == 0.0
    assert d.delegate.tolist() == [True]


def test_delegation_is_strictly_below_threshold():
    logits = np.array([[0.0, np.log(3.0)]])  # margin exactly 0.5
    margin = top2_margin(softmax(logits))[0]
    assert decide(logits, threshold=margin).delegate.tolist() == [False]
    assert decide(logits, threshold=np.nextafter(margin, 1)).delegate.tolist() == [True]


def test_threshold_zero_never_delegates_and_one_delegates_every_uncertain_item():
    logits = np.array([[5.0, 0.0, 0.0], [1.0, 0.9, 0.0], [0.0, 0.0, 0.0]])
    assert not decide(logits, 0.0).delegate.any()
    assert decide(logits, 1.0).delegate.all()


def test_non_finite_rows_are_delegated_and_others_decided_normally():
    logits = np.array([[np.nan, 0.0], [10.0, 0.0], [np.inf, 1.0]])
    d = decide(logits, threshold=0.5)
    assert d.non_finite.tolist() == [True, False, True]
    assert d.delegate.tolist() == [True, False, True]
    assert np.isfinite(d.probs).all()


def test_abstain_output_is_delegated_whatever_its_margin():
    from cascade_server.policy import decide

    logits = np.array([[0.0, 0.0, 9.0], [9.0, 0.0, 0.0]])  # row 0: abstain wins clearly
    d = decide(logits, threshold=0.1, abstain_output=2)
    assert d.delegate.tolist() == [True, False]


def test_out_of_domain_argmax_is_delegated():
    logits = np.array([[9.0, 0.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 9.0]])
    d = decide(logits, threshold=0.1, in_domain_outputs=np.array([True, False, True]))
    assert d.delegate.tolist() == [False, True, False]


def test_class_probabilities_drop_abstain_and_map_outputs_to_classes():
    from cascade_server.policy import class_probabilities

    probs = np.array([[0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])  # outputs: class 4, class 1, abstain
    out = class_probabilities(probs, (4, 1, -1), 5)
    np.testing.assert_allclose(out[0], [0, 0.6, 0, 0, 0.4])
    np.testing.assert_allclose(out[1], [0.2] * 5)  # nothing but abstain: uniform
    assert class_probabilities(probs, None, 3) is probs
