"""Radial flow (Rezende & Mohamed 2015, eq. 14 and appendix A.2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ContextHeadStack, FlowTransform

__all__ = ["ConditionalRadial", "Radial", "RadialStack"]


def radial_alpha_beta(alpha_raw: Tensor, beta_raw: Tensor) -> tuple[Tensor, Tensor]:
    """``α = softplus(α') > 0`` and ``β = −α + softplus(β') > −α``."""
    alpha = F.softplus(alpha_raw)
    return alpha, F.softplus(beta_raw) - alpha


def identity_beta_raw(alpha_raw: Tensor) -> Tensor:
    """``β'`` with ``β = 0`` (the identity): ``softplus(β') = α``."""
    return torch.log(torch.expm1(F.softplus(alpha_raw)))


def radial_call(x: Tensor, x0: Tensor, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """``y = x + βh(x − x₀)``; ``log|det J| = (d − 1) log(1 + βh) + log(1 + βα/(α + r)²)``."""
    diff = x - x0
    r = diff.norm(dim=-1)
    beta_h = beta / (alpha + r)
    ladj = (x.shape[-1] - 1) * torch.log1p(beta_h) + torch.log1p(beta * alpha / (alpha + r) ** 2)
    return x + beta_h.unsqueeze(-1) * diff, ladj


def radial_inverse(y: Tensor, x0: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """``‖y − x₀‖ = r(1 + β/(α + r))``: the positive root of a quadratic in ``r``."""
    diff = y - x0
    r_y = diff.norm(dim=-1)
    # r² + (α + β − r_y) r − α r_y = 0, the positive root written without cancellation.
    p = alpha + beta - r_y
    root = torch.sqrt(p * p + 4 * alpha * r_y)
    r = torch.where(p > 0, 2 * alpha * r_y / (p + root), 0.5 * (root - p))
    return x0 + diff / (1 + beta / (alpha + r)).unsqueeze(-1)


class Radial(FlowTransform):
    r"""``y = x + β h(α, r)(x − x₀)`` with ``r = ‖x − x₀‖`` and ``h = 1/(α + r)``.

    ``α = softplus(α') > 0`` and ``β = −α + softplus(β') ≥ −α`` keep it
    invertible. With ``βh = β/(α + r)``:
    ``log|det J| = (d − 1) log(1 + βh) + log(1 + βα/(α + r)²)``.

    Inverse in closed form: ``‖y − x₀‖ = r (1 + β/(α + r))`` is a quadratic in
    ``r`` with one positive root, then ``x − x₀ = (y − x₀)/(1 + β/(α + r))``.
    Starts as the identity (``β = 0``).

    Reference: Rezende & Mohamed, "Variational Inference with Normalizing
    Flows", ICML 2015.
    """

    def __init__(self, dim: int):
        super().__init__(dim)
        scale = 1.0 / math.sqrt(dim)
        self.x0 = nn.Parameter(torch.empty(dim).uniform_(-scale, scale))
        self.alpha_raw = nn.Parameter(torch.empty(()).uniform_(-scale, scale))
        self.beta_raw = nn.Parameter(identity_beta_raw(self.alpha_raw.detach()))

    def alpha_beta(self) -> tuple[Tensor, Tensor]:
        return radial_alpha_beta(self.alpha_raw, self.beta_raw)

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return radial_call(x, self.x0, *self.alpha_beta())

    def _inverse(self, y: Tensor) -> Tensor:
        return radial_inverse(y, self.x0, *self.alpha_beta())


class RadialStack(FlowTransform):
    """``num_flows`` radial layers with packed parameters (see :class:`~vi_flows.transforms.PlanarStack`)."""

    def __init__(self, dim: int, num_flows: int):
        super().__init__(dim)
        if isinstance(num_flows, bool) or not isinstance(num_flows, int) or num_flows < 1:
            raise ValueError(f"num_flows must be an integer >= 1, got {num_flows!r}")
        self.num_flows = num_flows
        scale = 1.0 / math.sqrt(dim)
        self.x0 = nn.Parameter(torch.empty(num_flows, dim).uniform_(-scale, scale))
        self.alpha_raw = nn.Parameter(torch.empty(num_flows).uniform_(-scale, scale))
        self.beta_raw = nn.Parameter(identity_beta_raw(self.alpha_raw.detach()))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_flows={self.num_flows}"

    def _layers(self):
        alpha, beta = radial_alpha_beta(self.alpha_raw, self.beta_raw)
        return zip(self.x0.unbind(0), alpha.unbind(0), beta.unbind(0))

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        total = 0.0
        for x0, alpha, beta in self._layers():
            x, ladj = radial_call(x, x0, alpha, beta)
            total = total + ladj
        return x, total

    def _inverse(self, y: Tensor) -> Tensor:
        for x0, alpha, beta in reversed(list(self._layers())):
            y = radial_inverse(y, x0, alpha, beta)
        return y


class ConditionalRadial(ContextHeadStack):
    r"""``num_flows`` radial layers ``y = x + β(c) (x − x₀(c))/(α(c) + ‖x − x₀(c)‖)``, ``(x₀, α', β')`` linear in ``c``.

    ``α = softplus(α')``, ``β = −α + softplus(β')`` as in :class:`Radial`; ``β' = W_β c + a_β + β'₀(α')``
    with ``β'₀`` (:func:`identity_beta_raw`) giving ``β = 0`` and ``W_β, a_β`` starting at zero, so that
    every layer starts as the identity for every context. ``log|det J|`` as in :class:`Radial`. Shapes:
    ``x (*batch_x, dim)``, ``context (*batch_c, context_dim)``, broadcasting.

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
