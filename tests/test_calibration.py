"""The calibration engine against hand computations (and scikit-learn's log loss and Brier score)."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import brier_score_loss, log_loss

from flatness.measures import ECE_BINS, calibration


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def test_multiclass_by_hand():
    # two classes, label 0 throughout; p(class 0) = σ(2), σ(-1), σ(3) for logits (2,0), (0,1), (3,0)
    c = calibration(torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]), torch.tensor([0, 0, 0]))
    p0 = [sigmoid(2), sigmoid(-1), sigmoid(3)]  # 0.881, 0.269, 0.953
    conf = [p0[0], 1 - p0[1], p0[2]]  # the second predicts class 1 (wrong) with 0.731
    correct = [1, 0, 1]
    # confidences 0.881, 0.731, 0.953 fall in bins 13, 10, 14 of 15: one example each
    assert c.counts[13] == c.counts[10] == c.counts[14] == 1 and sum(c.counts) == 3
    assert c.ece == pytest.approx(sum(abs(k - q) for k, q in zip(correct, conf, strict=True)) / 3, abs=1e-12)
    assert c.nll == pytest.approx(-sum(math.log(p) for p in p0) / 3, abs=1e-12)
    assert c.brier == pytest.approx(sum((p - 1) ** 2 + (1 - p) ** 2 for p in p0) / 3, abs=1e-12)
    assert c.accuracy == pytest.approx(2 / 3) and not c.binary and c.bins == ECE_BINS == 15
    assert c.confidence[10] == pytest.approx(conf[1]) and c.bin_accuracy[10] == 0.0
    assert c.confidence[0] is None and c.bin_accuracy[0] is None


def test_examples_of_one_bin_are_averaged_before_the_absolute_value():
    # confidences 0.94 and 0.96 share bin 14, (14/15, 1]; one right, one wrong: |0.5 - 0.95|
    logits = torch.log(torch.tensor([[0.94, 0.06], [0.96, 0.04]], dtype=torch.float64))
    c = calibration(logits, torch.tensor([0, 1]))
    assert c.counts[14] == 2 and c.ece == pytest.approx(0.45, abs=1e-12)
    # not the mean of per-example gaps (0.06 and 0.96)
    assert calibration(logits, torch.tensor([0, 1]), bins=1).ece == pytest.approx(0.45, abs=1e-12)


def test_perfectly_calibrated_predictions_have_zero_ece():
    # four examples at confidence 3/4 of which three are right
    z = torch.full((4,), math.log(3.0), dtype=torch.float64)  # sigmoid: p = 3/4
    c = calibration(z, torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert c.ece == pytest.approx(0.0, abs=1e-15) and c.accuracy == 0.75


def test_binary_single_logit_by_hand_and_against_scikit_learn():
    z = torch.tensor([2.0, -1.0, 0.5])
    y = torch.tensor([1.0, 1.0, 0.0])  # BCE tasks' float labels
    c = calibration(z[:, None], y)
    p = [sigmoid(2.0), sigmoid(-1.0), sigmoid(0.5)]
    conf = [p[0], 1 - p[1], p[2]]  # predictions 1, 0, 1: right, wrong, wrong
    assert c.binary and c.accuracy == pytest.approx(1 / 3)
    assert c.ece == pytest.approx((abs(1 - conf[0]) + conf[1] + conf[2]) / 3, abs=1e-12)
    assert c.brier == pytest.approx(((1 - p[0]) ** 2 + (1 - p[1]) ** 2 + p[2] ** 2) / 3, abs=1e-12)
    assert c.brier == pytest.approx(brier_score_loss([1, 1, 0], p), abs=1e-12)
    assert c.nll == pytest.approx(log_loss([1, 1, 0], p), abs=1e-12)
    assert calibration(z, y) == c  # (N,) and (N, 1) alike


def test_multiclass_against_scikit_learn():
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(200, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (200,), generator=gen)
    c = calibration(logits, y)
    probs = torch.softmax(logits, 1).numpy()
    assert c.nll == pytest.approx(log_loss(y.numpy(), probs, labels=range(5)), rel=1e-10)
    onehot = torch.nn.functional.one_hot(y, 5).numpy()
    assert c.brier == pytest.approx(((probs - onehot) ** 2).sum(1).mean(), rel=1e-10)
    conf = probs.max(1)
    right = probs.argmax(1) == y.numpy()
    ece = sum(abs(right[m].mean() - conf[m].mean()) * m.sum() / 200
              for b in range(15) for m in [(conf > b / 15) & (conf <= (b + 1) / 15)] if m.any())
    assert c.ece == pytest.approx(ece, rel=1e-10)
    assert c.reliability()["count"] == list(c.counts) and sum(c.counts) == 200


@pytest.mark.parametrize("logits, labels, bins", [(torch.zeros(3, 2), torch.zeros(2), 15),
                                                  (torch.zeros(0, 2), torch.zeros(0), 15),
                                                  (torch.zeros(2, 2), torch.zeros(2), 0)])
def test_bad_input_is_refused(logits, labels, bins):
    with pytest.raises(ValueError):
        calibration(logits, labels, bins)
