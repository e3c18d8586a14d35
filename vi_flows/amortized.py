"""Amortized flow posteriors ``q(z | x)``: a Gaussian and flow layers whose parameters are functions of a context.

The context ``c`` is an encoder's output for ``x``. With ``ε ~ N(0, I)``

.. math::  z = f_K(·; c) ∘ … ∘ f_1(·; c)\\,(μ(c) + σ(c) ⊙ ε),

``log q(z | x) = log N(ε; 0, I) − Σ log σ(c) − Σ_k log|det J_{f_k}|``, all in one pass.
This is the VAE posterior of Rezende & Mohamed (2015, §6.2), Kingma et al. (2016) and
Grathwohl et al. (2019). The families and their names: :mod:`vi_flows.families`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .distributions import AffineNormal, FlowDistribution
from .families import AMORTIZED_NAMES, FAMILIES, NAMES, family
from .transforms.base import FlowTransform, check_dim
from .transforms.planar import ConditionalPlanar
from .transforms.radial import ConditionalRadial
from .transforms.sylvester import ConditionalSylvester

__all__ = ["AmortizedFlow", "ConditionalPlanar", "ConditionalRadial", "ConditionalSylvester", "FLOWS"]

#: The families' canonical names (:data:`vi_flows.families.NAMES`); ``flow=`` also takes their aliases.
FLOWS = NAMES
#: Default ``num_flows`` per name, aliases included (``"none"``, ``"coupling"``, ``"spline"``).
DEFAULT_NUM_FLOWS = {name: family(name).num_flows for name in AMORTIZED_NAMES}
#: ``flow_options`` each family accepts, aliases included (CNF, absent: any ContinuousFlow keyword, checked there).
FLOW_OPTIONS = {name: set(family(name).options) for name in AMORTIZED_NAMES if family(name).options}


def _check_count(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class AmortizedFlow(nn.Module):
    r"""``q(z | x) = FlowDistribution(N(μ(c), diag σ(c)²), f(·; c))`` for a context ``c = encoder(x)``.

    ``(μ, softplus⁻¹ σ)`` is a linear head of ``c``; the flow ``f(·; c)`` (``num_flows`` default in brackets,
    reasons in :mod:`vi_flows.families`) is

    * ``"planar"`` / ``"radial"`` (10): layers with per-example parameters from a linear head of ``c``
      (:class:`ConditionalPlanar`, :class:`ConditionalRadial`), as in the paper;
    * ``"sylvester"`` (4): Householder Sylvester layers, every parameter (``R``, ``R̃``, ``b`` and the
      ``num_householder`` reflections of ``Q``) from a linear head of ``c`` (:class:`ConditionalSylvester`),
      as in van den Berg et al. (2018);
    * ``"iaf"`` (2): :class:`~vi_flows.transforms.InverseAutoregressive` layers, reversed in between, ``c``
      feeding every MADE hidden layer (Kingma et al. 2016);
    * ``"realnvp"`` (4; alias ``"coupling"``): :class:`~vi_flows.transforms.AffineCoupling` layers on
      alternating halves, ``c`` an input of every coupling network, each preceded by an
      :class:`~vi_flows.transforms.InvertibleLinear` started at the identity
      (:func:`~vi_flows.transforms.coupling_stack`; ``linear=False`` drops those);
    * ``"nsf"`` (4; alias ``"spline"``): :class:`~vi_flows.transforms.SplineCoupling` layers on alternating
      odd/even halves, ``c`` an input of every coupling network (:func:`~vi_flows.transforms.spline_stack`,
      Durkan et al. 2019). The spline window is in ``z``-space: it suits latents on the scale of an
      ``N(0, I)`` prior;
    * ``"cnf"`` (1 block): :class:`~vi_flows.transforms.ContinuousFlow` blocks whose ODE net takes ``c`` in
      every ConcatSquash gate and shift (not FFJORD's low-rank ``W + U(c)V(c)ᵀ`` hypernetwork);
    * ``"normal"`` (alias ``"none"``): the Gaussian alone (the plain VAE).

    Every flow starts as the identity, so ``q`` starts as the Gaussian.

    Args:
        latent_dim: dimension ``d`` of ``z``.
        context_dim: last dimension of the context.
        flow: a name of :data:`FLOWS` or an alias (:data:`vi_flows.families.ALIASES`).
        num_flows: number of layers (blocks for ``"cnf"``); the family's default when None.
        hidden_dims: MADE widths (IAF), coupling-net widths (RealNVP, NSF), both default ``(3d + 1,)``
            (wider than the input), or ODE-net widths (CNF, default FFJORD's ``(64, 64)``); the other
            families take none.
        **flow_options: the family's options (:attr:`vi_flows.families.Family.options`), passed to
            :class:`~vi_flows.transforms.ContinuousFlow` (any of its keywords),
            :class:`~vi_flows.transforms.InverseAutoregressive` (``sigmoid_bias``, ``activation``),
            :func:`~vi_flows.transforms.coupling_stack` (``linear``, ``linear_init``, ``activation``,
            ``log_scale_bound``), :func:`~vi_flows.transforms.spline_stack` (``bins``, ``bound``,
            ``interleave``, ``activation``) or :class:`ConditionalSylvester` (``num_householder``).

    Call with ``context`` of shape ``(*B, context_dim)``: returns a distribution with batch shape ``B``
    and event shape ``(d,)``; ``rsample_and_log_prob`` gives exact ``log q`` of its own draws (for CNF
    with a Hutchinson trace, an unbiased estimate), ``log_prob`` elsewhere goes through the inverses.
    Use it in a guide under a (subsampled) plate:
    ``with pyro.plate("data", N, subsample_size=B) as i: pyro.sample("z", q(encoder(x[i])))``.
    """

    def __init__(
        self,
        latent_dim: int,
        context_dim: int,
        flow: str = "planar",
        num_flows: int | None = None,
        hidden_dims: Sequence[int] | None = None,
        **flow_options,
    ):
        super().__init__()
        self.latent_dim = check_dim(latent_dim, "latent_dim")
        self.context_dim = check_dim(context_dim, "context_dim")
        fam = family(flow)
        self.flow_name = fam.name
        self.num_flows = fam.num_flows if num_flows is None else _check_count(num_flows, "num_flows", 0)
        if fam.conditional is None and self.num_flows:
            raise ValueError(f"num_flows must be 0 (or None) for flow={flow!r}, got {num_flows!r}")
        if fam.conditional is not None and not self.num_flows:
            raise ValueError(f"num_flows must be an integer >= 1 for flow={flow!r}, got {num_flows!r}")
        if hidden_dims is not None and not fam.hidden_dims:
            takes = [name for name, f in FAMILIES.items() if f.hidden_dims]
            raise ValueError(f"hidden_dims applies to flow in {takes} only, got {hidden_dims!r} with flow={flow!r}")
        unknown = sorted(set(flow_options) - fam.options) if fam.options is not None else []
        if unknown:
            raise ValueError(f"flow options {unknown} do not apply to flow={flow!r}; it takes {sorted(fam.options)}")
        self.head = nn.Linear(context_dim, 2 * latent_dim)
        self.flow: FlowTransform | None = None
        if fam.conditional is not None:
            self.flow = fam.conditional(latent_dim, self.num_flows, context_dim, hidden_dims, **flow_options)

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, context_dim={self.context_dim}, flow={self.flow_name!r}"

    def forward(self, context: Tensor) -> FlowDistribution:
        if not isinstance(context, Tensor) or context.dim() < 1 or context.shape[-1] != self.context_dim:
            shape = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
            raise ValueError(f"context must be a tensor of shape (..., {self.context_dim}), got {shape}")
        loc, scale = self.head(context).chunk(2, -1)
        base = AffineNormal(loc, F.softplus(scale), batch_shape=context.shape[:-1])
        return FlowDistribution(base, [] if self.flow is None else [self.flow.condition(context)])
