"""Flatness measures of a trained model: curvature, sharpness, noise robustness, divergence.

One estimator per module; every function takes ``(model, loss_fn, batches)``
with ``batches`` an iterable of ``(x, y)`` and ``loss_fn`` the batch-mean loss, averages over
all of the data, runs the model in eval mode and restores its train/eval flags, and never writes
to its parameters or buffers.

- :mod:`.operator`: :class:`HessianOperator`, the matrix-free data-set Hessian (a
  :class:`LinearOperator`: ``@``, ``shape``, ``dtype``, ``device``, ``to_scipy()``);
- :mod:`.trace`: Tr(H) by Hutchinson and Hutch++; :mod:`.sq_trace`: Tr(H²);
- :mod:`.eigen`: top-k eigenvalues (thick-restart Lanczos), condition number, effective dimension,
  per-layer blocks; :mod:`.density`: SLQ spectral density and its plot;
- :mod:`.sharpness`: ε-sharpness and adaptive sharpness; :mod:`.noise`: expected loss under
  Gaussian weight noise; :mod:`.local_entropy`: Entropy-SGD's local entropy by Langevin
  sampling; :mod:`.fisher`: empirical Fisher trace; :mod:`.divergence`: NRS model divergence;
  :mod:`.summary`: several at once, :func:`final_measures`;
- :mod:`.calibration`: expected calibration error, NLL and Brier score of predictions (not a
  flatness measure: what flatness is said to predict);
- reference measures of Jiang et al. (2019): :mod:`.norms` (parameter norm, path norm, distance
  from initialisation), :mod:`.margin` (output margin), :mod:`.pac_bayes` (PAC-Bayes flatness
  and bounds); :mod:`.reparam`: the function-preserving rescaling of Dinh et al. (2017).
"""

from ..per_example import per_example_sq_grad_norms
from .calibration import ECE_BINS, Calibration, calibration
from .density import SpectralDensity, density_of, lanczos, plot_spectral_density, spectral_density
from .divergence import kl_from_logits, model_divergence
from .eigen import (
    Spectrum,
    eigenvalues_of,
    last_layer,
    layer_top_eigenvalues,
    module_params,
    top_eigenvalues,
)
from .fisher import fisher_trace
from .local_entropy import LocalEntropy, local_entropy, quadratic_local_entropy
from .margin import Margin, margins_of, output_margin, zero_one_error
from .noise import NoisyLoss, noisy_loss
from .norms import distance_from_init, parameter_norm, path_norm
from .operator import HessianOperator, LinearOperator
from .pac_bayes import PacBayes, pac_bayes
from .reparam import Change, reparametrization_check, rescale_layers
from .sharpness import Sharpness, adaptive_sharpness, eps_sharpness
from .sq_trace import hessian_sq_trace, sq_trace_of
from .summary import DEFAULT_MEASURES, MEASURES, MeasureOptions, compute_measures, final_measures
from .trace import hessian_trace, hutchinson_trace, hutchpp_trace

__all__ = [
    "LinearOperator",
    "HessianOperator",
    "hutchinson_trace",
    "hutchpp_trace",
    "hessian_trace",
    "sq_trace_of",
    "hessian_sq_trace",
    "Spectrum",
    "eigenvalues_of",
    "top_eigenvalues",
    "layer_top_eigenvalues",
    "module_params",
    "last_layer",
    "SpectralDensity",
    "lanczos",
    "density_of",
    "spectral_density",
    "plot_spectral_density",
    "Sharpness",
    "eps_sharpness",
    "adaptive_sharpness",
    "NoisyLoss",
    "noisy_loss",
    "LocalEntropy",
    "local_entropy",
    "quadratic_local_entropy",
    "fisher_trace",
    "per_example_sq_grad_norms",
    "kl_from_logits",
    "model_divergence",
    "MeasureOptions",
    "MEASURES",
    "DEFAULT_MEASURES",
    "compute_measures",
    "final_measures",
    "parameter_norm",
    "path_norm",
    "distance_from_init",
    "Margin",
    "margins_of",
    "output_margin",
    "zero_one_error",
    "PacBayes",
    "pac_bayes",
    "Change",
    "rescale_layers",
    "ECE_BINS",
    "Calibration",
    "calibration",
    "reparametrization_check",
]
