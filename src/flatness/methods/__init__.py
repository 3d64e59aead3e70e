r"""Training methods behind one template, looked up by name; ``"a+b"`` composes two.

The template: :class:`Method` = a :class:`Point` + :class:`Term`\ s + one step driver (see
:mod:`flatness.methods.base`, :mod:`flatness.methods.compose`).

Each method module registers itself with :func:`register_method` when imported below.
"""

# The import order is the registration order: METHODS lists the methods as here.
# isort: off
from .base import METHODS, Evaluation, Here, Method, Point, Term, logged, register_method
from . import fa as _fa  # noqa: F401  (registers "fa")
from . import sam as _sam  # noqa: F401  (registers "sam")
from . import gnp as _gnp  # noqa: F401  (registers "gnp")
from . import curvature as _curvature  # noqa: F401  (registers "curvature")
from . import nrs as _nrs  # noqa: F401  (registers "nrs" and "rpr")
# isort: on
from .compose import compose, make_method, method_class, method_hparam

__all__ = [
    "METHODS",
    "Method",
    "Point",
    "Here",
    "Term",
    "Evaluation",
    "logged",
    "make_method",
    "method_class",
    "method_hparam",
    "register_method",
    "compose",
]
