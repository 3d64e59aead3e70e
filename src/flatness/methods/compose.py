r"""Methods composed by name, and the lookup of any method by name.

``"sam+fa"`` = SAM's point with FA's term (see :mod:`flatness.methods.base`); the lookup:
:func:`make_method`, :func:`method_class`.

A composition builds each component as it would be built alone (each validates its own
settings), takes the one component that moves the evaluation point (SAM, GNP's finite
difference, RPR; at most one) and the terms of all of them, in order. The objective at the
point is the task loss plus every component's terms.

Keyword arguments are routed by name: ``rho=0.05`` goes to every component that takes ``rho``;
a prefix picks one component (``**{"fa.seed": 1}``, or ``--method-arg fa.seed=1`` on the
command line). ``seed`` thus seeds every component that draws random numbers. The swept
strength (``hparam``) of a composition is that of its first component that has one (``rho``
for ``"sam+fa"``), the others are set by keyword (or keep their defaults); its protocol
defaults are the union of its components'.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.methods import make_method, method_class
    >>> cls = method_class("sam+fa")
    >>> cls.hparam, cls.protocol_defaults
    ('rho', {'probes': 5, 'every': 10})
    >>> model = nn.Linear(4, 3)
    >>> method = make_method("sam+fa", model, nn.CrossEntropyLoss(), rho=0.05, lam=0.01, seed=0)
    >>> type(method.point).__name__, [type(t).__name__ for t in method.terms]
    ('AscentPoint', ['PenaltyTerm'])
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from torch import nn

from .base import METHODS, Here, LossFn, Method

__all__ = ["compose", "ComposedMethod", "method_class", "make_method", "method_hparam"]


class ComposedMethod(Method):
    """Base of the classes :func:`compose` builds; ``components`` are the method classes."""

    components: tuple[type[Method], ...] = ()

    def __init__(self, model: nn.Module, loss_fn: LossFn, **kwargs: Any) -> None:
        routed = self.route(kwargs)
        self.parts = {c.name: c(model, loss_fn, **routed[c.name]) for c in self.components}
        moving = [m for m in self.parts.values() if not isinstance(m.point, Here)]
        if len(moving) > 1:
            raise ValueError(
                f"{self.name}: at most one component may move the evaluation point, got "
                + " and ".join(m.name for m in moving)
            )
        point = moving[0].point if moving else Here()
        terms = [t for m in self.parts.values() for t in m.terms]
        super().__init__(model, loss_fn, point=point, terms=terms)

    @classmethod
    def route(cls, kwargs: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Each component's keyword arguments (module docs); unknown ones raise ``TypeError``."""
        routed: dict[str, dict[str, Any]] = {c.name: {} for c in cls.components}
        by_name = {c.name: c for c in cls.components}
        for key, value in kwargs.items():
            prefix, dot, bare = key.rpartition(".")
            if dot:
                if prefix not in by_name or not by_name[prefix].accepts(bare):
                    raise TypeError(f"{cls.name}: no component {prefix!r} taking {bare!r}")
                routed[prefix][bare] = value
                continue
            targets = [c for c in cls.components if c.accepts(key)]
            if not targets:
                raise TypeError(f"{cls.name}: no component takes the keyword {key!r}")
            for c in targets:
                routed[c.name][key] = value
        return routed

    @classmethod
    def keywords(cls) -> frozenset[str]:
        """The components' keywords, bare and qualified by their method's name (``sam.rho``)."""
        names = {k for c in cls.components for k in c.keywords()}
        return frozenset(names | {f"{c.name}.{k}" for c in cls.components for k in c.keywords()})

    @classmethod
    def keyword_defaults(cls) -> dict[str, Any]:
        """Each component's defaults under its prefix (``"sam.rho"``): the components' bare names clash."""
        return {f"{c.name}.{k}": v for c in cls.components for k, v in c.keyword_defaults().items()}

    def state_dict(self) -> dict[str, Any]:
        """Each component's state, by its name."""
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore each component's state from its name's entry."""
        for name, part in self.parts.items():
            if name in state:
                part.load_state_dict(state[name])


@functools.cache
def _compose(names: tuple[str, ...]) -> type[Method]:
    classes = []
    for name in names:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r} in {'+'.join(names)!r}; expected some of {sorted(METHODS)}")
        classes.append(METHODS[name])
    if len(set(names)) != len(names) or len(names) < 2:
        raise ValueError(f"a composition names two or more different methods, got {'+'.join(names)!r}")
    first = next((c for c in classes if c.hparam is not None), None)
    defaults: dict[str, Any] = {}
    for c in classes:
        defaults.update(c.protocol_defaults)
    return type(
        "+".join(c.__name__ for c in classes),
        (ComposedMethod,),
        {
            "name": "+".join(names),
            "hparam": None if first is None else first.hparam,
            "symbol": None if first is None else first.symbol,
            "default_grid": () if first is None else first.default_grid,
            "protocol_defaults": defaults,
            "components": tuple(classes),
            "__doc__": f"``--method {'+'.join(names)}``: " + ", then ".join(c.name for c in classes),
        },
    )


def compose(names: Sequence[str]) -> type[Method]:
    """The method class of the composition of the registered methods ``names`` (module docs)."""
    return _compose(tuple(names))


def method_class(name: str) -> type[Method]:
    """The class of method ``name``: a registered one, or a composition ``"a+b"``."""
    if "+" in name:
        return compose(name.split("+"))
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)} or A+B")
    return METHODS[name]


def make_method(name: str, model: nn.Module, loss_fn: LossFn, **hparams: Any) -> Method:
    """Build the method called ``name`` (e.g. ``"fa"``, ``"sam+fa"``) for ``model``."""
    return method_class(name)(model, loss_fn, **hparams)


def method_hparam(name: str) -> str | None:
    """The name of the method's main hyper-parameter (swept like λ), or None."""
    return method_class(name).hparam
