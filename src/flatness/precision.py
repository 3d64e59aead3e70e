"""Autocast (mixed precision) and the curvature passes.

Inside ``torch.autocast`` the penalty's passes run in the autocast dtype like the task loss
(bf16 on CPUs and recent GPUs, fp16 on GPUs), except where low precision breaks an estimator.
Each estimator declares it (``autocast`` of :class:`flatness.estimators.Support`), and
:class:`PassPrecision` runs the passes of one that does not with autocast off
(:func:`full_precision`) and says so once: the finite-difference backend takes differences of
gradients at nearby weights, which rounding at 8 (bf16) or 11 (fp16) mantissa bits swamps.
``backend="auto"``'s one-time comparison of the closed form with autograd also runs in full
precision (:class:`flatness.estimators.LayerwiseEstimator`), so that rounding is not mistaken
for a loss that is not a function of the output.

Example:
    >>> import torch
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     inside = autocast_dtype("cpu")
    ...     with full_precision("cpu"):
    ...         off = autocast_dtype("cpu")
    >>> inside, off
    (torch.bfloat16, None)
"""

from __future__ import annotations

import contextlib
import warnings

import torch

__all__ = ["autocast_dtype", "full_precision", "PassPrecision"]


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device_type`` here, or ``None`` when it is off."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def full_precision(device_type: str) -> contextlib.AbstractContextManager[None]:
    """The body runs with autocast off on ``device_type`` (in the tensors' own dtypes)."""
    return torch.autocast(device_type, enabled=False)


class PassPrecision:
    """The autocast setting of one estimator's curvature passes (module docs); warns once."""

    def __init__(self) -> None:
        self.warned = False

    def __call__(self, device_type: str, supported: bool, name: str) -> contextlib.AbstractContextManager[None]:
        """A context for a pass of the estimator ``name`` on ``device_type``: the caller's setting, or full precision.

        ``supported`` says whether the estimator supports autocast.
        """
        dtype = autocast_dtype(device_type)
        if dtype is None or supported:
            return contextlib.nullcontext()
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"the {name!r} estimator cannot run under {dtype} autocast (rounding swamps what it "
                "computes, e.g. differences of gradients): its passes run in full precision",
                RuntimeWarning, stacklevel=5,
            )
        return full_precision(device_type)
