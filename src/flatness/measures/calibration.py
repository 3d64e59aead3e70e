r"""Calibration of a classifier's probabilities: expected calibration error, NLL, Brier score.

From logits and labels of N examples, with p_i the predicted probability vector, ŷ_i its top
label and c_i = max_k p_ik its confidence:

.. math::

    \mathrm{ECE} = \sum_{b=1}^{B} \frac{|S_b|}{N}\,\Big|\operatorname{acc}(S_b) - \operatorname{conf}(S_b)\Big|,
    \qquad
    \mathrm{NLL} = -\frac1N \sum_i \log p_{i, y_i},
    \qquad
    \mathrm{Brier} = \frac1N \sum_i \sum_k \big(p_{ik} - [y_i = k]\big)^2,

with S_b the examples whose confidence falls in the b-th of B equal-width bins
((b−1)/B, b/B] (the first also holds 0), acc and conf their accuracy and mean confidence: the
top-label ECE of Guo et al. (2017), B = 15 by default. Multi-class logits ``(N, K)`` go
through a softmax. A single logit per example (``(N,)`` or ``(N, 1)``, binary cross-entropy
tasks) goes through a sigmoid, p = σ(z): the top label is 1 when p > 1/2, its confidence
max(p, 1 − p), the NLL the binary cross-entropy, and the Brier score the usual binary one,
(p − y)² averaged (scikit-learn's ``brier_score_loss``; half the two-class sum above).
Computed in float64.

Example:
    >>> import torch
    >>> from flatness.measures import calibration
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    >>> c = calibration(logits, torch.tensor([0, 0, 0]))
    >>> round(c.accuracy, 4), c.counts[13], c.counts[10]  # confidences 0.881, 0.731, 0.953
    (0.6667, 1, 1)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["ECE_BINS", "Calibration", "calibration"]

ECE_BINS = 15


@dataclass(frozen=True)
class Calibration:
    """ECE, NLL, Brier score and accuracy, with the reliability diagram's bins.

    ``counts[b]``, ``confidence[b]``, ``bin_accuracy[b]``: examples in bin b and their mean
    confidence and accuracy (``None`` for an empty bin).
    """

    ece: float
    nll: float
    brier: float
    accuracy: float
    binary: bool
    counts: tuple[int, ...]
    confidence: tuple[float | None, ...]
    bin_accuracy: tuple[float | None, ...]

    @property
    def bins(self) -> int:
        """The number of confidence bins."""
        return len(self.counts)

    def reliability(self) -> dict[str, Any]:
        """The reliability diagram as plain data: ``bins``, ``count``, ``confidence``, ``accuracy``."""
        return {"bins": self.bins, "count": list(self.counts), "confidence": list(self.confidence),
                "accuracy": list(self.bin_accuracy)}


def calibration(logits: Tensor, labels: Tensor, bins: int = ECE_BINS) -> Calibration:
    """Calibration of ``logits`` (``(N, K)``, or one logit per example) against ``labels``.

    Raises:
        ValueError: empty input, mismatched sizes, or ``bins`` < 1.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    z = logits.detach().double().cpu()
    y = labels.detach().cpu().long().reshape(-1)
    binary = z.dim() == 1 or (z.dim() == 2 and z.shape[1] == 1)
    z = z.reshape(-1) if binary else z
    if z.shape[0] == 0 or z.shape[0] != y.shape[0]:
        raise ValueError(f"need as many logits as labels (> 0), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if binary:
        p = torch.sigmoid(z)
        predicted = (p > 0.5).long()
        confidence = torch.maximum(p, 1 - p)
        nll = float(F.binary_cross_entropy_with_logits(z, y.double()))
        brier = float((p - y).pow(2).mean())
    else:
        probs = torch.softmax(z, dim=1)
        confidence, predicted = probs.max(dim=1)
        nll = float(F.cross_entropy(z, y))
        brier = float((probs - F.one_hot(y, z.shape[1]).double()).pow(2).sum(dim=1).mean())
    correct = (predicted == y).double()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    counts = torch.bincount(index, minlength=bins)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence)
    correct_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    n = int(y.shape[0])
    ece = float((conf_sum - correct_sum).abs().sum() / n)
    filled = counts > 0
    mean_conf = [float(s / c) if f else None for s, c, f in zip(conf_sum, counts, filled, strict=True)]
    mean_acc = [float(s / c) if f else None for s, c, f in zip(correct_sum, counts, filled, strict=True)]
    return Calibration(
        ece=ece, nll=nll, brier=brier, accuracy=float(correct.mean()), binary=binary,
        counts=tuple(int(c) for c in counts), confidence=tuple(mean_conf), bin_accuracy=tuple(mean_acc),
    )
