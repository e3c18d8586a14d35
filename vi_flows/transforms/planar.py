"""Planar flow (Rezende & Mohamed 2015, eq. 10 and appendix A.1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._roots import solve_increasing
from .base import FlowTransform

__all__ = ["Planar"]


MARGIN = 1e-4


class Planar(FlowTransform):
    r"""``y = x + û tanh(wᵀx + b)``.

    ``û = u + (m(wᵀu) − wᵀu) w/‖w‖²`` with ``m(a) = −1 + δ + softplus(a)`` keeps
    ``wᵀû > −1``, which makes the layer invertible. The paper has ``δ = 0``;
    then ``wᵀû`` rounds to exactly −1 once ``wᵀu < −37`` (float64) and the
    layer turns singular, so ``δ = 1e-4`` bounds ``|det J| ≥ 1e-4``. By the matrix determinant
    lemma ``log|det J| = log|1 + (1 − tanh²(wᵀx + b)) wᵀû|``, O(d).

    The inverse solves the scalar equation ``wᵀy = α + wᵀû tanh(α + b)``
    (strictly increasing in ``α``) by safeguarded Newton to machine precision,
    then ``x = y − û tanh(α + b)``. One differentiable Newton step at the root
    gives the implicit-function gradient, so ``log_prob`` of data trains the
    layer (maximum likelihood).

    Reference: Rezende & Mohamed, "Variational Inference with Normalizing
    Flows", ICML 2015.
    """

    def __init__(self, dim: int, init_scale: float | None = None):
        super().__init__(dim)
        scale = 1.0 / math.sqrt(dim) if init_scale is None else init_scale
        self.u = nn.Parameter(torch.empty(dim).uniform_(-scale, scale))
        self.w = nn.Parameter(torch.empty(dim).uniform_(-scale, scale))
        self.b = nn.Parameter(torch.zeros(()))

    def u_hat(self) -> Tensor:
        """The constrained ``û`` with ``wᵀû = m(wᵀu) > −1``."""
        w, u = self.w, self.u
        wu = w @ u
        w_sq = w @ w
        # ‖w‖² = 0 makes the layer a shift for any û; avoid 0/0 there.
        w_sq = torch.where(w_sq > torch.finfo(w.dtype).tiny, w_sq, torch.ones_like(w_sq))
        return u + ((F.softplus(wu) + (MARGIN - 1.0) - wu) / w_sq) * w

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u_hat = self.u_hat()
        h = torch.tanh(x @ self.w + self.b)
        y = x + h.unsqueeze(-1) * u_hat
        ladj = torch.log1p((1 - h * h) * (self.w @ u_hat))
        return y, ladj

    def _inverse(self, y: Tensor) -> Tensor:
        u_hat = self.u_hat()
        w, b = self.w, self.b
        wu = w @ u_hat
        s = y @ w

        def g(alpha: Tensor) -> tuple[Tensor, Tensor]:
            t = torch.tanh(alpha + b)
            return alpha + wu * t - s, 1 + wu * (1 - t * t)

        with torch.no_grad():
            reach = wu.detach().abs()
            alpha = solve_increasing(g, s.detach() - reach, s.detach() + reach)
        if torch.is_grad_enabled():
            value, slope = g(alpha)
            alpha = alpha - value / slope.detach()
        return y - torch.tanh(alpha + b).unsqueeze(-1) * u_hat
