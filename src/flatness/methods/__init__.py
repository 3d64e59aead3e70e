"""Training methods behind one interface (:class:`Method`), looked up by name.

Each method module registers itself with :func:`register_method` when imported below.
"""

from .base import METHODS, Method, make_method, method_hparam, register_method
from . import fa as _fa  # noqa: F401  (registers "fa")
from . import sam as _sam  # noqa: F401  (registers "sam")
from . import gnp as _gnp  # noqa: F401  (registers "gnp")
from . import curvature as _curvature  # noqa: F401  (registers "curvature")
from . import nrs as _nrs  # noqa: F401  (registers "nrs" and "rpr")

__all__ = ["METHODS", "Method", "make_method", "method_hparam", "register_method"]
