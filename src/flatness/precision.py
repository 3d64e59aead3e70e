"""Autocast (mixed precision) and the curvature passes.

Inside ``torch.autocast`` the penalty's passes run in the autocast dtype like the task loss
(bf16 on CPUs and recent GPUs, fp16 on GPUs), except where low precision breaks an estimator:
the finite-difference backend takes differences of gradients at nearby weights, which rounding
at 8 (bf16) or 11 (fp16) mantissa bits swamps, so its passes run with autocast off
(:func:`full_precision`) and it says so once; ``backend="auto"``'s one-time comparison of the
closed form with autograd also runs in full precision, so that rounding is not mistaken for a
loss that is not a function of the output.

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
from collections.abc import Callable

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
    """The autocast setting of one penalty's curvature passes (module docs); warns once."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.warned = False

    def __call__(self, device_type: str, verifying: Callable[[], bool]) -> contextlib.AbstractContextManager[None]:
        """A context for a pass on ``device_type``; ``verifying()``: whether it is auto's check."""
        dtype = autocast_dtype(device_type)
        if dtype is None:
            return contextlib.nullcontext()
        if self.backend == "finite-difference":
            if not self.warned:
                self.warned = True
                warnings.warn(
                    f"backend='finite-difference' cannot run under {dtype} autocast (rounding swamps its "
                    "differences of gradients): its passes run in full precision",
                    RuntimeWarning, stacklevel=5,
                )
            return full_precision(device_type)
        if self.backend == "auto" and verifying():
            return full_precision(device_type)  # the closed-form check compares in full precision
        return contextlib.nullcontext()
