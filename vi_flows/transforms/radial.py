"""Radial flow (Rezende & Mohamed 2015, eq. 14 and appendix A.2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import FlowTransform

__all__ = ["Radial"]


class Radial(FlowTransform):
    r"""``y = x + β h(α, r)(x − x₀)`` with ``r = ‖x − x₀‖`` and ``h = 1/(α + r)``.

    ``α = softplus(α') > 0`` and ``β = −α + softplus(β') > −α`` keep it
    invertible. With ``βh = β/(α + r)``:
    ``log|det J| = (d − 1) log(1 + βh) + log(1 + βα/(α + r)²)``.

    Inverse in closed form: ``‖y − x₀‖ = r (1 + β/(α + r))`` is a quadratic in
    ``r`` with one positive root, then ``x − x₀ = (y − x₀)/(1 + β/(α + r))``.

    Reference: Rezende & Mohamed, "Variational Inference with Normalizing
    Flows", ICML 2015.
    """

    def __init__(self, dim: int):
        super().__init__(dim)
        scale = 1.0 / math.sqrt(dim)
        self.x0 = nn.Parameter(torch.empty(dim).uniform_(-scale, scale))
        self.alpha_raw = nn.Parameter(torch.empty(()).uniform_(-scale, scale))
        self.beta_raw = nn.Parameter(torch.empty(()).uniform_(-scale, scale))

    def alpha_beta(self) -> tuple[Tensor, Tensor]:
        alpha = F.softplus(self.alpha_raw)
        return alpha, F.softplus(self.beta_raw) - alpha

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        alpha, beta = self.alpha_beta()
        diff = x - self.x0
        r = diff.norm(dim=-1)
        beta_h = beta / (alpha + r)
        y = x + beta_h.unsqueeze(-1) * diff
        ladj = (self.dim - 1) * torch.log1p(beta_h) + torch.log1p(beta * alpha / (alpha + r) ** 2)
        return y, ladj

    def _inverse(self, y: Tensor) -> Tensor:
        alpha, beta = self.alpha_beta()
        diff = y - self.x0
        r_y = diff.norm(dim=-1)
        # r² + (α + β − r_y) r − α r_y = 0; the positive root, written without cancellation.
        p = alpha + beta - r_y
        root = torch.sqrt(p * p + 4 * alpha * r_y)
        r = torch.where(p > 0, 2 * alpha * r_y / (p + root), 0.5 * (root - p))
        return self.x0 + diff / (1 + beta / (alpha + r)).unsqueeze(-1)
