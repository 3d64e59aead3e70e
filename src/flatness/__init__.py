"""flatness: flatness-aware training of neural networks with PyTorch.

The core is the FA-regularization penalty λ·Tr(H²)/B (:class:`FlatnessPenalty`) built on a
differentiable Hutchinson estimator of Tr(H²) (:func:`sq_trace`). The library is this package's
top level — :mod:`.probes` (random probes and seeding), :mod:`.hutchinson` (Hessian-vector
products, Tr(H²) estimators), :mod:`.layerwise` (closed-form per-layer engines),
:mod:`.penalties`, :mod:`.methods`, :mod:`.measures`, :mod:`.landscape` — and never imports the
paper's pipeline (:mod:`flatness.experiments`) or the command line (:mod:`flatness.cli`).
"""

from . import _aliases
from .batch_loss import ModelLoss
from .hutchinson import Estimate, hvp, measure_sq_trace, sq_trace, sq_trace_samples
from .penalties import FlatnessPenalty, NonFiniteCurvatureError
from .probes import make_generator, sample_probes
from .utils import FlatnessError, eval_mode, preserved_mode

__version__ = "0.2.0"

_aliases.install()

# Loaded on first use: the monitor imports the measures (SciPy), which `import flatness` does not.
_LAZY = {"CurvatureMonitor": "flatness.monitor"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    # the 0.1 import paths (flatness.tasks, ...) for one more release
    raise AttributeError(f"module 'flatness' has no attribute {name!r}")

__all__ = [
    "CurvatureMonitor",
    "Estimate",
    "FlatnessError",
    "FlatnessPenalty",
    "ModelLoss",
    "NonFiniteCurvatureError",
    "eval_mode",
    "hvp",
    "make_generator",
    "measure_sq_trace",
    "preserved_mode",
    "sample_probes",
    "sq_trace",
    "sq_trace_samples",
    "__version__",
]
