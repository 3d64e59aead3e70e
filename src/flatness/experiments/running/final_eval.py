r"""The final model on the test split beyond its accuracy: calibration and robustness.

Run by :func:`flatness.experiments.running.measure.measure_final` after the fixed flatness
measurement. Neither touches torch's global random state (the robustness noise comes from its
own generator) nor the model (eval mode, modes restored), so every other field of a run record
is what it would be without them.

**Calibration** (every task), on the whole test split, model in eval mode
(:func:`flatness.measures.calibration`: top-label ECE with 15 equal-width bins, NLL, Brier
score; the binary task's single logit through a sigmoid): ``final_test_ece``,
``final_test_nll``, ``final_test_brier`` and the reliability diagram's bins
``final_test_reliability``.

**Robustness** (``final_test_robustness``): accuracy on the first :data:`ROBUSTNESS_EXAMPLES`
test examples (in stored order), clean and perturbed, by the task's ``modality``:

* ``image`` (the cifar100-* tasks): additive Gaussian noise in pixel space (pixels in [0, 1],
  clipped) at σ = 0.04, 0.08, 0.10 — Hendrycks & Dietterich's CIFAR ``gaussian_noise``
  severities 1, 3, 5 — and the four corruptions of
  :mod:`flatness.experiments.world.corruptions` (Gaussian blur, contrast, brightness,
  JPEG-like) at severities 1–5: 24 passes over the subset (about 2.4 passes over the test set);
* ``tabular``: additive N(0, σ²) on the standardised features, σ = 0.1, 0.3, 1.0;
* ``text`` (sparse TF-IDF): additive N(0, (σ·r)²) on the nonzero entries only (the words of a
  document; absent words stay absent), r the root mean square of the subset's nonzero
  entries, σ = 0.1, 0.3, 1.0.

The noise comes from a generator seeded with :data:`ROBUSTNESS_SEED`, drawn in a fixed order:
every run of a task sees the same perturbed inputs, so runs compare paired. The dict holds
``examples``, ``clean_acc``, ``noise_unit``, ``noise_sigma`` and ``noise_acc`` (lists),
``corruption_acc`` (image tasks: name → accuracies at severities 1–5), ``mean_noise_acc``,
``mean_corruption_acc`` (image tasks), ``seconds``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from ...measures.calibration import calibration
from ...utils import call_model, eval_mode
from ..world.corruptions import CORRUPTIONS, corrupt, from_pixels, gaussian_noise, to_pixels
from ..world.data import Splits, iterate_batches, select_rows
from ..world.tasks import Task, TrainConfig
from .training import evaluate

__all__ = ["ROBUSTNESS_EXAMPLES", "ROBUSTNESS_SEED", "NOISE_SIGMAS", "final_calibration",
           "final_robustness", "predict_logits"]

ROBUSTNESS_EXAMPLES = 1000
ROBUSTNESS_SEED = 20240531
NOISE_SIGMAS: dict[str, tuple[float, ...]] = {
    "image": (0.04, 0.08, 0.10),
    "tabular": (0.1, 0.3, 1.0),
    "text": (0.1, 0.3, 1.0),
}
NOISE_UNITS = {
    "image": "pixel values in [0, 1], clipped",
    "tabular": "standardised feature units",
    "text": "RMS of the nonzero TF-IDF entries, nonzero entries only",
}


@torch.no_grad()
def predict_logits(model: nn.Module, x: Any, y: Tensor, batch_size: int) -> Tensor:
    """The model's outputs on ``x`` in eval mode, in order (modes restored)."""
    with eval_mode(model):
        return torch.cat([call_model(model, xb) for xb, _ in iterate_batches(x, y, batch_size, shuffle=False)])


def final_calibration(model: nn.Module, task: Task, splits: Splits, config: TrainConfig) -> dict[str, Any]:
    """``final_test_ece``, ``final_test_nll``, ``final_test_brier``, ``final_test_reliability``.

    None for a (plugin) task without one class label per example (regression, sequences).
    """
    if task.task_type != "classification" or splits.y_test.dim() != 1:
        return {}
    c = calibration(predict_logits(model, splits.x_test, splits.y_test, config.eval_batch_size), splits.y_test)
    return {"final_test_ece": c.ece, "final_test_nll": c.nll, "final_test_brier": c.brier,
            "final_test_reliability": c.reliability()}


def _noisy_text(x: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    values = x.values()
    scale = sigma * float(values.pow(2).mean().sqrt()) if values.numel() else 0.0
    noise = torch.randn(values.shape, generator=generator, dtype=values.dtype).to(values.device)
    return torch.sparse_csr_tensor(x.crow_indices(), x.col_indices(), values + scale * noise, size=x.shape,
                                   check_invariants=False)  # the structure of a valid matrix


def final_robustness(model: nn.Module, task: Task, splits: Splits, config: TrainConfig) -> dict[str, Any]:
    """``final_test_robustness``: accuracies under input noise (and corruptions, image tasks)."""
    start = time.perf_counter()
    n = min(ROBUSTNESS_EXAMPLES, int(splits.y_test.shape[0]))
    x, y = select_rows(splits.x_test, torch.arange(n, device=splits.y_test.device)), splits.y_test[:n]
    images = getattr(task, "modality", "tabular") == "image" and splits.pixel_mean is not None
    # images without their pixel statistics get noise in input units, like tabular features
    modality = "image" if images else ("text" if x.layout == torch.sparse_csr else "tabular")
    generator = torch.Generator().manual_seed(ROBUSTNESS_SEED)

    def accuracy(inputs: Any) -> float:  # the task's score: hits, or a plugin task's own
        return evaluate(model, inputs, y, task.predict, config.eval_batch_size, score=task.score)["acc"]

    sigmas = NOISE_SIGMAS[modality]
    noise_acc = []
    if images:
        pixels = to_pixels(x, splits.pixel_mean, splits.pixel_std)  # type: ignore[arg-type]

        def standardised(p: Tensor) -> Tensor:
            return from_pixels(p, splits.pixel_mean, splits.pixel_std, x)  # type: ignore[arg-type]

        noise_acc = [accuracy(standardised(gaussian_noise(pixels, s, generator))) for s in sigmas]
    elif x.layout == torch.sparse_csr:
        noise_acc = [accuracy(_noisy_text(x, s, generator)) for s in sigmas]
    else:
        for s in sigmas:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            noise_acc.append(accuracy(x + s * noise))
    out: dict[str, Any] = {
        "examples": n,
        "clean_acc": accuracy(x),
        "noise_unit": NOISE_UNITS[modality],
        "noise_sigma": list(sigmas),
        "noise_acc": noise_acc,
        "mean_noise_acc": sum(noise_acc) / len(noise_acc),
    }
    if images:
        out["corruption_acc"] = {
            name: [accuracy(standardised(corrupt(pixels, name, level))) for level in range(1, 6)]
            for name in CORRUPTIONS
        }
        every = [a for accs in out["corruption_acc"].values() for a in accs]
        out["mean_corruption_acc"] = sum(every) / len(every)
    out["seconds"] = time.perf_counter() - start
    return {"final_test_robustness": out}
