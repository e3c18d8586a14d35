"""The registry of flow families: one vocabulary for ``vi-flows fit --guide``, :class:`~vi_flows.AmortizedFlow`,
the demo and the benchmark scripts.

Each :class:`Family` gives, under one name, the guide (a :mod:`vi_flows.guides` class: ``q(z)`` for one
posterior), the builder of the conditional flow ``f(·; c)`` of an amortized posterior ``q(z | x)``, the
amortized default number of layers and the options it accepts. The names are the command line's;
:data:`ALIASES` keeps the older amortized names working (``"none"``, ``"coupling"``, ``"spline"``).

>>> from vi_flows.families import FAMILIES, family
>>> family("coupling").name, FAMILIES["realnvp"].guide.__name__
('realnvp', 'AutoRealNVP')
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from . import guides
from .transforms.autoregressive import iaf_stack
from .transforms.base import FlowTransform
from .transforms.coupling import coupling_stack
from .transforms.planar import ConditionalPlanar
from .transforms.radial import ConditionalRadial
from .transforms.spline import spline_stack
from .transforms.stack import stack
from .transforms.sylvester import ConditionalSylvester

__all__ = ["ALIASES", "AMORTIZED_NAMES", "FAMILIES", "NAMES", "Family", "canonical", "family"]

#: ``(latent_dim, num_flows, context_dim, hidden_dims, **options) -> f(·; c)``, a layer with ``context_dim > 0``.
ConditionalBuilder = Callable[..., FlowTransform]


@dataclass(frozen=True)
class Family:
    """One flow family.

    Attributes:
        name: the canonical name (``vi-flows fit --guide NAME``, ``AmortizedFlow(flow=NAME)``).
        guide: the :mod:`vi_flows.guides` class of ``q(z)``; the plain Gaussian is :class:`~vi_flows.AutoFlow`
            with no layers.
        conditional: builds the amortized flow ``f(·; c)``; None for the Gaussian alone.
        num_flows: the amortized default number of layers (blocks for ``cnf``; 0 for the Gaussian).
        options: the ``flow_options`` the amortized flow accepts; None: any keyword of the layer, checked there.
        hidden_dims: whether the amortized flow takes ``hidden_dims`` (network widths).
        aliases: older names that mean this family.
    """

    name: str
    guide: type
    conditional: ConditionalBuilder | None
    num_flows: int
    options: frozenset[str] | None = frozenset()
    hidden_dims: bool = False
    aliases: tuple[str, ...] = field(default=())

    @property
    def guide_num_flows(self) -> int | None:
        """The guide's default ``num_flows`` (read from its signature); None where it has no flow layers."""
        parameter = inspect.signature(self.guide).parameters.get("num_flows")
        return None if parameter is None else parameter.default


def _width(latent_dim: int, hidden_dims: Sequence[int] | None) -> Sequence[int]:
    # 3d + 1: a network wider than its input, the MADE default (Germain et al. 2015), also for the couplings
    return (3 * latent_dim + 1,) if hidden_dims is None else hidden_dims


def _planar(d: int, k: int, c: int, hidden_dims, **options) -> FlowTransform:
    return ConditionalPlanar(d, k, c, **options)


def _radial(d: int, k: int, c: int, hidden_dims, **options) -> FlowTransform:
    return ConditionalRadial(d, k, c, **options)


def _sylvester(d: int, k: int, c: int, hidden_dims, **options) -> FlowTransform:
    return ConditionalSylvester(d, k, c, **options)


def _iaf(d: int, k: int, c: int, hidden_dims, **options) -> FlowTransform:
    return iaf_stack(d, k, hidden_dims, c, **options)


def _realnvp(d: int, k: int, c: int, hidden_dims, **options) -> FlowTransform:
    # linear_init="identity": the flow starts as the identity, so q starts as its Gaussian
    return coupling_stack(d, k, _width(d, hidden_dims), c, **{"linear_init": "identity", **options})


def _nsf(d: int, k: int, c: int, hidden_dims, **options) -> FlowTransform:
    return spline_stack(d, k, _width(d, hidden_dims), context_dim=c, **options)


def _cnf(d: int, k: int, c: int, hidden_dims, **options) -> FlowTransform:
    from .transforms.continuous import ContinuousFlow  # torchdiffeq (and scipy): on first use

    hidden = (64, 64) if hidden_dims is None else hidden_dims  # FFJORD's ODE-net widths
    if k == 1:
        return ContinuousFlow(d, hidden, c, **options)
    return stack(lambda: ContinuousFlow(d, hidden, c, **options), k, dim=d)


# Amortized defaults (why each): planar/radial 10, one layer is a single rank-one or radial bend at O(d) per
# example, so it takes several; Sylvester 4, one layer is already a rank-d update at O(H d²) per example; IAF 2,
# one layer transforms every coordinate through a full MADE pass; RealNVP/NSF 4, a coupling transforms half the
# coordinates, so 4 transform each one twice; CNF 1, one block is a free-form map and costs an ODE solve.
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("normal", guides.AutoFlow, None, 0, aliases=("none",)),
        Family("planar", guides.AutoPlanar, _planar, 10),
        Family("radial", guides.AutoRadial, _radial, 10),
        Family("iaf", guides.AutoIAF, _iaf, 2, frozenset({"activation", "sigmoid_bias"}), hidden_dims=True),
        Family(
            "realnvp",
            guides.AutoRealNVP,
            _realnvp,
            4,
            frozenset({"linear", "linear_init", "activation", "log_scale_bound"}),
            hidden_dims=True,
            aliases=("coupling",),
        ),
        Family("sylvester", guides.AutoSylvester, _sylvester, 4, frozenset({"num_householder"})),
        Family(
            "nsf",
            guides.AutoNSF,
            _nsf,
            4,
            frozenset({"bins", "bound", "interleave", "activation"}),
            hidden_dims=True,
            aliases=("spline",),
        ),
        Family("cnf", guides.AutoCNF, _cnf, 1, None, hidden_dims=True),
    )
}
#: The canonical names, in the command line's order.
NAMES: tuple[str, ...] = tuple(FAMILIES)
#: Older name -> canonical name.
ALIASES: dict[str, str] = {alias: f.name for f in FAMILIES.values() for alias in f.aliases}
#: Every name ``AmortizedFlow(flow=...)`` accepts: the canonical ones, then the aliases.
AMORTIZED_NAMES: tuple[str, ...] = (*NAMES, *ALIASES)


def canonical(name: str) -> str:
    """The canonical name of ``name`` (itself or the family it is an alias of); ValueError if unknown."""
    if isinstance(name, str) and name in FAMILIES:
        return name
    if isinstance(name, str) and name in ALIASES:
        return ALIASES[name]
    aliases = ", ".join(f"{a!r} for {c!r}" for a, c in ALIASES.items())
    raise ValueError(f"flow must be one of {list(NAMES)} (or the older {aliases}), got {name!r}")


def family(name: str) -> Family:
    """The :class:`Family` called ``name`` or one of its aliases."""
    return FAMILIES[canonical(name)]
