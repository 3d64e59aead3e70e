"""flatness: flatness-aware training of neural networks with PyTorch.

The core is the FA-regularization penalty λ·Tr(H²)/B (:class:`FlatnessPenalty`) built on a
differentiable Hutchinson estimator of Tr(H²) (:func:`sq_trace`).
"""

from .hutchinson import Estimate, hvp, measure_sq_trace, sample_probes, sq_trace, sq_trace_samples
from .penalties import FlatnessPenalty, NonFiniteCurvatureError
from .utils import FlatnessError, eval_mode, preserved_mode

__version__ = "0.1.0"

__all__ = [
    "Estimate",
    "FlatnessError",
    "FlatnessPenalty",
    "NonFiniteCurvatureError",
    "eval_mode",
    "hvp",
    "measure_sq_trace",
    "preserved_mode",
    "sample_probes",
    "sq_trace",
    "sq_trace_samples",
    "__version__",
]
