"""Training methods behind one interface (:class:`Method`), looked up by name.

Each method module registers itself with :func:`register_method` when imported below.
"""

from .base import METHODS, Method, make_method, method_hparam, register_method
from . import fa as _fa  # noqa: F401  (registers "fa")

__all__ = ["METHODS", "Method", "make_method", "method_hparam", "register_method"]
