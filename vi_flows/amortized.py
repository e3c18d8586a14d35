"""Amortized flow posteriors ``q(z | x)``: a Gaussian and flow layers whose parameters are functions of a context.

The context ``c`` is an encoder's output for ``x``. With ``ε ~ N(0, I)``

.. math::  z = f_K(·; c) ∘ … ∘ f_1(·; c)\\,(μ(c) + σ(c) ⊙ ε),

``log q(z | x) = log N(ε; 0, I) − Σ log σ(c) − Σ_k log|det J_{f_k}|``, all in one pass.
This is the VAE posterior of Rezende & Mohamed (2015, §6.2), Kingma et al. (2016) and
Grathwohl et al. (2019).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributions import AffineNormal, FlowDistribution
from .transforms.autoregressive import iaf_stack
from .transforms.base import FlowTransform, check_dim
from .transforms.continuous import ContinuousFlow
from .transforms.coupling import coupling_stack
from .transforms.planar import identity_u, planar_call, planar_inverse, planar_u_hat
from .transforms.radial import identity_beta_raw, radial_alpha_beta, radial_call, radial_inverse
from .transforms.spline import spline_stack
from .transforms.stack import stack
from .transforms.sylvester import (
    householder_product,
    identity_diag_raw,
    sylvester_call,
    sylvester_diagonals,
    sylvester_inverse,
)

__all__ = ["AmortizedFlow", "ConditionalPlanar", "ConditionalRadial", "ConditionalSylvester", "FLOWS"]

FLOWS = ("none", "planar", "radial", "sylvester", "iaf", "coupling", "spline", "cnf")
DEFAULT_NUM_FLOWS = {
    "none": 0,
    "planar": 10,
    "radial": 10,
    "sylvester": 4,
    "iaf": 2,
    "coupling": 4,
    "spline": 4,
    "cnf": 1,
}
# flow_options each family accepts (CNF: any ContinuousFlow keyword, checked there)
FLOW_OPTIONS = {
    "iaf": {"activation", "sigmoid_bias"},
    "coupling": {"linear", "linear_init", "activation", "log_scale_bound"},
    "spline": {"bins", "bound", "interleave", "activation"},
    "sylvester": {"num_householder"},
}


def _check_count(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _batch(x: Tensor, context: Tensor) -> None:
    try:
        torch.broadcast_shapes(x.shape[:-1], context.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"context batch shape {tuple(context.shape[:-1])} does not broadcast with the input batch shape "
            f"{tuple(x.shape[:-1])}"
        ) from None


class _ConditionalStack(FlowTransform):
    """``num_flows`` layers of one family whose parameters come from a linear head of the context.

    Subclasses give ``params(context)`` (one tuple per layer, each parameter of shape
    ``(*batch_c, ...)``, broadcasting against inputs) and the functional ``_layer_call``/``_layer_inverse``.
    """

    def __init__(self, dim: int, num_flows: int, context_dim: int):
        super().__init__(dim)
        self.num_flows = _check_count(num_flows, "num_flows", 1)
        self.context_dim = check_dim(context_dim, "context_dim")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_flows={self.num_flows}, context_dim={self.context_dim}"

    def _heads(self, context: Tensor, *sizes: int) -> list[Tensor]:
        return [h(context).unflatten(-1, (self.num_flows, s)) for h, s in zip(self.heads, sizes)]

    def transform(self, x: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        _batch(x, context)
        total = 0.0
        for p in self.params(context):
            x, ladj = self._layer_call(x, *p)
            total = total + ladj
        return x, total

    def invert(self, y: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        _batch(y, context)
        for p in reversed(self.params(context)):
            y = self._layer_inverse(y, *p)
        return y, self.transform(y, context)[1]

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise ValueError(
            f"{type(self).__name__} has context_dim={self.context_dim}: call .condition(context) "
            "and use the transform it returns"
        )

    _inverse = _call_and_ladj


class ConditionalPlanar(_ConditionalStack):
    r"""Planar layers ``y = x + û(c) tanh(w(c)ᵀx + b(c))`` with ``(u, w, b)`` linear in the context ``c``.

    Per example and layer, ``w = W_w c + a_w``, ``b = W_b c + a_b`` and
    ``u = W_u c + a_u + u₀(w)``, where ``u₀(w)`` (see :func:`~vi_flows.transforms.planar.identity_u`)
    makes ``û = 0``; ``W_u, a_u`` start at zero, so every layer starts as the identity for every context.
    ``û`` and the log-determinant are those of :class:`~vi_flows.transforms.Planar`.

    Reference: Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015, §6.2.
    """

    def __init__(self, dim: int, num_flows: int, context_dim: int):
        super().__init__(dim, num_flows, context_dim)
        k = self.num_flows
        self.heads = nn.ModuleList([nn.Linear(context_dim, k * dim), nn.Linear(context_dim, k * dim)])
        self.heads.append(nn.Linear(context_dim, k))
        nn.init.zeros_(self.heads[1].weight)
        nn.init.zeros_(self.heads[1].bias)

    def params(self, context: Tensor) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """``(w, b, û, wᵀû)`` per layer, of shapes ``(*batch_c, d)`` (``w, û``) and ``(*batch_c,)`` (``b, wᵀû``)."""
        w, u, b = self._heads(context, self.dim, self.dim, 1)
        u_hat, wu_hat = planar_u_hat(u + identity_u(w), w)
        return list(zip(w.unbind(-2), b.squeeze(-1).unbind(-1), u_hat.unbind(-2), wu_hat.unbind(-1)))

    _layer_call = staticmethod(planar_call)
    _layer_inverse = staticmethod(planar_inverse)


class ConditionalRadial(_ConditionalStack):
    r"""Radial layers ``y = x + β(c) (x − x₀(c))/(α(c) + ‖x − x₀(c)‖)`` with ``(x₀, α', β')`` linear in ``c``.

    ``α = softplus(α')``, ``β = −α + softplus(β')`` as in :class:`~vi_flows.transforms.Radial`;
    ``β' = W_β c + a_β + β'₀(α')`` with ``β'₀`` giving ``β = 0`` and ``W_β, a_β`` starting at zero,
    so every layer starts as the identity.

    Reference: Rezende & Mohamed, ICML 2015; van den Berg, Hasenclever, Tomczak, Welling,
    "Sylvester Normalizing Flows for Variational Inference", UAI 2018 (amortized radial baseline).
    """

    def __init__(self, dim: int, num_flows: int, context_dim: int):
        super().__init__(dim, num_flows, context_dim)
        k = self.num_flows
        self.heads = nn.ModuleList([nn.Linear(context_dim, k * dim), nn.Linear(context_dim, k)])
        self.heads.append(nn.Linear(context_dim, k))
        nn.init.zeros_(self.heads[2].weight)
        nn.init.zeros_(self.heads[2].bias)

    def params(self, context: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        """``(x₀, α, β)`` per layer, shapes ``(*batch_c, d)``, ``(*batch_c,)``, ``(*batch_c,)``."""
        x0, alpha_raw, beta_raw = self._heads(context, self.dim, 1, 1)
        alpha_raw = alpha_raw.squeeze(-1)
        alpha, beta = radial_alpha_beta(alpha_raw, beta_raw.squeeze(-1) + identity_beta_raw(alpha_raw))
        return list(zip(x0.unbind(-2), alpha.unbind(-1), beta.unbind(-1)))

    _layer_call = staticmethod(radial_call)
    _layer_inverse = staticmethod(radial_inverse)


class ConditionalSylvester(_ConditionalStack):
    r"""Householder Sylvester layers ``y = x + Q(c) R(c) tanh(R̃(c) Q(c)ᵀ x + b(c))``, all amortized.

    As in van den Berg et al.'s amortized Householder Sylvester flow, every parameter is a linear head of the
    context, per example and layer: one ``d × d`` matrix whose strict upper triangle is ``R``'s and whose
    strict lower triangle, transposed, is ``R̃``'s; the diagonals ``(a, ρ)`` of
    :class:`~vi_flows.transforms.Sylvester` (``R̃_ii = exp ρ_i``, ``R_ii R̃_ii = −1 + δ + softplus(a_i) > −1``);
    ``b``; and the ``num_householder`` vectors whose reflections make ``Q(c)`` (amortized too, not shared).
    The heads of ``R``'s entries start at zero (``R = 0``), so every layer starts as the identity for
    every context. Cost per example and layer: ``O(H d²)`` to form ``Q``, ``O(d²)`` to apply it; the
    inverse is :func:`~vi_flows.transforms.sylvester.sylvester_inverse` (back substitution).

    The heads read ``c / √C`` (``C = context_dim``). Under Adam a head weight moves by about ``lr`` per
    step whatever its gradient, so an output ``Wc + a`` moves by about ``lr ‖c‖₁``; with
    ``d² + (num_householder + 3) d`` outputs per layer, unscaled heads made the flow per-example noise
    within a few steps and its gradient into ``c`` outgrew the Gaussian head's (2.4× after one epoch of
    the digits VAE, whose encoder then collapsed: ``docs/benchmarks.md``). The scale divides both by ``√C``.

    Reference: van den Berg, Hasenclever, Tomczak, Welling, "Sylvester Normalizing Flows for Variational
    Inference", UAI 2018, §3 and their amortized implementation.
    """

    def __init__(self, dim: int, num_flows: int, context_dim: int, num_householder: int | None = None):
        super().__init__(dim, num_flows, context_dim)
        h = min(dim, 8) if num_householder is None else _check_count(num_householder, "num_householder", 1)
        self.num_householder = h
        k = self.num_flows
        # heads: full (R above, R̃ below the diagonal), diag_raw a, log R̃_ii ρ, b, Householder vectors
        sizes = (dim * dim, dim, dim, dim, h * dim)
        self.heads = nn.ModuleList([nn.Linear(context_dim, k * s) for s in sizes])
        with torch.no_grad():
            full = self.heads[0]
            upper = torch.ones(dim, dim, dtype=torch.bool).triu(1).repeat(k, 1, 1).flatten()
            full.weight[upper] = 0.0
            full.bias[upper] = 0.0
            full.weight.mul_(1 / math.sqrt(dim))  # R̃'s rows: the scale of Sylvester's init
            nn.init.zeros_(self.heads[1].weight)
            nn.init.constant_(self.heads[1].bias, identity_diag_raw())
            nn.init.zeros_(self.heads[2].weight)
            nn.init.zeros_(self.heads[2].bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_householder={self.num_householder}"

    def params(self, context: Tensor) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """``(Q, R, R̃, b)`` per layer, of shapes ``(*batch_c, d, d)`` and ``(*batch_c, d)`` (``b``)."""
        d = self.dim
        context = context * self.context_dim**-0.5
        full, diag_raw, log_rt_diag, b, v = self._heads(context, d * d, d, d, d, self.num_householder * d)
        full = full.unflatten(-1, (d, d))
        r_diag, rt_diag = sylvester_diagonals(diag_raw, log_rt_diag)
        r = full.triu(1) + torch.diag_embed(r_diag)
        rt = full.mT.triu(1) + torch.diag_embed(rt_diag)
        q = householder_product(v.unflatten(-1, (self.num_householder, d)))
        return list(zip(q.unbind(-3), r.unbind(-3), rt.unbind(-3), b.unbind(-2)))

    _layer_call = staticmethod(sylvester_call)
    _layer_inverse = staticmethod(sylvester_inverse)


class AmortizedFlow(nn.Module):
    r"""``q(z | x) = FlowDistribution(N(μ(c), diag σ(c)²), f(·; c))`` for a context ``c = encoder(x)``.

    ``(μ, softplus⁻¹ σ)`` is a linear head of ``c``; the flow ``f(·; c)`` is

    * ``"planar"`` / ``"radial"``: ``num_flows`` (default 10) layers with per-example parameters from a
      linear head of ``c`` (:class:`ConditionalPlanar`, :class:`ConditionalRadial`), as in the paper;
    * ``"sylvester"``: ``num_flows`` (default 4) Householder Sylvester layers, every parameter (``R``, ``R̃``,
      ``b`` and the ``num_householder`` reflections of ``Q``, default ``min(d, 8)``) from a linear head of
      ``c`` (:class:`ConditionalSylvester`), as in van den Berg et al. (2018);
    * ``"iaf"``: ``num_flows`` (default 2) :class:`~vi_flows.transforms.InverseAutoregressive` layers,
      reversed in between, ``c`` feeding every MADE hidden layer (Kingma et al. 2016);
    * ``"coupling"``: ``num_flows`` (default 4) :class:`~vi_flows.transforms.AffineCoupling` layers on
      alternating halves, ``c`` an input of every coupling network, each preceded by an
      :class:`~vi_flows.transforms.InvertibleLinear` started at the identity
      (:func:`~vi_flows.transforms.coupling_stack`; ``linear=False`` drops those);
    * ``"spline"``: ``num_flows`` (default 4) :class:`~vi_flows.transforms.SplineCoupling` layers on
      alternating odd/even halves, ``c`` an input of every coupling network
      (:func:`~vi_flows.transforms.spline_stack`: ``bins`` rational-quadratic bins on ``[−bound, bound]``,
      default 8 on ``[−5, 5]``, the identity outside; Durkan et al. 2019). The window is in ``z``-space:
      it suits latents on the scale of an ``N(0, I)`` prior;
    * ``"cnf"``: ``num_flows`` (default 1) :class:`~vi_flows.transforms.ContinuousFlow` blocks whose
      ODE net takes ``c`` in every ConcatSquash gate and shift (not FFJORD's low-rank
      ``W + U(c)V(c)ᵀ`` hypernetwork);
    * ``"none"``: the Gaussian alone (the plain VAE).

    Every flow starts as the identity, so ``q`` starts as the Gaussian.

    Args:
        latent_dim: dimension ``d`` of ``z``.
        context_dim: last dimension of the context.
        flow: one of :data:`FLOWS`.
        num_flows: number of layers (blocks for ``"cnf"``); family default when None.
        hidden_dims: MADE widths (IAF, default ``(3d + 1,)``), coupling-net widths (coupling and spline,
            default ``(3d + 1,)``) or ODE-net widths (CNF, default ``(64, 64)``); the other families take none.
        **flow_options: passed to :class:`~vi_flows.transforms.ContinuousFlow` (``trace``, ``rtol``,
            ``atol``, ``solver``, ``gradient``, ...), :class:`~vi_flows.transforms.InverseAutoregressive`
            (``sigmoid_bias``, ``activation``), :func:`~vi_flows.transforms.coupling_stack` (``linear``,
            ``linear_init``, ``activation``, ``log_scale_bound``), :func:`~vi_flows.transforms.spline_stack`
            (``bins``, ``bound``, ``interleave``, ``activation``) or :class:`ConditionalSylvester`
            (``num_householder``).

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
        if not isinstance(flow, str) or flow not in FLOWS:
            raise ValueError(f"flow must be one of {list(FLOWS)}, got {flow!r}")
        self.flow_name = flow
        self.num_flows = DEFAULT_NUM_FLOWS[flow] if num_flows is None else _check_count(num_flows, "num_flows", 0)
        if flow == "none" and self.num_flows:
            raise ValueError(f"num_flows must be 0 (or None) for flow='none', got {num_flows!r}")
        if flow != "none" and not self.num_flows:
            raise ValueError(f"num_flows must be an integer >= 1 for flow={flow!r}, got {num_flows!r}")
        if hidden_dims is not None and flow not in ("iaf", "coupling", "spline", "cnf"):
            raise ValueError(
                f"hidden_dims applies to flow='iaf', 'coupling', 'spline' or 'cnf' only, got {hidden_dims!r} "
                f"with flow={flow!r}"
            )
        unknown = sorted(set(flow_options) - FLOW_OPTIONS.get(flow, set())) if flow != "cnf" else []
        if unknown:
            allowed = sorted(FLOW_OPTIONS.get(flow, set()))
            raise ValueError(f"flow options {unknown} do not apply to flow={flow!r}; it takes {allowed}")
        self.head = nn.Linear(context_dim, 2 * latent_dim)
        self.flow = self._make_flow(flow, hidden_dims, flow_options)

    def _make_flow(self, flow: str, hidden_dims, options: dict) -> FlowTransform | None:
        d, c, k = self.latent_dim, self.context_dim, self.num_flows
        if flow == "planar":
            return ConditionalPlanar(d, k, c)
        if flow == "radial":
            return ConditionalRadial(d, k, c)
        if flow == "sylvester":
            return ConditionalSylvester(d, k, c, **options)
        if flow == "iaf":
            return iaf_stack(d, k, hidden_dims, c, **options)
        if flow == "coupling":
            hidden = (3 * d + 1,) if hidden_dims is None else hidden_dims
            return coupling_stack(d, k, hidden, c, **{"linear_init": "identity", **options})
        if flow == "spline":
            hidden = (3 * d + 1,) if hidden_dims is None else hidden_dims
            return spline_stack(d, k, hidden, context_dim=c, **options)
        if flow == "cnf":
            hidden = (64, 64) if hidden_dims is None else hidden_dims
            if k == 1:
                return ContinuousFlow(d, hidden, c, **options)
            return stack(lambda: ContinuousFlow(d, hidden, c, **options), k, dim=d)
        return None

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, context_dim={self.context_dim}, flow={self.flow_name!r}"

    def forward(self, context: Tensor) -> FlowDistribution:
        if not isinstance(context, Tensor) or context.dim() < 1 or context.shape[-1] != self.context_dim:
            shape = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
            raise ValueError(f"context must be a tensor of shape (..., {self.context_dim}), got {shape}")
        loc, scale = self.head(context).chunk(2, -1)
        base = AffineNormal(loc, F.softplus(scale), batch_shape=context.shape[:-1])
        return FlowDistribution(base, [] if self.flow is None else [self.flow.condition(context)])
